"""fuse-layernorm: decomposed LayerNorm and RMSNorm arithmetic becomes one op.

LayerNorm written out (``mean``, ``x - mean``, squared mean or the biased
``var``, ``+ eps``, ``rsqrt`` or ``sqrt`` and divide, then an
optional ``* weight + bias``)::

    %mean = aten.mean.dim(%x, [-1], True)
    %centered = aten.sub.Tensor(%x, %mean)
    %pow = aten.pow.Tensor_Scalar(%centered, 2)
    %var = aten.mean.dim(%pow, [-1], True)
    %add = aten.add.Tensor(%var, 1e-05)
    %rsqrt = aten.rsqrt.default(%add)
    %mul = aten.mul.Tensor(%centered, %rsqrt)
    %mul_1 = aten.mul.Tensor(%mul, %weight)
    %y = aten.add.Tensor(%mul_1, %bias)
becomes
    %y = aten.layer_norm.default(%x, [32], %weight, %bias, 1e-05)

RMSNorm (``x * rsqrt(mean(x**2) + eps) * weight``, also the Llama form that
normalizes in float32 and casts back) becomes ``aten.rms_norm``, which computes
in float32 for half inputs exactly like the Llama form. The normalized dims
must be the trailing dims; a weight or bias is absorbed only when its shape is
the normalized shape (no broadcasting that would change the result's shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from fxopt.passes.fusion.common import is_number, static_shape, tensor_info_of
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import AnyValue, Op, OpPattern, PatternBase, Var
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten

KINDS = ("layer-norm", "rms-norm")
HALF_DTYPES = (torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ patterns
def _square(value) -> List[Op]:
    return [Op(aten.pow.Tensor_Scalar, value, Var("exponent", where=lambda e: is_number(e) and e == 2)),
            Op(aten.mul.Tensor, value, value)]


def _mean(value) -> Op:
    return Op(aten.mean.dim, value, Var("dims"), True, dtype=None)


def _normalize(first, variance: Op) -> List[Op]:
    """``first * rsqrt(variance + eps)`` in its three spellings (``variance`` refers back to ``first``)."""
    shifted = Op(aten.add.Tensor, variance, Var("eps", where=is_number), alpha=1)
    return [
        Op(aten.mul.Tensor, first, Op(aten.rsqrt.default, shifted)),
        Op(aten.mul.Tensor, Op(aten.rsqrt.default, shifted), first),
        Op(aten.div.Tensor, first, Op(aten.sqrt.default, shifted)),
    ]


def layer_norm_patterns() -> List[Op]:
    x = Var("x")
    centered = Op(aten.sub.Tensor, x, _mean(x), alpha=1, name="centered", multi_use=True)
    again = Var("centered")
    variances = [_mean(square) for square in _square(again)]
    variances.append(Op(aten.var.correction, x, Var("dims"), correction=Var("correction", where=lambda c: c == 0),
                        keepdim=True))
    variances.append(Op(aten.var.dim, x, Var("dims"), False, True))  # var(unbiased=False, keepdim=True)
    return [root for variance in variances for root in _normalize(centered, variance)]


def rms_norm_patterns() -> List[Op]:
    """Plain RMSNorm on ``x``, then the Llama form: upcast to float32, normalize, cast back."""
    plain = [root for square in _square(Var("x")) for root in _normalize(Var("x"), _mean(square))]
    upcast = Op(aten._to_copy.default, Var("x"), dtype=torch.float32, name="upcast", multi_use=True)
    cast = [
        Op(aten._to_copy.default, root, dtype=Var("out_dtype"))
        for square in _square(Var("upcast"))
        for root in _normalize(upcast, _mean(square))
    ]
    return cast + plain


def _layer_norm(weight, bias) -> Op:
    return Op(aten.layer_norm.default, Var("x"), Var("shape"), weight, bias, Var("eps"), AnyValue(), name="norm")


def _rms_norm(weight) -> Op:
    return Op(aten.rms_norm.default, Var("x"), Var("shape"), weight, Var("eps"), name="norm")


def _both_orders(target, norm: Op, operand: Var, **literals) -> List[Op]:
    return [Op(target, norm, operand, **literals), Op(target, operand, norm, **literals)]


# ---------------------------------------------------------------- predicates
def normalized_shape(x, dims) -> Optional[List[int]]:
    """The trailing shape that ``dims`` reduce over, or None unless they are exactly the trailing dims."""
    shape = static_shape(x)
    if shape is None or not isinstance(dims, (list, tuple)) or not dims:
        return None
    rank = len(shape)
    if any(not isinstance(d, int) or not -rank <= d < rank for d in dims):
        return None
    reduced = sorted({d % rank for d in dims})
    if len(reduced) != len(dims) or reduced != list(range(rank - len(dims), rank)):
        return None
    return list(shape[rank - len(dims):])


def is_affine_operand(value, norm) -> bool:
    """A tensor of exactly the normalized shape and the norm's dtype: folding it in changes nothing else."""
    info, norm_info = tensor_info_of(value), tensor_info_of(norm)
    shape = norm.args[1]
    return (info is not None and norm_info is not None and info.dtype == norm_info.dtype
            and tuple(info.shape) == tuple(shape))


