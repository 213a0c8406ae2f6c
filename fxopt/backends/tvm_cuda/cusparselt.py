"""2:4 semi-structured sparse linears on the GPU: fxopt's cuSPARSELt binding (``cusparselt_gemm.cc``), for torch.

The extension opens cuSPARSELt at run time, so the library is needed only where a 2:4 GEMM runs. It comes from
the ``nvidia-cusparselt-cu13`` wheel, which PyTorch's CUDA 13 builds install (0.8.1 with torch 2.11):
:func:`library_path` finds it there, or takes ``$FXOPT_CUSPARSELT_LIBRARY``.

The weight is pruned and compressed once; each call is then ``y = x @ W^T (+ bias)``::

    ext = Sparse24(extension_path)                 # loads the extension and cuSPARSELt
    w24 = ext.prune(weight)                        # [N, K] fp16/bf16 -> 2 of every 4 along K kept (largest magnitudes)
    packed = ext.compress(w24)                     # uint8, about 9/16 of w24's bytes
    y = ext.linear(x, packed, w24.shape[0], bias)  # x [..., K] -> y [..., N]

The first call of each shape (M, N, K, dtype, bias) plans it, so time after a warm-up, and never plan inside a
CUDA graph capture. Plans use cuSPARSELt's default algorithm; ``FXOPT_CUSPARSELT_SEARCH=1`` makes the first call
run cuSPARSELt's algorithm search on its operands instead (:meth:`Sparse24.search_log` tells the outcome), which
with cuSPARSELt 0.8.0 on the H100 ended in an illegal instruction (benchmarks/results/gpu_sparse24.md). M, the
rows of x, must be a multiple of 8; N and K multiples of 16.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

from fxopt.backends.tvm_cuda import extension_calls
from fxopt.errors import DeviceError

SONAME = "libcusparseLt.so.0"
PRUNE = "fxopt.cusparselt.prune"
IS_PRUNED = "fxopt.cusparselt.is_pruned"
COMPRESSED_BYTES = "fxopt.cusparselt.compressed_bytes"
COMPRESS = "fxopt.cusparselt.compress"
GEMM = extension_calls.SPARSE24_GEMM
GEMM_BIAS = extension_calls.SPARSE24_GEMM_BIAS
LOAD = "fxopt.cusparselt.load"
SEARCH_LOG = "fxopt.cusparselt.search_log"
FORM = "fxopt.cusparselt.form"


def wheel_library_paths() -> List[str]:
    """``libcusparseLt.so.0`` in the ``nvidia-cusparselt-cu13`` wheels on sys.path (0.8's layout, then 0.9+'s)."""
    found = []
    for root in sys.path:
        for sub in ("cusparselt", "cu13"):
            path = os.path.join(root, "nvidia", sub, "lib", SONAME)
            if os.path.exists(path):
                found.append(path)
    return found


def library_path() -> Optional[str]:
    """``$FXOPT_CUSPARSELT_LIBRARY``, else the first wheel's library, else None (the loader's search path)."""
    env = os.environ.get("FXOPT_CUSPARSELT_LIBRARY")
    if env:
        return env
    found = wheel_library_paths()
    return found[0] if found else None


def load_library() -> int:
    """Open cuSPARSELt in the loaded extension; its version (``major * 1000 + minor * 100 + patch``, 801 for
    0.8.1). DeviceError, saying what to install, where it cannot be opened."""
    import tvm_ffi

    path = library_path() or SONAME
    try:
        return int(tvm_ffi.get_global_func(LOAD)(path))
    except Exception as exc:  # noqa: BLE001  (tvm_ffi raises RuntimeError; re-raised as fxopt's)
        raise DeviceError(f"tvm-cuda: 2:4 sparse GEMMs need cuSPARSELt: {exc}") from None


class Sparse24:
    """The extension's 2:4 functions on torch tensors (tvm_ffi passes them through DLPack, no copy)."""

    def __init__(self, extension_path: str):
        import tvm_ffi

        from fxopt.backends.tvm_cuda import extension

        extension.load_extension(extension_path)
        self.version = load_library()
        self._f = {name: tvm_ffi.get_global_func(name)
                   for name in (PRUNE, IS_PRUNED, COMPRESSED_BYTES, COMPRESS, GEMM, GEMM_BIAS, SEARCH_LOG)}
        #: how the GEMM is put to cuSPARSELt ($FXOPT_CUSPARSELT_FORM, cusparselt_gemm.cc): "col" by default;
        #: under "torch" (a diagnosis form) linear's out holds y^T, [N, M] row-major
        self.form = str(tvm_ffi.get_global_func(FORM)())

    def prune(self, weight):
        """``weight`` [N, K] with the two smaller magnitudes of every four along K set to zero (cuSPARSELt's)."""
        out = weight.new_empty(weight.shape)
        self._f[PRUNE](weight.contiguous(), out)
        return out

    def is_pruned(self, weight) -> bool:
        return bool(self._f[IS_PRUNED](weight.contiguous()))

    def compress(self, weight):
        """The 2:4 ``weight`` [N, K] packed for cuSPARSELt (values and metadata), a uint8 tensor."""
        import torch

        weight = weight.contiguous()
        out = torch.empty(int(self._f[COMPRESSED_BYTES](weight)), dtype=torch.uint8, device=weight.device)
        self._f[COMPRESS](weight, out)
        return out

    def linear(self, x, packed, out_features: int, bias=None, out=None):
        """``x @ W^T (+ bias)`` with W the compressed [out_features, K] weight; into ``out`` when given."""
        if out is None:
            out = x.new_empty(*x.shape[:-1], out_features)
        if bias is None:
            self._f[GEMM](x, packed, out)
        else:
            self._f[GEMM_BIAS](x, packed, bias, out)
        return out

    def search_log(self) -> str:
        return str(self._f[SEARCH_LOG]())
