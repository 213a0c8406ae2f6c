"""fxopt.calibrate: run a graph over calibration batches and record activation QParams.

    calibrated = fxopt.calibrate(graph, batches, observer="minmax")
    result = fxopt.Pipeline("insert-qdq{scheme=static}")(calibrated)

The activations observed are the non-weight inputs of the ops that quantization
targets (linear, matmul, mm/bmm/addmm, convolutions and their fused
``fxopt.linear_act``/``conv_act`` forms). Each gets per-tensor QParams in its
node's metadata (``fxopt.ir.qparams(node)``). Inputs of linear ops also get
their per-input-channel (last dim) abs-max under ``CHANNEL_ABSMAX_KEY``, the
statistics ``smooth-quant`` needs. Batches are streamed: each one is run,
observed and dropped. None is kept: passes that read calibration data themselves
(GPTQ, activation-aware low-rank, mixed precision, Taylor pruning) are handed it
explicitly (``calibration=``, see ``fxopt.passes.infra.base``).
"""
from __future__ import annotations

import operator
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx

from fxopt.errors import InputError, PassError
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.progress import progress_bar
from fxopt.passes.infra.memory import return_freed_memory
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.quantize.observers import MinMaxObserver, Observer, make_observer

aten = torch.ops.aten
#: node.meta key of the per-input-channel abs-max (a 1-D tensor over the last dim) of a linear's input.
CHANNEL_ABSMAX_KEY = "fxopt_channel_absmax"


def quantizable_ops() -> Dict[object, Dict[str, Sequence[int]]]:
    """Target -> which args are activations (``acts``) and which is the weight and its channel axis.

    ``weight`` is ``(arg index, output-channel axis)``; the axis may be negative.
    """
    ops = fxopt_ops()
    conv = {"acts": (0,), "weight": (1, 0)}
    return {
        aten.linear.default: {"acts": (0,), "weight": (1, 0)},
        ops.linear_act.default: {"acts": (0,), "weight": (1, 0)},
        aten.matmul.default: {"acts": (0, 1), "weight": (1, -1)},
        aten.mm.default: {"acts": (0, 1), "weight": (1, -1)},
        aten.bmm.default: {"acts": (0, 1), "weight": (1, -1)},
        aten.addmm.default: {"acts": (1, 2), "weight": (2, -1)},
        aten.conv1d.default: conv, aten.conv2d.default: conv, aten.conv3d.default: conv,
        aten.convolution.default: conv, ops.conv_act.default: conv,
    }


def linear_targets() -> tuple:
    """Ops computing ``x @ weight.T (+ bias)`` with ``weight`` ``[out, in]``: the input channel is x's last dim."""
    return aten.linear.default, fxopt_ops().linear_act.default


def is_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def activation_inputs(node: fx.Node) -> List[fx.Node]:
    """The floating-point, non-weight inputs of a quantizable op that quantization would observe."""
    spec = quantizable_ops().get(node.target)
    if node.op != "call_function" or spec is None:
        return []
    found = []
    for i in spec["acts"]:
        arg = node.args[i] if i < len(node.args) else None
        if isinstance(arg, fx.Node) and not is_weight(arg) and _is_float(arg) and arg not in found:
            found.append(arg)
    return found


def _is_float(node: fx.Node) -> bool:
    info = M.node_info(node)
    return isinstance(info, M.TensorInfo) and info.dtype.is_floating_point


class _ObservingInterpreter(fx.Interpreter):
    def __init__(self, module, observers: Dict[str, List[Observer]]):
        super().__init__(module)
        self.observers = observers

    def run_node(self, n):
        value = super().run_node(n)
        observers = self.observers.get(n.name, ())
        for obs in observers:
            obs.observe(value)
        if observers:  # observers keep small new tensors, which glibc carves out of the freed activations:
            return_freed_memory()  # without a trim here one BERT-base batch leaves ~340 MB of holes resident
        return value


def _check_calibration_batch(graph: Graph, inputs: tuple, index: int) -> None:
    """The graph's input check, its message prefixed with which calibration batch failed it."""
    try:
        graph.check_inputs(inputs)
    except InputError as exc:
        raise InputError(f"calibrate: calibration batch {index}: {exc}") from None


def calibrate(graph: Graph, data: Iterable[Sequence[torch.Tensor]], observer: str = "minmax",
              qdtype: str = "int8", scheme: str = "asymmetric", progress: bool = True,
              max_batches: Optional[int] = None, **observer_options) -> Graph:
    """A copy of ``graph`` whose observed activations carry per-tensor QParams.

    ``data`` is an iterable of input tuples (a single tensor counts as a 1-tuple).
    ``observer`` names one of ``fxopt.passes.quantize.observers.OBSERVERS``;
    ``observer_options`` go to its constructor (e.g. ``percentile=99.9``).
    No batch stays referenced by the returned graph.
    """
    targets = [a for n in graph.call_nodes() for a in activation_inputs(n)]
    if not targets:
        raise PassError("calibrate: the graph has no linear, matmul or conv op with a floating-point activation "
                        "input; there is nothing to calibrate")
    observers = {n.name: make_observer(observer, qdtype, scheme, None, **observer_options)
                 for n in dict.fromkeys(targets)}
    channel_observers = {a.name: MinMaxObserver(axis=-1) for n in graph.call_nodes() if n.target in linear_targets()
                         for a in activation_inputs(n)}
    watched = {name: [observers[name]] + ([channel_observers[name]] if name in channel_observers else [])
               for name in observers}
    interpreter = _ObservingInterpreter(graph.module, watched)
    batches = 0
    with torch.no_grad():
        for index, batch in enumerate(_progress(data, progress, max_batches)):
            inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            _check_calibration_batch(graph, inputs, index)
            interpreter.run(*inputs)
            return_freed_memory()  # the observers' temporaries would otherwise stay resident (fxopt.passes.infra.memory)
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
    if batches == 0:
        raise PassError("calibrate: the data iterable gave no batches; pass at least one input tuple")
    calibrated = graph.copy()
    for node in calibrated.fx_graph.nodes:
        if node.name in observers:
            M.set_qparams(node, observers[node.name].qparams())
        if node.name in channel_observers:
            obs = channel_observers[node.name]
            node.meta[CHANNEL_ABSMAX_KEY] = torch.maximum(obs.lo.abs(), obs.hi.abs())
    return calibrated


def _progress(data, enabled: bool, total: Optional[int]):
    if total is None:
        total = operator.length_hint(data) or None  # 0 (unknown) for a generator or an unsized Batches
    return progress_bar(data, "calibrate", "batch", enabled, total=total)

