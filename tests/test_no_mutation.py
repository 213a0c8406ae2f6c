"""No mutation (issue 11): passes and ``fxopt.optimize`` never change what they are given.

For every registered pass, run with options that make it change something (its result says ``modified``) on a
small model that has what it looks for (calibrated, and handed the data, where it needs them), this proves that
- the user's nn.Module is byte-identical afterwards (sha256 of every state_dict tensor's bytes, with dtype and
  shape), keeps its parameter objects, their ``requires_grad`` and empty ``.grad`` (gradient-based pruning
  scores must not touch them), and still gives the same output, bit for bit;
- the input fxopt Graph is unchanged: its printed form, the bytes of its weights and module state, its
  calibration metadata, and its output.
``fxopt.optimize`` for ``eager`` and ``x86-int8`` (with calibration data, with and without a ``tolerance=``
search) leaves the model the same way and returns a model that runs. A pass that refuses a graph leaves it
unchanged (tests/passes/test_pipeline.py covers a pass that fails after editing weights).
"""
import dataclasses
import math
import warnings
from typing import Callable, Dict, NamedTuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import PassError
from fxopt.ir import meta as M
from fxopt.passes.quantize.calibrate import CHANNEL_ABSMAX_KEY
from tests.harness import fingerprint, outputs_of, tensor_digest
from tests.pass_options import FXOPT_PASSES

CALIBRATION_KEYS = (M.QPARAMS_KEY, CHANNEL_ABSMAX_KEY)


class Block(nn.Module):
    """What the token passes look for: a hand-written LayerNorm, Q/K/V siblings and attention written out, a
    linear + GELU FFN, a LayerNorm whose weights equal the first's, a weight expression, redundant ops and an
    unused parameter."""

    def __init__(self, width=16, heads=4, inner=32):
        super().__init__()
        self.heads = heads
        self.norm_weight, self.norm_bias = nn.Parameter(torch.ones(width)), nn.Parameter(torch.zeros(width))
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, inner), nn.Linear(inner, width)
        self.gain = nn.Parameter(torch.randn(width))
        self.unused = nn.Parameter(torch.randn(3))
        self.drop = nn.Dropout(0.1)

    def layer_norm(self, x):
        centered = x - x.mean(-1, keepdim=True)
        variance = centered.pow(2).mean(-1, keepdim=True)
        return centered * torch.rsqrt(variance + 1e-5) * self.norm_weight + self.norm_bias

    def attention(self, h):
        b, s, w = h.shape
        d = w // self.heads
        split = lambda t: t.view(b, s, self.heads, d).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return self.out((scores @ v).transpose(1, 2).reshape(b, s, w))

    def forward(self, x):
        x = x + self.attention(self.layer_norm(x))
        x = x + self.drop(self.down(F.gelu(self.up(self.norm(x))))).clone()
        x = x * torch.sigmoid(self.gain * 2.0 + 1.0)
        return x + torch.tanh(x) - torch.tanh(x)


class ConvNet(nn.Module):
    """Conv + BatchNorm pairs, pooled into a linear + BatchNorm1d head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head, self.head_bn = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head_bn(self.head(x.mean(dim=(2, 3))))


def with_statistics(model: nn.Module) -> nn.Module:
    """Eval mode, BatchNorms with non-trivial running statistics."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def block_case():
    torch.manual_seed(0)
    return with_statistics(Block()), (torch.randn(2, 5, 16),), (torch.randn(2, 5, 16),)


def conv_case():
    torch.manual_seed(0)
    return with_statistics(ConvNet()), (torch.randn(2, 3, 6, 6),), (torch.randn(2, 3, 6, 6),)


class PassCase(NamedTuple):
    spec: str
    case: Callable
    calibrate: bool = False


#: A spec per registered pass that changes the model it is given (asserted: the result says modified).
PASS_CASES: Dict[str, PassCase] = {
    "remove-noop": PassCase("remove-noop", block_case),
    "fold-constants": PassCase("fold-constants", block_case),
    "eliminate-common-subexpressions": PassCase("eliminate-common-subexpressions", block_case),
    "eliminate-dead-code": PassCase("eliminate-dead-code", block_case),
    "fold-conv-bn": PassCase("fold-conv-bn", conv_case),
    "fold-linear-bn": PassCase("fold-linear-bn", conv_case),
    "fuse-attention": PassCase("fuse-attention", block_case),
    "fuse-epilogue": PassCase("fuse-epilogue", block_case),
    "fuse-layernorm": PassCase("fuse-layernorm", block_case),
    "merge-siblings": PassCase("merge-siblings", block_case),
    "share-params": PassCase("share-params", block_case),
    "smooth-quant": PassCase("smooth-quant{alpha=0.8}", block_case, calibrate=True),
    "half-weights": PassCase("half-weights", block_case),
    "quantize-fp8": PassCase("quantize-fp8", block_case),
    "quantize-int8": PassCase("quantize-int8", block_case),
    # the FFN's down projection is the one linear with 32 input columns (an int4 group)
    "int4-linear": PassCase("insert-qdq{scheme=weight-only,bits=4,group-size=32,skip=linear;linear_1;linear_2;"
                            "linear_3;linear_4},int4-linear", block_case),
    "to-half": PassCase("to-half", block_case),
    "to-bfloat16": PassCase("to-bfloat16", block_case),
    "insert-qdq": PassCase("insert-qdq{scheme=static,method=gptq}", block_case, calibrate=True),
    "mixed-precision": PassCase("mixed-precision{tolerance=0.001}", block_case, calibrate=True),
    "low-rank": PassCase("low-rank{rank=2,activation-aware=true,statistic=covariance}", block_case, calibrate=True),
    "sparsify": PassCase("sparsify{sparsity=0.9,format=csr}", block_case),
    "prune-channels": PassCase("prune-channels{ratio=0.5,criterion=taylor}", conv_case, calibrate=True),
    "prune-heads": PassCase("prune-heads{ratio=0.5,criterion=head}", block_case, calibrate=True),
    "prune-ffn": PassCase("prune-ffn{ratio=0.5,criterion=taylor}", block_case, calibrate=True),
}


