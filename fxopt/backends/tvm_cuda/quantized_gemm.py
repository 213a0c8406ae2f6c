"""What the fp8 and int8 linear converters share (:mod:`convert_fp8`, :mod:`convert_int8`)::

    x16 = astype(x, float16)                          (a no-op cast where x is float16)
    xq, xs = <quantize_rows>(x16)                     per token, on every call; once per input and code type
                                                      (q, k and v share it)
    wq, ws = <quantize_rows>(weight)                  per output channel, from the float32 parameter: it reads
                                                      parameters only, so LiftTransformParams moves it (and the
                                                      bias cast) into main_transform_params, run once at load
    y16 = product(xq, wq, xs, ws, astype(bias, float16) or None)     the converter's GEMM calls
    y = astype(y16, x's dtype)

It is emitted on the fp32 import, before ``ToMixedPrecision``, which leaves packed calls and their casts
alone (as for attention, :mod:`~fxopt.backends.tvm_cuda.rewrite_attention`); the casts around the calls cancel
against ToMixedPrecision's own afterwards (:mod:`~fxopt.backends.tvm_cuda.layout_glue`). These linears need the
extension: the build refuses them unless ``matmul="cublaslt"``
(:func:`~fxopt.backends.tvm_cuda.lower.check_extension_ops`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from fxopt.backends.tvm_cuda.extension_calls import packed_call
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, static_shape
from fxopt.errors import LoweringError


@dataclass(frozen=True)
class RowCodes:
    """A row quantizer of the extension: its packed function and the dtype of its codes."""

    function: str
    dtype: str


@dataclass(frozen=True)
class Operands:
    """The Relax vars a converter's GEMM reads, and the shape of its float16 result."""

    x_codes: object
    w_codes: object
    x_scales: object
    w_scales: object
    bias16: object  # None without a bias
    out_shape: list


def quantized_rows(bb, t, shape, codes: RowCodes):
    """(codes, scales) Relax vars of ``codes.function`` on ``t`` seen as rows of its last dimension."""
    from tvm import relax

    both = bb.emit(packed_call(codes.function, [t], [relax.TensorType(shape, codes.dtype),
                                                     relax.TensorType((math.prod(shape[:-1]),), "float32")]))
    return bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))


def as_float16(bb, t):
    from tvm import relax

    return t if dtype_of(t) == "float16" else bb.emit(relax.op.astype(t, "float16"))


def shared_rows(importer, x, shape, codes: RowCodes):
    """The input's quantization, made once per input and code type: linears reading one input (q, k and v) share
    it, one kernel rather than one per linear."""
    done = importer.__dict__.setdefault("_fxopt_quantized_rows", {})
    if (x, codes) not in done:
        done[(x, codes)] = quantized_rows(importer.block_builder, as_float16(importer.block_builder, x), shape, codes)
    return done[(x, codes)]


def quantized_linear(node, importer, codes: RowCodes, product: Callable):
    """``node`` (op(input [..., K], weight [N, K], bias?)) as the calls above; ``product(bb, Operands)`` emits the
    GEMM and returns its float16 result."""
    from tvm import relax

    bb = importer.block_builder
    x, weight, bias = (importer.env[a] if a is not None else None for a in node.args[:3])
    x_shape, w_shape = static_shape(x), static_shape(weight)
    if x_shape is None or w_shape is None:
        raise LoweringError(f"tvm-cuda: {node.name} ({node.target}) needs static shapes, got input "
                            f"{x_shape} and weight {w_shape}")
    x_codes, x_scales = shared_rows(importer, x, x_shape, codes)
    w_codes, w_scales = quantized_rows(bb, weight, w_shape, codes)
    bias16 = None if bias is None else as_float16(bb, bias)
    y16 = product(bb, Operands(x_codes, w_codes, x_scales, w_scales, bias16, [*x_shape[:-1], w_shape[0]]))
    return y16 if dtype_of(x) == "float16" else bb.emit(relax.op.astype(y16, dtype_of(x)))
