"""prune-channels on Hugging Face BERT, GPT-2 (causal, fused qkv Conv1D + split) and ViT (small configs, random
init): half the heads and half the FFN neurons of every layer go; the graph verifies, keeps its output shapes,
loses exactly the parameters the config predicts, and computes what the HF model computes with the removed
heads' output-projection columns and the removed neurons' down-projection columns zeroed.
"""
import copy
import re

import pytest
import torch

import fxopt
from tests import models
from tests.harness import assert_equivalent, outputs_of

RATIO = 0.5
#: Per family: the attention output projection and FFN down projection of layer i (weight, and whether it is a
#: Conv1D, whose weight is [in, out]), and the names of layer i's head and FFN groups.
FAMILIES = {
    "bert": (models.tiny_bert, "encoder.layer.{}.attention.output.dense", "encoder.layer.{}.output.dense", False,
             "heads:encoder.layer.{}.attention.self.query", "ffn:encoder.layer.{}.intermediate.dense"),
    "gpt2": (models.tiny_gpt2, "h.{}.attn.c_proj", "h.{}.mlp.c_proj", True,
             "heads:h.{}.attn.c_attn", "ffn:h.{}.mlp.c_fc"),
    "vit": (models.tiny_vit, "layers.{}.attention.o_proj", "layers.{}.mlp.fc2", False,
            "heads:layers.{}.attention.q_proj", "ffn:layers.{}.mlp.fc1"),
}


def zero_inputs(module: torch.nn.Module, columns: torch.Tensor, conv1d: bool) -> None:
    with torch.no_grad():
        if conv1d:
            module.weight[columns] = 0
        else:
            module.weight[:, columns] = 0


def removed_mask(units: int, kept, width: int = 1) -> torch.Tensor:
    mask = torch.ones(units, dtype=torch.bool)
    mask[kept] = False
    return mask.repeat_interleave(width)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pruned_family(request):
    build, attn_out, ffn_out, conv1d, heads_name, ffn_name = FAMILIES[request.param]
    model, inputs = build()
    graph = fxopt.capture(model, inputs)
    result = fxopt.Pipeline(f"prune-channels{{ratio={RATIO}}}", debug=True)(graph)
    return request.param, model, inputs, graph, result.graph, result.stats["0:prune-channels"]


def test_output_shapes_kept_and_parameters_removed_as_the_config_predicts(pruned_family):
    family, model, inputs, graph, pruned, stats = pruned_family
    config = model.config
    layers, hidden, heads = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    head_dim = hidden // heads
    per_layer = int(heads * RATIO) * (4 * head_dim * hidden + 3 * head_dim) + int(inner * RATIO) * (2 * hidden + 1)
    assert graph.param_count() - pruned.param_count() == layers * per_layer == stats["params_removed"]
    assert len(stats["pruned"]) == 2 * layers
    assert [t.shape for t in outputs_of(pruned, inputs)] == [t.shape for t in outputs_of(graph, inputs)]


def test_pruned_graph_equals_the_model_with_removed_units_zeroed(pruned_family):
    family, model, inputs, _, pruned, stats = pruned_family
    _, attn_out, ffn_out, conv1d, heads_name, ffn_name = FAMILIES[family]
    masked = copy.deepcopy(model)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        heads_kept, neurons_kept = stats["kept"][heads_name.format(i)], stats["kept"][ffn_name.format(i)]
        units = stats["pruned"][ffn_name.format(i)][1]
        zero_inputs(masked.get_submodule(attn_out.format(i)),
                    removed_mask(config.num_attention_heads, heads_kept, head_dim), conv1d)
        zero_inputs(masked.get_submodule(ffn_out.format(i)), removed_mask(units, neurons_kept), conv1d)
    assert_equivalent(masked, pruned, inputs, tol=1e-5)


def test_size_arguments_follow_the_pruned_shapes(pruned_family):
    """Views state the new sizes; GPT-2's qkv split (one Conv1D output split in three) splits 16 features each."""
    family, _, _, graph, pruned, _ = pruned_family
    aten = torch.ops.aten
    for node in [*pruned.call_nodes(aten.view.default), *pruned.call_nodes(aten._unsafe_view.default)]:
        shape = list(node.meta["val"].shape)
        assert all(given in (-1, actual) for given, actual in zip(node.args[1], shape)), node.name
    splits = [n.args[1] for n in pruned.call_nodes(aten.split.Tensor)]
    assert splits == ([16, 16] if family == "gpt2" else [])  # 32 features per q/k/v before; 2 of 4 heads of 8 kept
    if family == "gpt2":
        assert pruned.params()["h.0.attn.c_attn.weight"].shape == (32, 48)
        names = [g.name for g in fxopt.prune.groups(graph) if re.match(r"heads:", g.name)]
        assert names == ["heads:h.0.attn.c_attn", "heads:h.1.attn.c_attn"]
