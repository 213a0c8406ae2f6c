"""ONNX translations of the ops fxopt graphs carry that torch.onnx does not translate (or translates loosely).

Imported only by :func:`fxopt.backends.onnx_export.export_onnx`, because it needs
``onnxscript``. Each function is an onnxscript *traced* function: torch.onnx calls
it with ``ir.Value`` tensors and plain Python attributes and records the ONNX ops
it emits. They are passed as ``torch.onnx.export(custom_translation_table=...)``.

- ``quantized_decomposed.quantize_per_tensor``: torchlib emits a bare
  ``QuantizeLinear``, which saturates to the storage type's full range. fxopt's
  x86 codes may be narrower (``int7``: -64..63 on CPUs without VNNI), so when
  ``[quant_min, quant_max]`` is narrower the input is first clipped to
  ``[(quant_min - zp) * scale, (quant_max - zp) * scale]``. Codes then match
  torch's ``clamp(round(x / scale) + zp, quant_min, quant_max)``; the float
  ``Clip`` before a ``QuantizeLinear`` is the ReLU6-style pattern ONNX Runtime
  and TensorRT keep in their int8 fusions.
- ``quantized_decomposed.dequantize_per_tensor``: ``DequantizeLinear`` with a
  float32 scale and a zero point of the storage type (plus ``Cast`` for an
  ``out_dtype``).
- ``fxopt.linear_act`` / ``fxopt.conv_act``: the GEMM or convolution, the bias,
  then the activation in the ONNX ops ONNX Runtime fuses (``Erf`` gelu, etc.).

- ``quantized_decomposed.dequantize_per_channel`` (int8 weights and embedding
  tables): a per-axis ``DequantizeLinear`` as torchlib emits it, but with an
  explicit all-zero int8 zero point where torch passes ``None``: without one,
  ONNX Runtime's QDQ fusions do not recognise the weight (measured with ORT
  1.32: no ``MatMulIntegerToFloat``/``QGemm`` is formed).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.onnx_types import TensorType

from fxopt.ir.ops import fxopt_ops

QD = torch.ops.quantized_decomposed
#: ONNX storage type -> the full code range QuantizeLinear saturates to.
_STORAGE_RANGE = {ir.DataType.INT8: (-128, 127), ir.DataType.UINT8: (0, 255)}


def _constant(value, dtype) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))


def _as_float32(x):
    return x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)


def quantize_per_tensor(input, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: int):
    """clamp(round(x / scale) + zero_point, quant_min, quant_max) as (Clip ->) QuantizeLinear."""
    storage = ir.DataType(dtype)
    x = _as_float32(input)  # torch's kernel upcasts float16/bfloat16 input to float32 too
    if (quant_min, quant_max) != _STORAGE_RANGE.get(storage):
        low, high = (quant_min - zero_point) * scale, (quant_max - zero_point) * scale
        x = op.Clip(x, _constant(low, np.float32), _constant(high, np.float32))
    return op.QuantizeLinear(x, _constant(scale, np.float32), _constant(zero_point, storage.numpy()))


def dequantize_per_tensor(input, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype: int,
                          out_dtype: int = -1):
    """(q - zero_point) * scale as DequantizeLinear (float32), cast to ``out_dtype`` when one is given."""
    storage = ir.DataType(dtype)
    x = op.DequantizeLinear(input, _constant(scale, np.float32), _constant(zero_point, storage.numpy()))
    if out_dtype in (-1, None) or ir.DataType(out_dtype) == ir.DataType.FLOAT:
        return x
    return op.Cast(x, to=ir.DataType(out_dtype))


def dequantize_per_channel(input: TensorType, scales: TensorType, zero_points: Optional[TensorType] = None,
                           axis: int = 0, quant_min: int = 0, quant_max: int = 0, dtype: int = 0, out_dtype: int = -1):
    """(q - zero_points) * scales along ``axis`` as a per-axis DequantizeLinear with an explicit zero point."""
    storage = ir.DataType(dtype)
    if zero_points is None:  # ONNX Runtime's QDQ fusions look for a zero-point input to read the int8 type from
        zero_points = _constant(np.zeros(scales.shape[0]), storage.numpy())
    else:
        zero_points = op.Cast(zero_points, to=storage)
    x = op.DequantizeLinear(input, _as_float32(scales), zero_points, axis=axis)
    if out_dtype in (-1, None) or ir.DataType(out_dtype) == ir.DataType.FLOAT:
        return x
    return op.Cast(x, to=ir.DataType(out_dtype))


# ------------------------------------------------------- fused epilogues
def _gelu(y):
    half, one = _constant(0.5, np.float32), _constant(1.0, np.float32)
    inner = op.Erf(op.Mul(y, _constant(1.0 / math.sqrt(2.0), np.float32)))
    return op.Mul(op.Mul(half, y), op.Add(one, inner))


def _gelu_tanh(y):
    half, one = _constant(0.5, np.float32), _constant(1.0, np.float32)
    cubic = op.Mul(_constant(0.044715, np.float32), op.Mul(op.Mul(y, y), y))
    inner = op.Tanh(op.Mul(_constant(math.sqrt(2.0 / math.pi), np.float32), op.Add(y, cubic)))
    return op.Mul(op.Mul(half, y), op.Add(one, inner))


#: fxopt.ir.ops.EPILOGUE_ACTIVATIONS, in ONNX ops (for float32 tensors).
ACTIVATIONS: Dict[str, Callable] = {
    "relu": lambda y: op.Relu(y),
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda y: op.Mul(y, op.Sigmoid(y)),
}


def _activate(y, activation: str, dtype: ir.DataType):
    """The activation in float32; ``dtype`` is the op's input type (values made while tracing have none)."""
    if activation not in ACTIVATIONS:  # fxopt.linear_act's own kernel rejects it first; kept for safety
        raise ValueError(f"onnx export: unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if dtype == ir.DataType.FLOAT:
        return ACTIVATIONS[activation](y)
    return op.Cast(ACTIVATIONS[activation](op.Cast(y, to=ir.DataType.FLOAT)), to=dtype)


def linear_act(input: TensorType, weight: TensorType, bias: Optional[TensorType] = None, activation: str = ""):
    """activation(input @ weight.T + bias); weight [out, in] as in aten.linear."""
    y = op.MatMul(input, op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, bias)
    return _activate(y, activation, input.dtype)


def conv_act(input: TensorType, weight: TensorType, bias: Optional[TensorType] = None, stride: Sequence[int] = (),
             padding: Sequence[int] = (), dilation: Sequence[int] = (), groups: int = 1, activation: str = ""):
    """activation(convolution(...)): not transposed, no output padding (what fuse-epilogue emits)."""
    inputs = (input, weight) if bias is None else (input, weight, bias)
    y = op.Conv(*inputs, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation), group=groups)
    return _activate(y, activation, input.dtype)


def translation_table() -> Dict[Callable, Callable]:
    """torch op overload -> the translation above, for ``torch.onnx.export(custom_translation_table=...)``."""
    ops = fxopt_ops()
    return {
        QD.quantize_per_tensor.default: quantize_per_tensor,
        QD.dequantize_per_tensor.default: dequantize_per_tensor,
        QD.dequantize_per_channel.default: dequantize_per_channel,
        ops.linear_act.default: linear_act,
        ops.conv_act.default: conv_act,
    }
