"""The Target interface: a target defined here gets optimize, the search, save/load and the report unchanged;
api.py knows no target by name; presets mean something per target; OptimizedModel is an nn.Module that
returns the model's own output type."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import InputError
from fxopt.targets import Preset, Target, register_target
from fxopt.targets.registry import _TARGETS
from tests.models import tiny_bert

API = Path(fxopt.__file__).with_name("api.py")


# --------------------------------------------------------------- a toy target, in 40 lines or fewer
TOY_START = "# toy target start"
# toy target start
LOWERED = []


class ToyRunner:
    """Runs the graph in PyTorch, counts its calls, and saves a note that its loader checks."""

    def __init__(self, graph, note: str):
        self.graph, self.note, self.calls = graph, note, 0

    def __call__(self, *inputs):
        self.calls += 1
        return self.graph.module(*inputs)

    def files(self):
        return {"toy.json": json.dumps({"note": self.note}).encode()}


class ToyTarget(Target):
    name = "toy"
    presets = {"fast": Preset("cleanup", "cleanup only"), "small": Preset("cleanup,half-weights", "fp16 weights")}
    options = {"note": ("hello", "bonjour")}

    def lower(self, graph, example_inputs=(), progress=False, built_with=None):
        LOWERED.append(graph)
        graph.recompile()
        return ToyRunner(graph, self.settings["note"])

    def load(self, graph, directory, manifest):
        note = json.loads((Path(directory) / "toy.json").read_text())["note"]
        return ToyRunner(graph, note)
# toy target end


@pytest.fixture
def toy():
    register_target(ToyTarget)
    yield ToyTarget
    _TARGETS.pop("toy")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def test_the_toy_target_is_at_most_40_lines():
    source = Path(__file__).read_text()
    lines = source[source.index(TOY_START):source.index("# toy target end")].splitlines()
    assert len(lines) - 1 <= 40


def test_a_toy_target_gets_optimize_save_load_and_the_report(toy, tmp_path):
    model, x = mlp(), torch.randn(4, 16)
    optimized = fxopt.optimize(model, (x,), target="toy", options={"note": "bonjour"}, progress=False)
    assert isinstance(optimized, nn.Module) and optimized.target == "toy"
    torch.testing.assert_close(optimized(x), model(x))
    report = optimized.report()
    assert report["target"] == "toy" and report["pipeline"] == fxopt.Pipeline("cleanup").spec
    assert report["latency_ms"] > 0 and report["per_layer_error"]
    loaded = fxopt.load(optimized.save(tmp_path / "toy"))
    assert loaded.target == "toy" and loaded.runner.note == "bonjour"  # its own file came back
    torch.testing.assert_close(loaded(x), model(x))


def test_a_toy_target_gets_the_search_and_the_returned_runner_is_the_one_timed(toy):
    model, x = mlp(), torch.randn(4, 16)
    LOWERED.clear()
    data = [(torch.randn(4, 16),) for _ in range(8)]
    optimized = fxopt.optimize(model, (x,), target="toy", calibration_data=data, tolerance={"cosine": 0.999},
                               progress=False)
    candidates = optimized.report()["candidates"]
    assert [c["name"] for c in candidates][:1] == ["float"] and {c["target"] for c in candidates} == {"toy"}
    assert optimized.report()["search"]["chosen"] in {c["name"] for c in candidates if c["meets"]}
    assert optimized.target == "toy"
    # each candidate lowered once, and the winner returned as the search timed it (10 rounds), not lowered again
    assert len(LOWERED) == len(candidates) and optimized.runner.calls >= 10
    chosen = next(c for c in candidates if c["chosen"])
    assert optimized.report()["latency_ms"] == chosen["latency_ms"]


def test_toy_presets_and_options_are_validated_with_the_valid_values(toy):
    model, x = mlp(), torch.randn(4, 16)
    with pytest.raises(InputError, match=r"unknown preset 'balanced' for target 'toy'.*fast, small"):
        fxopt.optimize(model, (x,), target="toy", preset="balanced", progress=False)
    with pytest.raises(InputError, match=r"target 'toy': unknown option 'colour'; its options: note"):
        fxopt.optimize(model, (x,), target="toy", options={"colour": "red"}, progress=False)
    with pytest.raises(InputError, match=r"note='hola' is not valid; use one of 'hello', 'bonjour'"):
        fxopt.optimize(model, (x,), target="toy", options={"note": "hola"}, progress=False)
    small = fxopt.optimize(model, (x,), target="toy", preset="small", progress=False)
    fast = fxopt.optimize(model, (x,), target="toy", preset="fast", progress=False)
    assert small.report()["size_bytes"] < 0.6 * fast.report()["size_bytes"]


def test_registering_a_second_target_under_a_taken_name_fails(toy):
    class Impostor(ToyTarget):
        pass

    with pytest.raises(InputError, match="a target named 'toy' exists"):
        register_target(Impostor)


def test_api_has_no_branch_on_a_target_name():
    """No comparison in api.py involves a target's name, and api.py imports no target's backend."""
    tree = ast.parse(API.read_text())
    names = set(fxopt.registered_targets())
    assert {"eager", "x86-int8", "cuda"} <= names
    compared = {c.value for node in ast.walk(tree) if isinstance(node, (ast.Compare, ast.match_case))
                for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert not compared & names, f"api.py branches on {compared & names}"
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    backends = {m for m in imported if m and m.startswith("fxopt.backends") and m != "fxopt.backends.artifact"}
    assert not backends, f"api.py imports target backends: {backends}"


# --------------------------------------------------------------- presets of the built-in targets
def test_eager_small_stores_half_the_matrix_weights_and_fast_is_exact():
    model, x = mlp(), torch.randn(4, 16)
    fast = fxopt.optimize(model, (x,), preset="fast", progress=False)
    small = fxopt.optimize(model, (x,), preset="small", progress=False)
    assert "half-weights" in small.pipeline and "half-weights" not in fast.pipeline
    assert small.report()["size_bytes"] < 0.6 * fast.report()["size_bytes"]
    torch.testing.assert_close(fast(x), model(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(small(x), model(x), rtol=1e-2, atol=1e-2)


def test_x86_fast_quantizes_every_linear_where_balanced_keeps_the_sensitive_ones_without_vnni(monkeypatch):
    monkeypatch.setenv("FXOPT_X86_ISA", "avx2")  # no VNNI: balanced keeps the most sensitive quarter float
    model, x = mlp(), torch.randn(4, 16)
    data = [(torch.randn(4, 16),) for _ in range(4)]
    kwargs = dict(target="x86-int8", calibration_data=data, progress=False, options={"compile": "never"})
    fast = fxopt.optimize(model, (x,), preset="fast", **kwargs)
    balanced = fxopt.optimize(model, (x,), preset="balanced", **kwargs)
    assert "weight-only" not in fast.pipeline and "skip=" not in fast.pipeline
    assert "weight-only" in balanced.pipeline  # one of the two linears keeps float activations
    assert fast.report()["lowering"]["int8_linears"] == 2 and balanced.report()["lowering"]["int8_linears"] == 1


def test_cuda_has_one_preset_and_says_so():
    with pytest.raises(InputError, match=r"unknown preset 'small' for target 'cuda'; its presets: fast"):
        fxopt.optimize(mlp(), (torch.randn(4, 16),), target="cuda", preset="small", progress=False)


# --------------------------------------------------------------- OptimizedModel
class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 8)

    def forward(self, x):
        y = self.linear(x)
        return {"y": y, "pair": (y.relu(), y.sum(-1))}


@pytest.mark.parametrize("target,options", [("eager", None), ("x86-int8", {"compile": "never"})])
def test_forward_returns_the_models_own_output_structure(target, options):
    model, x = DictModel().eval(), torch.randn(4, 16)
    optimized = fxopt.optimize(model, (x,), target=target, options=options, progress=False,
                               calibration_data=[(x,)])
    with torch.no_grad():
        out, expected = optimized(x), model(x)["y"]
    assert isinstance(out, dict) and set(out) == {"y", "pair"} and isinstance(out["pair"], tuple)
    assert float((out["y"] - expected).norm() / expected.norm()) < 0.02  # int8: about 1%


def test_forward_returns_a_hugging_face_model_output():
    model, inputs = tiny_bert()
    expected = model(*inputs)
    optimized = fxopt.optimize(model, inputs, progress=False)
    out = optimized(*inputs)
    assert type(out) is type(expected)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    assert isinstance(optimized, nn.Module) and not optimized.training
