"""The bad-input table: every way a user can hold fxopt wrong, the error class it gets, and the words it says.

Each row is one case of README's "Guarantees and limits" table. A row passes only if the call raises exactly
that fxopt error class (fxopt.errors) and its message contains every key word: the node, op, option or file
it is about, and what to do. Rows whose feature has deeper tests elsewhere say where.
"""
from __future__ import annotations

import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Type

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import ArtifactError, CaptureError, DeviceError, FxoptError, InputError, PassError, PatternError


# ------------------------------------------------------------------ models
class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # a Python side effect
        return x + 1


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))


def graph():
    return fxopt.capture(mlp(), (X,))


def saved_artifact(tmp_path):
    return fxopt.optimize(mlp(), (X,), progress=False).save(tmp_path / "model")


def damaged(tmp_path, damage: Callable) -> Callable:
    """Save an artifact, damage it, and return the load that must refuse it."""
    directory = saved_artifact(tmp_path)
    damage(directory)
    return lambda: fxopt.load(directory)


def flip_a_weight_byte(directory):
    path = directory / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def truncate_the_graph(directory):
    path = directory / "graph.json"
    path.write_bytes(path.read_bytes()[:100])


def claim_another_version(directory):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["fxopt_version"] = "9.0.0"
    path.write_text(json.dumps(manifest))


# ------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Row:
    error: Type[FxoptError]
    words: Sequence[str]


ROWS = {
    "untraceable: data-dependent control flow": Row(CaptureError,
                                                    ["Branchy", "branches in Python on a tensor's value", "torch.where"]),
    "untraceable: Python side effect": Row(CaptureError,
                                           ["Counting", "changes the Python attribute `calls`", "registered buffer"]),
    "unsupported dtype: complex input": Row(CaptureError,
                                            ["example input 0", "complex64", "real and imaginary parts"]),
    "unsupported dtype: float64 on the GPU": Row(InputError,
                                                 ["target='cuda'", "input input_1 (float64)", ".float()"]),
    "input shape differs from the example": Row(InputError,
                                                ["input input_1", "shape [3, 8]", "float32[2, 8]", "dynamic_shapes"]),
    "input dtype differs from the example": Row(InputError,
                                                ["input input_1", "torch.float64", ".to(torch.float32)"]),
    "wrong number of inputs": Row(InputError,
                                  ["got 2 tensors, expected 1", "input_1: float32[2, 8]"]),
    "unknown pass": Row(PassError, ["unknown pass 'fuse-everything'", "valid passes", "fuse-epilogue"]),
    "unknown option": Row(PassError, ["sparsify", "unknown option 'sparcity'", "did you mean 'sparsity'"]),
    "out-of-range option value": Row(PassError, ["sparsify", "sparsity=1.5", "[0, 1)"]),
    "out-of-range pruning ratio": Row(PassError, ["prune-channels", "ratio=1.5", "[0, 1]"]),
    "pruning that would empty a group": Row(PassError,
                                            ["prune-ffn", "node %linear", "remove all 16 units", "ratio below 1"]),
    "unknown target": Row(InputError, ["unknown target 'tpu'", "eager, x86-int8, cuda"]),
    "unknown preset": Row(InputError, ["unknown preset 'turbo'", "fast, balanced, small"]),
    "malformed tolerance": Row(InputError, ["tolerance", "exactly one key", "{'cosine': 0.99}"]),
    "quantizing without calibration data": Row(PassError,
                                                ["insert-qdq", "%linear", "no calibrated QParams", "fxopt.calibrate"]),
    "calibration data of the wrong shape": Row(InputError,
                                               ["calibration batch 1", "input input_1", "shape [2, 9]"]),
    "empty calibration data": Row(InputError, ["calibration_data is empty", "input tuples"]),
    "artifact: tampered weight byte": Row(ArtifactError,
                                          ["weights.safetensors", "sha256 checksum does not match"]),
    "artifact: truncated file": Row(ArtifactError, ["graph.json", "100 bytes", "truncated"]),
    "artifact: another version": Row(ArtifactError,
                                     ["saved with fxopt 9.0.0", "major.minor version"]),
    "artifact: missing file": Row(ArtifactError, ["weights.safetensors", "missing"]),
    "artifact: not an artifact": Row(ArtifactError,
                                     ["manifest.json", "missing", "not an fxopt artifact"]),
    "pattern replacement with another signature": Row(PatternError,
                                                      ["replacement returns 2 values but the pattern returns 1"]),
}


def action(case: str, tmp_path) -> Callable:
    """The call that must fail for ``case``."""
    return actions(tmp_path)[case]


