"""Relax rewrite table for attention: fp32 ``nn.attention[_bias]`` to fxopt's fp16 kernel, cast around it.

It runs on the fp32 import, *before* ``ToMixedPrecision``: ``nn.attention[_bias]``
(what ``aten.scaled_dot_product_attention`` imports to, BSNH layout) becomes
``fxopt.attention[_bias]`` on fp16 casts of q, k and v. It cannot wait: TVM
0.27's ToMixedPrecision rebuilds ``nn.attention`` without its bias and scale
(a wrong answer for every masked or rescaled SDPA).
"""
from __future__ import annotations

import math
from typing import List, Optional

from fxopt.backends.tvm_cuda.extension_calls import (
    ATTENTION, ATTENTION_BIAS, CAUSAL_CODES, packed_call, tensor_type,
)
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, static_shape, tvm_float
from fxopt.backends.tvm_cuda.rewrite_table import RelaxRewrite

#: the kernel's head sizes: multiples of 16, at most this
MAX_HEAD = 256


def attention_table() -> List[RelaxRewrite]:
    from tvm.relax.dpl import is_op, wildcard

    q, k, v, bias = wildcard(), wildcard(), wildcard(), wildcard()
    return [
        RelaxRewrite("attention", is_op("relax.nn.attention")(q, k, v), offload_attention,
                     {"q": q, "k": k, "v": v}),
        RelaxRewrite("attention-bias", is_op("relax.nn.attention_bias")(q, k, v, bias), offload_attention,
                     {"q": q, "k": k, "v": v, "bias": bias}),
    ]


def attention_arguments(call) -> Optional[tuple]:
    """(scale, causal code) of a float32 ``nn.attention[_bias]`` call the kernel can take in fp16, or None."""
    q, k, v = call.args[:3]
    shapes = [static_shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or {dtype_of(t) for t in (q, k, v)} != {"float32"}:
        return None
    head, head_v = shapes[0][3], shapes[2][3]
    if head % 16 or head_v % 16 or head > MAX_HEAD or head_v > MAX_HEAD or call.attrs.window_size is not None:
        return None
    if call.attrs.causal_mask not in CAUSAL_CODES:
        return None
    scale = call.attrs.scale
    return (float(scale.value) if scale is not None else 1.0 / math.sqrt(head)), CAUSAL_CODES[call.attrs.causal_mask]


def offload_attention(expr, facts, q, k, v, bias=None):
    """``nn.attention[_bias](q, k, v[, bias])`` -> ``astype(fxopt.attention[_bias](q16, k16, v16[, bias]), f32)``."""
    from tvm import relax

    found = attention_arguments(expr)
    if found is None:
        return None
    scale, causal = found
    halves = [relax.op.astype(t, "float16") for t in (q, k, v)]
    extra = [relax.prim_value(tvm_float(scale)), relax.prim_value(causal)]
    name = ATTENTION if bias is None else ATTENTION_BIAS
    call = packed_call(name, [*halves, *([] if bias is None else [bias]), *extra],
                       tensor_type(static_shape(expr), "float16"))
    return relax.op.astype(call, "float32")
