"""Hypothesis strategies for the fusion passes: random models that contain each pass's pattern.

Every strategy draws a small model (random widths, depths, variants and
dtypes) plus inputs, as a ``ModelCase`` whose ``counts`` say how many times
the pass must fire. Some blocks are drawn in a form that must *not* fuse (an
output with another user, BatchNorm over the wrong dim, a layout a view
cannot take), and are left out of the counts.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import strategies as st

from tests.harness import ACTIVATIONS, ModelCase, count  # noqa: F401  (count is re-exported to the fusion tests)

FUSION_DTYPES = (torch.float32, torch.float16)


def finish(model: nn.Module, inputs, description: str, dtype, counts) -> ModelCase:
    """Cast, switch to eval mode, and give every BatchNorm non-trivial running statistics."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    return ModelCase(model, inputs, description, dtype, counts)


class Chain(nn.Module):
    """Blocks applied in turn (each gets the model's other inputs too); their extra outputs are returned."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x, *rest):
        extras = []
        for block in self.blocks:
            x, extra = block(x, *rest)
            extras += extra
        return (x, *extras)


# ================================================================ conv + BN
class ConvBN(nn.Module):
    def __init__(self, dims, c_in, c_out, kernel, stride, groups, bias, affine, act, tap):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        self.conv = conv(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=bias)
        self.bn = norm(c_out, affine=affine)
        self.act = ACTIVATIONS[act]()
        self.tap = tap  # the conv output is also returned: the fold must not fire

    def forward(self, x):
        y = self.conv(x)
        return self.act(self.bn(y)), ([y] if self.tap else [])


@st.composite
def conv_bn_cases(draw, dtypes=FUSION_DTYPES) -> ModelCase:
    """Conv1d or Conv2d (plain, grouped, depthwise; with or without bias) + BatchNorm + activation."""
    seed, dtype, dims = draw(st.integers(0, 2**16)), draw(st.sampled_from(dtypes)), draw(st.sampled_from([1, 2]))
    torch.manual_seed(seed)
    channels = c = draw(st.sampled_from([1, 2, 4, 6]))
    blocks, parts, folds = [], [], 0
    for _ in range(draw(st.integers(1, 3))):
        grouping = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
        out = c if grouping == "depthwise" else draw(st.sampled_from([2, 4, 6]))
        groups = {"plain": 1, "depthwise": c, "grouped": math.gcd(c, out)}[grouping]
        kernel, stride = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 2]))
        bias, affine, tap = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
        act = draw(st.sampled_from(sorted(ACTIVATIONS)))
        blocks.append(ConvBN(dims, c, out, kernel, stride, groups, bias, affine, act, tap))
        parts.append(f"conv{dims}d({c}->{out},k={kernel},s={stride},g={groups},bias={bias},affine={affine},{act}"
                     f"{',tap' if tap else ''})")
        folds += not tap
        c = out
    size = draw(st.integers(4, 9))
    x = torch.randn(draw(st.integers(1, 3)), channels, *([size] * dims))
    return finish(Chain(blocks), (x,), f"seed={seed} {dtype} " + " ".join(parts), dtype, {"conv-bn": folds})


# ============================================================== linear + BN
class LinearBN(nn.Module):
    def __init__(self, w_in, w_out, bias, affine, act, variant):
        super().__init__()
        self.linear = nn.Linear(w_in, w_out, bias=bias)
        self.variant = variant
        self.bn = nn.BatchNorm1d(w_out, affine=affine)
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        y = self.linear(x)
        if self.variant == "tap":  # the Linear output has another user
            return self.act(self.bn(y)), [y * 2.0]
        return self.act(self.bn(y)), []


class SequenceBN(nn.Module):
    """Linear over the last dim of [N, C, L], then BatchNorm1d over C: C is not the Linear's output."""

    def __init__(self, channels, width):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x):
        return self.bn(self.linear(x)), []


