"""``fxopt.optimize``: one call from a PyTorch model to something faster that runs; ``fxopt.load`` for artifacts.

    optimized = fxopt.optimize(model, example_inputs, target="x86-int8", calibration_data=batches)
    optimized(*inputs)              # like model(*inputs)
    optimized.save("minilm-int8")   # manifest.json + graph.json + weights.safetensors
    again = fxopt.load("minilm-int8")

Targets:
- ``eager``: the pipeline's graph run by PyTorch (default pipeline ``fuse``);
- ``x86-int8``: fusion, then smooth-quant and static int8 (per-tensor activations
  calibrated on ``calibration_data``, per-channel int8 weights, int8 embedding
  tables), lowered to oneDNN int8 kernels for this CPU's ISA.

``tolerance`` turns on the search (``fxopt.search``): float, int8, and int8 with
the most sensitive linears kept in float (mixed precision) are each built and
measured, fidelity and latency, and the fastest within the tolerance is returned.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch

from fxopt.backends import eager
from fxopt.backends import x86_int8
from fxopt.errors import ArtifactError, InputError
from fxopt.ir import Graph, capture
from fxopt.passes.infra.batches import Batches, as_batches
from fxopt.passes.infra.memory import release_dropped_graphs, trimming_while_resident_grows
from fxopt.passes import Pipeline
from fxopt.passes.lowrank import LowRank
from fxopt.passes.quantize import calibrate_smoothed, choose_float_layers
from fxopt.passes.quantize.insert_qdq import InsertQDQ
from fxopt.passes.quantize.mixed_precision import run_outputs
from fxopt.report.graph_svg import graph_outline
from fxopt.report.layer_error import padding_mask, per_layer_error
from fxopt.report.timing import compare_latency
from fxopt.search import Candidate, Tolerance, held_out_split, measure_and_choose, parse_tolerance, run_outputs_of

TARGETS = ("eager", "x86-int8", "cuda")
#: Interleaved rounds (after one warm-up) in which optimize() times the result against the original for report().
REPORT_LATENCY_ROUNDS = 5
#: Pipelines a preset names, per target (quantization is added by the x86-int8 target itself).
PRESETS = {"fast": "fuse", "balanced": "fuse", "small": "fuse"}
#: Low-rank candidates of the search: the share of the factored linears' weights each keeps.
LOW_RANK_RATIOS = (0.75, 0.5)
#: The cuda target's pipeline: fxopt's attention kernel takes the whole attention, cuBLASLt the GEMMs
#: (the fastest measured on the H100, benchmarks/results/gpu_bert_norm_act.md); epilogue fusion is TVM's.
CUDA_PIPELINE = "cleanup,fuse-attention"
DEFAULT_PRESET = "balanced"
#: Smooth-quant's migration strength for x86-int8 (issue 5: best fidelity on MiniLM at 0.8).
SMOOTH_ALPHA = 0.8
#: Without VNNI (7-bit weights), the share of linears whose activations stay float by default, the most
#: sensitive first: on MiniLM (AVX2) 6 of 25 lift held-out cosine / NN agreement from 0.9974 / 0.922 to
#: 0.9982 / 0.961 at the same 23 MB (benchmarks/results/x86_int8_cpu2.md).
NO_VNNI_FLOAT_ACTIVATION_SHARE = 0.25
#: How many of the first calibration batches go to the passes that read data themselves (GPTQ, low-rank).
PASS_CALIBRATION_BATCHES = 4


@dataclass
class OptimizedModel:
    """The result of :func:`optimize`: callable like the model, with its graph, a report and ``save``."""

    runner: Any
    graph: Graph
    target: str
    pipeline: str
    original_graph: Optional[Graph] = None
    stats: Dict[str, Any] = field(default_factory=dict)

    def __call__(self, *inputs, **kwargs):
        return self.runner(*inputs, **kwargs)

    def report(self) -> Dict[str, Any]:
        """Sizes, parameter counts, the pipeline, what each step did, the per-layer error, and the latency
        against the original measured by ``optimize`` on this machine (``latency_ms``, ``original_latency_ms``)."""
        out = {"target": self.target, "pipeline": self.pipeline, "params": self.graph.param_count(),
               "size_bytes": self.graph.size_bytes(), **self.stats}
        if self.original_graph is not None:
            out["original_params"] = self.original_graph.param_count()
            out["original_size_bytes"] = self.original_graph.size_bytes()
        return out

    def html_report(self, path: Union[str, Path]) -> Path:
        """Write the HTML report (candidates, Pareto plot, per-layer error, graphs before/after) to ``path``."""
        from fxopt.report.html import write_html
        return write_html(_jsonable(self.report()), path, graph_after=self.graph)

    def save(self, directory: Union[str, Path]) -> Path:
        """Write an artifact directory (atomically) that :func:`load` reads back without the model's source."""
        from fxopt.backends.artifact import save_artifact
        extra = {"pipeline": self.pipeline, "report": _jsonable(self.report())}
        files = self.runner.files() if hasattr(self.runner, "files") else None
        return save_artifact(self.graph, directory, target=self.target, files=files, extra=extra)


