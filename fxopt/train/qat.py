"""fxopt.train.qat: quantization-aware fine-tuning of a Q/DQ graph, frozen back to Q/DQ.

    calibrated = fxopt.calibrate(graph, calibration_batches)
    quantized = fxopt.Pipeline("insert-qdq{scheme=static}")(calibrated).graph
    tuned = fxopt.train.qat(quantized, train_batches, F.cross_entropy, steps=200, lr=1e-4)

Three stages, each usable on its own:

1. ``fake_quant_graph(quantized)`` builds the training graph. Each activation
   quantize/dequantize pair becomes one ``fake_quantize_activation`` node; each
   int8 weight (``dequantize_per_channel`` of int8 codes, as insert-qdq stores
   it) becomes a trainable float32 tensor, initialised to its dequantized value
   and read through ``fake_quantize_weight`` (see ``fxopt.train.fake_quant``).
   Before any step it computes exactly what the Q/DQ graph computes. Biases and
   the other float parameters train too; buffers (BatchNorm statistics) do not.
2. ``fine_tune(trainable, data, loss_fn, steps, lr)`` runs the optimizer for
   ``steps`` steps over ``data``, an iterable of ``(inputs, target)`` batches,
   cycled; a tqdm bar shows the loss.
3. ``freeze(quantized, trainable)`` returns a copy of the Q/DQ graph whose int8
   codes and per-channel scales are re-quantized from the trained weights
   (``quantize_weight_per_channel``, as insert-qdq does) and whose float
   parameters are the trained ones. The node structure is the input's.

Activation scales stay at their calibrated values (no LSQ): the freeze keeps
the input's activation Q/DQ nodes as they are. Dequantize forms other than
insert-qdq's int8 per-channel weights (e.g. group-wise int4) stay frozen.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from fxopt.errors import PassError, describe_node
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.progress import progress_bar
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.quantize.insert_qdq import INT8, quantize_weight_per_channel
from fxopt.train.fake_quant import fake_quantize_activation, fake_quantize_weight

QD = torch.ops.quantized_decomposed
QUANTIZE_TO_DEQUANTIZE = {
    QD.quantize_per_tensor.default: QD.dequantize_per_tensor.default,
    QD.quantize_per_tensor.tensor: QD.dequantize_per_tensor.tensor,
}
OPTIMIZERS = {
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
}


@dataclass(frozen=True)
class WeightSlot:
    """Where a trainable weight goes back to in the Q/DQ graph: its int8 codes, scales and channel axis."""

    codes: str
    scale: str
    axis: int


@dataclass
class TrainableGraph:
    """A fake-quant graph plus what ``freeze`` needs: trainable targets and their slots in the Q/DQ graph."""

    graph: Graph
    #: Trainable float32 weight (get_attr target) -> its int8 codes and scales in the Q/DQ graph.
    weights: Dict[str, WeightSlot] = field(default_factory=dict)
    #: Float parameters (biases, norms, weights left in float) trained as they are, by target.
    floats: List[str] = field(default_factory=list)
    #: How many activation Q/DQ pairs became ``fake_quantize_activation``.
    activations: int = 0

    def parameters(self) -> List[torch.Tensor]:
        stored = self.graph.params()
        return [stored[target] for target in [*self.weights, *self.floats]]

    def tensor(self, target: str) -> torch.Tensor:
        """The trained tensor stored under ``target``, detached."""
        return self.graph.params()[target].detach()


def _error(message: str, node: Optional[fx.Node] = None, hint: str = "") -> PassError:
    where = f"qat: node {describe_node(node)}" if node is not None else "qat"
    return PassError(f"{where}: {message}" + (f"; {hint}" if hint else ""))


# ------------------------------------------------------------ fake-quant graph
def fake_quant_graph(quantized: Graph) -> TrainableGraph:
    """The training form of a Q/DQ graph (see the module docstring). ``quantized`` is not changed."""
    trainable = TrainableGraph(quantized.copy())
    graph = trainable.graph
    for dq in list(graph.call_nodes()):
        if _is_activation_pair(dq):
            _replace_activation_pair(graph, dq)
            trainable.activations += 1
        elif _is_int8_weight(dq):
            target, slot = _replace_int8_weight(graph, dq)
            trainable.weights[target] = slot
    if not trainable.activations and not trainable.weights:
        raise _error("the graph has no quantize/dequantize pair or int8 weight to train",
                     hint="quantize it first: fxopt.calibrate(graph, data), then "
                          "fxopt.Pipeline('insert-qdq{scheme=static}')")
    graph.remove_unused_params()
    trainable.floats = _clone_float_parameters(graph, exclude=trainable.weights)
    graph.recompile()
    return trainable


def _is_activation_pair(dq: fx.Node) -> bool:
    q = dq.args[0] if dq.args else None
    return isinstance(q, fx.Node) and QUANTIZE_TO_DEQUANTIZE.get(q.target) == dq.target


def _replace_activation_pair(graph: Graph, dq: fx.Node) -> None:
    q = dq.args[0]
    if tuple(q.args[1:]) != tuple(dq.args[1:]):
        raise _error(f"quantizes %{q.name} and dequantizes with different parameters", dq,
                     "qat trains the Q/DQ pairs insert-qdq makes, which share scale and zero point")
    rw = Rewriter(graph, dq)
    fake = rw.call(fake_quantize_activation, *q.args, **dq.kwargs)
    rw.replace(dq, fake)
    rw.erase_dead([dq, q])


def _is_int8_weight(dq: fx.Node) -> bool:
    if dq.target != QD.dequantize_per_channel.default:
        return False
    codes, scale, zero_point, _, qmin, qmax, qdtype = dq.args[:7]
    stored = all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (codes, scale))
    return stored and zero_point is None and (qmin, qmax, qdtype) == (INT8.qmin, INT8.qmax, torch.int8)


def _replace_int8_weight(graph: Graph, dq: fx.Node) -> Tuple[str, WeightSlot]:
    codes, scale, _, axis = dq.args[:4]
    initial = QD.dequantize_per_channel(graph.param(codes), graph.param(scale), None, axis, INT8.qmin,
                                        INT8.qmax, torch.int8)
    rw = Rewriter(graph, dq)
    weight = rw.param(codes.target.removesuffix("_int8"), initial.requires_grad_(True))
    rw.replace(dq, rw.call(fake_quantize_weight, weight, axis, **dq.kwargs))
    rw.erase_dead([dq])
    return weight.target, WeightSlot(codes.target, scale.target, axis)


def _clone_float_parameters(graph: Graph, exclude) -> List[str]:
    """Give each float ``nn.Parameter`` a trainable copy (training must not touch the caller's tensors)."""
    cloned = []
    for node in graph.nodes:
        if node.op != "get_attr" or node.target in exclude or node.target in cloned:
            continue
        tensor = graph.param(node)
        if isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point():
            graph.replace_param(node, tensor.detach().clone().requires_grad_(True))
            cloned.append(node.target)
    return cloned


# ------------------------------------------------------------------ training
def fine_tune(trainable: TrainableGraph, data: Iterable, loss_fn: Callable, steps: int, lr: float,
              optimizer: str = "adam", progress: bool = True, desc: str = "qat", decay: bool = False) -> List[float]:
    """Train ``trainable``'s tensors in place for ``steps`` steps; returns the loss of every step.

    ``decay``: the learning rate falls linearly from ``lr`` to 0 over the steps (else it stays ``lr``).
    """
    _check_schedule(steps, lr, optimizer)
    opt = OPTIMIZERS[optimizer](trainable.parameters(), lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps) if decay else None
    losses: List[float] = []
    bar = progress_bar(None, desc, "step", progress, total=steps)
    with torch.enable_grad():
        for inputs, target in itertools.islice(_batches(data), steps):
            loss = _step(trainable.graph, opt, inputs, target, loss_fn)
            if schedule is not None:
                schedule.step()
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4g}")
    bar.close()
    if not losses:
        raise _error("data gave no batches", hint="pass a non-empty iterable of (inputs, target) batches")
    return losses


