"""The rewrite engine: both pattern styles, engine rules, statistics and errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given

import fxopt
from fxopt import ExamplePattern, Op, OpPattern, Var, apply_patterns
from fxopt.errors import PatternError
from tests.harness import assert_equivalent, count, examples, token_model_cases

aten = torch.ops.aten


def linear_relu_pattern(x, w, b):
    return torch.relu(F.linear(x, w, b))


def linear_relu_replacement(x, w, b):
    return torch.clamp_min(F.linear(x, w, b), 0.0)


def example_linear_relu(**kw):
    shapes = (torch.randn(2, 4), torch.randn(3, 4), torch.randn(3))
    return ExamplePattern(linear_relu_pattern, linear_relu_replacement, shapes, **kw)


def linear_relu_rewrite(rw, x, w, b):
    return rw.call(aten.clamp_min.default, rw.call(aten.linear.default, x, w, b), 0.0)


def declarative_linear_relu():
    return OpPattern(Op(aten.relu.default, Op(aten.linear.default, Var("x"), Var("w"), Var("b"))),
                     linear_relu_rewrite)


@pytest.fixture(scope="module")
def both_styles():
    """Built once: the by-example pattern traces two functions through torch.export, about as long as the
    rest of an example takes."""
    return example_linear_relu(), declarative_linear_relu()


@examples(100)
@given(case=token_model_cases())
def test_both_styles_rewrite_every_linear_relu_and_keep_outputs(both_styles, case):
    graph = fxopt.capture(case.model, case.inputs)
    expected = case.counts["linear-relu"]
    for pattern in both_styles:
        rewritten = graph.copy()
        stats = apply_patterns(rewritten, [pattern])
        rewritten.recompile()
        rewritten.verify()
        assert stats.applied.get(pattern.name, 0) == expected, graph.format()
        assert count(rewritten, aten.clamp_min.default) == expected
        assert count(rewritten, aten.relu.default) == count(graph, aten.relu.default) - expected
        assert_equivalent(graph, rewritten, case.inputs)


@pytest.mark.slow
@examples(500)
@given(case=token_model_cases())
def test_both_styles_long_fuzz(both_styles, case):
    test_both_styles_rewrite_every_linear_relu_and_keep_outputs.hypothesis.inner_test(both_styles, case)


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        shared = self.a(x)  # the linear has a second user: the pattern must not swallow it
        return torch.relu(shared) + shared, torch.relu(self.b(x))


@pytest.mark.parametrize("make", [example_linear_relu, declarative_linear_relu])
def test_linear_with_other_users_does_not_match(make):
    graph = fxopt.capture(TwoBranches(), (torch.randn(2, 4),))
    stats = apply_patterns(graph, [make()])
    assert sum(stats.applied.values()) == 1  # only branch b


def test_check_can_veto_a_by_example_match():
    graph = fxopt.capture(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 4), nn.ReLU()), (torch.randn(2, 4),))
    only_wide = example_linear_relu(check=lambda m: m.captures["w"].meta["fxopt_info"].shape[0] == 4)
    stats = apply_patterns(graph, [only_wide])
    assert dict(stats.applied) == {"linear_relu": 1}


def test_matching_never_mutates():
    graph = fxopt.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    before = graph.module.code
    names = [n.name for n in graph.nodes]
    for pattern in (example_linear_relu(), declarative_linear_relu()):
        matches = list(pattern.matches(graph.fx_graph))
        assert len(matches) == 1 and matches[0].root.target == aten.relu.default
    assert graph.module.code == before and [n.name for n in graph.nodes] == names


def test_declined_rewrite_changes_nothing_and_is_counted():
    graph = fxopt.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    before = graph.module.code
    never = OpPattern(Op(aten.relu.default, Var("x")), lambda rw, x: None, name="never")
    stats = apply_patterns(graph, [never])
    assert dict(stats.applied) == {} and dict(stats.declined) == {"never": 1}
    graph.recompile()
    assert graph.module.code == before


def test_same_capture_name_must_bind_the_same_node():
    class AddSelf(nn.Module):
        def forward(self, x, y):
            return x + x, x + y

    graph = fxopt.capture(AddSelf(), (torch.randn(3), torch.randn(3)))
    double = OpPattern(Op(aten.add.Tensor, Var("a"), Var("a")), lambda rw, a: rw.call(aten.mul.Tensor, a, 2.0),
                       name="double")
    reference = graph.copy()
    stats = apply_patterns(graph, [double])
    graph.recompile()
    assert dict(stats.applied) == {"double": 1}
    assert count(graph, aten.add.Tensor) == 1 and count(graph, aten.mul.Tensor) == 1
    assert_equivalent(reference, graph, (torch.randn(3), torch.randn(3)))


def test_rewriter_carries_stack_trace():
    graph = fxopt.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))
    relu_trace = next(graph.call_nodes(aten.relu.default)).meta["stack_trace"]
    apply_patterns(graph, [declarative_linear_relu()])
    clamp = next(graph.call_nodes(aten.clamp_min.default))
    assert clamp.meta["stack_trace"] == relu_trace and "activation.py" in relu_trace


def test_non_converging_patterns_raise_naming_both():
    to_clamp = OpPattern(Op(aten.relu.default, Var("x")), lambda rw, x: rw.call(aten.clamp_min.default, x, 0.0),
                         name="relu-to-clamp")
    to_relu = OpPattern(Op(aten.clamp_min.default, Var("x"), 0.0), lambda rw, x: rw.call(aten.relu.default, x),
                        name="clamp-to-relu")
    graph = fxopt.capture(nn.ReLU(), (torch.randn(3),))
    with pytest.raises(PatternError, match=r"did not converge after 10 iterations.*relu-to-clamp.*clamp-to-relu"):
        apply_patterns(graph, [to_clamp, to_relu], max_iterations=10)


def test_replacement_with_another_signature_is_refused():
    def two_outputs(x, w, b):
        y = F.linear(x, w, b)
        return y, y

    shapes = (torch.randn(2, 4), torch.randn(3, 4), torch.randn(3))
    with pytest.raises(PatternError, match="replacement returns 2 values but the pattern returns 1"):
        ExamplePattern(linear_relu_pattern, two_outputs, shapes)


def test_rewrite_that_changes_shape_is_refused():
    graph = fxopt.capture(nn.ReLU(), (torch.randn(2, 3),))
    bad = OpPattern(Op(aten.relu.default, Var("x")), lambda rw, x: rw.call(aten.sum.dim_IntList, x, [0]), name="bad")
    with pytest.raises(PatternError, match="changes the value's shape or dtype"):
        apply_patterns(graph, [bad])


def test_example_pattern_needs_one_example_per_argument():
    with pytest.raises(PatternError, match="takes 3 arguments but 1 example"):
        ExamplePattern(linear_relu_pattern, linear_relu_replacement, (torch.randn(2, 4),))


def test_declarative_literal_must_match_exactly():
    graph = fxopt.capture(nn.Sequential(nn.Dropout(0.5)), (torch.randn(3),), eval_mode=False)
    eval_only = OpPattern(Op(aten.dropout.default, Var("x"), Var("p"), False), lambda rw, x, p: x, name="eval")
    assert list(eval_only.matches(graph.fx_graph)) == []


def sin_exp_rewrite(rw, x, s):  # the factors swapped, so the pattern does not match its own result
    fresh = rw.call(aten.sin.default, x)
    return rw.call(aten.mul.Tensor, rw.call(aten.exp.default, fresh), fresh)


def test_pattern_naming_one_op_twice_erases_it_once():
    import warnings

    class SinTimesExpSin(nn.Module):
        def forward(self, x):
            s = torch.sin(x)
            return s * torch.exp(s)

    graph = fxopt.capture(SinTimesExpSin(), (torch.randn(3),))
    reference = graph.copy()
    shared = Op(aten.sin.default, Var("x"), name="s", multi_use=True)  # a DAG: both factors read one sin
    dag = OpPattern(Op(aten.mul.Tensor, shared, Op(aten.exp.default, shared)), sin_exp_rewrite, name="dag")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fx warns when a node is erased twice
        stats = apply_patterns(graph, [dag])
    graph.recompile()
    assert dict(stats.applied) == {"dag": 1} and count(graph, aten.sin.default) == 1
    assert_equivalent(reference, graph, (torch.randn(3),))