def optimize(model: torch.nn.Module, example_inputs: Sequence[Any], target: str = "eager",
             preset: Optional[str] = None, passes: Optional[Union[str, Pipeline]] = None,
             calibration_data: Optional[Iterable[Sequence[torch.Tensor]]] = None,
             tolerance: Optional[Union[float, Dict[str, float]]] = None, metric: Optional[Callable] = None,
             progress: bool = True) -> OptimizedModel:
    """Capture ``model``, run the target's pipeline, lower it. The model itself is never changed.

    With ``tolerance`` (``{"cosine": 0.99}``, ``{"max_rel_err": 0.01}``, or a float bound for ``metric``)
    it searches: every candidate pipeline for the target is built, its fidelity measured on the
    calibration data and its latency measured here, and the fastest that meets the tolerance wins
    (``fxopt.search``; the table is printed and kept in ``report()["candidates"]``).

    ``calibration_data`` (a list, a ``DataLoader`` or a generator of input tuples) is streamed, never held
    as a whole: a re-iterable is iterated again for each pass, a one-shot iterator is spilled to a temporary
    file first (``fxopt.passes.infra.batches``). Memory freed on the way goes back to the OS (``fxopt.passes.infra.memory``).
    """
    with trimming_while_resident_grows():
        return _optimize(model, example_inputs, target, preset, passes, calibration_data, tolerance, metric,
                         progress)


def _optimize(model, example_inputs, target, preset, passes, calibration_data, tolerance, metric,
              progress) -> OptimizedModel:
    _check_target(target)
    pipeline = _pipeline(preset, passes, target)
    original = capture(model, example_inputs)
    result = pipeline(original)
    stats: Dict[str, Any] = {"passes": result.stats}
    stats["graph_before"] = graph_outline(original)
    layer_mask = padding_mask(original, example_inputs)  # padding positions left out of the per-layer error
    if tolerance is not None:
        if target == "cuda":
            raise InputError("optimize: tolerance= (the search) is not supported for target='cuda' yet: it would "
                             "measure every candidate on the GPU; drop tolerance (cuda builds one float16 "
                             "pipeline, relative error ~1e-3 on BERT), or search with target='x86-int8'/'eager'")
        optimized = _search(original, result.graph, pipeline.spec, example_inputs, target, calibration_data,
                            parse_tolerance(tolerance, metric), stats, progress)
    elif target == "eager":
        optimized = OptimizedModel(eager.lower(result.graph), result.graph, target, pipeline.spec, original, stats)
    elif target == "cuda":
        return _optimize_cuda(original, result.graph, pipeline.spec, stats)  # its error is on the GPU, not here
    else:
        started = time.perf_counter()
        _say(progress, "fxopt x86-int8: smooth-quant, calibrate int8 ranges, insert Q/DQ ...")
        quantized, spec = quantize_for_x86(result.graph, example_inputs, calibration_data, progress=progress)
        stats["quantize"] = {"spec": spec, "seconds": round(time.perf_counter() - started, 1)}
        # compared before lowering, and the fused graph (its merged weights) dropped: lowering is the peak
        layer_errors = per_layer_error(result.graph, quantized, tuple(example_inputs), mask=layer_mask)
        fused_bytes = result.graph.size_bytes_not_in(original)
        del result
        release_dropped_graphs(fused_bytes)
        _say(progress, f"fxopt x86-int8: lowering to the int8 kernels of this CPU ({x86_int8.detect_isa().name}) ...")
        runner = x86_int8.lower(quantized, example_inputs=tuple(example_inputs), progress=progress)
        stats["lowering"] = runner.report.as_dict()
        stats["per_layer_error"] = layer_errors
        optimized = OptimizedModel(runner, quantized, target, f"{pipeline.spec},{spec}", original, stats)
        return _with_measured_latency(optimized, example_inputs, progress)
    # layer by layer against the pipeline's graph (whose node names the lossy steps keep), on the example inputs
    stats["per_layer_error"] = per_layer_error(result.graph, optimized.graph, tuple(example_inputs),
                                               mask=layer_mask)
    return optimized if tolerance is not None else _with_measured_latency(optimized, example_inputs, progress)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _with_measured_latency(optimized: OptimizedModel, example_inputs, progress: bool = False) -> OptimizedModel:
    """Time the optimized model against the original on the example inputs, for its report (the search times
    its candidates itself): medians of REPORT_LATENCY_ROUNDS interleaved rounds, on this machine."""
    _say(progress, f"fxopt: timing the result against the original ({REPORT_LATENCY_ROUNDS} interleaved rounds) ...")
    seconds = compare_latency({"original": optimized.original_graph.run, "optimized": optimized.runner},
                              tuple(example_inputs), repeats=REPORT_LATENCY_ROUNDS, warmup=1)
    optimized.stats.update(latency_ms=seconds["optimized"] * 1e3, original_latency_ms=seconds["original"] * 1e3,
                           latency_rounds=REPORT_LATENCY_ROUNDS)
    return optimized