def _check_schedule(steps: int, lr: float, optimizer: str) -> None:
    if not isinstance(steps, int) or steps <= 0:
        raise _error(f"steps={steps!r} must be a positive integer", hint="pass steps >= 1")
    if lr < 0:
        raise _error(f"lr={lr!r} is negative", hint="pass a learning rate >= 0, e.g. 1e-4")
    if optimizer not in OPTIMIZERS:
        raise _error(f"unknown optimizer {optimizer!r}", hint=f"valid optimizers: {', '.join(OPTIMIZERS)}")


def _step(graph: Graph, opt: torch.optim.Optimizer, inputs: Tuple[torch.Tensor, ...], target,
          loss_fn: Callable) -> float:
    graph.check_inputs(inputs)
    loss = loss_fn(graph.module(*inputs), target)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise _error(f"loss_fn returned {shape}, not a scalar tensor", hint="reduce the loss, e.g. with .mean()")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def _batches(data: Iterable) -> Iterator[Tuple[Tuple[torch.Tensor, ...], object]]:
    """``(inputs tuple, target)`` pairs from ``data``, round and round (a one-shot iterator is remembered)."""
    source = itertools.cycle(data) if iter(data) is data else _repeat(data)
    for batch in source:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise _error(f"a batch is a {type(batch).__name__}, not an (inputs, target) pair",
                         hint="yield (inputs, target), with inputs a tensor or a tuple of tensors")
        inputs, target = batch
        yield (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), target


