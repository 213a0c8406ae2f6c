"""Quantization: observers, calibration (``fxopt.calibrate``) and the quantization passes
(insert-qdq, smooth-quant, mixed-precision, quantize-fp8, quantize-int8)."""
from fxopt.passes.quantize.calibrate import activation_inputs, calibrate, quantizable_ops
from fxopt.passes.quantize.insert_qdq import InsertQDQ
from fxopt.passes.quantize.smooth_quant import SmoothQuant, calibrate_smoothed
from fxopt.passes.quantize.to_half import ToBFloat16, ToHalf
from fxopt.passes.quantize.half_weights import HalfWeights
from fxopt.passes.quantize.fp8 import QuantizeFp8
from fxopt.passes.quantize.int8 import QuantizeInt8
from fxopt.passes.quantize.int4_linear import Int4Linear
from fxopt.passes.quantize.mixed_precision import MixedPrecision, choose_float_layers, sensitivity
from fxopt.passes.quantize.observers import (
    OBSERVERS, QDTYPES, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, Observer, PercentileObserver,
    fake_quantize, make_observer, qparams_from_range,
)

__all__ = [
    "calibrate", "activation_inputs", "quantizable_ops", "InsertQDQ", "Observer", "MinMaxObserver",
    "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver", "OBSERVERS", "QDTYPES", "make_observer",
    "qparams_from_range", "fake_quantize", "SmoothQuant", "calibrate_smoothed",
    "ToHalf", "ToBFloat16", "HalfWeights", "QuantizeFp8", "QuantizeInt8", "Int4Linear",
    "MixedPrecision", "sensitivity", "choose_float_layers",
]
