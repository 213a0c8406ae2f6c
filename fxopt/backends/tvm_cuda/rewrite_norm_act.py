"""Relax rewrite table for LayerNorm (with the residual add before it), GELU and split, on 16-bit tensors.

After ToMixedPrecision the residual stream of BERT, GPT-2 and ViT is fp32:
``layer_norm(add(reshape(astype(gemm16, f32)), residual32))`` then ``astype(.., f16)`` for the
next GEMM; TVM runs that as three kernels (add, LayerNorm, cast). Here it becomes one
``fxopt.add_layer_norm(gemm16, residual, gamma, beta, eps)`` writing fp16 (fp32 statistics),
cast back to fp32 for the consumers that were fp32, so the casts around it cancel
(:mod:`~fxopt.backends.tvm_cuda.layout_glue`) and the next residual add reads the fp16 output:
the residual stream is fp16, as in PyTorch's fp16 model. Where the sum is read again (pre-LN
models: GPT-2, ViT), ``fxopt.add_layer_norm_sum`` also writes it (fp16) and the sum's readers
take that: row ``add-layer-norm-sum`` rewrites the add, row ``layer-norm`` then takes the
norm from the same call. A LayerNorm of anything else (the embeddings' sum, broadcast) is
``fxopt.layer_norm``; a LayerNorm whose output the function returns writes fp32.

``gelu(reshape(astype(x16, f32)))`` and ``gelu_tanh(..)`` become ``fxopt.gelu[_tanh](x16)``,
fp32 math, fp16 out. GELU is found by its op only: every GELU the model spells out reached
Relax as ``fxopt.fused_gelu`` (:mod:`fxopt.passes.fusion.fuse_gelu`), whose converter emits them.

``split(reshape(astype(x16, f32)))`` (GPT-2's fused QKV, split in fp32 and each part cast back
to fp16 for attention: six glue kernels a layer) becomes the split of ``x16``.

Shapes must be static, dtypes float16 or float32 and H a multiple of 8 up to 8192; anything
else is left as it is.
"""
from __future__ import annotations

import functools
from typing import List, Optional

from fxopt.backends.tvm_cuda.extension_calls import (
    ADD_LAYER_NORM, ADD_LAYER_NORM_SUM, GELU, GELU_TANH, LAYER_NORM, NORM_DTYPES, packed_call, tensor_type,
)
from fxopt.backends.tvm_cuda.norm_plan import NormPlan, layer_norm_plan, restore
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, op_name, static_shape
from fxopt.backends.tvm_cuda.rewrite_table import RelaxRewrite

#: Relax ops whose GELU fxopt's kernel computes
GELU_OPS = {"relax.nn.gelu": GELU, "relax.nn.gelu_tanh": GELU_TANH}


def read_in_16_bits():
    """``(pattern, half)``: a tensor as ``x16``, ``astype(x16)`` or up to two reshapes of those, or any tensor.

    ``half`` captures ``x16`` where there is one. Reshapes do not move data, and fp16 -> fp32 is exact,
    so a kernel may read ``x16`` in place of the tensor, reshaped.
    """
    from tvm.relax.dpl import is_op, wildcard

    half = wildcard().has_dtype("float16")
    direct = half | is_op("relax.astype")(half)
    once = is_op("relax.reshape")(direct, wildcard())
    twice = is_op("relax.reshape")(once, wildcard())
    return direct | once | twice | wildcard(), half


def norm_act_table() -> List[RelaxRewrite]:
    from tvm.relax.dpl import is_call_dps_packed, is_op, is_tuple_get_item, wildcard

    (a, half_a), (b, half_b) = read_in_16_bits(), read_in_16_bits()
    summed = is_op("relax.add")(a, b)
    sum_item = is_tuple_get_item(is_call_dps_packed(ADD_LAYER_NORM_SUM), 1)
    x, half = read_in_16_bits()
    gamma, beta = wildcard(), wildcard()
    norm = is_op("relax.nn.layer_norm")(is_op("relax.astype")(sum_item) | sum_item | summed | x, gamma, beta)
    rows = [
        RelaxRewrite("add-layer-norm-sum", summed, offload_residual_sum, {"half_a": half_a, "half_b": half_b}),
        RelaxRewrite("layer-norm", norm, offload_layer_norm, {"sum_item": sum_item, "summed": summed,
                                                              "half_a": half_a, "half_b": half_b, "half": half}),
    ]
    for op, function in GELU_OPS.items():
        x, half = read_in_16_bits()
        rows.append(RelaxRewrite(function.removeprefix("fxopt.").replace("_", "-"), is_op(op)(x),
                                 functools.partial(offload_gelu, function=function), {"half": half}))
    x, half = read_in_16_bits()
    rows.append(RelaxRewrite("split", is_op("relax.split")(x), split_in_16_bits, {"half": half}))
    return rows


def _operand(arg, half) -> Optional[object]:
    """What a kernel reads for ``arg``: its 16-bit source, else ``arg`` if the kernel takes its dtype."""
    if half is not None:
        return half
    return arg if dtype_of(arg) in NORM_DTYPES else None


def _add_operands(add, half_a, half_b, shape) -> Optional[list]:
    """The two operands of ``add`` as the kernel reads them, or None (a broadcast, or a dtype it does not take)."""
    if any(static_shape(arg) != shape for arg in add.args):
        return None
    operands = [_operand(arg, half) for arg, half in zip(add.args, (half_a, half_b))]
    return None if None in operands else operands