def _optimize_cuda(original: Graph, graph: Graph, spec: str, stats: Dict[str, Any]) -> OptimizedModel:
    from fxopt.backends.tvm_cuda import deploy
    started = time.perf_counter()
    runner = deploy.build_target(graph)
    stats["lowering"] = {**deploy.build_summary(runner), "seconds": round(time.perf_counter() - started, 1)}
    return OptimizedModel(runner, graph, "cuda", spec, original, stats)


def _search(original: Graph, fused: Graph, spec: str, example_inputs, target: str, calibration_data,
            tolerance: Tolerance, stats: Dict[str, Any], progress: bool) -> OptimizedModel:
    with _calibration_batches(example_inputs, calibration_data, warn=target != "eager") as batches:
        fit, check = held_out_split(batches)
        candidates = list(_candidates(original, fused, spec, target, fit, tolerance, progress))
        found = measure_and_choose(candidates, original, check, example_inputs, tolerance, progress=progress)
    if progress:
        print(f"fxopt search ({target}, tolerance {tolerance.describe()}), measured on this machine:\n"
              f"{found.table()}")
    chosen = found.chosen
    if chosen.target == x86_int8.TARGET:  # candidates were timed on the eager kernels; the winner may compile
        chosen.runner = x86_int8.lower(chosen.graph, warn=False, example_inputs=tuple(example_inputs),
                                       progress=progress)
        chosen.stats["lowering"] = chosen.runner.report.as_dict()
    stats.update(chosen.stats, search=found.as_dict(), latency_ms=chosen.latency_ms, tolerance={tolerance.kind: tolerance.bound},
                 original_latency_ms=found.original_latency_ms, candidates=[c.as_dict() for c in candidates],
                 fidelity_batches={"fit": fit.count(), "held_out": check.count() if check is not fit else 0})
    return OptimizedModel(chosen.runner, chosen.graph, chosen.target, chosen.pipeline, original, stats)


def _candidates(original: Graph, fused: Graph, spec: str, target: str, batches, tolerance: Tolerance,
                progress: bool):
    """Every candidate pipeline for ``target``, built (not yet measured): float first, then compressed ones."""
    yield Candidate("float", spec, fused, eager.lower(fused), "eager", compressed=False)
    yield from _low_rank_candidates(fused, spec, batches, progress)
    if target != x86_int8.TARGET:
        return
    calibrated = calibrate_for_x86(fused, batches, progress)
    quantized, qspec = insert_qdq_for_x86(calibrated, calibration=batches)
    yield _x86_candidate("int8", f"{spec},{qspec}", quantized)
    mixed = _mixed_precision_candidate(original, calibrated, spec, batches, tolerance, progress)
    if mixed is not None:
        yield mixed


def _low_rank_candidates(fused: Graph, spec: str, batches, progress: bool):
    """Float candidates whose linears are factored (whitened SVD) to keep :data:`LOW_RANK_RATIOS` of their weights."""
    sample = batches.take(0, PASS_CALIBRATION_BATCHES)  # whitening reads its activations
    for ratio in LOW_RANK_RATIOS:
        step = LowRank(ratio=ratio, activation_aware=True, statistic="covariance", calibration=sample)
        result = step(fused)
        if result.modified:
            yield Candidate(f"low-rank {ratio:g}", f"{spec},{step.spec()}", result.graph, eager.lower(result.graph),
                            "eager", compressed=True, stats={"low_rank": result.stats})


