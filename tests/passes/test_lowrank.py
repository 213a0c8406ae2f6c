"""low-rank: exact at full rank on generated models (linear and 1x1 conv), the SVD's optimality, the three rank
rules, the no-gain skip, layer filters, activation-aware SVD against plain, and errors.

Real MiniLM bounds are in test_lowrank_minilm.py.
"""
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import fxopt
from fxopt.passes.lowrank import factor_weight, spectrum
from tests.harness import assert_equivalent, conv_model_cases, count, examples, relative_error, token_model_cases

aten = torch.ops.aten
FLOAT_DTYPES = (torch.float32, torch.float64)


def low_rank(graph, options: str, calibration=None):
    return fxopt.Pipeline(f"low-rank{{{options}}}", debug=True, calibration=calibration)(graph)


def factorable_modules(model: nn.Module) -> int:
    """Linears, and 1x1 ungrouped convs: what low-rank should factor in a harness model."""
    return sum(isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)
               for m in model.modules())


def matrix_with_singular_values(values, out_features, in_features, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_features, len(values), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, len(values), generator=gen, dtype=torch.float64))
    return (u * torch.tensor(values, dtype=torch.float64)) @ v.t()


class TwoLinears(nn.Module):
    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.up, self.down = nn.Linear(up.shape[1], up.shape[0]), nn.Linear(down.shape[1], down.shape[0])
        with torch.no_grad():
            self.up.weight.copy_(up)
            self.down.weight.copy_(down)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


# ------------------------------------------------------------- equivalence
@examples(20)
@given(case=st.one_of(token_model_cases(dtypes=FLOAT_DTYPES), conv_model_cases(dtypes=FLOAT_DTYPES)),
       statistic=st.sampled_from([None, "rms", "absmean", "covariance"]))
def test_full_rank_factors_reproduce_every_model(case, statistic):
    graph = fxopt.capture(case.model, case.inputs)
    expected = factorable_modules(case.model)
    options = "rank=4096,force=true"
    if statistic is not None and expected > 0:
        options += f",activation-aware=true,statistic={statistic}"
    result = low_rank(graph, options, calibration=[case.inputs])
    stats = result.stats["0:low-rank"]
    assert stats["factored"] == len(stats["ranks"]) == expected
    extra_ops = count(result.graph, aten.linear.default) + count(result.graph, aten.convolution.default) - (
        count(graph, aten.linear.default) + count(graph, aten.convolution.default))
    assert extra_ops == expected  # one new op in front of each factored one
    assert_equivalent(graph, result.graph, case.inputs)


@examples(25)
@given(out_features=st.integers(1, 24), in_features=st.integers(1, 24), rank=st.integers(1, 24),
       seed=st.integers(0, 2 ** 16))
