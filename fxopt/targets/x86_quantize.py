"""How the x86-int8 target quantizes: smooth-quant, calibrated static int8, the sensitive linears kept in float.

Shared by its build (one quantized graph) and its search candidates (int8, and int8 with some linears in float).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

from fxopt.backends import x86_int8
from fxopt.ir import Graph
from fxopt.passes.infra.batches import Batches, as_batches
from fxopt.targets.calibration import PASS_CALIBRATION_BATCHES, calibration_batches
from fxopt.passes.infra.memory import release_dropped_graphs
from fxopt.passes.quantize import calibrate_smoothed, choose_float_layers
from fxopt.passes.quantize.insert_qdq import InsertQDQ

#: Smooth-quant's migration strength for x86-int8 (issue 5: best fidelity on MiniLM at 0.8).
SMOOTH_ALPHA = 0.8
#: Without VNNI (7-bit weights), the share of linears whose activations stay float by default, the most
#: sensitive first: on MiniLM (AVX2) 6 of 25 lift held-out cosine / NN agreement from 0.9974 / 0.922 to
#: 0.9982 / 0.961 at the same 23 MB (benchmarks/results/x86_int8_cpu2.md).
NO_VNNI_FLOAT_ACTIVATION_SHARE = 0.25


def quantize_for_x86(graph: Graph, example_inputs, calibration_data, progress: bool = True,
                     float_share: Optional[float] = None) -> Tuple[Graph, str]:
    """``(quantized graph, its pipeline spec)``: smooth-quant, calibrate and insert static int8 Q/DQ the way the
    x86 int8 kernels want them, on ``calibration_data`` (input tuples; the example inputs when None)."""
    with calibration_batches(example_inputs, calibration_data) as batches:
        return quantize_with(graph, batches, progress, float_share)


def quantize_with(graph: Graph, batches: Batches, progress: bool = True,
                  float_share: Optional[float] = None, isa=None) -> Tuple[Graph, str]:
    """:func:`quantize_for_x86` on calibration :class:`Batches`, for ``isa`` (default: this CPU's).
    ``float_share`` of the most sensitive linears keep float activations; by default
    :data:`NO_VNNI_FLOAT_ACTIVATION_SHARE` on CPUs without VNNI (7-bit weights there), none with it."""
    if float_share is None:
        float_share = NO_VNNI_FLOAT_ACTIVATION_SHARE if x86_weight_bits(isa) < 8 else 0.0
    calibrated = calibrate_for_x86(graph, batches, progress)
    skip = most_sensitive_layers(calibrated, batches.take(0, 1), float_share, progress) if float_share else ()
    quantized, spec = insert_qdq_for_x86(calibrated, skip, calibration=batches, isa=isa)
    smoothed_bytes = calibrated.size_bytes_not_in(graph)
    del calibrated
    release_dropped_graphs(smoothed_bytes)  # the smoothed float weights, as large as the linears, go with it
    return quantized, spec


def most_sensitive_layers(calibrated: Graph, batches, share: float, progress: bool = True) -> Tuple[str, ...]:
    """The ``share`` of quantizable linears whose quantization alone costs the most output error."""
    plan = float_layers_for(calibrated, batches, math.inf, progress=progress)  # the ranking only
    return tuple(row.name for row in plan.rows[:math.ceil(share * len(plan.rows))])


def calibrate_for_x86(graph: Graph, batches, progress: bool = True) -> Graph:
    """Smooth-quant (alpha 0.8) and calibrate int8 activation ranges."""
    return calibrate_smoothed(graph, batches, SMOOTH_ALPHA, progress=progress, qdtype="int8")


def x86_weight_bits(isa=None) -> int:
    """8, or 7 for CPUs without VNNI (``isa``, default this CPU's): there 7-bit weights keep the int8 GEMM exact
    on 8-bit activations (fxopt/backends/x86_int8/isa.py; on MiniLM that beats 7-bit activations,
    benchmarks/results/x86_int8_cpu2.md)."""
    return 8 if (isa or x86_int8.detect_isa()).exact_8bit else 7


def float_layers_for(calibrated: Graph, batches, tolerance: float, metric: Optional[Callable] = None,
                     progress: bool = True):
    """The mixed-precision plan that keeps linears in float until the error is within ``tolerance``."""
    options = {"metric": metric} if metric is not None else {}
    return choose_float_layers(calibrated, batches, tolerance, activation_matmuls=False, progress=progress,
                               **options)


def insert_qdq_for_x86(calibrated: Graph, skip: Sequence[str] = (), calibration=None,
                       isa=None) -> Tuple[Graph, str]:
    """Static int8 Q/DQ (embeddings too; 7-bit weights GPTQ-rounded on ``calibration``'s first batches); the
    ``skip``ped linears keep float activations with int8 weights.

    Weight-only int8 for the float-activation layers keeps the artifact as small as all-int8 (the x86
    backend dequantizes those weights once, at load); on MiniLM it loses far less than their
    activations' quantization did (benchmarks/results/x86_int8_cpu2.md).
    """
    bits = x86_weight_bits(isa)
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
