"""Relax converters for fxopt's own ops, passed to ``from_exported_program(custom_convert_map=...)``.

A converter is ``fn(node: torch.fx.Node, importer) -> relax.Var``. ``importer``
is the ``ExportedProgramImporter``: ``importer.env[n]`` is the Relax value of an
earlier node ``n`` and ``importer.block_builder.emit(expr)`` adds a binding.
The map's keys are ``node.target.__name__``, the op and overload without the
namespace: ``"linear_act.default"`` for ``torch.ops.fxopt.linear_act.default``.
"""
from __future__ import annotations

from typing import Callable, Dict

from fxopt.backends.tvm_cuda.convert_fp8 import LINEAR_FP8, linear_fp8
from fxopt.backends.tvm_cuda.convert_int4 import LINEAR_INT4, linear_int4
from fxopt.backends.tvm_cuda.convert_int8 import LINEAR_INT8, linear_int8
from fxopt.backends.tvm_cuda.sparse import csr_linear_densified


def _activation(name: str) -> Callable:
    from tvm import relax

    table = {
        "relu": relax.op.nn.relu, "gelu": relax.op.nn.gelu, "gelu_tanh": relax.op.nn.gelu_tanh,
        "silu": relax.op.nn.silu,
    }
    return table[name]  # the op's own check rejects any other name at capture time


def _linear_act(node, importer):
    """fxopt.linear_act(input, weight[out, in], bias?, activation): one matmul with its epilogue."""
    from tvm import relax

    x, weight, bias, activation = (importer.env.get(a, a) if a is not None else None for a in node.args)
    dtype = str(x.ty.dtype)  # unlike the stock aten.linear converter, do not force float32 (``.ty`` in 0.27)
    y = importer.block_builder.emit(relax.op.linear(x, weight, bias, out_dtype=dtype))
    return importer.block_builder.emit(_activation(activation)(y))


def _fused_gelu(node, importer):
    """fxopt.fused_gelu(input, approximate): a GELU the fx passes recognised, as Relax's op for its variant.

    ``nn.gelu`` / ``nn.gelu_tanh`` name the variant, so the Relax rewrites
    (:mod:`fxopt.backends.tvm_cuda.rewrite_norm_act`) find GELU by its op, never by its constants.
    """
    x, approximate = importer.env[node.args[0]], node.args[1]
    return importer.block_builder.emit(_activation("gelu_tanh" if approximate == "tanh" else "gelu")(x))


def _conv_act(node, importer):
    """fxopt.conv_act(input, weight, bias?, stride, padding, dilation, groups, activation) for 1-, 2- and 3-D convs."""
    from tvm import relax

    x, weight, bias = (importer.env[a] if a is not None else None for a in node.args[:3])
    stride, padding, dilation, groups, activation = node.args[3:8]
    convs = {1: relax.op.nn.conv1d, 2: relax.op.nn.conv2d, 3: relax.op.nn.conv3d}
    rank = len(stride)
    bb = importer.block_builder
    y = bb.emit(convs[rank](x, weight, stride, padding, dilation, groups, out_dtype=str(x.ty.dtype)))
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(bias, (1, -1) + (1,) * rank)))
    return bb.emit(_activation(activation)(y))


def _cumsum(node, importer):
    """aten.cumsum with torch's dtype: a bool or integer input sums in int64 unless ``dtype`` says otherwise.

    The stock converter keeps the input dtype, so GPT-2's ``cumsum(mask != 1)``
    became a *bool* cumsum: wrong values, and TVM's GPU scan kernel then stores
    4 bools as an 8-byte ``ushort4`` into shared memory (misaligned address on
    the H100).
    """
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    dtype = str(node.meta["val"].dtype).replace("torch.", "")
    return importer.block_builder.emit(relax.op.cumsum(x, dim, dtype))


