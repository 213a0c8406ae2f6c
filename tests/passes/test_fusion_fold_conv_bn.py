"""fold-conv-bn: equivalence on generated Conv1d/Conv2d + BatchNorm nets (grouped and depthwise too),
fold counts, training-mode BatchNorm and blocked folds left alone, corrupt statistics refused."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given

import fxopt
from tests import models
from tests.harness import assert_equivalent, examples
from tests.passes.fusion_models import (
    assert_weights_unchanged, captured_and_cleaned, conv_bn_cases, count, run_pass, weights_fingerprint,
)

aten = torch.ops.aten
EVAL_BN = aten._native_batch_norm_legit_no_training.default


@examples(25)
@given(case=conv_bn_cases())
def test_fold_conv_bn_keeps_outputs_and_folds_every_foldable_bn(case):
    graph = captured_and_cleaned(case)
    before = weights_fingerprint(graph)
    folded, stats = run_pass("fold-conv-bn", graph)
    assert stats["matches"].get("conv-bn", 0) == case.counts["conv-bn"], graph.format()
    assert count(folded, EVAL_BN) == count(graph, EVAL_BN) - case.counts["conv-bn"]
    assert_equivalent(case.model, folded, case.inputs)
    assert_weights_unchanged(graph, before)  # new weights were added, none changed in place


def test_fold_conv_bn_on_resnet_removes_every_batch_norm():
    model, inputs = models.conv_bn_resnet()  # plain, strided, 1x1 shortcut, depthwise and grouped convs
    graph = fxopt.capture(model, inputs)
    folded, stats = run_pass("fold-conv-bn", graph)
    assert stats["matches"] == {"conv-bn": 8}
    assert count(folded, EVAL_BN) == 0 and len(folded) < len(graph)
    assert folded.param_count() < graph.param_count()  # BN parameters and statistics are gone
    assert_equivalent(model, folded, inputs)


class ConvBNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y  # the raw conv output is used too: folding would change it


def test_fold_conv_bn_leaves_training_mode_and_shared_outputs_alone():
    x = torch.randn(2, 3, 8, 8)
    training = fxopt.capture(ConvBNTwice().train(), (x,), eval_mode=False)
    _, stats = run_pass("fold-conv-bn", training)
    assert stats["matches"] == {}  # batch statistics: nothing to fold
    shared = fxopt.capture(ConvBNTwice(), (x,))
    result, stats = run_pass("fold-conv-bn", shared)
    assert stats["matches"] == {} and count(result, EVAL_BN) == 1


def test_fold_conv_bn_refuses_corrupt_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].running_var[2] = -1.0  # no BatchNorm has a negative variance
    graph = fxopt.capture(model, (torch.randn(1, 3, 6, 6),))
    with pytest.raises(fxopt.PassError, match=r"fold-conv-bn: node %_native_batch_norm_legit_no_training "
                                              r"\(aten\._native_batch_norm_legit_no_training\.default\): "
                                              r"BatchNorm statistics are unusable.*; the model's BatchNorm"):
        run_pass("fold-conv-bn", graph)
