"""The ``cuda`` backend: lower an fxopt Graph to TVM Relax and build it for NVIDIA GPUs (TVM 0.27).

TVM is imported lazily, inside the functions, so ``import fxopt`` never needs it.
"""
from fxopt.backends.tvm_cuda.lower import (
    DTYPES, TARGET, TRANSFORM_PARAMS, CudaLibrary, ParamSpec, build, check_supported, cuda_pipeline, cuda_target,
    exported_program, params_json_path, prepare, to_relax,
)

__all__ = [
    "TARGET", "DTYPES", "CudaLibrary", "build", "to_relax", "exported_program", "check_supported", "cuda_target",
    "cuda_pipeline", "prepare", "ParamSpec", "TRANSFORM_PARAMS", "params_json_path",
]
