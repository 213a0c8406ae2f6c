"""The ``cuda`` backend: lower an fxopt Graph to TVM Relax and build it for NVIDIA GPUs (TVM 0.27).

TVM is imported lazily, inside the functions, so ``import fxopt`` never needs it.
"""
from fxopt.backends.tvm_cuda.lower import (
    DTYPES, TARGET, CudaLibrary, build, check_supported, cuda_pipeline, cuda_target, exported_program, to_relax,
)

__all__ = [
    "TARGET", "DTYPES", "CudaLibrary", "build", "to_relax", "exported_program", "check_supported", "cuda_target",
    "cuda_pipeline",
]
