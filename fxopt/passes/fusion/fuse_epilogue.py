"""fuse-epilogue: a linear or convolution, its bias and an activation become one op.

    %linear = aten.linear.default(%x, %w, %b)
    %gelu = aten.gelu.default(%linear)
becomes
    %gelu = fxopt.linear_act.default(%x, %w, %b, gelu)

The fused ops are ``fxopt.linear_act`` and ``fxopt.conv_act`` (custom ops in
``fxopt/ir/ops.py``, with eager and fake kernels; see there why an op and not
a node annotation). Activations: ``relu``, ``gelu`` (exact), ``gelu_tanh``,
``silu``. Primaries:

- ``aten.linear`` with its bias, or without one and followed by ``+ bias``;
- GPT-2's Conv1D, ``addmm(bias, x, W[in, out])`` (optionally viewed back to
  3-D before the activation): it becomes ``linear_act(x, W.t(), bias)``, whose
  eager kernel runs the very same ``addmm``;
- ``aten.conv1d/2d/3d`` and non-transposed ``aten.convolution``.

GELU written out is recognised first (the patterns of
:mod:`fxopt.passes.fusion.fuse_gelu`): GPT-2's ``gelu_new`` becomes
``aten.gelu(approximate='tanh')`` and ``0.5*x*(1 + erf(x/sqrt(2)))`` becomes
``aten.gelu``, also where no linear precedes them.

A primary whose output has other users is not fused: they need the value
before the activation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Tuple

import torch

from fxopt.ir.ops import EPILOGUE_ACTIVATIONS, fxopt_ops
from fxopt.passes.fusion.common import is_weight, static_shape, tensor_info_of
from fxopt.passes.fusion.fold_conv_bn import CONV_TARGETS
from fxopt.passes.fusion.fuse_gelu import gelu_chain_patterns
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import AnyValue, Op, OpPattern, PatternBase, Var, node_argument
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten
ACTIVATIONS = tuple(EPILOGUE_ACTIVATIONS)


# ------------------------------------------------------- GELU written out
def gelu_tanh_rewrite(rw, x, **_):
    return rw.call(aten.gelu.default, x, approximate="tanh")


def gelu_erf_rewrite(rw, x, **_):
    return rw.call(aten.gelu.default, x)


# ------------------------------------------------------------- epilogues
def activation_root(activation: str, primary: Op) -> Op:
    if activation == "relu":
        return Op(aten.relu.default, primary)
    if activation == "silu":
        return Op(aten.silu.default, primary)
    return Op(aten.gelu.default, primary, approximate="tanh" if activation == "gelu_tanh" else "none")


def linear_primaries() -> List[Tuple[str, Op]]:
    x, w = Var("x"), Var("weight")
    bare = Op(aten.linear.default, x, w, None)
    addmm = Op(aten.addmm.default, Var("bias"), x, w, beta=1, alpha=1)
    return [
        ("linear", Op(aten.linear.default, x, w, Var("bias"))),
        ("linear", Op(aten.add.Tensor, bare, Var("bias"), alpha=1)),
        ("linear", Op(aten.add.Tensor, Var("bias"), bare, alpha=1)),
        ("addmm", addmm),
        ("addmm", Op(aten.view.default, addmm, Var("view_shape"), name="view")),
    ]


def conv_primaries() -> List[Op]:
    args = (Var("x"), Var("weight"), Var("bias"))
    return [Op(CONV_TARGETS, *args, name="conv"),
            Op(aten.convolution.default, *args, AnyValue(), AnyValue(), AnyValue(), False, name="conv")]


def linear_rewrite(rw, x, weight, bias, activation, view=None, view_shape=None, transposed=False):
    w_shape = static_shape(weight)
    if w_shape is None or len(w_shape) != 2 or not _is_bias_for(bias, w_shape[1] if transposed else w_shape[0]):
        return None
    if transposed:  # addmm's weight is [in, out]; the eager kernel's F.linear turns W.t() back into the same addmm
        weight = _transposed(rw, weight)
    fused = rw.call(fxopt_ops().linear_act.default, x, weight, bias, activation)
    return fused if view is None else rw.call(aten.view.default, fused, view_shape)


def _transposed(rw, weight):
    """``weight.t()``: for a stored weight, a new weight that is a view of the same memory (no copy)."""
    if is_weight(weight):
        return rw.param(f"{weight.target}_t", rw.graph.param(weight).t())
    return rw.call(aten.t.default, weight)


def _is_bias_for(bias, features: int) -> bool:
    """None, or a 1-D tensor with one value per output feature (nothing broadcast in)."""
    return bias is None or static_shape(bias) == (features,)


def addmm_rewrite(rw, activation, **captures):
    return linear_rewrite(rw, activation=activation, transposed=True, **captures)


def conv_rewrite(rw, conv, x, weight, bias, activation):
    info = tensor_info_of(weight)
    if info is None or (conv.target == aten.convolution.default and any(node_argument(conv, 7)[1])):
        return None  # output_padding only exists for transposed convolutions
    dims = len(info.shape) - 2
    geometry = [_per_dim(node_argument(conv, key)[1], dims) for key in ("stride", "padding", "dilation")]
    groups = node_argument(conv, "groups")[1]
    return rw.call(fxopt_ops().conv_act.default, x, weight, bias, *geometry, groups, activation)


def _per_dim(value, dims: int) -> List[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * dims if len(values) == 1 else values


# ---------------------------------------------------------------------- pass
@register_pass
@dataclass(frozen=True)
class FuseEpilogue(RewritePass):
    """``activations`` picks which activations to fuse (``relu;silu``, ...)."""

    name = "fuse-epilogue"
    summary = "linear/addmm/conv + bias + relu/gelu/gelu-tanh/silu -> fxopt.linear_act / fxopt.conv_act"
    activations: Tuple[str, ...] = ACTIVATIONS

    def __post_init__(self):
        self.check_choices("activations", self.activations, ACTIVATIONS, "activations")

    def patterns(self) -> List[PatternBase]:
        approximations = [approximate for activation, approximate in (("gelu_tanh", "tanh"), ("gelu", "none"))
                          if activation in self.activations]
        patterns: List[PatternBase] = gelu_chain_patterns(gelu_tanh_rewrite, gelu_erf_rewrite, approximations)
        for activation in self.activations:
            for kind, primary in linear_primaries():
                rewrite = addmm_rewrite if kind == "addmm" else linear_rewrite
                patterns.append(OpPattern(activation_root(activation, primary),
                                          functools.partial(rewrite, activation=activation),
                                          name=f"{kind}+{activation}"))
            for primary in conv_primaries():
                patterns.append(OpPattern(activation_root(activation, primary),
                                          functools.partial(conv_rewrite, activation=activation),
                                          name=f"conv+{activation}"))
        return patterns
