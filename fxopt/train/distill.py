"""fxopt.train.distill: knowledge distillation into a compressed graph (pruned, low-rank or QAT).

    pruned = fxopt.Pipeline("prune-channels{ratio=0.25}")(graph).graph
    student = fxopt.train.distill(pruned, graph, batches, steps=300, lr=1e-4,
                                  losses={"mse": 1.0, "hidden": 1.0}, curve="loss.png")

``data`` yields input tuples (a tensor counts as a 1-tuple), cycled until ``steps`` steps have run. The
teacher is an fxopt Graph (needed for hidden-state and attention losses, which tap its intermediate
values) or any callable. The losses are in ``distill_losses.py``.

The training machinery is qat's (``fxopt.train.qat.fine_tune``): the student's float parameters
(and float buffers other than BatchNorm statistics, e.g. low-rank factors) are cloned and trained;
a student holding Q/DQ pairs trains through fake quantization and is frozen back to Q/DQ, as
``fxopt.train.qat`` does. A tqdm bar shows the loss; ``curve=path`` saves the loss curve as a PNG.
The student graph given is not changed; the trained one is returned.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.ir.graph import Graph
from fxopt.train import distill_losses as L
from fxopt.train.qat import QUANTIZE_TO_DEQUANTIZE, TrainableGraph, fake_quant_graph, fine_tune, freeze

@dataclass
class _Tapped(TrainableGraph):
    """The student (or teacher) with its taps appended to its outputs, plus projections to train."""

    extra: List[torch.Tensor] = field(default_factory=list)
    base: Optional[TrainableGraph] = None

    def parameters(self) -> List[torch.Tensor]:
        return (self.base.parameters() if self.base is not None else []) + self.extra


def tapped(graph: Graph, nodes: Sequence[fx.Node]) -> Graph:
    """A graph sharing ``graph``'s weights that returns ``nodes``' values (a flat list, no pytree codegen)."""
    new = fx.Graph()
    env = {}
    for node in graph.fx_graph.nodes:
        if node.op != "output":
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output([env[n] for n in nodes])
    return Graph(fx.GraphModule(graph.module, new), graph.input_specs)


def trainable_student(student: Graph, freeze_patterns: Sequence[str] = ()) -> TrainableGraph:
    """qat's fake-quant graph for a Q/DQ student; otherwise a copy whose float weights are cloned trainable.

    Weights whose target matches one of ``freeze_patterns`` (regular expressions) stay as they are.
    """
    if any(n.target in QUANTIZE_TO_DEQUANTIZE for n in student.call_nodes()):
        trainable = fake_quant_graph(student)
        trainable.floats = [t for t in trainable.floats if not _frozen(t, freeze_patterns)]
        return trainable
    trainable = TrainableGraph(student.copy())
    statistics = trainable.graph.batch_norm_statistics()
    for node in trainable.graph.nodes:
        if node.op != "get_attr" or node.target in trainable.floats or node.target in statistics:
            continue
        if _frozen(node.target, freeze_patterns):
            continue
        tensor = trainable.graph.param(node)
        if tensor.is_floating_point() and tensor.dim() > 0:
            trainable.graph.replace_param(node, tensor.detach().clone().requires_grad_(True))
            trainable.floats.append(node.target)
    return trainable


def _frozen(target: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, target) for p in patterns)


class _TeacherBatches:
    """Re-iterable ``(inputs, teacher values)`` pairs, computed batch by batch (never all held at once)."""

    def __init__(self, data: Iterable, teacher: Callable):
        self.data, self.teacher = data, teacher

    def __iter__(self):
        for batch in self.data:
            inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
            with torch.no_grad():
                values = self.teacher(inputs)
            yield inputs, (values, inputs)  # not inside no_grad: a suspended generator would leave grad mode off


def distill(student: Graph, teacher, data: Iterable, steps: int, lr: float = 1e-4, losses=("kl",),
            optimizer: str = "adam", progress: bool = True, curve: Optional[str] = None,
            history: Optional[List[float]] = None, freeze: Sequence[str] = (), decay: bool = True) -> Graph:
    """Train ``student`` to match ``teacher`` on ``data`` (see the module docstring); returns the trained graph.

    ``freeze``: regular expressions of weight targets to keep as they are (e.g. ``("embeddings",)``: a
    vocabulary's embedding table is most of a small encoder's weights and the slowest to update).
    ``decay``: the learning rate falls linearly to 0 over the steps (``False``: constant).
    """
    loss_terms = L.parse_losses(losses)
    trainable = trainable_student(student, freeze)
    teacher_graph = teacher if isinstance(teacher, Graph) else None
    taps = [L.tap_pairs(loss, trainable.graph, teacher_graph) for loss in loss_terms]
    student_run = _Tapped(tapped(trainable.graph, [n for s, _ in taps for n in s]), base=trainable)
    teacher_fn = _teacher_values(teacher, teacher_graph, [t for _, t in taps])
    projections = _projections(taps, loss_terms, student_run)
    counts = [len(s) for s, _ in taps]

    def loss_fn(student_values, target):
        teacher_values, inputs = target
        total, start = 0.0, 0
        for loss, count, projection in zip(loss_terms, counts, projections):
            value = loss(student_values[start:start + count], teacher_values[start:start + count], projection, inputs)
            total = total + loss.weight * value
            start += count
        return total

    recorded = fine_tune(student_run, _TeacherBatches(data, teacher_fn), loss_fn, steps, lr, optimizer, progress,
                         desc="distill", decay=decay)
    if history is not None:
        history.extend(recorded)
    if curve is not None:
        save_loss_curve(recorded, curve)
    return _trained_graph(student, trainable)


def _teacher_values(teacher, teacher_graph: Optional[Graph], taps: List[list]) -> Callable:
    """``inputs -> [tensors]`` in the order of the losses' taps."""
    if teacher_graph is not None:
        nodes = [n if isinstance(n, fx.Node) else L.output_nodes(teacher_graph)[n] for t in taps for n in t]
        run = tapped(teacher_graph, nodes)
        return lambda inputs: list(run.module(*inputs))

    def call(inputs):
        outputs = [t for t in pytree.tree_leaves(teacher(*inputs)) if isinstance(t, torch.Tensor)]
        return [outputs[i] for t in taps for i in t]

    return call