def _mixed_precision_candidate(original: Graph, calibrated: Graph, spec: str, batches, tolerance: Tolerance,
                               progress: bool) -> Optional[Candidate]:
    """int8 with the most sensitive linears in float: as many as the *lowered* model needs to meet ``tolerance``.

    The plan is made on the Q/DQ graph; the lowered model (float16-stored float layers, oneDNN's
    rounding) can land just outside, so layers are added in sensitivity order until it meets.
    """
    error_metric, bound = tolerance.as_error_metric()
    plan = float_layers_for(calibrated, batches, bound, error_metric, progress)
    if not plan.float_layers:  # int8 alone is within the tolerance
        return None
    ranked = [row.name for row in plan.rows]
    reference = run_outputs(original, batches)
    for kept in range(len(plan.float_layers), len(ranked)):
        graph, mspec = insert_qdq_for_x86(calibrated, ranked[:kept], calibration=batches)
        candidate = _x86_candidate(f"int8, {kept} of {len(ranked)} layers float", f"{spec},{mspec}", graph,
                                   {"mixed_precision": plan.format()})
        if tolerance.meets(tolerance.value(reference, run_outputs_of(candidate.runner, batches))):
            return candidate
    return None


def _x86_candidate(name: str, pipeline: str, graph: Graph, stats: Optional[dict] = None) -> Candidate:
    runner = x86_int8.lower(graph, compile="never")  # compiling every candidate would take minutes
    return Candidate(name, pipeline, graph, runner, x86_int8.TARGET, compressed=True,
                     stats={**(stats or {}), "lowering": runner.report.as_dict()})


def quantize_for_x86(graph: Graph, example_inputs, calibration_data, tolerance: Optional[float] = None,
                     metric: Optional[Callable] = None, progress: bool = True):
    """Smooth-quant, calibrate and insert static int8 Q/DQ the way the x86 int8 kernels want them.

    ``tolerance`` (a relative-error bound, or ``metric``'s) keeps the most sensitive linears' activations
    in float until the error is within it. Without it, on CPUs without VNNI (7-bit weights there), the
    :data:`NO_VNNI_FLOAT_ACTIVATION_SHARE` most sensitive linears keep float activations.
    """
    with _calibration_batches(example_inputs, calibration_data) as batches:
        calibrated = calibrate_for_x86(graph, batches, progress)
        if tolerance is not None:
            skip = float_layers_for(calibrated, batches, tolerance, metric, progress).float_layers
        elif x86_weight_bits() < 8:
            skip = most_sensitive_layers(calibrated, batches.take(0, 1), NO_VNNI_FLOAT_ACTIVATION_SHARE, progress)
        else:
            skip = ()
        quantized = insert_qdq_for_x86(calibrated, skip, calibration=batches)
    smoothed_bytes = calibrated.size_bytes_not_in(graph)
    del calibrated
    release_dropped_graphs(smoothed_bytes)  # the smoothed float weights, as large as the linears, go with it
    return quantized


def most_sensitive_layers(calibrated: Graph, batches, share: float, progress: bool = True) -> Tuple[str, ...]:
    """The ``share`` of quantizable linears whose quantization alone costs the most output error."""
    plan = float_layers_for(calibrated, batches, math.inf, progress=progress)  # the ranking only
    return tuple(row.name for row in plan.rows[:math.ceil(share * len(plan.rows))])


def calibrate_for_x86(graph: Graph, batches, progress: bool = True) -> Graph:
    """Smooth-quant (alpha 0.8) and calibrate int8 activation ranges."""
    return calibrate_smoothed(graph, batches, SMOOTH_ALPHA, progress=progress, qdtype="int8")


def x86_weight_bits() -> int:
    """8, or 7 on CPUs without VNNI: there 7-bit weights keep the int8 GEMM exact on 8-bit activations
    (fxopt/backends/x86_int8/isa.py; on MiniLM that beats 7-bit activations, benchmarks/results/x86_int8_cpu2.md)."""
    return 8 if x86_int8.detect_isa().exact_8bit else 7


def float_layers_for(calibrated: Graph, batches, tolerance: float, metric: Optional[Callable] = None,
                     progress: bool = True):
    """The mixed-precision plan that keeps linears in float until the error is within ``tolerance``."""
    options = {"metric": metric} if metric is not None else {}
    return choose_float_layers(calibrated, batches, tolerance, activation_matmuls=False, progress=progress,
                               **options)