def _pow_tensor_scalar(node, importer):
    """x ** n for a float x and n in 2..4 as multiplications: exact for negative x, and cheaper.

    TVM emits ``powf(x, 3.0f)``; compiled with ``--use_fast_math`` that is
    ``exp2(3 * log2(x))``, NaN for every negative x (GPT-2's gelu_new gave NaN).
    Every other case goes to the stock converter.
    """
    from tvm import relax

    x, exponent = importer.env.get(node.args[0]), node.args[1]
    whole = isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and float(exponent).is_integer()
    if x is None or not whole or not 2 <= exponent <= 4 or "float" not in str(x.ty.dtype):
        return importer._pow(node)
    result = x
    for _ in range(int(exponent) - 1):
        result = importer.block_builder.emit(relax.op.multiply(result, x))
    return result


def _sdpa(node, importer):
    """aten.scaled_dot_product_attention on 4-D [B, N, L, D] tensors as ``nn.attention`` (BSNH), scale included.

    The stock converter drops ``scale`` and refuses boolean masks; a boolean
    mask (True = attend) becomes an additive 0/-inf bias here. Other ranks,
    dropout and grouped-query attention go to the stock converter.
    """
    from tvm import relax

    args = list(node.args) + [None] * (6 - len(node.args))
    query, key, value = (importer.env[a] for a in args[:3])
    mask = args[3] if args[3] is not None else node.kwargs.get("attn_mask")
    dropout = args[4] or node.kwargs.get("dropout_p", 0.0)
    causal = args[5] or node.kwargs.get("is_causal", False)
    if len(query.ty.shape) != 4 or dropout or node.kwargs.get("enable_gqa"):
        return importer._scaled_dot_product_attention(node)
    bb = importer.block_builder
    to_bsnh = lambda t: bb.emit(relax.op.permute_dims(t, [0, 2, 1, 3]))  # noqa: E731
    bias = _additive_mask(bb, importer.env[mask]) if mask is not None else None
    scale = node.kwargs.get("scale")
    out = bb.emit(relax.op.nn.attention(to_bsnh(query), to_bsnh(key), to_bsnh(value), bias=bias,
                                        scale=scale, causal_mask="TopLeft" if causal else None))
    return to_bsnh(out)


def _additive_mask(bb, mask):
    """SDPA's attn_mask as a 4-D additive bias: a boolean mask (True = attend) becomes 0 / -inf."""
    from tvm import relax

    if str(mask.ty.dtype) == "bool":
        mask = bb.emit(relax.op.where(mask, relax.const(0.0, "float32"), relax.const(float("-inf"), "float32")))
    rank = len(mask.ty.shape)
    if rank < 4:
        mask = bb.emit(relax.op.reshape(mask, [1] * (4 - rank) + [int(d) for d in mask.ty.shape]))
    return mask


# ------------------------------------------------------- 16-bit matmuls
# The stock mm / bmm / matmul / addmm converters force a float32 result, so a
# graph computing in float16 or bfloat16 (to-half, to-bfloat16) failed to
# import: its 16-bit bias was added to a float32 product. These keep the
# inputs' dtype, as torch does; for float32 graphs they emit what the stock
# ones do. (aten.linear is decomposed into addmm / mm before the import.)
def _product(bb, op: Callable, dtype: str):
    """``op(out_dtype)`` in ``dtype``; 16-bit floats accumulate in float32 and round once, as torch's GEMMs do."""
    from tvm import relax

    if dtype in ("float16", "bfloat16"):
        return bb.emit(relax.op.astype(bb.emit(op("float32")), dtype))
    return bb.emit(op(dtype))


def _matmul(node, importer):
    """aten.mm / bmm / matmul in the inputs' dtype."""
    from tvm import relax

    a, b = importer.env[node.args[0]], importer.env[node.args[1]]
    return _product(importer.block_builder, lambda out: relax.op.matmul(a, b, out_dtype=out), str(a.ty.dtype))


def _addmm(node, importer):
    """aten.addmm: beta * bias + alpha * (a @ b), in the inputs' dtype."""
    from tvm import relax

    bias, a, b = (importer.env[x] for x in node.args[:3])
    dtype, bb = str(a.ty.dtype), importer.block_builder
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    product = _product(bb, lambda out: relax.op.matmul(a, b, out_dtype=out), dtype)
    if alpha != 1:
        product = bb.emit(relax.op.multiply(product, relax.const(alpha, dtype)))
    if beta == 0:
        return product
    if beta != 1:
        bias = bb.emit(relax.op.multiply(bias, relax.const(beta, str(bias.ty.dtype))))
    return bb.emit(relax.op.add(bias, product))


