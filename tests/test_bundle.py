"""The search in two steps: fxopt.search_bundle (build every candidate), fxopt.pick (measure, choose, save).

On the eager target everything runs here, so pick is exercised for real; the choice rule itself is checked with
the latency measurement replaced (fxopt.search.compare_latency), where the test sets which candidate is fastest.
The cuda bundle (TVM + nvcc builds, no GPU) is in tests/backends/test_cuda_search.py.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import fxopt
import fxopt.search
from fxopt.bundle import read_bundle
from fxopt.cli import main
from fxopt.errors import ArtifactError, InputError
from fxopt.search import Candidate, measure_against, parse_tolerance

from tests.test_search import batches, mlp


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    data = batches(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = fxopt.search_bundle(mlp(), data[0], tmp_path_factory.mktemp("bundle") / "b", target="eager",
                                   tolerance={"cosine": 0.99}, calibration_data=data, progress=False)
    return path, data


def test_the_bundle_manifest_lists_candidates_data_and_every_file(bundle):
    path, data = bundle
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["format"] == "fxopt.search_bundle/1" and meta["target"] == "eager"
    assert meta["tolerance"] == {"cosine": 0.99} and meta["baseline"] == "original"
    assert [c["name"] for c in meta["candidates"]] == ["float", "low-rank 0.75", "low-rank 0.5"]
    assert [c["compressed"] for c in meta["candidates"]] == [False, True, True]
    assert meta["original"]["target"] == "eager"  # eager's speedups are against the original, timed at pick
    assert meta["fidelity_batches"] == {"fit": 6, "held_out": 2}
    assert meta["data"] == {"inputs": 1, "batches": 2, "batch_inputs": 1, "outputs": 1}
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"bundle.json"}
    assert set(meta["files"]) == on_disk
    # the float candidate, the original and the low-rank ones' untouched layers share tensors: stored once
    shards = {shard for c in meta["candidates"] + [meta["original"]] for _, _, shard in c["pack"]["weights"]}
    assert len(shards) < 4
    # the stored reference is the original model's output on the held-out batches (the last quarter)
    from safetensors.torch import load_file
    stored = load_file(str(path / "data.safetensors"))
    with torch.no_grad():
        assert torch.equal(stored["batch.1.0"], data[7][0])
        torch.testing.assert_close(stored["reference.1.0"], mlp()(data[7][0]))


def test_pick_measures_saves_and_the_winner_loads(bundle, tmp_path, capsys):
    path, data = bundle
    chosen = fxopt.pick(path, tolerance={"max_rel_err": 10.0}, out=tmp_path / "chosen")
    printed = capsys.readouterr().out
    assert "fxopt pick (eager, tolerance max_rel_err <= 10)" in printed and "  original" in printed
    search = chosen.report()["search"]
    rows = {c["name"]: c for c in search["candidates"]}
    assert all(c["meets"] for c in rows.values())  # so the fastest measured wins
    assert search["chosen"] == min(rows, key=lambda name: rows[name]["latency_ms"])
    assert f"* {search['chosen']}" in printed
    loaded = fxopt.load(tmp_path / "chosen")
    torch.testing.assert_close(loaded(*data[0]), chosen(*data[0]))
    saved = json.loads((tmp_path / "chosen" / "manifest.json").read_text())["extra"]["report"]
    assert saved["search"]["chosen"] == search["chosen"] and saved["tolerance"] == {"max_rel_err": 10.0}


def _fake_latency(milliseconds):
    """compare_latency replaced: the given median per candidate name (the original 1 ms)."""
    def compare_latency(candidates, inputs, repeats=10, warmup=2, progress=False):
        return {name: milliseconds.get(name, 1.0) / 1e3 for name in candidates}
    return compare_latency


def test_pick_chooses_the_fastest_that_meets_and_excludes_a_faster_one_that_fails(bundle, monkeypatch):
    path, _ = bundle
    cosine = {c["name"]: c["fidelity"]["cosine"]
              for c in fxopt.pick(path, progress=False, tolerance={"cosine": -1.0}).report()["candidates"]}
    assert cosine["low-rank 0.5"] < cosine["low-rank 0.75"] < cosine["float"]
    bound = (cosine["low-rank 0.5"] + cosine["low-rank 0.75"]) / 2  # 0.75 meets it, 0.5 does not
    monkeypatch.setattr(fxopt.search, "compare_latency",
                        _fake_latency({"low-rank 0.5": 0.1, "low-rank 0.75": 0.2, "float": 0.3}))
    report = fxopt.pick(path, tolerance={"cosine": bound}, progress=False).report()
    rows = {c["name"]: c for c in report["candidates"]}
    assert report["search"]["chosen"] == "low-rank 0.75"
    assert not rows["low-rank 0.5"]["meets"] and not rows["low-rank 0.5"]["chosen"]
    assert rows["float"]["meets"] and rows["low-rank 0.5"]["latency_ms"] == pytest.approx(0.1)
    # the same bundle and tolerance with float measured fastest: the choice follows the measurement
    monkeypatch.setattr(fxopt.search, "compare_latency",
                        _fake_latency({"low-rank 0.5": 0.1, "low-rank 0.75": 0.3, "float": 0.2}))
    assert fxopt.pick(path, tolerance={"cosine": bound}, progress=False).report()["search"]["chosen"] == "float"


def test_a_candidate_baseline_replaces_the_original_row():
    graph = fxopt.capture(mlp(), batches(1)[0])
    data = batches(2)
    reference = [[graph.run(*b)] for b in data]
    candidates = [Candidate(name, "p", graph, graph.run, "eager", compressed=False) for name in ("fp16", "fp8")]
    import unittest.mock as mock
    with mock.patch.object(fxopt.search, "compare_latency", _fake_latency({"fp16": 0.4, "fp8": 0.2})):
        found = measure_against(candidates, reference, data, data[0], parse_tolerance({"cosine": 0.999}),
                                baseline="fp16")
    assert found.chosen.name == "fp8" and found.original_latency_ms is None
    assert found.candidates[1].speedup == pytest.approx(2.0)
    assert "speedup vs fp16" in found.table() and "original" not in found.table()


def test_no_candidate_within_the_tolerance_at_pick_is_a_clear_error(bundle):
    # a metric of the caller's (not storable in a bundle: given at pick) that every candidate fails
    with pytest.raises(InputError, match=r"search: no candidate meets tolerance metric <= 0.5.*float: 1"):
        fxopt.pick(bundle[0], tolerance=0.5, metric=lambda reference, outputs: 1.0, progress=False)


def test_a_damaged_or_foreign_bundle_is_refused(bundle, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(bundle[0], copy)
    shard = next((copy / "candidates" / "weights").iterdir())
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match=r"weights/.*sha256 does not match bundle.json"):
        fxopt.pick(copy, progress=False)
    with pytest.raises(ArtifactError, match="bundle.json: missing; .* is not a search bundle"):
        fxopt.pick(tmp_path, progress=False)
    meta = json.loads((bundle[0] / "bundle.json").read_text())
    shutil.rmtree(copy)
    shutil.copytree(bundle[0], copy)
    (copy / "bundle.json").write_text(json.dumps({**meta, "torch_version": "1.0.0"}))
    with pytest.raises(ArtifactError, match=r"built with torch 1.0.0, .* allow_torch_mismatch=True"):
        read_bundle(copy)
    assert read_bundle(copy, allow_torch_mismatch=True)["target"] == "eager"
    with pytest.raises(ArtifactError, match="exists and is not an fxopt search bundle"):
        fxopt.search_bundle(mlp(), batches(1)[0], shard.parent, target="eager", tolerance=0.1,
                            calibration_data=batches(2), progress=False)


def test_the_cli_builds_a_bundle_and_picks_from_it(tmp_path, capsys):
    out, chosen = tmp_path / "bundle", tmp_path / "chosen"
    assert main(["search-bundle", "tests.test_cli:factory_with_calibration", "--target", "eager",
                 "--tolerance", "cosine=0.999", "--out", str(out)]) == 0
    assert f"fxopt pick {out}" in capsys.readouterr().out
    assert main(["pick", str(out), "--tolerance", "max_rel_err=1e-5", "--out", str(chosen)]) == 0
    printed = capsys.readouterr().out
    assert "fxopt pick (eager, tolerance max_rel_err <= 1e-05)" in printed and f"saved {chosen}: float" in printed
    assert main(["pick", str(tmp_path), "--out", str(chosen)]) == 2
    assert "fxopt pick: " in capsys.readouterr().err


# ---------------------------------------- a target whose speedups are against a candidate, as cuda's are
class ToyDeviceTarget(__import__("tests.test_targets", fromlist=["ToyTarget"]).ToyTarget):
    """The toy target, timed like cuda: against its float candidate, on inputs it places itself, 3 rounds."""

    name = "toy-device"
    search_baseline = "float"
    search_rounds = 3
    placed = []

    def timing_inputs(self, inputs):
        self.placed.append(len(inputs))
        return tuple(x.clone() for x in inputs)


@pytest.fixture
def toy_device():
    from fxopt.targets.registry import _TARGETS
    fxopt.register_target(ToyDeviceTarget)
    yield ToyDeviceTarget
    _TARGETS.pop(ToyDeviceTarget.name)


def test_a_candidate_baseline_holds_in_one_step_and_in_two(toy_device, tmp_path, capsys):
    data = batches(8)
    ToyDeviceTarget.placed.clear()
    optimized = fxopt.optimize(mlp(), data[0], target="toy-device", calibration_data=data,
                               tolerance={"cosine": 0.99})
    printed = capsys.readouterr().out
    report = optimized.report()
    assert report["original_latency_ms"] is None and report["search"]["baseline"] == "float"
    assert "speedup vs float" in printed and "  original" not in printed
    assert next(c for c in report["candidates"] if c["name"] == "float")["speedup"] == 1.0
    assert ToyDeviceTarget.placed == [1]
    # two steps: no original in the bundle; pick times the same way
    path = fxopt.search_bundle(mlp(), data[0], tmp_path / "b", target="toy-device", tolerance={"cosine": 0.99},
                               calibration_data=data, progress=False)
    assert json.loads((path / "bundle.json").read_text())["original"] is None
    picked = fxopt.pick(path, out=tmp_path / "chosen")
    assert "speedup vs float" in capsys.readouterr().out and ToyDeviceTarget.placed == [1, 1]
    rows = picked.report()["candidates"]
    assert picked.report()["search"]["chosen"] == min((c for c in rows if c["meets"]),
                                                      key=lambda c: c["latency_ms"])["name"]
    assert fxopt.load(tmp_path / "chosen").runner.note == "hello"  # the toy's own file travelled
