"""The Relax converter of ``fxopt.linear_fp8`` (:mod:`fxopt.passes.quantize.fp8`): two row quantizations and
cuBLASLt's fp8 GEMM, all calls into fxopt's CUDA extension::

    x16 = astype(x, float16)                                         (a no-op cast where x is float16)
    xq, xs = fxopt.fp8.quantize_rows(x16)          per token, on every call; once per input (q, k, v share it)
    wq, ws = fxopt.fp8.quantize_rows(weight)       per output channel, from the float32 parameter: it reads
                                                   parameters only, so LiftTransformParams moves it (and the
                                                   bias cast) into main_transform_params, run once at load
    y16 = fxopt.cublaslt.matmul_fp8[_bias](xq, wq, xs, ws[, astype(bias, float16)])
    y = astype(y16, x's dtype)

It is emitted on the fp32 import, before ``ToMixedPrecision``, which leaves packed calls and their casts
alone (as for attention, :mod:`~fxopt.backends.tvm_cuda.rewrite_attention`); the casts around the calls cancel
against ToMixedPrecision's own afterwards (:mod:`~fxopt.backends.tvm_cuda.layout_glue`). It needs the extension:
the build refuses fp8 linears unless ``matmul="cublaslt"``
(:func:`~fxopt.backends.tvm_cuda.lower.check_extension_ops`).
"""
from __future__ import annotations

import math

from fxopt.backends.tvm_cuda.extension_calls import FP8_GEMM, FP8_GEMM_BIAS, FP8_QUANTIZE_ROWS, packed_call
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, static_shape
from fxopt.errors import LoweringError

E4M3 = "float8_e4m3fn"
LINEAR_FP8 = "linear_fp8.default"


def _quantized_rows(bb, t, shape):
    """(codes, scales) Relax vars of ``fxopt.fp8.quantize_rows`` on ``t`` seen as rows of its last dimension."""
    from tvm import relax

    both = bb.emit(packed_call(FP8_QUANTIZE_ROWS, [t], [relax.TensorType(shape, E4M3),
                                                        relax.TensorType((math.prod(shape[:-1]),), "float32")]))
    return bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))


def linear_fp8(node, importer):
    """fxopt.linear_fp8(input [..., K], weight [N, K], bias?) -> the extension's calls above."""
    from tvm import relax

    bb = importer.block_builder
    x, weight, bias = (importer.env[a] if a is not None else None for a in node.args[:3])
    x_shape, w_shape = static_shape(x), static_shape(weight)
    if x_shape is None or w_shape is None:
        raise LoweringError(f"tvm-cuda: {node.name} (fxopt.linear_fp8) needs static shapes, got input "
                            f"{x_shape} and weight {w_shape}")
    # linears reading one input (q, k and v) share its quantization: one kernel, not one per linear
    done = importer.__dict__.setdefault("_fxopt_fp8_rows", {})
    if x not in done:
        x16 = x if dtype_of(x) == "float16" else bb.emit(relax.op.astype(x, "float16"))
        done[x] = _quantized_rows(bb, x16, x_shape)
    x_codes, x_scales = done[x]
    w_codes, w_scales = _quantized_rows(bb, weight, w_shape)
    out_ty = relax.TensorType([*x_shape[:-1], w_shape[0]], "float16")
    if bias is None:
        y16 = bb.emit(packed_call(FP8_GEMM, [x_codes, w_codes, x_scales, w_scales], out_ty))
    else:
        bias16 = bias if dtype_of(bias) == "float16" else bb.emit(relax.op.astype(bias, "float16"))
        y16 = bb.emit(packed_call(FP8_GEMM_BIAS, [x_codes, w_codes, x_scales, w_scales, bias16], out_ty))
    return y16 if dtype_of(x) == "float16" else bb.emit(relax.op.astype(y16, dtype_of(x)))
