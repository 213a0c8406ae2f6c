"""eliminate-common-subexpressions: compute each pure expression once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.passes.cleanup.common import is_pure
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.registry import register_pass


@register_pass
@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    name = "eliminate-common-subexpressions"
    summary = "merge identical pure ops (and reads of the same weight)"

    def run(self, graph: Graph) -> PassResult:
        seen: Dict[Any, fx.Node] = {}
        merged = 0
        for node in list(graph.fx_graph.nodes):
            key = _key(node)
            if key is None:
                continue
            if key in seen:
                node.replace_all_uses_with(seen[key])
                graph.fx_graph.erase_node(node)
                merged += 1
            else:
                seen[key] = node
        return PassResult(graph, merged > 0, {"merged": merged})


def _key(node: fx.Node):
    if node.op == "get_attr":
        return ("get_attr", node.target)
    if not is_pure(node):
        return None
    try:
        key = (node.target, _freeze(node.args), _freeze(node.kwargs))
        hash(key)
    except TypeError:
        return None
    return key


def _freeze(value):
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", value)  # keeps 1 and 1.0 apart: they promote differently
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor literal")
    return (type(value).__name__, value)