@st.composite
def linear_bn_cases(draw, dtypes=FUSION_DTYPES) -> ModelCase:
    """MLPs on [N, F] with Linear + BatchNorm1d (+ activation), some blocked, some on [N, C, L]."""
    seed, dtype = draw(st.integers(0, 2**16)), draw(st.sampled_from(dtypes))
    torch.manual_seed(seed)
    width = w = draw(st.integers(1, 8))
    blocks, parts, folds = [], [], 0
    for _ in range(draw(st.integers(1, 3))):
        out, bias, affine = draw(st.integers(1, 8)), draw(st.booleans()), draw(st.booleans())
        act, variant = draw(st.sampled_from(sorted(ACTIVATIONS))), draw(st.sampled_from(["fold", "fold", "tap"]))
        blocks.append(LinearBN(w, out, bias, affine, act, variant))
        parts.append(f"linear-bn({w}->{out},bias={bias},affine={affine},{act},{variant})")
        folds += variant == "fold"
        w = out
    inputs = (torch.randn(draw(st.integers(2, 5)), width),)
    if draw(st.booleans()):  # a [N, C, L] model where the BatchNorm must stay
        channels = draw(st.integers(1, 4))
        blocks, parts, folds = [SequenceBN(channels, width)], [f"sequence-bn(C={channels},L={width})"], 0
        inputs = (torch.randn(2, channels, width),)
    desc = f"seed={seed} {dtype} " + " ".join(parts)
    return finish(Chain(blocks), inputs, desc, dtype, {"linear-bn": folds})


