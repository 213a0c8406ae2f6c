"""fxopt's CUDA extension: vendor GEMMs (cuBLASLt), fused attention, LayerNorm and GELU kernels, called from TVM Relax.

TVM 0.27's PyPI wheel has no cuBLAS, CUTLASS or FlashInfer code generation,
and dlight's WMMA schedules reach 28-56 TFLOP/s on BERT's GEMMs where cuBLAS
reaches ~470 (``benchmarks/results/gpu_gemm.md``). So ``build(graph,
matmul="cublaslt")`` calls, through ``R.call_dps_packed``, TVM-FFI functions
that this module compiles from the sources beside it:

- ``cublaslt_gemm.cc``: ``fxopt.cublaslt.matmul[_bias]``, cuBLASLt on TVM's
  current stream (so the VM's CUDA graphs capture it), the fastest of
  cuBLASLt's candidates timed once per shape; its fp8 and int8 GEMMs too;
- ``quantize_rows.cu``: ``fxopt.fp8.quantize_rows`` and ``fxopt.int8.quantize_rows``,
  per-row absmax scales and codes; ``int8_dequantize.cu``: ``fxopt.int8.dequantize[_bias]``,
  the int8 GEMM's int32 sums scaled per row and column, plus the bias, to float16;
- ``attention.cu``: ``fxopt.attention[_bias]``, softmax(Q Kᵀ·scale + bias) V
  in one tensor-core kernel;
- ``norm_act.cu``: ``fxopt.layer_norm``, ``fxopt.add_layer_norm[_sum]`` (residual add + LayerNorm in
  one pass, fp32 statistics, optionally writing the sum for pre-LN models) and ``fxopt.gelu[_tanh]``;
- ``cusparselt_gemm.cc``: ``fxopt.cusparselt.*``, the 2:4 sparse GEMM of cuSPARSELt, which it opens at run
  time (dlopen, :mod:`fxopt.backends.tvm_cuda.cusparselt`): no link-time dependency, so the extension builds
  and loads where cuSPARSELt is absent, and only its 2:4 calls fail there.

:func:`extension_path` compiles them with nvcc once, cached by a hash of the
sources; the exported library lists the extension in its manifest, and
:func:`load_extension` loads it (and ``libcublasLt.so.13``) before the VM,
with no compiler on the machine that runs it. The cuBLASLt headers and library
come from the ``nvidia-cublas`` wheel (a dev dependency here; PyTorch's CUDA
builds install it on GPU machines).
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

from fxopt.errors import ArtifactError, LoweringError

HERE = os.path.dirname(__file__)
SOURCES = [os.path.join(HERE, name) for name in ("cublaslt_gemm.cc", "attention.cu", "norm_act.cu", "quantize_rows.cu",
                                                  "int8_dequantize.cu", "int4_gemm.cu", "cusparselt_gemm.cc")]
#: Headers the sources include: part of the cache key, not compiled on their own
HEADERS = [os.path.join(HERE, name) for name in ("attention_kernel.cuh", "quantize_codes.cuh", "tensor_view.h",
                                                  "cusparselt_api.h")]
EXTENSION_NAME = "libfxopt_cuda_ext.so"
CUBLASLT_SONAME = "libcublasLt.so.13"
#: SASS for Ampere and Hopper, plus PTX that newer GPUs compile at load time
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]"]


def nvidia_dirs(kind: str) -> List[str]:
    """``include`` or ``lib`` folders of the ``nvidia-*`` wheels (cu13 layout first, then the cu12 one)."""
    found = []
    for root in sys.path:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cu13", kind)))
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cublas", kind)))
    return [d for d in found if os.path.isdir(d)]


def _cublas_dir(kind: str, marker: str) -> str:
    for folder in nvidia_dirs(kind):
        if os.path.exists(os.path.join(folder, marker)):
            return folder
    raise LoweringError(
        f"tvm-cuda: matmul='cublaslt' needs {marker} from the nvidia-cublas wheel; "
        "pip install 'nvidia-cublas>=13,<14' (or build with matmul='default')"
    )


def cache_dir() -> str:
    """Where compiled extensions are kept: ``$FXOPT_CACHE_DIR`` or ``~/.cache/fxopt``."""
    return os.environ.get("FXOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxopt")


def extension_path() -> str:
    """The compiled extension, built with nvcc on first use and cached by a hash of its inputs."""
    import tvm_ffi

    ffi_root = os.path.dirname(tvm_ffi.__file__)
    include = [os.path.join(ffi_root, "include"), _cublas_dir("include", "cublasLt.h")]
    libs = [_cublas_dir("lib", CUBLASLT_SONAME), os.path.join(ffi_root, "lib")]
    digest = hashlib.sha256(repr((include, libs, GENCODE, tvm_ffi.__version__)).encode())
    for source in SOURCES + HEADERS:
        with open(source, "rb") as f:
            digest.update(f.read())
    path = os.path.join(cache_dir(), f"cuda-ext-{digest.hexdigest()[:16]}", EXTENSION_NAME)
    if not os.path.exists(path):
        _compile(path, include, libs)
    return path


def _compile(path: str, include: List[str], libs: List[str]) -> None:
    if shutil.which("nvcc") is None:
        raise LoweringError("tvm-cuda: matmul='cublaslt' compiles its extension with nvcc, which is not on PATH; "
                            "install the CUDA toolkit")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    command = ["nvcc", "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17", *GENCODE, *SOURCES, "-o", tmp,
               *[f"-I{d}" for d in include], *[f"-L{d}" for d in libs],
               f"-l:{CUBLASLT_SONAME}", "-lcudart", "-ltvm_ffi", "-ldl"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise LoweringError(f"tvm-cuda: compiling fxopt's CUDA extension failed: {done.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a concurrent build sees no file or the whole one


#: Extensions loaded in this process: file name -> sha256. Their ``fxopt.*`` functions are process-global,
#: and TVM aborts the process if one is registered twice, so each is loaded once.
_LOADED: Dict[str, str] = {}


def load_extension(path: str) -> None:
    """Load ``libcublasLt`` and then the extension ``RTLD_GLOBAL``, registering its ``fxopt.*`` functions.

    Loading the same extension again (another artifact's copy) is a no-op; a *different* build of it
    cannot join a process that has one (its functions would be registered twice): ArtifactError.
    """
    name, digest = os.path.basename(path), _sha256(path)
    if name in _LOADED:
        if _LOADED[name] != digest:
            raise ArtifactError(f"{path}: another build of {name} is already loaded in this process (from an "
                                "artifact built by another fxopt); load artifacts built by one fxopt version "
                                "per process, or rebuild them")
        return
    _load_cublaslt(path)
    ctypes.CDLL(os.path.abspath(path), mode=ctypes.RTLD_GLOBAL)
    _LOADED[name] = digest


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _load_cublaslt(path: str) -> None:
    try:
        ctypes.CDLL(CUBLASLT_SONAME, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        found = [p for p in (os.path.join(d, CUBLASLT_SONAME) for d in nvidia_dirs("lib")) if os.path.exists(p)]
        if not found:
            raise ArtifactError(f"{path}: needs {CUBLASLT_SONAME}, which is neither on the library path nor in an "
                                "nvidia-cublas wheel; pip install 'nvidia-cublas>=13,<14'") from None
        ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)
