"""The pruning analysis's handler table: for each op, how its axes relate and how to fix its arguments.

Keyed by op overload, checked against the ops' schemas at import (a torch upgrade that moves an
argument fails here, not with wrong shapes). Ops tagged ``torch.Tag.pointwise`` are elementwise
with broadcasting and need no entry. An op with no handler is not skipped: the analysis blocks
every axis it touches, and a group that it blocks makes the pass raise, naming the node.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import torch

from fxopt.ir.ops import fxopt_ops
from fxopt.passes.prune import ops_compute as C
from fxopt.passes.prune import ops_features as N
from fxopt.passes.prune import ops_shape as S

aten = torch.ops.aten
QD = torch.ops.quantized_decomposed


@dataclass(frozen=True)
class Handler:
    relate: Callable
    fix: Optional[Callable] = None
    #: Argument position -> the schema names it may have (checked at import).
    args: Dict[int, Tuple[str, ...]] = field(default_factory=dict)


def _h(relate, fix=None, **args) -> Handler:
    return Handler(relate, fix, {int(k[1:]): tuple(v.split("|")) for k, v in args.items()})


def _conv(groups_index: int, transposed_index=None) -> Handler:
    args = {f"a{groups_index}": "groups", "a1": "weight", "a2": "bias"}
    if transposed_index is not None:
        args[f"a{transposed_index}"] = "transposed"
    return _h(C.relate_conv(groups_index, transposed_index), C.fix_conv(groups_index), **args)


SAME_SHAPE_OPS = (
    "_to_copy.default", "alias.default", "clone.default", "detach.default", "contiguous.default",
    "lift_fresh_copy.default", "dropout.default", "native_dropout.default", "zeros_like.default", "ones_like.default",
    "full_like.default", "empty_like.default", "softmax.int", "_softmax.default", "_safe_softmax.default",
    "log_softmax.int", "_log_softmax.default", "cumsum.default", "hardswish.default", "copy.default",
    "type_as.default", "masked_fill.Tensor", "where.ScalarOther", "where.ScalarSelf", "where.Scalar",
    "__and__.Tensor", "__or__.Tensor", "__xor__.Tensor", "fill.Scalar",
)
BROADCAST_OPS = ("masked_fill.Tensor", "where.ScalarOther", "where.ScalarSelf", "__and__.Tensor", "__or__.Tensor",
                 "__xor__.Tensor", "copy.default", "type_as.default")
REDUCTIONS = {  # op -> (dim position, keepdim position)
    "sum.dim_IntList": (1, 2), "mean.dim": (1, 2), "amax.default": (1, 2), "amin.default": (1, 2),
    "var.correction": (1, 3), "std.correction": (1, 3), "var.dim": (1, 3), "std.dim": (1, 3),
    "logsumexp.default": (1, 2), "any.dim": (1, 2), "any.dims": (1, 2), "all.dim": (1, 2), "argmax.default": (1, 2),
    "argmin.default": (1, 2), "max.dim": (1, 2), "min.dim": (1, 2), "sum.default": (9, 9), "mean.default": (9, 9),
    "linalg_vector_norm.default": (2, 3), "prod.dim_int": (1, 2),
}
FACTORIES = ("ones.default", "zeros.default", "full.default", "empty.memory_format", "arange.default", "arange.start",
             "arange.start_step", "scalar_tensor.default", "new_ones.default", "new_zeros.default", "new_full.default",
             "new_empty.default", "rand.default", "randn.default", "tensor.default")
INDEXING = ("index.Tensor", "index_select.default", "gather.default", "scatter.src", "scatter.value",
            "index_put.default", "masked_select.default", "nonzero.default", "take.default", "diff.default",
            "tril.default", "triu.default", "repeat.default", "roll.default", "flip.default")
NOTHING = ("_assert_scalar.default", "sym_size.int", "sym_numel.default", "sym_stride.int", "_assert_async.msg",
           "sym_constrain_range_for_size.default")


def _op(name: str, namespace=aten):
    packet, _, overload = name.partition(".")
    return getattr(getattr(namespace, packet), overload)


@lru_cache(maxsize=1)
def handlers() -> Dict[object, Handler]:
    ops = fxopt_ops()
    table: Dict[object, Handler] = {}
    for name in SAME_SHAPE_OPS:
        table[_op(name)] = _h(C.relate_broadcast if name in BROADCAST_OPS else C.relate_same_shape)
    for name, (dim, keepdim) in REDUCTIONS.items():
        table[_op(name)] = _h(C.relate_reduction(dim, keepdim))
    for name in FACTORIES:
        table[_op(name)] = _h(C.relate_fixed_size("makes a tensor of a fixed size"))
    for name in INDEXING:
        table[_op(name)] = _h(C.relate_fixed_size("indexes or rearranges elements by position"))
    for name in NOTHING:
        table[_op(name)] = _h(C.relate_nothing)
    table[aten._assert_tensor_metadata.default] = _h(C.relate_assert_metadata, a1="size")
    table[operator.getitem] = _h(S.relate_getitem)
    view = _h(S.relate_reshape, S.fix_size_list(1, "size"), a1="size")
    table.update({aten.view.default: view, aten._unsafe_view.default: view,
                  aten.reshape.default: _h(S.relate_reshape, S.fix_size_list(1, "shape"), a1="shape"),
                  aten.flatten.using_ints: _h(S.relate_reshape),
                  aten.expand.default: _h(S.relate_expand, S.fix_size_list(1, "size"), a1="size"),
                  aten.permute.default: _h(S.relate_permute, a1="dims"),
                  aten.transpose.int: _h(S.relate_transpose, a1="dim0", a2="dim1"),
                  aten.t.default: _h(S.relate_t),
                  aten.unsqueeze.default: _h(S.relate_unsqueeze, a1="dim"),
                  aten.squeeze.dim: _h(S.relate_squeeze, a1="dim"), aten.squeeze.dims: _h(S.relate_squeeze, a1="dim"),
                  aten.squeeze.default: _h(S.relate_squeeze),
                  aten.slice.Tensor: _h(S.relate_slice, S.fix_slice, a1="dim", a2="start", a3="end", a4="step"),
                  aten.select.int: _h(S.relate_select, S.fix_select, a1="dim", a2="index"),
                  aten.split.Tensor: _h(S.relate_split, S.fix_split, a1="split_size", a2="dim"),
                  aten.split_with_sizes.default: _h(S.relate_split, S.fix_split, a1="split_sizes", a2="dim"),
                  aten.cat.default: _h(S.relate_cat, a1="dim"),
                  aten.constant_pad_nd.default: _h(S.relate_pad, a1="pad")})
    for spatial, names in {1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d"),
                           2: ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
                               "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d"),
                           3: ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d")}.items():
        for name in names:
            overload = "vec" if name.startswith("upsample") else "default"
            table[_op(f"{name}.{overload}")] = _h(S.relate_spatial(spatial))
    linear = _h(C.relate_linear, a1="weight", a2="bias")
    table.update({aten.linear.default: linear, ops.linear_act.default: linear,
                  aten.addmm.default: _h(C.relate_addmm, a0="self", a1="mat1", a2="mat2"),
                  aten.baddbmm.default: _h(C.relate_addmm, a0="self", a1="batch1", a2="batch2"),
                  aten.mm.default: _h(C.relate_matmul), aten.bmm.default: _h(C.relate_matmul),
                  aten.matmul.default: _h(C.relate_matmul),
                  aten.scaled_dot_product_attention.default: _h(
                      C.relate_sdpa, C.fix_sdpa, a3="attn_mask", a6="scale", a7="enable_gqa"),
                  aten.convolution.default: _conv(8, transposed_index=6),
                  aten.conv1d.default: _conv(6), aten.conv2d.default: _conv(6), aten.conv3d.default: _conv(6),
                  ops.conv_act.default: _conv(6),
                  aten.layer_norm.default: _h(N.relate_layer_norm((2, "weight"), (3, "bias")), N.fix_normalized_shape,
                                              a1="normalized_shape", a2="weight", a3="bias"),
                  aten.native_layer_norm.default: _h(N.relate_layer_norm((2, "weight"), (3, "bias")),
                                                     N.fix_normalized_shape, a1="normalized_shape", a2="weight"),
                  aten.rms_norm.default: _h(N.relate_layer_norm((2, "weight")), N.fix_normalized_shape,
                                            a1="normalized_shape", a2="weight"),
                  aten._native_batch_norm_legit_no_training.default: _h(N.relate_batch_norm, a1="weight",
                                                                        a4="running_var"),
                  aten._native_batch_norm_legit.default: _h(N.relate_batch_norm, a1="weight", a4="running_var"),
                  aten.batch_norm.default: _h(N.relate_batch_norm, a1="weight", a4="running_var"),
                  aten.native_batch_norm.default: _h(N.relate_batch_norm, a1="weight", a4="running_var"),
                  aten.embedding.default: _h(N.relate_embedding, a0="weight", a1="indices"),
                  QD.quantize_per_tensor.default: _h(C.relate_same_shape),
                  QD.dequantize_per_tensor.default: _h(C.relate_same_shape),
                  QD.dequantize_per_channel.default: _h(N.relate_per_channel_dequantize, a1="scales", a3="axis")})
    return table


def handler_for(node) -> Optional[Handler]:
    """The node's handler; elementwise (``pointwise``-tagged) ops share one. None: the op is unknown."""
    handler = handlers().get(node.target)
    if handler is None and torch.Tag.pointwise in getattr(node.target, "tags", ()):
        return _POINTWISE
    return handler


_POINTWISE = Handler(C.relate_broadcast)


def _check_table() -> None:
    for op, handler in handlers().items():
        if not handler.args:
            continue
        names = [a.name for a in op._schema.arguments]
        for index, allowed in handler.args.items():
            if index >= len(names) or names[index] not in allowed:
                raise RuntimeError(f"pruning handler table: {op} has no argument {allowed[0]!r} at position {index} "
                                   f"(schema: {op._schema}); update fxopt/passes/prune/handlers.py")


_check_table()
