"""fxopt's own ops, defined with ``torch.library`` in the ``fxopt`` namespace.

Each op has a real CPU kernel and a fake (meta) kernel, so a graph that uses
it stays runnable, exportable and lowerable. The passes that introduce ops
(quantization, CSR, fused epilogues) define them here.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

NAMESPACE = "fxopt"

#: Ops that constant folding must leave alone even when all inputs are weights,
#: because backends pattern-match them (e.g. dequantize of an int8 weight).
#: Passes that define such ops add to this set.
UNFOLDABLE_TARGETS: set = set()

_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def fxopt_ops():
    """The namespace object ``torch.ops.fxopt``."""
    return getattr(torch.ops, NAMESPACE)


# ======================================================= fused epilogues
# ``linear_act`` and ``conv_act`` are what ``fuse-epilogue`` emits: a linear or
# convolution, its bias and an elementwise activation as one op, so a backend
# can emit one kernel with the activation in the GEMM/conv epilogue.
#
# Why custom ops and not a node annotation: an annotation on ``aten.linear``
# is lost the moment any later pass rebuilds the node, is invisible to
# ``torch.export`` and to TVM's importer, and leaves eager running two ops.
# A custom op survives every pass, re-exports, and maps to exactly one
# converter in each backend. Two ops rather than one: a convolution carries
# geometry (stride, padding, dilation, groups) that a linear does not have.
#
# The eager kernels run the same ATen op as the unfused graph, then apply the
# activation in place on that fresh result: bit-identical to the unfused
# graph, one allocation fewer.

#: Activation name (the ``activation`` argument) -> in-place function.
EPILOGUE_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu_,
    "gelu": lambda y: torch.ops.aten.gelu_(y),
    "gelu_tanh": lambda y: torch.ops.aten.gelu_(y, approximate="tanh"),
    "silu": lambda y: F.silu(y, inplace=True),
}


def _check_activation(op: str, activation: str) -> None:
    if activation not in EPILOGUE_ACTIVATIONS:
        raise ValueError(
            f"fxopt.{op}: unknown activation {activation!r}; valid activations: {', '.join(EPILOGUE_ACTIVATIONS)}"
        )


_LIBRARY.define("linear_act(Tensor input, Tensor weight, Tensor? bias, str activation) -> Tensor")
_LIBRARY.define(
    "conv_act(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
    "SymInt groups, str activation) -> Tensor"
)


@torch.library.impl(_LIBRARY, "linear_act", "CompositeExplicitAutograd")
def _linear_act_kernel(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       activation: str) -> torch.Tensor:
    """activation(F.linear(input, weight, bias)); weight is [out, in] like ``aten.linear``."""
    _check_activation("linear_act", activation)
    return EPILOGUE_ACTIVATIONS[activation](F.linear(input, weight, bias))


@torch.library.register_fake(f"{NAMESPACE}::linear_act", lib=_LIBRARY)
def _linear_act_fake(input, weight, bias, activation):
    _check_activation("linear_act", activation)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _conv(input, weight, bias, stride: Sequence, padding: Sequence, dilation: Sequence, groups) -> torch.Tensor:
    output_padding: List[int] = [0] * (weight.dim() - 2)
    return torch.ops.aten.convolution.default(
        input, weight, bias, stride, padding, dilation, False, output_padding, groups
    )


@torch.library.impl(_LIBRARY, "conv_act", "CompositeExplicitAutograd")
def _conv_act_kernel(input, weight, bias, stride, padding, dilation, groups, activation: str) -> torch.Tensor:
    """activation(convolution(input, weight, bias, ...)); not transposed, no output padding."""
    _check_activation("conv_act", activation)
    return EPILOGUE_ACTIVATIONS[activation](_conv(input, weight, bias, stride, padding, dilation, groups))


@torch.library.register_fake(f"{NAMESPACE}::conv_act", lib=_LIBRARY)
def _conv_act_fake(input, weight, bias, stride, padding, dilation, groups, activation):
    _check_activation("conv_act", activation)
    return _conv(input, weight, bias, stride, padding, dilation, groups)


# ============================================================ a recognised GELU
# ``fused_gelu(x, approximate)`` is a GELU the fx passes recognised, however it
# was written: ``aten.gelu`` or spelled out in elementwise ops (GPT-2's
# ``gelu_new``, ``0.5*x*(1+erf(x/sqrt(2)))``). A backend lowers it as one op and
# never has to recognise GELU again from constants (the CUDA backend hands it
# to its GELU kernel). ``approximate`` is aten.gelu's: ``"none"`` (erf) or ``"tanh"``.
GELU_APPROXIMATIONS = ("none", "tanh")

_LIBRARY.define("fused_gelu(Tensor input, str approximate) -> Tensor")


def _check_approximate(approximate: str) -> None:
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"fxopt.fused_gelu: unknown approximate {approximate!r}; valid: "
                         f"{', '.join(GELU_APPROXIMATIONS)}")


@torch.library.impl(_LIBRARY, "fused_gelu", "CompositeExplicitAutograd")
def _fused_gelu_kernel(input: torch.Tensor, approximate: str) -> torch.Tensor:
    _check_approximate(approximate)
    return torch.ops.aten.gelu(input, approximate=approximate)


@torch.library.register_fake(f"{NAMESPACE}::fused_gelu", lib=_LIBRARY)
def _fused_gelu_fake(input, approximate):
    _check_approximate(approximate)
    return torch.empty_like(input)


# ============================================================ quantize / dequantize
# Q/DQ use torch's own ``quantized_decomposed`` ops (registered by importing
# ``torch.ao.quantization.fx._decomposed``): they have CPU and fake kernels,
# survive torch.export and are what PT2E lowerings pattern-match. Dequantizing
# an int8 weight must stay in the graph (a backend fuses it into an int8 GEMM),
# so constant folding leaves every Q/DQ op alone.
import torch.ao.quantization.fx._decomposed  # noqa: E402,F401  (registers torch.ops.quantized_decomposed)

QD = torch.ops.quantized_decomposed
QDQ_TARGETS = frozenset({
    QD.quantize_per_tensor.default, QD.quantize_per_tensor.tensor,
    QD.dequantize_per_tensor.default, QD.dequantize_per_tensor.tensor,
    QD.quantize_per_channel.default, QD.dequantize_per_channel.default,
    QD.choose_qparams.tensor,
})
UNFOLDABLE_TARGETS.update(QDQ_TARGETS)


# ======================================================= int4 group-wise weights
# ``insert-qdq{scheme=weight-only,bits=4}`` stores a weight [out, in] as uint8
# [out, in/2]: column 2j in the low nibble of byte j, column 2j+1 in the high
# nibble. A nibble holds the int4 code plus 8 (codes -8..7 as 0..15), so
# unpacking is a shift and a mask with no sign extension. Every ``group_size``
# consecutive columns of a row share a float32 scale and, when asymmetric, an
# int8 zero point in [-8, 7]:
#     w[o, i] = (code[o, i] - zero_point[o, i // group_size]) * scale[o, i // group_size]
# No torch op does this, hence an fxopt op; fold-constants must keep it.
INT4_OFFSET = 8

_LIBRARY.define(
    "dequantize_int4_grouped(Tensor packed, Tensor scales, Tensor? zero_points, int group_size, "
    "ScalarType out_dtype) -> Tensor"
)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., n/2]`` holding two nibbles a byte -> the int4 codes as int8 ``[..., n]`` in [-8, 7]."""
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return nibbles.to(torch.int8) - INT4_OFFSET


