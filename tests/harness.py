"""The equivalence harness and the hypothesis strategies that generate models.

``assert_equivalent(reference, transformed, inputs, tol)`` runs both callables
on the same inputs and compares every tensor leaf of the outputs by relative
error, ``||a - b|| / ||a||``, against a per-dtype tolerance.

``model_cases()`` draws random *models* (MLPs, conv/BN/ReLU nets, residual
blocks, multi-head attention blocks, LayerNorm; random widths, depths and
dtypes), with redundant ops sprinkled in so the cleanup passes have work, plus
matching inputs.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

#: Relative error allowed between a graph and its transformed version, by dtype.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    a, b = reference.detach().double(), other.detach().double()
    denom = a.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def count(graph, target) -> int:
    """How many nodes of the graph call ``target``."""
    return sum(1 for _ in graph.call_nodes(target))


def outputs_of(fn: Callable, inputs: Sequence) -> List[torch.Tensor]:
    with torch.no_grad():
        out = fn(*inputs)
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_equivalent(reference: Callable, transformed: Callable, inputs: Sequence, tol: Optional[float] = None):
    """Assert both callables give the same tensors on ``inputs`` (within ``tol`` or the dtype's tolerance)."""
    expected, actual = outputs_of(reference, inputs), outputs_of(transformed, inputs)
    assert len(expected) == len(actual), f"{len(actual)} outputs, expected {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, actual)):
        assert a.shape == b.shape, f"output {i}: shape {tuple(b.shape)} != {tuple(a.shape)}"
        assert a.dtype == b.dtype, f"output {i}: dtype {b.dtype} != {a.dtype}"
        if not a.is_floating_point():
            assert torch.equal(a, b), f"output {i}: integer outputs differ"
            continue
        assert torch.isfinite(b).all() == torch.isfinite(a).all(), f"output {i}: non-finite values differ"
        limit = tol if tol is not None else TOLERANCE[a.dtype]
        err = relative_error(a, b)
        assert err <= limit, f"output {i}: relative error {err:.3g} > {limit:.3g}"


def tensor_digest(t: torch.Tensor) -> Tuple[str, Tuple[int, ...], str]:
    """dtype, shape and sha256 of a tensor's bytes: equal only for byte-identical tensors."""
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype), tuple(t.shape), hashlib.sha256(raw).hexdigest()


def fingerprint(module: nn.Module) -> Dict[str, Tuple[str, Tuple[int, ...], str]]:
    """dtype, shape and sha256 of the bytes of every tensor in the state_dict."""
    return {name: tensor_digest(t) for name, t in module.state_dict(keep_vars=False).items()}


# ------------------------------------------------------------------ models
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
REDUNDANCIES = ("clone", "same-view", "identity-permute", "full-slice", "dropout", "twin-exprs", "weight-expr",
                "same-cast", "none")


class Redundant(nn.Module):
    """An op (or few) that computes nothing new: what the cleanup passes should remove."""

    def __init__(self, kind: str, width: int):
        super().__init__()
        self.kind = kind
        self.drop = nn.Dropout(0.3)
        self.gain = nn.Parameter(torch.randn(width) * 0.1)

    def forward(self, x):
        k = self.kind
        if k == "clone":
            return x.clone()
        if k == "same-view":
            return x.view(x.shape).reshape(x.shape)
        if k == "identity-permute":
            return x.permute(*range(x.dim()))
        if k == "full-slice":
            return x[:, :]
        if k == "dropout":
            return self.drop(x)
        if k == "twin-exprs":
            return torch.relu(x) + torch.relu(x) - torch.relu(x)
        if k == "weight-expr":
            return x * torch.sigmoid(self.gain * 2.0 + 1.0).to(x.dtype)
        if k == "same-cast":
            return x.to(x.dtype)
        return x


class MLPBlock(nn.Module):
    def __init__(self, w_in, w_out, act, bias, norm):
        super().__init__()
        self.linear = nn.Linear(w_in, w_out, bias=bias)
        self.act = ACTIVATIONS[act]()
        self.norm = nn.LayerNorm(w_out) if norm else nn.Identity()

    def forward(self, x):
        return self.norm(self.act(self.linear(x)))


class ResidualBlock(nn.Module):
    def __init__(self, width, inner, act):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, inner), nn.Linear(inner, width)
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        return x + self.down(self.act(self.up(self.norm(x))))


