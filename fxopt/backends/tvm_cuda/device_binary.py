"""CUDA kernels as a binary: compile TVM's CUDA source with nvcc at build time and export it.

Why this exists. In TVM 0.27 the CUDA codegen hands its *source* to the factory
``ffi.Module.create.cuda``, which lives in ``libtvm_runtime_cuda.so``. On a
machine without a GPU driver that library is not loaded, so the codegen falls
back to a ``CUDAFallbackModuleNode`` that keeps the source (fmt ``"cuda"``) and
``export_library`` writes that source into the ``.so``. The loader then compiles
it through the Python global ``tvm_callback_cuda_compile`` at *load* time,
which a runtime-only deployment does not have.

The serialized CUDA module is ``[str fmt][fmap][bytes code]``, and the loader
only compiles when ``fmt == "cuda"``. So at export we pack the import tree
ourselves (``runtime.ModulePackImportsToTensor``), swap each CUDA module's
``("cuda", source)`` for ``("fatbin", nvcc output)``, and link the blob with
``codegen.codegen_blob``, through ``export_library``'s ``fpack_imports`` hook.
"""
from __future__ import annotations

import contextlib
import ctypes
import inspect
import os
import shutil
import struct
from typing import Collection, Dict, List, Optional, Tuple

from fxopt.errors import LoweringError

FATBIN_MAGIC = b"\x50\xed\x55\xba"  # 0xBA55ED50, little-endian
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190

Entry = Tuple[str, Optional[bytes]]  # (module kind, payload); "_lib" (the host DSO) has no payload


