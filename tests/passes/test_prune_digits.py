"""Real data: a CNN trained here on sklearn's digits, half its conv channels pruned, then distilled from itself.

The 1,797 8x8 images are split 1,257 train / 540 test (stratified, seed 0); one test image is 0.185 points.
The CNN (conv 1->32, BN, conv 32->64, BN, max-pool, flatten, linear 1024->10) trains for 10 epochs of Adam.
It is captured with a dynamic batch. prune-channels{ratio=0.5} keeps 16 and 32 channels (l2 magnitude; the
linear loses the flattened columns of the removed channels, 16 per channel), then fxopt.train.distill
trains the pruned graph against the original's logits (KL at temperature 2) on the training images.

The issue's bar is asserted: after pruning 50% of the channels and distilling, accuracy drops <= 1 point.
Measured here (torch 2.13 CPU): original 98.52%, pruned 81.11%, distilled 98.33% (200 steps, lr 2e-3, T 2).
A narrower CNN (16/32 channels) scored 99.26% -> 98.33%, 0.93 points: too close to the bar to assert
across torch versions, so the test uses the wider one.
"""
import pytest
import torch
import torch.nn as nn

import fxopt
from tests.digits_data import BATCH, SEED, accuracy, load_split, shuffled_batches, train

DISTILL_STEPS, DISTILL_LR = 200, 2e-3


def train_cnn(images, labels) -> nn.Module:
    torch.manual_seed(SEED)
    return train(nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                               nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 10)), images, labels)


@pytest.fixture(scope="module")
def digits():
    return load_split()


@pytest.fixture(scope="module")
def pruned_and_distilled(digits):
    model = train_cnn(digits["x_train"], digits["y_train"])
    x = digits["x_train"]
    graph = fxopt.capture(model, (x[:BATCH],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    result = fxopt.Pipeline("prune-channels{ratio=0.5}", debug=True)(graph)
    generator = torch.Generator().manual_seed(SEED + 1)
    data = [(images,) for images, _ in shuffled_batches(x, digits["y_train"], generator)]
    history = []
    distilled = fxopt.train.distill(result.graph, graph, data, steps=DISTILL_STEPS, lr=DISTILL_LR,
                                    losses={"kl": {"temperature": 2.0}}, progress=False, history=history)
    return graph, result, distilled, history


def test_half_the_channels_go_and_the_linear_loses_their_flattened_columns(pruned_and_distilled):
    graph, result, _, _ = pruned_and_distilled
    stats = result.stats["0:prune-channels"]
    assert stats["pruned"] == {"channels:0": [16, 32], "channels:3": [32, 64]}
    params = result.graph.params()
    assert params["0.weight"].shape == (16, 1, 3, 3) and params["3.weight"].shape == (32, 16, 3, 3)
    assert params["8.weight"].shape == (10, 32 * 4 * 4)
    kept = stats["kept"]["channels:3"]
    columns = torch.tensor([c * 16 + i for c in kept for i in range(16)])
    assert torch.equal(params["8.weight"], graph.params()["8.weight"][:, columns])


def test_pruned_and_distilled_cnn_loses_at_most_one_point(digits, pruned_and_distilled):
    graph, result, distilled, history = pruned_and_distilled
    x, y = digits["x_test"], digits["y_test"]
    original, pruned, after = accuracy(graph, x, y), accuracy(result.graph, x, y), accuracy(distilled, x, y)
    print(f"\ndigits: original {original:.2f}%, pruned 50% {pruned:.2f}%, distilled {after:.2f}%; "
          f"distill loss {sum(history[:10]) / 10:.4f} -> {sum(history[-10:]) / 10:.4f}")
    assert original >= 95.0
    assert after >= original - 1.0
    assert sum(history[-10:]) < sum(history[:10])
    assert distilled.param_count() == result.graph.param_count() < graph.param_count() // 2