class AttentionBlock(nn.Module):
    """Multi-head self-attention written out: softmax(QK^T/sqrt(d) + mask) V."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        b, s, w = x.shape
        d = w // self.heads
        split = lambda t: t.view(b, s, self.heads, d).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if self.causal:
            mask = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
        ctx = torch.softmax(scores, dim=-1) @ v
        return self.norm(x + self.out(ctx.transpose(1, 2).reshape(b, s, w)))


class ConvBlock(nn.Module):
    def __init__(self, c_in, c_out, kernel, depthwise, bn, act, residual):
        super().__init__()
        groups = c_in if depthwise and c_in == c_out else 1
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=not bn)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.act = ACTIVATIONS[act]()
        self.residual = residual and c_in == c_out

    def forward(self, x):
        y = self.act(self.bn(self.conv(x)))
        return x + y if self.residual else y


class Sequence_(nn.Module):
    def __init__(self, blocks, head=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(x.mean(dim=(2, 3)))
        return x


@dataclass
class ModelCase:
    model: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    description: str
    dtype: torch.dtype = torch.float32
    counts: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ModelCase({self.description})"


def _finish(model: nn.Module, inputs, description, dtype, counts) -> ModelCase:
    model = model.to(dtype).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return ModelCase(model, inputs, description, dtype, counts)


@st.composite
def token_model_cases(draw, dtypes=(torch.float32, torch.float64, torch.bfloat16)) -> ModelCase:
    """MLP / residual / attention / LayerNorm stacks on [batch, seq, width] inputs."""
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from(dtypes))
    heads = draw(st.sampled_from([1, 2, 4]))
    # now and then 32: a width the GPU low-precision passes take (fp8: multiples of 16; int4: groups of 32)
    width = draw(st.sampled_from([32] + [heads * n for n in range(1, 7)]))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    kinds = draw(st.lists(st.sampled_from(["mlp", "residual", "attention", "redundant"]), min_size=1, max_size=5))
    torch.manual_seed(seed)
    blocks, parts, counts, w = [], [], {"linear-relu": 0}, width
    for kind in kinds:
        if kind == "mlp":
            act, norm, bias = draw(st.sampled_from(sorted(ACTIVATIONS))), draw(st.booleans()), draw(st.booleans())
            out = draw(st.sampled_from([32] + list(range(1, 13))))
            blocks.append(MLPBlock(w, out, act, bias, norm))
            counts["linear-relu"] += act == "relu"
            parts.append(f"mlp({w}->{out},{act},bias={bias},ln={norm})")
            w = out
        elif kind == "redundant":
            red = draw(st.sampled_from(REDUNDANCIES))
            blocks.append(Redundant(red, w))
            parts.append(f"redundant({red})")
        elif w != width:  # residual/attention keep the width: project back first
            blocks.append(MLPBlock(w, width, "tanh", True, False))
            parts.append(f"mlp({w}->{width},tanh)")
            w = width
        if kind == "residual":
            act = draw(st.sampled_from(sorted(ACTIVATIONS)))
            blocks.append(ResidualBlock(width, draw(st.integers(1, 16)), act))
            counts["linear-relu"] += act == "relu"
            parts.append(f"residual({width},{act})")
        elif kind == "attention":
            causal = draw(st.booleans())
            blocks.append(AttentionBlock(width, heads, causal))
            parts.append(f"attention({width},h={heads},causal={causal})")
    x = torch.randn(batch, seq, width)
    desc = f"seed={seed} {dtype} x=[{batch},{seq},{width}] " + " ".join(parts)
    return _finish(Sequence_(blocks), (x,), desc, dtype, counts)


@st.composite
def conv_model_cases(draw, dtypes=(torch.float32, torch.float64)) -> ModelCase:
    """Conv / BatchNorm / activation stacks with residual, grouped and depthwise convs, pooled to a head."""
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from(dtypes))
    channels = draw(st.integers(1, 8))
    batch, size = draw(st.integers(1, 3)), draw(st.integers(3, 8))
    depth = draw(st.integers(1, 4))
    torch.manual_seed(seed)
    blocks, parts, c = [], [], channels
    for _ in range(depth):
        out = draw(st.sampled_from([c, draw(st.integers(1, 8))]))
        kernel, act = draw(st.sampled_from([1, 3])), draw(st.sampled_from(sorted(ACTIVATIONS)))
        dw, bn, res = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
        blocks.append(ConvBlock(c, out, kernel, dw, bn, act, res))
        parts.append(f"conv({c}->{out},k={kernel},dw={dw},bn={bn},{act},res={res})")
        if draw(st.booleans()):
            red = draw(st.sampled_from([r for r in REDUNDANCIES if r not in ("weight-expr",)]))
            blocks.append(Redundant(red, out))
            parts.append(f"redundant({red})")
        c = out
    head = nn.Linear(c, draw(st.integers(1, 5)))
    x = torch.randn(batch, channels, size, size)
    desc = f"seed={seed} {dtype} x=[{batch},{channels},{size},{size}] " + " ".join(parts)
    return _finish(Sequence_(blocks, head), (x,), desc, dtype, {})


def examples(n: int) -> settings:
    """At least ``n`` examples, or the active profile's count if that is larger (the slow profile)."""
    return settings(max_examples=max(n, settings.default.max_examples))


def model_cases() -> st.SearchStrategy[ModelCase]:
    return st.one_of(token_model_cases(), conv_model_cases())
