"""fxopt.int4.linear[_zp]: the weight-only int4 GEMM (issue 22; made for few rows, any M runs), and its MMA layout.

Argument checks run here in a subprocess (tests/backends/test_tvm_cuda_extension.py registers stand-ins under
the extension's names in this process); the numbers are checked on the GPU machine (marker ``gpu``), exactly:
integer activations, codes in [-8, 7], zero points in [-8, 7] and power-of-two scales keep every product and
partial sum exact in fp32 (multiples of 2^-6 below 2^13), so kernel and reference round one value to float16.
"""
from __future__ import annotations

import math
import os
import re
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxopt.backends.tvm_cuda.int4_layout import mma_layout
from tests.backends import extension_refusals
from tests.harness import examples

pytest.importorskip("tvm_ffi")
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the CUDA extension")

LINEAR, LINEAR_ZP = "fxopt.int4.linear", "fxopt.int4.linear_zp"


def operands(m=2, n=16, k=64, groups=2):
    return (torch.zeros(m, k).half(), torch.zeros(n // 16, k // 64, 32, 16, dtype=torch.uint8),
            torch.ones(n, groups), torch.zeros(m, n).half())


BAD = {
    "x in float32": (lambda x, w, s, o: (x.float(), w, s, o), TypeError, "x and out must be float16"),
    "scales in float16": (lambda x, w, s, o: (x, w, s.half(), o), TypeError, "scales float32"),
    "packed in fxopt's [N, K/2] layout": (lambda x, w, s, o: (x, torch.zeros(16, 32, dtype=torch.uint8), s, o),
                                          ValueError, r"MMA layout"),
    "packed of another K": (lambda x, w, s, o: (torch.zeros(2, 128).half(), w, s, o), ValueError,
                            r"K/64, 32, 16\] for x"),
    "K of 96": (lambda x, w, s, o: (torch.zeros(2, 96).half(), w, s, o), ValueError, "multiple of 64"),
    "groups of 8": (lambda x, w, s, o: (x, w, torch.ones(16, 8), o), ValueError, "G a multiple of 16"),
    "out of 15 columns": (lambda x, w, s, o: (x, w, s, torch.zeros(2, 15).half()), ValueError, "M \\* N elements"),
    "on the CPU": (lambda x, w, s, o: (x, w, s, o), ValueError, "must be on the GPU"),
}

def refusal_calls():
    """Every bad call, by case (run in a fresh process: tests/backends/extension_refusals.py)."""
    import tvm_ffi
    linear, linear_zp = tvm_ffi.get_global_func(LINEAR), tvm_ffi.get_global_func(LINEAR_ZP)
    calls = {case: (lambda make=make: linear(*make(*operands()))) for case, (make, _, _) in BAD.items()}
    x, w, s, o = operands()
    calls["zeros of another shape"] = lambda: linear_zp(x, w, s, torch.zeros(16, 3, dtype=torch.int8), o)
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


def test_the_mma_layout_gives_each_lane_its_a_fragment():
    """Each code lands where mma.m16n8k16's A fragment wants it (PTX ISA: lane 4g + t holds rows g and g + 8 at
    columns 2t, 2t + 1, 2t + 8, 2t + 9; register p = 2j + h, element e at bit 16e + 4p), a 16-byte word holding 4
    tiles along K: placed one code at a time, on 32 x 128 weights, every position checked."""
    n, k = 32, 128
    for row in range(n):
        for col in range(k):
            codes = torch.zeros(n, k, dtype=torch.uint8)
            codes[row, col] = 0xB
            laid = mma_layout(codes[:, 0::2] | (codes[:, 1::2] << 4))
            g, h, tile = row % 8, (row % 16) // 8, row // 16
            chunk, c, j, t, e = col // 64, (col % 64) // 16, (col % 16) // 8, (col % 8) // 2, col % 2
            word = laid[tile, chunk, 4 * g + t, 4 * c:4 * c + 4].to(torch.int64)
            value = int(sum(int(b) << (8 * i) for i, b in enumerate(word)))
            assert value == 0xB << (16 * e + 4 * (2 * j + h)), (row, col, hex(value))
            assert int(laid.to(torch.int64).sum()) == int(word.sum())  # nothing else moved


def test_relax_and_torch_make_the_same_layout():
    """The converter's Relax rearrangement (run by TVM on the CPU) equals the torch one on random codes."""
    import numpy as np
    import tvm
    from tvm import relax

    from fxopt.backends.tvm_cuda.int4_layout import mma_layout_relax
    packed = torch.randint(0, 256, (48, 96), dtype=torch.uint8)
    bb = relax.BlockBuilder()
    arg = relax.Var("packed", relax.TensorType((48, 96), "uint8"))
    with bb.function("main", [arg]):
        with bb.dataflow():
            out = bb.emit_output(mma_layout_relax(bb, arg))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(packed.numpy())).numpy()
    assert np.array_equal(got, mma_layout(packed).numpy())


@pytest.mark.gpu
@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "zero-points"])
@examples(30)
@given(m=st.one_of(st.integers(1, 64), st.integers(65, 200)), tiles=st.integers(1, 20), chunks=st.integers(1, 24),
       group=st.sampled_from([16, 32, 48, 64, 96, 128]), seed=st.integers(0, 2**31))
def test_int4_linear_is_exact_on_small_integers(int4, zero_points, m, tiles, chunks, group, seed):
    """Against fxopt.dequantize_int4_grouped (the eager reference) and an fp32 matmul, exactly. M of 1 to 64 (the
    kernel's 1, 2, 4 and 8 tiles of x, partly filled) and up to 200 (blocks of 64 rows), N of 1 to 20 tiles of 16
    rows, K of 1 to 24 chunks of 64 columns rounded up to a multiple of the group; groups whose scale spans 1, 2
    or 4 of the kernel's 16-column steps."""
    whole = math.lcm(64, group)
    n, k = 16 * tiles, -(-chunks * 64 // whole) * whole
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randint(-3, 4, (m, k), generator=gen, device="cuda").half()
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
    scales = 2.0 ** torch.randint(-6, -2, (n, k // group), generator=gen, device="cuda").float()
    zeros = torch.randint(-8, 8, (n, k // group), generator=gen, device="cuda", dtype=torch.int8)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.float16)
    if zero_points:
        int4[1](x, mma_layout(packed), scales, zeros, out)
    else:
        int4[0](x, mma_layout(packed), scales, out)
    weight = torch.ops.fxopt.dequantize_int4_grouped(packed, scales, zeros if zero_points else None, group,
                                                      torch.float32)
    expected = (x.float() @ weight.T).half()
    torch.cuda.synchronize()
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max()
