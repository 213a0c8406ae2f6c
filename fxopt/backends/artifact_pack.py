"""Several artifacts in one directory, every distinct weight tensor and file stored once.

Candidates of one model share most of their bytes: the same CUDA extension, the float weights a precision
leaves alone (embeddings, LayerNorms, the fp16 and fp8 candidates' whole weights, quantized when loaded).
A pack keeps them once each:

    pack/
      files/<sha256>              every distinct file of the artifacts but their weights (manifest, graph, libraries)
      weights/<n>.safetensors     the tensors first met in the n-th artifact packed, named by their content hash

and an index (a JSON value the caller writes, see :class:`ArtifactPack`) says which files and tensors make each
artifact. :func:`unpack_artifact` writes an artifact directory back, byte for byte: the artifact's own manifest
checks every file when ``fxopt.load`` reads it. A pack is written inside a directory its caller writes
atomically (:func:`fxopt.backends.artifact.write_directory`).
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Dict, List, Union

import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from fxopt.backends.artifact import MANIFEST, WEIGHTS_FILE, file_record, read_manifest, sha256_file
from fxopt.errors import ArtifactError

FILES, WEIGHTS = "files", "weights"


class ArtifactPack:
    """Adds artifacts to a pack directory, one by one (each may be deleted once added); ``index`` describes them."""

    def __init__(self, directory: Union[str, Path]):
        self.directory = Path(directory)
        (self.directory / FILES).mkdir(parents=True, exist_ok=True)
        (self.directory / WEIGHTS).mkdir(exist_ok=True)
        self.index: Dict[str, dict] = {}
        self._stored: Dict[str, str] = {}  # tensor hash -> the shard holding it

    def add(self, name: str, artifact: Union[str, Path]) -> dict:
        """Pack the artifact directory ``artifact`` under ``name``; returns its index entry."""
        artifact = Path(artifact)
        listed = read_manifest(artifact)["files"]
        files = {file: self._store_file(artifact / file) for file in sorted(listed) if file != WEIGHTS_FILE}
        files[MANIFEST] = self._store_file(artifact / MANIFEST)
        entry = {"files": files, "weights": self._store_weights(artifact / WEIGHTS_FILE, len(self.index)),
                 "weights_record": listed[WEIGHTS_FILE]}
        self.index[name] = entry
        _check_rebuilds(self.directory, name, entry)
        return entry

    def _store_file(self, path: Path) -> str:
        digest = sha256_file(path)
        stored = self.directory / FILES / digest
        if not stored.exists():
            shutil.copyfile(path, stored)
        return digest

    def _store_weights(self, path: Path, number: int) -> List[List[str]]:
        """``[name, hash, shard]`` per tensor of the artifact's weights; the new ones go to shard ``number``."""
        entries, new = [], {}
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key)
                digest = tensor_digest(tensor)
                if digest not in self._stored and digest not in new:
                    new[digest] = tensor
                entries.append([key, digest, self._stored.get(digest, f"{number}.safetensors")])
        if new:
            save_file(new, str(self.directory / WEIGHTS / f"{number}.safetensors"))
            self._stored.update({digest: f"{number}.safetensors" for digest in new})
        return entries


def tensor_digest(tensor: torch.Tensor) -> str:
    """A name for a tensor's content: sha256 of its dtype, shape and bytes."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(data.tobytes())
    return digest.hexdigest()


def _weights(pack_dir: Path, entry: dict) -> Dict[str, torch.Tensor]:
    """The artifact's weights, in its own names, read from the pack's shards."""
    by_shard: Dict[str, List[List[str]]] = {}
    for key, digest, shard in entry["weights"]:
        by_shard.setdefault(shard, []).append([key, digest])
    tensors, seen = {}, set()
    for shard, keys in by_shard.items():
        path = pack_dir / WEIGHTS / shard
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; copy the whole directory again")
        with safe_open(str(path), framework="pt") as weights:
            for key, digest in keys:
                tensor = weights.get_tensor(digest)
                # equal tensors stored twice by the artifact stay two tensors (safetensors refuses shared memory)
                tensors[key] = tensor.clone() if digest in seen else tensor
                seen.add(digest)
    return tensors


def _check_rebuilds(pack_dir: Path, name: str, entry: dict) -> None:
    """The weights file the pack rebuilds must be the one the artifact's manifest lists (safetensors writes the
    same tensors the same way; this catches the day it does not)."""
    data = save(_weights(pack_dir, entry))
    if hashlib.sha256(data).hexdigest() != entry["weights_record"]["sha256"]:
        raise ArtifactError(f"{pack_dir}: {name}'s {WEIGHTS_FILE} does not rebuild byte for byte from the pack "
                            "(another safetensors version?); pack it with the safetensors that saved it")


def unpack_artifact(pack_dir: Union[str, Path], entry: dict, into: Union[str, Path]) -> Path:
    """Write the artifact ``entry`` (an :attr:`ArtifactPack.index` value) as the directory ``into``."""
    pack_dir, into = Path(pack_dir), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    for file, digest in entry["files"].items():
        stored = pack_dir / FILES / digest
        if not stored.is_file():
            raise ArtifactError(f"{stored}: missing ({file}); copy the whole directory again")
        shutil.copyfile(stored, into / file)
    save_file(_weights(pack_dir, entry), str(into / WEIGHTS_FILE))
    if file_record(into / WEIGHTS_FILE) != entry["weights_record"]:
        raise ArtifactError(f"{into / WEIGHTS_FILE}: rebuilt from {pack_dir} with another size or sha256 than "
                            "the artifact's; the pack is corrupted, build it again")
    return into
