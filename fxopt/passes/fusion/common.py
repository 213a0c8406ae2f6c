"""Helpers shared by the fusion passes: weight and scalar predicates, eval-mode
BatchNorm patterns and their folding arithmetic, argument rewriting, and the
check that a value may change its memory layout under its users."""
from __future__ import annotations

import math
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from fxopt.ir import meta as M
from fxopt.passes.infra.pattern import AnyValue, Op, Var

aten = torch.ops.aten


# ------------------------------------------------------------------ predicates
def is_weight(value: Any) -> bool:
    """A get_attr node: a tensor fixed at compile time that a pass may read and recompute."""
    return isinstance(value, fx.Node) and value.op == "get_attr"


def is_weight_or_none(value: Any) -> bool:
    return value is None or is_weight(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def tensor_info_of(value: Any) -> Optional[M.TensorInfo]:
    """The TensorInfo of a single-tensor node, or None (literals, tuples, missing metadata)."""
    info = M.node_info(value) if isinstance(value, fx.Node) else None
    return info if isinstance(info, M.TensorInfo) else None


def static_shape(value: Any) -> Optional[Tuple[int, ...]]:
    info = tensor_info_of(value)
    return tuple(info.shape) if info is not None and info.is_static else None


def scalar_value(graph, value: Any) -> Optional[float]:
    """A Python number, or a one-element weight, as a float; None for anything computed at run time."""
    if is_number(value):
        return float(value)
    if is_weight(value):
        tensor = graph.param(value)
        if tensor.numel() == 1 and tensor.is_floating_point():
            return float(tensor.item())
    return None


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


# ------------------------------------------------------------ argument edits
def with_arguments(node: fx.Node, changes: Dict[int, Any]) -> Tuple[tuple, dict]:
    """``node``'s (args, kwargs) with the arguments at the given schema positions replaced.

    Works whether the argument was passed by position, by name, or left to its default.
    """
    arguments = list(node.target._schema.arguments)
    args, kwargs = list(node.args), dict(node.kwargs)
    for position, value in changes.items():
        name = arguments[position].name
        if position < len(args):
            args[position] = value
        elif name in kwargs or arguments[position].kwarg_only:
            kwargs[name] = value
        else:
            while len(args) < position:
                args.append(arguments[len(args)].default_value)
            args.append(value)
    return tuple(args), kwargs


# ------------------------------------------------------ eval-mode BatchNorm
def eval_batch_norm_patterns(input_pattern: Op) -> List[Op]:
    """Op trees for ``batch_norm(input_pattern)`` in eval mode, in each form the exporter may leave.

    Captures: ``bn`` (the BatchNorm node), ``bn_weight``, ``bn_bias`` (None when not affine),
    ``running_mean``, ``running_var`` and ``eps``. Training-mode BatchNorm exports as
    ``_native_batch_norm_legit_functional`` (batch statistics) and never matches.
    """
    stats = (Var("bn_weight", where=is_weight_or_none), Var("bn_bias", where=is_weight_or_none),
             Var("running_mean", where=is_weight), Var("running_var", where=is_weight))
    no_training = Op(aten._native_batch_norm_legit_no_training.default, input_pattern, *stats, AnyValue(),
                     Var("eps"), name="bn")
    legit = Op(aten._native_batch_norm_legit.default, input_pattern, *stats, False, AnyValue(), Var("eps"),
               name="bn")
    plain = Op(aten.batch_norm.default, input_pattern, *stats, False, AnyValue(), Var("eps"), AnyValue(), name="bn")
    return [Op(operator.getitem, no_training, 0), Op(operator.getitem, legit, 0), plain]


def batch_norm_scale_shift(pass_, graph, bn: fx.Node, bn_weight, bn_bias, running_mean, running_var,
                           eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` in float64 with ``batch_norm(y) == y * scale + shift``.

    Raises the pass's error when the statistics cannot describe a BatchNorm
    (non-finite values, or running_var + eps <= 0): folding them would bake NaNs into weights.
    """
    mean = graph.param(running_mean).double()
    var = graph.param(running_var).double()
    gamma = graph.param(bn_weight).double() if bn_weight is not None else torch.ones_like(mean)
    beta = graph.param(bn_bias).double() if bn_bias is not None else torch.zeros_like(mean)
    denominator = var + eps
    finite = all(torch.isfinite(t).all() for t in (mean, var, gamma, beta))
    if not finite or not bool((denominator > 0).all()) or not math.isfinite(eps):
        raise pass_.error(
            f"BatchNorm statistics are unusable (running_var + eps has {int((denominator <= 0).sum())} "
            f"non-positive entries, non-finite values: {not finite})",
            bn,
            "the model's BatchNorm buffers are corrupt; reset them or recalibrate the model before folding",
        )
    scale = gamma / denominator.sqrt()
    return scale, beta - mean * scale


def fold_batch_norm(pass_, rw, bn: fx.Node, weight: fx.Node, bias: Optional[fx.Node], captures: dict):
    """New (weight, bias) get_attr nodes for a linear or convolution whose output channel is dim 0 of
    ``weight``, with the BatchNorm after it folded in. None when the channel counts disagree."""
    graph = rw.graph
    w = graph.param(weight)
    scale, shift = batch_norm_scale_shift(pass_, graph, bn, **captures)
    if scale.numel() != w.shape[0]:
        return None
    b = graph.param(bias).double() if bias is not None else torch.zeros_like(scale)
    folded_w = (w.double() * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    folded_b = (b * scale + shift).to(w.dtype)
    return rw.param(f"{weight.target}_bn_folded", folded_w), rw.param(f"{weight.target}_bn_folded_bias", folded_b)


# ------------------------------------------------------------- memory layout
def layout_change_is_safe(graph, old: fx.Node, new_value: torch.Tensor) -> bool:
    """Would every op downstream of ``old`` still run if ``old`` produced ``new_value``
    (same shape and dtype, other strides)? ``view`` refuses some strides, for example.

    Re-runs the users on fake values, following the change until a user's
    result has its old strides again. Never mutates the graph.
    """
    mode = M.fake_mode_of(graph.fx_graph)
    changed: Dict[fx.Node, Any] = {old: new_value}
    order = {n: i for i, n in enumerate(graph.fx_graph.nodes)}
    pending = sorted(old.users, key=order.__getitem__)
    while pending:
        user = pending.pop(0)
        if user.op != "call_function" or user in changed:
            continue
        value = _rerun(mode, user, changed)
        if value is None:
            return False
        if not _same_layout(value, user.meta.get("val")):
            changed[user] = value
            pending = sorted({*pending, *user.users}, key=order.__getitem__)
    return True


def _rerun(mode, node: fx.Node, changed: Dict[fx.Node, Any]):
    def fake(arg):
        if isinstance(arg, fx.Node):
            return changed.get(arg, arg.meta.get("val"))
        return arg

    args = fx.node.map_aggregate(node.args, fake)
    kwargs = fx.node.map_aggregate(node.kwargs, fake)
    try:
        with mode:
            return node.target(*args, **kwargs)
    except Exception:  # the op refuses the new layout (e.g. an impossible view)
        return None


def _same_layout(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_layout(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.stride() == b.stride()
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor)
