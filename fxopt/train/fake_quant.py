"""Fake quantization with straight-through gradients: what a QAT graph runs in place of Q/DQ pairs.

    %fq = fake_quantize_activation(%x, 0.02, -3, -128, 127, torch.int8)
    %fq_w = fake_quantize_weight(%w, 0)

The forward passes call the very ``quantized_decomposed`` ops that insert-qdq
emits, with the same arguments, so a QAT graph computes bit for bit what its
Q/DQ graph computes. The backward passes are straight-through estimators:

- an activation's gradient passes where the input lay inside the quantized
  range ``[(qmin - zp) * scale, (qmax - zp) * scale]`` and is zero where it was
  clipped (the clipped STE of PyTorch's ``FakeQuantize``);
- a weight is quantized symmetrically per output channel with the scale taken
  from its current abs-max (``quantize_weight_per_channel``, exactly what
  insert-qdq and the QAT freeze compute), so nothing is clipped and the
  gradient passes unchanged.

These are plain Python functions, not ``torch.library`` ops: a QAT graph is a
training-time object that is frozen back to Q/DQ before it is exported or lowered.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from fxopt.passes.quantize.insert_qdq import INT8, quantize_weight_per_channel

QD = torch.ops.quantized_decomposed
Number = Union[float, int, torch.Tensor]


class _StraightThrough(torch.autograd.Function):
    """Forward: ``quantize_dequantize(x)``. Backward: the gradient of ``x`` where ``inside`` holds, else 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantize_dequantize: Callable, inside: Optional[torch.Tensor]):
        ctx.input_dtype = x.dtype
        ctx.save_for_backward(inside)
        return quantize_dequantize(x.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        if inside is not None:
            grad = grad.masked_fill(~inside, 0)
        return grad.to(ctx.input_dtype), None, None


def _dtype_kwargs(out_dtype: Optional[torch.dtype]) -> dict:
    return {} if out_dtype is None else {"out_dtype": out_dtype}


def fake_quantize_activation(x: torch.Tensor, scale: Number, zero_point: Number, qmin: int, qmax: int,
                             qdtype: torch.dtype, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``dequantize_per_tensor(quantize_per_tensor(x, ...), ...)`` with a clipped straight-through gradient.

    ``scale`` and ``zero_point`` are numbers (static) or tensors computed at run time (dynamic, the
    ``.tensor`` overloads), as in the Q/DQ pair this replaces.
    """
    overload = "tensor" if isinstance(scale, torch.Tensor) else "default"
    quantize = getattr(QD.quantize_per_tensor, overload)
    dequantize = getattr(QD.dequantize_per_tensor, overload)

    def quantize_dequantize(v: torch.Tensor) -> torch.Tensor:
        codes = quantize(v, scale, zero_point, qmin, qmax, qdtype)
        return dequantize(codes, scale, zero_point, qmin, qmax, qdtype, **_dtype_kwargs(out_dtype))

    inside = None
    if x.requires_grad:
        lo, hi = (qmin - zero_point) * scale, (qmax - zero_point) * scale
        inside = (x >= lo) & (x <= hi)
    return _StraightThrough.apply(x, quantize_dequantize, inside)


def fake_quantize_weight(weight: torch.Tensor, axis: int, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Symmetric int8 per-channel quantize-dequantize of ``weight`` along ``axis``, identity gradient."""

    def quantize_dequantize(w: torch.Tensor) -> torch.Tensor:
        codes, q = quantize_weight_per_channel(w, axis)
        return QD.dequantize_per_channel(codes, q.scale, None, axis, INT8.qmin, INT8.qmax, torch.int8,
                                         **_dtype_kwargs(out_dtype))

    return _StraightThrough.apply(weight, quantize_dequantize, None)
