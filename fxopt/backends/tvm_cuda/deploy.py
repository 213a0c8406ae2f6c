"""The ``cuda`` target of ``fxopt.optimize``: build once, run on a GPU, save and load as an artifact.

    optimized = fxopt.optimize(model, inputs, target="cuda")   # TVM build here, GPU or not
    optimized.save("bert-cuda")      # manifest, graph, weights + model.so, its params json, the cuBLASLt extension
    fxopt.load("bert-cuda")(*inputs) # on a GPU machine: no compiler, no model source

The build is the configuration measured fastest on the H100
(benchmarks/results/gpu_bert_norm_act.md): float16 compute, cuBLASLt GEMMs and
fxopt's attention / LayerNorm / GELU kernels, CUDA graphs, weights as inputs
(read from the artifact's ``weights.safetensors`` and transformed once on load).
Code generation needs nvcc but no GPU; running needs a GPU and raises
:class:`DeviceError` without one, naming what to do.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.utils import _pytree as pytree

from fxopt.errors import ArtifactError, DeviceError
from fxopt.ir.graph import Graph

TARGET = "cuda"
LIBRARY = "model.so"
#: What optimize(target="cuda") builds with (benchmarks/results/gpu_bert_norm_act.md: the fastest measured).
BUILD_OPTIONS = {"dtype": "float16", "arch": "sm_90", "cuda_graph": True, "keep_params_as_input": True,
                 "matmul": "cublaslt"}


class CudaTarget:
    """A built library, callable like the model once a GPU is there (loaded lazily, on the first call)."""

    def __init__(self, graph: Graph, library_dir: str, owns_dir: bool = True):
        self.graph = graph
        self.library_dir = library_dir
        self._owns_dir = owns_dir
        self._module = None

    @property
    def library_path(self) -> str:
        return os.path.join(self.library_dir, LIBRARY)

    def __call__(self, *inputs: torch.Tensor):
        self.graph.check_inputs(inputs)
        module = self._loaded()
        out = module(*inputs)
        leaves = list(out) if isinstance(out, tuple) else [out]
        return _as_model_output(self.graph, leaves)

    def _loaded(self):
        if self._module is None:
            require_gpu()
            from fxopt.backends.tvm_cuda.runtime import load
            module = load(self.library_path)
            module.set_params(self.graph.params(), check_crc=True)
            self._module = module
        return self._module

    def files(self) -> Dict[str, Path]:
        """The backend files an artifact carries: the library, its weight manifest and the extension(s)."""
        return {name: Path(self.library_dir) / name for name in sorted(os.listdir(self.library_dir))}

    def __del__(self):
        if self._owns_dir:
            shutil.rmtree(self.library_dir, ignore_errors=True)


def _as_model_output(graph: Graph, leaves: list):
    """The library's flat outputs in the structure the model returns (a dict, a tuple, one tensor)."""
    info = getattr(graph.fx_graph._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:
        return pytree.tree_unflatten(leaves, info.out_spec)
    return leaves[0] if len(leaves) == 1 else tuple(leaves)


def require_gpu() -> None:
    if not torch.cuda.is_available():
        raise DeviceError("cuda: no CUDA device on this machine (torch.cuda.is_available() is False); the library "
                          "was built and can be saved with .save(dir): load it with fxopt.load(dir) on a machine "
                          "with an NVIDIA GPU (sm_90 by default), or optimize for target='x86-int8' or 'eager'")


def build_target(graph: Graph, **options) -> CudaTarget:
    """Build ``graph`` with :data:`BUILD_OPTIONS` (overridable) and export it to a fresh directory."""
    from fxopt.backends.tvm_cuda.lower import build
    library = build(graph, **{**BUILD_OPTIONS, **options})
    directory = tempfile.mkdtemp(prefix="fxopt-cuda-")
    library.export(os.path.join(directory, LIBRARY))
    return CudaTarget(graph, directory)


def load_target(graph: Graph, directory: str) -> CudaTarget:
    """The runner of a saved ``cuda`` artifact (its files already verified by the artifact loader)."""
    if not os.path.exists(os.path.join(directory, LIBRARY)):
        raise ArtifactError(f"{directory}: a cuda artifact needs {LIBRARY}, which is missing; save it again")
    return CudaTarget(graph, str(directory), owns_dir=False)


def build_summary(target: CudaTarget) -> Dict[str, Optional[int]]:
    return {"library_bytes": os.path.getsize(target.library_path),
            "files": sorted(os.listdir(target.library_dir)), **{k: v for k, v in BUILD_OPTIONS.items()}}
