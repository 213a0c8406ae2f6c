"""prune-channels on generated models: ratio 0 is the identity; any generated model pruned at a random ratio
stays valid with its output shape; residual/attention stacks and conv chains pruned at a random ratio have
exactly the parameter count their structure predicts and compute exactly what the original computes with
the removed units' consumer weights zeroed (an oracle that does not use the analysis).

Groups, GQA, criteria and errors: test_prune_groups.py. HF models: test_prune_hf.py.
"""
import copy

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxopt
from fxopt.passes.prune import KINDS
from tests.harness import (
    ACTIVATIONS, AttentionBlock, ConvBlock, ResidualBlock, Sequence_, assert_equivalent, model_cases, outputs_of,
)

#: Capturing a generated model takes about a second here (more on a loaded machine).
FEW = settings(max_examples=10 if settings.default.max_examples <= 25 else settings.default.max_examples)
ALL_KINDS = ";".join(k for k in KINDS if k != "other")


def prune(graph, options: str):
    result = fxopt.Pipeline(f"prune-channels{{{options}}}", debug=True)(graph)
    return result.graph, result.stats["0:prune-channels"]


def removed(units: int, ratio: float) -> int:
    return int(units * ratio + 1e-9)


# ---------------------------------------------------------------- generic
@FEW
@given(case=model_cases())
def test_ratio_zero_is_the_identity(case):
    graph = fxopt.capture(case.model, case.inputs)
    pruned, stats = prune(graph, f"ratio=0,kinds={ALL_KINDS}")
    assert stats["pruned"] == {} and stats["params_removed"] == 0
    assert pruned.param_count() == graph.param_count()
    for a, b in zip(outputs_of(graph, case.inputs), outputs_of(pruned, case.inputs)):
        assert torch.equal(a, b)


@FEW
@given(case=model_cases(), ratio=st.floats(0.05, 0.95))
def test_any_generated_model_stays_valid_with_its_output_shape(case, ratio):
    """Every kind of group pruned (hidden streams and head dims too): the verifier passes after the pass."""
    graph = fxopt.capture(case.model, case.inputs)
    pruned, stats = prune(graph, f"ratio={ratio},kinds={ALL_KINDS}")
    before, after = outputs_of(graph, case.inputs), outputs_of(pruned, case.inputs)
    assert [t.shape for t in after] == [t.shape for t in before]
    assert all(torch.isfinite(t).all() == torch.isfinite(r).all() for t, r in zip(after, before))
    assert pruned.param_count() == graph.param_count() - stats["params_removed"]
    some_units_removed = any(kept < units for kept, units in stats["pruned"].values())
    assert (stats["params_removed"] > 0) == some_units_removed
    for name, kept in stats["kept"].items():
        assert len(kept) == stats["pruned"][name][0] and kept == sorted(set(kept))


