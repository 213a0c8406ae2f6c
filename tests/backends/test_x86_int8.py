"""The x86-int8 backend: exact int32 accumulation in oneDNN's u8 x s8 GEMM, requantized and fused-activation
epilogues, dynamic activations within the analytic bound, int8 embedding gathers, lowering of generated models
against their eager Q/DQ graph (layer by layer and end to end), float fallbacks, ISA detection and its 7-bit
codes, artifacts (in memory, on disk, in a fresh process) and real all-MiniLM-L6-v2.

Exactness depends on the CPU: without VNNI, oneDNN's int8 GEMM adds pairs of ``u8 x s8`` products in a
saturating int16 (``vpmaddubsw``), so only activation codes ``0..127`` are exact there; with VNNI or AMX,
``0..255`` are. Every test draws codes from ``detect_isa().activation_levels`` and calibrates with
``QDTYPE`` (int7 or int8), so the same assertions hold on an AVX2 desktop and on a VNNI Xeon.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import fxopt
from fxopt.backends import x86_int8
from fxopt.backends.artifact import load_artifact, save_artifact
from fxopt.backends.x86_int8 import ActivationCodes, Int8Embedding, Int8Linear, detect_isa
from fxopt.backends.x86_int8.isa import ENV_OVERRIDE, ISAS, cpu_flags, isa_from_flags
from fxopt.errors import ArtifactError, LoweringError
from fxopt.ir.ops import fxopt_ops
from tests.harness import count, examples, relative_error, token_model_cases

aten = torch.ops.aten
QD = torch.ops.quantized_decomposed
ISA = detect_isa()
LEVELS = ISA.activation_levels  # the largest activation code this CPU's int8 GEMM takes exactly
QDTYPE = "int8" if ISA.exact_8bit else "int7"  # calibration whose codes fit LEVELS
ACTIVATIONS = {"none": lambda y: y, "relu": F.relu, "gelu": F.gelu,
               "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "silu": F.silu}
LIPSCHITZ = 1.2  # >= the largest slope of relu, gelu, gelu-tanh and silu (about 1.13 and 1.1)
FLOAT_SLACK = 1e-5  # float32 rounding, relative to sum |x| |w| (+ |bias|), with ample margin


def linear_targets():
    return aten.linear.default, fxopt_ops().linear_act.default


def count_linears(graph) -> int:
    return sum(count(graph, t) for t in linear_targets())


def random_weight(out_features, in_features, gen, extreme=False) -> torch.Tensor:
    """int8 codes in [-127, 127] (symmetric per-channel weights), or only the extremes +-127."""
    if extreme:
        return torch.where(torch.rand(out_features, in_features, generator=gen) < 0.5, -127, 127).to(torch.int8)
    return torch.randint(-127, 128, (out_features, in_features), generator=gen).to(torch.int8)


def random_codes(shape, levels, gen, extreme=False) -> torch.Tensor:
    """Activation codes in [0, levels], or only 0 and ``levels`` (the worst case for a saturating int16)."""
    if extreme:
        return torch.where(torch.rand(shape, generator=gen) < 0.5, 0, levels)
    return torch.randint(0, levels + 1, shape, generator=gen)


def float_bound_scale(x_hat: torch.Tensor, w_hat: torch.Tensor, bias) -> torch.Tensor:
    """sum_j |x_j| |w_oj| + |b_o| per output element: what float32 rounding error is relative to."""
    scale = x_hat.abs().double() @ w_hat.abs().double().t()
    return scale + (0 if bias is None else bias.abs().double())


# ======================================================================= kernels
# ----------------------------------------------------- exact int32 accumulation
@examples(25)
@given(m=st.integers(1, 64), k=st.integers(1, 512), n=st.integers(1, 64), zp=st.integers(0, LEVELS),
       lead=st.sampled_from([(), (1,), (3,)]), extreme=st.booleans(), seed=st.integers(0, 2**16))
def test_int32_accumulation_is_exact(m, k, n, zp, lead, extreme, seed):
    """Scale 1 and integer inputs: the kernel's float32 output is the int64 product (|acc| < 2**24)."""
    gen = torch.Generator().manual_seed(seed)
    weight = random_weight(n, k, gen, extreme)
    codes = random_codes((*lead, m, k), LEVELS, gen, extreme)
    assert k * LEVELS * 127 < 2**24  # every accumulator is exact in float32
    linear = Int8Linear(weight, torch.ones(n), None, ActivationCodes(1.0, zp, LEVELS), isa_levels=LEVELS)
    x = (codes - zp).float()  # quantizes to exactly `codes`
    with torch.inference_mode():
        out = linear(x)
    expected = (codes - zp) @ weight.long().t()
    assert out.dtype == torch.float32 and out.shape == (*lead, m, n)
    wrong = (out.double() != expected.double()).sum().item()
    assert wrong == 0, f"{wrong} of {expected.numel()} accumulators differ (max |diff| " \
                       f"{(out.double() - expected.double()).abs().max().item():.0f}) on {ISA.name}"


