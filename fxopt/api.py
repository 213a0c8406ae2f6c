"""``fxopt.optimize``: one call from a PyTorch model to something faster that runs; ``fxopt.load`` for artifacts.

    optimized = fxopt.optimize(model, example_inputs, target="x86-int8", calibration_data=batches)
    optimized(*inputs)              # like model(*inputs)
    optimized.save("minilm-int8")   # manifest.json + graph.json + weights.safetensors
    again = fxopt.load("minilm-int8")

Targets:
- ``eager``: the pipeline's graph run by PyTorch (default pipeline ``fuse``);
- ``x86-int8``: fusion, then smooth-quant and static int8 (per-tensor activations
  calibrated on ``calibration_data``, per-channel int8 weights, int8 embedding
  tables), lowered to oneDNN int8 kernels for this CPU's ISA. ``tolerance``
  keeps the most sensitive linears in float until the output error is within it
  (mixed precision, ``fxopt.passes.quantize.choose_float_layers``).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Union

import torch

from fxopt.backends import eager
from fxopt.backends import x86_int8
from fxopt.errors import ArtifactError, InputError
from fxopt.ir import Graph, capture
from fxopt.passes import Pipeline
from fxopt.passes.quantize import calibrate_smoothed, choose_float_layers
from fxopt.passes.quantize.half_weights import HalfWeights
from fxopt.passes.quantize.insert_qdq import InsertQDQ

TARGETS = ("eager", "x86-int8")
#: Pipelines a preset names, per target (quantization is added by the x86-int8 target itself).
PRESETS = {"fast": "fuse", "balanced": "fuse", "small": "fuse"}
DEFAULT_PRESET = "balanced"
#: Smooth-quant's migration strength for x86-int8 (issue 5: best fidelity on MiniLM at 0.8).
SMOOTH_ALPHA = 0.8


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
        """Sizes, parameter counts, the pipeline and what each step did."""
        out = {"target": self.target, "pipeline": self.pipeline, "params": self.graph.param_count(),
               "size_bytes": self.graph.size_bytes(), **self.stats}
        if self.original_graph is not None:
            out["original_params"] = self.original_graph.param_count()
            out["original_size_bytes"] = self.original_graph.size_bytes()
        return out

    def save(self, directory: Union[str, Path]) -> Path:
        """Write an artifact directory (atomically) that :func:`load` reads back without the model's source."""
        from fxopt.backends.artifact import save_artifact
        extra = {"pipeline": self.pipeline, "report": _jsonable(self.report())}
        return save_artifact(self.graph, directory, target=self.target, extra=extra)


def optimize(model: torch.nn.Module, example_inputs: Sequence[Any], target: str = "eager",
             preset: Optional[str] = None, passes: Optional[Union[str, Pipeline]] = None,
             calibration_data: Optional[Iterable[Sequence[torch.Tensor]]] = None,
             tolerance: Optional[float] = None, metric: Optional[Callable] = None,
             progress: bool = True) -> OptimizedModel:
    """Capture ``model``, run the target's pipeline, lower it. The model itself is never changed."""
    _check_target(target)
    pipeline = _pipeline(preset, passes)
    original = capture(model, example_inputs)
    result = pipeline(original)
    stats: Dict[str, Any] = {"passes": result.stats}
    if target == "eager":
        return OptimizedModel(eager.lower(result.graph), result.graph, target, pipeline.spec, original, stats)
    started = time.perf_counter()
    quantized, spec = quantize_for_x86(result.graph, example_inputs, calibration_data, tolerance, metric, progress)
    stats["quantize"] = {"spec": spec, "seconds": round(time.perf_counter() - started, 1)}
    runner = x86_int8.lower(quantized)
    stats["lowering"] = runner.report.as_dict()
    return OptimizedModel(runner, quantized, target, f"{pipeline.spec},{spec}", original, stats)


def quantize_for_x86(graph: Graph, example_inputs, calibration_data, tolerance: Optional[float] = None,
                     metric: Optional[Callable] = None, progress: bool = True):
    """Smooth-quant, calibrate and insert static int8 Q/DQ the way the x86 int8 kernels want them."""
    batches = _calibration_batches(example_inputs, calibration_data)
    # Without VNNI the int8 GEMM is exact only on 7-bit activation codes (see fxopt/backends/x86_int8/isa.py).
    qdtype = "int8" if x86_int8.detect_isa().exact_8bit else "int7"
    calibrated = calibrate_smoothed(graph, batches, SMOOTH_ALPHA, progress=progress, qdtype=qdtype)
    skip = ()
    if tolerance is not None:
        options = {"metric": metric} if metric is not None else {}
        plan = choose_float_layers(calibrated, batches, tolerance, activation_matmuls=False, progress=progress,
                                   **options)
        skip = plan.float_layers
    insert = InsertQDQ(scheme="static", activation_matmuls=False, embeddings=True, skip=skip)
    quantized = HalfWeights()(insert(calibrated).graph).graph  # the linears kept in float: float16 on disk
    return quantized, f"{insert.spec()},{HalfWeights().spec()}"


def load(directory: Union[str, Path], allow_torch_mismatch: bool = False) -> OptimizedModel:
    """Load an artifact written by :meth:`OptimizedModel.save`: checksums and versions are verified first.

    ``allow_torch_mismatch=True`` accepts an artifact saved under another torch major.minor, with a warning.
    """
    from fxopt.backends.artifact import load_artifact
    graph, manifest = load_artifact(directory, allow_torch_mismatch)
    target = manifest.get("target")
    pipeline = (manifest.get("extra") or {}).get("pipeline", "")
    if target == "eager":
        return OptimizedModel(eager.lower(graph), graph, target, pipeline)
    if target == x86_int8.TARGET:
        runner = x86_int8.lower(graph)
        return OptimizedModel(runner, graph, target, pipeline, stats={"lowering": runner.report.as_dict()})
    raise ArtifactError(f"{directory}: target {target!r} cannot be loaded by fxopt.load; "
                        f"it loads {', '.join(TARGETS)} artifacts")


# ------------------------------------------------------------------ helpers
def _check_target(target: str) -> None:
    if target not in TARGETS:
        hint = (" (the CUDA backend is fxopt.backends.tvm_cuda; optimize() does not drive it yet)"
                if target == "cuda" else "")
        raise InputError(f"optimize: unknown target {target!r}{hint}; valid targets: {', '.join(TARGETS)}")


def _pipeline(preset: Optional[str], passes) -> Pipeline:
    if passes is not None and preset is not None:
        raise InputError("optimize: pass either preset= or passes=, not both")
    if passes is not None:
        return passes if isinstance(passes, Pipeline) else Pipeline(passes)
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise InputError(f"optimize: unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return Pipeline(PRESETS[name])


def _calibration_batches(example_inputs, calibration_data):
    if calibration_data is None:
        warnings.warn("optimize(target='x86-int8'): no calibration_data; calibrating on the example inputs alone. "
                      "Pass a few hundred representative samples (a list of input tuples) for accuracy",
                      stacklevel=3)
        return [tuple(example_inputs)]
    batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in calibration_data]
    if not batches:
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
