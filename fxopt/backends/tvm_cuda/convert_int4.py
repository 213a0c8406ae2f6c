"""The Relax converter of ``fxopt.linear_int4`` (:mod:`fxopt.passes.quantize.int4_linear`).

Up to :data:`MAX_KERNEL_ROWS` rows (decode), one call of fxopt's int4 kernel, which dequantizes in registers::

    y16 = fxopt.int4.linear[_zp](astype(x, float16), packed, scales[, zero_points])
    y = astype(y16 + astype(bias, float16), x's dtype)

More rows: the weight dequantized by Relax ops (the packed codes are pass-made constants, so the pipeline's
FoldConstant does it once, at build time) and a linear, which ``ToMixedPrecision`` and the cuBLASLt rewrite make a 16-bit GEMM. The kernel path needs the
extension: the build refuses it unless ``matmul="cublaslt"`` (:func:`~fxopt.backends.tvm_cuda.lower.
check_extension_ops`).
"""
from __future__ import annotations

import math

from fxopt.backends.tvm_cuda.extension_calls import INT4_LINEAR, INT4_LINEAR_ZP, packed_call
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, static_shape
from fxopt.errors import LoweringError

LINEAR_INT4 = "linear_int4.default"
#: the kernel's rows (M); larger M takes the dequantized weight and a GEMM
MAX_KERNEL_ROWS = 16
#: the kernel reads 32 codes (16 bytes) at a time: K and the group size are multiples of this
KERNEL_COLUMNS = 32


#: the kernel stages x in shared memory: its rows rounded up to 1, 2, 4, 8 or 16, times K, in float16, at most
KERNEL_SHARED_BYTES = 200 * 1024


def takes_kernel(x_shape, group_size: int) -> bool:
    rows = math.prod(x_shape[:-1])
    staged = next(r for r in (1, 2, 4, 8, 16, rows) if r >= rows) * x_shape[-1] * 2
    return rows <= MAX_KERNEL_ROWS and x_shape[-1] % KERNEL_COLUMNS == 0 and group_size % KERNEL_COLUMNS == 0 \
        and staged <= KERNEL_SHARED_BYTES


def linear_int4(node, importer):
    """fxopt.linear_int4(input [..., K], packed [N, K/2], scales, zero_points?, group_size, bias?)."""
    from tvm import relax

    from fxopt.backends.tvm_cuda.converters import dequantized_int4

    bb = importer.block_builder
    x, packed, scales, zero_points, group_size, bias = importer.retrieve_args(node)
    x_shape = static_shape(x)
    if x_shape is None:
        raise LoweringError(f"tvm-cuda: {node.name} (fxopt.linear_int4) needs a static input shape")
    dtype = dtype_of(x)
    if not takes_kernel(x_shape, group_size):
        weight = dequantized_int4(bb, packed, scales, zero_points, group_size, dtype)
        return bb.emit(relax.op.linear(x, weight, bias, out_dtype=dtype))
    x16 = x if dtype == "float16" else bb.emit(relax.op.astype(x, "float16"))
    n = int(packed.ty.shape[0])
    args = [x16, packed, scales] + ([] if zero_points is None else [zero_points])
    y = bb.emit(packed_call(INT4_LINEAR if zero_points is None else INT4_LINEAR_ZP, args,
                            relax.TensorType([*x_shape[:-1], n], "float16")))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias if dtype_of(bias) == "float16" else relax.op.astype(bias, "float16")))
    return y if dtype == "float16" else bb.emit(relax.op.astype(y, dtype))