# ------------------------------------------------------------ quantization
# The Q/DQ ops insert-qdq emits, as Relax arithmetic that follows the eager
# kernels (torch.ao.quantization.fx._decomposed) step by step, rounding included.
def _round_half_to_even(bb, x):
    """torch.round (ties to even); ``relax.op.round`` rounds ties away from zero."""
    from tvm import relax, te

    x = x if isinstance(x, relax.Var) else bb.emit(x)
    return bb.emit_te(lambda t: te.compute(t.shape, lambda *i: te.nearbyint(t(*i)), name="round_half_to_even"), x)


def _as_float(value, dtype: str = "float32"):
    """A Relax tensor cast to ``dtype``, or a Python number as a ``dtype`` constant."""
    from tvm import relax

    return relax.op.astype(value, dtype) if isinstance(value, relax.Expr) else relax.const(value, dtype)


def _reciprocal(scale):
    """float32(1.0 / scale), the quotient taken in float64 as the eager kernel does with ``scale.item()``."""
    from tvm import relax

    if not isinstance(scale, relax.Expr):
        return relax.const(1.0 / scale, "float32")
    return relax.op.astype(relax.op.divide(relax.const(1.0, "float64"), _as_float(scale, "float64")), "float32")


def _clamp_and_cast(bb, codes, qmin, qmax, dtype):
    from tvm import relax

    clamped = relax.op.minimum(relax.op.maximum(codes, relax.const(qmin, "float32")), relax.const(qmax, "float32"))
    return bb.emit(relax.op.astype(clamped, dtype))


def _quantize_per_tensor(node, importer):
    """quantized_decomposed.quantize_per_tensor (.default and .tensor): clamp(round(x / scale) + zp).to(dtype)."""
    from tvm import relax

    x, scale, zero_point, qmin, qmax, dtype = importer.retrieve_args(node)
    bb = importer.block_builder
    scaled = relax.op.multiply(relax.op.astype(x, "float32"), _reciprocal(scale))
    codes = relax.op.add(_round_half_to_even(bb, scaled), _as_float(zero_point))
    return _clamp_and_cast(bb, codes, qmin, qmax, importer._convert_data_type(dtype))


def _dequantize_per_tensor(node, importer):
    """quantized_decomposed.dequantize_per_tensor (.default and .tensor): (q.to(out) - zp) * scale."""
    from tvm import relax

    q, scale, zero_point = importer.retrieve_args(node)[:3]
    out = importer._convert_data_type(node.kwargs.get("out_dtype") or "float32")
    shifted = relax.op.subtract(relax.op.astype(q, out), _as_float(zero_point, out))
    return importer.block_builder.emit(relax.op.multiply(shifted, _as_float(scale, out)))


def _dequantize_per_channel(node, importer):
    """quantized_decomposed.dequantize_per_channel: ((q - zp) * scale along ``axis``).to(out_dtype)."""
    from tvm import relax

    q, scales, zero_points, axis = importer.retrieve_args(node)[:4]
    bb = importer.block_builder
    rank = len(q.ty.shape)
    along_axis = [1] * rank
    along_axis[axis % rank] = -1
    channel = lambda t: relax.op.reshape(bb.emit(relax.op.astype(t, "float32")), along_axis)  # noqa: E731
    values = relax.op.astype(q, "float32")
    if zero_points is not None:
        values = relax.op.subtract(values, channel(zero_points))
    out = importer._convert_data_type(node.kwargs.get("out_dtype") or "float32")
    return bb.emit(relax.op.astype(relax.op.multiply(values, channel(scales)), out))


