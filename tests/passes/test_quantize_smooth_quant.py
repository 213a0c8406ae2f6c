"""smooth-quant: bit-exact float equivalence on generated models, the statistics calibrate records for it, where
the division goes (LayerNorm, linear rows, an explicit mul), that it flattens an outlier channel and lowers static
int8 error, and errors."""
import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st

import fxopt
from fxopt.passes.quantize.calibrate import CHANNEL_ABSMAX_KEY
from tests.passes.test_calibration_data import tensors_in_meta
from tests.harness import assert_equivalent, conv_model_cases, count, examples, relative_error, token_model_cases

aten = torch.ops.aten


def smooth(graph, inputs, alpha=0.5):
    calibrated = fxopt.calibrate(graph, [inputs], progress=False)
    return fxopt.Pipeline(f"smooth-quant{{alpha={alpha}}}", debug=True)(calibrated)


# ------------------------------------------------------------- equivalence
@examples(25)
@given(case=st.one_of(token_model_cases(), conv_model_cases()), alpha=st.floats(0.0, 1.0))
def test_smooth_quant_is_an_identity_in_float(case, alpha):
    """Power-of-two factors make x / s and W · s exact: the smoothed graph is bit-exact, not only close."""
    graph = fxopt.capture(case.model, case.inputs)
    linears = count(graph, aten.linear.default)
    assume(linears > 0)
    result = smooth(graph, case.inputs, alpha)
    stats = result.stats["0:smooth-quant"]
    assert stats["linears"] == linears
    assert stats["groups"] == stats["folded_layernorm"] + stats["folded_linear"] + stats["inserted_mul"] >= 1
    assert count(result.graph, aten.mul.Tensor) == count(graph, aten.mul.Tensor) + stats["inserted_mul"]
    assert_equivalent(graph, result.graph, case.inputs)
    assert torch.equal(graph(*case.inputs), result.graph(*case.inputs))


def test_calibrate_records_the_channel_absmax_of_linear_inputs_and_keeps_no_batch():
    x1, x2 = torch.randn(3, 5, 8), 3 * torch.randn(3, 5, 8)
    graph = fxopt.capture(nn.Linear(8, 4), (x1,))
    calibrated = fxopt.calibrate(graph, [(x1,), (x2,)], progress=False)
    expected = torch.maximum(x1.abs().amax(dim=(0, 1)), x2.abs().amax(dim=(0, 1)))
    assert torch.equal(calibrated.placeholders[0].meta[CHANNEL_ABSMAX_KEY], expected)
    for kept in (calibrated, calibrated.copy()):  # calibration data is handed to passes, never kept (issue 21)
        assert not any(t is x or t.data_ptr() == x.data_ptr() for t in tensors_in_meta(kept) for x in (x1, x2))


# ------------------------------------------------------- where s is divided
class ThreeWays(nn.Module):
    """LayerNorm read only by a linear (fold), linear -> linear (fold rows), and a residual read (mul)."""

    def __init__(self, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        h = self.down(self.up(self.norm(x)))
        return h + self.q(h) * self.k(h)


def test_division_is_folded_into_layernorm_and_linear_rows_or_becomes_one_mul():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    graph = fxopt.capture(ThreeWays(), (x,))
    result = smooth(graph, (x,))
    assert result.stats["0:smooth-quant"] == {"groups": 3, "linears": 4, "folded_layernorm": 1, "folded_linear": 1,
                                              "inserted_mul": 1}
    assert count(result.graph, aten.mul.Tensor) == count(graph, aten.mul.Tensor) + 1
    assert_equivalent(graph, result.graph, (x,))


def test_graph_without_linears_is_left_alone():
    x = torch.randn(2, 3, 8, 8)
    graph = fxopt.capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (x,))
    result = smooth(graph, (x,))
    assert not result.modified and result.stats["0:smooth-quant"]["groups"] == 0
    assert len(result.graph) == len(graph)


# --------------------------------------------------------- what it is for
class Outlier(nn.Module):
    """A linear whose input has one channel 50x larger than the others, as in Transformer LayerNorm outputs."""

    def __init__(self, width=32):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(width))
        self.gain.data[3] = 50.0
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return self.linear(x * self.gain)


def channel_spread(graph, node_name):
    absmax = graph.node(node_name).meta[CHANNEL_ABSMAX_KEY]
    return float(absmax.max() / absmax.min())


def test_outlier_channel_is_flattened_and_static_int8_error_drops():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    graph = fxopt.capture(Outlier(), (x,))
    calibrated = fxopt.calibrate(graph, [(x,)], progress=False)
    smoothed = fxopt.Pipeline("smooth-quant{alpha=0.5}", debug=True)(calibrated).graph
    recalibrated = fxopt.calibrate(smoothed, [(x,)], progress=False)
    linear_input = lambda g: g.node("linear").args[0].name  # noqa: E731
    assert channel_spread(recalibrated, linear_input(recalibrated)) < channel_spread(calibrated, "mul") ** 0.5 * 1.5
    static = fxopt.Pipeline("insert-qdq{scheme=static}")
    plain_error = relative_error(graph(x), static(calibrated).graph(x))
    smoothed_error = relative_error(graph(x), static(recalibrated).graph(x))
    assert smoothed_error < 0.5 * plain_error


# ------------------------------------------------------------------ errors
def test_uncalibrated_graph_raises_naming_the_linear():
    x = torch.randn(2, 4)
    graph = fxopt.capture(nn.Linear(4, 3), (x,))
    message = (r"smooth-quant: node %linear \(aten.linear.default\): input %input_1 has no per-channel statistics; "
               r"run fxopt.calibrate\(graph, data\) first")
    with pytest.raises(fxopt.PassError, match=message):
        fxopt.Pipeline("smooth-quant")(graph)


def test_alpha_outside_the_unit_interval_raises():
    with pytest.raises(fxopt.PassError, match=r"smooth-quant: alpha=1.5 is outside \[0, 1\]"):
        fxopt.Pipeline("smooth-quant{alpha=1.5}")


def test_static_quantization_after_smoothing_needs_a_new_calibration():
    x = torch.randn(3, 5, 16)
    result = smooth(fxopt.capture(ThreeWays(), (x,)), (x,))
    with pytest.raises(fxopt.PassError, match="has no calibrated QParams; call fxopt.calibrate"):
        fxopt.Pipeline("insert-qdq{scheme=static}")(result.graph)
