"""merge-siblings: equivalence (bit-identical where measured) on generated Linear / GPT-2 Conv1D / matmul
siblings, group counts, layouts a view cannot take left alone, the option check, and BERT's Q/K/V."""
import operator

import pytest
import torch
import torch.nn as nn
from hypothesis import given

import fxopt
from tests import models
from tests.harness import assert_equivalent, examples, outputs_of
from tests.passes.fusion_models import (
    assert_weights_unchanged, captured_and_cleaned, count, run_pass, sibling_cases, weights_fingerprint,
)

aten = torch.ops.aten
GEMMS = (aten.linear.default, aten.addmm.default, aten.matmul.default)


def gemm_count(graph):
    return sum(count(graph, target) for target in GEMMS)


@examples(25)
@given(case=sibling_cases())
def test_merge_siblings_keeps_outputs_and_merges_every_group(case):
    graph = captured_and_cleaned(case)
    before = weights_fingerprint(graph)
    merged, stats = run_pass("merge-siblings", graph)
    assert stats["groups"] == case.counts["groups"] and stats["merged"] == case.counts["merged"], graph.format()
    assert stats["blocked_by_layout"] == 1 - case.counts["groups"]
    assert count(merged, aten.split_with_sizes.default) == case.counts["groups"]
    assert gemm_count(merged) == gemm_count(graph) - case.counts["merged"] + case.counts["groups"]
    assert_equivalent(case.model, merged, case.inputs)
    assert_weights_unchanged(graph, before)


def test_merge_siblings_merges_bert_qkv_with_identical_outputs():
    model, inputs = models.tiny_bert()
    graph = fxopt.Pipeline("cleanup")(fxopt.capture(model, inputs)).graph
    merged, stats = run_pass("merge-siblings", graph)
    assert stats == {"groups": 2, "merged": 6, "blocked_by_layout": 0}  # Q, K, V in each of the 2 layers
    assert count(merged, aten.linear.default) == count(graph, aten.linear.default) - 4
    widths = [n.meta["fxopt_info"].shape[-1] for n in merged.call_nodes(aten.linear.default)]
    assert widths.count(96) == 2  # 3 x 32 features
    for expected, actual in zip(outputs_of(graph, inputs), outputs_of(merged, inputs)):
        assert torch.equal(expected, actual)  # one wider GEMM computes every element as before


class SiblingsWithOtherInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4, bias=False)

    def forward(self, x, y):
        return self.a(x), self.b(y), self.c(x)  # different inputs; with and without bias


def test_merge_siblings_needs_the_same_input_and_matching_bias():
    inputs = (torch.randn(2, 4), torch.randn(2, 4))
    graph = fxopt.capture(SiblingsWithOtherInputs(), inputs)
    result, stats = run_pass("merge-siblings", graph)
    assert stats["groups"] == 0 and not any(n.target is operator.getitem for n in result.call_nodes())
    assert count(result, aten.linear.default) == 3


def test_merge_siblings_rejects_groups_of_one():
    with pytest.raises(fxopt.PassError, match=r"merge-siblings: min-siblings=1 would merge single ops; use 2"):
        fxopt.Pipeline("merge-siblings{min-siblings=1}")
