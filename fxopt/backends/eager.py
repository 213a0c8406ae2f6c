"""The eager backend: run the graph's GraphModule in PyTorch. The reference for every other backend."""
from __future__ import annotations

from typing import Any

import torch

from fxopt.ir.graph import Graph

TARGET = "eager"


class EagerModule:
    """A callable that checks inputs against the graph's specs and runs it without autograd."""

    target = TARGET

    def __init__(self, graph: Graph):
        self.graph = graph

    def __call__(self, *inputs: Any, **kwargs: Any):
        self.graph.check_inputs(inputs, kwargs)
        with torch.inference_mode():
            return self.graph.module(*inputs, **kwargs)


def lower(graph: Graph) -> EagerModule:
    """Lower to eager PyTorch: nothing to compile; the graph is recompiled to Python code."""
    graph.recompile()
    return EagerModule(graph)