@examples(20)
@given(m=st.integers(1, 48), k=st.integers(1, 512), n=st.integers(1, 48), zp=st.integers(0, 255),
       extreme=st.booleans(), seed=st.integers(0, 2**16))
def test_seven_bit_weights_take_full_eight_bit_activations_exactly(m, k, n, zp, extreme, seed):
    """Weights within +-63 keep 2 * 255 * 63 inside AVX2's int16 pair sums: 8-bit activations are exact on any ISA."""
    gen = torch.Generator().manual_seed(seed)
    weight = (random_weight(n, k, gen, extreme).to(torch.int16) * 63 // 127).to(torch.int8)
    codes = random_codes((m, k), 255, gen, extreme)
    levels = ISA.activation_levels_for(weight)
    assert levels == 255
    linear = Int8Linear(weight, torch.ones(n), None, ActivationCodes(1.0, zp, 255), isa_levels=levels)
    with torch.inference_mode():
        out = linear((codes - zp).float())
    expected = (codes - zp) @ weight.long().t()
    assert torch.equal(out.double(), expected.double()), f"7-bit weights inexact on {ISA.name}"


def test_eight_bit_weights_need_seven_bit_activations_only_without_vnni():
    weight = torch.tensor([[127, -64]], dtype=torch.int8)
    assert ISAS["avx2"].activation_levels_for(weight) == 127
    assert ISAS["avx2"].activation_levels_for(weight // 2) == 255
    assert ISAS["avx512-vnni"].activation_levels_for(weight) == 255


def test_insert_qdq_bits7_stores_weight_codes_within_63():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16)
    graph = fxopt.calibrate(fxopt.capture(model, (x,)), [(x,)], progress=False)
    quantized = fxopt.Pipeline("insert-qdq{bits=7,activation-matmuls=false}")(graph).graph
    dqs = list(quantized.call_nodes(QD.dequantize_per_channel.default))
    assert len(dqs) == 2
    for dq in dqs:
        codes = quantized.param(dq.args[0])
        assert codes.dtype == torch.int8 and int(codes.abs().max()) == 63 and tuple(dq.args[4:6]) == (-64, 63)
    assert relative_error(model(x), quantized.run(x)) < 0.05


# ------------------------------------------------- scales, bias, epilogues
def scaled_case(m, k, n, seed):
    """Random int8 weights with per-channel scales, a bias, and float inputs that quantize exactly."""
    gen = torch.Generator().manual_seed(seed)
    weight = random_weight(n, k, gen)
    weight_scale = torch.rand(n, generator=gen) * 0.02 + 0.002
    bias = torch.randn(n, generator=gen) * 0.5
    zp = int(torch.randint(0, LEVELS + 1, (), generator=gen))
    x_codes = ActivationCodes(0.05, zp, LEVELS)
    codes = random_codes((m, k), LEVELS, gen)
    x = (codes - zp).float() * 0.05
    x_hat = (codes - zp).double() * 0.05  # what the kernel sees: exactly `codes`
    w_hat = weight.double() * weight_scale.double()[:, None]
    return weight, weight_scale, bias, x_codes, codes, x, x_hat, w_hat


@examples(25)
@given(m=st.integers(1, 32), k=st.integers(1, 256), n=st.integers(1, 32),
       activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_float_output_with_fused_activation_matches_the_float_path(m, k, n, activation, seed):
    """relu / gelu / gelu-tanh run in oneDNN's epilogue, silu after it: all match F.* on the dequantized linear."""
    weight, weight_scale, bias, x_codes, _, x, x_hat, w_hat = scaled_case(m, k, n, seed)
    linear = Int8Linear(weight, weight_scale, bias, x_codes, activation, isa_levels=LEVELS)
    with torch.inference_mode():
        out = linear(x)
    expected = ACTIVATIONS[activation](x_hat @ w_hat.t() + bias.double())
    tolerance = FLOAT_SLACK * float_bound_scale(x_hat, w_hat, bias) + 1e-5
    err = (out.double() - expected).abs()
    assert out.dtype == torch.float32
    assert (err <= tolerance).all(), f"{activation}: max error {err.max().item():.3g}"


@examples(25)
@given(m=st.integers(1, 32), k=st.integers(1, 256), n=st.integers(1, 32),
       activation=st.sampled_from(["none", "relu", "gelu", "gelu_tanh"]), spill=st.floats(0.5, 1.0),
       seed=st.integers(0, 2**16))
def test_requantized_output_codes_are_the_rounded_float_result(m, k, n, activation, spill, seed):
    """With output_codes the kernel emits round(y / scale) + zero_point clamped to [0, levels], within one code;
    a consumer that takes those codes computes what it computes from the float input."""
    weight, weight_scale, bias, x_codes, codes, x, x_hat, w_hat = scaled_case(m, k, n, seed)
    y = ACTIVATIONS[activation](x_hat @ w_hat.t() + bias.double())
    lo, hi = min(y.min().item(), 0.0), max(y.max().item(), 0.0)
    scale = max((hi - lo) * spill / LEVELS, 1e-3)  # spill < 1: values clamp at both ends
    zero_point = int(min(max(round(-lo * spill / scale), 0), LEVELS))
    linear = Int8Linear(weight, weight_scale, bias, x_codes, activation, isa_levels=LEVELS)
    linear.output_codes = ActivationCodes(scale, zero_point, LEVELS)
    with torch.inference_mode():
        out = linear(x)
    expected = torch.clamp(torch.round(y / scale) + zero_point, 0, LEVELS).long()
    diff = (out.long() - expected).abs()
    assert out.dtype == torch.uint8 and out.shape == (m, n)
    assert diff.max() <= 1, f"codes off by {diff.max().item()}"
    assert (diff > 0).sum() <= max(1, diff.numel() // 100), f"{(diff > 0).sum().item()} codes off by one"

    consumer = Int8Linear(weight, weight_scale, bias, x_codes, "none", isa_levels=LEVELS)
    with torch.inference_mode():
        from_float = consumer(x)
        consumer.takes_codes = True
        from_codes = consumer(codes.to(torch.uint8))
    assert torch.equal(from_codes, from_float)


@examples(25)
@given(m=st.integers(1, 32), k=st.integers(1, 256), n=st.integers(1, 32), magnitude=st.sampled_from([1e-3, 1.0, 1e3]),
       offset=st.sampled_from([-1.0, 0.0, 1.0, 3.0]), activation=st.sampled_from(["none", "gelu"]),
       seed=st.integers(0, 2**16))
def test_dynamic_activations_are_within_the_analytic_bound(m, k, n, magnitude, offset, activation, seed):
    """input_codes=None: each call spreads [min(x, 0), max(x, 0)] over the ISA's codes, so |x - x_hat| <= s/2 and
    |y - y_hat|_o <= s/2 * sum_j |w_hat_oj| (times the activation's slope), at every input scale."""
    gen = torch.Generator().manual_seed(seed)
    weight, weight_scale = random_weight(n, k, gen), torch.rand(n, generator=gen) * 0.02 + 0.002
    bias = torch.randn(n, generator=gen)
    x = (torch.randn(m, k, generator=gen) + offset) * magnitude
    linear = Int8Linear(weight, weight_scale, bias, None, activation, isa_levels=LEVELS)
    with torch.inference_mode():
        out = linear(x)
    w_hat = weight.double() * weight_scale.double()[:, None]
    expected = ACTIVATIONS[activation](x.double() @ w_hat.t() + bias.double())
    step = (max(x.max().item(), 0.0) - min(x.min().item(), 0.0)) / LEVELS
    bound = LIPSCHITZ * step / 2 * w_hat.abs().sum(1) + FLOAT_SLACK * float_bound_scale(x, w_hat, bias) + 1e-6
    err = (out.double() - expected).abs()
    assert (err <= bound).all(), f"error {err.max().item():.3g} over the bound {bound.min().item():.3g}"


# ------------------------------------------------------------------ embeddings
@examples(25)
@given(vocab=st.integers(1, 64), dim=st.integers(1, 48), ids_shape=st.sampled_from([(5,), (2, 7), (3, 1, 4)]),
       zero_points=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_embedding_equals_dequantize_then_embedding(vocab, dim, ids_shape, zero_points, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (vocab, dim), generator=gen).to(torch.int8)
    scale = torch.rand(vocab, generator=gen) * 0.1 + 1e-3
    zp = torch.randint(-8, 8, (vocab,), generator=gen) if zero_points else None
    ids = torch.randint(0, vocab, ids_shape, generator=gen)
    table = QD.dequantize_per_channel(codes, scale, zp, 0, -128, 127, torch.int8)
    with torch.inference_mode():
        out = Int8Embedding(codes, scale, zp)(ids)
    assert torch.equal(out, F.embedding(ids, table))


# ================================================================== lowering
def node_values(graph, inputs):
    """Every node's value (by name) when ``graph`` runs on ``inputs``."""
    values = {}

    class Keep(fx.Interpreter):
        def run_node(self, n):
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Keep(graph.module, garbage_collect_values=False).run(*inputs)
    return values


def int8_linears(lowered):
    """(call_module node, Int8Linear, name of the linear it replaced) of a lowered module."""
    gm = lowered.module
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Int8Linear):
            yield node, gm.get_submodule(node.target), node.target.rpartition(".")[2]


def linear_parts(quantized, values, linear):
    """(q node, float input, dequantized input, dequantized weight, weight codes, weight scales, bias, activation)."""
    dq, w_dq = linear.args[0], linear.args[1]
    q_node = dq.args[0]
    bias = linear.args[2] if len(linear.args) > 2 else None
    activation = linear.args[3] if linear.target == fxopt_ops().linear_act.default else "none"
    return (q_node, values[q_node.args[0].name], values[dq.name], values[w_dq.name], values[w_dq.args[0].name],
            values[w_dq.args[1].name], None if bias is None else values[bias.name], activation)


def near_ties(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Where x / scale is within 1e-4 of a rounding tie: two correct quantizers may pick either code there.

    The graph rounds ``x / s`` and then adds the zero point; oneDNN's quantize (FBGEMM's) rounds
    ``x / s + zero_point`` in float32. At an exact tie they differ whenever the shifted zero point is odd
    (round half to even), and within ~4e-6 of one by float32 rounding. Ties are common in small models: a
    LayerNorm over 2 features outputs exactly +-1 (times gamma, plus beta), so its calibrated range puts
    its values on exactly +-63.5 codes.
    """
    t = x.double() / scale
    return ((t - t.floor()) - 0.5).abs() < 1e-4


def check_layers(quantized, lowered, inputs, scheme) -> int:
    """Each Int8Linear, fed what its linear reads in the eager Q/DQ graph, gives what that linear gives.

    static: the same input codes except at rounding ties (``near_ties``), so each output element is within
    float rounding plus, for each tied input j of its row, LIPSCHITZ * s_x * s_w[o] * |w_codes[o, j]| (one code
    either way). Requantized outputs are the next quantize node's codes within one code plus that bound over the
    output scale. A consumer fed the eager graph's codes has no ties.
    dynamic: within the analytic bound of ``test_dynamic_activations_are_within_the_analytic_bound`` of the
    float linear on the same input (the kernel's codes need not be the eager graph's: on AVX2 it has 127 levels).
    """
    values = node_values(quantized, inputs)
    checked = 0
    for _, module, name in int8_linears(lowered):
        linear = quantized.node(name)
        q_node, x, x_hat, w_hat, w_codes, w_scale, bias, activation = linear_parts(quantized, values, linear)
        assert module.activation == activation
        rows = x_hat.reshape(-1, x.shape[-1])
        fed = x
        if module.takes_codes:
            fed = (values[q_node.name].to(torch.int16) - q_node.args[3]).to(torch.uint8)
        with torch.inference_mode():
            out = module(fed)
        slack = (FLOAT_SLACK * float_bound_scale(rows, w_hat, bias) + 1e-6).reshape(out.shape)
        if scheme == "dynamic":
            step = (max(x.max().item(), 0.0) - min(x.min().item(), 0.0)) / LEVELS
            expected = ACTIVATIONS[activation](F.linear(x.double(), w_hat.double(),
                                                        None if bias is None else bias.double()))
            bound = LIPSCHITZ * step / 2 * w_hat.abs().double().sum(1) + slack
            err = (out.double() - expected).abs()
            assert (err <= bound).all(), f"%{name}: error {err.max().item():.3g} over the bound"
            checked += 1
            continue
        s_x = float(q_node.args[1])
        tied = torch.zeros_like(rows, dtype=torch.bool) if module.takes_codes else near_ties(x, s_x).reshape(rows.shape)
        one_code = s_x * w_codes.abs().double() * w_scale.double()[:, None]  # [out, in]
        bound = slack + (LIPSCHITZ * tied.double() @ one_code.t()).reshape(out.shape)
        if module.output_codes is not None:
            (requant,) = [u for u in linear.users if u.target == QD.quantize_per_tensor.default]
            expected = values[requant.name].long() - requant.args[3]
            diff = (out.long() - expected).abs()
            allowed = 1 + bound / float(requant.args[1])
            assert (diff <= allowed).all(), f"%{name}: output codes differ by {diff.max().item()}"
        else:
            err = (out.double() - values[name].double()).abs()
            assert (err <= bound).all(), f"%{name}: error {err.max().item():.3g} over the bound " \
                                         f"({tied.sum().item()} tied inputs)"
        checked += 1
    return checked


def tied_inputs(quantized, lowered, inputs) -> int:
    """How many inputs of the static int8 linears sit at rounding ties in the eager graph (see ``near_ties``)."""
    values = node_values(quantized, inputs)
    ties = 0
    for _, module, name in int8_linears(lowered):
        q_node = quantized.node(name).args[0].args[0]
        ties += int(near_ties(values[q_node.args[0].name], float(q_node.args[1])).sum())
    return ties


def snapshot(graph):
    return ([(n.name, n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes],
            dict(graph.params()), [name for name, _ in graph.module.named_modules()], graph.module.code)


def assert_unchanged(graph, before):
    nodes, params, modules, code = before
    now_nodes, now_params, now_modules, now_code = snapshot(graph)
    assert now_nodes == nodes and now_modules == modules and now_code == code
    assert now_params.keys() == params.keys()
    assert all(now_params[k] is params[k] for k in params), "lower replaced a weight of its input graph"


def quantize(graph, inputs, scheme, spec_options="activation-matmuls=false", qdtype=QDTYPE):
    if scheme == "static":
        graph = fxopt.calibrate(graph, [inputs], qdtype=qdtype, progress=False)
    return fxopt.Pipeline(f"insert-qdq{{scheme={scheme},{spec_options}}}", debug=True)(graph).graph


def lower_quietly(graph, **options):
    """lower(), asserting that it has nothing to warn about (no float fallbacks, no inexact codes)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="x86-int8")
        return x86_int8.lower(graph, **options)


def few_examples(n: int) -> settings:
    """``n`` examples under the ci and dev profiles (capturing a model takes ~0.5 s), the slow profile's count there."""
    return settings(max_examples=max(n, settings.default.max_examples) if settings.default.max_examples > 25 else n)


@few_examples(15)
@given(case=token_model_cases(dtypes=(torch.float32,)), fuse=st.booleans())
def test_generated_models_lower_to_int8_kernels_and_match_the_eager_qdq_graph(case, fuse):
    """capture (-> fuse) -> calibrate -> insert-qdq{static | dynamic} -> lower: every linear gets an int8 kernel,
    each kernel matches its eager Q/DQ linear (``check_layers``), the whole model matches, and ``lower`` leaves
    the quantized graph as it was."""
    graph = fxopt.capture(case.model, case.inputs)
    if fuse:  # linear_act with relu/gelu/silu epilogues; linear_act -> linear pairs get fused requantization
        graph = fxopt.Pipeline("fuse")(graph).graph
    linears = count_linears(graph)
    assume(linears > 0)
    reference = graph.run(*case.inputs)
    for scheme in ("static", "dynamic"):
        quantized = quantize(graph, case.inputs, scheme)
        before = snapshot(quantized)
        expected = quantized.run(*case.inputs)
        lowered = lower_quietly(quantized)
        report = lowered.report
        assert report.int8_linears == linears and report.isa == ISA.name
        assert report.float_fallbacks == {} and report.inexact_activation_codes == []
        assert lowered.graph is quantized  # what an artifact stores: the quantized graph itself
        out = lowered(*case.inputs)
        assert_unchanged(quantized, before)
        assert torch.equal(quantized.run(*case.inputs), expected)
        assert out.dtype == expected.dtype and out.shape == expected.shape and torch.isfinite(out).all()
        assert check_layers(quantized, lowered, case.inputs, scheme) == linears
        if scheme == "static":
            if tied_inputs(quantized, lowered, case.inputs) == 0:
                # The same codes in every layer: the same result up to float rounding.
                assert relative_error(expected, out) <= 1e-4
            else:
                # A tie can round either way, and moves what follows by about one quantization step: the
                # lowered model is then another, equally good quantization of the float one.
                assert relative_error(reference, out) <= 2 * relative_error(reference, expected) + 1e-3
        else:
            # On AVX2 the kernel has 127 levels where the eager graph's int8 has 255: compare errors to fp32.
            assert relative_error(reference, out) <= 4 * relative_error(reference, expected) + 0.02, scheme


class Fused(nn.Module):
    """linear -> act -> linear -> act -> linear with widths that make the int8 kernels do real work."""

    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(48, 96), nn.Linear(96, 64), nn.Linear(64, 16)
        self.act = act

    def forward(self, x):
        return self.c(self.act(self.b(self.act(self.a(x)))))


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()], ids=str)
def test_fused_requantization_hands_codes_between_linears(act):
    """After fuse, linear_act -> linear: the first GEMM emits the next one's codes for relu/gelu (oneDNN epilogue);
    silu runs after the GEMM in float, so that pair is left unfused (it used to apply silu to uint8 codes)."""
    x = torch.randn(4, 7, 48, generator=torch.Generator().manual_seed(1))
    graph = fxopt.Pipeline("fuse")(fxopt.capture(Fused(act).eval(), (x,))).graph
    assert count(graph, fxopt_ops().linear_act.default) == 2
    quantized = quantize(graph, (x,), "static")
    lowered = lower_quietly(quantized)
    fused = lowered.report.fused_requantizations
    assert fused == (0 if isinstance(act, nn.SiLU) else 2)
    assert sum(m.takes_codes for _, m, _ in int8_linears(lowered)) == fused
    assert check_layers(quantized, lowered, (x,), "static") == 3
    assert relative_error(quantized.run(x), lowered(x)) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_graphs_keep_their_dtype(dtype):
    """The kernels take and return float32: bf16/fp16 linears and embeddings are left to eager (a float fallback)
    instead of crashing in quantize_per_tensor or returning float32 into a bf16 graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 16), nn.GELU(), nn.LayerNorm(16)).eval().to(dtype)
    ids = torch.randint(0, 30, (2, 5))
    quantized = quantize(fxopt.capture(model, (ids,)), (ids,), "static", "embeddings=true")
    with pytest.warns(UserWarning, match="no int8 kernel"):
        lowered = x86_int8.lower(quantized)
    out, expected = lowered(ids), quantized.run(ids)
    assert out.dtype == expected.dtype == dtype
    assert torch.equal(out, expected)


# ----------------------------------------------------------------- fallbacks
class ActivationMatmul(nn.Module):
    def __init__(self, op):
        super().__init__()
        torch.manual_seed(0)
        self.op = op
        self.q, self.k, self.out = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        matmul = torch.matmul if self.op == "matmul" else torch.bmm
        scores = torch.softmax(matmul(self.q(x), self.k(x).transpose(1, 2)), dim=-1)
        return self.out(matmul(scores, x))


@pytest.mark.parametrize("op", ["matmul", "bmm"])
def test_activation_matmuls_fall_back_to_float32_with_a_warning(op):
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(2))
    graph = fxopt.capture(ActivationMatmul(op).eval(), (x,))
    quantized = quantize(graph, (x,), "static", "activation-matmuls=true")
    with pytest.warns(UserWarning, match=rf"no int8 kernel for aten\.{op}\.default x2 .*float32"):
        lowered = x86_int8.lower(quantized)
    assert lowered.report.int8_linears == 3
    assert {k: len(v) for k, v in lowered.report.float_fallbacks.items()} == {f"aten.{op}.default": 2}
    assert check_layers(quantized, lowered, (x,), "static") == 3
    assert relative_error(quantized.run(x), lowered(x)) <= 1e-4
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="x86-int8")
        x86_int8.lower(quantized, warn=False)


# ======================================================================= ISA
@pytest.mark.parametrize("flags, name", [
    ({"amx_int8", "amx_tile", "amx_bf16", "avx512_vnni", "avx_vnni", "avx2"}, "amx"),
    ({"amx_int8", "avx512_vnni", "avx2"}, "avx512-vnni"),  # AMX int8 without tiles is no AMX
    ({"avx512_vnni", "avx512bw", "avx2"}, "avx512-vnni"),
    ({"avx_vnni", "avx2", "fma"}, "avx-vnni"),
    ({"avx2", "fma", "avx512bw", "avx512f"}, "avx2"),  # AVX-512 without VNNI still saturates
    (set(), "avx2"),
])
def test_isa_from_cpu_flags(flags, name):
    isa = isa_from_flags(frozenset(flags))
    assert isa.name == name
    assert isa.activation_levels == (127 if name == "avx2" else 255)


def test_isa_override_and_unknown_name(monkeypatch):
    for name, isa in ISAS.items():
        monkeypatch.setenv(ENV_OVERRIDE, name)
        assert detect_isa() == isa
    monkeypatch.setenv(ENV_OVERRIDE, "avx9000")
    with pytest.raises(LoweringError, match=rf"unknown ISA 'avx9000' \(from {ENV_OVERRIDE}"):
        detect_isa()
    x = torch.randn(2, 8)
    quantized = quantize(fxopt.capture(nn.Linear(8, 4), (x,)), (x,), "static")
    with pytest.raises(LoweringError, match=ENV_OVERRIDE):
        x86_int8.lower(quantized)
    monkeypatch.delenv(ENV_OVERRIDE)
    assert detect_isa() == isa_from_flags(cpu_flags())  # this CPU's, whatever the suite was started with


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.b(F.gelu(self.a(x)))


def test_full_int8_codes_on_a_cpu_without_vnni_become_7_bit_with_a_warning(monkeypatch):
    """FXOPT_X86_ISA=avx2: int8-calibrated activations are respread over 7-bit codes (lossy, reported); the first
    layer then stays within half a 7-bit step of its float linear (its inputs are inside the calibrated range)."""
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    quantized = quantize(fxopt.capture(TwoLinears().eval(), (x,)), (x,), "static", qdtype="int8")
    monkeypatch.setenv(ENV_OVERRIDE, "avx2")
    with pytest.warns(UserWarning, match=r"avx2\) has no VNNI.*2 linears use 7-bit activation codes"):
        lowered = x86_int8.lower(quantized)
    assert lowered.report.isa == "avx2"
    assert sorted(lowered.report.inexact_activation_codes) == ["linear", "linear_1"]
    values = node_values(quantized, (x,))
    for _, module, name in int8_linears(lowered):
        assert module.input_codes.levels <= 127
    (_, first, _), = [t for t in int8_linears(lowered) if t[2] == "linear"]
    q_node, x_in, _, w_hat, _, _, bias, _ = linear_parts(quantized, values, quantized.node("linear"))
    _, scale, zp, qmin, qmax = q_node.args[:5]
    step = ((qmax - zp) * scale - (qmin - zp) * scale) / 127
    with torch.inference_mode():
        out = first(x_in)
    err = (out.double() - F.linear(x_in.double(), w_hat.double(), bias.double())).abs()
    bound = step / 2 * w_hat.abs().double().sum(1) + FLOAT_SLACK * float_bound_scale(x_in, w_hat, bias) + 1e-6
    assert (err <= bound).all()
    assert relative_error(quantized.run(x), lowered(x)) < 0.05  # 7 bits where the graph has 8


def test_full_int8_codes_on_a_vnni_cpu_are_the_graphs_codes(monkeypatch):
    """With VNNI (or an explicit isa=) int8 codes are taken as they are: shifted by -qmin, 255 levels, no warning.
    (Only the report and codes are checked: running 8-bit codes is exact only on a VNNI machine.)"""
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    quantized = quantize(fxopt.capture(TwoLinears().eval(), (x,)), (x,), "static", qdtype="int8")
    explicit = lower_quietly(quantized, isa=ISAS["avx512-vnni"])
    monkeypatch.setenv(ENV_OVERRIDE, "amx")
    for lowered in (explicit, lower_quietly(quantized)):
        assert lowered.report.inexact_activation_codes == [] and lowered.report.int8_linears == 2
        for _, module, name in int8_linears(lowered):
            q_node = quantized.node(name).args[0].args[0]
            _, scale, zp, qmin, qmax = q_node.args[:5]
            assert module.input_codes == ActivationCodes(float(scale), int(zp) - qmin, 255)
            assert module.isa_levels == 255


def test_weight_only_layers_run_float_gemms_on_weights_dequantized_once():
    """The x86 default for sensitive linears: int8 weights on disk, float activations, no per-call dequantize."""
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(6))
    graph = fxopt.calibrate(fxopt.capture(EmbedMLP().eval(), (ids,)), [(ids,)], progress=False)
    quantized, spec = fxopt.targets.x86_quantize.insert_qdq_for_x86(graph, skip=("linear_1",), calibration=[(ids,)])
    assert "scheme=weight-only" in spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back: the weight-only linear is float by design
        lowered = x86_int8.lower(quantized)
    assert lowered.report.int8_linears == 1 and lowered.report.dequantized_weights == 1
    assert not [n for n in lowered.module.graph.nodes if n.target == QD.dequantize_per_channel.default]
    codes = [t for name, t in quantized.params().items() if t.dtype == torch.int8]
    assert len(codes) == 4  # two tables, two linear weights: all int8 on disk
    assert relative_error(quantized.run(ids), lowered(ids)) < 1e-2


# ================================================================== artifacts
class EmbedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.pos = nn.Embedding(100, 32), nn.Embedding(16, 32)
        self.norm = nn.LayerNorm(32)
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, ids):
        h = self.norm(self.embed(ids) + self.pos(torch.arange(ids.shape[1])))
        return h + self.down(F.gelu(self.up(h)))


FRESH_PROCESS = textwrap.dedent("""
    import pickle, sys
    import torch
    def refuse(*args, **kwargs):
        raise AssertionError("an artifact load unpickled something")
    pickle.load = pickle.loads = torch.load = refuse
    from safetensors.torch import load_file
    from fxopt.backends import x86_int8
    lowered = x86_int8.load(sys.argv[1])
    data = {k: v.clone() for k, v in load_file(sys.argv[2]).items()}
    out = lowered(data["ids"])
    assert torch.equal(out, data["out"]), (out - data["out"]).abs().max()
    assert "tests" not in sys.modules
    print("ok", lowered.target, lowered.report.int8_linears, lowered.report.int8_embeddings)
