"""Relax rewrites that hand work to fxopt's CUDA extension (:mod:`fxopt.backends.tvm_cuda.extension`).

Each step is a table of ``tvm.relax.dpl`` patterns and builders
(:mod:`~fxopt.backends.tvm_cuda.rewrite_table`), applied by TVM's pattern rewriter:

- :func:`offload_attention`, on the fp32 import *before* ``ToMixedPrecision``:
  ``nn.attention[_bias]`` becomes ``fxopt.attention[_bias]`` on fp16 casts
  (:mod:`~fxopt.backends.tvm_cuda.rewrite_attention`);
- :func:`offload`, on the fp16 module after ``ToMixedPrecision``, before
  ``LegalizeOps``: 16-bit GEMMs and their bias adds become
  ``fxopt.cublaslt.matmul[_bias]`` (:mod:`~fxopt.backends.tvm_cuda.rewrite_gemm`); then
  (:func:`offload_norm_act`) residual add + ``layer_norm``, GELU and fp32 splits of
  16-bit tensors become fxopt's kernels on the 16-bit tensors
  (:mod:`~fxopt.backends.tvm_cuda.rewrite_norm_act`); after each, the casts and
  permutations left around the calls cancel (:mod:`~fxopt.backends.tvm_cuda.layout_glue`); last, a
  LayerNorm whose output an fp8 or int8 linear quantizes writes the codes itself
  (:mod:`~fxopt.backends.tvm_cuda.rewrite_norm_quantize`).

The extension's function names are in :mod:`~fxopt.backends.tvm_cuda.extension_calls`
and are re-exported here.
"""
from __future__ import annotations

from fxopt.backends.tvm_cuda.extension_calls import (  # noqa: F401  (re-exported: the extension's names)
    ADD_LAYER_NORM, ADD_LAYER_NORM_SUM, ATTENTION, ATTENTION_BIAS, CAUSAL_CODES, GELU, GELU_TANH, GEMM, GEMM_BIAS,
    HALF_DTYPES, LAYER_NORM, MAX_NORM_HIDDEN, NORM_ACT_FUNCTIONS, NORM_DTYPES,
)
from fxopt.backends.tvm_cuda.layout_glue import simplify_layout_glue
from fxopt.backends.tvm_cuda.rewrite_table import apply_table, each_function


def offload(mod, norm_act: bool = True):
    """Rewrite every Relax function's 16-bit GEMMs (and their bias adds) into cuBLASLt calls, then tidy the glue.

    ``norm_act``: also residual + LayerNorm, GELU and fp32 splits into fxopt's kernels (:func:`offload_norm_act`),
    LayerNorms quantizing their output for fp8/int8 linears included.
    """
    from fxopt.backends.tvm_cuda.rewrite_norm_quantize import fuse_norm_quantize

    def rewrite(func):
        func = simplify_layout_glue(offload_gemms(func))
        return fuse_norm_quantize(simplify_layout_glue(offload_norm_act(func))) if norm_act else func

    return each_function(mod, rewrite)


def offload_attention(mod):
    """Rewrite every Relax function's float32 ``nn.attention[_bias]`` into fxopt's fp16 kernel, cast around it."""
    from fxopt.backends.tvm_cuda.rewrite_attention import attention_table

    return each_function(mod, lambda func: apply_table(func, attention_table())[0])


def offload_gemms(func):
    """16-bit GEMMs to ``fxopt.cublaslt.matmul``, then the bias adds that follow them into ``matmul_bias``."""
    from fxopt.backends.tvm_cuda.rewrite_gemm import bias_table, gemm_table

    func = apply_table(func, gemm_table())[0]
    return apply_table(func, bias_table())[0]


def offload_norm_act(func):
    """LayerNorm (and the residual add before it), GELU and fp32 splits of 16-bit tensors into fxopt's kernels."""
    from tvm import relax

    from fxopt.backends.tvm_cuda.rewrite_norm_act import norm_act_table

    return relax.analysis.remove_all_unused(apply_table(func, norm_act_table())[0])
