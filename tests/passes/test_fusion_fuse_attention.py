"""fuse-attention: equivalence on generated attention blocks (scale on scores, Q or K; padding, causal, zero
masks; 3-D and 4-D), counts, blocks returning their probabilities and training-mode dropout left alone,
strict mode's error, and the exact forms BERT, GPT-2 and ViT export."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given

import fxopt
from tests import models
from tests.harness import assert_equivalent, examples
from tests.passes.fusion_models import Attention, attention_cases, captured_and_cleaned, count, run_pass

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


@examples(25)
@given(case=attention_cases())
def test_fuse_attention_keeps_outputs_and_fuses_every_attention(case):
    graph = captured_and_cleaned(case)
    fused, stats = run_pass("fuse-attention", graph)
    assert sum(stats["matches"].values()) == case.counts["attention"] == count(fused, SDPA), graph.format()
    assert count(fused, aten.softmax.int) == count(graph, aten.softmax.int) - case.counts["attention"]
    assert_equivalent(case.model, fused, case.inputs)


@pytest.mark.parametrize("build, mask, causal", [
    (models.tiny_bert, "input", False),  # where(attention_mask, 0, finfo.min), an input
    (models.tiny_gpt2, None, True),  # the folded 0 / finfo.min triangle
    (models.tiny_vit, None, False),  # the folded all-zero mask is dropped
])
def test_fuse_attention_on_hf_exports(build, mask, causal):
    model, inputs = build()
    graph = fxopt.Pipeline("cleanup")(fxopt.capture(model, inputs)).graph
    fused, stats = run_pass("fuse-attention", graph)
    assert stats["matches"] == {"scaled-masked-attention": 2}  # 2 layers, scale on the scores, an additive mask
    sdpa = list(fused.call_nodes(SDPA))
    assert [n.args[5] for n in sdpa] == [causal, causal]
    assert all((n.args[3] is not None) == (mask == "input") for n in sdpa)
    assert all(n.kwargs["scale"] == pytest.approx(8 ** -0.5) for n in sdpa)  # head dim 8
    assert count(fused, aten.softmax.int) == 0 and len(fused) < len(graph)
    assert_equivalent(model, fused, inputs)


def _attention(**options):
    defaults = dict(width=8, heads=2, scale_at="scores-div", mask="padding", kt_form="transpose", rank=4,
                    softmax_dtype=False, tap=False)
    torch.manual_seed(0)
    return Attention(**{**defaults, **options})


class OneBlock(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, keep):
        return self.block(x, keep)


INPUTS = (torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))


def test_fuse_attention_must_not_fire_on_training_dropout_or_returned_probabilities():
    training = fxopt.capture(OneBlock(_attention()).train(), INPUTS, eval_mode=False)
    tapped = fxopt.capture(OneBlock(_attention(tap=True)), INPUTS)
    for graph in (fxopt.Pipeline("cleanup")(training).graph, fxopt.Pipeline("cleanup")(tapped).graph):
        result, stats = run_pass("fuse-attention", graph)
        assert stats["matches"] == {} and count(result, SDPA) == 0


def test_fuse_attention_strict_names_the_training_dropout():
    graph = fxopt.capture(OneBlock(_attention()).train(), INPUTS, eval_mode=False)
    with pytest.raises(fxopt.PassError, match=r"fuse-attention: node %softmax \(aten\.softmax\.int\): "
                                              r"training-mode dropout sits between softmax and the value matmul.*"
                                              r"; capture the model in eval mode"):
        run_pass("fuse-attention{strict=true}", graph)


def test_fuse_attention_strict_passes_when_everything_fused():
    graph = fxopt.Pipeline("cleanup")(fxopt.capture(OneBlock(_attention()), INPUTS)).graph
    fused, stats = run_pass("fuse-attention{strict=true}", graph)
    assert count(fused, SDPA) == 1