def _choose_qparams(node, importer):
    """quantized_decomposed.choose_qparams.tensor: the asymmetric per-tensor (scale f64[1], zero point i64[1])."""
    from tvm import relax

    x, qmin, qmax, eps = importer.retrieve_args(node)[:4]
    bb = importer.block_builder
    x = relax.op.astype(x, "float32")
    lo = relax.op.minimum(relax.op.min(x), relax.const(0.0, "float32"))
    hi = relax.op.maximum(relax.op.max(x), relax.const(0.0, "float32"))
    scale = relax.op.divide(relax.op.subtract(hi, lo), relax.const(float(qmax - qmin), "float32"))
    scale = bb.emit(relax.op.maximum(scale, relax.const(eps, "float32")))
    shift = _round_half_to_even(bb, relax.op.divide(lo, scale))
    zero_point = _clamp_and_cast(bb, relax.op.subtract(relax.const(qmin, "float32"), shift), qmin, qmax, "int64")
    as_vector = lambda t, dtype: bb.emit(relax.op.reshape(bb.emit(relax.op.astype(t, dtype)), (1,)))  # noqa: E731
    return as_vector(scale, "float64"), as_vector(zero_point, "int64")


def _dequantize_int4_grouped(node, importer):
    """fxopt.dequantize_int4_grouped: nibbles by mask and shift, interleaved back, (code - zp) * scale per group."""
    packed, scales, zero_points, group_size, out_dtype = importer.retrieve_args(node)
    return dequantized_int4(importer.block_builder, packed, scales, zero_points, group_size,
                            importer._convert_data_type(out_dtype))


def dequantized_int4(bb, packed, scales, zero_points, group_size: int, dtype: str):
    """The float weight [rows, 2 * half] of fxopt's packed int4 codes, as Relax ops (see fxopt.ir.ops)."""
    from tvm import relax

    from fxopt.ir.ops import INT4_OFFSET

    rows, half = (int(d) for d in packed.ty.shape)
    low = relax.op.bitwise_and(packed, relax.const(0x0F, "uint8"))
    high = relax.op.right_shift(packed, relax.const(4, "uint8"))
    nibbles = relax.op.reshape(bb.emit(relax.op.stack([low, high], axis=2)), (rows, -1, group_size))
    per_group = lambda t: relax.op.reshape(bb.emit(relax.op.astype(t, "float32")), (rows, -1, 1))  # noqa: E731
    offset = relax.const(float(INT4_OFFSET), "float32")
    if zero_points is not None:
        offset = relax.op.add(per_group(zero_points), offset)
    weight = relax.op.multiply(relax.op.subtract(relax.op.astype(nibbles, "float32"), offset), per_group(scales))
    return bb.emit(relax.op.astype(relax.op.reshape(bb.emit(weight), (rows, 2 * half)), dtype))


#: Converters for every fxopt op the CUDA backend can lower, and fixes of stock ATen converters.
FXOPT_CONVERTERS: Dict[str, Callable] = {
    "linear_act.default": _linear_act,
    LINEAR_FP8: linear_fp8,  # convert_fp8.py: cuBLASLt's fp8 GEMM (matmul="cublaslt" builds only)
    LINEAR_INT8: linear_int8,  # convert_int8.py: cuBLASLt's int8 GEMM + fxopt's dequantize (matmul="cublaslt")
    LINEAR_INT4: linear_int4,  # convert_int4.py: fxopt.int4.linear up to 64 rows (matmul="cublaslt" builds only)
    "conv_act.default": _conv_act,
    "fused_gelu.default": _fused_gelu,
    "cumsum.default": _cumsum,
    "pow.Tensor_Scalar": _pow_tensor_scalar,
    "scaled_dot_product_attention.default": _sdpa,
    "mm.default": _matmul,
    "bmm.default": _matmul,
    "matmul.default": _matmul,
    "addmm.default": _addmm,
    "dequantize_int4_grouped.default": _dequantize_int4_grouped,
    "csr_linear.default": csr_linear_densified,  # sparse.py: densified at build time; a sparse kernel is opt-in
    "quantize_per_tensor.default": _quantize_per_tensor,
    "quantize_per_tensor.tensor": _quantize_per_tensor,
    "dequantize_per_tensor.default": _dequantize_per_tensor,
    "dequantize_per_tensor.tensor": _dequantize_per_tensor,
    "dequantize_per_channel.default": _dequantize_per_channel,
    "choose_qparams.tensor": _choose_qparams,
}
