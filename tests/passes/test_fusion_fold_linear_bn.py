"""fold-linear-bn: equivalence on generated Linear + BatchNorm1d MLPs, fold counts, a Linear whose output has
other users and BatchNorm1d over a dim that is not the Linear's output left alone, corrupt statistics refused."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given

import fxopt
from tests.harness import assert_equivalent, examples
from tests.passes.fusion_models import (
    assert_weights_unchanged, captured_and_cleaned, count, linear_bn_cases, run_pass, weights_fingerprint,
)

aten = torch.ops.aten
EVAL_BN = aten._native_batch_norm_legit_no_training.default


@examples(25)
@given(case=linear_bn_cases())
def test_fold_linear_bn_keeps_outputs_and_folds_every_foldable_bn(case):
    graph = captured_and_cleaned(case)
    before = weights_fingerprint(graph)
    folded, stats = run_pass("fold-linear-bn", graph)
    assert stats["matches"].get("linear-bn", 0) == case.counts["linear-bn"], graph.format()
    assert count(folded, EVAL_BN) == count(graph, EVAL_BN) - case.counts["linear-bn"]
    assert count(folded, aten.linear.default) == count(graph, aten.linear.default)
    assert_equivalent(case.model, folded, case.inputs)
    assert_weights_unchanged(graph, before)


class Tapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(4, 6), nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.linear(x)
        return self.bn(y), y.sum()  # another user needs the Linear's own output


def test_fold_linear_bn_leaves_blocked_and_training_mode_alone():
    x = torch.randn(5, 4)
    for graph in (fxopt.capture(Tapped(), (x,)), fxopt.capture(Tapped().train(), (x,), eval_mode=False)):
        result, stats = run_pass("fold-linear-bn", graph)
        assert stats["matches"] == {}
        assert count(result, aten.linear.default) == 1


def test_fold_linear_bn_folds_both_and_keeps_only_linear_weights():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(7, 4)
    graph = fxopt.capture(model, (x,))
    folded, stats = run_pass("fold-linear-bn", graph)
    assert stats["matches"] == {"linear-bn": 2} and count(folded, EVAL_BN) == 0
    assert folded.param_count() == 4 * 6 + 6 + 6 * 3 + 3
    assert_equivalent(model, folded, (x,))


def test_fold_linear_bn_refuses_nan_statistics():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).eval()
    with torch.no_grad():
        model[1].running_mean[0] = float("nan")
    graph = fxopt.capture(model, (torch.randn(3, 4),))
    with pytest.raises(fxopt.PassError, match=r"fold-linear-bn: node %_native_batch_norm_legit_no_training .*"
                                              r"non-finite values: True.*recalibrate the model"):
        run_pass("fold-linear-bn", graph)
