"""Accuracy-aware search: try candidate pipelines, measure each, keep the fastest that meets the tolerance.

    optimized = fxopt.optimize(model, inputs, target="x86-int8", calibration_data=batches,
                               tolerance={"cosine": 0.99})
    optimized.report()["candidates"]      # every candidate: measured latency, fidelity, size, verdict

A tolerance is one bound on the candidate's outputs against the original
model's, over the calibration batches:

- ``{"cosine": 0.99}``: the mean cosine similarity of each sample's outputs
  (flattened, all floating-point outputs together) is at least 0.99;
- ``{"max_rel_err": 1e-2}`` or a bare float: the largest per-batch relative
  error ``||y - ŷ|| / ||y||`` is at most 1e-2;
- a bare float with ``metric=fn``: ``fn(reference, outputs) <= bound``, where
  both are lists (one per batch) of lists of output tensors, as
  :func:`fxopt.passes.quantize.mixed_precision.run_outputs` gives them.

Every candidate is *measured*: fidelity on calibration batches it was not fitted on
(:func:`held_out_split`: the last quarter, at least one batch, is held out; a
low-rank factorisation whitened on few samples would otherwise look exact), latency
as the median of interleaved runs on the example inputs, all candidates and
the original model in the same loop (``fxopt.report.timing.compare_latency``),
so the ranking is by time on this machine, never by MACs. The search does not
stop at the first candidate that passes: it builds them all, then picks.

A target may time its candidates against one of them rather than the original
(``Target.search_baseline``: cuda's fp16, on the GPU), on inputs it places
(``Target.timing_inputs``). Where the candidates cannot run on the machine that
builds them, :mod:`fxopt.bundle` splits the search in two: ``search_bundle``
builds, ``pick`` measures with :func:`measure_against` and chooses.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from fxopt.errors import InputError
from fxopt.ir import Graph
from fxopt.passes.infra.progress import progress_bar
from fxopt.passes.infra.batches import as_batches
from fxopt.passes.quantize.mixed_precision import Outputs, run_outputs
from fxopt.report.timing import compare_latency, format_table

#: The keys a tolerance dict may have, and whether a larger value is better.
TOLERANCE_KINDS = {"cosine": True, "max_rel_err": False}


@dataclass(frozen=True)
class Tolerance:
    """One bound on a candidate's outputs against the original's: ``value(reference, outputs)`` vs ``bound``."""

    kind: str  # "cosine", "max_rel_err" or "metric"
    bound: float
    metric: Optional[Callable[[Outputs, Outputs], float]] = None

    def value(self, reference: Outputs, outputs: Outputs) -> float:
        if self.kind == "cosine":
            return mean_sample_cosine(reference, outputs)
        if self.kind == "max_rel_err":
            return max_relative_error(reference, outputs)
        return float(self.metric(reference, outputs))

    def meets(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value >= self.bound if self.kind == "cosine" else value <= self.bound

    def as_error_metric(self):
        """``(metric, bound)`` with "lower is better", the form mixed precision searches with."""
        if self.kind == "cosine":
            return (lambda ref, out: 1.0 - mean_sample_cosine(ref, out)), 1.0 - self.bound
        return (lambda ref, out: self.value(ref, out)), self.bound

    def describe(self) -> str:
        name = "metric" if self.kind == "metric" else self.kind
        return f"{name} {'>=' if self.kind == 'cosine' else '<='} {self.bound:.10g}"


def parse_tolerance(tolerance: Any, metric: Optional[Callable] = None) -> Tolerance:
    """``{"cosine": 0.99}``, ``{"max_rel_err": 0.01}``, or a float (with ``metric``, the metric's bound)."""
    if isinstance(tolerance, dict):
        if metric is not None:
            raise InputError("optimize: pass metric= with a float tolerance (the metric's bound), not a dict")
        if len(tolerance) != 1 or next(iter(tolerance)) not in TOLERANCE_KINDS:
            raise InputError(f"optimize: tolerance {tolerance!r} must have exactly one key of "
                             f"{', '.join(TOLERANCE_KINDS)}, e.g. {{'cosine': 0.99}}")
        (kind, bound), = tolerance.items()
    elif isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool):
        kind, bound = ("metric" if metric is not None else "max_rel_err"), tolerance
    else:
        raise InputError(f"optimize: tolerance {tolerance!r} is not understood; use {{'cosine': 0.99}}, "
                         "{'max_rel_err': 0.01}, or a float bound for metric=")
    bound = float(bound)
    if kind == "cosine" and not -1.0 <= bound <= 1.0:
        raise InputError(f"optimize: tolerance cosine={bound} is outside [-1, 1]; e.g. {{'cosine': 0.99}}")
    if kind != "cosine" and not bound >= 0:
        raise InputError(f"optimize: tolerance {kind}={bound} must be >= 0 (it bounds an error)")
    return Tolerance(kind, bound, metric)