# ---------------------------------------------- residual/attention oracle
@st.composite
def transformer_stacks(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    width = heads * draw(st.integers(1, 4))
    kinds = draw(st.lists(st.sampled_from(["attention", "residual"]), min_size=1, max_size=3))
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    blocks = [AttentionBlock(width, heads, draw(st.booleans())) if kind == "attention" else
              ResidualBlock(width, draw(st.integers(1, 12)), draw(st.sampled_from(sorted(ACTIVATIONS))))
              for kind in kinds]
    x = torch.randn(draw(st.integers(1, 2)), draw(st.integers(1, 5)), width, dtype=torch.float64)
    return Sequence_(blocks).double().eval(), x


def zero_removed_consumers(model: Sequence_, kept: dict) -> nn.Module:
    """The original model with the pruned heads' output-projection columns and neurons' down columns zeroed."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for i, block in enumerate(masked.blocks):
            if isinstance(block, AttentionBlock) and f"heads:blocks.{i}.q" in kept:
                head_dim = block.out.in_features // block.heads
                columns = torch.ones(block.heads, dtype=torch.bool)
                columns[kept[f"heads:blocks.{i}.q"]] = False
                block.out.weight[:, columns.repeat_interleave(head_dim)] = 0
            if isinstance(block, ResidualBlock) and f"ffn:blocks.{i}.up" in kept:
                columns = torch.ones(block.down.in_features, dtype=torch.bool)
                columns[kept[f"ffn:blocks.{i}.up"]] = False
                block.down.weight[:, columns] = 0
    return masked


def expected_params_removed(model: Sequence_, ratio: float) -> int:
    total = 0
    for block in model.blocks:
        if isinstance(block, AttentionBlock):
            width, head_dim = block.out.out_features, block.out.in_features // block.heads
            # q, k, v rows and biases, output-projection columns
            total += removed(block.heads, ratio) * (4 * head_dim * width + 3 * head_dim)
        else:
            total += removed(block.up.out_features, ratio) * (2 * block.up.in_features + 1)  # up row, bias, down column
    return total


@FEW
@given(stack=transformer_stacks(), ratio=st.floats(0.0, 0.95), criterion=st.sampled_from(["l1", "l2"]))
def test_heads_and_ffn_pruned_exactly_as_the_structure_predicts(stack, ratio, criterion):
    model, x = stack
    graph = fxopt.capture(model, (x,))
    pruned, stats = prune(graph, f"ratio={ratio},kinds=heads;ffn,criterion={criterion}")
    assert graph.param_count() - pruned.param_count() == expected_params_removed(model, ratio)
    assert set(stats["fixed"]) == set()  # the residual stream is not selected (kind hidden)
    assert_equivalent(zero_removed_consumers(model, stats["kept"]), pruned, (x,))


# ------------------------------------------------------------ conv oracle
@st.composite
def conv_chains(draw):
    channels = [draw(st.integers(1, 3))] + draw(st.lists(st.integers(1, 8), min_size=1, max_size=3))
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    blocks = [ConvBlock(c_in, c_out, draw(st.sampled_from([1, 3])), False, draw(st.booleans()),
                        draw(st.sampled_from(sorted(ACTIVATIONS))), False)
              for c_in, c_out in zip(channels, channels[1:])]
    model = Sequence_(blocks, nn.Linear(channels[-1], draw(st.integers(1, 4)))).double()
    model.train()
    with torch.no_grad():  # BatchNorm running statistics that are not the defaults
        model(torch.randn(8, channels[0], 6, 6, dtype=torch.float64))
    x = torch.randn(draw(st.integers(1, 2)), channels[0], draw(st.integers(3, 6)), 6, dtype=torch.float64)
    return model.eval(), x


def conv_params(model: Sequence_, ratio: float) -> int:
    """Weights (and BatchNorm statistics) of the chain once each conv keeps ``c - floor(c * ratio)`` channels."""
    total, c_in = 0, model.blocks[0].conv.in_channels
    for block in model.blocks:
        conv = block.conv
        c_out = conv.out_channels - removed(conv.out_channels, ratio)
        total += c_out * c_in * conv.kernel_size[0] * conv.kernel_size[1] + (c_out if conv.bias is not None else 0)
        total += 4 * c_out + 1 if isinstance(block.bn, nn.BatchNorm2d) else 0  # + num_batches_tracked
        c_in = c_out
    return total + model.head.out_features * (c_in + 1)


@FEW
@given(chain=conv_chains(), ratio=st.floats(0.0, 0.95))
def test_conv_channels_pruned_exactly_as_the_structure_predicts(chain, ratio):
    model, x = chain
    graph = fxopt.capture(model, (x,))
    assert graph.param_count() == conv_params(model, 0.0)
    pruned, stats = prune(graph, f"ratio={ratio}")
    assert pruned.param_count() == conv_params(model, ratio)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        consumers = [b.conv for b in masked.blocks[1:]] + [masked.head]
        for i, consumer in enumerate(consumers):
            kept = stats["kept"].get(f"channels:blocks.{i}.conv")
            if kept is not None:
                columns = torch.ones(consumer.weight.shape[1], dtype=torch.bool)
                columns[kept] = False
                consumer.weight[:, columns] = 0
    assert_equivalent(masked, pruned, (x,))
