"""smooth-quant: move activation outliers into the weights (SmoothQuant, Xiao et al., 2023).

The linears that read one activation ``x`` (Q, K and V read the same one) share
a per-input-channel factor ``s``, from the channel abs-max of ``x`` that
``fxopt.calibrate`` records and the abs-max of the weights' input columns:

    s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)
    x' = x / s,   W' = W · diag(s),   so   x' W'ᵀ = x Wᵀ   (an identity in exact arithmetic)

``alpha`` near 1 moves more of the activations' range into the weights. Each
``s_j`` is rounded to a power of two, so ``x / s`` and ``W · s`` are exact in
every float dtype and the smoothed graph computes the same products as the
original (the rounding costs at most a factor √2 of flattening). The
division by ``s`` is folded into the op that produces ``x`` when only these
linears read it:
- a LayerNorm over the last dim: its weight and bias are divided by ``s``;
- a plain linear: its output rows (weight rows and bias) are divided by ``s``.
Otherwise an explicit ``aten.mul(x, 1/s)`` is inserted before the linears (in
post-LN Transformers such as BERT/MiniLM the residual also reads the LayerNorm
output, so there it is a mul, which an int8 backend fuses into the quantize).

Smoothing changes the activations that insert-qdq quantizes, so their QParams
are dropped: calibrate again before static quantization.

    calibrated = fxopt.calibrate(graph, data)
    smoothed = fxopt.Pipeline("smooth-quant{alpha=0.5}")(calibrated).graph
    quantized = fxopt.Pipeline("insert-qdq{scheme=static}")(fxopt.calibrate(smoothed, data)).graph

``calibrate_smoothed(graph, data, alpha)`` does the first three steps.

Weights get new tensors (a weight shared with other ops is copied, never
changed in place). Stats: ``groups`` smoothed, ``linears`` scaled, and how the
division was placed (``folded_layernorm``, ``folded_linear``, ``inserted_mul``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List

import torch
import torch.fx as fx

from fxopt.ir import meta as M
from fxopt.passes.infra.batches import streamed
from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.quantize.calibrate import CHANNEL_ABSMAX_KEY, calibrate, is_weight, linear_targets

aten = torch.ops.aten
#: Factors are powers of two in this range, so that neither x / s nor W · s can overflow or vanish.
MIN_FACTOR, MAX_FACTOR = 2.0 ** -16, 2.0 ** 16


def arg(node: fx.Node, index: int):
    return node.args[index] if index < len(node.args) else None


def is_smoothable(linear: fx.Node) -> bool:
    """A linear whose weight is a 2-D floating-point get_attr and whose input is a floating-point tensor."""
    if linear.op != "call_function" or linear.target not in linear_targets():
        return False
    x, weight = arg(linear, 0), arg(linear, 1)
    if not isinstance(x, fx.Node) or not is_weight(weight):
        return False
    x_info, w_info = M.node_info(x), M.node_info(weight)
    return (isinstance(x_info, M.TensorInfo) and isinstance(w_info, M.TensorInfo) and x_info.dtype.is_floating_point
            and w_info.dtype.is_floating_point and len(w_info.shape) == 2 and x_info.shape[-1] == w_info.shape[1])


def smoothable_groups(graph: Graph) -> Dict[fx.Node, List[fx.Node]]:
    """Each activation read by smoothable linears -> those linears, in graph order."""
    groups: Dict[fx.Node, List[fx.Node]] = {}
    for node in graph.call_nodes():
        if is_smoothable(node):
            groups.setdefault(node.args[0], []).append(node)
    return groups


def smoothing_factors(act_absmax: torch.Tensor, weights: List[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``, rounded to a power of two; 1 where either is 0."""
    w_absmax = torch.stack([_column_absmax(w.detach()) for w in weights]).amax(dim=0).double()
    x_absmax = act_absmax.double()
    s = x_absmax.pow(alpha) / w_absmax.pow(1 - alpha)
    s = torch.where((x_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return torch.exp2(torch.round(torch.log2(s.clamp(MIN_FACTOR, MAX_FACTOR))))


def _column_absmax(weight: torch.Tensor) -> torch.Tensor:
    """``max|W[:, j]|`` per input column, exact in the weight's dtype, without a weight-sized temporary."""
    lo, hi = torch.aminmax(weight, dim=0)
    return torch.maximum(hi, -lo)


@register_pass
@dataclass(frozen=True)
class SmoothQuant(Pass):
    name = "smooth-quant"
    summary = "SmoothQuant: divide linear inputs by per-channel factors and fold them into the weights"
    #: Migration strength: 0 leaves activations as they are, 1 moves all of their range into the weights.
    alpha: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise self.error(f"alpha={self.alpha} is outside [0, 1]",
                             hint="SmoothQuant's default is 0.5; larger values move more range into the weights")

    def run(self, graph: Graph) -> PassResult:
        stats = {"groups": 0, "linears": 0, "folded_layernorm": 0, "folded_linear": 0, "inserted_mul": 0}
        for act, linears in smoothable_groups(graph).items():
            weights = [graph.param(n.args[1]) for n in linears]
            s = smoothing_factors(self._act_absmax(act, linears[0], weights[0].shape[1]), weights, self.alpha)
            stats[self._divide_activation(graph, act, linears, s)] += 1
            for linear in linears:
                self._scale_columns(graph, linear, s)
            stats["groups"] += 1
            stats["linears"] += len(linears)
        if stats["groups"]:  # only then is the module recompiled: leave its other get_attrs alone otherwise
            graph.remove_unused_params()
        return PassResult(graph, stats["groups"] > 0, stats)

    def _act_absmax(self, act: fx.Node, linear: fx.Node, channels: int) -> torch.Tensor:
        absmax = act.meta.get(CHANNEL_ABSMAX_KEY)
        if absmax is None:
            raise self.error(f"input %{act.name} has no per-channel statistics", linear,
                             "run fxopt.calibrate(graph, data) first; it records them")
        if absmax.numel() != channels:  # recorded before a pass changed the channels (pruning)
            raise self.error(f"input %{act.name} has per-channel statistics for {absmax.numel()} channels, but "
                             f"the weight reads {channels}", linear,
                             "calibrate again after the passes that remove channels (prune-*), then smooth-quant")
        return absmax

    # --------------------------------------------------------- the activation
    def _divide_activation(self, graph: Graph, act: fx.Node, linears: List[fx.Node], s: torch.Tensor) -> str:
        """Divide ``act`` by ``s`` where only ``linears`` see it; returns the stat naming how."""
        only_linears_read_it = set(act.users) == set(linears)
        if only_linears_read_it and self._can_fold_into_layernorm(act):
            self._fold_into_layernorm(graph, act, s)
            return "folded_layernorm"
        if only_linears_read_it and self._can_fold_into_linear(act):
            self._fold_into_linear_rows(graph, act, s)
            return "folded_linear"
        self._insert_mul(graph, act, linears, s)
        return "inserted_mul"

    @staticmethod
    def _can_fold_into_layernorm(node: fx.Node) -> bool:
        if node.op != "call_function" or node.target != aten.layer_norm.default or node.kwargs:
            return False
        shape, weight, bias = arg(node, 1), arg(node, 2), arg(node, 3)
        return len(shape) == 1 and is_weight(weight) and (bias is None or is_weight(bias))

    @staticmethod
    def _can_fold_into_linear(node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target == aten.linear.default and not node.kwargs
                and is_smoothable(node) and (arg(node, 2) is None or is_weight(arg(node, 2))))

    def _fold_into_layernorm(self, graph: Graph, norm: fx.Node, s: torch.Tensor) -> None:
        self._scale_param(graph, norm, 2, 1 / s)
        if arg(norm, 3) is not None:
            self._scale_param(graph, norm, 3, 1 / s)
        self._forget_statistics(norm)

    def _fold_into_linear_rows(self, graph: Graph, linear: fx.Node, s: torch.Tensor) -> None:
        self._scale_param(graph, linear, 1, (1 / s).unsqueeze(1))
        if arg(linear, 2) is not None:
            self._scale_param(graph, linear, 2, 1 / s)
        self._forget_statistics(linear)

    def _insert_mul(self, graph: Graph, act: fx.Node, linears: List[fx.Node], s: torch.Tensor) -> None:
        rw = Rewriter(graph, linears[0])
        inverse = rw.param(f"{act.name}_smooth_inverse", (1 / s).to(M.tensor_info(act).dtype))
        smoothed = rw.call(aten.mul.Tensor, act, inverse)
        for linear in linears:
            linear.replace_input_with(act, smoothed)

    @staticmethod
    def _forget_statistics(node: fx.Node) -> None:
        """The node's values changed: its calibrated range and channel statistics no longer hold."""
        node.meta.pop(M.QPARAMS_KEY, None)
        node.meta.pop(CHANNEL_ABSMAX_KEY, None)

    # ------------------------------------------------------------ the weights
    def _scale_columns(self, graph: Graph, linear: fx.Node, s: torch.Tensor) -> None:
        self._scale_param(graph, linear, 1, s.unsqueeze(0))

    @staticmethod
    def _scale_param(graph: Graph, node: fx.Node, index: int, factor: torch.Tensor) -> None:
        """Give ``node``'s argument ``index`` (a weight) a new tensor: the old one times ``factor``.

        The factors are powers of two, so the product is exact in float32 (float64 for float64 weights) and
        needs no wider temporary: the new tensor is the only allocation. A weight only ``node`` reads is replaced
        in place: it stays a parameter under its own name, so a backend that takes parameters as inputs (cuda)
        keeps it among the artifact's weights, not also folded into its library. A shared one gets a new tensor.
        """
        old = node.args[index]
        tensor = graph.param(old)
        exact = torch.promote_types(tensor.dtype, torch.float32)
        scaled = (tensor.detach() * factor.to(exact)).to(tensor.dtype)
        if len(old.users) == 1:
            graph.replace_param(old, scaled)
        else:
            node.update_arg(index, graph.add_param(f"{old.target}_smoothed", scaled, before=node))


def calibrate_smoothed(graph: Graph, data: Iterable, alpha: float = 0.5, progress: bool = True,
                       **calibrate_options) -> Graph:
    """Calibrate, smooth-quant, calibrate again: a graph ready for insert-qdq{scheme=static} or mixed-precision.

    ``data`` is iterated twice, never held: a one-shot iterator is spilled to disk (``fxopt.passes.infra.batches``).
    """
    with streamed(data) as batches:
        calibrated = calibrate(graph, batches, progress=progress, **calibrate_options)
        smoothed = SmoothQuant(alpha=alpha)(calibrated).graph
        del calibrated
        return calibrate(smoothed, batches, progress=progress, **calibrate_options)
