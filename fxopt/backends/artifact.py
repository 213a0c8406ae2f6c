"""Ahead-of-time artifacts: one directory that loads without unpickling anything.

    my_model/
      manifest.json          versions, target, input/output specs, ``extra`` (e.g. the pipeline),
                             and the sha256 and size of every other file
      graph.json             the Graph (fxopt.ir.serialize), plus ``weight_aliases``
      weights.safetensors    every weight once: tensors that share a view are stored under one name
      <backend files>        e.g. a compiled library, listed in the manifest like the rest

The save is atomic: everything is written and fsynced in a temporary directory
next to the target, then renamed into place; an existing artifact is renamed
away first and removed only once the new one is in. On any failure the old
artifact stays and the temporary directory is removed. The load checks the
manifest's format and the fxopt/torch major.minor versions, then each file's
size and sha256, before reading anything else. Weights are read with
safetensors (never pickle) and re-aligned where the file leaves them
unaligned, so the loaded graph reproduces the saved one bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fxopt.errors import ArtifactError
from fxopt.ir.graph import Graph
from fxopt.ir.serialize import graph_from_json, graph_to_json

FORMAT_VERSION = 1
MANIFEST, GRAPH_FILE, WEIGHTS_FILE = "manifest.json", "graph.json", "weights.safetensors"
#: The files every artifact has; a backend's own files take other names
RESERVED_FILES = _RESERVED = (MANIFEST, GRAPH_FILE, WEIGHTS_FILE)
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_CHUNK = 1 << 20
_ALIGNMENT = 64  # bytes, as torch's CPU allocator: kernels may take other paths on other alignments


# ===================================================================== save
def save_artifact(graph: Graph, directory: Union[str, Path], target: str,
                  files: Optional[Dict[str, Union[bytes, str, Path]]] = None, extra: Optional[dict] = None) -> Path:
    """Write ``graph`` (and the backend's ``files``) as an artifact directory; returns its path."""
    _check_backend_file_names(files or {})
    return write_directory(directory, lambda tmp: _write_contents(graph, tmp, target, files or {}, extra))


def write_directory(directory: Union[str, Path], write: Callable[[Path], None], marker: str = MANIFEST,
                    what: str = "artifact") -> Path:
    """Fill a new directory with ``write(tmp)``, then move it to ``directory`` atomically (see the module's
    docstring). An existing directory is replaced only when it holds ``marker`` (it is one of ours)."""
    directory = Path(directory).absolute()
    _check_replaceable(directory, marker, what)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would outlive the rename, this one follows the umask
    try:
        write(tmp)
        _fsync_dir(tmp)
        _move_into_place(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"{directory}: could not write the {what}: {exc}; check the path and free space") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_replaceable(directory: Path, marker: str = MANIFEST, what: str = "artifact") -> None:
    if directory.is_file() or (directory.is_dir() and any(directory.iterdir()) and not (directory / marker).exists()):
        raise ArtifactError(f"{directory}: exists and is not an fxopt {what}; save to a new or empty directory "
                            f"(an existing {what} is replaced, anything else is left alone)")


def _check_backend_file_names(files: dict) -> None:
    for name in files:
        if name in _RESERVED or not _FILE_NAME.match(name):
            raise ArtifactError(f"save_artifact: backend file name {name!r} is not allowed; use a plain file name "
                                f"(letters, digits, . _ -) other than {', '.join(_RESERVED)}")


def _write_contents(graph: Graph, tmp: Path, target: str, files: dict, extra: Optional[dict]) -> None:
    graph_data = graph_to_json(graph)
    tensors, aliases = _weights_to_store(graph.params())
    graph_data["weight_aliases"] = aliases
    write_bytes(tmp / GRAPH_FILE, to_json(graph_data, GRAPH_FILE))
    _write_weights(tensors, tmp / WEIGHTS_FILE)
    for name, content in files.items():
        if isinstance(content, (bytes, bytearray)):
            write_bytes(tmp / name, bytes(content))
        else:
            shutil.copyfile(content, tmp / name)
            _fsync_file(tmp / name)
    manifest = _manifest(graph_data, tmp, target, extra)
    write_bytes(tmp / MANIFEST, to_json(manifest, MANIFEST))


def _write_weights(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, str(path))
    except (ValueError, TypeError, KeyError) as exc:  # a dtype or layout safetensors cannot hold
        raise ArtifactError(f"{WEIGHTS_FILE}: cannot store the weights: {exc}; convert such weights to a plain "
                            "dense dtype (float, int, bool) before saving") from exc
    _fsync_file(path)


def _weights_to_store(params: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """One CPU tensor per distinct view; other names that read the same view become aliases of it."""
    first_name: Dict[tuple, str] = {}
    aliases: Dict[str, str] = {}
    for name, tensor in params.items():
        key = _view_key(tensor)
        if key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
    views_per_storage = Counter(key[:2] for key in first_name)
    tensors = {name: _storable(params[name], views_per_storage[key[:2]] > 1) for key, name in first_name.items()}
    return tensors, aliases


def _view_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _storable(tensor: torch.Tensor, shares_storage: bool) -> torch.Tensor:
    """safetensors refuses views that share storage and non-contiguous tensors: give those a copy of their own."""
    tensor = tensor.detach().cpu()
    if shares_storage or not tensor.is_contiguous():
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _manifest(graph_data: dict, tmp: Path, target: str, extra: Optional[dict]) -> dict:
    codegen = graph_data.get("codegen") or {}
    return {
        "format_version": FORMAT_VERSION,
        "fxopt_version": _fxopt_version(),
        "torch_version": torch.__version__,
        "tvm_version": _tvm_version(),
        "target": target,
        "input_specs": graph_data["input_specs"],
        "output_spec": codegen.get("out_spec"),
        "extra": extra if extra is not None else {},
        "files": {p.name: file_record(p) for p in sorted(tmp.iterdir())},
    }


def _fxopt_version() -> str:
    import fxopt

    return fxopt.__version__


def _tvm_version() -> Optional[str]:
    """The installed TVM's version, read from its package metadata (importing TVM is slow and not needed)."""
    for dist in ("apache-tvm", "tvm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def file_record(path: Path) -> dict:
    """``{"sha256", "size"}`` of a file, as manifests list them."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def to_json(data: dict, file_name: str) -> bytes:
    try:
        return json.dumps(data, indent=1, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{file_name}: cannot be written as JSON: {exc}; `extra` must hold JSON values "
                            "(str, int, float, bool, None, lists, dicts)") from exc


def write_bytes(path: Path, content: bytes) -> None:
    """Write and fsync."""
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync elsewhere
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename ``tmp`` to ``directory``; an existing artifact is renamed away first and restored on failure."""
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        if old is not None:
            os.rename(old, directory)
        raise
    _fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ===================================================================== load
def load_artifact(directory: Union[str, Path], allow_torch_mismatch: bool = False) -> Tuple[Graph, dict]:
    """Check and load an artifact: returns the Graph (weights on CPU) and the manifest.

    ``allow_torch_mismatch=True`` loads an artifact saved under another torch major.minor with a warning
    instead of an ArtifactError (the ops it names must still exist in this torch).
    """
    directory = Path(directory)
    manifest = read_manifest(directory, allow_torch_mismatch)
    for name, record in manifest["files"].items():
        _verify_file(directory, name, record)
    graph_data = _read_json(directory / GRAPH_FILE)
    params = _expand_aliases(_load_weights(directory / WEIGHTS_FILE), graph_data.get("weight_aliases", {}))
    return graph_from_json(graph_data, params), manifest


def read_manifest(directory: Union[str, Path], allow_torch_mismatch: bool = False) -> dict:
    """The manifest, after checking its format and that it was written by this fxopt/torch major.minor."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not an fxopt artifact (or an interrupted copy of "
                            "one), save it again with fxopt.backends.artifact.save_artifact")
    manifest = _read_json(path)
    _check_manifest(path, manifest, allow_torch_mismatch)
    return manifest


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot be read as JSON: {exc}; the artifact is corrupted, save it again") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: holds a {type(data).__name__}, not an object; the artifact is corrupted")
    return data


def _check_manifest(path: Path, manifest: dict, allow_torch_mismatch: bool = False) -> None:
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r}, this fxopt reads "
                            f"{FORMAT_VERSION}; save the artifact again with this fxopt")
    for package, current in (("fxopt", _fxopt_version()), ("torch", torch.__version__)):
        saved = str(manifest.get(f"{package}_version"))
        if major_minor(saved) == major_minor(current):
            continue
        problem = f"{path}: saved with {package} {saved}, this is {package} {current}"
        if package == "torch" and allow_torch_mismatch:
            warnings.warn(f"{problem}; loading anyway (allow_torch_mismatch=True)", stacklevel=4)
            continue
        raise ArtifactError(f"{problem}; major.minor versions must match: install {package}=="
                            f"{major_minor(saved)}.* or save the artifact again with this version"
                            + (" (or load with allow_torch_mismatch=True)" if package == "torch" else ""))
    files = manifest.get("files")
    if not isinstance(files, dict) or any(name not in files for name in (GRAPH_FILE, WEIGHTS_FILE)):
        raise ArtifactError(f"{path}: does not list {GRAPH_FILE} and {WEIGHTS_FILE}; the manifest is corrupted")
    for name, record in files.items():
        well_formed = isinstance(record, dict) and isinstance(record.get("sha256"), str) and \
            isinstance(record.get("size"), int)
        if not _FILE_NAME.match(name) or name == MANIFEST or not well_formed:
            raise ArtifactError(f"{path}: bad entry for file {name!r}; the manifest is corrupted or tampered with")


def major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _verify_file(directory: Path, name: str, record: dict) -> None:
    path = directory / name
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the manifest lists it, copy the whole artifact directory again")
    size = path.stat().st_size
    if size != record.get("size"):
        raise ArtifactError(f"{path}: {size} bytes, the manifest says {record.get('size')} (truncated or modified); "
                            "the artifact is corrupted, copy or save it again")
    if sha256_file(path) != record.get("sha256"):
        raise ArtifactError(f"{path}: sha256 checksum does not match the manifest (tampered with or corrupted); "
                            "copy or save the artifact again")


def _load_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each copied to an aligned allocation where safetensors left it unaligned:
    GEMM kernels round differently on unaligned data, and the load must reproduce the saved graph bit for bit."""
    tensors = {}
    with safe_open(str(path), framework="pt") as weights:
        for name in weights.keys():
            tensor = weights.get_tensor(name)
            tensors[name] = tensor if tensor.data_ptr() % _ALIGNMENT == 0 else tensor.clone()
    return tensors


def _expand_aliases(tensors: Dict[str, torch.Tensor], aliases: Dict[str, str]) -> Dict[str, torch.Tensor]:
    params = dict(tensors)
    for name, stored in aliases.items():
        if stored not in tensors:
            raise ArtifactError(f"{GRAPH_FILE}: weight alias {name} -> {stored}, which {WEIGHTS_FILE} does not hold; "
                                "the artifact is corrupted, save it again")
        params[name] = tensors[stored]
    return params


def artifact_file(directory: Union[str, Path], name: str) -> Path:
    """The path of a backend file of an artifact, after checking the manifest lists it and it exists."""
    manifest = read_manifest(directory)
    if name not in manifest["files"]:
        listed = ", ".join(sorted(manifest["files"]))
        raise ArtifactError(f"{Path(directory) / MANIFEST}: does not list {name!r} (it lists {listed}); the artifact "
                            "was saved without this backend file, save it again for this target")
    path = Path(directory) / name
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the manifest lists it, copy the whole artifact directory again")
    return path