def insert_qdq_for_x86(calibrated: Graph, skip=(), calibration: Optional[Batches] = None):
    """Static int8 Q/DQ (embeddings too; 7-bit weights GPTQ-rounded on ``calibration``'s first batches); the
    ``skip``ped linears keep float activations with int8 weights.

    Weight-only int8 for the float-activation layers keeps the artifact as small as all-int8 (the x86
    backend dequantizes those weights once, at load); on MiniLM it loses far less than their
    activations' quantization did (benchmarks/results/x86_int8_cpu2.md).
    """
    bits = x86_weight_bits()
    # GPTQ rounding for 7-bit weights: MiniLM on AVX2 0.9975/0.938 -> 0.9983/0.961 (cosine/NN). For 8-bit
    # weights it raised the cosine (0.9980 -> 0.9985) but not NN agreement, so round-to-nearest stays there.
    sample = None if calibration is None else as_batches(calibration).take(0, PASS_CALIBRATION_BATCHES)
    insert = InsertQDQ(scheme="static", activation_matmuls=False, embeddings=True, skip=tuple(skip),
                       bits=bits, method="gptq" if bits < 8 else "rtn", calibration=sample)
    steps = [insert] + ([InsertQDQ(scheme="weight-only", activation_matmuls=False)] if skip else [])
    graph = calibrated
    for step in steps:
        graph = step(graph).graph
    return graph, ",".join(step.spec() for step in steps)


def load(directory: Union[str, Path], allow_torch_mismatch: bool = False,
         compile: Optional[str] = None) -> OptimizedModel:
    """Load an artifact written by :meth:`OptimizedModel.save`: checksums and versions are verified first.

    ``allow_torch_mismatch=True`` accepts an artifact saved under another torch major.minor, with a warning.
    ``compile`` (x86-int8 only): by default the kernel path that ``optimize`` measured faster, where this CPU
    has the ISA it was built on (compiled with TorchInductor, or the eager int8 kernels), else ``"auto"``
    (compile, time both, keep the faster); ``"never"`` loads in seconds on the eager int8 kernels
    (``fxopt.backends.x86_int8.lower``).
    """
    from fxopt.backends.artifact import load_artifact
    graph, manifest = load_artifact(directory, allow_torch_mismatch)
    target = manifest.get("target")
    pipeline = (manifest.get("extra") or {}).get("pipeline", "")
    if target == "eager":
        return OptimizedModel(eager.lower(graph), graph, target, pipeline)
    if target == x86_int8.TARGET:
        built_with = ((manifest.get("extra") or {}).get("report") or {}).get("lowering")
        runner = x86_int8.lower(graph, compile=compile, built_with=built_with)
        return OptimizedModel(runner, graph, target, pipeline, stats={"lowering": runner.report.as_dict()})
    if target == "cuda":
        from fxopt.backends.tvm_cuda import deploy
        return OptimizedModel(deploy.load_target(graph, str(directory)), graph, target, pipeline)
    raise ArtifactError(f"{directory}: target {target!r} cannot be loaded by fxopt.load; "
                        f"it loads {', '.join(TARGETS)} artifacts")


# ------------------------------------------------------------------ helpers
def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise InputError(f"optimize: unknown target {target!r}; valid targets: {', '.join(TARGETS)}")


def _pipeline(preset: Optional[str], passes, target: str = "eager") -> Pipeline:
    if passes is not None and preset is not None:
        raise InputError("optimize: pass either preset= or passes=, not both")
    if passes is not None:
        return passes if isinstance(passes, Pipeline) else Pipeline(passes)
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise InputError(f"optimize: unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return Pipeline(CUDA_PIPELINE if target == "cuda" else PRESETS[name])


def _calibration_batches(example_inputs, calibration_data, warn: bool = True) -> Batches:
    """The calibration data as :class:`Batches`: streamed per pass, never held (a generator is spilled to disk)."""
    if calibration_data is None:
        if warn:
            warnings.warn("optimize(target='x86-int8'): no calibration_data; calibrating on the example inputs "
                          "alone. Pass a few hundred representative samples (a list of input tuples) for accuracy",
                          stacklevel=3)
        return Batches([tuple(example_inputs)])
    batches = Batches(calibration_data)
    if batches.is_empty():
        batches.close()
        raise InputError("optimize: calibration_data is empty; pass a list of input tuples like example_inputs")
    return batches


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
