"""``build(matmul="mma")``: fp16 matmuls scheduled with ldmatrix + mma.sync + cp.async (CUDA codegen on the CPU machine).

The kernels' numbers and speed are measured on the GPU machine by benchmarks/gpu_gemm.py
(benchmarks/results/gpu_gemm.md); here only the code generation is checked.
"""
from __future__ import annotations

import shutil

import pytest
import torch

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends.tvm_cuda import device_binary  # noqa: E402
from fxopt.backends.tvm_cuda.lower import build  # noqa: E402
from fxopt.errors import LoweringError  # noqa: E402


def _linear_graph(rows=128, features=256):
    lin = torch.nn.Linear(features, features)
    return fxopt.capture(lin, (torch.randn(rows, features),))


def test_mma_option_generates_ldmatrix_mma_sync_and_cp_async():
    lib = build(_linear_graph(), dtype="float16", compile_kernels=False, matmul="mma")
    source = lib.cuda_source
    assert "ldmatrix" in source and "mma.sync.aligned.m16n8k16" in source
    assert "cp.async.cg.shared.global" in source  # the pipelined global->shared copies
    assert "wmma::mma_sync" not in source


def test_default_matmul_is_still_wmma():
    lib = build(_linear_graph(), dtype="float16", compile_kernels=False)
    assert "wmma::mma_sync" in lib.cuda_source and "ldmatrix" not in lib.cuda_source


def test_mma_rule_falls_back_for_shapes_no_tile_divides():
    lib = build(_linear_graph(rows=24, features=40), dtype="float16", compile_kernels=False, matmul="mma")
    assert "mma.sync" not in lib.cuda_source  # dlight's rules took it


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_mma_kernels_compile_with_nvcc_for_sm_90():
    lib = build(_linear_graph(), dtype="float16", matmul="mma")
    assert lib.fatbin and device_binary.is_cuda_fatbin(lib.fatbin)


def test_unknown_matmul_option_is_refused():
    with pytest.raises(LoweringError, match="matmul"):
        build(_linear_graph(), dtype="float16", compile_kernels=False, matmul="cutlass")
