"""The packed functions fxopt's CUDA extension registers, as the Relax rewrites call them.

Each is called with ``R.call_dps_packed(name, [inputs..., scalars...], out_ty)``:
the outputs come last, allocated by TVM (destination-passing style). The
kernels and their checks are in :mod:`fxopt.backends.tvm_cuda.extension`
(``cublaslt_gemm.cc``, ``attention.cu``, ``norm_act.cu``, ``quantize_rows.cu``, ``int8_dequantize.cu``,
``int4_gemm.cu``, ``cusparselt_gemm.cc``)::

    fxopt.cublaslt.matmul(a, b, out)                      a [.., K] @ b [K, N] or batched [B, M, K] @ [B, K, N]
    fxopt.cublaslt.matmul_bias(a, b, bias[N], out)        + bias in the fp32 epilogue
    fxopt.attention[_bias](q, k, v, [bias,] scale, causal, out)       BSNH, fp16
    fxopt.[add_]layer_norm(x, [residual,] gamma, beta, eps, out)      fp32 statistics
    fxopt.add_layer_norm_sum(x, residual, gamma, beta, eps, out, sum)
    fxopt.gelu(x, out), fxopt.gelu_tanh(x, out)                       fp32 math, fp16 in and out
    fxopt.fp8.quantize_rows(x, codes, scales)             e4m3 codes and a float32 scale per row of x
    fxopt.cublaslt.matmul_fp8[_bias](xq, wq, xs, ws, [bias,] out)    xq [.., K] @ wq[N, K]^T, scaled, fp8
    fxopt.int8.quantize_rows(x, codes, scales)            int8 codes and a float32 scale per row of x
    fxopt.cublaslt.matmul_int8(xq, wq, out)               xq [.., K] @ wq[N, K]^T, int8 -> int32 out
    fxopt.int8.dequantize[_bias](acc, xs, ws, [bias,] out)   acc * xs[m] * ws[n] (+ bias[n]) -> fp16
    fxopt.int4.linear[_zp](x, packed, scales, [zeros,] out)  x [1..64 rows, K] @ int4 weight^T (MMA layout), fp16
    fxopt.cusparselt.matmul[_bias](x, wc, [bias,] out)     x [.., K] @ W^T, W [N, K] 2:4 sparse, compressed (uint8) by
                                                          fxopt.cusparselt.compress; cuSPARSELt, opened at run time
"""
from __future__ import annotations

GEMM = "fxopt.cublaslt.matmul"
GEMM_BIAS = "fxopt.cublaslt.matmul_bias"
FP8_GEMM = "fxopt.cublaslt.matmul_fp8"
FP8_GEMM_BIAS = "fxopt.cublaslt.matmul_fp8_bias"
FP8_QUANTIZE_ROWS = "fxopt.fp8.quantize_rows"
INT8_QUANTIZE_ROWS = "fxopt.int8.quantize_rows"
INT8_GEMM = "fxopt.cublaslt.matmul_int8"
INT8_DEQUANTIZE = "fxopt.int8.dequantize"
INT8_DEQUANTIZE_BIAS = "fxopt.int8.dequantize_bias"
INT4_LINEAR = "fxopt.int4.linear"
INT4_LINEAR_ZP = "fxopt.int4.linear_zp"
SPARSE24_GEMM = "fxopt.cusparselt.matmul"
SPARSE24_GEMM_BIAS = "fxopt.cusparselt.matmul_bias"
ATTENTION = "fxopt.attention"
ATTENTION_BIAS = "fxopt.attention_bias"
LAYER_NORM = "fxopt.layer_norm"
ADD_LAYER_NORM = "fxopt.add_layer_norm"
ADD_LAYER_NORM_SUM = "fxopt.add_layer_norm_sum"
GELU = "fxopt.gelu"
GELU_TANH = "fxopt.gelu_tanh"
NORM_ACT_FUNCTIONS = (LAYER_NORM, ADD_LAYER_NORM, ADD_LAYER_NORM_SUM, GELU, GELU_TANH)

#: the 16-bit float dtypes cuBLASLt's GEMMs take
HALF_DTYPES = ("float16", "bfloat16")
#: tensors the LayerNorm kernel reads and writes (gamma and beta too)
NORM_DTYPES = ("float16", "float32")
#: the LayerNorm kernel holds a row in registers: H a multiple of 8 (16-byte loads), at most this
MAX_NORM_HIDDEN = 8192
#: ``nn.attention``'s causal_mask attribute -> the attention kernel's ``causal`` argument
CAUSAL_CODES = {None: 0, "TopLeft": 1, "BottomRight": 2}


def packed_call(name: str, args: list, out_ty):
    """``R.call_dps_packed(name, args)`` writing ``out_ty`` (a TensorType, or a list of them)."""
    from tvm import relax

    return relax.op.call_dps_packed(name, args, out_ty=out_ty)


def tensor_type(shape, dtype: str):
    from tvm import relax

    return relax.TensorType(shape, dtype)
