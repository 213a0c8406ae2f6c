"""Cleanup passes: hypothesis equivalence on generated models, match counts, must-not-match, errors."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, note

import fxopt
from fxopt.passes.cleanup import EliminateCommonSubexpressions, EliminateDeadCode, FoldConstants, RemoveNoop
from tests.harness import Redundant, Sequence_, assert_equivalent, count, examples, model_cases

aten = torch.ops.aten
CLEANUP_PASSES = ["remove-noop", "fold-constants", "eliminate-common-subexpressions", "eliminate-dead-code"]


@examples(25)
@given(case=model_cases())
def test_each_cleanup_pass_keeps_outputs(case):
    graph = fxopt.capture(case.model, case.inputs)  # once for every pass: the capture is most of the time
    for spec in CLEANUP_PASSES:
        note(f"pass={spec}")
        result = fxopt.Pipeline(spec, debug=True)(graph)
        assert len(result.graph) <= len(graph)
        assert_equivalent(case.model, result.graph, case.inputs)


@examples(100)
@given(case=model_cases())
def test_cleanup_preset_keeps_outputs_and_removes_redundancy(case):
    graph = fxopt.capture(case.model, case.inputs)
    result = fxopt.Pipeline("cleanup", debug=True)(graph)
    assert_equivalent(case.model, result.graph, case.inputs)
    cleaned = result.graph
    for target in (aten.alias.default, aten.dropout.default):
        assert count(cleaned, target) == 0, f"{target} survived cleanup:\n{cleaned.format()}"
    for clone in cleaned.call_nodes(aten.clone.default):  # only layout-changing copies, or ones a view reads
        before, after = clone.args[0].meta["val"], clone.meta["val"]
        read_by_view = any(u.target in (aten.view.default, aten._unsafe_view.default) for u in clone.users)
        assert read_by_view or before.stride() != after.stride(), f"%{clone.name} copies without changing the layout"

    # Running cleanup again finds nothing left to do: the preset reaches a fixed point.
    again = fxopt.Pipeline("cleanup")(cleaned)
    assert len(again.graph) == len(cleaned)


@pytest.mark.slow
@examples(500)
@given(case=model_cases())
def test_cleanup_preset_long_fuzz(case):
    test_cleanup_preset_keeps_outputs_and_removes_redundancy.hypothesis.inner_test(case)


# ----------------------------------------------------------------- remove-noop
class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.lin(x)).clone()
        y = y.view(y.shape).permute(0, 1)
        return y.to(torch.float32)[:, :]


def test_remove_noop_counts_each_kind():
    x = torch.randn(3, 4)
    graph = fxopt.capture(Noops(), (x,))
    result = RemoveNoop()(graph)
    kinds = result.stats["matches"]
    # eval-mode dropout exports as clone; .clone(); and the alias export makes for `[:, :]`
    assert kinds["copy"] == 3
    assert kinds["identity-view"] == 1 and kinds["identity-permute"] == 1
    assert kinds["metadata-assert"] == 1  # x.to(x.dtype) exports as a dtype assertion
    remaining = [n.target for n in result.graph.call_nodes()]
    assert remaining == [aten.linear.default]
    assert_equivalent(graph, result.graph, (x,))


def test_remove_noop_drops_full_slices_that_passes_leave_behind():
    import sys

    x = torch.randn(3, 4)
    graph = fxopt.capture(nn.ReLU(), (x,))
    relu = next(graph.call_nodes(aten.relu.default))
    rewriter = fxopt.Rewriter(graph, graph.output_node)
    full = rewriter.call(aten.slice.Tensor, relu, 1, 0, sys.maxsize, 1)
    partial = rewriter.call(aten.slice.Tensor, full, 0, 1, 3, 1)
    graph.output_node.args = ((partial,),)
    graph.recompile()
    result = RemoveNoop()(graph)
    assert result.stats["matches"] == {"full-slice": 1}
    assert count(result.graph, aten.slice.Tensor) == 1
    assert_equivalent(graph, result.graph, (x,))


class RealChanges(nn.Module):
    def forward(self, x):  # every op here changes the value, layout or dtype
        a = x.permute(1, 0)  # square: same shape, different value
        b = x.view(2, 8)
        c = x.to(torch.float64)
        d = x[:, 1:]
        return a, b, c, d


def test_remove_noop_leaves_real_changes_alone():
    x = torch.randn(4, 4)
    graph = fxopt.capture(RealChanges(), (x,))
    result = RemoveNoop()(graph)
    assert set(result.stats["matches"]) <= {"metadata-assert"}  # only the export's dtype assertion goes
    assert set(result.stats["declined"]) == {"identity-view", "identity-cast", "identity-permute", "full-slice"}
    for target in (aten.permute.default, aten.view.default, aten._to_copy.default, aten.slice.Tensor):
        assert count(result.graph, target) == 1, target
    assert_equivalent(graph, result.graph, (x,))


def test_remove_noop_keeps_training_mode_dropout():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).train()
    graph = fxopt.capture(model, (torch.randn(2, 4),), eval_mode=False)
    result = RemoveNoop()(graph)
    random_ops = [n for n in result.graph.call_nodes() if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]
    assert random_ops, "training-mode dropout must survive:\n" + result.graph.format()


# -------------------------------------------------------------- fold-constants
class WeightMath(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.randn(4))

    def forward(self, x):
        folded = (self.w * 2.0).t()  # depends only on weights: folds into one weight
        y = x @ folded
        noise = torch.rand_like(self.bias)  # random: must not fold
        big = self.bias.expand(64, 256, 4)  # 256 KiB from 16 bytes: must not fold
        return y + self.bias * noise, big + x.sum()


def test_fold_constants_folds_weight_only_math_and_nothing_else():
    x = torch.randn(3, 4)
    graph = fxopt.capture(WeightMath(), (x,))
    result = FoldConstants()(graph)
    assert result.stats["folded"] == 1
    assert count(result.graph, aten.t.default) == 0 and count(result.graph, aten.mul.Tensor) == 1
    assert count(result.graph, aten.rand_like.default) == 1
    assert count(result.graph, aten.expand.default) == 1
    folded = [t for name, t in result.graph.params().items() if name.startswith("folded")]
    assert len(folded) == 1
    assert result.graph.node("folded_t").meta["fxopt_info"].shape == (4, 4)
    torch.testing.assert_close(folded[0], (graph.param("w") * 2.0).t())


def test_fold_constants_rejects_negative_growth():
    with pytest.raises(fxopt.PassError, match="fold-constants: max-growth=-1.0"):
        fxopt.Pipeline("fold-constants{max-growth=-1}")


# --------------------------------------------------------------------------- cse
class Twins(nn.Module):
    def forward(self, x, y):
        same = torch.relu(x) + torch.relu(x)  # one relu is enough
        different = torch.relu(y) * torch.sigmoid(x)  # nothing to merge
        random = torch.rand_like(x) + torch.rand_like(x)  # random ops never merge
        return same, different, random


def test_cse_merges_identical_pure_ops_only():
    graph = fxopt.capture(Twins(), (torch.randn(3), torch.randn(3)))
    result = EliminateCommonSubexpressions()(graph)
    assert result.stats["merged"] == 1
    assert count(result.graph, aten.relu.default) == 2  # relu(x) once, relu(y) once
    assert count(result.graph, aten.rand_like.default) == 2


# ------------------------------------------------------------------- dead code
class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        _ = self.unused(x).relu()  # computed, never returned
        return self.used(x)


def test_dead_code_drops_unused_ops_and_weights():
    x = torch.randn(2, 4)
    graph = fxopt.capture(DeadBranch(), (x,))
    result = EliminateDeadCode()(graph)
    assert result.stats["removed_params"] == 2
    assert count(result.graph, aten.linear.default) == 1
    assert result.graph.param_count() == 20
    assert_equivalent(graph, result.graph, (x,))


def test_dead_code_on_clean_graph_reports_unmodified():
    graph = fxopt.capture(nn.Linear(3, 3), (torch.randn(1, 3),))
    result = EliminateDeadCode()(graph)
    assert not result.modified and result.stats["removed_nodes"] == 0


class CopyThenView(nn.Module):
    def forward(self, x):
        return x.clone().view(-1), x.clone() + 1


def test_remove_noop_keeps_copies_that_a_view_reads():
    """The layout a view depends on is device-specific (e.g. after SDPA), so such copies stay."""
    x = torch.randn(3, 4)
    graph = fxopt.capture(CopyThenView(), (x,))
    result = RemoveNoop()(graph)
    assert result.stats["matches"].get("copy") == 1 and result.stats["declined"].get("copy", 0) >= 1  # declined in each sweep while a view reads it
    clone = next(result.graph.call_nodes(aten.clone.default))
    assert [u.target for u in clone.users] == [aten.view.default]
    assert_equivalent(graph, result.graph, (x,))


def test_a_copy_kept_for_a_view_goes_once_the_view_does():
    """clone then a same-shape view: the copy is declined while the view reads it, and retried after."""
    model = Sequence_([Redundant("clone", 4), Redundant("same-view", 4)]).eval()
    x = torch.randn(2, 3, 4)
    result = fxopt.Pipeline("cleanup", debug=True)(fxopt.capture(model, (x,)))
    assert count(result.graph, aten.clone.default) == 0
    assert_equivalent(model, result.graph, (x,))
