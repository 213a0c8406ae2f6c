"""share-params: bit-identical outputs on generated models with the duplicates counted independently, an untied
embedding/LM-head pair, what must not be shared (shape, dtype, one differing element), tolerances, across-layers,
and errors."""
from collections import Counter

import pytest
import torch
import torch.nn as nn
from hypothesis import given

import fxopt
from tests.harness import assert_equivalent, examples, model_cases, relative_error


def share(graph, options: str = ""):
    return fxopt.Pipeline("share-params" + (f"{{{options}}}" if options else ""), debug=True)(graph)


def get_attrs(graph):
    """The weights some op reads."""
    return [n for n in graph.nodes if n.op == "get_attr" and n.users]


def duplicate_count(graph) -> int:
    """Read weights whose values (compared as Python numbers, not bytes) repeat an earlier one of their shape and
    dtype."""
    tensors = {n.target: graph.param(n) for n in get_attrs(graph)}
    keys = Counter((tuple(t.shape), t.dtype, tuple(t.flatten().tolist())) for t in tensors.values())
    return sum(n - 1 for n in keys.values())


# ------------------------------------------------------------- equivalence
@examples(25)
@given(case=model_cases())
def test_sharing_is_lossless_and_finds_every_duplicate(case):
    """Harness models repeat LayerNorm weights (ones) and biases (zeros) of equal widths, among others."""
    graph = fxopt.capture(case.model, case.inputs)
    result = share(graph)
    stats = result.stats["0:share-params"]
    assert stats["shared"] == stats["exact"] == duplicate_count(graph)
    assert duplicate_count(result.graph) == 0
    assert stats["params_removed"] == graph.param_count() - result.graph.param_count()
    assert len(get_attrs(result.graph)) == len(get_attrs(graph)) - stats["shared"]
    assert_equivalent(graph, result.graph, case.inputs, tol=0.0)  # the same tensors: bit-identical outputs
    assert not share(result.graph).modified  # a fixed point


# ------------------------------------------------------------ tied weights
class UntiedLM(nn.Module):
    """An embedding and an LM head holding equal values in two tensors (tied before a save, loaded untied)."""

    def __init__(self, vocab=50, width=16, tie=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        with torch.no_grad():
            if tie:
                self.head.weight = self.embed.weight
            else:
                self.head.weight.copy_(self.embed.weight)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_an_untied_embedding_and_lm_head_are_stored_once():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    graph = fxopt.capture(UntiedLM(), (ids,))
    result = share(graph)
    assert result.stats["0:share-params"]["shared"] == 1
    assert result.stats["0:share-params"]["params_removed"] == 50 * 16
    assert graph.size_bytes() - result.graph.size_bytes() == 50 * 16 * 4
    embedding = next(result.graph.call_nodes(torch.ops.aten.embedding.default))
    head = list(result.graph.call_nodes(torch.ops.aten.linear.default))[-1]
    assert embedding.args[0] is head.args[1]  # one get_attr feeds both
    assert torch.equal(graph(ids), result.graph(ids))


def test_weights_tied_in_the_model_stay_one_tensor_and_need_no_sharing():
    ids = torch.randint(0, 50, (2, 7))
    graph = fxopt.capture(UntiedLM(tie=True), (ids,))
    result = share(graph)
    assert result.stats["0:share-params"]["shared"] == 0 and result.stats["0:share-params"]["params_removed"] == 0
    assert result.graph.size_bytes() == graph.size_bytes()


# ------------------------------------------------------------- must not match
class Holder(nn.Module):
    """Adds each stored tensor (reduced to a scalar) to x: every weight is used, none is a module's."""

    def __init__(self, tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)

    def forward(self, x):
        for t in self.buffers():
            x = x + t.double().sum().to(x.dtype) * 1e-3
        return x


def test_equal_values_in_another_shape_or_dtype_or_one_element_off_are_not_shared():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    off = base.clone()
    off[2, 3] += 1e-3
    x = torch.randn(3)
    graph = fxopt.capture(Holder([base, base.t().contiguous(), base.reshape(24).clone(), base.double(), off]), (x,))
    assert not share(graph).modified
    loose = share(graph, "atol=0.01")
    assert loose.stats["0:share-params"]["within_tolerance"] == 1 and loose.stats["0:share-params"]["shared"] == 1
    assert loose.stats["0:share-params"]["params_removed"] == 24


def test_across_layers_shares_layers_within_epsilon_in_relative_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
    with torch.no_grad():
        noise = torch.randn(32, 32)
        model[2].weight.copy_(model[0].weight + noise * (1e-4 * model[0].weight.norm() / noise.norm()))
    x = torch.randn(5, 32)
    graph = fxopt.capture(model, (x,))
    assert share(graph).stats["0:share-params"]["shared"] == 0
    assert share(graph, "across-layers=true,epsilon=1e-5").stats["0:share-params"]["shared"] == 0
    result = share(graph, "across-layers=true,epsilon=1e-3")
    assert result.stats["0:share-params"]["across_layers"] == 1
    assert relative_error(graph(x), result.graph(x)) < 1e-3  # the second layer reads weights 1e-4 away


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("options, message", [
    ("atol=-1", r"share-params: atol=-1.0 is negative; tolerances are >= 0"),
    ("rtol=-0.5", r"share-params: rtol=-0.5 is negative"),
    ("epsilon=1.5", r"share-params: epsilon=1.5 is outside \[0, 1\)"),
    ("across-layers=maybe", r"share-params: option across-layers='maybe' is not a boolean"),
])
def test_bad_options_raise(options, message):
    with pytest.raises(fxopt.PassError, match=message):
        fxopt.Pipeline(f"share-params{{{options}}}")
