"""How the ``cuda`` target quantizes a graph for a precision, and which linears it keeps in float16.

    spec = precision_spec("int4-weight", settings, keep=("linear_4",))   # the pipeline spec
    plan = plan_keep_float(graph, "fp8", settings, batches)              # mixed precision, measured

Mixed precision (the target's ``keep_float`` option): each linear the precision takes is quantized alone, every
other one left in float, and the model's output fidelity measured on the calibration batches: its sensitivity.
The most sensitive linears stay float16 GEMMs, the rest take the precision's kernel; no other op is involved, so
the graph holds only what the cuda backend lowers (``fxopt.linear_fp8``, ``fxopt.linear_int8``,
``fxopt.linear_int4`` and plain linears). ``keep_float=N`` keeps the N most sensitive; ``"auto"`` keeps as many
as it takes for the fidelity to reach ``fidelity`` (the option; :data:`DEFAULT_FIDELITY` by precision).

Fidelity is the mean per-sample cosine of the outputs against the unquantized graph's
(:func:`fxopt.search.mean_sample_cosine`), with padded tokens zeroed where the graph takes an ``attention_mask``
(their states are never read). It is measured on the first :data:`SENSITIVITY_BATCHES` calibration batches only:
the search costs one run of them per linear, plus a few for the choice. For int4 the sensitivities are measured
with round-to-nearest codes (GPTQ per probe would cost a Hessian pass each); the choice itself is checked with the
rounding the build uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from fxopt.ir import Graph
from fxopt.passes.infra.batches import as_batches
from fxopt.passes.infra.memory import release_dropped_graphs
from fxopt.passes.infra.pipeline import Pipeline
from fxopt.passes.infra.progress import progress_bar
from fxopt.passes.quantize.calibrate import is_weight
from fxopt.passes.quantize.fp8 import FP8_MULTIPLE
from fxopt.passes.quantize.gemm_linears import linears_to_quantize
from fxopt.passes.quantize.int8 import INT8_MULTIPLE
from fxopt.passes.quantize.mixed_precision import run_outputs
from fxopt.report.layer_error import padding_mask
from fxopt.search import mean_sample_cosine
from fxopt.targets.calibration import PASS_CALIBRATION_BATCHES

#: keep_float="auto": the output fidelity (padding-masked mean sample cosine, on the calibration batches) the
#: float16 linears are added until. Set so that the real all-MiniLM-L6-v2 meets issue 22's bars on 256 held-out
#: sentences (benchmarks/results/minilm_cuda_fidelity.md).
DEFAULT_FIDELITY = {"fp8": 0.99978, "int8": 0.99959, "int4-weight": 0.99946}
#: Calibration batches the sensitivities and the choice are measured on.
SENSITIVITY_BATCHES = PASS_CALIBRATION_BATCHES
#: The precisions that quantize linears, and the GEMM's multiple for in and out (int4: the group divides in).
GEMM_MULTIPLE = {"fp8": FP8_MULTIPLE, "int8": INT8_MULTIPLE}


def precision_spec(precision: str, settings: Mapping[str, Any], keep: Sequence[str] = (),
                   rounding: Optional[str] = None) -> str:
    """The pipeline spec quantizing every linear the precision takes but those in ``keep`` (int4: ``rounding``
    overrides the ``int4_rounding`` setting)."""
    skip = f"skip={';'.join(keep)}" if keep else ""
    if precision == "fp8":
        return f"quantize-fp8{{{skip}}}" if skip else "quantize-fp8"
    if precision == "int8":
        return f"smooth-quant{{alpha={settings['smooth_alpha']}}},quantize-int8" + (f"{{{skip}}}" if skip else "")
    options = [f"scheme=weight-only,bits=4,group-size={settings['int4_group']}"]
    if settings["int4_zero_point"]:
        options.append("symmetric=false")
    options.append(f"method={rounding or settings['int4_rounding']}")
    return f"insert-qdq{{{','.join(options + ([skip] if skip else []))}}},int4-linear"


def quantizable_linears(graph: Graph, precision: str, settings: Mapping[str, Any]) -> List[str]:
    """The linear nodes the precision quantizes, in graph order."""
    if precision in GEMM_MULTIPLE:
        return [n.name for n in linears_to_quantize(graph, (), GEMM_MULTIPLE[precision])[0]]
    group = settings["int4_group"]
    return [n.name for n in graph.call_nodes(torch.ops.aten.linear.default)
            if is_weight(n.args[1]) and graph.param(n.args[1]).shape[1] % group == 0]


def int4_unfit(graph: Graph, settings: Mapping[str, Any]) -> List[str]:
    """Linears with a weight parameter whose input columns the int4 group does not divide: they stay float16."""
    taken = set(quantizable_linears(graph, "int4-weight", settings))
    return [n.name for n in graph.call_nodes(torch.ops.aten.linear.default)
            if is_weight(n.args[1]) and n.name not in taken]


def quantize(graph: Graph, precision: str, settings: Mapping[str, Any], keep: Sequence[str], batches,
             rounding: Optional[str] = None) -> Tuple[Graph, str, Dict[str, Any]]:
    """``(quantized graph, its spec, the passes' stats)``; GPTQ reads the first calibration batches."""
    keep = tuple(keep) + (tuple(int4_unfit(graph, settings)) if precision == "int4-weight" else ())
    spec = precision_spec(precision, settings, keep, rounding)
    result = Pipeline(spec, calibration=as_batches(batches).take(0, PASS_CALIBRATION_BATCHES))(graph)
    return result.graph, spec, result.stats


@dataclass
class KeepFloatPlan:
    """The linears' sensitivities (most sensitive first) and the ones kept in float16."""

    #: (linear, fidelity with only it quantized), most sensitive first
    sensitivity: List[Tuple[str, float]]
    keep: Tuple[str, ...]
    #: fidelity with every linear quantized, and with ``keep`` in float16 (None: not measured)
    fidelity_all_quantized: Optional[float]
    fidelity: Optional[float]
    target: Optional[float] = None
    #: (linears kept, fidelity) for each choice measured
    tried: List[Tuple[int, float]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"keep_float": list(self.keep), "kept": len(self.keep), "of": len(self.sensitivity),
                "fidelity_target": self.target, "fidelity_all_quantized": self.fidelity_all_quantized,
                "fidelity": self.fidelity, "tried": self.tried,
                "sensitivity": [{"linear": n, "fidelity_alone": f} for n, f in self.sensitivity]}


class FidelityMeter:
    """The fidelity of ``graph`` quantized for ``precision`` with some linears kept float, on ``batches``."""

    def __init__(self, graph: Graph, precision: str, settings: Mapping[str, Any], batches):
        self.graph, self.precision, self.settings = graph, precision, settings
        self.batches = list(as_batches(batches).take(0, SENSITIVITY_BATCHES))
        self.mask = padding_mask(graph, self.batches[0])
        self.reference = self._masked(run_outputs(graph, self.batches))

    def __call__(self, keep: Sequence[str], rounding: Optional[str] = None) -> float:
        quantized = quantize(self.graph, self.precision, self.settings, keep, self.batches, rounding)[0]
        fidelity = mean_sample_cosine(self.reference, self._masked(run_outputs(quantized, self.batches)))
        dropped = quantized.size_bytes_not_in(self.graph)
        del quantized
        release_dropped_graphs(dropped)
        return fidelity

    def _masked(self, outputs):
        """Each batch's outputs with the padded tokens' rows zeroed (outputs shaped [batch, tokens, ...])."""
        if self.mask is None:
            return outputs
        masked = []
        for batch, tensors in zip(self.batches, outputs):
            rows = self.mask(batch)
            masked.append([t * rows.reshape(*rows.shape, *[1] * (t.dim() - 2)).to(t.dtype)
                           if t.shape[:2] == rows.shape else t for t in tensors])
        return masked


def plan_keep_float(graph: Graph, precision: str, settings: Mapping[str, Any], batches,
                    progress: bool = False) -> KeepFloatPlan:
    """Rank the linears by sensitivity; keep ``settings["keep_float"]`` of them (a count), or as many as the
    fidelity target needs (``"auto"``)."""
    meter = FidelityMeter(graph, precision, settings, batches)
    names = quantizable_linears(graph, precision, settings)
    probe = "rtn" if precision == "int4-weight" else None
    rows = []
    for name in progress_bar(names, f"cuda {precision}: sensitivity", "linear", progress):
        rows.append((name, meter([n for n in names if n != name], probe)))
    rows.sort(key=lambda row: row[1])
    ranked = [name for name, _ in rows]
    if settings["keep_float"] != "auto":
        keep = tuple(ranked[:settings["keep_float"]])
        return KeepFloatPlan(rows, keep, None, meter(keep) if keep else None)
    target = settings["fidelity"] or DEFAULT_FIDELITY[precision]
    return _auto(meter, rows, ranked, target)


def _auto(meter: FidelityMeter, rows, ranked: List[str], target: float) -> KeepFloatPlan:
    """The fewest most-sensitive linears whose float16 meets ``target``: start where the losses, taken as
    additive, predict it, then step down while it still meets and up until it does (each step measured)."""
    tried: Dict[int, float] = {0: meter(())}
    if tried[0] >= target:
        return KeepFloatPlan(rows, (), tried[0], tried[0], target, sorted(tried.items()))
    kept = _predicted(rows, 1.0 - tried[0], 1.0 - target)
    measure = lambda k: tried.setdefault(k, meter(ranked[:k]) if k < len(ranked) else 1.0)  # noqa: E731
    while kept > 0 and measure(kept) >= target and measure(kept - 1) >= target:
        kept -= 1
    while measure(kept) < target and kept < len(ranked):
        kept += 1
    return KeepFloatPlan(rows, tuple(ranked[:kept]), tried[0], tried[kept], target, sorted(tried.items()))


def _predicted(rows, loss_all: float, loss_allowed: float) -> int:
    """How many of the most sensitive linears to keep if their losses (1 - fidelity alone) add up to ``loss_all``."""
    losses = [max(1.0 - f, 0.0) for _, f in rows]
    total = sum(losses) or 1.0
    removed = 0.0
    for kept, loss in enumerate(losses):
        if loss_all * (1.0 - removed / total) <= loss_allowed:
            return kept
        removed += loss
    return len(losses)


def check_count(value: Any) -> bool:
    return isinstance(value, int) and value >= 0


def check_fidelity(value: Any) -> bool:
    return isinstance(value, float) and 0.0 < value <= 1.0 and not math.isnan(value)