def mean_sample_cosine(reference: Outputs, outputs: Outputs) -> float:
    """Mean over samples of the cosine between a sample's outputs (every float output, flattened, joined)."""
    cosines = [F.cosine_similarity(_per_sample(ref), _per_sample(out), dim=1, eps=1e-12)
               for ref, out in zip(reference, outputs)]
    return float(torch.cat(cosines).mean()) if cosines else float("nan")


def max_relative_error(reference: Outputs, outputs: Outputs) -> float:
    """The largest per-batch ``||y - ŷ|| / ||y||`` over all of a batch's float outputs."""
    worst = 0.0
    for ref, out in zip(reference, outputs):
        diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(ref, out))
        norm = sum(float(a.double().pow(2).sum()) for a in ref)
        worst = max(worst, math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff))
    return worst


def _per_sample(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One row per sample when every output shares the leading (batch) size, else one row in all."""
    batch = {t.shape[0] if t.dim() else None for t in tensors}
    rows = batch.pop() if len(batch) == 1 and None not in batch else None
    if rows:
        return torch.cat([t.detach().double().reshape(rows, -1) for t in tensors], dim=1)
    return torch.cat([t.detach().double().reshape(1, -1) for t in tensors], dim=1)


def held_out_split(batches: Iterable[tuple]):
    """``(fit, check)``: candidates are built on ``fit`` and judged on ``check``, the last quarter of the batches.

    Both are views of ``batches`` (:class:`fxopt.passes.infra.batches.Batches`), streamed, not copied. With one batch
    there is nothing to hold out: both are that batch, and a warning says the fidelity is measured on the
    data the candidates were fitted to.
    """
    batches = as_batches(batches)
    count = batches.count()
    if count < 2:
        warnings.warn("optimize(tolerance=...): one calibration batch, so candidates are judged on the data they "
                      "were fitted to and may look better than they are; pass at least 2 batches (the last "
                      "quarter is held out to measure fidelity)", stacklevel=3)
        return batches, batches
    held = max(1, count // 4)
    return batches.take(0, count - held), batches.take(count - held, count)


# ------------------------------------------------------------------ candidates
@dataclass
class Candidate:
    """One pipeline tried: how to run it, and what was measured."""

    name: str
    pipeline: str
    graph: Graph
    runner: Callable
    target: str
    compressed: bool
    stats: Dict[str, Any] = field(default_factory=dict)
    latency_ms: Optional[float] = None
    speedup: Optional[float] = None
    fidelity: Dict[str, float] = field(default_factory=dict)
    meets: bool = False
    chosen: bool = False

    @property
    def size_bytes(self) -> int:
        return self.graph.size_bytes()

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "pipeline": self.pipeline, "target": self.target, "latency_ms": self.latency_ms,
                "speedup": self.speedup, "fidelity": dict(self.fidelity), "meets": self.meets,
                "size_bytes": self.size_bytes, "params": self.graph.param_count(), "chosen": self.chosen}


@dataclass
class SearchResult:
    candidates: List[Candidate]
    chosen: Candidate
    tolerance: Tolerance
    original_latency_ms: Optional[float]  # None where the original was not timed (baseline is a candidate)
    baseline: str = "original"  # what the speedups are relative to: the original, or a candidate's name

    def table(self) -> str:
        rows = [[("* " if c.chosen else "  ") + c.name, c.latency_ms, c.speedup,
                 _fidelity_cell(c.fidelity, self.tolerance), "yes" if c.meets else "no",
                 f"{c.size_bytes / 1e6:.1f}"] for c in self.candidates]
        if self.original_latency_ms is not None:
            rows.insert(0, ["  original", self.original_latency_ms, 1.0, "", "", ""])
        speedup = "speedup" if self.baseline == "original" else f"speedup vs {self.baseline}"
        headers = ["candidate", "latency ms", speedup, self.tolerance.describe(), "meets", "size MB"]
        return format_table(headers, rows)

    def as_dict(self) -> Dict[str, Any]:
        return {"tolerance": self.tolerance.describe(), "original_latency_ms": self.original_latency_ms,
                "baseline": self.baseline, "latency_ms": self.chosen.latency_ms, "chosen": self.chosen.name,
                "candidates": [c.as_dict() for c in self.candidates]}


def _fidelity_cell(fidelity: Dict[str, float], tolerance: Tolerance) -> str:
    value = fidelity.get(tolerance.kind)
    return "failed" if value is None or math.isnan(value) else f"{value:.5g}"


def measure_and_choose(candidates: Sequence[Candidate], original: Graph, batches: Sequence[tuple],
                       example_inputs: Sequence, tolerance: Tolerance, repeats: int = 10,
                       progress: bool = False, baseline: Optional[str] = None) -> SearchResult:
    """Measure every candidate's fidelity against ``original`` and its latency, with the original's unless
    ``baseline`` names the candidate the speedups are relative to; pick the fastest that meets."""
    reference = run_outputs(original, batches)
    return measure_against(candidates, reference, batches, example_inputs, tolerance, repeats, progress,
                           original=None if baseline else original.run, baseline=baseline or "original")


def measure_against(candidates: Sequence[Candidate], reference: Outputs, batches: Sequence[tuple],
                    example_inputs: Sequence, tolerance: Tolerance, repeats: int = 10, progress: bool = False,
                    original: Optional[Callable] = None, baseline: str = "original") -> SearchResult:
    """:func:`measure_and_choose` with the reference outputs given (``fxopt.pick`` reads them from a bundle):
    fidelity on ``batches``; latency on ``example_inputs``, every candidate (and ``original``, if given) in one
    interleaved loop; the fastest candidate that meets ``tolerance`` is chosen."""
    for candidate in progress_bar(candidates, "fidelity", "candidate", progress):
        candidate.fidelity = _fidelity(candidate, batches, reference, tolerance)
        candidate.meets = tolerance.meets(candidate.fidelity.get(tolerance.kind, float("nan")))
    timed = {**({"original": original} if original is not None else {}), **{c.name: c.runner for c in candidates}}
    seconds = compare_latency(timed, example_inputs, repeats=repeats, progress=progress)
    if baseline not in seconds:
        raise InputError(f"search: baseline {baseline!r} is neither 'original' (timed) nor a candidate "
                         f"({', '.join(c.name for c in candidates)})")
    base = seconds[baseline]
    for candidate in candidates:
        candidate.latency_ms = seconds[candidate.name] * 1e3
        candidate.speedup = base / seconds[candidate.name]
    passing = [c for c in candidates if c.meets]
    if not passing:
        raise InputError(f"search: no candidate meets tolerance {tolerance.describe()}, not even the float one; "
                         f"loosen it (measured: {_summary(candidates, tolerance)})")
    chosen = min(passing, key=lambda c: c.latency_ms)
    chosen.chosen = True
    original_ms = seconds["original"] * 1e3 if original is not None else None
    return SearchResult(list(candidates), chosen, tolerance, original_ms, baseline)


def _fidelity(candidate: Candidate, batches, reference: Outputs, tolerance: Tolerance) -> Dict[str, float]:
    outputs = run_outputs_of(candidate.runner, batches)
    values = {"cosine": mean_sample_cosine(reference, outputs), "max_rel_err": max_relative_error(reference, outputs)}
    if tolerance.kind == "metric":
        values["metric"] = tolerance.value(reference, outputs)
    return values


def run_outputs_of(runner: Callable, batches) -> Outputs:
    """Like ``run_outputs`` for any callable: each batch's floating-point output tensors, on the CPU."""
    outputs = []
    with torch.inference_mode():
        for batch in batches:
            leaves = pytree.tree_leaves(runner(*batch))
            # on the CPU now: a GPU runner's outputs may live in buffers its next call reuses
            outputs.append([t.cpu() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()])
    return outputs


def _summary(candidates: Sequence[Candidate], tolerance: Tolerance) -> str:
    return ", ".join(f"{c.name}: {_fidelity_cell(c.fidelity, tolerance)}" for c in candidates)
