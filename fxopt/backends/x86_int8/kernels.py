"""The int8 kernels of the x86 backend: oneDNN's int8 GEMM as shipped inside PyTorch.

``Int8Linear`` holds one linear layer: its int8 weight prepacked once for
oneDNN (``onednn::qlinear_prepack``; on the first call, so that none is held
while TorchInductor compiles its own), per-output-channel weight scales, the
float bias and the activation's quantization. One call quantizes the float
input to uint8 codes (or takes codes from the previous layer), multiplies
``u8 x s8`` into int32 and, in the same kernel, scales to float, adds the bias,
applies the activation (relu, gelu) and either returns float32 or requantizes
to the next layer's uint8 codes (``onednn::qlinear_pointwise``).

``Int8Embedding`` gathers int8 rows of an embedding table and scales only
those rows, instead of dequantizing the whole table on every call.

Why these kernels (measured by ``benchmarks/x86_int8.py``, part 4 "Single GEMMs";
``benchmarks/results/x86_int8_cpu2.md``): on an AVX2
machine oneDNN's int8 GEMM takes 0.5-0.8x the time of fp32 ``F.linear`` for
MiniLM's shapes, while ``torch._int_mm`` is a slow reference loop there and
untuned TVM on llvm is ~100x slower than eager PyTorch (DESIGN.md).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fxopt.ir.ops import EPILOGUE_ACTIVATIONS

#: fxopt activation name -> (oneDNN post-op, algorithm) fused into the GEMM epilogue.
FUSED_ACTIVATIONS = {
    "none": ("none", ""),
    "relu": ("relu", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
}


@dataclass(frozen=True)
class ActivationCodes:
    """How a float activation maps to the uint8 codes the kernel reads: ``x ~ (code - zero_point) * scale``."""

    scale: float
    zero_point: int
    levels: int  # largest code (255, or 127 without VNNI)

    @classmethod
    def for_levels(cls, scale: float, zero_point: int, qmin: int, qmax: int, levels: int
                   ) -> Tuple["ActivationCodes", bool]:
        """The codes for a graph's ``quantize(x, scale, zero_point, qmin, qmax)`` when the kernel takes ``levels``.

        Returns the codes and whether they are exactly the graph's codes (shifted
        by ``-qmin``). When the graph's range has more levels than the kernel may
        take, the same float range is spread over fewer levels (lossy).
        """
        if qmax - qmin <= levels:
            return cls(float(scale), int(zero_point) - qmin, qmax - qmin), True
        lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
        return cls.from_range(lo, hi, levels), False

    @classmethod
    def from_range(cls, lo: float, hi: float, levels: int) -> "ActivationCodes":
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        scale = max((hi - lo) / levels, torch.finfo(torch.float32).eps)
        zero_point = int(min(max(round(-lo / scale), 0), levels))
        return cls(scale, zero_point, levels)


def quantize_u8(x: torch.Tensor, codes: ActivationCodes) -> torch.Tensor:
    """uint8 codes of float ``x``: ``clamp(round(x / scale) + zero_point, 0, levels)``."""
    if codes.levels < 255:  # the quantized tensor clamps to 0..255 only; clamp the float side (rounds to <= levels)
        x = x.clamp(max=(codes.levels - codes.zero_point + 0.49) * codes.scale)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
        q = torch.quantize_per_tensor(x.contiguous(), codes.scale, codes.zero_point, torch.quint8)
    # A plain uint8 tensor over the quantized tensor's storage: the codes without a copy. (``q.view(uint8)``
    # keeps the quantized dispatch key, and oneDNN's qlinear crashes on it; ``int_repr()`` copies.)
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), 0, q.shape, q.stride())


def dynamic_codes(x: torch.Tensor, levels: int) -> ActivationCodes:
    """Per-tensor codes chosen from ``x``'s own range at run time (the ``dynamic`` scheme)."""
    lo, hi = torch.aminmax(x.detach())
    return ActivationCodes.from_range(lo.item(), hi.item(), levels)