def actions(tmp_path) -> Dict[str, Callable]:
    """Each row's call that must fail, by case."""
    x64 = torch.randn(2, 8, dtype=torch.float64)
    return {
        "untraceable: data-dependent control flow": lambda: fxopt.capture(Branchy(), (X,)),
        "untraceable: Python side effect": lambda: fxopt.capture(Counting(), (X,)),
        "unsupported dtype: complex input": lambda: fxopt.optimize(mlp(), (torch.randn(2, 8, dtype=torch.complex64),)),
        "unsupported dtype: float64 on the GPU": lambda: fxopt.optimize(mlp().double(), (x64,), target="cuda",
                                                                        progress=False),
        "input shape differs from the example": lambda: fxopt.optimize(mlp(), (X,), progress=False)(torch.randn(3, 8)),
        "input dtype differs from the example": lambda: graph().run(x64),
        "wrong number of inputs": lambda: graph().run(X, X),
        "unknown pass": lambda: fxopt.Pipeline("fuse-everything"),
        "unknown option": lambda: fxopt.Pipeline("sparsify{sparcity=0.5}"),
        "out-of-range option value": lambda: fxopt.Pipeline("sparsify{sparsity=1.5}"),
        "out-of-range pruning ratio": lambda: fxopt.Pipeline("prune-channels{ratio=1.5}"),
        "pruning that would empty a group": lambda: fxopt.Pipeline("prune-ffn{ratio=1.0}")(graph()),
        "unknown target": lambda: fxopt.optimize(mlp(), (X,), target="tpu"),
        "unknown preset": lambda: fxopt.optimize(mlp(), (X,), preset="turbo"),
        "malformed tolerance": lambda: fxopt.optimize(mlp(), (X,), tolerance={"cosine": 0.9, "psnr": 30}),
        "quantizing without calibration data": lambda: fxopt.Pipeline("insert-qdq{scheme=static}")(graph()),
        "calibration data of the wrong shape": lambda: fxopt.optimize(
            mlp(), (X,), target="x86-int8", calibration_data=[(X,), (torch.randn(2, 9),)], progress=False),
        "empty calibration data": lambda: fxopt.optimize(mlp(), (X,), target="x86-int8", calibration_data=[],
                                                         progress=False),
        "artifact: tampered weight byte": lambda: damaged(tmp_path, flip_a_weight_byte)(),
        "artifact: truncated file": lambda: damaged(tmp_path, truncate_the_graph)(),
        "artifact: another version": lambda: damaged(tmp_path, claim_another_version)(),
        "artifact: missing file": lambda: damaged(tmp_path, lambda d: (d / "weights.safetensors").unlink())(),
        "artifact: not an artifact": lambda: fxopt.load(tmp_path),
        "pattern replacement with another signature": lambda: fxopt.ExamplePattern(
            lambda x: F.relu(x), lambda x: (F.relu(x), x), (torch.randn(2, 4),)),
    }


@pytest.mark.parametrize("case", list(ROWS))
def test_every_row_raises_its_error_naming_what_and_what_to_do(case, tmp_path):
    row = ROWS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FxoptError) as caught:
            action(case, tmp_path)()
    assert type(caught.value) is row.error, f"{case}: {type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    missing = [w for w in row.words if w not in message]
    assert not missing, f"{case}: message lacks {missing}: {message}"


def test_the_table_has_an_action_for_every_row_and_nothing_else(tmp_path):
    calls = actions(tmp_path)
    assert sorted(calls) == sorted(ROWS)  # a row without its call, or a call without its row, fails here
    assert all(callable(call) for call in calls.values())


def test_quantizing_without_calibration_data_through_optimize_warns_and_uses_the_example():
    with pytest.warns(UserWarning, match="no calibration_data; calibrating on the example inputs alone"):
        optimized = fxopt.optimize(mlp(), (X,), target="x86-int8", progress=False)
    assert optimized.target == "x86-int8" and optimized(X).shape == X.shape


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="needs Apache TVM for CUDA code generation")
def test_cuda_without_a_gpu_builds_and_saves_then_fails_clearly_at_run_time(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the artifact runs (tests/backends/test_cuda_target.py)")
    optimized = fxopt.optimize(mlp(), (X,), target="cuda", progress=False)  # code generation works here
    directory = optimized.save(tmp_path / "cuda")
    assert (directory / "model.so").stat().st_size > 0
    for run in (lambda: optimized(X), lambda: fxopt.load(directory)(X)):
        with pytest.raises(DeviceError) as caught:
            run()
        assert re.search(r"no CUDA device", str(caught.value)), str(caught.value)
