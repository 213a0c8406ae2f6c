"""fold-linear-bn: fold an eval-mode BatchNorm1d into the Linear before it.

    %linear = aten.linear(%x, %w, %b)                      # [N, C]
    %bn = aten._native_batch_norm_legit_no_training(%linear, %gamma, %beta, %mean, %var, 0.1, 1e-05)
    %y = getitem(%bn, 0)
becomes
    %y = aten.linear(%x, %w_bn_folded, %w_bn_folded_bias)

BatchNorm1d normalizes dim 1, which is the Linear's feature dim only for a 2-D
output ``[N, C]``; a 3-D ``[N, L, C]`` output is left alone. A Linear whose
output has other users is not folded (they need the unnormalized value).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from fxopt.passes.fusion.common import eval_batch_norm_patterns, fold_batch_norm, is_weight, is_weight_or_none, \
    static_shape
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import Op, OpPattern, PatternBase, Var
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten


def linear_pattern() -> Op:
    return Op(aten.linear.default, Var("x"), Var("weight", where=is_weight), Var("bias", where=is_weight_or_none),
              name="linear")


def is_feature_batch_norm(linear) -> bool:
    """BatchNorm1d over this Linear's output normalizes its features: the output is [N, C]."""
    shape = static_shape(linear)
    return shape is not None and len(shape) == 2


@register_pass
@dataclass(frozen=True)
class FoldLinearBN(RewritePass):
    name = "fold-linear-bn"
    summary = "fold eval-mode BatchNorm1d into the Linear before it"

    def patterns(self) -> List[PatternBase]:
        return [OpPattern(bn, self.fold_rewrite, name="linear-bn") for bn in eval_batch_norm_patterns(linear_pattern())]

    def fold_rewrite(self, rw, x, linear, weight, bias, bn, eps, **stats):
        if not is_feature_batch_norm(linear):
            return None
        folded = fold_batch_norm(self, rw, bn, weight, bias, {"eps": eps, **stats})
        if folded is None:
            return None
        return rw.call(aten.linear.default, x, *folded)
