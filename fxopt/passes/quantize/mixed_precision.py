"""mixed-precision: find the ops whose quantization costs most and keep them in floating point.

Sensitivity analysis quantizes one op (linear, matmul, conv) at a time, with
every other op in floating point, and measures the output error on calibration
data. The plan then keeps the most sensitive ops in floating point, one more at
a time, until the error with everything else quantized is within ``tolerance``:

    calibrated = fxopt.calibrate(graph, data)
    plan = choose_float_layers(calibrated, data, tolerance=0.02, scheme="static")
    print(plan.format())                                    # the per-layer table
    quantized = fxopt.Pipeline(plan.spec())(calibrated).graph   # insert-qdq{scheme=static,skip=...}

or, as one pass, handed the batches to measure on:

    quantized = fxopt.Pipeline("mixed-precision{tolerance=0.02}", calibration=data)(calibrated).graph

The error is ``metric(reference_outputs, outputs)``; the default is the relative
error ``||y - ŷ|| / ||y||`` over every floating-point output of every batch.
Where some outputs do not matter (padded tokens of a sentence encoder), pass a
metric that ignores them, e.g. ``fxopt.demo.embeddings.pooled_cosine_distance``.
The pass reports the table in its stats (``table``, ``float_layers``).

The error with more ops kept in float usually falls, but not always: on tiny
models the errors of two ops can cancel. Each sensitivity or plan step runs
insert-qdq and the graph over ``data``, so the search costs about two runs of
the data per op: give it a few batches.

This lives in quantize/ (not passes/mixed_precision.py) because it is built on
calibrate and insert-qdq; float mixed precision (to-half) is a separate pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

from fxopt.errors import PassError, op_name
from fxopt.passes.infra.batches import Batches, as_batches
from fxopt.ir.graph import Graph
from fxopt.passes.infra.progress import progress_bar
from fxopt.passes.infra.memory import release_dropped_graphs
from fxopt.passes.infra.base import Pass, PassResult, calibration_field
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.quantize.calibrate import quantizable_ops
from fxopt.passes.quantize.insert_qdq import SCHEMES, InsertQDQ

Outputs = List[List[torch.Tensor]]  # per batch, the floating-point output tensors
Metric = Callable[[Outputs, Outputs], float]


def relative_output_error(reference: Outputs, outputs: Outputs) -> float:
    """``||y - ŷ|| / ||y||`` over every output tensor of every batch, in float64."""
    diff = sum(float((a.double() - b.double()).pow(2).sum()) for ra, rb in zip(reference, outputs)
               for a, b in zip(ra, rb))
    norm = sum(float(a.double().pow(2).sum()) for ra in reference for a in ra)
    return (diff / norm) ** 0.5 if norm > 0 else diff ** 0.5


def run_outputs(graph: Graph, data: Sequence[tuple]) -> Outputs:
    """The floating-point output tensors of ``graph`` on each batch of ``data``."""
    outputs = []
    for batch in data:
        leaves = pytree.tree_leaves(graph.run(*batch))
        outputs.append([t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()])
    return outputs


@dataclass
class LayerSensitivity:
    name: str
    op: str
    #: Output error with only this op quantized.
    error: float
    #: Output error with this op and every more sensitive one in floating point (None: not measured).
    error_if_float: Optional[float] = None
    kept_float: bool = False


@dataclass
class MixedPrecisionPlan:
    """The sensitivity table, most sensitive first, and the ops it keeps in floating point."""

    rows: List[LayerSensitivity]
    scheme: str
    tolerance: float
    #: Output error with every op quantized, and with the chosen ops kept in floating point.
    quantized_error: float
    final_error: float
    activation_matmuls: bool = True

    @property
    def float_layers(self) -> Tuple[str, ...]:
        return tuple(r.name for r in self.rows if r.kept_float)

    def spec(self) -> str:
        """The insert-qdq pipeline spec that quantizes everything but ``float_layers``."""
        return InsertQDQ(scheme=self.scheme, activation_matmuls=self.activation_matmuls, skip=self.float_layers).spec()

    def format(self) -> str:
        """The per-layer table in Markdown."""
        lines = [f"mixed precision ({self.scheme}, tolerance {self.tolerance:.4g}): {len(self.float_layers)} of "
                 f"{len(self.rows)} ops kept in float; error {self.quantized_error:.4g} -> {self.final_error:.4g}",
                 "", "| rank | op node | op | error alone | error if float | decision |", "|---|---|---|---|---|---|"]
        for rank, r in enumerate(self.rows, 1):
            if_float = "" if r.error_if_float is None else f"{r.error_if_float:.4g}"
            decision = "kept float" if r.kept_float else "quantized"
            lines.append(f"| {rank} | {r.name} | {r.op} | {r.error:.4g} | {if_float} | {decision} |")
        return "\n".join(lines)


class _ErrorMeter:
    """The output error on ``data`` of ``graph`` quantized except for some ops, against ``graph`` in float."""

    def __init__(self, graph: Graph, data, scheme: str, metric: Metric, activation_matmuls: bool):
        self.graph, self.scheme, self.metric, self.activation_matmuls = graph, scheme, metric, activation_matmuls
        self.data = _batches(data)
        self.reference = run_outputs(graph, self.data)
        self._names: Optional[List[str]] = None

    def __call__(self, keep_float: Tuple[str, ...]) -> float:
        quantized = self._quantize(keep_float).graph
        error = self.metric(self.reference, run_outputs(quantized, self.data))
        quantized_bytes = quantized.size_bytes_not_in(self.graph)
        del quantized
        release_dropped_graphs(quantized_bytes)  # its quantized weights wait for the cyclic collector (fxopt.passes.infra.memory)
        return error

    def quantizable_names(self) -> List[str]:
        """The op nodes insert-qdq quantizes (those that read a dequantized value), by name."""
        if self._names is None:
            quantized = self._quantize(()).graph
            self._names = [n.name for n in quantized.call_nodes()
                           if n.target in quantizable_ops() and _reads_dequantized(n)]
            quantized_bytes = quantized.size_bytes_not_in(self.graph)
            del quantized
            release_dropped_graphs(quantized_bytes)
        return self._names

    def _quantize(self, keep_float: Tuple[str, ...]):
        return InsertQDQ(scheme=self.scheme, activation_matmuls=self.activation_matmuls, skip=keep_float)(self.graph)


def sensitivity(graph: Graph, data: Sequence[tuple], scheme: str = "static", metric: Metric = relative_output_error,
                activation_matmuls: bool = True, progress: bool = True) -> List[LayerSensitivity]:
    """Quantize one op at a time; its output error on ``data``, most sensitive first.

    ``graph`` must be calibrated for ``scheme=static``; ``data`` is a list of input tuples.
    """
    return _ranked(_ErrorMeter(graph, data, scheme, metric, activation_matmuls), progress)


def _ranked(meter: _ErrorMeter, progress: bool) -> List[LayerSensitivity]:
    names = meter.quantizable_names()
    rows = []
    for name in progress_bar(names, "sensitivity", "op", progress):
        error = meter(tuple(n for n in names if n != name))
        rows.append(LayerSensitivity(name, op_name(meter.graph.node(name)), error))
    return sorted(rows, key=lambda r: r.error, reverse=True)


def choose_float_layers(graph: Graph, data: Sequence[tuple], tolerance: float, scheme: str = "static",
                        metric: Metric = relative_output_error, activation_matmuls: bool = True,
                        progress: bool = True) -> MixedPrecisionPlan:
    """Keep the most sensitive ops in floating point, one more at a time, until the error is ≤ ``tolerance``."""
    check_options("mixed-precision", tolerance, scheme)
    meter = _ErrorMeter(graph, data, scheme, metric, activation_matmuls)
    rows = _ranked(meter, progress)
    quantized_error = error = meter(())
    kept = 0
    with progress_bar(None, "keep float", "op", progress, total=len(rows)) as bar:
        while error > tolerance and kept < len(rows):
            kept += 1
            error = meter(tuple(r.name for r in rows[:kept])) if kept < len(rows) else 0.0
            rows[kept - 1].kept_float, rows[kept - 1].error_if_float = True, error
            bar.update(1)
    return MixedPrecisionPlan(rows, scheme, tolerance, quantized_error, error, activation_matmuls)


def _reads_dequantized(node) -> bool:
    return any("dequantize" in str(getattr(a, "target", "")) for a in node.all_input_nodes)


def check_options(where: str, tolerance: float, scheme: str) -> None:
    if not tolerance >= 0:
        raise PassError(f"{where}: tolerance={tolerance} must be >= 0; it bounds the output error "
                        "(relative error by default)")
    if scheme not in SCHEMES:
        raise PassError(f"{where}: unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")


def _batches(data) -> Batches:
    """``data`` streamed: iterated afresh for the reference and for every candidate, never copied."""
    batches = as_batches(data)
    if batches.is_empty():
        raise PassError("mixed-precision: no data; pass at least one input tuple (a calibration batch)")
    return batches


@register_pass
@dataclass(frozen=True)
class MixedPrecision(Pass):
    name = "mixed-precision"
    summary = "quantize (insert-qdq), keeping the ops most sensitive to it in floating point until a tolerance is met"
    lossy = True
    #: The output error allowed, relative to the unquantized graph, on the ``calibration`` data.
    tolerance: float = 0.01
    scheme: str = "static"
    activation_matmuls: bool = True
    #: Input batches the errors are measured on (each candidate runs them all: give a few); not an option
    #: (see fxopt.passes.infra.base).
    calibration: Optional[Batches] = calibration_field()

    def __post_init__(self):
        super().__post_init__()
        check_options(self.name, self.tolerance, self.scheme)

    def run(self, graph: Graph) -> PassResult:
        data = self.require_calibration("its sensitivity search")
        plan = choose_float_layers(graph, data, self.tolerance, self.scheme,
                                   activation_matmuls=self.activation_matmuls, progress=False)
        result = InsertQDQ(scheme=self.scheme, activation_matmuls=self.activation_matmuls,
                           skip=plan.float_layers)(graph)
        stats = dict(result.stats, float_layers=list(plan.float_layers), quantized_error=plan.quantized_error,
                     final_error=plan.final_error, table=[vars(r) for r in plan.rows])
        return PassResult(result.graph, result.modified, stats)
