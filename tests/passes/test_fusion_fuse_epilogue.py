"""fuse-epilogue: equivalence on generated linear / bias-add / GPT-2 Conv1D / Conv2d + activation nets, fused-op
counts, outputs with other users and unfusable activations left alone, the option check, GPT-2's gelu_new."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given

import fxopt
from fxopt.ir.ops import fxopt_ops
from tests import models
from tests.harness import assert_equivalent, examples
from tests.passes.fusion_models import captured_and_cleaned, count, epilogue_cases, run_pass

aten = torch.ops.aten
LINEAR_ACT, CONV_ACT = fxopt_ops().linear_act.default, fxopt_ops().conv_act.default


def fused_count(graph) -> int:
    return count(graph, LINEAR_ACT) + count(graph, CONV_ACT)


@examples(25)
@given(case=epilogue_cases())
def test_fuse_epilogue_keeps_outputs_and_fuses_every_epilogue(case):
    graph = captured_and_cleaned(case)
    fused, stats = run_pass("fuse-epilogue", graph)
    epilogues = {name: n for name, n in stats["matches"].items() if "+" in name}
    assert sum(epilogues.values()) == case.counts["fused"] == fused_count(fused), graph.format()
    assert_equivalent(case.model, fused, case.inputs)


def test_fuse_epilogue_turns_gpt2_gelu_new_into_one_op():
    model, inputs = models.tiny_gpt2()
    graph = fxopt.Pipeline("cleanup")(fxopt.capture(model, inputs)).graph
    fused, stats = run_pass("fuse-epilogue", graph)
    assert stats["matches"] == {"gelu-tanh-chain": 2, "addmm+gelu_tanh": 2}  # one MLP per layer
    assert count(fused, aten.tanh.default) == 0 and count(fused, aten.pow.Tensor_Scalar) == 0
    assert [n.args[3] for n in fused.call_nodes(LINEAR_ACT)] == ["gelu_tanh", "gelu_tanh"]
    assert len(fused) == len(graph) - 2 * 8  # addmm, view, 8 chain ops -> linear_act, view, W.t() weight
    assert_equivalent(model, fused, inputs)


class Blocked(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        return torch.relu(y) + y, torch.tanh(self.b(x))  # y has another user; tanh has no fused form


def test_fuse_epilogue_leaves_shared_outputs_and_other_activations_alone():
    graph = fxopt.capture(Blocked(), (torch.randn(2, 4),))
    result, stats = run_pass("fuse-epilogue", graph)
    assert stats["matches"] == {} and fused_count(result) == 0


def test_fused_graph_runs_and_captures_again():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.GELU()).eval()
    x = torch.randn(2, 3, 6, 6)
    fused, stats = run_pass("fuse-epilogue", fxopt.capture(model, (x,)))
    assert stats["matches"] == {"conv+silu": 1, "linear+gelu": 1}
    again = fxopt.capture(fused.module, (x,))  # the custom ops export: their fake kernels work
    assert fused_count(again) == 2
    assert_equivalent(model, again, (x,))


def test_fuse_epilogue_rejects_unknown_activations():
    with pytest.raises(fxopt.PassError, match=r"fuse-epilogue: activations='relu;tanh' names unknown activations "
                                              r"\['tanh'\]; choose from relu, gelu, gelu_tanh, silu"):
        fxopt.Pipeline("fuse-epilogue{activations=relu;tanh}")