""")


@pytest.fixture(scope="module")
def lowered_embed_mlp():
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(5))
    graph = fxopt.capture(EmbedMLP().eval(), (ids,))
    quantized = quantize(graph, (ids,), "static", "embeddings=true")
    return lower_quietly(quantized), ids


def test_artifact_round_trip_reproduces_the_lowered_module(lowered_embed_mlp, tmp_path):
    lowered, ids = lowered_embed_mlp
    assert (lowered.report.int8_linears, lowered.report.int8_embeddings) == (2, 2)
    out = lowered(ids)
    path = lowered.save(tmp_path / "model")
    _, manifest = load_artifact(path)
    assert manifest["target"] == x86_int8.TARGET == "x86-int8"
    assert manifest["extra"] == {"isa_at_build": ISA.name, "lowering": lowered.report.as_dict()}
    loaded = x86_int8.load(path)
    assert loaded.report.as_dict() == lowered.report.as_dict()
    assert torch.equal(loaded(ids), out)

    save_file({"ids": ids, "out": out}, str(tmp_path / "expected.safetensors"))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "expected.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok x86-int8 2 2"


def test_an_eager_artifact_is_not_loaded_as_x86_int8(lowered_embed_mlp, tmp_path):
    lowered, _ = lowered_embed_mlp
    save_artifact(lowered.graph, tmp_path / "eager", target="eager")
    with pytest.raises(ArtifactError, match=r"target is 'eager', not 'x86-int8'"):
        x86_int8.load(tmp_path / "eager")


def test_the_lowered_module_checks_its_inputs(lowered_embed_mlp):
    lowered, ids = lowered_embed_mlp
    with pytest.raises(fxopt.InputError):
        lowered(ids.float())


# ================================================================ real MiniLM
MINILM_SENTENCES, MINILM_BATCH, MINILM_LENGTH = 64, 32, 64


def test_minilm_static_int8_on_x86_kernels():
    """all-MiniLM-L6-v2, smooth-quant 0.8, static int8 linears (attention matmuls float) and int8 embedding
    tables, on the x86 kernels: mean-pooled embeddings of held-out sentences stay >= 0.99 cosine to fp32
    (about 0.995 with int7 codes on AVX2), and the lowered graph agrees with the eager Q/DQ graph."""
    from fxopt.demo.data import minilm, real_sentences
    from fxopt.passes.quantize import calibrate_smoothed
    from fxopt.demo.embeddings import sentence_batches
    from fxopt.demo.embeddings import sentence_embeddings as embeddings

    try:
        model, tokenizer = minilm()
    except ImportError as exc:
        pytest.skip(f"needs the real all-MiniLM-L6-v2 weights: {exc}")
    sentences = real_sentences(MINILM_SENTENCES)
    half = MINILM_SENTENCES // 2
    calibration = sentence_batches(tokenizer, sentences[:half], MINILM_BATCH, MINILM_LENGTH)
    evaluation = sentence_batches(tokenizer, sentences[half:], MINILM_BATCH, MINILM_LENGTH)
    graph = fxopt.capture(model, calibration[0])
    reference = embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), evaluation)
    smoothed = calibrate_smoothed(graph, calibration, 0.8, progress=False, qdtype=QDTYPE)
    quantized = fxopt.Pipeline("insert-qdq{scheme=static,activation-matmuls=false,embeddings=true}")(smoothed).graph
    lowered = lower_quietly(quantized)
    report = lowered.report
    assert report.int8_linears == count(graph, aten.linear.default) == 37
    assert report.int8_embeddings == count(graph, aten.embedding.default) == 3  # word, position, token type
    assert report.float_fallbacks == {}
    assert quantized.size_bytes() < 25e6 and graph.size_bytes() > 3.5 * quantized.size_bytes()
    int8 = embeddings(lowered, evaluation)
    cosine = F.cosine_similarity(reference, int8).mean().item()
    assert cosine >= 0.99, f"x86-int8 MiniLM: cosine {cosine:.4f} to fp32"
    # Against the eager Q/DQ graph: the same fidelity. Not the same bits: the kernel's quantize rounds
    # x / s + zero_point in float32, the graph rounds x / s, then adds; a few codes in a million differ at
    # near-ties and the flips cascade through 6 layers (0.9994 mean cosine here).
    eager = embeddings(quantized, evaluation)
    assert F.cosine_similarity(eager, int8).mean().item() >= 0.998
    assert abs(cosine - F.cosine_similarity(reference, eager).mean().item()) <= 0.002


class PostNormBlock(nn.Module):
    """BERT's post-LN shape: the LayerNorm output feeds a linear and the residual, so smooth-quant inserts a mul."""

    def __init__(self, width=32):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        h = self.norm(x)
        return h + self.down(F.relu(self.up(h)))


