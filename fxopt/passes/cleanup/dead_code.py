"""eliminate-dead-code: drop ops whose results nobody uses, and the weights they read."""
from __future__ import annotations

from dataclasses import dataclass

from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.registry import register_pass


@register_pass
@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    name = "eliminate-dead-code"
    summary = "remove ops whose results are never used, and unused weights"

    def run(self, graph: Graph) -> PassResult:
        before = len(graph)
        graph.fx_graph.eliminate_dead_code()
        removed_params = graph.remove_unused_params()
        removed = before - len(graph)
        modified = removed > 0 or removed_params > 0
        return PassResult(graph, modified, {"removed_nodes": removed, "removed_params": removed_params})
