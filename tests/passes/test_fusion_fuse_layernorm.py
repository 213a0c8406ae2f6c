"""fuse-layernorm: equivalence on generated decomposed LayerNorm / RMSNorm blocks (every spelling, affine or not,
one or two normalized dims, the Llama float32 round trip), counts, non-trailing reductions left alone, the option
check."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given

import fxopt
from tests.harness import assert_equivalent, examples
from tests.passes.fusion_models import DecomposedNorm, captured_and_cleaned, count, norm_cases, run_pass

aten = torch.ops.aten
LEFTOVERS = (aten.rsqrt.default, aten.sqrt.default, aten.var.correction, aten.var.dim, aten._to_copy.default)


@examples(25)
@given(case=norm_cases())
def test_fuse_layernorm_keeps_outputs_and_fuses_every_trailing_norm(case):
    graph = captured_and_cleaned(case)
    fused, stats = run_pass("fuse-layernorm", graph)
    assert count(fused, aten.layer_norm.default) == case.counts["layer-norm"], graph.format()
    assert count(fused, aten.rms_norm.default) == case.counts["rms-norm"], graph.format()
    assert stats["matches"].get("layer-norm", 0) == case.counts["layer-norm"]
    if "dims=(1,)" not in case.description:  # then nothing of the arithmetic may stay
        assert not any(count(fused, t) for t in LEFTOVERS), fused.format()
        assert count(fused, aten.mul.Tensor) == count(fused, aten.add.Tensor) == 0, fused.format()
    assert_equivalent(case.model, fused, case.inputs)


def test_fuse_layernorm_absorbs_weight_and_bias():
    torch.manual_seed(0)
    block = DecomposedNorm(6, "layer-norm", "pow", "rsqrt", "weight+bias", (-1,), 1e-5, False)
    x = torch.randn(2, 3, 6)
    fused, stats = run_pass("fuse-layernorm", fxopt.capture(block, (x,)))
    assert stats["matches"] == {"layer-norm": 1, "layer-norm-weight": 1, "layer-norm-bias": 1}
    norm = next(fused.call_nodes(aten.layer_norm.default))
    assert norm.args[1] == [6] and norm.args[2].target == "weight" and norm.args[3].target == "bias"
    assert_equivalent(block, fused, (x,))


def test_fuse_layernorm_turns_the_llama_round_trip_into_rms_norm():
    torch.manual_seed(0)
    block = DecomposedNorm(8, "rms-norm", "pow", "rsqrt", "left-weight", (-1,), 1e-6, True).half()
    x = torch.randn(2, 3, 8).half()
    graph = fxopt.Pipeline("cleanup")(fxopt.capture(block, (x,))).graph  # drops the casts' dtype assertions
    fused, stats = run_pass("fuse-layernorm", graph)
    assert stats["matches"] == {"rms-norm": 1, "rms-norm-weight": 1}
    assert count(fused, aten._to_copy.default) == 0  # the float32 round trip is inside aten.rms_norm
    assert_equivalent(block, fused, (x,))


class NotTrailing(nn.Module):
    def forward(self, x):  # normalizes over dim 1 of [B, C, L]: not what layer_norm computes
        centered = x - x.mean(1, keepdim=True)
        return centered * torch.rsqrt(centered.pow(2).mean(1, keepdim=True) + 1e-5)


def test_fuse_layernorm_leaves_non_trailing_reductions_alone():
    graph = fxopt.capture(NotTrailing(), (torch.randn(2, 3, 4),))
    result, stats = run_pass("fuse-layernorm", graph)
    assert stats["matches"] == {} and len(result) == len(graph)
    assert sum(stats["declined"].values()) >= 1  # seen, and refused


def test_fuse_layernorm_rejects_unknown_kinds():
    with pytest.raises(fxopt.PassError, match=r"fuse-layernorm: kinds='layer-norm;batch-norm' names unknown kinds "
                                              r"\['batch-norm'\]; choose from layer-norm, rms-norm"):
        fxopt.Pipeline("fuse-layernorm{kinds=layer-norm;batch-norm}")
