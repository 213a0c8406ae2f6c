"""fxopt's int8 GEMM path (issue 22): fxopt.int8.quantize_rows, fxopt.cublaslt.matmul_int8 (cuBLASLt's int8 x
int8 -> int32 tensor-core GEMM) and fxopt.int8.dequantize[_bias] (int32 sums scaled per token and per channel,
plus the bias, to 16-bit floats).

The argument checks run here, on the CPU machine (every check refuses before the GPU is touched); the numbers
are checked on the GPU machine (marker ``gpu``): the GEMM exactly against torch's integer product, the quantizer
and the epilogue bit for bit against their torch references in fxopt.ir.ops, and the three calls in a row bit for
bit against fxopt.linear_int8's eager kernel.
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

I8, I32 = torch.int8, torch.int32
GEMM = "fxopt.cublaslt.matmul_int8"
QUANTIZE_ROWS = "fxopt.int8.quantize_rows"
DEQUANTIZE, DEQUANTIZE_BIAS = "fxopt.int8.dequantize", "fxopt.int8.dequantize_bias"


@pytest.fixture(scope="module")
def int8():
    """The four functions, by name, from the extension loaded in this process."""
    import tvm_ffi

    from fxopt.backends.tvm_cuda import extension
    extension.load_extension(os.environ.get("FXOPT_CUDA_EXTENSION") or extension.extension_path())
    return {name: tvm_ffi.get_global_func(name) for name in (GEMM, QUANTIZE_ROWS, DEQUANTIZE, DEQUANTIZE_BIAS)}


# ------------------------------------------------------------------------------------ refusals
GEMM_BAD = {
    "x in float16": (lambda x, w, out: (x.half(), w, out), TypeError, "int8 x and w must be int8"),
    "out in float16": (lambda x, w, out: (x, w, out.half()), TypeError, "int8 out must be int32"),
    "K not a multiple of 4": (lambda x, w, out: (x[:, :30].contiguous(), w[:, :30].contiguous(), out), ValueError,
                              r"K and N multiples of 4 .*got K=30, N=16"),
    "N not a multiple of 4": (lambda x, w, out: (x, w[:14].contiguous(), torch.zeros(8, 14, dtype=I32)), ValueError,
                              r"K and N multiples of 4 .*got K=32, N=14"),
    "w of another K": (lambda x, w, out: (x, torch.zeros(16, 48, dtype=I8), out), ValueError,
                       "inner dimensions differ"),
    "w of rank 3": (lambda x, w, out: (x, w[None], out), ValueError, r"x must be \[..., M, K\], w \[N, K\]"),
    "w transposed": (lambda x, w, out: (x, torch.zeros(32, 16, dtype=I8).t(), out), ValueError, "must be contiguous"),
    "out of 15 columns": (lambda x, w, out: (x, w, torch.zeros(8, 15, dtype=I32)), ValueError,
                          "wrong number of elements"),
    "on the CPU": (lambda x, w, out: (x, w, out), ValueError, "must be on the GPU"),
}

QUANTIZE_BAD = {
    "x in int8": (lambda x, c, s: (x.to(I8), c, s), TypeError, "int8.quantize_rows: x must be float16, bfloat16 or"),
    "codes in float8": (lambda x, c, s: (x, c.to(torch.float8_e4m3fn), s), ValueError, "codes must be int8"),
    "scales in float16": (lambda x, c, s: (x, c, s.half()), ValueError, "scales must be float32"),
    "5 scales for 6 rows": (lambda x, c, s: (x, c, s[:5].contiguous()), ValueError, "one element per row"),
    "codes of another size": (lambda x, c, s: (x, c[:, :16].contiguous(), s), ValueError, "as many elements"),
    "on the CPU": (lambda x, c, s: (x, c, s), ValueError, "int8.quantize_rows: tensors must be on the GPU"),
}

DEQUANTIZE_BAD = {
    "acc in float32": (lambda a, xs, ws, out: (a.float(), xs, ws, out), TypeError, "acc must be int32"),
    "scales in float16": (lambda a, xs, ws, out: (a, xs.half(), ws, out), TypeError, "must be float32"),
    "out in float32": (lambda a, xs, ws, out: (a, xs, ws, out.float()), TypeError, "out must be float16 or bfloat16"),
    "w_scale of 15": (lambda a, xs, ws, out: (a, xs, ws[:15].contiguous(), out), ValueError,
                      r"w_scale must have N elements"),
    "x_scale of 7": (lambda a, xs, ws, out: (a, xs[:7].contiguous(), ws, out), ValueError,
                     "x_scale must have one element per row"),
    "out of another size": (lambda a, xs, ws, out: (a, xs, ws, out[:, :8].contiguous()), ValueError,
                            "out as many elements"),
    "on the CPU": (lambda a, xs, ws, out: (a, xs, ws, out), ValueError, "int8.dequantize: tensors must be on the GPU"),
}


def gemm_operands():
    return torch.zeros(8, 32, dtype=I8), torch.zeros(16, 32, dtype=I8), torch.zeros(8, 16, dtype=I32)


def dequantize_operands():
    return torch.zeros(8, 16, dtype=I32), torch.ones(8), torch.ones(16), torch.zeros(8, 16).half()


def refusal_calls():
    """Every bad call, by case (run in a fresh process: tests/backends/extension_refusals.py)."""
    import tvm_ffi
    f = {name: tvm_ffi.get_global_func(name) for name in (GEMM, QUANTIZE_ROWS, DEQUANTIZE, DEQUANTIZE_BIAS)}
    calls = {"gemm: " + case: (lambda make=make: f[GEMM](*make(*gemm_operands()))) for case, (make, _, _) in
             GEMM_BAD.items()}
    for case, (make, _, _) in QUANTIZE_BAD.items():
        calls["quantize: " + case] = lambda make=make: f[QUANTIZE_ROWS](*make(
            torch.zeros(6, 32), torch.zeros(6, 32, dtype=I8), torch.zeros(6)))
    for case, (make, _, _) in DEQUANTIZE_BAD.items():
        calls["dequantize: " + case] = lambda make=make: f[DEQUANTIZE](*make(*dequantize_operands()))
    acc, xs, ws, out = dequantize_operands()
    calls["dequantize: bias of 15"] = lambda: f[DEQUANTIZE_BIAS](acc, xs, ws, torch.zeros(15).half(), out)
    calls["dequantize: bias in bfloat16"] = lambda: f[DEQUANTIZE_BIAS](acc, xs, ws, torch.zeros(16).bfloat16(), out)
    return calls


@pytest.fixture(scope="module")
def refusals():
    return extension_refusals.refusals("tests.backends.test_tvm_cuda_int8:refusal_calls")


@pytest.mark.parametrize("table, prefix", [(GEMM_BAD, "gemm: "), (QUANTIZE_BAD, "quantize: "),
                                           (DEQUANTIZE_BAD, "dequantize: ")], ids=["gemm", "quantize", "dequantize"])
def test_int8_functions_refuse_bad_operands_with_a_clear_error(refusals, table, prefix):
    for case, (_, error, words) in table.items():
        kind, message = refusals[prefix + case]
        assert kind == error.__name__ and re.search(words, message), (case, kind, message)


@pytest.mark.parametrize("case", ["bias of 15", "bias in bfloat16"])
def test_dequantize_refuses_a_bias_that_is_not_n_in_the_dtype_of_out(refusals, case):
    kind, message = refusals["dequantize: " + case]
    assert kind == "ValueError" and "bias must be [N] in the dtype of out" in message, (kind, message)


# ------------------------------------------------------------------------------------ on the GPU
@st.composite
def int8_shapes(draw):
    return dict(m=draw(st.integers(1, 300)), n=4 * draw(st.integers(1, 48)), k=4 * draw(st.integers(1, 200)),
                seed=draw(st.integers(0, 2 ** 31)))


@pytest.mark.gpu
@examples(20)
@given(shape=int8_shapes())
def test_int8_gemm_is_torchs_integer_product(int8, shape):
    """Exact: int32 sums of int8 products, against torch's int64 product of the same codes (the full range,
    -128..127, and K up to 800: every sum fits int32). Every shape cuBLASLt takes (K and N multiples of 4, any M,
    a 3-D x), so a wrong operand order, transpose or leading dimension differs."""
    m, n, k = shape["m"], shape["n"], shape["k"]
    gen = torch.Generator(device="cuda").manual_seed(shape["seed"])
    x = torch.randint(-128, 128, (1, m, k), generator=gen, device="cuda", dtype=I8)
    w = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=I8)
    out = torch.full((1, m, n), -1, device="cuda", dtype=I32)
    int8[GEMM](x, w, out)
    torch.cuda.synchronize()
    expected = (x.cpu().long() @ w.cpu().long().T).to(I32).cuda()  # torch has no int64 matmul on CUDA
    assert torch.equal(out, expected), (out != expected).sum()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@examples(10)
@given(m=st.integers(1, 300), k=st.sampled_from([16, 768, 3072, 4100]), seed=st.integers(0, 2**31))
def test_row_quantizer_is_bitwise_the_eager_reference(int8, dtype, m, k, seed):
    """Codes and scales bit for bit what fxopt.ops.quantize_rows_int8 computes (IEEE divisions, ties to even),
    on rows spanning 8 orders of magnitude, with a row of zeros and a row of exact ties (0.5 steps)."""
    from fxopt.ir.ops import quantize_rows_int8
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device="cuda") * 10.0 ** torch.randint(-4, 4, (m, 1), generator=gen,
                                                                               device="cuda")
    x[0] = 0.0
    x[-1] = torch.arange(k, device="cuda") % 254 - 127 + 0.5  # -126.5 .. 126.5
    x[-1, 0] = 127.0  # scale 1: every other value a tie
    x = x.to(dtype)
    codes = torch.empty(m, k, device="cuda", dtype=I8)
    scales = torch.empty(m, device="cuda")
    int8[QUANTIZE_ROWS](x, codes, scales)
    expected_codes, expected_scales = quantize_rows_int8(x)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes, expected_codes)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@examples(10)
@given(m=st.integers(1, 300), n=st.integers(1, 64).map(lambda i: 4 * i), seed=st.integers(0, 2**31))
def test_dequantize_epilogue_is_bitwise_the_eager_reference(int8, bias, out_dtype, m, n, seed):
    """acc * x_scale[m] * w_scale[n] (+ bias[n]) in fp32, one rounding per operation, then to the 16-bit out:
    bit for bit fxopt.ops.dequantize_int32_rows, on sums of the whole int32 range (past 2^24, where the
    conversion to float rounds) and scales of 4 orders of magnitude. A fused multiply-add, the scales swapped or
    the bias added before scaling differs."""
    from fxopt.ir.ops import dequantize_int32_rows
    gen = torch.Generator(device="cuda").manual_seed(seed)
    acc = torch.randint(-2 ** 31, 2 ** 31 - 1, (m, n), generator=gen, device="cuda", dtype=I32)
    acc[0] = torch.randint(-1000, 1000, (n,), generator=gen, device="cuda", dtype=I32)
    xs = torch.rand(m, generator=gen, device="cuda") * 1e-6 + 1e-8
    ws = torch.rand(n, generator=gen, device="cuda") * 1e-3 + 1e-7
    b = torch.randn(n, generator=gen, device="cuda").to(out_dtype) if bias else None
    out = torch.full((m, n), float("nan"), device="cuda", dtype=out_dtype)
    if bias:
        int8[DEQUANTIZE_BIAS](acc, xs, ws, b, out)
    else:
        int8[DEQUANTIZE](acc, xs, ws, out)
    torch.cuda.synchronize()
    expected = dequantize_int32_rows(acc, xs, ws, b, out_dtype)
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()


@pytest.mark.gpu
@examples(10)
@given(m=st.integers(1, 200), k=st.sampled_from([32, 384, 1536]), n=st.sampled_from([16, 384, 1536]),
       seed=st.integers(0, 2**31))
def test_the_three_calls_are_bitwise_linear_int8s_eager_kernel(int8, m, k, n, seed):
    """What convert_int8 emits: x (float16) and the float32 weight quantized per row, the int32 GEMM, the
    epilogue with a float16 bias; against torch.ops.fxopt.linear_int8 on the same tensors, on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device="cuda").half()
    w = torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5
    b = torch.randn(n, generator=gen, device="cuda").half()
    xq, xs = torch.empty(m, k, device="cuda", dtype=I8), torch.empty(m, device="cuda")
    wq, ws = torch.empty(n, k, device="cuda", dtype=I8), torch.empty(n, device="cuda")
    acc, out = torch.empty(m, n, device="cuda", dtype=I32), torch.empty(m, n, device="cuda").half()
    int8[QUANTIZE_ROWS](x, xq, xs)
    int8[QUANTIZE_ROWS](w, wq, ws)
    int8[GEMM](xq, wq, acc)
    int8[DEQUANTIZE_BIAS](acc, xs, ws, b, out)
    torch.cuda.synchronize()
    assert torch.equal(out, torch.ops.fxopt.linear_int8(x, w, b))
