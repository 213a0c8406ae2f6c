"""fold-constants: evaluate subgraphs that depend only on weights, store the results as weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.passes.cleanup.common import can_fold
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.registry import register_pass


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Fold pure ops whose inputs are all weights or literals.

    A folded result is kept only if it is no larger than ``max_growth`` times
    the weights it reads, or smaller than ``small_bytes`` (so broadcasting a
    bias to a batch shape is not baked in, but a transposed weight is).
    """

    name = "fold-constants"
    summary = "precompute subgraphs that depend only on weights"
    max_growth: float = 1.0
    small_bytes: int = 65536

    def __post_init__(self):
        if self.max_growth < 0 or self.small_bytes < 0:
            raise self.error(f"max-growth={self.max_growth} and small-bytes={self.small_bytes} must be >= 0")

    def run(self, graph: Graph) -> PassResult:
        values = self._evaluate_constant_nodes(graph)
        folded = 0
        for node in self._frontier(graph, values):
            new = graph.add_param(f"folded_{node.name}", values[node].detach().clone())
            node.replace_all_uses_with(new)
            folded += 1
        if folded:
            graph.fx_graph.eliminate_dead_code()
            graph.remove_unused_params()
        return PassResult(graph, folded > 0, {"folded": folded})

    def _evaluate_constant_nodes(self, graph: Graph) -> Dict[fx.Node, object]:
        values: Dict[fx.Node, object] = {}
        for node in graph.fx_graph.nodes:
            if node.op == "get_attr":
                values[node] = graph.param(node)
            elif node.op == "call_function" and can_fold(node) and all(i in values for i in node.all_input_nodes):
                args = fx.node.map_arg(node.args, values.__getitem__)
                kwargs = fx.node.map_arg(node.kwargs, values.__getitem__)
                with torch.no_grad():
                    values[node] = node.target(*args, **kwargs)
        return values

    def _frontier(self, graph: Graph, values: Dict[fx.Node, object]) -> List[fx.Node]:
        """Computed constant tensors read by at least one node that is not constant."""
        chosen = []
        for node, value in values.items():
            if node.op != "call_function" or not isinstance(value, torch.Tensor):
                continue
            if all(user in values for user in node.users):
                continue
            if self._worth_folding(node, value, values):
                chosen.append(node)
        return chosen

    def _worth_folding(self, node: fx.Node, value: torch.Tensor, values: Dict[fx.Node, object]) -> bool:
        out_bytes = value.numel() * value.element_size()
        in_bytes = sum(_weight_bytes(n, values) for n in _constant_leaves(node))
        return out_bytes <= max(self.max_growth * in_bytes, self.small_bytes)


def _constant_leaves(node: fx.Node) -> List[fx.Node]:
    leaves, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            leaves.append(n)
        stack.extend(n.all_input_nodes)
    return leaves


def _weight_bytes(node: fx.Node, values: Dict[fx.Node, object]) -> int:
    t = values[node]
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
