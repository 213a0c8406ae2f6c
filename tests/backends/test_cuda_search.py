"""The search on cuda: every precision built here (TVM + nvcc, no GPU) into a bundle; picked on the GPU machine.

Here: the candidates, the bundle's contents, and the refusals that name the two-step flow. On the GPU machine,
``test_pick_on_the_gpu_...`` picks from a bundle built here (``$FXOPT_SEARCH_BUNDLE``, e.g. the one
benchmarks/gpu_cuda_search.py describes):

    source .tvm/setup.sh && FXOPT_SEARCH_BUNDLE=build/cuda_search/bundle \\
        python3 -m pytest tests/backends/test_cuda_search.py -m gpu
"""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

import fxopt
from fxopt.backends.artifact_pack import unpack_artifact
from fxopt.errors import DeviceError

from tests.backends.test_cuda_low_precision import Qkv

pytest.importorskip("tvm")
HAS_GPU = torch.cuda.is_available()
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the CUDA extension")


@pytest.fixture(scope="module")
def cuda_bundle(tmp_path_factory):
    torch.manual_seed(0)
    data = [(torch.randn(4, 8, 32) * torch.logspace(-1, 1, 32),) for _ in range(4)]
    path = fxopt.search_bundle(Qkv().eval(), data[0], tmp_path_factory.mktemp("cuda") / "bundle", target="cuda",
                               tolerance={"cosine": 0.999}, calibration_data=data, progress=False)
    return path, data


@needs_nvcc
def test_the_cuda_bundle_holds_every_precision_built_once_with_the_shared_files_once(cuda_bundle, tmp_path):
    path, _ = cuda_bundle
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["target"] == "cuda" and meta["baseline"] == "fp16" and meta["original"] is None
    names = [c["name"] for c in meta["candidates"]]
    assert names == ["fp16", "fp8", "int8", "int4-weight"] == list(fxopt.targets.CudaTarget.options["precision"])
    pipelines = {c["name"]: c["pipeline"] for c in meta["candidates"]}
    # each precision as optimize builds it: keep_float="auto" may keep its most sensitive linears in float16
    assert pipelines["fp16"].endswith("fuse-attention")
    assert re.search(r",quantize-fp8(\{skip=[^}]*\})?$", pipelines["fp8"])
    assert re.search(r",smooth-quant\{alpha=0.5\},quantize-int8(\{skip=[^}]*\})?$", pipelines["int8"])
    assert pipelines["int4-weight"].endswith(",int4-linear")
    assert meta["fidelity_batches"] == {"fit": 3, "held_out": 1}
    # every candidate ships the CUDA extension: the bundle keeps one copy; fp8 quantizes its weights at load,
    # so it shares fp16's float weights (no shard of its own)
    extensions = {c["pack"]["files"]["libfxopt_cuda_ext.so"] for c in meta["candidates"]}
    assert len(extensions) == 1
    assert {shard for _, _, shard in meta["candidates"][1]["pack"]["weights"]} == {"0.safetensors"}
    bundle_bytes = sum(r["size"] for r in meta["files"].values())
    artifacts_bytes = 0
    for number, described in enumerate(meta["candidates"]):
        unpacked = unpack_artifact(path / "candidates", described["pack"], tmp_path / str(number))
        artifacts_bytes += sum(f.stat().st_size for f in unpacked.iterdir())
        loaded = fxopt.load(unpacked)  # checks every file against the artifact's own manifest
        report = json.loads((unpacked / "manifest.json").read_text())["extra"]["report"]
        assert loaded.target == "cuda" and report["lowering"]["precision"] == described["name"]
        assert loaded.pipeline == described["pipeline"]
    assert bundle_bytes < 0.5 * artifacts_bytes


@pytest.mark.skipif(HAS_GPU, reason="the refusals of a machine without a GPU")
@needs_nvcc
def test_pick_without_a_gpu_says_where_to_run_it(cuda_bundle):
    with pytest.raises(DeviceError, match=r"pick .*bundle: its 'cuda' candidates do not run on this machine "
                                          r"\(torch.cuda.is_available\(\) is False\); copy the bundle"):
        fxopt.pick(cuda_bundle[0])


@pytest.mark.skipif(HAS_GPU, reason="the refusals of a machine without a GPU")
def test_searching_in_one_step_without_a_gpu_names_the_two_steps():
    with pytest.raises(DeviceError, match=r"tolerance= on target='cuda' measures every candidate on the GPU.*"
                                          r"fxopt.search_bundle\(.*fxopt.pick\(DIR\)"):
        fxopt.optimize(torch.nn.Linear(4, 4), (torch.randn(2, 4),), target="cuda", tolerance={"cosine": 0.99})


@pytest.mark.gpu
def test_pick_on_the_gpu_chooses_the_fastest_candidate_within_the_tolerance(tmp_path, capsys):
    bundle = os.environ.get("FXOPT_SEARCH_BUNDLE")
    if not bundle:
        pytest.skip("set FXOPT_SEARCH_BUNDLE to a cuda bundle built on the CPU machine")
    chosen = fxopt.pick(bundle, tolerance={"max_rel_err": 10.0}, out=tmp_path / "chosen", allow_torch_mismatch=True)
    assert "fxopt pick (cuda, tolerance max_rel_err <= 10)" in capsys.readouterr().out
    rows = {c["name"]: c for c in chosen.report()["candidates"]}
    assert all(row["meets"] for row in rows.values()) and len(rows) == 4
    fastest = min(rows, key=lambda name: rows[name]["latency_ms"])
    assert chosen.report()["search"]["chosen"] == fastest
    # a cosine bound the fastest candidate misses, met by another: the fastest of those that meet it wins
    cosines = sorted(row["fidelity"]["cosine"] for row in rows.values())
    above = [c for c in cosines if c > rows[fastest]["fidelity"]["cosine"] + 1e-6]
    if above:
        bound = (rows[fastest]["fidelity"]["cosine"] + above[0]) / 2
        again = fxopt.pick(bundle, tolerance={"cosine": bound}, allow_torch_mismatch=True, progress=False).report()
        measured = {c["name"]: c for c in again["candidates"]}
        assert not measured[fastest]["meets"]
        meeting = [name for name, row in measured.items() if row["meets"]]
        assert again["search"]["chosen"] == min(meeting, key=lambda name: measured[name]["latency_ms"])
    # the saved winner loads in this process and computes what the measured one did
    example = chosen.graph.sample_inputs()  # token ids and mask of ones
    loaded = fxopt.load(tmp_path / "chosen", allow_torch_mismatch=True)
    first, second = chosen(*example), loaded(*example)
    first = first if isinstance(first, torch.Tensor) else next(iter(first.values()))
    second = second if isinstance(second, torch.Tensor) else next(iter(second.values()))
    torch.testing.assert_close(first.float().cpu(), second.float().cpu())