# ----------------------------------------------------- tensor intrinsics
def preload_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` with ``inspect.getmodule`` memoized: ~6 s instead of 1-2 min.

    dlight's Matmul rule imports these tensor-core intrinsics lazily. Each one is
    TVMScript, parsed with ``inspect.stack()``, which calls ``inspect.getmodule``
    for every frame whose file does not exist (``<frozen importlib...>`` while
    importing) and that scans all of ``sys.modules``: 50 s without torch, 120 s
    with torch and transformers imported. Memoizing per file is exact here.
    """
    import sys

    if "tvm.s_tir.tensor_intrin.cuda" in sys.modules:
        return
    with _memoized_getmodule():
        import tvm.s_tir.tensor_intrin.cuda  # noqa: F401


@contextlib.contextmanager
def _memoized_getmodule():
    original = inspect.getmodule
    cache: dict = {}

    def getmodule(obj, _filename=None):
        code = getattr(obj, "f_code", None)
        if code is None:  # not a frame: keep the original behaviour
            return original(obj, _filename)
        key = _filename or code.co_filename
        if key not in cache:
            cache[key] = original(obj, _filename)
        return cache[key]

    inspect.getmodule = getmodule
    try:
        yield
    finally:
        inspect.getmodule = original


# ------------------------------------------------------------ compiling
def cuda_modules(executable) -> list:
    """Every CUDA module in the executable's import tree."""
    found, stack = [], [executable.mod if hasattr(executable, "mod") else executable]
    while stack:
        module = stack.pop()
        found += [module] if module.kind == "cuda" else []
        stack.extend(module.imports)
    return found


def cuda_source(executable) -> str:
    """The generated CUDA C++ of the executable's kernels (one CUDA module per build)."""
    modules = cuda_modules(executable)
    if len(modules) != 1:
        raise LoweringError(f"tvm-cuda: expected one CUDA module in the build, found {len(modules)}")
    return modules[0].inspect_source("cuda") or modules[0].inspect_source()


def compile_fatbin(source: str, target, fast_math: bool = False) -> bytes:
    """nvcc ``--fatbin -arch=<target arch>``: SASS for that arch plus its PTX, so newer GPUs can JIT it.

    TVM passes ``--use_fast_math`` unless ``TVM_CUDA_NVCC_NO_FAST_MATH`` is set;
    fast math turns ``powf`` into ``exp2(y * log2(x))`` (NaN for x < 0), flushes
    denormals and approximates ``expf`` and division, so it is opt-in here.
    """
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise LoweringError(
            "tvm-cuda: nvcc is not on PATH; install the CUDA toolkit, or build with compile_kernels=False "
            "(the library then needs a CUDA compiler where it is loaded)"
        )
    arch = str(target.attrs["arch"])
    with target, _environ("TVM_CUDA_NVCC_NO_FAST_MATH", None if fast_math else "1"):
        try:  # compile_cuda reads the compute version from the current target
            return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=arch, compiler="nvcc"))
        except RuntimeError as exc:
            raise LoweringError(f"tvm-cuda: nvcc failed for {arch}: {str(exc)[-2000:]}") from exc


@contextlib.contextmanager
def _environ(name: str, value: Optional[str]):
    """Set (or, for None, unset) one environment variable for the duration of the block."""
    old = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


# -------------------------------------------------------------- export
def export_library(executable, path: str, binaries: Dict[str, bytes]) -> str:
    """``executable.export_library(path)`` with each CUDA source in ``binaries`` replaced by its fatbin."""
    if not binaries:
        executable.export_library(path)
        return path

    def pack_imports(mod, is_system_lib, prefix, workspace_dir):
        import tvm

        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        blob = replace_cuda_code(blob, binaries)
        obj = tvm.get_global_func("codegen.codegen_blob")(blob, is_system_lib, _llvm_target(mod), prefix)
        out = os.path.join(workspace_dir, f"{prefix}devc.o")
        obj.write_to_file(out)
        return out

    executable.export_library(path, fpack_imports=pack_imports)
    return path


def _llvm_target(mod) -> str:
    stack = [mod]
    while stack:
        module = stack.pop()
        if module.kind == "llvm":
            return module.get_function("_get_target_string")()
        stack.extend(module.imports)
    raise LoweringError("tvm-cuda: the build has no LLVM host module to link the kernels into")


def replace_cuda_code(blob: bytes, binaries: Dict[str, bytes]) -> bytes:
    """Swap ``(fmt="cuda", code=source)`` for ``("fatbin", binary)`` in every CUDA entry of a packed blob."""
    rows, children, entries = split_blob(blob)
    expected = {source.encode("utf-8") for source in binaries}
    for i, (kind, payload) in enumerate(entries):
        if kind != "cuda":
            continue
        fmt, fmap, code = split_cuda_payload(payload, expected)
        source = code.decode("utf-8", errors="replace")
        if fmt != "cuda" or source not in binaries:
            raise LoweringError(f"tvm-cuda: CUDA module {i} holds {fmt!r} code that was not compiled at build time")
        entries[i] = (kind, _str(b"fatbin") + fmap + _str(binaries[source]))
    return join_blob(rows, children, entries)


# --------------------------------------------------- blob (de)serialization
# PackImportsToBytes: [u64 nbytes][vec<u64> row_ptr][vec<u64> child_indices]
# then per module [str kind] + [str payload] unless kind == "_lib". A str or vec is [u64 n][n items].
def split_blob(blob: bytes) -> Tuple[List[int], List[int], List[Entry]]:
    """Parse a packed import blob (with its 8-byte length header) into the import tree and module entries."""
    (nbytes,) = struct.unpack_from("<Q", blob, 0)
    if nbytes != len(blob) - 8:
        raise LoweringError(f"tvm-cuda: packed module blob says {nbytes} bytes, holds {len(blob) - 8}")
    reader = _Reader(blob, 8)
    rows, children = reader.u64s(), reader.u64s()
    entries: List[Entry] = []
    for _ in range(len(rows) - 1):
        kind = reader.string().decode()
        entries.append((kind, None if kind == "_lib" else reader.string()))
    return rows, children, entries


def join_blob(rows: List[int], children: List[int], entries: List[Entry]) -> bytes:
    body = _u64s(rows) + _u64s(children)
    for kind, payload in entries:
        body += _str(kind.encode()) + (b"" if payload is None else _str(payload))
    return struct.pack("<Q", len(body)) + body


def split_cuda_payload(payload: bytes, expected: Collection[bytes] = ()) -> Tuple[str, bytes, bytes]:
    """A CUDA module's bytes ``[str fmt][fmap][str code]`` -> (fmt, raw fmap bytes, code).

    The fmap's layout is TVM-internal, so the code is found from the end: a
    ``u64 n`` that makes ``payload[-n:]`` exactly the code. More than one can
    fit: eight bytes of the fmap's small binary numbers can read as the length of
    what follows them (seen in a build). Among the fits, the one whose code is
    in ``expected`` wins (the sources the build compiled); without one, the first.
    """
    reader = _Reader(payload, 0)
    fmt = reader.string().decode()
    fits = [start for start in range(reader.offset, len(payload) - 7)
            if start + 8 + struct.unpack_from("<Q", payload, start)[0] == len(payload)]
    if not fits:
        raise LoweringError("tvm-cuda: cannot find the code in a serialized CUDA module")
    start = next((f for f in fits if payload[f + 8:] in expected), fits[0])
    return fmt, payload[reader.offset:start], payload[start + 8:]


class _Reader:
    def __init__(self, data: bytes, offset: int):
        self.data, self.offset = data, offset

    def u64(self) -> int:
        (value,) = struct.unpack_from("<Q", self.data, self.offset)
        self.offset += 8
        return value

    def u64s(self) -> List[int]:
        return [self.u64() for _ in range(self.u64())]

    def string(self) -> bytes:
        n = self.u64()
        self.offset += n
        return self.data[self.offset - n:self.offset]


def _u64s(values: List[int]) -> bytes:
    return struct.pack(f"<{len(values) + 1}Q", len(values), *values)


def _str(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


# ------------------------------------------------------------- inspection
def read_packed_blob(library_path: str) -> bytes:
    """The packed import blob of an exported library, read through its ``__tvm_ffi__library_bin`` symbol."""
    import tvm  # loads libtvm_runtime RTLD_GLOBAL, which the library links against

    name = tvm.get_global_func("runtime.ModuleImportsBlobName")()
    lib = ctypes.CDLL(os.path.abspath(library_path), mode=ctypes.RTLD_LOCAL)
    address = ctypes.addressof(ctypes.c_char.in_dll(lib, name))
    (nbytes,) = struct.unpack("<Q", ctypes.string_at(address, 8))
    return ctypes.string_at(address, 8 + nbytes)


def is_cuda_fatbin(data: bytes) -> bool:
    """A fatbin holding at least one CUDA ELF (a cubin)."""
    at = data.find(ELF_MAGIC)
    return data.startswith(FATBIN_MAGIC) and at >= 0 and struct.unpack_from("<H", data, at + 18)[0] == EM_CUDA