def test_smooth_quant_multiplier_is_applied_while_quantizing():
    from fxopt.passes.quantize import calibrate_smoothed
    gen = torch.Generator().manual_seed(0)
    model = PostNormBlock().eval()
    batches = [(torch.randn(4, 16, 32, generator=gen) * torch.linspace(0.1, 8, 32),) for _ in range(3)]
    qdtype = "int8" if detect_isa().exact_8bit else "int7"
    smoothed = calibrate_smoothed(fxopt.capture(model, batches[0]), batches, 0.8, progress=False, qdtype=qdtype)
    quantized = fxopt.Pipeline("insert-qdq{scheme=static}")(smoothed).graph
    assert count(quantized, torch.ops.aten.mul.Tensor) >= 1
    lowered = x86_int8.lower(quantized)
    assert lowered.report.fused_multipliers >= 1
    multiplies = [n for n in lowered.module.graph.nodes if n.target == torch.ops.aten.mul.Tensor]
    assert not multiplies  # applied while quantizing, no separate multiply left
    expected, actual = quantized.run(*batches[0]), lowered(*batches[0])
    assert relative_error(actual, expected) < 1e-3



class SpectralMixer(nn.Module):
    """linear -> |rfft| (no int8 kernel, complex in between) -> linear, residual + LayerNorm, GELU FFN."""

    def __init__(self, width=32):
        super().__init__()
        self.inp, self.mix = nn.Linear(width, width), nn.Linear(width // 2 + 1, width)
        self.norm = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x):
        x = self.norm(x + self.mix(torch.fft.rfft(self.inp(x), dim=-1).abs()))
        return x + self.ffn(x)


