"""Physically shrink a graph: slice every weight axis of the pruned groups, fix size arguments, re-derive metadata.

Given the kept units of each pruned group (an atom of the analysis -> sorted unit indices):

1. every weight axis whose term mentions a pruned atom keeps the positions ``terms.kept_mask`` allows
   (``graph.replace_param`` with the smaller tensor);
2. every op with a handler ``fix`` rewrites its size arguments (view shapes, expand sizes, split sizes,
   slice bounds, conv groups, LayerNorm's normalized shape) from the new sizes :class:`Sizes` predicts;
3. every TensorInfo is re-derived (as ``graph.refresh_meta()`` does), and each value's new shape is
   checked against the prediction, so an analysis mistake is an error naming the node, never a
   silently wrong graph. A ``view`` whose input's strides no longer allow it (SDPA picks another
   kernel, with another output layout, once query and value head dims differ) becomes a ``reshape``.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.fx as fx

from fxopt.errors import PassError, describe_node
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.prune import terms as T
from fxopt.passes.prune.analysis import Analysis, concrete_shape
from fxopt.passes.prune.handlers import handler_for


class Sizes:
    """Old and new sizes of terms and values once the atoms in ``kept`` keep only those units."""

    def __init__(self, an: Analysis, kept: Dict[T.Atom, torch.Tensor]):
        self.an, self.kept = an, kept

    def old_size(self, term: T.Term) -> int:
        return T.size(term)

    def size(self, term: T.Term) -> int:
        return T.kept_size(term, self.kept)

    def old_shape(self, value):
        info = M.node_info(value) if isinstance(value, fx.Node) else None
        if isinstance(info, tuple):
            return [concrete_shape(i.shape) if i is not None else None for i in info]
        return concrete_shape(info.shape)

    def shape(self, value):
        axes = self.an.axes_of.get(value)
        if isinstance(axes, tuple):
            return [[self.size(t) for t in item] if item is not None else None for item in axes]
        return [self.size(t) for t in axes]

    def extra(self, node: fx.Node) -> dict:
        return self.an.extra.get(node, {})


def shrink(graph: Graph, an: Analysis, kept: Dict[T.Atom, torch.Tensor], where: str) -> int:
    """Prune ``graph`` in place (it must be the graph ``an`` analysed); returns the weights removed."""
    sizes = Sizes(an, kept)
    removed = _slice_params(graph, an, kept)
    predicted = {n: sizes.shape(n) for n in graph.nodes if an.axes_of.get(n) is not None}
    for node in list(graph.call_nodes()):
        handler = handler_for(node)
        if handler is not None and handler.fix is not None:
            handler.fix(node, sizes)
    _refresh_meta(graph)
    _check_shapes(graph, predicted, where)
    graph.recompile()
    return removed


def _slice_params(graph: Graph, an: Analysis, kept) -> int:
    removed = 0
    done = set()
    for node in graph.nodes:
        if node.op != "get_attr" or node.target in done or an.param_axes.get(node.target) is None:
            continue
        done.add(node.target)
        tensor = graph.param(node)
        smaller = tensor.detach()
        for axis, term in enumerate(an.param_axes[node.target]):
            mask = T.kept_mask(term, kept)
            if mask is not None:
                smaller = smaller.index_select(axis, mask.nonzero().flatten())
        if smaller.shape != tensor.shape:
            removed += tensor.numel() - smaller.numel()
            smaller = smaller.contiguous().requires_grad_(tensor.requires_grad)
            graph.replace_param(node, smaller)
    return removed


VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _refresh_meta(graph: Graph) -> None:
    mode = M.fake_mode_of(graph.fx_graph)
    for node in graph.nodes:
        if node.op == "placeholder":
            M.set_val(node, node.meta["val"])
        elif node.op in ("get_attr", "call_function"):
            try:
                M.infer_val(node, mode, graph.module)
            except (RuntimeError, ValueError):  # torch raises either for a view its strides refuse
                if node.target not in VIEWS:
                    raise
                node.target = torch.ops.aten.reshape.default
                M.infer_val(node, mode, graph.module)


def _check_shapes(graph: Graph, predicted: Dict[fx.Node, List], where: str) -> None:
    for node, shape in predicted.items():
        actual = Sizes(None, {}).old_shape(node)
        if actual != shape:
            raise PassError(f"{where}: node {describe_node(node)}: pruned shape {actual} differs from the analysis's "
                            f"{shape}; this is a bug in fxopt/passes/prune (please report it with the graph)")