# ------------------------------------------------------------------ digests
def digest(value):
    """A comparable digest of metadata values: tensors by their bytes, dataclasses and sequences by parts."""
    if isinstance(value, torch.Tensor):
        return tensor_digest(value)
    if dataclasses.is_dataclass(value):
        return type(value).__name__, tuple(digest(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        return tuple(digest(v) for v in value)
    return repr(value)


def graph_state(graph: fxopt.Graph):
    """What a pass must leave as it was: the listing, the weights' and module state's bytes, calibration meta."""
    weights = {target: (tensor_digest(t), t.requires_grad, t.grad is None) for target, t in graph.params().items()}
    calibration = {(n.name, key): digest(n.meta[key]) for n in graph.nodes for key in CALIBRATION_KEYS
                   if key in n.meta}
    return graph.format(), weights, fingerprint(graph.module), calibration


class ModelState(NamedTuple):
    bytes: dict
    parameters: list
    training: bool

    @classmethod
    def of(cls, model: nn.Module) -> "ModelState":
        params = [(name, id(p), p.requires_grad, p.grad is None) for name, p in model.named_parameters()]
        return cls(fingerprint(model), params, model.training)


def assert_model_untouched(model: nn.Module, before: ModelState, inputs, expected) -> None:
    after = ModelState.of(model)
    assert after.bytes == before.bytes, "the model's state_dict bytes changed"
    assert after.parameters == before.parameters, "the model's parameters were replaced, or gained requires_grad/.grad"
    assert after.training == before.training
    for a, b in zip(expected, outputs_of(model, inputs)):
        assert torch.equal(a, b), "the model's output changed"


def captured(model: nn.Module, inputs, more_inputs, calibrate: bool) -> fxopt.Graph:
    graph = fxopt.capture(model, inputs)
    return fxopt.calibrate(graph, [inputs, more_inputs], progress=False) if calibrate else graph


# ------------------------------------------------------------------- passes
def test_every_registered_pass_has_a_case():
    assert set(PASS_CASES) == set(FXOPT_PASSES)


@pytest.mark.parametrize("name", sorted(PASS_CASES))
def test_pass_leaves_the_model_and_its_input_graph_unchanged(name):
    spec, make_case, calibrate = PASS_CASES[name]
    model, inputs, more_inputs = make_case()
    model_before, expected = ModelState.of(model), outputs_of(model, inputs)
    graph = captured(model, inputs, more_inputs, calibrate)
    graph_before, graph_outputs = graph_state(graph), outputs_of(graph, inputs)
    data = [inputs, more_inputs] if calibrate else None  # for the passes that read calibration data
    result = fxopt.Pipeline(spec, debug=True, calibration=data)(graph)
    assert result.modified, f"{spec} changed nothing, so it proves nothing here"
    assert graph_state(graph) == graph_before, f"{spec} changed its input graph"
    for a, b in zip(graph_outputs, outputs_of(graph, inputs)):
        assert torch.equal(a, b), f"{spec}: the input graph's output changed"
    assert_model_untouched(model, model_before, inputs, expected)
    assert [t.shape for t in outputs_of(result.graph, more_inputs)] == [t.shape for t in expected]


@pytest.mark.parametrize("spec, message", [
    ("insert-qdq{scheme=static}", "has no calibrated QParams"),
    ("prune-ffn{ratio=1.0}", "would remove all"),
    ("low-rank{ranks=no_such_node:2}", "ranks names no_such_node"),
    ("fold-constants,smooth-quant", "has no per-channel statistics"),  # fails after fold-constants changed things
])
def test_a_refused_graph_is_left_unchanged(spec, message):
    model, inputs, _ = block_case()
    graph = fxopt.capture(model, inputs)
    before = graph_state(graph)
    with pytest.raises(PassError, match=message):
        fxopt.Pipeline(spec, debug=True)(graph)
    assert graph_state(graph) == before


# ----------------------------------------------------------------- optimize
@pytest.mark.parametrize("target, tolerance", [
    ("eager", None), ("eager", {"cosine": 0.999}), ("x86-int8", None), ("x86-int8", {"cosine": 0.99}),
])
def test_optimize_leaves_the_model_unchanged_and_usable(target, tolerance):
    model, inputs, more_inputs = block_case()
    data = [inputs, more_inputs, (torch.randn(2, 5, 16),), (torch.randn(2, 5, 16),)]
    before, expected = ModelState.of(model), outputs_of(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = fxopt.optimize(model, inputs, target=target, calibration_data=data, tolerance=tolerance,
                                   progress=False)
    assert_model_untouched(model, before, inputs, expected)
    out = outputs_of(optimized, inputs)
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in expected]
    assert all(torch.isfinite(t).all() for t in out)
    assert_model_untouched(model, before, inputs, expected)  # running the optimized model changes nothing either
