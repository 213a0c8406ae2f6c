"""The x86 int8 backend: a quantized Graph on oneDNN's int8 kernels, chosen for the CPU's ISA."""
from fxopt.backends.x86_int8.isa import Isa, detect_isa
from fxopt.backends.x86_int8.kernels import ActivationCodes, Int8Embedding, Int8Linear
from fxopt.backends.x86_int8.lower import TARGET, LoweringReport, X86Int8Module, load, lower

__all__ = ["Isa", "detect_isa", "ActivationCodes", "Int8Linear", "Int8Embedding", "LoweringReport",
           "X86Int8Module", "TARGET", "load", "lower"]
