"""Artifacts: save/load round trips are bit-exact (generated models, tiny BERT, fused and quantized graphs,
dynamic shapes, a fresh process without the model class), and every kind of damage raises ArtifactError."""
from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from safetensors.torch import save_file
from torch.utils import _pytree as pytree

import fxopt
from fxopt.backends import artifact
from fxopt.backends.artifact import artifact_file, load_artifact, save_artifact
from fxopt.errors import ArtifactError
from fxopt.ir import meta as M
from fxopt.ir import serialize
from fxopt.ir.ops import fxopt_ops
from fxopt.ir.serialize import graph_from_json, graph_to_json
from tests import models
from tests.harness import count, model_cases

QD = torch.ops.quantized_decomposed


def assert_bit_identical(expected, actual):
    assert type(actual) is type(expected)
    want, got = pytree.tree_leaves(expected), pytree.tree_leaves(actual)
    assert len(want) == len(got)
    for i, (a, b) in enumerate(zip(want, got)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"output {i}: {b.dtype}{list(b.shape)}"
        same_nans = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert torch.equal(a, b) or same_nans, f"output {i} differs"


def round_trip(graph, tmp_path, **save_options):
    save_artifact(graph, tmp_path / "model", target="eager", **save_options)
    loaded, manifest = load_artifact(tmp_path / "model")
    loaded.verify()
    return loaded, manifest


def assert_round_trip(graph, inputs, tmp_path):
    loaded, manifest = round_trip(graph, tmp_path)
    assert_bit_identical(graph.run(*inputs), loaded.run(*inputs))
    assert [n.name for n in loaded.nodes] == [n.name for n in graph.nodes]
    assert loaded.input_specs == graph.input_specs
    return loaded, manifest


# ------------------------------------------------------------ round trips
@given(case=model_cases())
def test_generated_models_round_trip_bit_exactly(case, tmp_path_factory):
    graph = fxopt.capture(case.model, case.inputs)
    loaded, _ = assert_round_trip(graph, case.inputs, tmp_path_factory.mktemp("artifact"))
    assert {k: (v.dtype, v.shape) for k, v in loaded.params().items()} == \
        {k: (v.dtype, v.shape) for k, v in graph.params().items()}


@functools.lru_cache(maxsize=None)
def tiny_bert_graph():
    model, inputs = models.tiny_bert()
    return fxopt.capture(model, inputs), inputs


def test_tiny_bert_round_trips_with_its_model_output_and_weight_kinds(tmp_path):
    graph, inputs = tiny_bert_graph()
    loaded, manifest = assert_round_trip(graph, inputs, tmp_path)
    assert set(loaded.run(*inputs).keys()) == {"last_hidden_state", "pooler_output"}
    for names in (lambda m: m.named_parameters(), lambda m: m.named_buffers()):
        assert {n for n, _ in names(loaded.module)} == {n for n, _ in names(graph.module)}
    assert [s["name"] for s in manifest["input_specs"]] == ["input_ids", "attention_mask"]
    assert "BaseModelOutputWithPoolingAndCrossAttentions" in manifest["output_spec"]


def test_fused_tiny_bert_round_trips(tmp_path):
    graph, inputs = tiny_bert_graph()
    fused = fxopt.Pipeline("fuse")(graph).graph
    assert count(fused, fxopt_ops().linear_act.default) > 0
    loaded, _ = assert_round_trip(fused, inputs, tmp_path)
    assert count(loaded, fxopt_ops().linear_act.default) == count(fused, fxopt_ops().linear_act.default)
    assert count(loaded, torch.ops.aten.scaled_dot_product_attention.default) > 0


def test_fused_resnet_round_trips(tmp_path):
    model, inputs = models.conv_bn_resnet()
    fused = fxopt.Pipeline("fuse")(fxopt.capture(model, inputs)).graph
    loaded, _ = assert_round_trip(fused, inputs, tmp_path)
    assert count(loaded, fxopt_ops().conv_act.default) == count(fused, fxopt_ops().conv_act.default) > 0


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_statically_quantized_graph_round_trips_with_its_qparams(tmp_path):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    graph = fxopt.calibrate(fxopt.capture(TinyMLP().eval(), (x,)), [(x,)], progress=False)
    quantized = fxopt.Pipeline("insert-qdq{scheme=static}")(graph).graph
    assert count(quantized, QD.quantize_per_tensor.default) > 0
    loaded, _ = assert_round_trip(quantized, (x,), tmp_path)
    per_tensor = 0
    for before, after in zip(quantized.nodes, loaded.nodes):
        if M.QPARAMS_KEY in before.meta and M.qparams(before).axis is not None:
            # per-channel QParams are not saved: their scales are weights of the graph already
            assert M.QPARAMS_KEY not in after.meta
        elif M.QPARAMS_KEY in before.meta:
            per_tensor += 1
            q, r = M.qparams(before), M.qparams(after)
            assert torch.equal(q.scale, r.scale) and torch.equal(q.zero_point, r.zero_point)
            assert (q.qdtype, q.scheme, q.axis, q.group_size) == (r.qdtype, r.scheme, r.axis, r.group_size)
    assert per_tensor > 0


def test_dynamic_batch_round_trips_and_runs_other_sizes(tmp_path):
    x = torch.randn(3, 8)
    graph = fxopt.capture(TinyMLP().eval(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    loaded, manifest = assert_round_trip(graph, (x,), tmp_path)
    assert manifest["input_specs"] == [{"name": "x", "shape": [None, 8], "dtype": "float32",
                                        "ranges": [["batch", 0, None], None]}]
    assert loaded.input_specs == graph.input_specs  # the range (unbounded above) survives the round trip
    bigger = torch.randn(7, 8)
    assert torch.equal(loaded.run(bigger), graph.run(bigger))


class TiedAndViews(nn.Module):
    """A tied weight, a transposed (non-contiguous) buffer and two buffers that slice one storage."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 6, bias=False), nn.Linear(6, 6, bias=False)
        self.b.weight = self.a.weight
        base = torch.randn(12)
        self.register_buffer("head", base[:6])
        self.register_buffer("tail", base[6:])
        self.register_buffer("wt", torch.randn(6, 6).t())

    def forward(self, x):
        return self.b(self.a(x)) + self.head - self.tail + x @ self.wt


def test_shared_and_non_contiguous_weights_are_stored_once_and_round_trip(tmp_path):
    x = torch.randn(2, 6)
    graph = fxopt.capture(TiedAndViews().eval(), (x,))
    tensors, aliases = artifact._weights_to_store(graph.params())
    assert all(t.is_contiguous() for t in tensors.values())
    assert len(tensors) + len(aliases) == len(graph.params())
    loaded, _ = assert_round_trip(graph, (x,), tmp_path)
    assert loaded.size_bytes() == graph.size_bytes()


def test_backend_files_and_extra_are_listed_in_the_manifest(tmp_path):
    graph, inputs = tiny_bert_graph()
    source = tmp_path / "kernels.cu"
    source.write_text("// kernels")
    _, manifest = round_trip(graph, tmp_path, files={"lib.so": b"\x7fELF", "kernels.cu": source},
                             extra={"pipeline": "fuse"})
    directory = tmp_path / "model"
    assert manifest["extra"] == {"pipeline": "fuse"} and manifest["target"] == "eager"
    assert set(manifest["files"]) == {"graph.json", "weights.safetensors", "lib.so", "kernels.cu"}
    assert artifact_file(directory, "lib.so").read_bytes() == b"\x7fELF"
    with pytest.raises(ArtifactError, match="does not list 'missing.so'"):
        artifact_file(directory, "missing.so")


# --------------------------------------------------- the JSON value encoding
def test_argument_values_survive_strict_json():
    graph, _ = tiny_bert_graph()
    node = graph.nodes[-1]
    values = [None, True, 3, -2**70, 1.5, math.inf, -math.inf, "mean", (1, [2, 3]), [], torch.float16,
              torch.device("cpu"), torch.strided, torch.channels_last, slice(1, None, 2), Ellipsis]
    text = json.dumps([serialize._value_to_json(node, v) for v in values], allow_nan=False)
    decoded = [serialize._value_from_json(v, node.name, {}) for v in json.loads(text)]
    assert decoded == values
    nan = serialize._value_from_json(json.loads(json.dumps(serialize._value_to_json(node, math.nan))), "n", {})
    assert math.isnan(nan)


def test_an_unsupported_argument_names_the_node_and_type():
    graph = fxopt.capture(TinyMLP().eval(), (torch.randn(2, 8),)).copy()
    relu = next(graph.call_nodes(torch.ops.aten.relu.default))
    relu.args = (relu.args[0], object())
    with pytest.raises(ArtifactError, match=r"%relu .*argument of type object cannot be saved"):
        graph_to_json(graph)


def test_an_unregistered_output_type_loads_as_a_dict():
    graph, inputs = tiny_bert_graph()
    data = graph_to_json(graph)
    out_spec = data["codegen"]["out_spec"]
    data["codegen"]["out_spec"] = out_spec.replace(
        "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions", "mylib.Output")
    loaded = graph_from_json(data, graph.params())
    out, want = loaded.run(*inputs), graph.run(*inputs)
    assert type(out) is dict and list(out) == ["last_hidden_state", "pooler_output"]
    assert all(torch.equal(out[k], want[k]) for k in out)


# ----------------------------------------------------------- fresh process
class ModelOnlyInThisModule(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.proj = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)

    def forward(self, x, mask):
        y = self.norm(torch.nn.functional.gelu(self.proj(x)))
        return {"y": y.masked_fill(~mask[..., None], float("-inf")), "pooled": y.mean(dim=1)}


FRESH_PROCESS = textwrap.dedent("""
    import pickle, sys
    import torch
    def refuse(*args, **kwargs):
        raise AssertionError("an artifact load unpickled something")
    pickle.load = pickle.loads = torch.load = refuse
    from safetensors.torch import load_file
    from fxopt.backends.artifact import load_artifact
    graph, manifest = load_artifact(sys.argv[1])
    data = {k: v.clone() for k, v in load_file(sys.argv[2]).items()}  # aligned, as the inputs that made them
    out = graph.run(data["x"], data["mask"])
    assert type(out) is dict, type(out)
    for key in ("y", "pooled"):
        assert torch.equal(out[key], data[key]), key
    assert "tests" not in sys.modules
    print("ok", manifest["target"])
""")


def test_a_fresh_process_loads_and_runs_without_the_model_class(tmp_path):
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    graph = fxopt.capture(ModelOnlyInThisModule().eval(), (x, mask))
    save_artifact(graph, tmp_path / "model", target="eager")
    expected = graph.run(x, mask)
    save_file({"x": x, "mask": mask, **expected}, str(tmp_path / "expected.safetensors"))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "model"),
                           str(tmp_path / "expected.safetensors")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok eager"


FRESH_OPTIMIZED = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file
    import fxopt
    data = {k: v.clone() for k, v in load_file(sys.argv[2]).items()}  # aligned, as the inputs that made them
    loaded = fxopt.load(sys.argv[1])
    out = loaded(data["x"], data["mask"])
    for key in ("y", "pooled"):
        assert torch.equal(out[key], data[key]), (key, (out[key] - data[key]).abs().max())
    assert "tests" not in sys.modules
    print("ok", loaded.target)
""")


@pytest.mark.parametrize("target", ["eager", "x86-int8"])
def test_optimize_save_then_load_in_a_fresh_process_gives_the_same_outputs(tmp_path, target):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, generator=gen)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    calibration = [(torch.randn(2, 3, 5, generator=gen), mask) for _ in range(4)]
    optimized = fxopt.optimize(ModelOnlyInThisModule().eval(), (x, mask), target=target,
                               calibration_data=calibration if target == "x86-int8" else None, progress=False)
    expected = optimized(x, mask)
    report = optimized.report()  # timed against the original on the example inputs, as plain optimize() does
    assert report["latency_ms"] > 0 and report["original_latency_ms"] > 0 and report["latency_rounds"] == 5
    optimized.save(tmp_path / "model")
    save_file({"x": x, "mask": mask, **expected}, str(tmp_path / "expected.safetensors"))
    done = subprocess.run([sys.executable, "-c", FRESH_OPTIMIZED, str(tmp_path / "model"),
                           str(tmp_path / "expected.safetensors")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-2:] == ["ok", target]


# ------------------------------------------------------------------ damage
@pytest.fixture
def saved(tmp_path):
    graph = fxopt.capture(TinyMLP().eval(), (torch.randn(2, 8),))
    return save_artifact(graph, tmp_path / "model", target="eager")


def rewrite_manifest(directory, change):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_tampered_weight_byte_fails_the_checksum(saved):
    path = saved / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: sha256 checksum does not match"):
        load_artifact(saved)


def test_a_truncated_file_is_reported(saved):
    path = saved / "graph.json"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"graph\.json: 100 bytes, the manifest says \d+ \(truncated"):
        load_artifact(saved)


def test_a_deleted_file_is_reported(saved):
    (saved / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: missing"):
        load_artifact(saved)


def test_a_missing_manifest_is_reported(saved):
    (saved / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing; .* is not an fxopt artifact"):
        load_artifact(saved)


@pytest.mark.parametrize("package", ["torch", "fxopt"])
def test_another_major_minor_version_is_refused(saved, package):
    rewrite_manifest(saved, lambda m: m.update({f"{package}_version": "1.0.0"}))
    with pytest.raises(ArtifactError, match=rf"saved with {package} 1\.0\.0, this is {package} .*major\.minor version"):
        load_artifact(saved)


@pytest.mark.parametrize("bad_target", ["os::system", "os.system", "aten::linear", "builtins.eval"])
def test_an_unknown_op_in_graph_json_is_refused(saved, bad_target):
    path = saved / "graph.json"
    data = json.loads(path.read_text())
    next(n for n in data["nodes"] if n["op"] == "call_function")["target"] = bad_target
    path.write_text(json.dumps(data))
    rewrite_manifest(saved, lambda m: m["files"].update({"graph.json": artifact.file_record(path)}))
    with pytest.raises(ArtifactError, match=rf"unknown op '{bad_target}'"):
        load_artifact(saved)


def test_a_failed_save_leaves_the_old_artifact_and_no_temporary_files(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def broken_writer(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(artifact, "save_file", broken_writer)
    other = fxopt.capture(TinyMLP().eval(), (torch.randn(5, 8),))
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_artifact(other, saved, target="eager")
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == ["model"]
    monkeypatch.undo()
    load_artifact(saved)


def test_extra_that_is_not_json_is_refused_and_leaves_nothing_behind(tmp_path):
    graph = fxopt.capture(TinyMLP().eval(), (torch.randn(2, 8),))
    with pytest.raises(ArtifactError, match=r"manifest\.json: cannot be written as JSON.*`extra` must hold JSON"):
        save_artifact(graph, tmp_path / "model", target="eager", extra={"pipeline": object()})
    assert list(tmp_path.iterdir()) == []


def test_saving_again_replaces_the_artifact(saved):
    x = torch.randn(5, 8)
    other = fxopt.capture(TinyMLP().eval(), (x,))
    save_artifact(other, saved, target="x86-int8")
    loaded, manifest = load_artifact(saved)
    assert manifest["target"] == "x86-int8" and loaded.input_specs == other.input_specs
    assert [p.name for p in saved.parent.iterdir()] == ["model"]


def test_a_directory_that_is_not_an_artifact_is_never_replaced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    graph = fxopt.capture(TinyMLP().eval(), (torch.randn(2, 8),))
    with pytest.raises(ArtifactError, match="is not an fxopt artifact; save to a new or empty directory"):
        save_artifact(graph, tmp_path, target="eager")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_torch_version_mismatch_can_be_accepted_explicitly(saved):
    rewrite_manifest(saved, lambda m: m.update({"torch_version": "1.0.0"}))
    with pytest.warns(UserWarning, match=r"saved with torch 1\.0\.0.*allow_torch_mismatch=True"):
        graph, manifest = load_artifact(saved, allow_torch_mismatch=True)
    assert manifest["torch_version"] == "1.0.0" and len(graph) > 0
    rewrite_manifest(saved, lambda m: m.update({"fxopt_version": "0.0.1"}))
    with pytest.raises(ArtifactError, match="saved with fxopt 0.0.1"):  # only torch's check can be waived
        load_artifact(saved, allow_torch_mismatch=True)
