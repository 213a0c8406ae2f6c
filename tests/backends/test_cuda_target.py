"""optimize(target="cuda"): TVM code generation here, an artifact with the library, and a run on a GPU.

On a machine without a GPU the build and the save still work, and calling the
model raises DeviceError. On the GPU machine a fresh process, without this
module's source, loads the artifact and matches eager PyTorch.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import fxopt
from fxopt.errors import DeviceError

pytest.importorskip("tvm")
HAS_GPU = torch.cuda.is_available()


class Block(torch.nn.Module):
    """Attention plus an FFN: the ops the cuda pipeline hands to fxopt's kernels and cuBLASLt."""

    def __init__(self, width=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = self.norm(x + self.out(att.transpose(1, 2).reshape(b, t, c)))
        return x + self.ffn(x)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 16, 64)
    optimized = fxopt.optimize(model, (x,), target="cuda")
    directory = optimized.save(tmp_path_factory.mktemp("cuda") / "artifact")
    return model, x, optimized, directory


def test_the_cuda_artifact_carries_the_library_and_verified_files(built):
    _, _, optimized, directory = built
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["target"] == "cuda"
    assert {"model.so", "model.params.json", "weights.safetensors", "graph.json"} <= set(manifest["files"])
    params = json.loads((directory / "model.params.json").read_text())
    assert params["params"] and params["transform"]  # weights are inputs, read from weights.safetensors
    assert optimized.report()["lowering"]["matmul"] == "cublaslt"
    assert "fuse-attention" in optimized.pipeline


def test_a_tampered_library_is_refused(built, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(built[3], copy)
    data = bytearray((copy / "model.so").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "model.so").write_bytes(bytes(data))
    with pytest.raises(fxopt.ArtifactError, match="model.so"):
        fxopt.load(copy)


@pytest.mark.skipif(HAS_GPU, reason="checks the no-GPU error; this machine has a GPU")
def test_without_a_gpu_running_is_a_clear_error_but_the_build_worked(built):
    _, x, optimized, directory = built
    with pytest.raises(DeviceError, match="no CUDA device.*fxopt.load"):
        optimized(x)
    with pytest.raises(DeviceError, match="no CUDA device"):
        fxopt.load(directory)(x)


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, fxopt
    from safetensors.torch import load_file
    data = load_file(sys.argv[2])
    loaded = fxopt.load(sys.argv[1])
    out = loaded(data["x"].cuda()).float().cpu()
    err = ((out - data["y"]).norm() / data["y"].norm()).item()
    assert "tests" not in sys.modules
    print("ok", loaded.target, err)
""")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (run on the GPU machine)")
def test_a_fresh_process_runs_the_cuda_artifact_like_eager(built, tmp_path):
    model, x, optimized, directory = built
    with torch.no_grad():
        expected = model(x)
    save_file({"x": x, "y": expected}, str(tmp_path / "io.safetensors"))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(directory), str(tmp_path / "io.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    word, target, err = done.stdout.split()[-3:]
    assert (word, target) == ("ok", "cuda") and float(err) < 2e-3  # float16 compute, fp32 accumulation
    in_process = optimized(x.cuda()).float().cpu()
    assert ((in_process - expected).norm() / expected.norm()).item() < 2e-3
