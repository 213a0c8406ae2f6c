"""The search in two steps: build every candidate on one machine, measure and choose on another.

    # the machine with the compiler (for cuda: TVM and nvcc, no GPU needed)
    fxopt.search_bundle(model, example_inputs, "bert-search", target="cuda", tolerance={"cosine": 0.999},
                        calibration_data=batches)
    # the machine the model will run on (for cuda: a GPU, TVM's runtime only), without the model's source
    chosen = fxopt.pick("bert-search", out="bert-cuda")   # prints the table, saves and returns the winner

``optimize(tolerance=...)`` does both in one process where the candidates run (:mod:`fxopt.search`); a target
whose candidates cannot run here (``cuda`` without a GPU) refuses it and names these two steps. The measurement is
the same: fidelity against the original fp32 model's outputs on held-out calibration batches (computed when the
bundle is built, stored in it), latency as the median of interleaved rounds on the example inputs, the fastest
candidate that meets the tolerance chosen.

A bundle is one directory, written atomically:

    bundle.json         format, versions, target and options, tolerance, baseline, each candidate's pipeline and
                        pack index, the data's layout, and the sha256 and size of every other file
    data.safetensors    the example inputs, the held-out batches and the original's outputs on them
    candidates/         every candidate's artifact, each distinct file and weight tensor once
                        (:mod:`fxopt.backends.artifact_pack`); ``original`` too where the speedups are
                        relative to the original (not on cuda, whose baseline is its fp16 candidate)

``pick`` checks the bundle's checksums, unpacks each candidate and loads it with ``fxopt.load`` (which checks it
again), so it needs neither the model's source nor a compiler.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from fxopt.api import load, prepared
from fxopt.backends import eager
from fxopt.backends.artifact import file_record, major_minor, sha256_file, to_json, write_bytes, write_directory
from fxopt.backends.artifact_pack import ArtifactPack, unpack_artifact
from fxopt.errors import ArtifactError, DeviceError, InputError
from fxopt.optimized import OptimizedModel, jsonable
from fxopt.passes.infra.memory import trimming_while_resident_grows
from fxopt.passes.quantize.mixed_precision import run_outputs
from fxopt.search import Candidate, held_out_split, measure_against, parse_tolerance
from fxopt.targets import target_class
from fxopt.targets.base import say

FORMAT = "fxopt.search_bundle/1"
BUNDLE_FILE, DATA_FILE, CANDIDATES = "bundle.json", "data.safetensors", "candidates"


# ===================================================================== build
def search_bundle(model: torch.nn.Module, example_inputs: Sequence[Any], directory: Union[str, Path], *,
                  target: str, tolerance: Union[float, Dict[str, float]], calibration_data=None,
                  preset: Optional[str] = None, passes: Optional[str] = None,
                  options: Optional[Dict[str, Any]] = None, progress: bool = True) -> Path:
    """Build every candidate ``optimize(model, example_inputs, target=..., tolerance=...)`` would measure, and
    write them with the held-out batches and the original's outputs on them to ``directory``; nothing is
    measured. ``tolerance`` is the default :func:`pick` chooses with. Returns the bundle's path."""
    with trimming_while_resident_grows(), prepared(model, example_inputs, target, preset, passes, calibration_data,
                                                   tolerance, None, progress, options,
                                                   measure_here=False) as (chosen, context, stats):
        fit, check = held_out_split(context.calibration)
        context.calibration = fit
        meta = {"format": FORMAT, "fxopt_version": _fxopt_version(), "torch_version": torch.__version__,
                "target": chosen.name, "options": jsonable(chosen.settings),
                "tolerance": {context.tolerance.kind: context.tolerance.bound},
                "baseline": chosen.search_baseline or "original",
                "fidelity_batches": {"fit": fit.count(), "held_out": check.count() if check is not fit else 0}}

        def write(tmp: Path) -> None:
            meta["candidates"], meta["original"] = _pack_candidates(chosen, context, stats, tmp, progress)
            meta["data"] = _write_data(tmp / DATA_FILE, context.example_inputs, check,
                                       run_outputs(context.original, check))
            meta["files"] = {str(p.relative_to(tmp)): file_record(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_bytes(tmp / BUNDLE_FILE, to_json(meta, BUNDLE_FILE))

        path = write_directory(directory, write, marker=BUNDLE_FILE, what="search bundle")
    size = sum(record["size"] for record in meta["files"].values())
    say(progress, f"fxopt search bundle: {len(meta['candidates'])} candidates, {size / 2**20:.1f} MiB in {path}")
    return path


def _pack_candidates(target, context, stats: dict, tmp: Path, progress: bool) -> Tuple[List[dict], Optional[dict]]:
    """Each candidate saved as an artifact and packed as soon as it is built (then dropped); the original too
    (run in PyTorch) where the search's baseline is the original."""
    pack, scratch = ArtifactPack(tmp / CANDIDATES), tmp / ".scratch"
    described = []
    for candidate in target.candidates(context):
        model = OptimizedModel(candidate.runner, candidate.graph, candidate.target, candidate.pipeline,
                               context.original, {**stats, **candidate.stats})
        described.append({"name": candidate.name, "target": candidate.target, "pipeline": candidate.pipeline,
                          "compressed": candidate.compressed, "pack": pack.add(candidate.name, model.save(scratch))})
        say(progress, f"fxopt search bundle: {candidate.name} built and packed")
        del candidate, model
    original = None
    if target.search_baseline is None:
        model = OptimizedModel(eager.lower(context.original), context.original, eager.TARGET, "")
        original = {"name": "original", "target": eager.TARGET, "pipeline": "", "compressed": False,
                    "pack": pack.add("original", model.save(scratch))}
    shutil.rmtree(scratch, ignore_errors=True)
    return described, original


def _write_data(path: Path, example_inputs, batches, reference) -> Dict[str, int]:
    tensors = {f"example.{j}": _tensor(x, "example input") for j, x in enumerate(example_inputs)}
    count = 0
    for i, (batch, outputs) in enumerate(zip(batches, reference)):
        tensors.update({f"batch.{i}.{j}": _tensor(x, f"calibration batch {i}") for j, x in enumerate(batch)})
        tensors.update({f"reference.{i}.{k}": t.detach().contiguous() for k, t in enumerate(outputs)})
        count += 1
    save_file(tensors, str(path))
    return {"inputs": len(example_inputs), "batches": count,
            "batch_inputs": len(batch) if count else 0, "outputs": len(outputs) if count else 0}


def _tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"search_bundle: {what} holds a {type(value).__name__}; a bundle stores tensor inputs "
                         "only (pass every input as a tensor)")
    return value.detach().cpu().contiguous()


def _fxopt_version() -> str:
    import fxopt
    return fxopt.__version__


# ===================================================================== pick
def pick(directory: Union[str, Path], tolerance: Optional[Union[float, Dict[str, float]]] = None,
         metric: Optional[Callable] = None, out: Optional[Union[str, Path]] = None,
         allow_torch_mismatch: bool = False, progress: bool = True) -> OptimizedModel:
    """Measure every candidate of the bundle in ``directory`` on this machine and return the fastest that meets
    ``tolerance`` (default: the one the bundle was built with), saved to ``out`` if given. The table is printed
    (with ``progress``) and kept in ``report()["candidates"]``. ``allow_torch_mismatch`` as for ``fxopt.load``."""
    directory = Path(directory)
    meta = read_bundle(directory, allow_torch_mismatch)
    target = target_class(meta["target"])(**meta["options"])
    if not target.runs_here():
        raise DeviceError(f"pick {directory}: its {meta['target']!r} candidates do not run on this machine "
                          f"({target.device_description() or 'runs_here() is False'}); copy the bundle to the "
                          "machine the model will run on (it needs no compiler, no model source) and pick there")
    chosen_tolerance = parse_tolerance(tolerance if tolerance is not None else meta["tolerance"], metric)
    example, batches, reference = _read_data(directory / DATA_FILE, meta["data"])
    scratch = Path(tempfile.mkdtemp(prefix="fxopt-pick-"))
    try:
        load_one = lambda described, number: _load_candidate(  # noqa: E731
            directory, described, scratch / str(number), allow_torch_mismatch, progress)
        candidates = [load_one(described, i) for i, described in enumerate(meta["candidates"])]
        original = load_one(meta["original"], "original").runner if meta.get("original") else None
        found = measure_against(candidates, reference, batches, target.timing_inputs(example), chosen_tolerance,
                                repeats=target.search_rounds, progress=progress, original=original,
                                baseline=meta["baseline"])
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if progress:
        print(f"fxopt pick ({meta['target']}, tolerance {chosen_tolerance.describe()}), measured on this machine"
              f"{_suffix(target.device_description())}:\n{found.table()}", flush=True)
    for number, candidate in enumerate(candidates):  # the winner's files stay while it lives (save copies them)
        if candidate is not found.chosen:
            shutil.rmtree(scratch / str(number), ignore_errors=True)
    winner = _winner(found, meta, directory)
    weakref.finalize(winner, shutil.rmtree, str(scratch), True)
    if out is not None:
        winner.save(out)
    return winner


def _load_candidate(directory: Path, described: dict, unpacked: Path, allow_torch_mismatch: bool,
                    progress: bool) -> Candidate:
    """A packed artifact unpacked into ``unpacked`` and loaded with ``fxopt.load``; its build report in stats."""
    unpack_artifact(directory / CANDIDATES, described["pack"], unpacked)
    model = load(unpacked, allow_torch_mismatch=allow_torch_mismatch)
    report = (json.loads((unpacked / "manifest.json").read_text()).get("extra") or {}).get("report") or {}
    say(progress, f"fxopt pick: loaded {described['name']}")
    return Candidate(described["name"], described["pipeline"], model.graph, model.runner, model.target,
                     described["compressed"], stats=report)


def _winner(found, meta: dict, directory: Path) -> OptimizedModel:
    """The chosen candidate as an OptimizedModel: its build's report, and the search's."""
    chosen = found.chosen
    stats = {key: value for key, value in chosen.stats.items() if key not in ("target", "pipeline")}
    stats.update(search=found.as_dict(), tolerance={found.tolerance.kind: found.tolerance.bound},
                 candidates=[c.as_dict() for c in found.candidates], latency_ms=chosen.latency_ms,
                 original_latency_ms=found.original_latency_ms, fidelity_batches=meta["fidelity_batches"],
                 search_bundle=str(directory.absolute()))
    return OptimizedModel(chosen.runner, chosen.graph, chosen.target, chosen.pipeline, stats=stats)


def _read_data(path: Path, layout: dict) -> Tuple[tuple, List[tuple], List[List[torch.Tensor]]]:
    tensors = load_file(str(path))
    example = tuple(tensors[f"example.{j}"] for j in range(layout["inputs"]))
    batches = [tuple(tensors[f"batch.{i}.{j}"] for j in range(layout["batch_inputs"]))
               for i in range(layout["batches"])]
    reference = [[tensors[f"reference.{i}.{k}"] for k in range(layout["outputs"])] for i in range(layout["batches"])]
    return example, batches, reference


def _suffix(description: str) -> str:
    return f" ({description})" if description else ""


# ===================================================================== reading a bundle
def read_bundle(directory: Union[str, Path], allow_torch_mismatch: bool = False) -> dict:
    """``bundle.json``, after checking its format, the fxopt and torch major.minor versions, and every file's size
    and sha256."""
    directory = Path(directory)
    path = directory / BUNDLE_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {directory} is not a search bundle (or an interrupted copy of one); "
                            "build it with fxopt.search_bundle (CLI: fxopt search-bundle)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: cannot be read as JSON: {exc}; the bundle is corrupted, build it again") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else None!r}, this fxopt "
                            f"reads {FORMAT!r}; build the bundle again with this fxopt")
    _check_versions(path, meta, allow_torch_mismatch)
    for name, record in meta["files"].items():
        _verify(directory, name, record)
    return meta


def _check_versions(path: Path, meta: dict, allow_torch_mismatch: bool) -> None:
    for package, current in (("fxopt", _fxopt_version()), ("torch", torch.__version__)):
        saved = str(meta.get(f"{package}_version"))
        if major_minor(saved) == major_minor(current) or (package == "torch" and allow_torch_mismatch):
            continue
        raise ArtifactError(f"{path}: built with {package} {saved}, this is {package} {current}; major.minor "
                            f"versions must match: build the bundle with this version"
                            + (" (or pick with allow_torch_mismatch=True, CLI --allow-torch-mismatch)"
                               if package == "torch" else ""))


def _verify(directory: Path, name: str, record: dict) -> None:
    path = directory / name
    if ".." in Path(name).parts or not path.is_file():
        raise ArtifactError(f"{path}: missing; bundle.json lists it, copy the whole bundle directory again")
    if path.stat().st_size != record.get("size") or sha256_file(path) != record.get("sha256"):
        raise ArtifactError(f"{path}: size or sha256 does not match bundle.json (truncated, modified or "
                            "corrupted); copy or build the bundle again")
