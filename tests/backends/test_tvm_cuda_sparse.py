"""fxopt.csr_linear (from sparsify) in the TVM CUDA backend, on a machine without a GPU.

Numerics: the imported Relax module built for llvm and run on the CPU against eager. Codegen: CUDA source
for sm_90. The default converter densifies the CSR arrays (folded at build time, so the kernels are the
dense ones); the sparse-kernel converter emits a TIR kernel over the nonzeros.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends import tvm_cuda  # noqa: E402
from fxopt.backends.tvm_cuda.sparse import csr_linear_sparse_kernel  # noqa: E402
from tests.backends.test_tvm_cuda_codegen import assert_matches_eager  # noqa: E402
from tests.harness import count  # noqa: E402

CSR = torch.ops.fxopt.csr_linear.default
SPARSE_KERNEL = {"csr_linear.default": csr_linear_sparse_kernel}


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 48), nn.Linear(48, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.fixture(scope="module")
def sparse_mlp():
    """A [2, 5, 32] -> [2, 5, 16] MLP, 90% pruned, both linears as fxopt.csr_linear (one with bias, one without)."""
    torch.manual_seed(0)
    inputs = (torch.randn(2, 5, 32),)
    graph = fxopt.Pipeline("sparsify{sparsity=0.9,format=csr}")(fxopt.capture(_Mlp(), inputs)).graph
    assert count(graph, CSR) == 2
    return graph, inputs


def cuda_kernels(source: str):
    """The names of the ``__global__`` functions in CUDA source."""
    return set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", source))


# ------------------------------------------------------------------ Relax
def test_densified_csr_linear_imports_and_matches_eager(sparse_mlp):
    graph, inputs = sparse_mlp
    mod = tvm_cuda.to_relax(graph)
    script = mod.script()
    assert script.count("R.call_tir(cls.csr_densify") == 2 and script.count("R.matmul(") == 2
    assert_matches_eager(graph, mod, inputs)


def test_sparse_kernel_csr_linear_imports_and_matches_eager(sparse_mlp):
    graph, inputs = sparse_mlp
    mod = tvm_cuda.to_relax(graph, custom_convert_map=SPARSE_KERNEL)
    assert "csr_densify" not in mod.script() and "csr_linear" in mod.script()
    assert_matches_eager(graph, mod, inputs)


@pytest.mark.parametrize("converters", [None, SPARSE_KERNEL], ids=["densified", "sparse-kernel"])
def test_an_all_zero_weight_lowers_to_zeros_plus_bias(converters):
    model = nn.Linear(8, 4)
    with torch.no_grad():
        model.weight.zero_()
    inputs = (torch.randn(3, 8),)
    graph = fxopt.Pipeline("sparsify{sparsity=0.5,format=csr}")(fxopt.capture(model, inputs)).graph
    assert graph.params()[next(k for k in graph.params() if k.endswith("csr_values"))].numel() == 0
    assert_matches_eager(graph, tvm_cuda.to_relax(graph, custom_convert_map=converters), inputs)


# ------------------------------------------------------------- CUDA codegen
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_densified_build_folds_the_scatter_and_emits_dense_matmuls(sparse_mlp, dtype):
    graph, _ = sparse_mlp
    lib = tvm_cuda.build(graph, dtype=dtype, arch="sm_90", compile_kernels=False)
    kernels = cuda_kernels(lib.cuda_source)
    assert not any("csr" in k for k in kernels)  # the scatter ran at build time (FoldConstant)
    assert sum("matmul" in k for k in kernels) == 2, kernels
    if dtype == "float16":
        assert "half* __restrict__" in lib.cuda_source


def test_densified_build_with_weights_as_inputs_still_folds_the_bound_csr_arrays(sparse_mlp):
    graph, _ = sparse_mlp
    lib = tvm_cuda.build(graph, dtype="float16", compile_kernels=False, keep_params_as_input=True)
    assert not any("csr" in k for k in cuda_kernels(lib.cuda_source))
    assert [p.name for p in lib.params] == ["up.bias"]  # the CSR arrays are buffers: bound, then folded


def test_sparse_kernel_build_emits_a_cuda_kernel_reading_only_the_nonzeros(sparse_mlp):
    graph, _ = sparse_mlp
    lib = tvm_cuda.build(graph, dtype="float32", arch="sm_90", compile_kernels=False, custom_convert_map=SPARSE_KERNEL)
    kernels = cuda_kernels(lib.cuda_source)
    csr_kernels = sorted(k for k in kernels if k.startswith("csr_linear"))
    assert len(csr_kernels) == 2, kernels
    assert not any("matmul" in k for k in kernels)
    body = lib.cuda_source.split(csr_kernels[0], 1)[1]
    assert "col_ptr" in body and "crow" in body and "threadIdx.x" in body
