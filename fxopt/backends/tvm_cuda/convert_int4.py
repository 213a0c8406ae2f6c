"""The Relax converter of ``fxopt.linear_int4`` (:mod:`fxopt.passes.quantize.int4_linear`).

Up to :data:`MAX_KERNEL_ROWS` rows (decode), one call of fxopt's int4 kernel, which dequantizes in registers
and multiplies on tensor cores; the codes go in the kernel's MMA layout (:mod:`.int4_layout`), rearranged by
Relax ops that run once, at load (or at build time where the codes are constants)::

    y16 = fxopt.int4.linear[_zp](astype(x, float16), mma_layout(packed), scales[, zero_points])
    y = astype(y16 + astype(bias, float16), x's dtype)

More rows: the weight dequantized by Relax ops (the packed codes are pass-made constants, so the pipeline's
FoldConstant does it once, at build time) and a linear, which ``ToMixedPrecision`` and the cuBLASLt rewrite make a 16-bit GEMM. The kernel path needs the
extension: the build refuses it unless ``matmul="cublaslt"`` (:func:`~fxopt.backends.tvm_cuda.lower.
check_extension_ops`).
"""
from __future__ import annotations

import math

from fxopt.backends.tvm_cuda import int4_layout
from fxopt.backends.tvm_cuda.extension_calls import INT4_LINEAR, INT4_LINEAR_ZP, packed_call
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, static_shape
from fxopt.errors import LoweringError

LINEAR_INT4 = "linear_int4.default"
#: the kernel's rows (M); larger M takes the dequantized weight and a GEMM
MAX_KERNEL_ROWS = 64
#: the kernel multiplies 16 columns of K at a time by one scale: the group size is a multiple of this
GROUP_MULTIPLE = 16


def takes_kernel(x_shape, n: int, group_size: int) -> bool:
    """Whether fxopt's kernel runs this linear: few rows, and N, K and the group fit its tiles."""
    return math.prod(x_shape[:-1]) <= MAX_KERNEL_ROWS and int4_layout.fits(n, x_shape[-1]) \
        and group_size % GROUP_MULTIPLE == 0


def linear_int4(node, importer):
    """fxopt.linear_int4(input [..., K], packed [N, K/2], scales, zero_points?, group_size, bias?)."""
    from tvm import relax

    from fxopt.backends.tvm_cuda.converters import dequantized_int4

    bb = importer.block_builder
    x, packed, scales, zero_points, group_size, bias = importer.retrieve_args(node)
    x_shape = static_shape(x)
    if x_shape is None:
        raise LoweringError(f"tvm-cuda: {node.name} (fxopt.linear_int4) needs a static input shape")
    dtype, n = dtype_of(x), int(packed.ty.shape[0])
    if not takes_kernel(x_shape, n, group_size):
        weight = dequantized_int4(bb, packed, scales, zero_points, group_size, dtype)
        return bb.emit(relax.op.linear(x, weight, bias, out_dtype=dtype))
    x16 = x if dtype == "float16" else bb.emit(relax.op.astype(x, "float16"))
    args = [x16, int4_layout.mma_layout_relax(bb, packed), scales] + ([] if zero_points is None else [zero_points])
    y = bb.emit(packed_call(INT4_LINEAR if zero_points is None else INT4_LINEAR_ZP, args,
                            relax.TensorType([*x_shape[:-1], n], "float16")))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias if dtype_of(bias) == "float16" else relax.op.astype(bias, "float16")))
    return y if dtype == "float16" else bb.emit(relax.op.astype(y, dtype))
