"""The Relax converter of ``fxopt.linear_int8`` (:mod:`fxopt.passes.quantize.int8`): two row quantizations,
cuBLASLt's int8 tensor-core GEMM and fxopt's dequantize epilogue, all calls into fxopt's CUDA extension (the
steps :mod:`quantized_gemm` shares with fp8)::

    xq, xs = fxopt.int8.quantize_rows(x16)         per token, on every call; once per input (q, k, v share it)
    wq, ws = fxopt.int8.quantize_rows(weight)      per output channel, lifted: run once at load
    acc = fxopt.cublaslt.matmul_int8(xq, wq)       int32 [..., N], the exact sums
    y16 = fxopt.int8.dequantize[_bias](acc, xs, ws[, astype(bias, float16)])

cuBLASLt's int8 GEMM writes int32 (or int8 with one scale per output row), never a float16 product scaled per
token and per channel, hence the epilogue kernel (``int8_dequantize.cu``). It needs the extension: the build
refuses int8 linears unless ``matmul="cublaslt"`` (:func:`~fxopt.backends.tvm_cuda.lower.check_extension_ops`).
"""
from __future__ import annotations

from fxopt.backends.tvm_cuda.extension_calls import (
    INT8_DEQUANTIZE, INT8_DEQUANTIZE_BIAS, INT8_GEMM, INT8_QUANTIZE_ROWS, packed_call,
)
from fxopt.backends.tvm_cuda.quantized_gemm import Operands, RowCodes, quantized_linear

LINEAR_INT8 = "linear_int8.default"
INT8_ROWS = RowCodes(INT8_QUANTIZE_ROWS, "int8")


def _int8_product(bb, x: Operands):
    """The int32 GEMM, then its sums scaled by both scale vectors (and the bias added) in float16."""
    from tvm import relax

    acc = bb.emit(packed_call(INT8_GEMM, [x.x_codes, x.w_codes], relax.TensorType(x.out_shape, "int32")))
    out_ty = relax.TensorType(x.out_shape, "float16")
    if x.bias16 is None:
        return bb.emit(packed_call(INT8_DEQUANTIZE, [acc, x.x_scales, x.w_scales], out_ty))
    return bb.emit(packed_call(INT8_DEQUANTIZE_BIAS, [acc, x.x_scales, x.w_scales, x.bias16], out_ty))


def linear_int8(node, importer):
    """fxopt.linear_int8(input [..., K], weight [N, K], bias?) -> the extension's calls above."""
    return quantized_linear(node, importer, INT8_ROWS, _int8_product)
