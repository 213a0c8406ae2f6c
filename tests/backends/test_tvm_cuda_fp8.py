"""fxopt.cublaslt.matmul_fp8[_bias]: float8_e4m3fn GEMMs through cuBLASLt with per-tensor, per-token and
per-channel scales (issue 22's first kernel).

The argument checks run here, on the CPU machine (every check refuses before the GPU is touched); the numbers
are checked on the GPU machine (marker ``gpu``), exactly: small integers and power-of-two scales make every
product, sum and scaled result exact in fp32 and in the float16 output.
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

E4M3 = torch.float8_e4m3fn
FP8 = "fxopt.cublaslt.matmul_fp8"
FP8_BIAS = "fxopt.cublaslt.matmul_fp8_bias"
QUANTIZE_ROWS = "fxopt.fp8.quantize_rows"


@pytest.fixture(scope="module")
def fp8():
    import tvm_ffi

    from fxopt.backends.tvm_cuda import extension
    extension.load_extension(os.environ.get("FXOPT_CUDA_EXTENSION") or extension.extension_path())
    return tvm_ffi.get_global_func(FP8), tvm_ffi.get_global_func(FP8_BIAS)


def operands(m=8, n=16, k=32, device="cpu"):
    x = torch.zeros(m, k, device=device).to(E4M3)
    w = torch.zeros(n, k, device=device).to(E4M3)
    return x, w, torch.ones(1, device=device), torch.ones(1, device=device), torch.zeros(m, n, device=device).half()


BAD = {
    "x in float16": (lambda x, w, xs, ws, out: (x.half(), w, xs, ws, out), TypeError, "must be float8_e4m3fn"),
    "K not a multiple of 16": (lambda x, w, xs, ws, out: (x[:, :24].contiguous(), w[:, :24].contiguous(), xs, ws,
                                                          out), ValueError, "K a multiple of 16, got 24"),
    "w of another K": (lambda x, w, xs, ws, out: (x, torch.zeros(16, 48).to(E4M3), xs, ws, out), ValueError,
                       "inner dimensions differ"),
    "x_scale of 3": (lambda x, w, xs, ws, out: (x, w, torch.ones(3), ws, out), ValueError,
                     "x_scale must have 1 or M elements"),
    "x_scale per tensor, w_scale per channel": (lambda x, w, xs, ws, out: (x, w, xs, torch.ones(16), out), ValueError,
                                                r"both be per-tensor \(\[1\]\) or both vectors.*got 1 and 16"),
    "scales in float16": (lambda x, w, xs, ws, out: (x, w, xs.half(), ws, out), TypeError, "scales must be float32"),
    "w transposed": (lambda x, w, xs, ws, out: (x, torch.zeros(32, 16).to(E4M3).t(), xs, ws, out), ValueError,
                     "must be contiguous"),
    "out of 15 columns": (lambda x, w, xs, ws, out: (x, w, xs, ws, torch.zeros(8, 15).half()), ValueError,
                          "wrong number of elements"),
    "on the CPU": (lambda x, w, xs, ws, out: (x, w, xs, ws, out), ValueError, "must be on the GPU"),
}

QUANTIZE_BAD = {
    "x in int8": (lambda x, c, s: (x.to(torch.int8), c, s), TypeError, "x must be float16, bfloat16 or float32"),
    "codes in float16": (lambda x, c, s: (x, c.half(), s), ValueError, "codes must be float8_e4m3fn"),
    "scales in float16": (lambda x, c, s: (x, c, s.half()), ValueError, "scales must be float32"),
    "5 scales for 6 rows": (lambda x, c, s: (x, c, s[:5].contiguous()), ValueError, "one element per row"),
    "codes of another size": (lambda x, c, s: (x, c[:, :16].contiguous(), s), ValueError, "as many elements"),
    "x transposed": (lambda x, c, s: (torch.zeros(32, 6).t(), c, s), ValueError, "must be contiguous"),
    "on the CPU": (lambda x, c, s: (x, c, s), ValueError, "must be on the GPU"),
}


def refusal_calls():
    """Every bad call, by case (run in a fresh process: tests/backends/extension_refusals.py)."""
    import tvm_ffi
    fp8, fp8_bias = tvm_ffi.get_global_func(FP8), tvm_ffi.get_global_func(FP8_BIAS)
    calls = {case: (lambda make=make: fp8(*make(*operands()))) for case, (make, _, _) in BAD.items()}
    x, w, xs, ws, out = operands()
    calls["bias of 15"] = lambda: fp8_bias(x, w, xs, ws, torch.zeros(15).half(), out)
    quantize = tvm_ffi.get_global_func(QUANTIZE_ROWS)
    for case, (make, _, _) in QUANTIZE_BAD.items():
        calls["quantize: " + case] = lambda make=make: quantize(*make(torch.zeros(6, 32),
                                                                      torch.zeros(6, 32).to(E4M3), torch.zeros(6)))
    return calls


@pytest.fixture(scope="module")
def refusals():
    return extension_refusals.refusals("tests.backends.test_tvm_cuda_fp8:refusal_calls")


@pytest.mark.parametrize("case", list(BAD))
def test_fp8_gemm_refuses_bad_operands_with_a_clear_error(refusals, case):
    _, error, words = BAD[case]
    kind, message = refusals[case]
    assert kind == error.__name__ and re.search(words, message), (kind, message)


def test_fp8_bias_of_the_wrong_size_is_refused(refusals):
    kind, message = refusals["bias of 15"]
    assert kind == "ValueError" and "bias must be [N] in the dtype of out" in message, (kind, message)


@pytest.mark.parametrize("case", list(QUANTIZE_BAD))
def test_row_quantizer_refuses_bad_operands_with_a_clear_error(refusals, case):
    _, error, words = QUANTIZE_BAD[case]
    kind, message = refusals["quantize: " + case]
    assert kind == error.__name__ and re.search(words, message), (kind, message)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@examples(10)
@given(m=st.integers(1, 300), k=st.sampled_from([16, 768, 3072, 4100]), seed=st.integers(0, 2**31))
def test_row_quantizer_is_bitwise_the_eager_reference(fp8, quantizer, dtype, m, k, seed):
    """Codes and scales bit for bit what fxopt.ops.quantize_rows_fp8 computes (IEEE divisions both ways), on
    rows spanning 8 orders of magnitude (float16 holds them all), with a row of zeros and a row holding values above 448."""
    from fxopt.ir.ops import quantize_rows_fp8
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device="cuda") * 10.0 ** torch.randint(-4, 4, (m, 1), generator=gen,
                                                                               device="cuda")
    x[0] = 0.0
    x[-1, :3] = torch.tensor([1e4, -3e3, 449.0])
    x = x.to(dtype)
    codes = torch.empty(m, k, device="cuda", dtype=E4M3)
    scales = torch.empty(m, device="cuda")
    quantizer(x, codes, scales)
    expected_codes, expected_scales = quantize_rows_fp8(x)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8))


@pytest.fixture(scope="module")
def quantizer(fp8):
    import tvm_ffi
    return tvm_ffi.get_global_func(QUANTIZE_ROWS)


@st.composite
def fp8_shapes(draw):
    return dict(m=draw(st.integers(1, 77)), n=16 * draw(st.integers(1, 12)), k=16 * draw(st.integers(1, 16)),
                seed=draw(st.integers(0, 2 ** 31)))


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("vectors", [False, True], ids=["per-tensor", "per-token-and-channel"])
@examples(10)
@given(shape=fp8_shapes())
def test_fp8_gemm_is_exact_on_small_integers(fp8, vectors, bias, out_dtype, shape):
    """Bound: the output dtype's one rounding of the exact result. Entries in [-2, 2] and K <= 256 keep every
    partial sum an integer of magnitude <= 1024 (exact in fp32, and in Hopper's fp8 accumulators, which keep
    fewer bits); the scales are powers of two in [1/4, 4] and the bias integers in [-8, 8], so the scaled sum plus
    bias is exact in fp32. The reference rounds that fp32 value once to the output dtype, as cuBLASLt's fp32
    epilogue must: any wrong element (operand order, a scale on the wrong axis, a missed K slice, the bias) differs.
    """
    m, n, k = shape["m"], shape["n"], shape["k"]
    gen = torch.Generator(device="cuda").manual_seed(shape["seed"])
    x = torch.randint(-2, 3, (m, k), generator=gen, device="cuda").float()
    w = torch.randint(-2, 3, (n, k), generator=gen, device="cuda").float()
    powers = lambda size: 2.0 ** torch.randint(-2, 3, (size,), generator=gen, device="cuda").float()  # noqa: E731
    xs, ws = powers(m if vectors else 1), powers(n if vectors else 1)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
    expected = (x * (xs[:, None] if vectors else xs)) @ (w * (ws[:, None] if vectors else ws)).T
    if bias:
        b = torch.randint(-8, 9, (n,), generator=gen, device="cuda").to(out_dtype)
        fp8[1](x.to(E4M3), w.to(E4M3), xs, ws, b, out)
        expected = expected + b.float()
    else:
        fp8[0](x.to(E4M3), w.to(E4M3), xs, ws, out)
    torch.cuda.synchronize()
    assert torch.equal(out.float(), expected.to(out_dtype).float()), (out.float() - expected).abs().max()