def _check_int4_grouped(packed, scales, zero_points, group_size: int) -> None:
    where = "fxopt.dequantize_int4_grouped"
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"{where}: packed must be a 2-D uint8 tensor, got {packed.dtype}{list(packed.shape)}")
    columns = packed.shape[1] * 2
    if group_size <= 0 or columns % group_size:
        raise ValueError(f"{where}: group_size={group_size} does not divide the {columns} unpacked columns")
    groups = (packed.shape[0], columns // group_size)
    for name, t in (("scales", scales), ("zero_points", zero_points)):
        if t is not None and tuple(t.shape) != groups:
            raise ValueError(f"{where}: {name} has shape {list(t.shape)}, expected {list(groups)} (rows, groups)")


@torch.library.impl(_LIBRARY, "dequantize_int4_grouped", "CompositeExplicitAutograd")
def _dequantize_int4_grouped_kernel(packed, scales, zero_points, group_size: int, out_dtype) -> torch.Tensor:
    """The float weight ``[out, in]`` of packed int4 codes with one scale (and zero point) per group."""
    _check_int4_grouped(packed, scales, zero_points, group_size)
    rows = packed.shape[0]
    codes = unpack_int4(packed).reshape(rows, -1, group_size).float()
    if zero_points is not None:
        codes = codes - zero_points.reshape(rows, -1, 1).float()
    return (codes * scales.reshape(rows, -1, 1).float()).reshape(rows, -1).to(out_dtype)


@torch.library.register_fake(f"{NAMESPACE}::dequantize_int4_grouped", lib=_LIBRARY)
def _dequantize_int4_grouped_fake(packed, scales, zero_points, group_size, out_dtype):
    _check_int4_grouped(packed, scales, zero_points, group_size)
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=out_dtype)


