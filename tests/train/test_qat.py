"""fxopt.train.qat on generated models: the fake-quant graph equals its Q/DQ graph before training, a
freeze without training gives back the same int8 weights, the straight-through gradients, and errors.
The real-data accuracy test is test_qat_digits.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.train import fake_quant_graph, fake_quantize_activation, fake_quantize_weight, freeze
from tests.harness import count, model_cases

QD = torch.ops.quantized_decomposed
SCHEMES = ("static", "dynamic", "weight-only")
#: Capturing a generated model takes about a second here: 12 examples by default, the slow profile's count under it.
FEW_EXAMPLES = settings(max_examples=12 if settings.default.max_examples <= 25 else settings.default.max_examples)


def quantize(graph, inputs, scheme="static"):
    if scheme == "static":
        graph = fxopt.calibrate(graph, [inputs], progress=False)
    return fxopt.Pipeline(f"insert-qdq{{scheme={scheme}}}", debug=True)(graph).graph


def n_activation_pairs(graph):
    return count(graph, QD.dequantize_per_tensor.default) + count(graph, QD.dequantize_per_tensor.tensor)


# ------------------------------------------------------------- equivalence
@FEW_EXAMPLES
@given(case=model_cases(), scheme=st.sampled_from(SCHEMES))
def test_fake_quant_graph_is_bit_exact_and_freezes_back_unchanged(case, scheme):
    """Before any step the QAT graph computes exactly the Q/DQ graph; freezing it restores the same weights."""
    graph = fxopt.capture(case.model, case.inputs)
    assume(any(count(graph, t) for t in fxopt.passes.quantize.quantizable_ops()))
    quantized = quantize(graph, case.inputs, scheme)
    int8_weights = count(quantized, QD.dequantize_per_channel.default)
    assume(int8_weights + n_activation_pairs(quantized) > 0)  # float64 and bf16-dynamic graphs stay float
    trainable = fake_quant_graph(quantized)
    assert len(trainable.weights) == int8_weights
    assert trainable.activations == n_activation_pairs(quantized)
    assert count(trainable.graph, fake_quantize_weight) == int8_weights
    assert not any(n.target in (QD.quantize_per_tensor.default, QD.dequantize_per_channel.default)
                   for n in trainable.graph.call_nodes())
    assert torch.equal(trainable.graph(*case.inputs), quantized(*case.inputs))
    frozen = freeze(quantized, trainable)
    assert frozen.format() == quantized.format()
    stored, restored = quantized.params(), frozen.params()
    assert stored.keys() == restored.keys()
    assert all(torch.equal(stored[k], restored[k]) for k in stored)


# -------------------------------------------------------- straight-through
def test_activation_gradient_passes_inside_the_range_and_stops_where_clipped():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.24, 1.0, 2.5], requires_grad=True)
    y = fake_quantize_activation(x, 0.01, 0, -128, 127, torch.int8)  # range [-1.28, 1.27]
    assert torch.equal(y.detach(), torch.tensor([-1.28, -0.5, 0.0, 0.24, 1.0, 1.27]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_weight_gradient_is_the_identity_and_values_are_int8_per_channel():
    torch.manual_seed(0)
    w = torch.randn(4, 6, requires_grad=True)
    y = fake_quantize_weight(w, 0)
    scale = w.detach().abs().amax(dim=1, keepdim=True) / 127
    codes = y.detach() / scale
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.abs().max() <= 127.0001
    (y * torch.arange(24.0).view(4, 6)).sum().backward()
    assert torch.equal(w.grad, torch.arange(24.0).view(4, 6))


# ---------------------------------------------------------------- training
def small_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(32, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return quantize(fxopt.capture(model, (x,)), (x,)), x, y


def test_qat_trains_weights_and_biases_and_returns_the_qdq_form():
    quantized, x, y = small_problem()
    history = []
    tuned = fxopt.train.qat(quantized, [(x, y)], F.cross_entropy, steps=30, lr=1e-2, progress=False,
                            history=history)
    assert len(history) == 30 and history[-1] < history[0]
    assert tuned.format() == quantized.format()
    before, after = quantized.params(), tuned.params()
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == {k: (v.dtype, v.shape) for k, v in before.items()}
    assert all(not torch.equal(before[k], after[k]) for k in before)  # int8 codes, scales and biases all moved
    assert F.cross_entropy(tuned(x), y) < F.cross_entropy(quantized(x), y)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_zero_learning_rate_gives_back_the_same_graph(optimizer):
    quantized, x, y = small_problem()
    tuned = fxopt.train.qat(quantized, iter([(x, y)]), F.cross_entropy, steps=3, lr=0.0, optimizer=optimizer,
                            progress=False)
    assert tuned is not quantized
    assert all(torch.equal(t, quantized.params()[k]) for k, t in tuned.params().items())


# ------------------------------------------------------------------ errors
def test_float_graph_raises():
    x = torch.randn(2, 4)
    graph = fxopt.capture(nn.Linear(4, 3), (x,))
    with pytest.raises(fxopt.PassError, match=r"qat: the graph has no quantize/dequantize pair or int8 weight to "
                                              r"train; quantize it first: fxopt.calibrate\(graph, data\)"):
        fxopt.train.qat(graph, [(x, torch.zeros(2, 3))], F.mse_loss, steps=1)


@pytest.mark.parametrize("steps", [0, -2])
def test_non_positive_steps_raise(steps):
    quantized, x, y = small_problem()
    with pytest.raises(fxopt.PassError, match=rf"qat: steps={steps} must be a positive integer; pass steps >= 1"):
        fxopt.train.qat(quantized, [(x, y)], F.cross_entropy, steps=steps)


@pytest.mark.parametrize("data", [[], iter([])], ids=["empty-list", "empty-iterator"])
def test_empty_data_raises(data):
    quantized, _, _ = small_problem()
    with pytest.raises(fxopt.PassError, match=r"qat: data gave no batches; pass a non-empty iterable of "
                                              r"\(inputs, target\) batches"):
        fxopt.train.qat(quantized, data, F.cross_entropy, steps=5, progress=False)


def test_bad_batches_losses_and_options_raise():
    quantized, x, y = small_problem()
    with pytest.raises(fxopt.PassError, match=r"qat: a batch is a Tensor, not an \(inputs, target\) pair"):
        fxopt.train.qat(quantized, [x], F.cross_entropy, steps=1, progress=False)
    with pytest.raises(fxopt.PassError, match=r"qat: loss_fn returned \[32\], not a scalar tensor; reduce"):
        fxopt.train.qat(quantized, [(x, y)], lambda out, t: F.cross_entropy(out, t, reduction="none"), steps=1,
                        progress=False)
    with pytest.raises(fxopt.PassError, match=r"qat: unknown optimizer 'lbfgs'; valid optimizers: adam, sgd"):
        fxopt.train.qat(quantized, [(x, y)], F.cross_entropy, steps=1, optimizer="lbfgs")
    with pytest.raises(fxopt.InputError, match=r"input input_1: shape \[2, 6\] does not match"):
        fxopt.train.qat(quantized, [(x[:2], y[:2])], F.cross_entropy, steps=1, progress=False)


def test_freezing_into_another_graph_raises():
    quantized, x, _ = small_problem()
    other = quantize(fxopt.capture(nn.Linear(6, 3), (x,)), (x,))
    with pytest.raises(fxopt.PassError, match=r"qat: the Q/DQ graph has no weights 0_weight_int8, 0_weight_scale"):
        freeze(other, fake_quant_graph(quantized))
