"""The losses ``fxopt.train.distill`` combines, and the intermediate values (taps) they read.

- :class:`LogitKL` (``"kl"``): KL(teacher || student) of the softmax over the last dim of one output at
  temperature ``T``, times ``T^2`` (Hinton et al.);
- :class:`OutputMSE` (``"mse"``): mean squared error of one output (e.g. a sentence encoder's token states);
- :class:`OutputCosine` (``"cosine"``): one minus the cosine similarity of one output's last-dim vectors, or
  (``pooled=True``) of their means over the sequence: a sentence encoder's embedding;
- :class:`HiddenMSE` (``"hidden"``): mean squared error of hidden states, by default the outputs of every
  LayerNorm/RMSNorm in graph order; when the student has fewer (a shallower model) student layer ``i`` of
  ``S`` is matched to teacher layer ``round((i + 1) * T / S) - 1``, so the last matches the last
  (``pairs`` names the (student node, teacher node) pairs instead). A width that differs gets a
  trained linear projection (TinyBERT);
- :class:`AttentionKL` (``"attention"``): KL(teacher || student) of the attention distributions, the
  outputs of every 4-D softmax, matched like hidden states; when the head counts differ (pruned heads)
  the maps are averaged over heads first.

``mask_input=i`` (mse, cosine, hidden) names the graph input holding a ``[batch, seq]`` attention mask:
padded positions then count for nothing (a batch padded to a fixed length is often half padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxopt.errors import PassError
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph

aten = torch.ops.aten
NORMS = (aten.layer_norm.default, aten.rms_norm.default)
SOFTMAXES = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)


def _error(message: str, hint: str) -> PassError:
    return PassError(f"distill: {message}; {hint}")


def _token_weights(inputs: Sequence[torch.Tensor], mask_input: Optional[int], like: torch.Tensor):
    """``[batch, seq, 1]`` weights from the mask input (None: every position counts)."""
    if mask_input is None:
        return None
    mask = inputs[mask_input]
    if mask.dim() != 2 or tuple(mask.shape) != tuple(like.shape[:2]):
        raise _error(f"mask_input={mask_input} is an input of shape {list(mask.shape)}, not [batch, seq] of the "
                     f"tapped value {list(like.shape)}", "name the attention-mask input, or drop mask_input")
    return mask.to(like.dtype).unsqueeze(-1)


def _masked_mse(s: torch.Tensor, t: torch.Tensor, weights) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(s, t)
    return ((s - t) ** 2 * weights).sum() / (weights.sum() * s.shape[-1]).clamp_min(1)


@dataclass(frozen=True)
class LogitKL:
    weight: float = 1.0
    temperature: float = 2.0
    output: int = 0
    name = "kl"

    def __call__(self, student: List[torch.Tensor], teacher: List[torch.Tensor], extra, inputs) -> torch.Tensor:
        t = self.temperature
        s_log = F.log_softmax(student[0].flatten(0, -2) / t, dim=-1)
        t_log = F.log_softmax(teacher[0].flatten(0, -2).detach() / t, dim=-1)
        return F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * t * t


@dataclass(frozen=True)
class OutputMSE:
    weight: float = 1.0
    output: int = 0
    mask_input: Optional[int] = None
    name = "mse"

    def __call__(self, student, teacher, extra, inputs) -> torch.Tensor:
        return _masked_mse(student[0], teacher[0].detach(), _token_weights(inputs, self.mask_input, student[0]))


@dataclass(frozen=True)
class OutputCosine:
    weight: float = 1.0
    output: int = 0
    mask_input: Optional[int] = None
    pooled: bool = False
    name = "cosine"

    def __call__(self, student, teacher, extra, inputs) -> torch.Tensor:
        s, t = student[0], teacher[0].detach()
        weights = _token_weights(inputs, self.mask_input, s)
        if self.pooled:
            w = weights if weights is not None else torch.ones_like(s[..., :1])
            s, t = (x.mul(w).sum(1) / w.sum(1).clamp_min(1e-9) for x in (s, t))
            return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        distance = 1 - F.cosine_similarity(s, t, dim=-1).unsqueeze(-1)
        if weights is None:
            return distance.mean()
        return (distance * weights).sum() / weights.sum().clamp_min(1)


@dataclass(frozen=True)
class HiddenMSE:
    weight: float = 1.0
    pairs: Optional[Tuple[Tuple[str, str], ...]] = None
    mask_input: Optional[int] = None
    name = "hidden"
    targets = NORMS

    def __call__(self, student, teacher, projections, inputs) -> torch.Tensor:
        total = 0.0
        for s, t, projection in zip(student, teacher, projections):
            s = projection(s) if projection is not None else s
            total = total + _masked_mse(s, t.detach(), _token_weights(inputs, self.mask_input, s))
        return total / max(len(student), 1)


@dataclass(frozen=True)
class AttentionKL:
    weight: float = 1.0
    pairs: Optional[Tuple[Tuple[str, str], ...]] = None
    name = "attention"
    targets = SOFTMAXES

    def __call__(self, student, teacher, extra, inputs) -> torch.Tensor:
        total = 0.0
        for s, t in zip(student, teacher):
            if s.shape[1] != t.shape[1]:  # pruned heads: compare the head-averaged maps
                s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
            t = t.detach()
            rows = t.flatten(0, -2).shape[0]
            total = total + (torch.xlogy(t, t) - t * s.clamp_min(1e-12).log()).sum() / rows
        return total / max(len(student), 1)


LOSSES = {cls.name: cls for cls in (LogitKL, OutputMSE, OutputCosine, HiddenMSE, AttentionKL)}


def parse_losses(losses) -> List[object]:
    """``("kl", "hidden")``, ``{"mse": 1.0, "hidden": 0.5}``, ``{"kl": {"temperature": 4}}`` or loss objects."""
    items = losses.items() if isinstance(losses, dict) else [(item, None) for item in losses]
    parsed = []
    for item, options in items:
        if not isinstance(item, str):
            parsed.append(item)
            continue
        if item not in LOSSES:
            raise _error(f"unknown loss {item!r}", f"valid losses: {', '.join(LOSSES)}")
        kwargs = options if isinstance(options, dict) else ({} if options is None else {"weight": float(options)})
        parsed.append(LOSSES[item](**kwargs))
    if not parsed:
        raise _error("no losses given", "pass losses=('kl',) or e.g. {'mse': 1.0, 'hidden': 1.0}")
    return parsed


def output_nodes(graph: Graph) -> List[fx.Node]:
    from torch.utils import _pytree as pytree

    return [n for n in pytree.tree_leaves(graph.output_node.args[0]) if isinstance(n, fx.Node)]


def tap_pairs(loss, student: Graph, teacher: Optional[Graph]) -> Tuple[List[fx.Node], List]:
    """The (student nodes, teacher nodes or output indices) a loss reads."""
    if hasattr(loss, "output"):
        outs = output_nodes(student)
        if not 0 <= loss.output < len(outs):
            raise _error(f"{loss.name}: output={loss.output} but the student has {len(outs)} outputs",
                         "choose an output index below that")
        return [outs[loss.output]], [loss.output]
    if teacher is None:
        raise _error(f"the {loss.name} loss reads the teacher's intermediate values, and the teacher is not an "
                     "fxopt Graph", "capture the teacher with fxopt.capture(model, example_inputs)")
    if loss.pairs is not None:
        return [student.node(s) for s, _ in loss.pairs], [teacher.node(t) for _, t in loss.pairs]
    s_nodes, t_nodes = _candidates(student, loss.targets), _candidates(teacher, loss.targets)
    if not s_nodes or not t_nodes:
        raise _error(f"{loss.name}: found no {'normalization' if loss.name == 'hidden' else 'softmax'} outputs in the "
                     f"{'student' if not s_nodes else 'teacher'}", "name the nodes to match with pairs=")
    return s_nodes, [t_nodes[j] for j in layer_map(len(s_nodes), len(t_nodes))]


def _candidates(graph: Graph, targets: Sequence) -> List[fx.Node]:
    found = []
    for node in graph.call_nodes():
        info = M.node_info(node)
        if node.target in targets and isinstance(info, M.TensorInfo):
            if node.target not in SOFTMAXES or len(info.shape) == 4:
                found.append(node)
    return found


def layer_map(student_layers: int, teacher_layers: int) -> List[int]:
    """Teacher layer for each student layer: uniform, the last to the last."""
    return [max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]
