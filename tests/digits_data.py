"""sklearn's digits, the real-data fixture of the training tests: the split, shuffled batches, a trained CNN.

The 1,797 8x8 images are split 1,257 train / 540 test (stratified, seed 0); one test image is 0.185 points.
"""
from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

SEED, BATCH, EPOCHS = 0, 64, 10


def load_split() -> Dict[str, torch.Tensor]:
    """``x_train``, ``y_train``, ``x_test``, ``y_test``: images [N, 1, 8, 8] in [0, 1], labels int64."""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    images, labels = datasets.load_digits(return_X_y=True)
    images = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        images, torch.tensor(labels), test_size=540, random_state=SEED, stratify=labels)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def accuracy(fn, images, labels) -> float:
    """Top-1 accuracy of ``fn`` (a module or a graph) in percent."""
    with torch.no_grad():
        return (fn(images).argmax(dim=1) == labels).float().mean().item() * 100


def shuffled_batches(images, labels, generator):
    order = torch.randperm(len(images), generator=generator)
    return [(images[order[i:i + BATCH]], labels[order[i:i + BATCH]]) for i in range(0, len(images), BATCH)]


def train(model: nn.Module, images, labels) -> nn.Module:
    """``model`` after EPOCHS epochs of Adam (lr 1e-2, seed 0) on cross-entropy, in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for x, y in shuffled_batches(images, labels, generator):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()
