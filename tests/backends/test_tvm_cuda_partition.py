"""optimize(target="cuda") on a graph TVM cannot take whole: supported regions to TVM, the rest in PyTorch.

The model is an FNet-style block: its token mixing is ``rfft(...).abs()``,
which TVM cannot import (``fft_rfft`` decomposes to ``_fft_r2c``, which has no
converter; ``abs`` of a complex tensor has no TVM dtype). Code generation runs
here; the partitioned artifact runs on the GPU machine (the ``gpu`` test).
Here the partitioned execution is checked with each region's Relax module run
on the CPU (TVM's llvm target) inside the same glue.
"""
from __future__ import annotations

import json
import operator
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import save_file

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends.tvm_cuda import deploy, partition, support, to_relax  # noqa: E402
from fxopt.errors import ArtifactError, DeviceError, PartitionWarning  # noqa: E402
from tests.backends.test_tvm_cuda_codegen import _Erfinv  # noqa: E402  (an op with no TVM converter)
from tests.harness import relative_error  # noqa: E402

HAS_GPU = torch.cuda.is_available()


class FNetBlock(torch.nn.Module):
    """x -> linear -> |rfft| over the features -> linear, residual + LayerNorm, then a GELU FFN."""

    def __init__(self, width=32):
        super().__init__()
        self.inp = torch.nn.Linear(width, width)
        self.mix = torch.nn.Linear(width // 2 + 1, width)
        self.norm = torch.nn.LayerNorm(width)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.GELU(),
                                       torch.nn.Linear(2 * width, width))

    def forward(self, x):
        spectrum = torch.fft.rfft(self.inp(x), dim=-1).abs()
        x = self.norm(x + self.mix(spectrum))
        return x + self.ffn(x)


def fnet():
    torch.manual_seed(0)
    return FNetBlock().eval(), torch.randn(2, 8, 32)


@pytest.fixture(scope="module")
def fnet_graph():
    model, x = fnet()
    return fxopt.capture(model, (x,)), x


def fallback_warnings(caught) -> list:
    return [str(w.message) for w in caught if issubclass(w.category, PartitionWarning)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, x = fnet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = fxopt.optimize(model, (x,), target="cuda")
    directory = optimized.save(tmp_path_factory.mktemp("partitioned") / "artifact")
    return model, x, optimized, directory, fallback_warnings(caught)


# ------------------------------------------------------------ support check
def test_support_check_names_the_fft_ops_and_takes_linear_and_gelu(fnet_graph):
    graph, _ = fnet_graph
    known = support.known_converters()
    reasons = {n.name: reason for n, reason in support.fallback_reasons(graph, known).items()}
    assert reasons == {"fft_rfft": "becomes aten._fft_r2c.default: no TVM converter",
                       "abs_1": "complex64 tensors: TVM has no complex dtype"}
    by_op = {str(n.target): support.op_support(n, known) for n in graph.call_nodes()}
    assert not by_op["aten.fft_rfft.default"].supported
    assert "aten._fft_r2c.default" in by_op["aten.fft_rfft.default"].missing
    assert by_op["aten.linear.default"].supported and by_op["aten.gelu.default"].supported
    assert "aten.addmm.default" in by_op["aten.linear.default"].becomes  # judged after decomposition
    linears = list(graph.call_nodes(torch.ops.aten.linear.default))
    assert support.op_support(linears[0], known) is support.op_support(linears[-1], known)  # once per overload


def test_an_op_without_converter_falls_back_and_a_node_without_metadata_is_an_error(monkeypatch):
    graph = fxopt.capture(_Erfinv(), (torch.randn(2, 4),))
    known = support.known_converters()
    assert {n.name: r for n, r in support.fallback_reasons(graph, known).items()} == {"erfinv": "no TVM converter"}
    monkeypatch.setattr(support, "_CACHE", {})  # decide again, from the metadata
    del graph.node("tanh").meta["val"]
    with pytest.raises(fxopt.MetadataError, match=r"%tanh \(aten\.tanh\.default\): no fake value"):
        support.fallback_reasons(graph, known)


def test_a_graph_tvm_takes_whole_has_no_fallback():
    graph = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()), (torch.randn(2, 8),))
    plan = partition.propose(graph, support.known_converters())
    assert plan.fallback == [] and len(plan.partitions) == 1


