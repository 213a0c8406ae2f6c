"""fxopt.int4.linear[_zp]: the weight-only int4 GEMM for 1 to 16 rows (issue 22), in fxopt's int4 layout.

Argument checks run here in a subprocess (tests/backends/test_tvm_cuda_extension.py registers stand-ins under
the extension's names in this process); the numbers are checked on the GPU machine (marker ``gpu``), exactly:
integer activations, codes in [-8, 7], zero points in [-8, 7] and power-of-two scales keep every product and
partial sum exact in fp32 (multiples of 2^-6 below 2^13), so kernel and reference round one value to float16.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.backends import extension_refusals
from tests.harness import examples

pytest.importorskip("tvm_ffi")
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the CUDA extension")

LINEAR, LINEAR_ZP = "fxopt.int4.linear", "fxopt.int4.linear_zp"


def operands(m=2, n=8, k=64, groups=2):
    return (torch.zeros(m, k).half(), torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, groups),
            torch.zeros(m, n).half())


BAD = {
    "x in float32": (lambda x, w, s, o: (x.float(), w, s, o), TypeError, "x and out must be float16"),
    "scales in float16": (lambda x, w, s, o: (x, w, s.half(), o), TypeError, "scales float32"),
    "packed of another K": (lambda x, w, s, o: (x, w[:, :16].contiguous(), s, o), ValueError, r"\[N, K/2\]"),
    "K of 48": (lambda x, w, s, o: (x[:, :48].contiguous(), w[:, :24].contiguous(), s, o), ValueError,
                "multiple of 32"),
    "groups of 16": (lambda x, w, s, o: (x, w, torch.ones(8, 4), o), ValueError, "G a multiple of 32"),
    "17 rows": (lambda x, w, s, o: (torch.zeros(17, 64).half(), w, s, torch.zeros(17, 8).half()), ValueError,
                "1 to 16 rows"),
    "16 rows of 8192": (lambda x, w, s, o: (torch.zeros(16, 8192).half(), torch.zeros(8, 4096, dtype=torch.uint8),
                                            torch.ones(8, 64), torch.zeros(16, 8).half()), ValueError,
                        "fit shared memory"),
    "out of 7 columns": (lambda x, w, s, o: (x, w, s, torch.zeros(2, 7).half()), ValueError, "M \\* N elements"),
    "on the CPU": (lambda x, w, s, o: (x, w, s, o), ValueError, "must be on the GPU"),
}

def refusal_calls():
    """Every bad call, by case (run in a fresh process: tests/backends/extension_refusals.py)."""
    import tvm_ffi
    linear, linear_zp = tvm_ffi.get_global_func(LINEAR), tvm_ffi.get_global_func(LINEAR_ZP)
    calls = {case: (lambda make=make: linear(*make(*operands()))) for case, (make, _, _) in BAD.items()}
    x, w, s, o = operands()
    calls["zeros of another shape"] = lambda: linear_zp(x, w, s, torch.zeros(8, 3, dtype=torch.int8), o)
    return calls


@pytest.fixture(scope="module")
def refusals():
    return extension_refusals.refusals("tests.backends.test_tvm_cuda_int4:refusal_calls")


@pytest.mark.parametrize("case", list(BAD))
def test_int4_linear_refuses_bad_operands_with_a_clear_error(refusals, case):
    _, error, words = BAD[case]
    kind, message = refusals[case]
    assert kind == error.__name__ and re.search(words, message), (kind, message)


def test_zero_points_of_the_wrong_shape_are_refused(refusals):
    kind, message = refusals["zeros of another shape"]
    assert kind == "ValueError" and "zeros must be shaped like scales" in message, (kind, message)


@pytest.fixture(scope="module")
def int4():
    import tvm_ffi

    from fxopt.backends.tvm_cuda import extension
    extension.load_extension(os.environ.get("FXOPT_CUDA_EXTENSION") or extension.extension_path())
    return tvm_ffi.get_global_func(LINEAR), tvm_ffi.get_global_func(LINEAR_ZP)


@pytest.mark.gpu
@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "zero-points"])
@examples(30)
@given(m=st.integers(1, 16), n=st.integers(1, 300), words=st.integers(1, 40), group=st.sampled_from([32, 64, 128]),
       seed=st.integers(0, 2**31))
def test_int4_linear_is_exact_on_small_integers(int4, zero_points, m, n, words, group, seed):
    """Against fxopt.dequantize_int4_grouped (the eager reference) and an fp32 matmul, exactly. N not a multiple
    of the 32 rows a block computes, K of 1 to 40 words of 32 columns (a group may be cut: K = words * 32 must
    divide into groups, so K is rounded up to a multiple of the group)."""
    k = -(-words * 32 // group) * group
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(-3, 4, (m, k), generator=gen, device="cuda").half()
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
    scales = 2.0 ** torch.randint(-6, -2, (n, k // group), generator=gen, device="cuda").float()
    zeros = torch.randint(-8, 8, (n, k // group), generator=gen, device="cuda", dtype=torch.int8)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    if zero_points:
        int4[1](x, packed, scales, zeros, out)
    else:
        int4[0](x, packed, scales, out)
    weight = torch.ops.fxopt.dequantize_int4_grouped(packed, scales, zeros if zero_points else None, group,
                                                      torch.float32)
    expected = (x.float() @ weight.T).half()
    torch.cuda.synchronize()
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()
