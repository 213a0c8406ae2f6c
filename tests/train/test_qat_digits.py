"""Real data: a small CNN trained here on sklearn's digits; static int8 (PTQ) and int8 after QAT against fp32.

The 1,797 8x8 images are split 1,257 train / 540 test (stratified, seed 0); one test image is 0.185 points.
The CNN (conv 1->8, conv 8->16, max-pool, linear 256->10) trains for 10 epochs of Adam (seed 0).
Static int8 is calibrated with min-max on the training images. QAT fine-tunes the Q/DQ graph for 100
steps of Adam at lr 1e-4 over shuffled training batches of 64.

Measured here (torch 2.13 CPU):
    fp32 97.96%, static int8 97.96% (loses 0.00 points), int8 after QAT 98.52% (gains 0.56 points);
    training-set cross-entropy of the int8 graph 0.0057 after PTQ, 0.0039 after QAT;
    mean loss of the first 10 QAT steps 0.0061, of the last 10 0.0036.
The issue's bars are asserted: fp32 >= 95%, PTQ loses <= 0.5 points, QAT loses no more than PTQ.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from tests.digits_data import BATCH, SEED, accuracy, load_split, shuffled_batches, train
from tests.harness import count

QAT_STEPS, QAT_LR = 100, 1e-4
QD = torch.ops.quantized_decomposed


def count_int8_ops(graph):
    """(int8 weights, activation Q/DQ pairs) of a graph."""
    return count(graph, QD.dequantize_per_channel.default), count(graph, QD.dequantize_per_tensor.default)


def train_cnn(images, labels) -> nn.Module:
    torch.manual_seed(SEED)
    return train(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                               nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 4 * 4, 10)), images, labels)


@pytest.fixture(scope="module")
def digits():
    return load_split()


@pytest.fixture(scope="module")
def fp32(digits):
    model = train_cnn(digits["x_train"], digits["y_train"])
    return model, accuracy(model, digits["x_test"], digits["y_test"])


@pytest.fixture(scope="module")
def ptq(digits, fp32):
    """The captured CNN (dynamic batch), min-max calibrated on the training images, static int8."""
    x = digits["x_train"]
    graph = fxopt.capture(fp32[0], (x[:BATCH],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    calibrated = fxopt.calibrate(graph, [(x[i:i + 256],) for i in range(0, len(x), 256)], progress=False)
    return fxopt.Pipeline("insert-qdq{scheme=static}", debug=True)(calibrated).graph


@pytest.fixture(scope="module")
def qat(digits, ptq):
    """QAT'd graph, its loss history, and a snapshot of the PTQ graph taken before QAT ran."""
    snapshot = {k: t.clone() for k, t in ptq.params().items()}, ptq.format()
    data = shuffled_batches(digits["x_train"], digits["y_train"], torch.Generator().manual_seed(SEED + 1))
    history = []
    tuned = fxopt.train.qat(ptq, data, F.cross_entropy, steps=QAT_STEPS, lr=QAT_LR, progress=False,
                            history=history)
    return tuned, history, snapshot


def test_fp32_cnn_reaches_95_percent(fp32):
    assert fp32[1] >= 95.0


def test_static_int8_loses_at_most_half_a_point(digits, fp32, ptq):
    assert count_int8_ops(ptq) == (3, 3)
    assert accuracy(ptq, digits["x_test"], digits["y_test"]) >= fp32[1] - 0.5


def test_int8_after_qat_loses_no_more_than_ptq(digits, ptq, qat):
    tuned = qat[0]
    assert accuracy(tuned, digits["x_test"], digits["y_test"]) >= accuracy(ptq, digits["x_test"], digits["y_test"])


def test_qat_lowers_the_int8_training_loss(digits, ptq, qat):
    tuned, history, _ = qat
    x, y = digits["x_train"], digits["y_train"]
    assert len(history) == QAT_STEPS
    assert sum(history[-10:]) <= sum(history[:10])
    assert F.cross_entropy(tuned(x), y) < F.cross_entropy(ptq(x), y)


def test_qat_graph_stores_int8_weights_like_insert_qdq(digits, ptq, qat):
    tuned = qat[0]
    tuned.verify()
    assert tuned.format() == ptq.format()
    assert count_int8_ops(tuned) == (3, 3)
    assert {k: (t.dtype, t.shape) for k, t in tuned.params().items()} == \
        {k: (t.dtype, t.shape) for k, t in ptq.params().items()}
    assert sum(t.dtype == torch.int8 for t in tuned.params().values()) == 3
    assert tuned.size_bytes() == ptq.size_bytes()
    x = digits["x_test"][:BATCH]
    assert torch.equal(torch.export.export(tuned.module, (x,), strict=False).module()(x), tuned(x))


def test_qat_does_not_mutate_its_input(ptq, qat):
    params, text = qat[2]
    assert ptq.format() == text
    assert params.keys() == ptq.params().keys()
    assert all(torch.equal(params[k], t) for k, t in ptq.params().items())
