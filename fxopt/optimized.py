""":class:`OptimizedModel`: what ``fxopt.optimize`` and ``fxopt.load`` return, an ``nn.Module`` on every target."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from fxopt.ir import Graph


class OptimizedModel(torch.nn.Module):
    """Callable like the model (``forward`` returns the model's own output type: a tensor, a tuple, a dict or a
    ``ModelOutput``), with its graph, a report and ``save``. ``target`` names the target that lowered it."""

    def __init__(self, runner: Callable, graph: Graph, target: str, pipeline: str,
                 original_graph: Optional[Graph] = None, stats: Optional[Dict[str, Any]] = None):
        super().__init__()
        self.runner = runner
        self.graph = graph
        self.target = target
        self.pipeline = pipeline
        self.original_graph = original_graph
        self.stats: Dict[str, Any] = stats if stats is not None else {}
        self.eval()

    def forward(self, *inputs, **kwargs):
        return self.runner(*inputs, **kwargs)

    def report(self) -> Dict[str, Any]:
        """Sizes, parameter counts, the pipeline, what each step did, the per-layer error, and the latency
        against the original measured by ``optimize`` on this machine (``latency_ms``, ``original_latency_ms``)."""
        out = {"target": self.target, "pipeline": self.pipeline, "params": self.graph.param_count(),
               "size_bytes": self.graph.size_bytes(), **self.stats}
        if self.original_graph is not None:
            out["original_params"] = self.original_graph.param_count()
            out["original_size_bytes"] = self.original_graph.size_bytes()
        return out

    def html_report(self, path: Union[str, Path]) -> Path:
        """Write the HTML report (candidates, Pareto plot, per-layer error, graphs before/after) to ``path``."""
        from fxopt.report.html import write_html
        return write_html(jsonable(self.report()), path, graph_after=self.graph)

    def save(self, directory: Union[str, Path]) -> Path:
        """Write an artifact directory (atomically) that ``fxopt.load`` reads back without the model's source."""
        from fxopt.backends.artifact import save_artifact
        from fxopt.targets import target_class
        extra = {"pipeline": self.pipeline, "report": jsonable(self.report())}
        files = target_class(self.target)().files(self.runner)
        return save_artifact(self.graph, directory, target=self.target, files=files, extra=extra)

    def extra_repr(self) -> str:
        return f"target={self.target!r}, pipeline={self.pipeline!r}"


def jsonable(value):
    """``value`` with every dict key a string and every leaf a JSON scalar (others as their ``str``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