def _projections(taps, loss_terms, student_run: _Tapped) -> List[list]:
    """Per loss, per tap: a trained projection where student and teacher widths differ (hidden states), else None."""
    all_projections = []
    for (s_nodes, t_nodes), loss in zip(taps, loss_terms):
        projections = []
        for s, t in zip(s_nodes, t_nodes):
            s_width = s.meta["val"].shape[-1]
            t_width = t.meta["val"].shape[-1] if isinstance(t, fx.Node) else s_width
            if loss.name == "hidden" and s_width != t_width:
                weight = torch.empty(t_width, s_width, dtype=s.meta["val"].dtype)
                torch.nn.init.xavier_uniform_(weight)
                weight.requires_grad_(True)
                student_run.extra.append(weight)
                projections.append(lambda x, w=weight: x @ w.t())
            else:
                projections.append(None)
        all_projections.append(projections)
    return all_projections


def _trained_graph(student: Graph, trainable: TrainableGraph) -> Graph:
    if trainable.weights or trainable.activations:  # QAT: back to Q/DQ with re-quantized int8 weights
        return freeze(student, trainable)
    trained = student.copy()
    attrs = {n.target: n for n in trained.nodes if n.op == "get_attr"}
    for target in trainable.floats:
        trained.replace_param(attrs[target], trainable.tensor(target).clone())
    return trained


def save_loss_curve(losses: Sequence[float], path: str) -> None:
    """The loss per step and its running mean, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(losses, color="#a0aec0", linewidth=0.8, label="loss")
    ax.plot(smooth, color="#2b6cb0", linewidth=1.6, label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss")
    ax.set_yscale("log" if min(losses) > 0 else "linear")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
