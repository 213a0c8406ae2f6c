"""fuse-gelu: every GELU (GPT-2's gelu_new written out, the erf form, aten.gelu) becomes fxopt.fused_gelu; a
near miss stays; the op refuses an unknown approximation."""
import math

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.fusion.fuse_gelu import FuseGelu
from tests import models
from tests.harness import assert_equivalent
from tests.passes.fusion_models import count

aten = torch.ops.aten
FUSED_GELU = fxopt_ops().fused_gelu.default


def fuse_gelu(graph):
    result = FuseGelu()(graph)
    result.graph.verify()
    return result.graph, result.stats


def test_gpt2_gelu_new_becomes_one_fused_gelu_per_layer():
    model, inputs = models.tiny_gpt2()
    graph = fxopt.Pipeline("cleanup")(fxopt.capture(model, inputs)).graph
    fused, stats = fuse_gelu(graph)
    assert stats["matches"] == {"gelu-tanh-chain": 2}
    assert [n.args[1] for n in fused.call_nodes(FUSED_GELU)] == ["tanh", "tanh"]
    assert count(fused, aten.tanh.default) == 0 and count(fused, aten.pow.Tensor_Scalar) == 0
    assert_equivalent(model, fused, inputs)


class Gelus(nn.Module):
    def __init__(self, erf_constant: float = math.sqrt(0.5), cube_constant: float = 0.044715):
        super().__init__()
        self.erf_constant, self.cube_constant = erf_constant, cube_constant

    def forward(self, x):
        erf = 0.5 * x * (1.0 + torch.erf(x * self.erf_constant))
        tanh = 0.5 * x * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (x + self.cube_constant * torch.pow(x, 3))))
        return erf, tanh, nn.functional.gelu(x), nn.functional.gelu(x, approximate="tanh")


def test_erf_chain_and_aten_gelu_become_fused_gelu_too():
    model, inputs = Gelus().eval(), (torch.randn(3, 8),)
    fused, stats = fuse_gelu(fxopt.capture(model, inputs))
    assert stats["matches"] == {"gelu-erf-chain": 1, "gelu-tanh-chain": 1, "aten-gelu": 2}
    assert sorted(n.args[1] for n in fused.call_nodes(FUSED_GELU)) == ["none", "none", "tanh", "tanh"]
    assert count(fused, aten.gelu.default) == 0
    assert_equivalent(model, fused, inputs)


def test_a_chain_with_other_constants_is_not_a_gelu():
    model, inputs = Gelus(erf_constant=0.8, cube_constant=0.05).eval(), (torch.randn(3, 8),)
    fused, stats = fuse_gelu(fxopt.capture(model, inputs))
    assert stats["matches"] == {"aten-gelu": 2}  # only the two aten.gelu calls
    assert count(fused, aten.erf.default) == 1 and count(fused, aten.tanh.default) == 1
    assert_equivalent(model, fused, inputs)


def test_fused_gelu_refuses_an_unknown_approximation():
    with pytest.raises(ValueError, match=r"fxopt.fused_gelu: unknown approximate 'fast'; valid: none, tanh"):
        FUSED_GELU(torch.randn(2), "fast")
