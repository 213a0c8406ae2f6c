"""Run an exported ``cuda`` library with the TVM runtime alone, weights fed by name from a ``state_dict``.

    model = load("bert.so")                   # reads bert.params.json beside it
    model.set_params(torch_model.state_dict()) # fp32 weights in; transformed (fp16) once, on the GPU
    out = model(input_ids, attention_mask)     # torch tensors in and out (DLPack, no copies)

Runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, no ``libtvm_compiler.so``) does
not load the CUDA runtime by itself: :func:`load_cuda_runtime` loads
``libtvm_runtime_cuda.so`` with ``RTLD_GLOBAL`` before the library, so its
fatbin finds the ``ffi.Module.load_from_bytes.cuda`` loader. Nothing here
needs the TVM compiler, nvcc or the model's Python source.
"""
from __future__ import annotations

import ctypes
import json
import os
import time
import zlib
from typing import List, Mapping, Optional

import torch

from fxopt.errors import ArtifactError, InputError

PARAMS_FORMAT = "fxopt.tvm_cuda.params/1"


def load_cuda_runtime() -> Optional[str]:
    """Load TVM's CUDA runtime library ``RTLD_GLOBAL`` (needed in runtime-only mode). Returns its path, if found."""
    import tvm

    path = os.path.join(os.path.dirname(tvm.__file__), "lib", "libtvm_runtime_cuda.so")
    if not os.path.exists(path):
        return None
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    return path


def load_extensions(library_path: str, names: List[str]) -> None:
    """Load the shared libraries a library's VM calls into (listed in its manifest), from beside it."""
    from fxopt.backends.tvm_cuda.extension import load_extension

    folder = os.path.dirname(os.path.abspath(library_path))
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ArtifactError(f"{library_path}: its manifest needs {name} beside it, which is missing; copy the "
                                "whole export folder")
        load_extension(path)


def params_json_path(library_path: str) -> str:
    """Where the weight manifest of a library lives: ``model.so`` -> ``model.params.json``."""
    root, ext = os.path.splitext(library_path)
    return (root if ext == ".so" else library_path) + ".params.json"


def tensor_crc32(tensor: torch.Tensor) -> int:
    """crc32 of the tensor's bytes (contiguous, on the CPU): the same value on every machine for the same weights."""
    data = tensor.detach().to("cpu").contiguous()
    return zlib.crc32(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else 0


class CudaModule:
    """A loaded library: a Relax VM on one device, its weight manifest, and (after :meth:`set_params`) the weights."""

    def __init__(self, library_path: str, device: str = "cuda", manifest: Optional[dict] = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # not imported by ``import tvm`` in runtime-only mode

        if manifest is None:
            json_path = params_json_path(library_path)
            manifest = json.load(open(json_path)) if os.path.exists(json_path) else {"params": [], "transform": None}
        if manifest.get("format", PARAMS_FORMAT) != PARAMS_FORMAT:
            raise ArtifactError(f"{library_path}: weight manifest format {manifest.get('format')!r} is not "
                                f"{PARAMS_FORMAT!r}; rebuild the library with this fxopt")
        if device == "cuda":
            load_cuda_runtime()
        start = time.perf_counter()
        load_extensions(library_path, manifest.get("extensions", []))
        self.rt_mod = tvm.runtime.load_module(library_path)
        self.device = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        self.vm = VirtualMachine(self.rt_mod, self.device)
        self.load_seconds = time.perf_counter() - start
        self.torch_device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.manifest = manifest
        self.param_names: List[str] = [p["name"] for p in manifest.get("params", [])]
        self._main = self.vm[manifest.get("entry", "main")]
        self._weights: list = []  # transformed weights, main's arguments after the inputs
        self._called = False
        self.transform_seconds: Optional[float] = None

    # ------------------------------------------------------------- weights
    def crc_mismatches(self, state: Mapping[str, torch.Tensor]) -> List[str]:
        """Names of the weights in ``state`` whose crc32 differs from the one recorded at build time."""
        return [spec["name"] for spec in self.manifest.get("params", [])
                if spec["name"] in state and spec.get("crc32") is not None
                and tensor_crc32(state[spec["name"]]) != spec["crc32"]]

    def set_params(self, state: Mapping[str, torch.Tensor], check_crc: bool = True) -> None:
        """Pass the weights the manifest names (from ``state[name]``) through the transform function, once.

        ``check_crc`` compares each tensor's crc32 with the one recorded at build
        time, so a weight a pass changed under the same name is caught here.
        """
        import tvm

        if self._called:
            # a CUDA graph captured on the first call holds the old weights' addresses
            raise InputError("set_params: the library has run already; load it again to change its weights")
        if not self.param_names:
            self._weights = []
            return
        missing = [n for n in self.param_names if n not in state]
        if missing:
            raise InputError(f"set_params: {len(missing)} weights missing, e.g. {missing[:3]}; pass the model's "
                             "state_dict (keys as in the manifest)")
        args = []
        for spec in self.manifest["params"]:
            tensor = state[spec["name"]].detach()
            if list(tensor.shape) != list(spec["shape"]) or str(tensor.dtype).replace("torch.", "") != spec["dtype"]:
                raise InputError(f"set_params: weight {spec['name']} is {tuple(tensor.shape)} {tensor.dtype}, the "
                                 f"library was built for {tuple(spec['shape'])} {spec['dtype']}")
            if check_crc and spec.get("crc32") is not None and tensor_crc32(tensor) != spec["crc32"]:
                raise InputError(f"set_params: weight {spec['name']} differs from the one the library was built "
                                 "with (crc32); a pass rewrote it, or the model's weights changed")
            args.append(tvm.runtime.from_dlpack(tensor.to(self.torch_device).contiguous()))
        start = time.perf_counter()
        transformed = self.vm[self.manifest["transform"]](args)
        self._weights = [transformed[i] for i in range(len(transformed))]
        self.sync()
        self.transform_seconds = time.perf_counter() - start

    # --------------------------------------------------------------- calls
    def tvm_inputs(self, *inputs: torch.Tensor) -> list:
        """Torch tensors as TVM tensors on this device (zero-copy through DLPack where already there)."""
        import tvm

        return [tvm.runtime.from_dlpack(x.to(self.torch_device).contiguous()) for x in inputs]

    def run_tvm(self, *tvm_inputs):
        """``main`` on TVM tensors: what to time (no conversions)."""
        if self.param_names and not self._weights:
            raise InputError("call: weights are not set; call set_params(model.state_dict()) first")
        self._called = True
        return self._main(*tvm_inputs, *self._weights)

    def __call__(self, *inputs: torch.Tensor):
        return self.to_torch(self.run_tvm(*self.tvm_inputs(*inputs)))

    @staticmethod
    def to_torch(out):
        """A TVM tensor (or tuple of them) as torch tensors sharing its memory."""
        if hasattr(out, "shape"):
            return torch.from_dlpack(out)
        return tuple(torch.from_dlpack(out[i]) for i in range(len(out)))

    def sync(self) -> None:
        self.device.sync()


def load(library_path: str, device: str = "cuda") -> CudaModule:
    """Load an exported library (and its ``.params.json``, if any) on ``device`` ("cuda" or "cpu")."""
    return CudaModule(library_path, device)


__all__ = ["CudaModule", "load", "load_cuda_runtime", "load_extensions", "params_json_path", "tensor_crc32"]