# ------------------------------------------------------------- LayerNorm
def offload_layer_norm(expr, facts, sum_item=None, summed=None, half_a=None, half_b=None, half=None):
    """``layer_norm(x)`` -> ``fxopt.layer_norm``, ``fxopt.add_layer_norm``, or the norm of an ``add_layer_norm_sum``."""
    from tvm import relax

    plan = layer_norm_plan(expr, facts)
    if plan is None:
        return None
    if sum_item is not None:  # row add-layer-norm-sum made the call that also normalizes this sum
        both = facts.values[sum_item].tuple_value
        return restore(relax.TupleGetItem(both, 0), plan.shape, plan.out_dtype, plan.shape, plan.dtype)
    operands = _add_operands(facts.values[summed], half_a, half_b, plan.shape) if summed is not None else None
    if operands is None:
        source = _operand(expr.args[0], half)
        return None if source is None else _norm_call(LAYER_NORM, [source], plan)
    if facts.uses(expr.args[0]) > 1:
        return None  # a sum read again: row add-layer-norm-sum takes it where it can
    return _norm_call(ADD_LAYER_NORM, operands, plan)


def _norm_call(function: str, inputs: list, plan: NormPlan):
    call = packed_call(function, [*inputs, plan.gamma, plan.beta, plan.eps], tensor_type(plan.shape, plan.out_dtype))
    return restore(call, plan.shape, plan.out_dtype, plan.shape, plan.dtype)


def offload_residual_sum(expr, facts, half_a=None, half_b=None):
    """A residual ``add`` read by a LayerNorm and again later -> item 1 of ``fxopt.add_layer_norm_sum``."""
    from tvm import relax

    var = facts.var_of(expr)
    if not isinstance(var, relax.DataflowVar) or facts.uses(var) <= 1:
        return None
    norm = next((r for r in facts.readers.get(var, []) if op_name(r) == "relax.nn.layer_norm" and
                 r.args[0].same_as(var)), None)
    plan = layer_norm_plan(norm, facts) if norm is not None else None
    operands = _add_operands(expr, half_a, half_b, plan.shape) if plan is not None else None
    # the kernel call takes the add's place: gamma and beta must exist there, or be computable there
    weights = [_available_at(t, var, facts) for t in (plan.gamma, plan.beta)] if operands is not None else [None]
    if None in weights:
        return None
    both = packed_call(ADD_LAYER_NORM_SUM, [*operands, *weights, plan.eps],
                       [tensor_type(plan.shape, plan.out_dtype), tensor_type(plan.shape, "float16")])
    total = relax.TupleGetItem(both, 1)
    return total if dtype_of(expr) == "float16" else relax.op.astype(total, dtype_of(expr))


def _available_at(expr, var, facts):
    """``expr`` where ``var`` is bound: itself if it exists there, its value if that reads only what does; or None.

    ToMixedPrecision casts a LayerNorm's gamma and beta just before the LayerNorm, after the residual add.
    """
    from tvm import relax

    if facts.bound_before(expr, var):
        return expr
    value = facts.values.get(expr)
    if value is None or not all(facts.bound_before(v, var) for v in relax.analysis.free_vars(value)):
        return None
    return value


# ------------------------------------------------------------------ GELU
def offload_gelu(expr, facts, half=None, function: str = GELU):
    """``gelu(x)`` of a tensor with a 16-bit source -> ``fxopt.gelu[_tanh](x16)``, reshaped and cast back."""
    from tvm import relax

    shape, dtype = static_shape(expr), dtype_of(expr)
    if not isinstance(facts.var_of(expr), relax.DataflowVar) or shape is None or dtype not in NORM_DTYPES:
        return None
    source_shape = static_shape(half) if half is not None else None
    if source_shape is None:
        return None
    call = packed_call(function, [half], tensor_type(source_shape, "float16"))
    return restore(call, source_shape, "float16", shape, dtype)


# ----------------------------------------------------------------- split
def split_in_16_bits(expr, facts, half=None):
    """``split(x32)`` of a 16-bit source, whose parts are only taken apart -> the parts of ``split(x16)``, widened.

    Each part is cast back to fp32 where it is taken, so the casts to fp16 that follow cancel
    (:mod:`~fxopt.backends.tvm_cuda.layout_glue`); TVM then copies fp16 rather than casting fp32 twice.
    """
    from tvm import relax

    var, x = facts.var_of(expr), expr.args[0]
    shape = static_shape(x)
    if not isinstance(var, relax.DataflowVar) or any(kind != "TupleGetItem" for kind in facts.reader_kinds(var)):
        return None
    if dtype_of(x) != "float32" or shape is None or half is None:
        return None
    source = half if static_shape(half) == shape else relax.op.reshape(half, shape)
    sections = expr.attrs.indices_or_sections
    if isinstance(sections, int) or not hasattr(sections, "__len__"):
        sections, parts = int(sections), int(sections)
    else:
        sections = [int(i) for i in sections]
        parts = len(sections) + 1
    halves = relax.op.split(source, sections, int(expr.attrs.axis))
    return relax.Tuple([relax.op.astype(relax.TupleGetItem(halves, i), "float32") for i in range(parts)])
