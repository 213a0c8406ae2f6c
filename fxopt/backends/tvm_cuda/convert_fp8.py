"""The Relax converter of ``fxopt.linear_fp8`` (:mod:`fxopt.passes.quantize.fp8`): two row quantizations and
cuBLASLt's fp8 GEMM, all calls into fxopt's CUDA extension (the steps :mod:`quantized_gemm` shares with int8)::

    xq, xs = fxopt.fp8.quantize_rows(x16)          per token, on every call; once per input (q, k, v share it)
    wq, ws = fxopt.fp8.quantize_rows(weight)       per output channel, lifted: run once at load
    y16 = fxopt.cublaslt.matmul_fp8[_bias](xq, wq, xs, ws[, astype(bias, float16)])

It needs the extension: the build refuses fp8 linears unless ``matmul="cublaslt"``
(:func:`~fxopt.backends.tvm_cuda.lower.check_extension_ops`).
"""
from __future__ import annotations

from fxopt.backends.tvm_cuda.extension_calls import FP8_GEMM, FP8_GEMM_BIAS, FP8_QUANTIZE_ROWS, packed_call
from fxopt.backends.tvm_cuda.quantized_gemm import Operands, RowCodes, quantized_linear

LINEAR_FP8 = "linear_fp8.default"
E4M3_ROWS = RowCodes(FP8_QUANTIZE_ROWS, "float8_e4m3fn")


def _fp8_product(bb, x: Operands):
    """cuBLASLt's fp8 GEMM, both scale vectors (and the bias) in its epilogue."""
    from tvm import relax

    out_ty = relax.TensorType(x.out_shape, "float16")
    if x.bias16 is None:
        return bb.emit(packed_call(FP8_GEMM, [x.x_codes, x.w_codes, x.x_scales, x.w_scales], out_ty))
    return bb.emit(packed_call(FP8_GEMM_BIAS, [x.x_codes, x.w_codes, x.x_scales, x.w_scales, x.bias16], out_ty))


def linear_fp8(node, importer):
    """fxopt.linear_fp8(input [..., K], weight [N, K], bias?) -> the extension's calls above."""
    return quantized_linear(node, importer, E4M3_ROWS, _fp8_product)