# ------------------------------------------------------------------ rewrites
def layer_norm_rewrite(rw, x, dims, eps, **_) -> Optional[object]:
    shape = normalized_shape(x, dims)
    if shape is None or eps < 0 or not tensor_info_of(x).dtype.is_floating_point:
        return None
    return rw.call(aten.layer_norm.default, x, shape, None, None, float(eps))


def layer_norm_weight_rewrite(rw, x, shape, eps, norm, weight):
    if not is_affine_operand(weight, norm):
        return None
    return rw.call(aten.layer_norm.default, x, shape, weight, None, eps)


def layer_norm_bias_rewrite(rw, x, shape, weight, eps, norm, bias):
    if not is_affine_operand(bias, norm):
        return None
    return rw.call(aten.layer_norm.default, x, shape, weight, bias, eps)


def rms_norm_rewrite(rw, x, dims, eps, upcast=None, out_dtype=None, **_):
    shape = normalized_shape(x, dims)
    info = tensor_info_of(x)
    if shape is None or eps < 0 or not info.dtype.is_floating_point:
        return None
    if upcast is not None and not _is_llama_cast(info, tensor_info_of(upcast), out_dtype):
        return None
    return rw.call(aten.rms_norm.default, x, shape, None, float(eps))


def _is_llama_cast(x_info, upcast_info, out_dtype) -> bool:
    """Half input, normalized in float32 on the same device, cast back to the input dtype."""
    return x_info.dtype in HALF_DTYPES and out_dtype == x_info.dtype and upcast_info.device == x_info.device


def rms_norm_weight_rewrite(rw, x, shape, eps, norm, weight):
    if not is_affine_operand(weight, norm):
        return None
    return rw.call(aten.rms_norm.default, x, shape, weight, eps)


# ---------------------------------------------------------------------- pass
@register_pass
@dataclass(frozen=True)
class FuseLayerNorm(RewritePass):
    """``kinds`` picks what to fuse: ``layer-norm``, ``rms-norm`` or both (``layer-norm;rms-norm``)."""

    name = "fuse-layernorm"
    summary = "decomposed mean/var/rsqrt LayerNorm -> aten.layer_norm; RMSNorm -> aten.rms_norm"
    kinds: Tuple[str, ...] = KINDS

    def __post_init__(self):
        self.check_choices("kinds", self.kinds, KINDS, "kinds")

    def patterns(self) -> List[PatternBase]:
        patterns: List[PatternBase] = []
        if "layer-norm" in self.kinds:  # first: its tail would otherwise match as RMSNorm of (x - mean)
            patterns += [OpPattern(root, layer_norm_rewrite, name="layer-norm") for root in layer_norm_patterns()]
            weighted = _both_orders(aten.mul.Tensor, _layer_norm(None, None), Var("weight"))
            biased = _both_orders(aten.add.Tensor, _layer_norm(Var("weight"), None), Var("bias"), alpha=1)
            patterns += [OpPattern(root, layer_norm_weight_rewrite, name="layer-norm-weight") for root in weighted]
            patterns += [OpPattern(root, layer_norm_bias_rewrite, name="layer-norm-bias") for root in biased]
        if "rms-norm" in self.kinds:
            weighted = _both_orders(aten.mul.Tensor, _rms_norm(None), Var("weight"))
            patterns += [OpPattern(root, rms_norm_rewrite, name="rms-norm") for root in rms_norm_patterns()]
            patterns += [OpPattern(root, rms_norm_weight_rewrite, name="rms-norm-weight") for root in weighted]
        return patterns
