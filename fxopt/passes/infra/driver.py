"""The rewrite engine's editing half: Rewriter and the greedy fixed-point driver.

All edits go through a :class:`Rewriter`, which inserts nodes before the match
root, infers their metadata, carries ``stack_trace`` over from the node being
replaced, and records what it inserted and erased.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Sequence

import torch
import torch.fx as fx

from fxopt.errors import PatternError, describe_node
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.pattern import Match, PatternBase

DEFAULT_MAX_ITERATIONS = 100


class Rewriter:
    """Builds replacement nodes for one match and swaps them in."""

    def __init__(self, graph: Graph, anchor: fx.Node):
        self.graph = graph
        self.anchor = anchor
        self.inserted: List[fx.Node] = []
        self.erased: List[str] = []
        self._mode = M.fake_mode_of(graph.fx_graph)

    def call(self, target, *args, **kwargs) -> fx.Node:
        """Insert ``target(*args, **kwargs)`` before the anchor; its metadata is inferred."""
        with self.graph.fx_graph.inserting_before(self.anchor):
            node = self.graph.fx_graph.call_function(target, tuple(args), kwargs)
        self._adopt(node)
        M.infer_val(node, self._mode)
        return node

    def param(self, name_hint: str, tensor: torch.Tensor) -> fx.Node:
        """A new weight (get_attr node) holding ``tensor``."""
        node = self.graph.add_param(name_hint, tensor)
        self.inserted.append(node)
        return node

    def inline(self, sub: fx.Graph, env: Dict[fx.Node, Any]) -> List[fx.Node]:
        """Copy ``sub``'s ops before the anchor, its placeholders bound by ``env``; return its outputs."""
        result: Any = None
        for node in sub.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[n])
                break
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = self.call(node.target, *args, **kwargs)
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Make every user of ``old`` read ``new`` instead."""
        if old is new:
            return
        _check_compatible(old, new)
        old.replace_all_uses_with(new)

    def erase_dead(self, nodes: Sequence[fx.Node]) -> None:
        """Erase the given nodes that no longer have users, users before their inputs."""
        # dict.fromkeys: a pattern that names one Op twice (a DAG) lists its node twice; erase it once.
        pending = list(dict.fromkeys(n for n in nodes if n.op == "call_function" and not n._erased))
        changed = True
        while changed:
            changed = False
            for node in list(pending):
                if not node.users:
                    self.erased.append(node.name)
                    self.graph.fx_graph.erase_node(node)
                    pending.remove(node)
                    changed = True

    def _adopt(self, node: fx.Node) -> None:
        trace = self.anchor.meta.get("stack_trace")
        if trace is not None:
            node.meta["stack_trace"] = trace
        if "nn_module_stack" in self.anchor.meta:
            node.meta["nn_module_stack"] = self.anchor.meta["nn_module_stack"]
        self.inserted.append(node)


def _check_compatible(old: fx.Node, new: fx.Node) -> None:
    a, b = M.node_info(old), M.node_info(new)
    if isinstance(a, M.TensorInfo) and isinstance(b, M.TensorInfo):
        if a.dtype != b.dtype or not M.shapes_equal(a.shape, b.shape):
            raise PatternError(
                f"rewrite: replacing {describe_node(old)} ({a}) with {describe_node(new)} ({b}) changes the "
                "value's shape or dtype; a replacement must produce what the pattern produced"
            )


@dataclass
class RewriteStats:
    applied: Counter
    declined: Counter
    iterations: int

    def as_dict(self) -> Dict[str, Any]:
        return {"matches": dict(self.applied), "declined": dict(self.declined), "iterations": self.iterations}


def apply_patterns(graph: Graph, patterns: Sequence[PatternBase], max_iterations: int = DEFAULT_MAX_ITERATIONS) -> RewriteStats:
    """Apply patterns greedily until none fires; raise PatternError if that takes too long."""
    stats = RewriteStats(Counter(), Counter(), 0)
    declined_roots: set = set()
    history: List[Counter] = []
    while True:
        fired = _one_sweep(graph, patterns, stats, declined_roots)
        if not fired:
            return stats
        # The graph changed: a rewrite declined in this sweep may apply now (a copy kept because a view read
        # it, once the view is gone), so every match is looked at again in the next sweep.
        declined_roots.clear()
        stats.iterations += 1
        history.append(fired)
        if stats.iterations >= max_iterations:
            raise _not_converged(history, max_iterations)


def _one_sweep(graph: Graph, patterns: Sequence[PatternBase], stats: RewriteStats, declined_roots: set) -> Counter:
    fired: Counter = Counter()
    for pattern in patterns:
        touched: set = set()
        for match in list(pattern.matches(graph.fx_graph)):
            key = (pattern.name, match.root)
            if key in declined_roots or not _still_valid(graph, match, touched):
                continue
            if _apply(graph, match):
                fired[pattern.name] += 1
                stats.applied[pattern.name] += 1
                touched.update(match.nodes)
            else:
                declined_roots.add(key)
                stats.declined[pattern.name] += 1
    return fired


def _still_valid(graph: Graph, match: Match, touched: set) -> bool:
    """A match found before earlier rewrites of this sweep may refer to erased or rewritten nodes."""
    captured = [v for v in match.captures.values() if isinstance(v, fx.Node)]
    everything = [*match.nodes, *match.returning, *captured]
    alive = all(not getattr(n, "_erased", False) for n in everything)
    return alive and not any(n in touched for n in everything)


def _apply(graph: Graph, match: Match) -> bool:
    rewriter = Rewriter(graph, match.root)
    result = match.pattern.apply(rewriter, match)
    if result is None:
        rewriter.erase_dead(rewriter.inserted)
        return False
    new_outputs = result if isinstance(result, (list, tuple)) else [result]
    if len(new_outputs) != len(match.returning):
        raise PatternError(
            f"pattern {match.pattern.name}: rewrite returned {len(new_outputs)} values for "
            f"{len(match.returning)} pattern outputs; return one node per output"
        )
    for old, new in zip(match.returning, new_outputs):
        rewriter.replace(old, new)
    rewriter.erase_dead(match.nodes)
    return True


def kept_firing(history: List[Counter], last: int = 5) -> str:
    """``"name (Nx), ..."``: what fired in the last ``last`` rounds of a rewrite loop, most first."""
    recent: Counter = Counter()
    for fired in history[-last:]:
        recent.update(fired)
    return ", ".join(f"{name} ({count}x)" for name, count in recent.most_common())


def _not_converged(history: List[Counter], max_iterations: int) -> PatternError:
    names = kept_firing(history)
    return PatternError(
        f"rewrite: did not converge after {max_iterations} iterations; patterns that kept firing in the last "
        f"{min(5, len(history))} iterations: {names}; a pattern's replacement probably matches that pattern "
        "(or another one) again"
    )


@dataclass(frozen=True)
class RewritePass(Pass):
    """A pass made of rewrite patterns, run to a fixed point by the greedy driver."""

    max_iterations: ClassVar[int] = DEFAULT_MAX_ITERATIONS

    def patterns(self) -> List[PatternBase]:
        raise NotImplementedError(f"{type(self).__name__} must implement patterns()")

    def run(self, graph: Graph) -> PassResult:
        stats = apply_patterns(graph, self.patterns(), self.max_iterations)
        modified = sum(stats.applied.values()) > 0
        if modified:
            graph.remove_unused_params()
        return PassResult(graph, modified, stats.as_dict())
