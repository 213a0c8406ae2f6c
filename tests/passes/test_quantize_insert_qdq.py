"""insert-qdq: bit-exact identity ranges, the analytic int8 error bound of a linear, run/export/verify
on generated models, storage, fold-constants, and errors."""
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import assume, given, note
from hypothesis import strategies as st

import fxopt
from fxopt.ir import meta as M
from tests.harness import conv_model_cases, count, examples, token_model_cases

aten = torch.ops.aten
QD = torch.ops.quantized_decomposed
SCHEMES = ("static", "dynamic", "weight-only")


def quantize(graph, inputs, scheme="static", observer="minmax"):
    if scheme == "static":
        graph = fxopt.calibrate(graph, [inputs], observer=observer, progress=False)
    return fxopt.Pipeline(f"insert-qdq{{scheme={scheme}}}", debug=True)(graph)


def float32_cases():
    return st.one_of(token_model_cases(dtypes=(torch.float32,)), conv_model_cases(dtypes=(torch.float32,)))


# ------------------------------------------------------------ identity range
@examples(25)
@given(batch=st.integers(1, 4), n_in=st.integers(1, 12), n_out=st.integers(1, 8), seed=st.integers(0, 2**16),
       bias=st.booleans())
def test_identity_range_static_linear_is_bit_exact(batch, n_in, n_out, seed, bias):
    """Integer weights whose rows reach ±127 and inputs spanning ±127 get scale 1, zero point 0: exact."""
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        w = torch.randint(-127, 128, (n_out, n_in)).float()
        w[:, 0] = torch.where(torch.rand(n_out) < 0.5, -127.0, 127.0)  # each row's |max| is 127: scale 1
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randint(-50, 50, (n_out,)).float())
    x = torch.randint(-127, 128, (batch, n_in)).float()
    span = torch.zeros(batch, n_in)
    span[0, 0] = 127.0  # a calibration batch reaching 127: the symmetric input scale is 127/127
    graph = fxopt.capture(lin, (x,))
    calibrated = fxopt.calibrate(graph, [(x,), (span,)], observer="minmax", scheme="symmetric", progress=False)
    q = M.qparams(calibrated.placeholders[0])
    assert float(q.scale) == 1.0 and int(q.zero_point) == 0
    result = fxopt.Pipeline("insert-qdq{scheme=static}", debug=True)(calibrated)
    assert torch.equal(result.graph(x), graph(x))


# ---------------------------------------------------------- analytic bound
def collect_values(graph, inputs):
    """Every node's value on ``inputs`` (an interpreter that keeps them)."""
    values = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    with torch.no_grad():
        Keep(graph.module, garbage_collect_values=False).run(*inputs)
    return values


def check_linear_bounds(original, quantized, inputs):
    """Each quantized linear's output error is within the bound its scales imply, on its own float input.

    With x̂ = x + e_x and Ŵ = W + e_W, |e_W[o, j]| ≤ s_w[o]/2:
        |ŷ_o - y_o| ≤ Σ_j (|e_x[j]| |W_oj| + |x_j| s_w[o]/2 + |e_x[j]| s_w[o]/2)   (+ float rounding slack)
    where |e_x| ≤ s_x/2 for every input value inside the calibrated range. Upstream quantization can push
    a value outside that range (it is then clipped), so e_x is measured rather than assumed.
    """
    values = collect_values(quantized, inputs)
    checked = 0
    for node in quantized.call_nodes(aten.linear.default):
        act_dq, w_dq = node.args[0], node.args[1]
        if getattr(w_dq, "target", None) != QD.dequantize_per_channel.default:
            continue
        w = original.param(original.node(node.name).args[1])
        s_w = quantized.param(w_dq.args[1]).view(-1, 1)
        assert (values[w_dq] - w).abs().le(s_w / 2 * (1 + 1e-5) + 1e-7).all(), f"%{node.name}: weight error"
        if act_dq.target == QD.dequantize_per_tensor.default:
            q_node = act_dq.args[0]
            x, s_x, qmin, qmax = values[q_node.args[0]], act_dq.args[1], q_node.args[3], q_node.args[4]
            e_x = (values[act_dq] - x).abs()
            inside = (values[q_node] > qmin) & (values[q_node] < qmax)
            assert (e_x[inside] <= s_x / 2 * (1 + 1e-4) + 1e-7).all(), f"%{node.name}: input error"
        else:
            x, e_x = values[act_dq], torch.zeros_like(values[act_dq])
        bias = node.args[2] if len(node.args) > 2 else None
        exact = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else values[bias].double())
        s_w_row, e_x, w_abs = s_w.view(-1).double(), e_x.double(), w.abs().double()
        bound = e_x @ w_abs.t() + x.abs().double().sum(-1, keepdim=True) * s_w_row / 2 \
            + e_x.sum(-1, keepdim=True) * s_w_row / 2
        slack = 1e-5 * (x.abs().double() @ w_abs.t() + e_x @ w_abs.t()) + 1e-6
        err = (values[node].double() - exact).abs()
        assert (err <= bound * (1 + 1e-4) + slack).all(), f"%{node.name}: error {err.max():.3g} over the bound"
        checked += 1
    return checked


