"""Relax rewrite tables for GEMMs: 16-bit matmuls to cuBLASLt, then their bias adds into its epilogue.

After ``ToMixedPrecision`` a 16-bit GEMM is ``astype(matmul(a16, b16) : f32, f16)``
(fp32 accumulation, one rounding): :func:`gemm_table` makes it
``fxopt.cublaslt.matmul(a16, b16)``. :func:`bias_table` then fuses the bias
add that follows, in the two forms ToMixedPrecision leaves:

- ``add(gemm, bias16)`` -> ``gemm_bias(a, b, bias16)``;
- ``add(astype(gemm, f32), bias32)`` -> ``astype(gemm_bias(a, b, astype(bias32, f16)), f32)``,
  where the sum feeds fp32 work (a residual add, GELU); cuBLASLt adds the bias
  in its fp32 epilogue before the one rounding to 16 bits.

Operands are found by their role in the pattern: the GEMM's ``lhs`` and ``rhs``
are the packed call's inputs, the product is the add's operand that is the GEMM
(or its widening cast), on either side, and the bias is the other one, taken
only where it is 1-D with one value per output column.
"""
from __future__ import annotations

from typing import List, Optional

from fxopt.backends.tvm_cuda.extension_calls import GEMM, GEMM_BIAS, HALF_DTYPES, packed_call
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, static_shape, type_of
from fxopt.backends.tvm_cuda.rewrite_table import RelaxRewrite


def is_offloadable(a, b, matmul, cast) -> bool:
    """A 16-bit GEMM with fp32 accumulation cast back to its input dtype, shaped as the extension takes it."""
    dtype = dtype_of(a)
    if dtype not in HALF_DTYPES or dtype_of(b) != dtype or dtype_of(matmul) != "float32" or dtype_of(cast) != dtype:
        return False
    sa, sb = static_shape(a), static_shape(b)
    if sa is None or sb is None or len(sa) < 2:
        return False
    return len(sb) == 2 or (len(sb) == 3 and len(sa) == 3 and sa[0] == sb[0])


def is_bias_for(bias, gemm, add_dtype: Optional[str]) -> bool:
    """A 1-D [N] bias in the GEMM's dtype, or in float32 added to the GEMM's widened output."""
    shape, out = static_shape(bias), static_shape(gemm)
    return shape is not None and out is not None and len(shape) == 1 and dtype_of(bias) == add_dtype and \
        add_dtype in (dtype_of(gemm), "float32") and shape[0] == out[-1]


# ------------------------------------------------------------------- GEMM
def gemm_table() -> List[RelaxRewrite]:
    from tvm.relax.dpl import is_op, wildcard

    lhs, rhs = wildcard(), wildcard()
    product = is_op("relax.matmul")(lhs, rhs)
    return [RelaxRewrite("cublaslt-gemm", is_op("relax.astype")(product), offload_gemm,
                         {"lhs": lhs, "rhs": rhs, "product": product})]


def offload_gemm(expr, facts, lhs, rhs, product):
    """``astype(matmul(lhs, rhs))`` -> ``fxopt.cublaslt.matmul(lhs, rhs)`` where the extension takes it."""
    if not is_offloadable(lhs, rhs, product, expr):
        return None
    return packed_call(GEMM, [lhs, rhs], type_of(expr))


# ------------------------------------------------------------------- bias
def bias_table() -> List[RelaxRewrite]:
    """``add(product, bias)``, the product a GEMM call or its widening cast.

    TVM's dpl matches ``add``'s operands in either order, so ``add(bias, product)`` matches too
    (tests/backends/test_tvm_cuda_rewrite_table.py checks both).
    """
    from tvm.relax.dpl import is_call_dps_packed, is_op, wildcard

    rows = []
    for widening in (False, True):
        lhs, rhs, bias = wildcard(), wildcard(), wildcard()
        gemm = is_call_dps_packed(GEMM, [lhs, rhs])
        product = is_op("relax.astype")(gemm) if widening else gemm
        rows.append(RelaxRewrite("widened-gemm+bias" if widening else "gemm+bias", is_op("relax.add")(product, bias),
                                 fuse_bias, {"lhs": lhs, "rhs": rhs, "bias": bias, "gemm": gemm, "product": product}))
    return rows


def fuse_bias(expr, facts, lhs, rhs, bias, gemm, product):
    """The GEMM and its bias as one ``fxopt.cublaslt.matmul_bias``; None where the product is read elsewhere.

    ``product`` is the GEMM's variable, or that of its widening cast; ``bias`` is the add's other operand.
    """
    if facts.uses(product) > 1 or facts.uses(gemm) > 1:
        return None  # another reader needs the product without the bias
    if not is_bias_for(bias, gemm, dtype_of(expr)):
        return None
    from tvm import relax

    gemm_dtype = dtype_of(gemm)
    bias16 = bias if dtype_of(bias) == gemm_dtype else relax.op.astype(bias, gemm_dtype)
    fused = packed_call(GEMM_BIAS, [lhs, rhs, bias16], type_of(gemm))
    return fused if dtype_of(expr) == gemm_dtype else relax.op.astype(fused, dtype_of(expr))
