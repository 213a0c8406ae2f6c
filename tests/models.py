"""Model builders shared by the tests: tiny HF transformers, the real all-MiniLM-L6-v2, a small CNN.

Every builder is deterministic (fixed seed) and offline. The tiny HF models
use eager attention, so the exported graph shows the attention math as plain
ATen ops rather than one fused ``scaled_dot_product_attention`` call.

    model, inputs = tiny_bert()
    graph = fxopt.capture(model, inputs)
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.nn as nn

from fxopt.demo.data import mean_pool, minilm, minilm_dir, minilm_inputs, real_sentences  # noqa: F401  (re-exported)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEED = 0


# ------------------------------------------------------------- tiny HF models
def _hf_model(model_cls, config):
    torch.manual_seed(SEED)
    model = model_cls(config)
    return model.eval()


def tiny_bert() -> Tuple[nn.Module, Tuple[torch.Tensor, torch.Tensor]]:
    """A 2-layer BertModel (hidden 32, 4 heads) and ``(input_ids, attention_mask)`` with padding."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, type_vocab_size=2, attn_implementation="eager", return_dict=True,
        use_cache=False,
    )
    model = _hf_model(BertModel, config)
    gen = torch.Generator().manual_seed(SEED + 1)
    input_ids = torch.randint(1, config.vocab_size, (2, 12), generator=gen)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0  # the second sequence is padded
    input_ids[1, 8:] = 0
    return model, (input_ids, attention_mask)


def tiny_gpt2() -> Tuple[nn.Module, Tuple[torch.Tensor]]:
    """A 2-layer GPT2Model (hidden 32, 4 heads) and ``(input_ids,)``."""
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(
        vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4, attn_implementation="eager",
        return_dict=True, use_cache=False,
    )
    model = _hf_model(GPT2Model, config)
    gen = torch.Generator().manual_seed(SEED + 2)
    input_ids = torch.randint(0, config.vocab_size, (2, 10), generator=gen)
    return model, (input_ids,)


def tiny_vit() -> Tuple[nn.Module, Tuple[torch.Tensor]]:
    """A 2-layer ViTModel on 32x32 images with 8x8 patches (hidden 32, 4 heads) and ``(pixel_values,)``."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, attn_implementation="eager", return_dict=True,
    )
    model = _hf_model(ViTModel, config)
    gen = torch.Generator().manual_seed(SEED + 3)
    pixel_values = torch.randn(2, 3, 32, 32, generator=gen)
    return model, (pixel_values,)


# --------------------------------------------------------------------- CNN
class _Block(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (a 1x1 conv + BN when the shape changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ConvBnResNet(nn.Module):
    """A tiny ResNet: stem, a plain block, a downsampling block, a depthwise-separable stage, pool, Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=True), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = _Block(16, 16)
        self.block2 = _Block(16, 32, stride=2)
        self.depthwise = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.depthwise(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def conv_bn_resnet() -> Tuple[nn.Module, Tuple[torch.Tensor]]:
    """A :class:`ConvBnResNet` whose BatchNorm running stats are not the defaults, and ``(x,)`` of shape 2x3x16x16."""
    torch.manual_seed(SEED)
    model = ConvBnResNet()
    model.train()
    gen = torch.Generator().manual_seed(SEED + 4)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16, generator=gen) * 2.0 + 0.5)
    model.eval()
    x = torch.randn(2, 3, 16, 16, generator=gen)
    return model, (x,)