UNFOLDABLE_TARGETS.add(fxopt_ops().dequantize_int4_grouped.default)


# ============================================================ CSR sparse linear
# ``sparsify`` replaces a pruned ``aten.linear`` by ``csr_linear``: the weight
# [out, in] is stored as its CSR arrays (crow_indices [out + 1], col_indices
# [nnz], values [nnz]), three get_attr weights that safetensors saves as they
# are. The kernel is torch's CSR x dense product (MKL on x86), in the layout
# benchmarks/sparse_linear.py measured fastest here: int32 indices (int64 ones
# are converted on every call), addmm(bias, W, x^T) for a batch of rows, and for
# a single row a sparse matrix-vector product once W has enough nonzeros (up to
# 2x faster than a 1-column addmm at 4096x4096, 50-90% sparse).
# MKL has no float16/bfloat16 CSR kernels: those compute in float32.
_LIBRARY.define(
    "csr_linear(Tensor input, Tensor crow_indices, Tensor col_indices, Tensor values, int out_features, "
    "int in_features, Tensor? bias) -> Tensor"
)
_CSR_NATIVE_DTYPES = (torch.float32, torch.float64)
#: A one-row product uses addmv from this many nonzeros up: below, its fixed cost (~0.1 ms) loses to a
#: 1-column addmm; above, its lower cost per nonzero wins (benchmarks/results/sparse_linear_1thread.md, 4096x4096
#: vs 768->3072 at batch 1; the Xeon run sparse_linear_xeon.md agrees).
CSR_MV_MIN_NONZEROS = 250_000
# torch warns once that CSR support is "beta"; csr_linear is tested against the dense product.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _check_csr_linear(input, crow, col, values, out_features: int, in_features: int, bias) -> None:
    where = "fxopt.csr_linear"
    if input.shape[-1] != in_features:
        raise ValueError(f"{where}: input's last dim is {input.shape[-1]}, in_features is {in_features}")
    if crow.dim() != 1 or crow.shape[0] != out_features + 1:
        raise ValueError(f"{where}: crow_indices has shape {list(crow.shape)}, expected [{out_features + 1}]")
    if col.dim() != 1 or values.dim() != 1 or col.shape[0] != values.shape[0]:
        raise ValueError(f"{where}: col_indices {list(col.shape)} and values {list(values.shape)} must be 1-D "
                         "and of one length (nnz)")
    if crow.dtype not in (torch.int32, torch.int64) or col.dtype != crow.dtype:
        raise ValueError(f"{where}: indices must both be int32 or int64, got {crow.dtype} and {col.dtype}")
    if values.dtype != input.dtype or (bias is not None and bias.dtype != input.dtype):
        raise ValueError(f"{where}: values ({values.dtype}) and bias must have the input's dtype {input.dtype}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"{where}: bias has shape {list(bias.shape)}, expected [{out_features}]")


def csr_addmm(rows: torch.Tensor, crow, col, values, out_features: int, in_features: int,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``rows @ W.T + bias`` for a 2-D ``rows`` [M >= 1, in] and W [out, in] given by its CSR arrays: [M, out].

    Several rows are ``addmm(bias, W, rows^T)``, transposed back. The result is made contiguous, as
    ``aten.linear``'s is (a later ``view`` may need it); that copy is part of the measured cost. One row is
    ``addmv`` when W has at least :data:`CSR_MV_MIN_NONZEROS` nonzeros, else the same 1-column ``addmm``.
    """
    if values.dtype not in _CSR_NATIVE_DTYPES:  # (a branch, not .to() calls: this runs per layer and call)
        rows, values, bias = rows.float(), values.float(), bias.float() if bias is not None else None
    weight = torch.sparse_csr_tensor(crow, col, values, (out_features, in_features), check_invariants=False)
    if rows.shape[0] == 1 and values.shape[0] >= CSR_MV_MIN_NONZEROS:
        vector = weight @ rows[0] if bias is None else torch.addmv(bias, weight, rows[0])
        return vector.unsqueeze(0)
    product = weight @ rows.T if bias is None else torch.addmm(bias.unsqueeze(1), weight, rows.T)
    return product.T.contiguous()


@torch.library.impl(_LIBRARY, "csr_linear", "CompositeExplicitAutograd")
def _csr_linear_kernel(input, crow_indices, col_indices, values, out_features: int, in_features: int,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(input, W, bias)`` with W [out, in] in CSR form; input may have any leading dims."""
    _check_csr_linear(input, crow_indices, col_indices, values, out_features, in_features, bias)
    rows = input if input.dim() == 2 else input.reshape(-1, in_features)
    if rows.shape[0] == 0:
        return input.new_zeros((*input.shape[:-1], out_features))
    out = csr_addmm(rows, crow_indices, col_indices, values, out_features, in_features, bias)
    out = out if out.dtype == input.dtype else out.to(input.dtype)
    return out if input.dim() == 2 else out.reshape(*input.shape[:-1], out_features)


@torch.library.register_fake(f"{NAMESPACE}::csr_linear", lib=_LIBRARY)
def _csr_linear_fake(input, crow_indices, col_indices, values, out_features, in_features, bias):
    _check_csr_linear(input, crow_indices, col_indices, values, out_features, in_features, bias)
    return input.new_empty((*input.shape[:-1], out_features))


# ================================================================ fp8 linears
# ``quantize-fp8`` makes ``aten.linear(x, w, b)`` one ``fxopt.linear_fp8(x, w, b)``: x quantized to
# float8_e4m3fn per token (each row of the flattened [M, K] input, at run time) and w per output channel,
# each row scaled so its absmax maps to 448, e4m3's largest finite value; the product of the dequantized
# operands, plus the bias, in the input's dtype. The weight stays in float in the graph: the cuda backend
# quantizes it once when the model's parameters are transformed at load time, with the same kernel (and the
# same rounding) as the activations. This eager kernel is the reference the GPU path is tested against.
E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0

_LIBRARY.define("linear_fp8(Tensor input, Tensor weight, Tensor? bias) -> Tensor")


def scaled_rows(rows: torch.Tensor, largest: float):
    """(rows / scale, scale) in float32, each row's scale its absmax / ``largest`` (1 for a row of zeros): the
    IEEE divisions of fxopt's CUDA row quantizers."""
    rows = rows.float()
    amax = rows.abs().amax(dim=-1)
    # a tensor divisor: torch's CUDA division by a Python scalar multiplies by its reciprocal (1 ulp apart)
    scales = torch.where(amax > 0, amax / torch.full_like(amax, largest), torch.ones_like(amax))
    return rows / scales[:, None], scales


def quantize_rows_fp8(rows: torch.Tensor):
    """(e4m3 codes, float32 scale per row) of a 2-D tensor: scale = absmax / 448 (1 for a row of zeros), codes =
    row / scale rounded to nearest even; bitwise what ``fxopt.fp8.quantize_rows`` computes on the GPU."""
    scaled, scales = scaled_rows(rows, E4M3_MAX)
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scales


def _check_linear_weight(op: str, input: torch.Tensor, weight: torch.Tensor) -> None:
    """fxopt.linear_fp8 and linear_int8 (``op``): a float weight [out, in] matching the input."""
    if weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"fxopt.{op}: weight must be [out, in] with in = the input's last dimension; "
                         f"got input {tuple(input.shape)}, weight {tuple(weight.shape)}")


@torch.library.impl(_LIBRARY, "linear_fp8", "CompositeExplicitAutograd")
def _linear_fp8_kernel(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check_linear_weight("linear_fp8", input, weight)
    x_codes, x_scales = quantize_rows_fp8(input.reshape(-1, input.shape[-1]))
    w_codes, w_scales = quantize_rows_fp8(weight)
    out = (x_codes.float() * x_scales[:, None]) @ (w_codes.float() * w_scales[:, None]).T
    if bias is not None:
        out = out + bias.float()
    return out.to(input.dtype).reshape(*input.shape[:-1], weight.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::linear_fp8", lib=_LIBRARY)
def _linear_fp8_fake(input, weight, bias):
    _check_linear_weight("linear_fp8", input, weight)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


# ================================================================ int8 linears
# ``quantize-int8`` makes ``aten.linear(x, w, b)`` one ``fxopt.linear_int8(x, w, b)``: x quantized to int8 per
# token (each row of the flattened [M, K] input, at run time) and w per output channel, symmetric, each row's
# scale absmax / 127; the int8 products summed exactly in int32, then scaled back in fp32 (row scale, then column
# scale, then the bias: the order and roundings of the cuda backend's fxopt.int8.dequantize). The weight stays in
# float in the graph; the cuda backend quantizes it once, at load. This eager kernel is the reference the GPU path
# is tested against.
INT8_MAX = 127.0

_LIBRARY.define("linear_int8(Tensor input, Tensor weight, Tensor? bias) -> Tensor")


def quantize_rows_int8(rows: torch.Tensor):
    """(int8 codes, float32 scale per row) of a 2-D tensor: scale = absmax / 127 (1 for a row of zeros), codes =
    row / scale rounded to nearest even; bitwise what ``fxopt.int8.quantize_rows`` computes on the GPU."""
    scaled, scales = scaled_rows(rows, INT8_MAX)
    return torch.round(scaled).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scales


def int8_row_products(x_codes: torch.Tensor, w_codes: torch.Tensor) -> torch.Tensor:
    """The exact int32 sums ``x_codes @ w_codes.T`` of int8 codes: float64 holds every partial sum exactly
    (|sum| <= 127^2 K < 2^53), on any device and in any summation order."""
    return (x_codes.double() @ w_codes.double().T).to(torch.int32)


def dequantize_int32_rows(acc, x_scales, w_scales, bias, dtype: torch.dtype) -> torch.Tensor:
    """``acc * x_scales[m] * w_scales[n] + bias[n]`` in fp32, in that order, rounded once to ``dtype``."""
    out = acc.float() * x_scales[:, None] * w_scales[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


@torch.library.impl(_LIBRARY, "linear_int8", "CompositeExplicitAutograd")
def _linear_int8_kernel(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _check_linear_weight("linear_int8", input, weight)
    x_codes, x_scales = quantize_rows_int8(input.reshape(-1, input.shape[-1]))
    w_codes, w_scales = quantize_rows_int8(weight)
    out = dequantize_int32_rows(int8_row_products(x_codes, w_codes), x_scales, w_scales, bias, input.dtype)
    return out.reshape(*input.shape[:-1], weight.shape[0])


@torch.library.register_fake(f"{NAMESPACE}::linear_int8", lib=_LIBRARY)
def _linear_int8_fake(input, weight, bias):
    _check_linear_weight("linear_int8", input, weight)
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


# ============================================================ int4 weight-only linears
# ``int4-linear`` makes ``aten.linear(x, dequantize_int4_grouped(packed, scales, zero_points, G), b)`` one
# ``fxopt.linear_int4``: the same math, as one op a backend can hand to a kernel that dequantizes in registers
# (the cuda backend's ``fxopt.int4.linear`` for up to 64 rows) instead of materializing the float weight.
_LIBRARY.define("linear_int4(Tensor input, Tensor packed, Tensor scales, Tensor? zero_points, int group_size, "
                "Tensor? bias) -> Tensor")


@torch.library.impl(_LIBRARY, "linear_int4", "CompositeExplicitAutograd")
def _linear_int4_kernel(input, packed, scales, zero_points, group_size: int, bias) -> torch.Tensor:
    weight = _dequantize_int4_grouped_kernel(packed, scales, zero_points, group_size, input.dtype)
    return torch.ops.aten.linear.default(input, weight, bias)


@torch.library.register_fake(f"{NAMESPACE}::linear_int4", lib=_LIBRARY)
def _linear_int4_fake(input, packed, scales, zero_points, group_size, bias):
    _check_int4_grouped(packed, scales, zero_points, group_size)
    return input.new_empty((*input.shape[:-1], packed.shape[0]))
