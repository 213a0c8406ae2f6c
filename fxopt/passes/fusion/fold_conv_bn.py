"""fold-conv-bn: fold an eval-mode BatchNorm into the convolution before it.

    %conv = aten.conv2d(%x, %w, %b, ...)
    %bn = aten._native_batch_norm_legit_no_training(%conv, %gamma, %beta, %mean, %var, 0.1, 1e-05)
    %y = getitem(%bn, 0)
becomes
    %y = aten.conv2d(%x, %w_bn_folded, %w_bn_folded_bias, ...)

with ``w' = w * gamma / sqrt(var + eps)`` per output channel and
``b' = (b - mean) * gamma / sqrt(var + eps) + beta``, computed in float64 and
stored in the convolution's dtype as new weights (the old ones are dropped
when nothing else reads them). Conv1d/2d/3d, grouped and depthwise
convolutions fold the same way: the output channel is dim 0 of the weight.
Transposed convolutions and training-mode BatchNorm are left alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from fxopt.passes.fusion.common import eval_batch_norm_patterns, fold_batch_norm, is_weight, is_weight_or_none, \
    with_arguments
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import AnyValue, Op, OpPattern, PatternBase, Var
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten

CONV_TARGETS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def conv_patterns() -> List[Op]:
    """A convolution (not transposed) whose weight, and bias if any, are weights."""
    weight, bias = Var("weight", where=is_weight), Var("bias", where=is_weight_or_none)
    return [
        Op(CONV_TARGETS, AnyValue(), weight, bias, name="conv"),
        Op(aten.convolution.default, AnyValue(), weight, bias, AnyValue(), AnyValue(), AnyValue(), False,
           name="conv"),
    ]


@register_pass
@dataclass(frozen=True)
class FoldConvBN(RewritePass):
    name = "fold-conv-bn"
    summary = "fold eval-mode BatchNorm into the Conv1d/Conv2d/Conv3d before it (grouped and depthwise too)"

    def patterns(self) -> List[PatternBase]:
        return [
            OpPattern(bn, self.fold_rewrite, name="conv-bn")
            for conv in conv_patterns()
            for bn in eval_batch_norm_patterns(conv)
        ]

    def fold_rewrite(self, rw, conv, weight, bias, bn, eps, **stats):
        folded = fold_batch_norm(self, rw, bn, weight, bias, {"eps": eps, **stats})
        if folded is None:
            return None
        args, kwargs = with_arguments(conv, {1: folded[0], 2: folded[1]})
        return rw.call(conv.target, *args, **kwargs)
