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

from fxopt.ir import meta as M
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import AnyValue, Op, OpPattern, PatternBase, Var
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten


def _same_value_kind(x, out) -> bool:
    """x is a tensor node with the same shape, dtype and device as ``out``."""
    if not isinstance(x, fx.Node):
        return False
    a, b = M.node_info(x), M.node_info(out)
    return (isinstance(a, M.TensorInfo) and isinstance(b, M.TensorInfo) and a.dtype == b.dtype
            and a.device == b.device and M.shapes_equal(a.shape, b.shape))


def forward_input_rewrite(rw, x, out):
    """Replace ``out`` by its input ``x`` when they hold the same kind of value."""
    return x if _same_value_kind(x, out) else None


def identity_permute_rewrite(rw, x, dims, out):
    rank = len(M.tensor_info(x).shape)
    return x if [d % rank for d in dims] == list(range(rank)) else None


def same_dim_transpose_rewrite(rw, x, a, b, out):
    rank = len(M.tensor_info(x).shape)
    return x if rank and a % rank == b % rank else None


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
        OpPattern(Op(tuple(copies), Var("x"), name="out"), forward_input_rewrite, name="copy"),
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
    summary = "remove eval dropout, clones, identity views/casts/permutes and full slices"

    def patterns(self) -> List[PatternBase]:
        return noop_patterns()