# ================================================================= siblings
class Siblings(nn.Module):
    """k projections of the same input, consumed per head (view + transpose) or flattened."""

    def __init__(self, kind, width, outs, bias, consumer):
        super().__init__()
        self.kind, self.consumer = kind, consumer
        if kind == "linear":
            self.projections = nn.ModuleList(nn.Linear(width, o, bias=bias) for o in outs)
        elif kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.projections = nn.ModuleList(Conv1D(o, width) for o in outs)
        else:
            self.weights = nn.ParameterList(nn.Parameter(torch.randn(width, o) / math.sqrt(width)) for o in outs)

    def forward(self, x):
        if self.kind == "matmul":
            ys = [torch.matmul(x, w) for w in self.weights]
        else:
            ys = [p(x) for p in self.projections]
        if self.consumer == "heads":  # BERT: split the last dim into heads, then transpose
            ys = [y.view(*y.shape[:-1], 2, y.shape[-1] // 2).transpose(-2, -3) for y in ys]
            return sum(torch.tanh(y).sum(-1) for y in ys), []
        if self.consumer == "flatten":  # needs each output contiguous: merging must step back
            return sum(y.view(-1).sum() for y in ys), []
        return torch.cat([torch.tanh(y) for y in ys], -1), []


@st.composite
def sibling_cases(draw, dtypes=FUSION_DTYPES) -> ModelCase:
    """Linear / GPT-2 Conv1D (addmm) / matmul-by-weight siblings on one input, 2-4 of them."""
    seed, dtype = draw(st.integers(0, 2**16)), draw(st.sampled_from(dtypes))
    torch.manual_seed(seed)
    kind = draw(st.sampled_from(["linear", "conv1d", "matmul"]))
    width, k = draw(st.integers(1, 8)), draw(st.integers(2, 4))
    consumer = draw(st.sampled_from(["heads", "cat", "flatten"]))
    same = draw(st.booleans()) or consumer == "heads"
    outs = [2 * draw(st.integers(1, 4)) for _ in range(1 if same else k)] * (k if same else 1)
    bias = draw(st.booleans())
    rows = draw(st.integers(2, 4))
    x = torch.randn(draw(st.integers(1, 3)), rows, width)
    merges = consumer != "flatten"
    desc = f"seed={seed} {dtype} {kind} x{k} ({width}->{outs}, bias={bias}) -> {consumer}"
    counts = {"groups": int(merges), "merged": k if merges else 0}
    block = Siblings(kind, width, outs, bias, consumer)
    return finish(Chain([block]), (x,), desc, dtype, counts)


# ================================================================= epilogue
class NewGELU(nn.Module):
    """GPT-2's gelu_new, written out as HF writes it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class ErfGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


EPILOGUE_ACTIVATIONS = {**ACTIVATIONS, "gelu-new": NewGELU, "gelu-erf": ErfGELU}
FUSED_ACTIVATIONS = {"relu", "gelu", "gelu-tanh", "silu", "gelu-new", "gelu-erf"}


class Epilogue(nn.Module):
    def __init__(self, primary, width, out, bias, act, tap):
        super().__init__()
        self.primary, self.tap = primary, tap
        if primary == "linear":
            self.op = nn.Linear(width, out, bias=bias)
        elif primary == "linear+bias":  # a bias-free Linear and a separate bias add
            self.op = nn.Linear(width, out, bias=False)
            self.bias = nn.Parameter(torch.randn(out) * 0.1)
        elif primary == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.op = Conv1D(out, width)
        else:
            self.op = nn.Conv2d(width, out, 3, padding=1, bias=bias)
        self.act = EPILOGUE_ACTIVATIONS[act]()

    def forward(self, x):
        y = self.op(x)
        if self.primary == "linear+bias":
            y = y + self.bias
        return self.act(y), ([y] if self.tap else [])


@st.composite
def epilogue_cases(draw, dtypes=FUSION_DTYPES) -> ModelCase:
    """Linear / Linear + bias add / GPT-2 Conv1D / Conv2d followed by an activation (some blocked)."""
    seed, dtype = draw(st.integers(0, 2**16)), draw(st.sampled_from(dtypes))
    torch.manual_seed(seed)
    conv = draw(st.booleans())
    width = w = draw(st.integers(1, 6))
    blocks, parts, fused = [], [], 0
    for _ in range(draw(st.integers(1, 3))):
        primary = "conv2d" if conv else draw(st.sampled_from(["linear", "linear+bias", "conv1d"]))
        out, bias, tap = draw(st.integers(1, 6)), draw(st.booleans()), draw(st.sampled_from([False, False, True]))
        act = draw(st.sampled_from(sorted(EPILOGUE_ACTIVATIONS)))
        blocks.append(Epilogue(primary, w, out, bias, act, tap))
        parts.append(f"{primary}({w}->{out},bias={bias})+{act}{'+tap' if tap else ''}")
        fused += act in FUSED_ACTIVATIONS and not tap
        w = out
    batch = draw(st.integers(1, 2))
    shape = (batch, width, 5, 5) if conv else (batch, draw(st.integers(1, 4)), width)
    desc = f"seed={seed} {dtype} " + " ".join(parts)
    return finish(Chain(blocks), (torch.randn(*shape),), desc, dtype, {"fused": fused})


# ================================================================ attention
class Attention(nn.Module):
    """softmax(Q·Kᵀ·scale + mask)·V written out in the ways models write it."""

    def __init__(self, width, heads, scale_at, mask, kt_form, rank, softmax_dtype, tap):
        super().__init__()
        self.heads, self.scale_at, self.mask, self.kt_form = heads, scale_at, mask, kt_form
        self.rank, self.softmax_dtype, self.tap = rank, softmax_dtype, tap
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.drop = nn.Dropout(0.1)  # eval mode: removed by cleanup, must not block the fusion

    def split(self, t, b, s):
        t = t.view(b, s, self.heads, -1).transpose(1, 2)
        return t.reshape(b * self.heads, s, -1) if self.rank == 3 else t

    def forward(self, x, keep):
        b, s, w = x.shape
        d = w // self.heads
        q, k, v = (self.split(p(x), b, s) for p in (self.q, self.k, self.v))
        scale = 1.0 / math.sqrt(d)
        if self.scale_at == "query":
            q = q * scale
        elif self.scale_at == "key":
            k = k * scale
        kt = k.transpose(-1, -2) if self.kt_form == "transpose" else k.permute(*range(k.dim() - 2), -1, -2)
        scores = torch.matmul(q, kt)
        if self.scale_at == "scores-mul":
            scores = scores * scale
        elif self.scale_at == "scores-div":
            scores = scores / math.sqrt(d)
        scores = self.apply_mask(scores, keep, b, s)
        probs = torch.softmax(scores, dim=-1, dtype=x.dtype if self.softmax_dtype else None)
        out = torch.matmul(self.drop(probs), v)
        out = out.reshape(b, self.heads, s, d) if self.rank == 3 else out
        return x + out.transpose(1, 2).reshape(b, s, w), ([probs] if self.tap else [])

    def apply_mask(self, scores, keep, b, s):
        low = torch.finfo(scores.dtype).min
        if self.mask == "padding":  # BERT: additive, from the attention_mask input
            additive = torch.where(keep[:, None, None, :].bool(), 0.0, low).to(scores.dtype)
            if self.rank == 3:
                additive = additive.expand(b, self.heads, s, s).reshape(b * self.heads, s, s)
            return scores + additive
        causal = torch.ones(s, s, dtype=torch.bool, device=scores.device).tril()
        if self.mask == "causal-additive":  # GPT-2: 0 / finfo.min triangle, folded to a weight
            return scores + torch.where(causal, 0.0, low).to(scores.dtype)
        if self.mask == "causal-fill":
            return scores.masked_fill(~causal, float("-inf"))
        if self.mask == "zero":  # ViT: an all-zero additive mask
            return scores + torch.zeros(s, s, dtype=scores.dtype)
        return scores


@st.composite
def attention_cases(draw, dtypes=FUSION_DTYPES) -> ModelCase:
    """Attention blocks with every scale placement and mask form the pass accepts; some return the probs."""
    seed, dtype = draw(st.integers(0, 2**16)), draw(st.sampled_from(dtypes))
    torch.manual_seed(seed)
    heads = draw(st.sampled_from([1, 2, 4]))
    width = heads * draw(st.sampled_from([2, 4, 8]))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    blocks, parts, fused = [], [], 0
    for _ in range(draw(st.integers(1, 2))):
        options = dict(
            scale_at=draw(st.sampled_from(["scores-mul", "scores-div", "query", "key", "none"])),
            mask=draw(st.sampled_from(["none", "padding", "causal-additive", "causal-fill", "zero"])),
            kt_form=draw(st.sampled_from(["transpose", "permute"])), rank=draw(st.sampled_from([3, 4])),
            softmax_dtype=draw(st.booleans()), tap=draw(st.sampled_from([False, False, False, True])),
        )
        blocks.append(Attention(width, heads, **options))
        parts.append("attention(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")
        fused += not options["tap"]
    x = torch.randn(batch, seq, width)
    keep = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):  # later rows padded, never fully
        keep[row, max(1, seq - row):] = 0
    desc = f"seed={seed} {dtype} x=[{batch},{seq},{width}] h={heads} " + " ".join(parts)
    return finish(Chain(blocks), (x, keep), desc, dtype, {"attention": fused})


# ==================================================================== norms
class DecomposedNorm(nn.Module):
    """LayerNorm or RMSNorm written out, in one of the spellings models use."""

    def __init__(self, width, kind, square, denominator, affine, dims, eps, upcast):
        super().__init__()
        self.kind, self.square, self.denominator, self.affine = kind, square, denominator, affine
        self.dims, self.eps, self.upcast = dims, eps, upcast
        shape = {(-1,): (width,), (-2, -1): (3, width), (1,): (3, 1)}[dims]
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(shape))
        self.bias = nn.Parameter(0.1 * torch.randn(shape))
        self.linear = nn.Linear(width, width)
        # Normalizing over dim 1 (the blocked variant) needs rows that differ, or it only amplifies rounding noise.
        self.row_offset = nn.Parameter(torch.randn(3, 1)) if dims == (1,) else None

    def sq(self, t):
        return t.pow(2) if self.square == "pow" else t * t

    def normalize(self, t, variance):
        if self.denominator == "rsqrt":
            return t * torch.rsqrt(variance + self.eps)
        if self.denominator == "rsqrt-left":
            return torch.rsqrt(variance + self.eps) * t
        return t / torch.sqrt(variance + self.eps)

    def forward(self, x):
        x = self.linear(x) if self.row_offset is None else self.linear(x) + self.row_offset
        if self.kind == "layer-norm":
            centered = x - x.mean(self.dims, keepdim=True)
            if self.square == "var":
                variance = x.var(self.dims, keepdim=True, unbiased=False)
            else:
                variance = self.sq(centered).mean(self.dims, keepdim=True)
            y = self.normalize(centered, variance)
        else:
            h = x.to(torch.float32) if self.upcast else x
            y = self.normalize(h, self.sq(h).mean(self.dims, keepdim=True)).to(x.dtype)
        if "weight" in self.affine:
            y = self.weight * y if self.affine.startswith("left") else y * self.weight
        if "bias" in self.affine:
            y = y + self.bias
        return torch.tanh(y), []


@st.composite
def norm_cases(draw, dtypes=FUSION_DTYPES) -> ModelCase:
    """Decomposed LayerNorm / RMSNorm blocks on [B, 3, W]; normalizing over dim 1 must not fuse.

    The fused ops compute half inputs in float32, so they differ from the fp16 reference by about the
    reference's own rounding error (measured: median 2.6e-4, up to ~1e-3 per block). fp16 models get at
    most 2 blocks and widths of 4 or more, where that stays under the 2e-3 tolerance; a norm over 2 values
    maps everything to about +-1 and amplifies fp16 rounding.
    """
    seed, dtype = draw(st.integers(0, 2**16)), draw(st.sampled_from(dtypes))
    torch.manual_seed(seed)
    width = draw(st.integers(4, 8))
    blocks, parts, counts = [], [], {"layer-norm": 0, "rms-norm": 0}
    for _ in range(draw(st.integers(1, 2 if dtype == torch.float16 else 3))):
        kind = draw(st.sampled_from(["layer-norm", "rms-norm"]))
        square = draw(st.sampled_from(["pow", "mul", "var"] if kind == "layer-norm" else ["pow", "mul"]))
        dims = draw(st.sampled_from([(-1,), (-1,), (-2, -1), (1,)]))
        affine = draw(st.sampled_from(["none", "weight", "left-weight", "weight+bias"] if kind == "layer-norm"
                                      else ["none", "weight", "left-weight"]))
        options = dict(kind=kind, square=square, denominator=draw(st.sampled_from(["rsqrt", "rsqrt-left", "div"])),
                       affine=affine, dims=dims, eps=draw(st.sampled_from([1e-5, 1e-6, 1e-12])),
                       upcast=draw(st.booleans()))
        blocks.append(DecomposedNorm(width, **options))
        parts.append("norm(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")
        counts[kind] += dims != (1,)
    x = torch.randn(draw(st.integers(1, 3)), 3, width)
    desc = f"seed={seed} {dtype} x=[*,3,{width}] " + " ".join(parts)
    return finish(Chain(blocks), (x,), desc, dtype, counts)


# ================================================================== helpers


def captured_and_cleaned(case: ModelCase):
    """The case's model captured and run through ``cleanup``: the graph a fusion pass sees in ``fuse``."""
    import fxopt

    return fxopt.Pipeline("cleanup", debug=True)(fxopt.capture(case.model, case.inputs)).graph


def run_pass(spec: str, graph):
    """Run one pass with the verifier on; return (result graph, that pass's stats)."""
    import fxopt

    result = fxopt.Pipeline(spec, debug=True)(graph)
    return result.graph, result.results[-1].stats


def weights_fingerprint(graph):
    """Every weight's values, copied: to check that a pass changed none in place."""
    return {name: t.detach().clone() for name, t in graph.params().items()}


def assert_weights_unchanged(graph, fingerprint) -> None:
    now = graph.params()
    assert set(now) == set(fingerprint)
    for name, before in fingerprint.items():
        assert torch.equal(now[name], before), f"weight {name} was modified in place"
