"""What :func:`fxopt.backends.tvm_cuda.lower.build` returns: a CUDA library and the weights it takes at run time."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from fxopt.backends.tvm_cuda.runtime import PARAMS_FORMAT, params_json_path

#: The function ``LiftTransformParams`` makes from ``main``: fp32 weights in, transformed weights out.
TRANSFORM_PARAMS = "main_transform_params"


@dataclass(frozen=True)
class ParamSpec:
    """One weight the library takes at run time: its ``state_dict`` key, shape, dtype and a crc32 of its bytes."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    crc32: Optional[int] = None

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "crc32": self.crc32}

@dataclass
class CudaLibrary:
    """A built model: the Relax VM executable and its kernels compiled to a fatbin.

    ``executable`` holds the host code (LLVM) and a CUDA module that carries the
    CUDA *source*; ``fatbin`` is that source compiled by nvcc at build time, and
    :meth:`export` writes it into the library in place of the source.
    """

    executable: object  # tvm.runtime.Executable
    target: object  # tvm.target.Target
    cuda_source: str
    fatbin: Optional[bytes]
    #: graph input names, in ``main``'s order
    input_names: List[str] = field(default_factory=list)
    #: the weights ``main_transform_params`` takes, in order; empty when weights are embedded
    params: List[ParamSpec] = field(default_factory=list)
    #: shared libraries the VM calls into (the cuBLASLt extension); loaded before the library
    extensions: List[str] = field(default_factory=list)

    @property
    def param_names(self) -> List[str]:
        """The ordered weight names (``state_dict`` keys) the runtime must pass; empty when weights are embedded."""
        return [p.name for p in self.params]

    @property
    def params_as_input(self) -> bool:
        return bool(self.params)

    def params_manifest(self) -> dict:
        """What a runtime needs to call the library: entry points, input names and the weights in order."""
        return {
            "format": PARAMS_FORMAT, "entry": "main", "transform": TRANSFORM_PARAMS if self.params else None,
            "inputs": list(self.input_names), "params": [p.to_json() for p in self.params],
            "extensions": [os.path.basename(e) for e in self.extensions],
        }

    def export(self, path: str) -> str:
        """Write a shared library that ``tvm.runtime.load_module`` loads without a CUDA compiler.

        With weights as inputs, or extensions, also write :func:`params_json_path`
        (``model.params.json``) beside it; extensions are copied beside it too.
        """
        from fxopt.backends.tvm_cuda.device_binary import export_library

        export_library(self.executable, path, {self.cuda_source: self.fatbin} if self.fatbin else {})
        for extension in self.extensions:
            shutil.copyfile(extension, os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(extension)))
        if self.params or self.extensions:
            with open(params_json_path(path), "w") as f:
                json.dump(self.params_manifest(), f, indent=1)
        return path

