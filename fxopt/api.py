"""``fxopt.optimize``: one call from a PyTorch model to something faster that runs; ``fxopt.load`` for artifacts.

    optimized = fxopt.optimize(model, example_inputs, target="x86-int8", calibration_data=batches)
    optimized(*inputs)              # like model(*inputs): an nn.Module returning the model's output type
    optimized.save("minilm-int8")   # manifest.json + graph.json + weights.safetensors (+ the target's files)
    again = fxopt.load("minilm-int8")

What a target does (its presets, options, search candidates, lowering, files) is the target's: see
:mod:`fxopt.targets`. This module knows no target by name.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from fxopt.errors import InputError
from fxopt.ir import Graph, capture
from fxopt.optimized import OptimizedModel
from fxopt.passes import Pipeline
from fxopt.passes.infra.memory import release_dropped_graphs, trimming_while_resident_grows
from fxopt.report.graph_svg import graph_outline
from fxopt.report.layer_error import padding_mask, per_layer_error
from fxopt.report.timing import compare_latency
from fxopt.search import held_out_split, measure_and_choose, parse_tolerance
from fxopt.targets import Build, BuildContext, Target, registered_targets, resolve_target, target_class
from fxopt.targets.base import say
from fxopt.targets.calibration import calibration_batches

#: Interleaved rounds (after one warm-up) in which optimize() times the result against the original for report().
REPORT_LATENCY_ROUNDS = 5


def optimize(model: torch.nn.Module, example_inputs: Sequence[Any], target: Union[str, Target] = "eager",
             preset: Optional[str] = None, passes: Optional[Union[str, Pipeline]] = None,
             calibration_data: Optional[Iterable[Sequence[torch.Tensor]]] = None,
             tolerance: Optional[Union[float, Dict[str, float]]] = None, metric: Optional[Callable] = None,
             progress: bool = True, options: Optional[Mapping[str, Any]] = None,
             precision: Optional[str] = None, dynamic_shapes: Optional[Any] = None) -> OptimizedModel:
    """Capture ``model``, run the target's pipeline, build, lower. The model itself is never changed.

    ``target`` is a registered name (``fxopt.targets.registered_targets()``) with ``options`` for it, or a
    :class:`~fxopt.targets.Target` instance. ``preset`` picks one of the target's presets; ``passes`` replaces
    its pipeline. ``precision`` is the target's option of that name (``options={"precision": ...}``), for
    example ``"fp8"`` on ``cuda``; a target without one refuses it, listing its options.

    With ``tolerance`` (``{"cosine": 0.99}``, ``{"max_rel_err": 0.01}``, or a float bound for ``metric``)
    it searches: every candidate the target offers is built, its fidelity measured on held-out calibration
    data and its latency measured here, and the fastest that meets the tolerance wins (``fxopt.search``; the
    table is printed and kept in ``report()["candidates"]``). Each candidate is timed on the runner that is
    returned if it wins (``report()["latency_ms"]`` is the winner's).

    ``calibration_data`` (a list, a ``DataLoader`` or a generator of input tuples) is streamed, never held
    as a whole: a re-iterable is iterated again for each pass, a one-shot iterator is spilled to a temporary
    file first (``fxopt.passes.infra.batches``).

    ``dynamic_shapes`` (torch.export's format: ``({0: Dim("batch", min=1, max=64), 1: Dim("seq", max=128)},
    ...)`` per input, or a dict keyed by forward()'s parameter names) lets the result take other sizes within
    those ranges; an input outside them raises an InputError naming the dim, its range and the size. Targets
    that build for static shapes only (``cuda`` today) refuse it.
    """
    with trimming_while_resident_grows():
        with prepared(model, example_inputs, target, preset, passes, calibration_data, tolerance, metric, progress,
                      options, precision, dynamic_shapes=dynamic_shapes) as (chosen_target, context, stats):
            build = _search(chosen_target, context, stats) if context.tolerance else _build(chosen_target, context)
            original, fused = context.original, context.fused
        # the fused graph (its merged weights) goes before lowering, the peak
        fused_bytes = fused.size_bytes_not_in(original) if build.graph is not fused else 0
        del fused, context
        release_dropped_graphs(fused_bytes)
        return _lower_and_measure(chosen_target, build, original, example_inputs, stats, progress)


@contextmanager
def prepared(model, example_inputs, target, preset=None, passes=None, calibration_data=None, tolerance=None,
             metric=None, progress=True, options=None, precision=None, measure_here: bool = True,
             dynamic_shapes=None):
    """What optimize does before it builds: check the arguments, capture, run the pipeline, stream the
    calibration data. Yields ``(target, BuildContext, stats)``; leaving it closes the calibration stream.
    ``measure_here=False`` (a search bundle) lets a target search whose candidates cannot run here."""
    if precision is not None:
        options = {**(options or {}), "precision": precision}
    chosen_target = resolve_target(target, options)
    chosen_target.check_device()
    if passes is not None and preset is not None:
        raise InputError("optimize: pass either preset= or passes=, not both")
    preset_used = chosen_target.preset(None if passes is not None else preset)
    parsed_tolerance = parse_tolerance(tolerance, metric) if tolerance is not None else None
    if parsed_tolerance is not None:
        chosen_target.check_search(measure_here)
    if dynamic_shapes is not None:
        chosen_target.check_dynamic_shapes()
    original = capture(model, example_inputs, dynamic_shapes=dynamic_shapes)
    warn = chosen_target.name if chosen_target.calibrates else None
    with calibration_batches(example_inputs, calibration_data, warn_for=warn) as calibration:
        # passes that read data (GPTQ, whitened low-rank, ...) get the user's, never the example inputs
        pipeline = _pipeline(preset, passes, preset_used.passes, calibration if calibration_data is not None else None)
        fused = pipeline(original)
        stats: Dict[str, Any] = {"passes": fused.stats, "graph_before": graph_outline(original)}
        context = BuildContext(original, fused.graph, pipeline.spec, tuple(example_inputs), calibration,
                               preset_used, progress, parsed_tolerance)
        del fused
        yield chosen_target, context, stats


def _build(target: Target, context: BuildContext) -> Build:
    build = target.build(context)
    _add_layer_error(target, context, build)
    return build


def _add_layer_error(target: Target, context: BuildContext, build: Build) -> None:
    """Layer by layer against the pipeline's graph (whose node names the lossy steps keep), on the example inputs."""
    if target.reports_layer_error:
        mask = padding_mask(context.original, context.example_inputs)
        build.stats["per_layer_error"] = per_layer_error(context.fused, build.graph, context.example_inputs,
                                                         mask=mask)


def _search(target: Target, context: BuildContext, stats: Dict[str, Any]) -> Build:
    tolerance, all_batches = context.tolerance, context.calibration
    fit, check = held_out_split(all_batches)
    context.calibration = fit
    candidates = list(target.candidates(context))
    found = measure_and_choose(candidates, context.original, check, target.timing_inputs(context.example_inputs),
                               tolerance, repeats=target.search_rounds, progress=context.progress,
                               baseline=target.search_baseline)
    if context.progress:  # the table is the search's result: stdout, where the CLI prints what it did
        print(f"fxopt search ({target.name}, tolerance {tolerance.describe()}), measured on this machine:\n"
              f"{found.table()}")
    chosen = found.chosen
    stats.update(search=found.as_dict(), tolerance={tolerance.kind: tolerance.bound},
                 candidates=[c.as_dict() for c in candidates],
                 fidelity_batches={"fit": fit.count(), "held_out": check.count() if check is not fit else 0})
    build = Build(chosen.graph, chosen.pipeline, chosen.target, dict(chosen.stats), runner=chosen.runner)
    stats.update(latency_ms=chosen.latency_ms, original_latency_ms=found.original_latency_ms)
    _add_layer_error(target, context, build)
    return build


def _lower_and_measure(target: Target, build: Build, original: Graph, example_inputs, stats: Dict[str, Any],
                       progress: bool) -> OptimizedModel:
    """Lower the build on the kernel path it will run, then (where it runs here) time it against the original.
    A search's winner comes with the runner the search timed: that runner is returned, not lowered again."""
    lowering = target if build.target == target.name else target_class(build.target)()
    runner = build.runner or lowering.lower(build.graph, example_inputs=tuple(example_inputs), progress=progress)
    stats.update(build.stats)
    # a search's winner keeps the report of its own lowering (its precision, on cuda), made when it was built
    report = build.stats.get("lowering") if build.runner is not None else None
    report = report or lowering.lowering_report(runner)
    if report:
        stats["lowering"] = report
    optimized = OptimizedModel(runner, build.graph, lowering.name, build.pipeline, original, stats)
    if build.runner is None and lowering.runs_here():
        _measure_latency(optimized, example_inputs, progress)
    return optimized


def _measure_latency(optimized: OptimizedModel, example_inputs, progress: bool) -> None:
    """Time the returned runner against the original on the example inputs, for its report: medians of
    REPORT_LATENCY_ROUNDS interleaved rounds, on this machine."""
    say(progress, f"fxopt: timing the result against the original ({REPORT_LATENCY_ROUNDS} interleaved rounds) ...")
    seconds = compare_latency({"original": optimized.original_graph.run, "optimized": optimized.runner},
                              tuple(example_inputs), repeats=REPORT_LATENCY_ROUNDS, warmup=1)
    optimized.stats.update(latency_ms=seconds["optimized"] * 1e3, original_latency_ms=seconds["original"] * 1e3,
                           latency_rounds=REPORT_LATENCY_ROUNDS)


def load(directory: Union[str, Path], allow_torch_mismatch: bool = False, **options: Any) -> OptimizedModel:
    """Load an artifact written by :meth:`OptimizedModel.save`: checksums and versions are verified first.

    ``allow_torch_mismatch=True`` accepts an artifact saved under another torch major.minor, with a warning.
    ``options`` go to the artifact's target, e.g. ``compile="never"`` for x86-int8 (by default it keeps the kernel
    path that ``optimize`` measured faster, where this CPU has the ISA it was built on).
    """
    from fxopt.backends.artifact import load_artifact
    from fxopt.errors import ArtifactError
    graph, manifest = load_artifact(directory, allow_torch_mismatch)
    name = manifest.get("target")
    if name not in registered_targets():
        raise ArtifactError(f"{directory}: target {name!r} cannot be loaded by fxopt.load; it loads "
                            f"{', '.join(registered_targets())} artifacts (register_target adds one)")
    target = target_class(name)(**{k: v for k, v in options.items() if v is not None})
    runner = target.load(graph, str(directory), manifest)
    pipeline = (manifest.get("extra") or {}).get("pipeline", "")
    report = target.lowering_report(runner)
    return OptimizedModel(runner, graph, name, pipeline, stats={"lowering": report} if report else {})


def _pipeline(preset: Optional[str], passes, preset_passes: str, calibration) -> Pipeline:
    if isinstance(passes, Pipeline):
        return passes  # it carries its own calibration data, if its passes need any
    return Pipeline(passes if passes is not None else preset_passes, calibration=calibration)
