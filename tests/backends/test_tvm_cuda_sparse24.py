"""fxopt's 2:4 sparse GEMM (cuSPARSELt, ``cusparselt_gemm.cc``): its refusals and declarations here, its results
on the GPU.

CPU: the extension compiles with the binding and, in a fresh process (extension_refusals.py), refuses bad operands
and a missing cuSPARSELt with clear errors; the binding's own declarations of cuSPARSELt's ABI match the real
``cusparseLt.h`` where one is found (``$FXOPT_CUSPARSELT_INCLUDE`` or an ``nvidia-cusparselt-cu13`` wheel);
the benchmark's harness runs dry. GPU (marked ``gpu``; the extension is ``$FXOPT_CUDA_EXTENSION`` or built here):
prune, compress and the GEMM against PyTorch math on the same pruned weight (cuSPARSELt's default algorithm;
``FXOPT_CUSPARSELT_SEARCH=1`` would search, which crashed on the H100: benchmarks/results/gpu_sparse24.md)::

    source .tvm/setup.sh && export PYTHONPATH=$PWD:$PYTHONPATH && \
        FXOPT_CUDA_EXTENSION=<libfxopt_cuda_ext.so> python3 -m pytest tests/backends/test_tvm_cuda_sparse24.py -m gpu
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fxopt.backends.tvm_cuda import cusparselt
from fxopt.errors import DeviceError
from tests.backends import extension_refusals

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the CUDA extension")


# ----------------------------------------------------------------------------------------------- CPU
def refusal_calls():
    """Every bad call, by case (run in a fresh process: no GPU needed, the checks come before any CUDA call)."""
    import tvm_ffi

    f = {name: tvm_ffi.get_global_func(name) for name in (cusparselt.LOAD, cusparselt.GEMM, cusparselt.GEMM_BIAS,
                                                           cusparselt.COMPRESS)}
    half, u8 = torch.float16, torch.uint8

    def load_missing_library():
        os.environ["FXOPT_CUSPARSELT_LIBRARY"] = "/nonexistent/libcusparseLt.so.0"
        try:
            cusparselt.load_library()
        finally:
            del os.environ["FXOPT_CUSPARSELT_LIBRARY"]

    x, wc, out = torch.zeros(8, 64, dtype=half), torch.zeros(1024, dtype=u8), torch.zeros(8, 32, dtype=half)
    return {
        "missing library (extension call)": lambda: f[cusparselt.LOAD]("/nonexistent/libcusparseLt.so.0"),
        "missing library (python)": load_missing_library,
        "float32 x": lambda: f[cusparselt.GEMM](x.float(), wc, out),
        "x and out dtypes differ": lambda: f[cusparselt.GEMM](x, wc, out.bfloat16()),
        "K not a multiple of 16": lambda: f[cusparselt.GEMM](torch.zeros(8, 40, dtype=half), wc, out),
        "N not a multiple of 16": lambda: f[cusparselt.GEMM](x, wc, torch.zeros(8, 24, dtype=half)),
        "weight not uint8": lambda: f[cusparselt.GEMM](x, wc.half(), out),
        "host tensors": lambda: f[cusparselt.GEMM](x, wc, out),
        "rows differ": lambda: f[cusparselt.GEMM](x, wc, torch.zeros(4, 32, dtype=half)),
        "M of 13": lambda: f[cusparselt.GEMM](torch.zeros(13, 64, dtype=half), wc, torch.zeros(13, 32, dtype=half)),
        "bias of 31": lambda: f[cusparselt.GEMM_BIAS](x, wc, torch.zeros(31, dtype=half), out),
        "compress to float16": lambda: f[cusparselt.COMPRESS](torch.zeros(32, 64, dtype=half), wc.half()),
    }


#: case -> (exception type name, words its message must hold)
REFUSALS = {
    "missing library (extension call)": ("RuntimeError", r"cannot open cuSPARSELt .*pip install nvidia-cusparselt"),
    "missing library (python)": ("DeviceError", r"need cuSPARSELt.*/nonexistent/libcusparseLt\.so\.0"),
    "float32 x": ("TypeError", r"x must be float16 or bfloat16"),
    "x and out dtypes differ": ("TypeError", r"x and out must share a dtype"),
    "K not a multiple of 16": ("ValueError", r"K multiples of 16, got N=32, K=40"),
    "N not a multiple of 16": ("ValueError", r"N and K multiples of 16, got N=24"),
    "weight not uint8": ("TypeError", r"compressed weight must be uint8"),
    "host tensors": ("ValueError", r"x must be on the GPU"),
    "rows differ": ("ValueError", r"differ in a leading dimension"),
    "M of 13": ("ValueError", r"rows of x .* multiple of 8, got M=13"),
    "bias of 31": ("ValueError", r"bias must be \[N\]"),
    "compress to float16": ("TypeError", r"compress's out must be uint8"),
}


@pytest.fixture(scope="module")
def refusals():
    return extension_refusals.refusals("tests.backends.test_tvm_cuda_sparse24:refusal_calls")


@needs_nvcc
@pytest.mark.parametrize("case", list(REFUSALS))
def test_sparse24_gemm_refuses_bad_calls_with_a_clear_error(refusals, case):
    kind, words = REFUSALS[case]
    got_kind, message = refusals[case]
    assert got_kind == kind and re.search(words, message), (got_kind, message)


def test_extension_sources_include_the_binding():
    from fxopt.backends.tvm_cuda import extension

    names = [os.path.basename(p) for p in extension.SOURCES + extension.HEADERS]
    assert "cusparselt_gemm.cc" in names and "cusparselt_api.h" in names


def test_library_path_takes_the_environment_then_the_wheels(tmp_path, monkeypatch):
    monkeypatch.delenv("FXOPT_CUSPARSELT_LIBRARY", raising=False)
    lib = tmp_path / "nvidia" / "cusparselt" / "lib"
    lib.mkdir(parents=True)
    (lib / cusparselt.SONAME).write_bytes(b"")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "elsewhere"), str(tmp_path)])
    assert cusparselt.library_path() == str(lib / cusparselt.SONAME)
    monkeypatch.setenv("FXOPT_CUSPARSELT_LIBRARY", "/opt/x/libcusparseLt.so.0")
    assert cusparselt.library_path() == "/opt/x/libcusparseLt.so.0"
    monkeypatch.delenv("FXOPT_CUSPARSELT_LIBRARY")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "elsewhere")])
    assert cusparselt.library_path() is None


def cusparselt_include():
    env = os.environ.get("FXOPT_CUSPARSELT_INCLUDE")
    candidates = ([env] if env else []) + [d for root in sys.path for d in glob.glob(
        os.path.join(root, "nvidia", "*", "include"))]
    return next((d for d in candidates if os.path.exists(os.path.join(d, "cusparseLt.h"))), None)


ABI_CHECK = """
#include <cusparseLt.h>
#include "cusparselt_api.h"
using namespace fxopt_cusparselt;
static_assert(kSuccess == CUSPARSE_STATUS_SUCCESS && kNotSupported == CUSPARSE_STATUS_NOT_SUPPORTED, "status");
static_assert(kOpNonTranspose == CUSPARSE_OPERATION_NON_TRANSPOSE && kOpTranspose == CUSPARSE_OPERATION_TRANSPOSE, "op");
static_assert(kOrderCol == CUSPARSE_ORDER_COL && kOrderRow == CUSPARSE_ORDER_ROW, "order");
static_assert(kSparsity50Percent == CUSPARSELT_SPARSITY_50_PERCENT && kCompute32F == CUSPARSE_COMPUTE_32F, "enums");
static_assert(kAttributeBiasPointer == CUSPARSELT_MATMUL_BIAS_POINTER && kAlgDefault == CUSPARSELT_MATMUL_ALG_DEFAULT, "");
static_assert(kAlgConfigId == CUSPARSELT_MATMUL_ALG_CONFIG_ID && kAlgConfigMaxId == CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, "");
static_assert(kSearchIterations == CUSPARSELT_MATMUL_SEARCH_ITERATIONS && kSplitK == CUSPARSELT_MATMUL_SPLIT_K, "");
static_assert(kSplitKMode == CUSPARSELT_MATMUL_SPLIT_K_MODE && kSplitKBuffers == CUSPARSELT_MATMUL_SPLIT_K_BUFFERS, "");
static_assert(kPruneStrip == CUSPARSELT_PRUNE_SPMMA_STRIP, "prune");
static_assert(sizeof(Opaque) >= sizeof(cusparseLtHandle_t) && sizeof(Opaque) >= sizeof(cusparseLtMatmulPlan_t), "");
static_assert(sizeof(Opaque) >= sizeof(cusparseLtMatDescriptor_t) && sizeof(Opaque) >= sizeof(cusparseLtMatmulDescriptor_t), "");
static_assert(sizeof(Opaque) >= sizeof(cusparseLtMatmulAlgSelection_t), "");
static_assert(sizeof(int) == sizeof(cusparseStatus_t) && sizeof(int) == sizeof(cusparseLtMatmulDescAttribute_t), "");
int main() { return 0; }
"""


@needs_nvcc
def test_declarations_match_the_real_cusparselt_header(tmp_path):
    include = cusparselt_include()
    if include is None:
        pytest.skip("no cusparseLt.h: set FXOPT_CUSPARSELT_INCLUDE or pip install nvidia-cusparselt-cu13")
    source = tmp_path / "abi_check.cc"
    source.write_text(ABI_CHECK)
    here = os.path.join(ROOT, "fxopt", "backends", "tvm_cuda")
    done = subprocess.run(["nvcc", "-std=c++17", "-c", str(source), "-o", str(tmp_path / "abi_check.o"),
                           f"-I{include}", f"-I{here}"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_benchmark_harness_runs_dry():
    import argparse

    from benchmarks import gpu_sparse24

    result = gpu_sparse24.main(argparse.Namespace(dry_run=True, extension=None, torch_paths=False, out=None))
    assert [r["verdict"] for r in result["rows"]] and all("verdict" in r for r in result["rows"])
    assert all(r["pruned_2_4"] and r["kept"] == 0.5 and r["fxopt_rel_err"] < 1e-6 for r in result["rows"])
    assert [gpu_sparse24.verdict(s) for s in (1.06, 1.0, 0.94)] == ["win", "tie", "loss"]


# ----------------------------------------------------------------------------------------------- GPU
@pytest.fixture(scope="module")
def sparse():
    from fxopt.backends.tvm_cuda import extension

    return cusparselt.Sparse24(os.environ.get("FXOPT_CUDA_EXTENSION") or extension.extension_path())


#: half the unit roundoff of each dtype times 4: the fp32-accumulated result is rounded once to the output dtype
TOLERANCE = {torch.float16: 4 * 2.0 ** -11, torch.bfloat16: 4 * 2.0 ** -8}


def weight_and_reference(n, k, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).to(dtype), gen


@pytest.mark.gpu
def test_prune_keeps_the_two_largest_magnitudes_of_every_four(sparse):
    from benchmarks.gpu_sparse24 import prune_2_4

    w, _ = weight_and_reference(64, 128, torch.float16, 0)
    pruned = sparse.prune(w)
    assert torch.equal(pruned, prune_2_4(w))
    assert sparse.is_pruned(pruned) and not sparse.is_pruned(w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead,k,n", [((8,), 64, 32), ((3, 8), 128, 64), ((2, 8), 256, 128), ((1024,), 768, 2304),
                                      ((16,), 4096, 4096)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_linear_matches_torch(sparse, dtype, lead, k, n, with_bias):
    from tests.backends.test_tvm_cuda_kernels_gpu import assert_guards_untouched, guarded

    w, gen = weight_and_reference(n, k, dtype, n * 31 + k)
    w = sparse.prune(w)
    x = torch.randn(*lead, k, generator=gen, device="cuda").to(dtype)
    bias = (torch.randn(n, generator=gen, device="cuda") * 0.1).to(dtype) if with_bias else None
    buffer, out = guarded((*lead, n), dtype)
    sparse.linear(x, sparse.compress(w), n, bias, out=out)
    torch.cuda.synchronize()
    assert_guards_untouched(buffer, out)
    reference = x.double() @ w.double().T + (bias.double() if with_bias else 0)
    error = float((out.double() - reference).norm() / reference.norm())
    assert error < TOLERANCE[dtype], (error, sparse.search_log())


@pytest.mark.gpu
def test_a_second_bias_pointer_gets_a_plan_of_its_own(sparse):
    w, gen = weight_and_reference(128, 256, torch.float16, 7)
    w = sparse.prune(w)
    packed, x = sparse.compress(w), torch.randn(64, 256, generator=gen, device="cuda").half()
    for scale in (1.0, -2.0):
        bias = torch.full((128,), scale, device="cuda", dtype=torch.float16)
        out = sparse.linear(x, packed, 128, bias)
        reference = x.double() @ w.double().T + scale
        assert float((out.double() - reference).norm() / reference.norm()) < TOLERANCE[torch.float16]
    assert "M=64 N=128 K=256 bias" in sparse.search_log()


@pytest.mark.gpu
def test_an_unpruned_or_wrongly_sized_weight_is_refused(sparse):
    w, _ = weight_and_reference(64, 128, torch.float16, 3)
    with pytest.raises(Exception, match="not 2:4 sparse along K"):
        sparse.compress(w)
    packed = sparse.compress(sparse.prune(w))
    x = torch.zeros(16, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(Exception, match="compressed weight has"):
        sparse.linear(x, packed[:-16].contiguous(), 64)
    with pytest.raises(Exception, match="compressed weight has"):
        sparse.linear(torch.zeros(16, 256, device="cuda", dtype=torch.float16), packed, 64)
