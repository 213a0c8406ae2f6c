"""Pass infrastructure: registry, spec parsing, error context, verifier, no mutation of the input."""
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import pytest
import torch
import torch.nn as nn

import fxopt
from fxopt import Pass, PassResult, Pipeline, register_pass
from fxopt.errors import MetadataError, PassError
from fxopt.passes.infra.registry import registered_passes
from tests.harness import fingerprint

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class ScaleOutputs(Pass):
    """Test pass with options of every kind; multiplies relu outputs by ``factor``."""

    name = "test-scale-outputs"
    factor: float = 1.0
    repeat: int = 1
    enabled: bool = True
    mode: Literal["mul", "add"] = "mul"
    tags: Tuple[str, ...] = ()
    note: Optional[str] = None

    def __post_init__(self):
        if self.repeat <= 0:
            raise self.error(f"repeat={self.repeat} must be > 0", hint="use repeat=1 or more")

    def run(self, graph):
        return PassResult(graph, False, {"factor": self.factor, "repeat": self.repeat, "mode": self.mode})


@register_pass
@dataclass(frozen=True)
class BreakGraph(Pass):
    """Test pass that edits a node by hand without updating metadata (and the weights, if asked), then fails if
    asked to."""

    name = "test-break-graph"
    crash: bool = False
    edit_weights: bool = False

    def run(self, graph):
        relu = next(graph.call_nodes(aten.relu.default))
        relu.target = aten.sum.default  # output shape changes; recorded TensorInfo is now stale
        if self.edit_weights:
            weight = next(n for n in graph.nodes if n.op == "get_attr")
            graph.replace_param(weight, torch.zeros_like(graph.param(weight)))
            graph.add_param("extra", torch.ones(3))
        if self.crash:
            raise RuntimeError("boom")
        return PassResult(graph, True, {})


def relu_graph():
    return fxopt.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),))


def test_spec_parses_options_by_type():
    pipeline = Pipeline("test-scale-outputs{factor=2.5,repeat=3,enabled=false,mode=add,tags=a;b,note=none}")
    (p,) = pipeline.passes
    assert (p.factor, p.repeat, p.enabled, p.mode, p.tags, p.note) == (2.5, 3, False, "add", ("a", "b"), None)
    assert Pipeline(pipeline.spec).passes == pipeline.passes  # specs round-trip


def test_preset_expands_and_lists_are_accepted():
    pipeline = Pipeline(["cleanup", ScaleOutputs(factor=2.0)])
    assert [p.name for p in pipeline.passes] == [
        "remove-noop", "fold-constants", "eliminate-common-subexpressions", "eliminate-dead-code",
        "test-scale-outputs"]


def test_unknown_pass_lists_valid_names():
    with pytest.raises(PassError, match=r"unknown pass 'remove-nop'; did you mean 'remove-noop'\?.*valid passes:.*"
                                        r"eliminate-dead-code.*fold-constants"):
        Pipeline("remove-nop")


def test_unknown_option_lists_valid_options():
    with pytest.raises(PassError, match=r"test-scale-outputs: unknown option 'factr'; did you mean 'factor'.*repeat"):
        Pipeline("test-scale-outputs{factr=2}")


@pytest.mark.parametrize("spec, message", [
    ("test-scale-outputs{repeat=two}", "repeat='two' is not an integer"),
    ("test-scale-outputs{enabled=maybe}", "enabled='maybe' is not a boolean"),
    ("test-scale-outputs{mode=div}", "mode='div' is not one of mul, add"),
    ("test-scale-outputs{repeat=0}", r"test-scale-outputs: repeat=0 must be > 0; use repeat=1"),
    ("test-scale-outputs{factor}", "is not key=value"),
    ("cleanup{x=1}", "preset 'cleanup' takes no options"),
    ("", "empty"),
    ("remove-noop,,", "cannot parse"),
])
def test_bad_specs_get_clear_errors(spec, message):
    with pytest.raises(PassError, match=message):
        Pipeline(spec)


def test_errors_name_the_pass_and_what_ran_before():
    with pytest.raises(PassError, match=r"step 3/3 'test-break-graph\{crash=true\}' failed \(passes run before it: "
                                        r"remove-noop, eliminate-dead-code\): boom"):
        Pipeline("remove-noop,eliminate-dead-code,test-break-graph{crash=true}")(relu_graph())


def test_verifier_catches_stale_metadata_in_debug_mode():
    graph = relu_graph()
    with pytest.raises(MetadataError, match=r"test-break-graph.*%relu \(aten.sum.default\): recorded TensorInfo"):
        Pipeline("test-break-graph", debug=True)(graph)
    Pipeline("test-break-graph", debug=False)(graph)  # without debug the verifier does not run


@pytest.mark.parametrize("spec", ["test-break-graph{crash=true}", "test-break-graph{crash=true,edit-weights=true}",
                                  "remove-noop,test-break-graph{crash=true,edit-weights=true}"])
def test_failing_pass_leaves_input_graph_unchanged(spec):
    graph = relu_graph()
    x = torch.randn(2, 4)
    code, listing, weights, output = graph.module.code, graph.format(), fingerprint(graph.module), graph(x)
    with pytest.raises(PassError, match="boom"):
        Pipeline(spec)(graph)
    assert graph.module.code == code and graph.format() == listing
    assert fingerprint(graph.module) == weights
    assert torch.equal(graph(x), output)
    graph.verify()


def test_dump_hook_sees_every_pass():
    seen = []
    Pipeline("cleanup", dump=lambda name, g: seen.append((name, len(g))))(relu_graph())
    assert [name for name, _ in seen] == [
        "remove-noop", "fold-constants", "eliminate-common-subexpressions", "eliminate-dead-code"]


def test_register_pass_refuses_bad_classes():
    class NotAPass:
        name = "x"

    with pytest.raises(PassError, match="not a subclass of fxopt.Pass"):
        register_pass(NotAPass)

    @dataclass(frozen=True)
    class BadName(Pass):
        name = "Bad_Name"

    with pytest.raises(PassError, match="must be dash-case"):
        register_pass(BadName)

    @dataclass(frozen=True)
    class Taken(Pass):
        name = "remove-noop"

    with pytest.raises(PassError, match="already taken"):
        register_pass(Taken)


def test_registry_lists_the_cleanup_passes_with_summaries():
    passes = registered_passes()
    for name in ("remove-noop", "fold-constants", "eliminate-common-subexpressions", "eliminate-dead-code"):
        assert passes[name].summary