def _repeat(data: Iterable) -> Iterator:
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            return




# ------------------------------------------------------------------- freezing
def freeze(quantized: Graph, trainable: TrainableGraph) -> Graph:
    """A copy of ``quantized`` holding ``trainable``'s weights: re-quantized to int8 per channel, or float."""
    frozen = quantized.copy()
    attrs = {n.target: n for n in frozen.nodes if n.op == "get_attr"}
    slots = [t for slot in trainable.weights.values() for t in (slot.codes, slot.scale)]
    missing = [t for t in [*slots, *trainable.floats] if t not in attrs]
    if missing:
        raise _error(f"the Q/DQ graph has no weights {', '.join(missing)}",
                     hint="freeze the graph that fake_quant_graph() was given")
    for target, slot in trainable.weights.items():
        codes, q = quantize_weight_per_channel(trainable.tensor(target), slot.axis)
        frozen.replace_param(attrs[slot.codes], codes)
        frozen.replace_param(attrs[slot.scale], q.scale)
        M.set_qparams(attrs[slot.codes], q)
    for target in trainable.floats:
        frozen.replace_param(attrs[target], trainable.tensor(target).clone())
    return frozen


# ------------------------------------------------------------------------ qat
def qat(graph: Graph, data: Iterable[Sequence], loss_fn: Callable, steps: int, lr: float = 1e-4,
        optimizer: str = "adam", progress: bool = True, history: Optional[List[float]] = None) -> Graph:
    """Fine-tune a Q/DQ graph with fake quantization and return it frozen back to Q/DQ (a new Graph).

    ``data`` yields ``(inputs, target)`` batches (``inputs`` a tensor or a tuple of tensors) and is
    cycled until ``steps`` steps have run; ``loss_fn(output, target)`` returns a scalar tensor.
    ``optimizer`` is ``"adam"`` or ``"sgd"`` (momentum 0.9) at learning rate ``lr``. When ``history``
    is a list, the loss of every step is appended to it. ``graph`` is not changed.
    """
    _check_schedule(steps, lr, optimizer)
    trainable = fake_quant_graph(graph)
    losses = fine_tune(trainable, data, loss_fn, steps, lr, optimizer, progress)
    if history is not None:
        history.extend(losses)
    return freeze(graph, trainable)