class Int8Linear(torch.nn.Module):
    """``activation(x @ dequant(w).T + bias)`` on int8 codes with int32 accumulation.

    ``input_multiplier`` (a vector over input channels, e.g. smooth-quant's ``1/s``)
    multiplies the input just before it is quantized. (One ``quantize_per_channel``
    with scales ``scale / m_k`` would be exact too, but it is ~20x slower than a
    multiply plus ``quantize_per_tensor`` on both CPUs we measured.)
    ``input_codes=None`` quantizes each call's input from its own range (dynamic).
    ``takes_codes`` means the input already is uint8 codes (the previous layer
    requantized into them). ``output_codes`` makes the output uint8 codes
    instead of float32.
    """

    def __init__(self, weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 input_codes: Optional[ActivationCodes], activation: str = "none", isa_levels: int = 255):
        super().__init__()
        if activation not in FUSED_ACTIVATIONS and activation not in EPILOGUE_ACTIVATIONS:
            raise ValueError(f"Int8Linear: unknown activation {activation!r}")
        self.out_features, self.in_features = weight_codes.shape
        self.register_buffer("weight_codes", weight_codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().contiguous())
        self.register_buffer("weight_zero_point", torch.zeros(self.out_features, dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())
        self._packed: Optional[torch.Tensor] = None
        self.input_codes = input_codes
        self.activation = activation
        self.isa_levels = isa_levels
        self.takes_codes = False
        self.output_codes: Optional[ActivationCodes] = None
        self.register_buffer("input_multiplier", None)

    @property
    def packed(self) -> torch.Tensor:
        """The weight in oneDNN's blocked layout, made on first use (as large as the int8 weight)."""
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.weight_codes, None)
        return self._packed

    def multiply_input(self, multiplier: torch.Tensor) -> None:
        """Quantize ``x * multiplier`` instead of ``x``."""
        self.register_buffer("input_multiplier", multiplier.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        codes = self.input_codes if self.input_codes is not None else dynamic_codes(x, self.isa_levels)
        if self.takes_codes:
            q = x
        elif self.input_multiplier is not None:
            q = quantize_u8(x * self.input_multiplier, codes)
        else:
            q = quantize_u8(x, codes)
        y = self._gemm(q.reshape(-1, self.in_features), codes)
        return y.reshape(*lead, self.out_features)

    def _gemm(self, q: torch.Tensor, codes: ActivationCodes) -> torch.Tensor:
        post_op, algorithm = FUSED_ACTIVATIONS.get(self.activation, ("none", ""))
        out = self.output_codes
        y = torch.ops.onednn.qlinear_pointwise(
            q, codes.scale, codes.zero_point, self.packed, self.weight_scale, self.weight_zero_point, self.bias,
            out.scale if out else 1.0, out.zero_point if out else 0, torch.uint8 if out else torch.float32,
            post_op, [], algorithm)
        if self.activation not in FUSED_ACTIVATIONS:
            y = EPILOGUE_ACTIVATIONS[self.activation](y)
        if out is not None and out.levels < 255:
            y.clamp_(max=out.levels)
        return y

    def extra_repr(self) -> str:
        source = "codes" if self.takes_codes else ("dynamic" if self.input_codes is None else "float")
        source += " x per-channel multiplier" if self.input_multiplier is not None else ""
        output = "codes" if self.output_codes else "float32"
        return (f"in={self.in_features}, out={self.out_features}, input={source}, output={output}, "
                f"activation={self.activation}, bias={self.bias is not None}")


class Int8Embedding(torch.nn.Module):
    """``embedding(ids, dequant(table))`` that dequantizes only the gathered rows."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
                 padding_idx: int = -1):
        super().__init__()
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.detach().float().reshape(-1, 1).contiguous())
        zp = None if zero_point is None else zero_point.detach().float().reshape(-1, 1).contiguous()
        self.register_buffer("zero_point", zp)
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.codes).float()
        if self.zero_point is not None:
            rows = rows - F.embedding(ids, self.zero_point)
        return rows * F.embedding(ids, self.scale)