FRESH_OPTIMIZED = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file
    import fxopt
    data = load_file(sys.argv[2])
    out = fxopt.load(sys.argv[1])(data["x"])
    assert torch.equal(out, data["out"]), (out - data["out"]).abs().max()
    assert "tests" not in sys.modules
    print("ok")
""")


def test_an_op_without_int8_kernel_runs_in_pytorch_and_the_artifact_round_trips(tmp_path):
    torch.manual_seed(0)
    model = SpectralMixer().eval()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(2, 8, 32, generator=gen),) for _ in range(4)]
    x = torch.randn(2, 8, 32, generator=gen)
    optimized = fxopt.optimize(model, (x,), target="x86-int8", calibration_data=batches, progress=False)
    fft = [n for n in optimized.graph.call_nodes() if "fft" in str(n.target)]
    assert len(fft) == 1 and optimized.report()["lowering"]["int8_linears"] >= 3  # the linears around it are int8
    out = optimized(x)
    assert relative_error(model(x), out) < 5e-2  # int8 error; the FFT itself runs in float
    save_file({"x": x, "out": out}, str(tmp_path / "expected.safetensors"))
    optimized.save(tmp_path / "model")
    done = subprocess.run([sys.executable, "-c", FRESH_OPTIMIZED, str(tmp_path / "model"),
                           str(tmp_path / "expected.safetensors")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