# ------------------------------------------------------------------- split
def test_split_gives_two_regions_around_the_fft_and_the_glue_runs_like_the_graph(fnet_graph):
    graph, x = fnet_graph
    plan = partition.propose(graph, support.known_converters())
    glue, regions = partition.split(graph, plan.partitions)
    assert [r.name for r in regions] == ["region_0", "region_1"]
    assert regions[0].inputs == ("x",) and set(regions[1].inputs) == {"x", "abs_1"}
    fallback = [n.name for n in glue.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    assert fallback == ["fft_rfft", "abs_1"]
    with torch.no_grad():
        assert torch.equal(glue(x)[0], graph.run(x))  # regions still PyTorch GraphModules here


class _RelaxOnCpu(torch.nn.Module):
    """A region's Relax import compiled for llvm: what the CUDA library computes, run on this CPU."""

    def __init__(self, graph):
        super().__init__()
        from tvm import relax
        executable = tvm.compile(to_relax(graph), target=tvm.target.Target({"kind": "llvm"}))
        self.main = relax.VirtualMachine(executable, tvm.cpu())["main"]

    def forward(self, *inputs):
        out = self.main(*[tvm.runtime.tensor(t.numpy()) for t in inputs])
        outs = [out] if hasattr(out, "numpy") else [out[i] for i in range(len(out))]
        return tuple(torch.from_numpy(o.numpy()) for o in outs)


def test_tvm_regions_with_pytorch_between_them_match_eager_on_cpu(fnet_graph):
    graph, x = fnet_graph
    glue, regions = partition.split(graph, partition.propose(graph, support.known_converters()).partitions)
    for region in regions:
        setattr(glue, region.name, _RelaxOnCpu(partition.region_graph(glue, region)))
    with torch.no_grad():
        assert relative_error(graph.run(x), glue(x)[0]) < 1e-5


# ------------------------------------------------------------------- build
def test_optimize_warns_once_naming_the_ops_and_their_counts(built):
    *_, caught = built
    assert len(caught) == 1
    assert caught[0].startswith(
        "tvm-cuda: 2 ops run in PyTorch between 2 TVM regions: aten.fft_rfft.default x1 (becomes "
        "aten._fft_r2c.default: no TVM converter), aten.abs.default x1 (complex64 tensors: TVM has no complex dtype)")


def test_the_report_says_how_many_regions_and_which_ops_fell_back(built):
    _, _, optimized, directory, _ = built
    lowering = optimized.report()["lowering"]
    assert lowering["regions"] == 2
    assert lowering["fallback_ops"] == {"aten.fft_rfft.default": 1, "aten.abs.default": 1}
    assert [f["node"] for f in lowering["fallback"]] == ["fft_rfft", "abs_1"]
    files = set(json.loads((directory / "manifest.json").read_text())["files"])
    assert {"region_0.so", "region_1.so", "region_0.params.json", "partition.json", "graph.json"} <= files
    assert "model.so" not in files
    saved = json.loads((directory / "partition.json").read_text())
    assert [r["library"] for r in saved["regions"]] == ["region_0.so", "region_1.so"]


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error; this machine has a GPU")
def test_running_the_partitioned_model_without_a_gpu_is_a_device_error(built):
    _, x, optimized, _, _ = built
    with pytest.raises(DeviceError, match="no CUDA device"):
        optimized(x)


def test_a_model_tvm_takes_whole_still_builds_one_region(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimized = fxopt.optimize(model, (torch.randn(4, 16),), target="cuda")
    assert fallback_warnings(caught) == []
    assert isinstance(optimized.runner, deploy.CudaTarget)
    lowering = optimized.report()["lowering"]
    assert (lowering["regions"], lowering["fallback_ops"]) == (1, {})
    files = set(json.loads((optimized.save(tmp_path / "a") / "manifest.json").read_text())["files"])
    assert "model.so" in files and "partition.json" not in files


def test_a_region_whose_build_fails_runs_in_pytorch(fnet_graph, monkeypatch):
    from fxopt.backends.tvm_cuda import lower
    from fxopt.errors import LoweringError

    def failing_build(graph, **options):
        raise LoweringError("tvm-cuda: building for sm_90 failed: a test says no")

    monkeypatch.setattr(lower, "build", failing_build)
    graph, _ = fnet_graph
    with pytest.warns(PartitionWarning, match=r"run in PyTorch between 0 TVM regions: .*aten\.linear\.default x4 "
                                              r"\(the TVM build of its region failed: tvm-cuda: building"):
        target = deploy.build_target(graph)
    assert target.plan.regions == [] and len(target.plan.fallback) == len(list(graph.call_nodes()))


# --------------------------------------------------------------- artifacts
FRESH_PROCESS_WITHOUT_GPU = textwrap.dedent("""
    import sys, torch, fxopt
    from fxopt.backends.artifact import read_manifest
    manifest = read_manifest(sys.argv[1])
    loaded = fxopt.load(sys.argv[1])
    assert "tests" not in sys.modules  # nothing of the model's source was imported
    print("manifest", manifest["target"], manifest["extra"]["report"]["lowering"]["regions"])
    print("loaded", type(loaded.runner).__name__, len(loaded.runner.plan.regions))
    try:
        loaded(torch.randn(2, 8, 32))
    except fxopt.errors.DeviceError as exc:
        print("DeviceError", str(exc).split(";")[0])
""")


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error; this machine has a GPU")
def test_a_fresh_process_loads_the_partitioned_artifact_and_needs_a_gpu_to_run_it(built, tmp_path):
    directory = built[3]
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_WITHOUT_GPU, str(directory)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-3:] == ["manifest cuda 2", "loaded PartitionedCudaTarget 2",
                          "DeviceError cuda: no CUDA device on this machine (torch.cuda.is_available() is False)"]


def test_a_partition_that_does_not_fit_the_graph_is_an_artifact_error(built, tmp_path):
    graph = built[2].graph
    plan = partition.read_plan(str(built[3] / "partition.json"))
    stray = partition.Region("region_0", ("nope",) + plan.regions[0].nodes, ("x",), 1)
    with pytest.raises(ArtifactError, match=r"region_0 covers node %nope, which graph.json does not have"):
        partition.glue_from_saved(graph, partition.Plan([stray.nodes], [], [stray]), "partition.json")
    (tmp_path / "partition.json").write_text(json.dumps({"format": "other/9", "regions": [], "fallback": []}))
    with pytest.raises(ArtifactError, match=r"format 'other/9' is not 'fxopt.tvm_cuda.partition/1'"):
        partition.read_plan(str(tmp_path / "partition.json"))


FRESH_PROCESS_ON_GPU = textwrap.dedent("""
    import sys, torch, fxopt
    from safetensors.torch import load_file
    data = load_file(sys.argv[2])
    loaded = fxopt.load(sys.argv[1], allow_torch_mismatch=True)
    out = loaded(data["x"].cuda()).float().cpu()
    err = ((out - data["y"]).norm() / data["y"].norm()).item()
    assert "tests" not in sys.modules
    print("ok", type(loaded.runner).__name__, err)
""")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (run on the GPU machine)")
def test_the_partitioned_artifact_runs_like_pytorch_fp32_on_a_gpu(built, tmp_path):
    model, x, optimized, directory, _ = built
    with torch.no_grad():
        expected = model(x)
    save_file({"x": x, "y": expected}, str(tmp_path / "io.safetensors"))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_ON_GPU, str(directory), str(tmp_path / "io.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    word, kind, err = done.stdout.split()[-3:]
    assert (word, kind) == ("ok", "PartitionedCudaTarget") and float(err) < 2e-3  # fp16 compute, fp32 accumulation
    in_process = optimized(x.cuda()).float().cpu()
    assert relative_error(expected, in_process) < 2e-3
