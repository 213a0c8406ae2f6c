"""The dependency analysis's state: one term per axis of every value, plus blocks and roles.

:class:`Analysis` walks the graph's networkx view (``graph.to_networkx()``) in topological order
and asks each op's handler (``handlers.py``) to relate the axes of its inputs and outputs by
unifying their terms (``terms.py``). Handlers also record

- *blocks*: a term that must keep its size, and why (a graph input or output, an op the analysis
  does not know, a fixed-size tensor made inside the graph, ...);
- *roles*: what a term is to the op (a linear's output features, an attention matmul's head axis,
  a LayerNorm's normalized axis, ...), from which ``groups.py`` names each group's kind;
- *param roles*: which weight axes produce a group's units (``out``) and which consume them (``in``).

Blocks and roles are resolved to atoms only at the end, when every term is final.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import networkx as nx
import torch.fx as fx

from fxopt.errors import describe_node
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.prune import terms as T

Axes = List[T.Term]


class Analysis:
    """Axis terms of every value of ``graph``; built by :func:`analyse`."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.view = graph.to_networkx()
        self.nodes: Dict[str, fx.Node] = {n.name: n for n in graph.nodes}
        self.axes_of: Dict[fx.Node, object] = {}  # node -> Axes, or a tuple of Axes/None for tuple values
        self.param_axes: Dict[str, Axes] = {}  # get_attr target -> axes (shared by nodes of one target)
        self.blocks: List[Tuple[T.Term, str]] = []
        self.roles: List[Tuple[T.Term, str]] = []
        self.param_roles: Dict[Tuple[str, int], str] = {}
        self.extra: Dict[fx.Node, dict] = {}  # per-node terms a handler's fix needs (slice bounds, conv groups)
        self.unknown: List[fx.Node] = []

    # ------------------------------------------------------------ for handlers
    def info(self, value) -> Optional[M.TensorInfo]:
        if not isinstance(value, fx.Node):
            return None
        info = self.view.nodes[value.name]["info"]
        return info if isinstance(info, M.TensorInfo) else None

    def shape(self, value) -> Tuple[int, ...]:
        return tuple(concrete_shape(self.info(value).shape))

    def axes(self, value, index: Optional[int] = None) -> Optional[Axes]:
        """The axis terms of a value (of item ``index`` of a tuple value); None for non-tensors."""
        if not isinstance(value, fx.Node) or value not in self.axes_of:
            return None
        axes = self.axes_of[value]
        if isinstance(axes, tuple):
            return axes[index] if index is not None and index < len(axes) else None
        return axes

    def set_axes(self, node: fx.Node, axes) -> None:
        self.axes_of[node] = axes

    def fresh(self, shape: Sequence[int]) -> Axes:
        return [T.Atom(d) for d in concrete_shape(shape)]

    def fresh_output(self, node: fx.Node) -> object:
        """Fresh atoms for every tensor the node returns (a tuple value gets a tuple)."""
        info = self.view.nodes[node.name]["info"]
        if isinstance(info, M.TensorInfo):
            axes = self.fresh(info.shape)
        elif isinstance(info, tuple):
            axes = tuple(self.fresh(i.shape) if isinstance(i, M.TensorInfo) else None for i in info)
        else:
            axes = None
        self.set_axes(node, axes)
        return axes

    def unify(self, a: T.Term, b: T.Term, node: fx.Node) -> None:
        if not T.unify(a, b):
            reason = f"the axes {describe_node(node)} relates cannot be matched (a reshape across a concatenation)"
            self.block(a, reason)
            self.block(b, reason)

    def unify_all(self, xs: Sequence[T.Term], ys: Sequence[T.Term], node: fx.Node) -> None:
        for x, y in zip(xs, ys):
            self.unify(x, y, node)

    def block(self, term: T.Term, reason: str) -> None:
        self.blocks.append((term, reason))

    def block_value(self, value, reason: str) -> None:
        axes = self.axes_of.get(value) if isinstance(value, fx.Node) else None
        for item in (axes if isinstance(axes, tuple) else (axes,)):
            for term in item or ():
                self.block(term, reason)

    def role(self, term: T.Term, role: str) -> None:
        self.roles.append((term, role))

    def param_role(self, value, axis: int, role: str) -> None:
        """Record that ``axis`` of weight ``value`` (a get_attr node) ``role``s ("out"/"in") its groups."""
        if isinstance(value, fx.Node) and value.op == "get_attr":
            rank = len(self.shape(value))
            self.param_roles.setdefault((value.target, axis % rank), role)

    # --------------------------------------------------------------- results
    def atom_reasons(self) -> Dict[T.Atom, List[str]]:
        reasons: Dict[T.Atom, List[str]] = {}
        for term, reason in self.blocks:
            for atom in T.atoms(term):
                found = reasons.setdefault(atom, [])
                if reason not in found:
                    found.append(reason)
        return reasons

    def atom_roles(self) -> Dict[T.Atom, set]:
        roles: Dict[T.Atom, set] = {}
        for term, role in self.roles:
            for atom in T.atoms(term):
                roles.setdefault(atom, set()).add(role)
        return roles


def analyse(graph: Graph) -> Analysis:
    """Relate every axis of ``graph`` (see the module docstring)."""
    from fxopt.passes.prune.handlers import handler_for

    an = Analysis(graph)
    position = {n.name: i for i, n in enumerate(graph.nodes)}  # ties in the topological order: graph order
    for name in nx.lexicographical_topological_sort(an.view, key=position.__getitem__):
        node = an.nodes[name]
        if node.op == "placeholder":
            an.fresh_output(node)
            an.block_value(node, f"it is graph input %{node.name}")
        elif node.op == "get_attr":
            _param_axes(an, node)
        elif node.op == "output":
            for value in node.all_input_nodes:
                an.block_value(value, "it is a graph output")
        elif node.op == "call_function":
            _relate(an, node, handler_for(node))
    return an


def _param_axes(an: Analysis, node: fx.Node) -> None:
    axes = an.param_axes.get(node.target)
    if axes is None:
        info = an.info(node)
        axes = an.fresh(info.shape) if info is not None else None
        an.param_axes[node.target] = axes
    an.set_axes(node, axes)


def _relate(an: Analysis, node: fx.Node, handler) -> None:
    if handler is None:
        an.fresh_output(node)
        an.unknown.append(node)
        reason = f"{describe_node(node)} is an op the pruning analysis does not know"
        for value in [node, *node.all_input_nodes]:
            an.block_value(value, reason)
        return
    handler.relate(an, node)
    if node not in an.axes_of:
        an.fresh_output(node)


#: A symbolic dim (a dynamic batch) stands for a distinct large prime per symbol, so that equal dims are
#: equal, products factor uniquely, and reshapes that merge or split it still unify.
_SYMBOL_PRIMES: Dict[str, int] = {}


def concrete(dim) -> int:
    if isinstance(dim, int):
        return dim
    import sympy

    expr = dim.node.expr
    for symbol in sorted(expr.free_symbols, key=str):
        if str(symbol) not in _SYMBOL_PRIMES:
            _SYMBOL_PRIMES[str(symbol)] = int(sympy.nextprime(1_000_003 + 1000 * len(_SYMBOL_PRIMES)))
    return int(expr.xreplace({s: _SYMBOL_PRIMES[str(s)] for s in expr.free_symbols}))


def concrete_shape(shape) -> List[int]:
    return [concrete(d) for d in shape]


def is_param(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def is_tensor(an: Analysis, value) -> bool:
    return an.info(value) is not None