def test_truncated_svd_is_optimal_plain_and_scaled(out_features, in_features, rank, seed):
    """Eckart-Young: the error is the dropped singular values; ASVD is optimal for the scaled error."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    s = torch.rand(in_features, generator=gen, dtype=torch.float64) * 10 + 0.1
    a, b = factor_weight(w, rank)
    kept = min(rank, out_features, in_features)
    assert a.shape == (kept, in_features) and b.shape == (out_features, kept)
    tail = spectrum(w).singular_values[kept:]
    assert torch.isclose((w - b @ a).norm(), tail.norm(), atol=1e-9)
    aa, ab = factor_weight(w, rank, scale=s)
    scaled_error = ((w - ab @ aa) * s).norm()
    assert torch.isclose(scaled_error, spectrum(w, s).singular_values[kept:].norm(), atol=1e-9)
    assert scaled_error <= ((w - b @ a) * s).norm() + 1e-9
    # Whitening: with L lower-triangular, B A is the best rank-r fit in the norm ||(W - B A) L||.
    mix = torch.randn(in_features, in_features, generator=gen, dtype=torch.float64)
    lower = torch.linalg.cholesky(mix @ mix.t() + 0.1 * torch.eye(in_features, dtype=torch.float64))
    wa, wb = factor_weight(w, rank, scale=lower)
    whitened_error = ((w - wb @ wa) @ lower).norm()
    assert torch.isclose(whitened_error, spectrum(w, lower).singular_values[kept:].norm(), atol=1e-8)
    assert whitened_error <= min(((w - b @ a) @ lower).norm(), ((w - ab @ aa) @ lower).norm()) + 1e-8


# ---------------------------------------------------------------- rank rules
def test_energy_keeps_the_smallest_rank_reaching_the_threshold():
    # Energy shares 16, 4, 1, 0.25 of 21.25: ranks 1, 2, 3, 4 hold 75.3%, 94.1%, 98.8%, 100%.
    up = matrix_with_singular_values([4.0, 2.0, 1.0, 0.5], 32, 16).float()
    x = torch.randn(3, 16)
    graph = fxopt.capture(TwoLinears(up, torch.randn(8, 32)), (x,))
    for energy, expected in ((0.7, 1), (0.9, 2), (0.95, 3), (0.99, 4)):
        stats = low_rank(graph, f"energy={energy},layers=up").stats["0:low-rank"]
        assert stats["ranks"] == {"linear": expected}, energy
    exact = low_rank(graph, "energy=0.99,layers=up").graph
    assert_equivalent(graph, exact, (x,), tol=1e-5)  # rank 4 holds the whole (rank-4) weight


def test_a_layer_whose_factors_are_not_smaller_is_left_dense():
    """Linear(8 -> 8): rank 4 costs 4·16 = 64 = 8·8 parameters, no gain; rank 3 (48) is factored."""
    x = torch.randn(2, 8)
    graph = fxopt.capture(nn.Linear(8, 8), (x,))
    skipped = low_rank(graph, "rank=4")
    assert not skipped.modified and skipped.stats["0:low-rank"]["skipped_no_gain"] == {"linear": 4}
    assert count(skipped.graph, aten.linear.default) == 1 and torch.equal(skipped.graph(x), graph(x))
    factored = low_rank(graph, "rank=3")
    assert factored.stats["0:low-rank"]["ranks"] == {"linear": 3}
    assert count(factored.graph, aten.linear.default) == 2
    assert graph.param_count() - factored.graph.param_count() == 64 - 48


def test_ratio_spends_the_budget_on_the_layers_with_the_most_energy_per_value():
    torch.manual_seed(0)
    low = matrix_with_singular_values([10.0, 5.0, 1.0, 0.1, 0.1, 0.1], 48, 48, seed=1).float()  # nearly rank 3
    flat = torch.randn(48, 48) / 7  # every singular value carries little of its energy
    graph = fxopt.capture(TwoLinears(low, flat), (torch.randn(2, 48),))
    for ratio in (0.25, 0.5):
        stats = low_rank(graph, f"ratio={ratio}").stats["0:low-rank"]
        budget = ratio * 2 * 48 * 48
        assert stats["params_before"] == 2 * 48 * 48
        assert budget - 96 < stats["params_after"] <= budget  # greedy: within one rank of the budget
        assert stats["ranks"]["linear"] <= 6 < stats["ranks"]["linear_1"]


def test_ranks_fix_single_layers_and_layer_filters_select_by_op_or_weight_name():
    x = torch.randn(2, 32)
    graph = fxopt.capture(TwoLinears(torch.randn(64, 32), torch.randn(32, 64)), (x,))
    assert low_rank(graph, "ranks=linear_1:5").stats["0:low-rank"]["ranks"] == {"linear_1": 5}
    both = low_rank(graph, "rank=8,ranks=linear_1:5").stats["0:low-rank"]["ranks"]
    assert both == {"linear": 8, "linear_1": 5}
    assert low_rank(graph, "rank=8,layers=^up\\.").stats["0:low-rank"]["ranks"] == {"linear": 8}  # weight name
    assert low_rank(graph, "rank=8,skip=linear_1").stats["0:low-rank"]["ranks"] == {"linear": 8}  # op name
    assert not low_rank(graph, "rank=8,skip=up;down").modified


class TiedHead(nn.Module):
    """An LM head that reads the embedding table: factoring it would keep the table and add the factors."""

    def __init__(self, vocab=64, width=16):
        super().__init__()
        self.embed, self.mix = nn.Embedding(vocab, width), nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_a_weight_other_ops_also_read_is_not_factored():
    ids = torch.randint(0, 64, (2, 5))
    graph = fxopt.capture(TiedHead(), (ids,))
    table = next(graph.call_nodes(aten.embedding.default)).args[0].target  # export names the tied tensor
    stats = low_rank(graph, "rank=2").stats["0:low-rank"]
    assert stats["skipped_shared"] == [table] and stats["ranks"] == {"linear": 2}  # mix is factored, head is not


# ------------------------------------------------------------- convolutions
def test_a_1x1_conv_becomes_two_thin_convs_and_other_convs_are_left_alone():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 9)
    model = nn.Sequential(nn.Conv2d(16, 24, 1, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 24, 3, padding=1),  # 3x3: not a linear
                          nn.Conv2d(24, 24, 1, groups=4)).eval()  # grouped: not one matrix
    graph = fxopt.capture(model, (x,))
    result = low_rank(graph, "rank=4")
    assert result.stats["0:low-rank"]["ranks"] == {"conv2d": 4}
    first = next(result.graph.call_nodes(aten.convolution.default))
    shapes = [tuple(result.graph.param(n.args[1]).shape) for n in (first, next(iter(first.users)))]
    assert shapes == [(4, 16, 1, 1), (24, 4, 1, 1)]
    full = low_rank(graph, "rank=16,force=true")
    assert_equivalent(graph, full.graph, (x,))  # stride and padding stay right


@pytest.mark.parametrize("model, x, fused, first", [
    (nn.Sequential(nn.Linear(12, 20), nn.GELU()), torch.randn(4, 12), "linear_act", aten.linear.default),
    (nn.Sequential(nn.Conv2d(12, 20, 1, padding=1), nn.ReLU()), torch.randn(2, 12, 5, 5), "conv_act",
     aten.convolution.default),
])
def test_fused_ops_with_an_activation_are_factored_too(model, x, fused, first):
    graph = fxopt.Pipeline("fuse-epilogue")(fxopt.capture(model.eval(), (x,))).graph
    fused = getattr(torch.ops.fxopt, fused).default
    assert count(graph, fused) == 1
    result = low_rank(graph, "rank=64,force=true")
    assert count(result.graph, fused) == 1 and count(result.graph, first) == count(graph, first) + 1
    assert_equivalent(graph, result.graph, (x,))


# ----------------------------------------------------------- activation-aware
def test_activation_aware_beats_plain_svd_at_equal_rank_on_skewed_inputs():
    """Input channels with scales from 0.05 to 20, as after a LayerNorm with outlier channels."""
    torch.manual_seed(0)
    scales = torch.logspace(-1.3, 1.3, 64)[torch.randperm(64)]
    calibration, held_out = torch.randn(256, 64) * scales, torch.randn(256, 64) * scales
    graph = fxopt.capture(nn.Linear(64, 64), (calibration,))
    for rank in (4, 16):
        plain = relative_error(graph(held_out), low_rank(graph, f"rank={rank}").graph(held_out))
        aware = relative_error(graph(held_out), low_rank(graph, f"rank={rank},activation-aware=true",
                                                         [(calibration,)]).graph(held_out))
        assert aware < 0.8 * plain, (rank, plain, aware)


def test_covariance_whitening_beats_channel_scales_on_correlated_inputs():
    """Inputs near an 8-dim subspace of the 64 channels: whitening finds it, per-channel scales cannot."""
    torch.manual_seed(0)
    basis = torch.randn(8, 64)
    calibration, held_out = (torch.randn(512, 8) @ basis + 0.01 * torch.randn(512, 64) for _ in range(2))
    graph = fxopt.capture(nn.Linear(64, 64), (calibration,))
    errors = {statistic: relative_error(graph(held_out), low_rank(
        graph, f"rank=8,activation-aware=true,statistic={statistic}", [(calibration,)]).graph(held_out))
        for statistic in ("rms", "covariance")}
    assert errors["covariance"] < 0.1 * errors["rms"], errors


def test_activation_aware_without_calibration_data_says_how_to_get_it():
    graph = fxopt.capture(nn.Linear(8, 16), (torch.randn(2, 8),))
    message = (r"low-rank: node %linear \(aten.linear.default\): activation-aware=true needs calibration data and "
               r"none was given; pass it as LowRank\(\.\.\., calibration=batches\) or Pipeline\(spec, "
               r"calibration=batches\)")
    with pytest.raises(fxopt.PassError, match=message):
        low_rank(graph, "rank=2,activation-aware=true")


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("options, message", [
    ("rank=0", r"low-rank: rank=0 must be a positive integer"),
    ("rank=-3", r"low-rank: rank=-3 must be a positive integer"),
    ("energy=0", r"low-rank: energy=0.0 is outside \(0, 1\]"),
    ("energy=1.5", r"low-rank: energy=1.5 is outside \(0, 1\]"),
    ("ratio=0", r"low-rank: ratio=0.0 is outside \(0, 1\]"),
    ("ratio=1.2", r"low-rank: ratio=1.2 is outside \(0, 1\]"),
    ("rank=8,ratio=0.5", r"low-rank: rank=8 and ratio=0.5 both choose the rank; give only one"),
    ("ranks=linear_4=32", r"low-rank: ranks entry 'linear_4=32' is not node:rank"),
    ("ranks=linear_4:0", r"low-rank: ranks entry 'linear_4:0' is not node:rank with a positive rank"),
    ("statistic=max,activation-aware=true", r"low-rank: statistic='max' names unknown statistic"),
    ("alpha=0.5", r"low-rank: statistic and alpha apply to activation-aware=true only"),
    ("activation-aware=true,statistic=covariance,alpha=0.5", r"low-rank: alpha=0.5 applies to statistic=rms or"),
    ("layers=up(", r"low-rank: layers='up\(' is not a regular expression"),
])
def test_bad_options_raise(options, message):
    with pytest.raises(fxopt.PassError, match=message):
        fxopt.Pipeline(f"low-rank{{{options}}}")


def test_filters_and_ranks_must_name_something_in_the_graph():
    graph = fxopt.capture(TwoLinears(torch.randn(16, 8), torch.randn(8, 16)), (torch.randn(2, 8),))
    with pytest.raises(fxopt.PassError, match=r"low-rank: layers='ffn' matches no linear or 1x1 conv of this graph; "
                                              r"patterns are searched in op and weight names: linear \(up.weight\)"):
        low_rank(graph, "rank=2,layers=ffn")
    with pytest.raises(fxopt.PassError, match=r"low-rank: ranks names linear_9, not a selected linear"):
        low_rank(graph, "ranks=linear_9:2")