@examples(25)
@given(case=float32_cases())
def test_int8_linear_error_within_the_analytic_bound(case):
    graph = fxopt.capture(case.model, case.inputs)  # once for every scheme: the capture is most of the time
    linears = count(graph, aten.linear.default)
    assume(linears > 0)
    for scheme in ("static", "weight-only"):
        note(f"scheme={scheme}")
        result = quantize(graph, case.inputs, scheme)
        assert check_linear_bounds(graph, result.graph, case.inputs) == linears


# --------------------------------------------------- runs, exports, verifies
@examples(25)
@given(case=float32_cases())
def test_quantized_graph_runs_exports_and_verifies(case):
    graph = fxopt.capture(case.model, case.inputs)  # once for every scheme: the capture is most of the time
    n_ops = sum(count(graph, t) for t in fxopt.passes.quantize.quantizable_ops())
    assume(n_ops > 0)  # a stack of only redundant ops has nothing to quantize
    for scheme in SCHEMES:
        note(f"scheme={scheme}")
        check_quantized_graph(graph, case.inputs, n_ops, scheme)


def check_quantized_graph(graph, inputs, n_ops, scheme):
    result = quantize(graph, inputs, scheme)
    quantized = result.graph
    quantized.verify()
    assert result.stats["0:insert-qdq"]["quantized_ops"] == n_ops
    weights = count(quantized, QD.dequantize_per_channel.default)
    assert weights == result.stats["0:insert-qdq"]["weights"] >= 1
    q_acts = count(quantized, QD.quantize_per_tensor.default) + count(quantized, QD.quantize_per_tensor.tensor)
    assert q_acts == result.stats["0:insert-qdq"]["activations"]
    assert (q_acts == 0) == (scheme == "weight-only")
    out = quantized(*inputs)
    assert torch.isfinite(out).all()
    exported = torch.export.export(quantized.module, inputs, strict=False)
    assert torch.equal(exported.module()(*inputs), out)


# --------------------------------------------------- storage and folding
def test_int8_weights_shrink_storage_and_survive_fold_constants():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.ReLU(), nn.Linear(256, 256, bias=False))
    x = torch.randn(4, 256)
    graph = fxopt.capture(model, (x,))
    quantized = quantize(graph, (x,), "weight-only").graph
    assert graph.size_bytes() / quantized.size_bytes() > 3.9
    assert {t.dtype for t in quantized.params().values()} == {torch.int8, torch.float32}
    cleaned = fxopt.Pipeline("cleanup", debug=True)(quantized).graph
    assert count(cleaned, QD.dequantize_per_channel.default) == 2
    assert cleaned.size_bytes() == quantized.size_bytes()
    assert torch.equal(cleaned(x), quantized(x))


def test_tied_weight_is_quantized_once():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(2, 8)
    result = quantize(fxopt.capture(model, (x,)), (x,), "weight-only")
    assert result.stats["0:insert-qdq"] == {"quantized_ops": 2, "weights": 1, "activations": 0, "skipped": 0}


def test_float64_and_weightless_graphs_are_left_alone():
    x = torch.randn(2, 4, dtype=torch.float64)
    result = quantize(fxopt.capture(nn.Linear(4, 4).double(), (x,)), (x,), "weight-only")
    assert result.stats["0:insert-qdq"]["skipped"] == 1 and not result.modified
    relu = fxopt.capture(nn.ReLU(), (torch.randn(2, 4),))
    untouched = fxopt.Pipeline("insert-qdq{scheme=dynamic}")(relu)
    assert untouched.stats["0:insert-qdq"]["quantized_ops"] == 0 and len(untouched.graph) == len(relu)


# --------------------------------------------------------------------- errors
def test_static_before_calibration_raises_naming_the_node():
    x = torch.randn(2, 4)
    graph = fxopt.capture(nn.Linear(4, 3), (x,))
    with pytest.raises(fxopt.PassError, match=r"insert-qdq: node %linear \(aten.linear.default\): input %input_1 has no "
                                              r"calibrated QParams; call fxopt.calibrate\(graph, data\)"):
        fxopt.Pipeline("insert-qdq{scheme=static}")(graph)


def test_unknown_scheme_raises():
    with pytest.raises(fxopt.PassError, match="insert-qdq: unknown scheme 'int4'; valid schemes: static, dynamic"):
        fxopt.Pipeline("insert-qdq{scheme=int4}")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x):
        q = self.q(x)
        return torch.softmax(q @ x.transpose(-1, -2), -1) @ x


def test_activation_matmuls_option_leaves_attention_matmuls_in_float():
    x = torch.randn(2, 3, 8)
    calibrated = fxopt.calibrate(fxopt.capture(Attention(), (x,)), [(x,)], progress=False)
    every = fxopt.Pipeline("insert-qdq{scheme=static}", debug=True)(calibrated)
    linear_only = fxopt.Pipeline("insert-qdq{scheme=static,activation-matmuls=false}", debug=True)(calibrated)
    assert every.stats["0:insert-qdq"]["quantized_ops"] == 3
    assert linear_only.stats["0:insert-qdq"] == {"quantized_ops": 1, "weights": 1, "activations": 1, "skipped": 0}
    for matmul in linear_only.graph.call_nodes(aten.matmul.default):
        assert all(a.target != QD.dequantize_per_tensor.default for a in matmul.args)
    torch.testing.assert_close(linear_only.graph(x), calibrated(x), atol=0.05, rtol=0.05)
