"""remove-noop: drop ops that return their input unchanged.

Eval-mode dropout, ``clone``/``alias``/``detach``, views and expands to the same
shape, identity permutes and transposes, casts to the same dtype and device,
and full-range slices.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import List

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import PassResult
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import AnyValue, Op, OpPattern, PatternBase, Var, node_argument
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten


def _same_value_kind(x, out) -> bool:
    """x is a tensor node with the same shape, dtype, device and strides as ``out``.

    Strides matter: ``clone`` of a transposed tensor makes it contiguous, and
    the ``view`` after it depends on that.
    """
    if not isinstance(x, fx.Node):
        return False
    a, b = M.node_info(x), M.node_info(out)
    same = (isinstance(a, M.TensorInfo) and isinstance(b, M.TensorInfo) and a.dtype == b.dtype
            and a.device == b.device and M.shapes_equal(a.shape, b.shape))
    return same and _same_strides(x.meta.get("val"), out.meta.get("val"))


def _same_strides(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    if a.numel() == 0 or a.dim() == 0:
        return True
    significant = [i for i, size in enumerate(a.shape) if not statically_known_true(size == 1)]
    return all(statically_known_true(a.stride(i) == b.stride(i)) for i in significant)


def forward_input_rewrite(rw, x, out):
    """Replace ``out`` by its input ``x`` when they hold the same kind of value."""
    return x if _same_value_kind(x, out) else None


_VIEWS = (aten.view.default, aten._unsafe_view.default)


def copy_rewrite(rw, x, out):
    """Drop a copy, unless a ``view`` reads it.

    A ``view`` needs a compatible memory layout. The layout recorded for ``x``
    comes from one device's kernels (SDPA's output strides differ between CPU and
    CUDA), so a copy that a view depends on is kept: the graph stays valid on
    every device.
    """
    if any(user.target in _VIEWS for user in out.users):
        return None
    return forward_input_rewrite(rw, x, out)


def identity_permute_rewrite(rw, x, dims, out):
    rank = len(M.tensor_info(x).shape)
    return x if [d % rank for d in dims] == list(range(rank)) and _same_value_kind(x, out) else None


def same_dim_transpose_rewrite(rw, x, a, b, out):
    rank = len(M.tensor_info(x).shape)
    return x if rank and a % rank == b % rank and _same_value_kind(x, out) else None


def full_slice_rewrite(rw, x, dim, start, end, step, out):
    size = M.tensor_info(x).shape[dim]
    starts_at_zero = start in (None, 0)
    reaches_end = end is None or (isinstance(end, int) and isinstance(size, int) and end >= size) or end == sys.maxsize
    return x if starts_at_zero and reaches_end and step == 1 and _same_value_kind(x, out) else None


def _copy_like(target) -> Op:
    return Op(target, Var("x"), name="out")


def noop_patterns() -> List[PatternBase]:
    same_shape = [aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default]
    casts = [aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default]
    copies = [aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
              aten.contiguous.default]
    return [
        OpPattern(Op(aten.dropout.default, Var("x"), AnyValue(), False, name="out"), forward_input_rewrite,
                  name="eval-dropout"),
        OpPattern(Op(aten.dropout.default, Var("x"), 0.0, AnyValue(), name="out"), forward_input_rewrite,
                  name="zero-dropout"),
        OpPattern(Op(tuple(copies), Var("x"), name="out"), copy_rewrite, name="copy"),
        OpPattern(Op(tuple(same_shape), Var("x"), AnyValue(), name="out"), forward_input_rewrite,
                  name="identity-view"),
        OpPattern(Op(tuple(casts), Var("x"), name="out"), forward_input_rewrite, name="identity-cast"),
        OpPattern(Op(aten.permute.default, Var("x"), Var("dims"), name="out"), identity_permute_rewrite,
                  name="identity-permute"),
        OpPattern(Op(aten.transpose.int, Var("x"), Var("a"), Var("b"), name="out"), same_dim_transpose_rewrite,
                  name="identity-transpose"),
        OpPattern(Op(aten.slice.Tensor, Var("x"), Var("dim"), Var("start"), Var("end"), Var("step"), name="out"),
                  full_slice_rewrite, name="full-slice"),
    ]


@register_pass
@dataclass(frozen=True)
class RemoveNoop(RewritePass):
    name = "remove-noop"
    summary = "remove eval dropout, clones, identity views/casts/permutes, full slices, satisfied metadata asserts"

    def patterns(self) -> List[PatternBase]:
        return noop_patterns()

    def run(self, graph: Graph) -> PassResult:
        result = super().run(graph)
        asserts = _drop_satisfied_metadata_asserts(graph)
        if asserts:
            result.stats["matches"]["metadata-assert"] = asserts
        return PassResult(graph, result.modified or asserts > 0, result.stats)


def _drop_satisfied_metadata_asserts(graph: Graph) -> int:
    """``x.to(x.dtype)`` exports as an assertion on x's dtype; drop it where TensorInfo already proves it."""
    dropped = 0
    for node in list(graph.call_nodes(aten._assert_tensor_metadata.default)):
        x = node.args[0]
        info = M.node_info(x) if isinstance(x, fx.Node) else None
        _, dtype = node_argument(node, "dtype")
        if isinstance(info, M.TensorInfo) and (dtype is None or dtype == info.dtype) and not node.users:
            graph.fx_graph.erase_node(node)
            dropped += 1
    return dropped
