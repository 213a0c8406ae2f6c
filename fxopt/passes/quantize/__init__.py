"""Quantization: observers, calibration (``fxopt.calibrate``) and the ``insert-qdq`` pass."""
from fxopt.passes.quantize.calibrate import activation_inputs, calibrate, quantizable_ops
from fxopt.passes.quantize.insert_qdq import InsertQDQ
from fxopt.passes.quantize.observers import (
    OBSERVERS, QDTYPES, MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, Observer, PercentileObserver,
    fake_quantize, make_observer, qparams_from_range,
)

__all__ = [
    "calibrate", "activation_inputs", "quantizable_ops", "InsertQDQ", "Observer", "MinMaxObserver",
    "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver", "OBSERVERS", "QDTYPES", "make_observer",
    "qparams_from_range", "fake_quantize",
]
