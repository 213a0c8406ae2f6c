"""Rewrite patterns, written two ways, matched by one engine (see driver.py).

**By example**: plain torch functions for the pattern and the replacement,
traced to ATen with the same exporter as :func:`fxopt.capture`::

    def pattern(x, w, b):     return torch.relu(F.linear(x, w, b))
    def replacement(x, w, b): return torch.clamp_min(F.linear(x, w, b), 0.0)
    ExamplePattern(pattern, replacement, example_inputs=(x, w, b))

**Declarative**: op trees with named captures; the rewrite function gets the
captures as keyword arguments plus a Rewriter, and returns the node that
replaces the root, or None to decline::

    OpPattern(Op(aten.relu.default, Op(aten.linear.default, Var("x"), Var("w"), Var("b"))),
              rewrite=lambda rw, x, w, b: rw.call(...))

Matching never mutates the graph.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

from fxopt.errors import PatternError


@dataclass
class Match:
    """One place where a pattern matched: its nodes, root (the node replaced) and captures."""

    pattern: "PatternBase"
    root: fx.Node
    nodes: List[fx.Node]
    captures: Dict[str, Any] = field(default_factory=dict)
    #: By-example matches: the graph nodes bound to the pattern's outputs, in order.
    returning: List[fx.Node] = field(default_factory=list)


class PatternBase:
    name: str

    def matches(self, graph: fx.Graph) -> Iterator[Match]:
        raise NotImplementedError

    def apply(self, rewriter, match: Match):
        """Return the replacement node(s) for ``match``, or None to decline."""
        raise NotImplementedError


# ============================================================= by example
class ExamplePattern(PatternBase):
    """A pattern and its replacement written as torch functions, traced to ATen."""

    def __init__(
        self,
        pattern: Callable,
        replacement: Callable,
        example_inputs: Sequence[Any],
        check: Optional[Callable[[Match], bool]] = None,
        name: Optional[str] = None,
        ignore_literals: bool = False,
    ):
        self.name = name or getattr(pattern, "__name__", "pattern").removesuffix("_pattern")
        self.check = check
        self.arg_names = _arg_names(pattern, example_inputs, self.name)
        self.pattern_graph = trace_to_aten(pattern, example_inputs, self.name)
        self.replacement_graph = trace_to_aten(replacement, example_inputs, self.name)
        _check_same_signature(self.name, self.pattern_graph, self.replacement_graph)
        self._matcher = SubgraphMatcher(
            self.pattern_graph, match_output=False, match_placeholder=False,
            remove_overlapping_matches=True, ignore_literals=ignore_literals,
        )

    def matches(self, graph: fx.Graph) -> Iterator[Match]:
        for internal in self._matcher.match(graph):
            returning = list(internal.returning_nodes)
            nodes = [n for p, n in internal.nodes_map.items() if p.op not in ("placeholder", "output")]
            order = {n: i for i, n in enumerate(graph.nodes)}
            root = max(returning, key=order.__getitem__)
            captures = dict(zip(self.arg_names, internal.placeholder_nodes))
            match = Match(self, root, nodes, captures, returning)
            if self.check is None or self.check(match):
                yield match

    def apply(self, rewriter, match: Match):
        env = dict(zip(_placeholders(self.replacement_graph), match.captures.values()))
        outputs = rewriter.inline(self.replacement_graph, env)
        return outputs


def trace_to_aten(fn: Callable, example_inputs: Sequence[Any], name: str) -> fx.Graph:
    """Trace a torch function to a plain fx.Graph of ATen ops (placeholders, ops, output)."""
    from fxopt.ir.capture import capture  # local: capture pulls in the exporter

    class _Wrapper(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    try:
        traced = capture(_Wrapper(), tuple(example_inputs))
    except Exception as exc:
        raise PatternError(f"pattern {name}: cannot trace {getattr(fn, '__name__', fn)}: {exc}") from exc
    plain = fx.Graph()
    out = plain.graph_copy(traced.module.graph, {})
    plain.output(out)
    plain.eliminate_dead_code()
    if any(n.op == "get_attr" for n in plain.nodes):
        raise PatternError(
            f"pattern {name}: {getattr(fn, '__name__', fn)} creates constant tensors; "
            "pass every tensor as an argument so the pattern stays weight-free"
        )
    return plain


def _arg_names(fn: Callable, example_inputs: Sequence[Any], name: str) -> List[str]:
    params = list(inspect.signature(fn).parameters)
    if len(params) != len(example_inputs):
        raise PatternError(
            f"pattern {name}: {fn.__name__} takes {len(params)} arguments but {len(example_inputs)} example "
            "inputs were given; give one example tensor per argument"
        )
    return params


def _placeholders(graph: fx.Graph) -> List[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _outputs(graph: fx.Graph) -> Tuple:
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _check_same_signature(name: str, pattern: fx.Graph, replacement: fx.Graph) -> None:
    n_pat, n_rep = len(_outputs(pattern)), len(_outputs(replacement))
    if n_pat != n_rep:
        raise PatternError(
            f"pattern {name}: the replacement returns {n_rep} values but the pattern returns {n_pat}; "
            "a replacement must have the pattern's signature"
        )


# ============================================================ declarative
class Var:
    """Captures whatever stands in this position (a node or a literal) under ``name``.

    The same name used twice must bind the same value. ``where`` filters.
    """

    def __init__(self, name: str, where: Optional[Callable[[Any], bool]] = None):
        self.name, self.where = name, where


class AnyValue:
    """Matches anything without capturing it."""


class Op:
    """Matches a call_function node whose target is ``target`` (or one of a tuple of targets).

    ``args`` are sub-patterns: Op, Var, AnyValue or literals. Missing trailing
    arguments of the node compare against the op schema's defaults. Inner Op
    nodes must have no users outside the match unless ``multi_use`` is set.
    """

    def __init__(self, target, *args, name: Optional[str] = None, where: Optional[Callable[[fx.Node], bool]] = None,
                 multi_use: bool = False, **kwargs):
        self.targets = target if isinstance(target, tuple) else (target,)
        self.args, self.kwargs = args, kwargs
        self.name, self.where, self.multi_use = name, where, multi_use

    def accepts_target(self, target) -> bool:
        return any(target == t or getattr(target, "overloadpacket", None) is t for t in self.targets)


class OpPattern(PatternBase):
    """A declarative pattern: an Op tree plus ``rewrite(rewriter, **captures) -> node | None``."""

    def __init__(self, root: Op, rewrite: Callable[..., Optional[fx.Node]], name: Optional[str] = None):
        if not isinstance(root, Op):
            raise PatternError(f"pattern {name or rewrite.__name__}: the root must be an Op, got {type(root).__name__}")
        self.root, self.rewrite = root, rewrite
        self.name = name or rewrite.__name__.removesuffix("_rewrite")

    def matches(self, graph: fx.Graph) -> Iterator[Match]:
        for node in graph.nodes:
            if node.op != "call_function" or not self.root.accepts_target(node.target):
                continue
            captures: Dict[str, Any] = {}
            nodes: List[fx.Node] = []
            if _match_op(self.root, node, captures, nodes, is_root=True):
                yield Match(self, node, nodes, captures, [node])

    def apply(self, rewriter, match: Match):
        return self.rewrite(rewriter, **match.captures)


def _match_op(pat: Op, node: Any, captures: Dict[str, Any], nodes: List[fx.Node], is_root: bool = False) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function" or not pat.accepts_target(node.target):
        return False
    if not is_root and not pat.multi_use and len(node.users) != 1:
        return False
    for i, sub in enumerate(pat.args):
        present, value = node_argument(node, i)
        if not present or not _match_value(sub, value, captures, nodes):
            return False
    for key, sub in pat.kwargs.items():
        present, value = node_argument(node, key)
        if not present or not _match_value(sub, value, captures, nodes):
            return False
    if pat.where is not None and not pat.where(node):
        return False
    nodes.append(node)
    if pat.name:
        return _bind(captures, pat.name, node)
    return True


def _match_value(sub: Any, value: Any, captures: Dict[str, Any], nodes: List[fx.Node]) -> bool:
    if isinstance(sub, Op):
        return _match_op(sub, value, captures, nodes)
    if isinstance(sub, Var):
        if sub.where is not None and not sub.where(value):
            return False
        return _bind(captures, sub.name, value)
    if isinstance(sub, AnyValue):
        return True
    return not isinstance(value, fx.Node) and type(sub) is type(value) and sub == value


def _bind(captures: Dict[str, Any], name: str, value: Any) -> bool:
    if name in captures:
        bound = captures[name]
        return bound is value if isinstance(value, fx.Node) or isinstance(bound, fx.Node) else bound == value
    captures[name] = value
    return True


def node_argument(node: fx.Node, key) -> Tuple[bool, Any]:
    """Argument ``key`` (position or name) of a call, falling back to the op schema's default."""
    schema = getattr(node.target, "_schema", None)
    arguments = list(schema.arguments) if schema is not None else []
    if isinstance(key, int):
        if key < len(node.args):
            return True, node.args[key]
        if key >= len(arguments):
            return False, None
        key = arguments[key].name
    if key in node.kwargs:
        return True, node.kwargs[key]
    for position, arg in enumerate(arguments):
        if arg.name == key:
            if position < len(node.args):
                return True, node.args[position]
            if arg.has_default_value():
                return True, arg.default_value
    return False, None
