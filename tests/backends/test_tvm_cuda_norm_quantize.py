"""LayerNorms that quantize their own float16 output for fp8 and int8 linears (issue 22: "the LayerNorm kernels
write fp8 where that saves a pass over memory").

- the Relax rewrite (rewrite_norm_quantize.py): which LayerNorm + row quantization pairs become one call, on
  the fp8 and int8 pipelines, and that fp16 builds are left alone;
- the kernels' refusals (a subprocess, as the other extension tests);
- on the GPU (marker ``gpu``): out, sum, codes and scales bit for bit what the plain LayerNorm kernel followed by
  the row quantizer write.
"""
from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxopt
from tests.backends import extension_refusals
from tests.harness import examples

pytest.importorskip("tvm_ffi")
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the CUDA extension")

NAMES = ("fxopt.layer_norm", "fxopt.add_layer_norm", "fxopt.add_layer_norm_sum", "fxopt.fp8.quantize_rows",
         "fxopt.int8.quantize_rows", "fxopt.layer_norm_quantized", "fxopt.add_layer_norm_quantized",
         "fxopt.add_layer_norm_sum_quantized")
CODES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


class PostNorm(torch.nn.Module):
    """BERT's layer shape: attention-free, two post-LN residual blocks whose LayerNorms feed linears."""

    def __init__(self, width=64):
        super().__init__()
        self.inp, self.up, self.down = (torch.nn.Linear(width, width), torch.nn.Linear(width, 4 * width),
                                        torch.nn.Linear(4 * width, width))
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)

    def forward(self, x):
        h = self.norm1(x + self.inp(x))
        return self.norm2(h + self.down(torch.relu(self.up(h))))


def lowered_main(precision_pass):
    from fxopt.backends.tvm_cuda.lower import prepare
    graph = fxopt.capture(PostNorm().eval(), (torch.randn(2, 16, 64),))
    if precision_pass:
        graph = fxopt.Pipeline(precision_pass)(graph).graph
    mod, _ = prepare(graph, "float16", keep_params_as_input=True, fused_attention=True)
    return mod["main"].script()


@pytest.mark.parametrize("precision, codes", [("quantize-fp8", "fxopt.fp8"), ("quantize-int8", "fxopt.int8")])
def test_a_layer_norm_feeding_a_quantized_linear_writes_the_codes_itself(precision, codes):
    main = lowered_main(precision)
    # norm1 feeds `up` (quantized): fused. norm2 is the output (nothing quantizes it). x and relu(up) are
    # quantized by the row quantizer, as before.
    assert main.count("fxopt.add_layer_norm_quantized") == 1
    assert main.count(f"{codes}.quantize_rows") == 2
    assert main.count('"fxopt.add_layer_norm"') == 1
    # the residual (h) still reads the LayerNorm's float16 output: its first item
    fused = next(line for line in main.splitlines() if "add_layer_norm_quantized" in line)
    var = fused.split("=")[0].strip()
    assert f"{var}[0]" in main and f"{var}[1]" in main and f"{var}[2]" in main


def test_fp16_builds_keep_their_layer_norms():
    main = lowered_main(None)
    assert "quantized" not in main and main.count('"fxopt.add_layer_norm"') == 2


# ------------------------------------------------------------------------------------ refusals
def operands(codes_dtype=torch.float8_e4m3fn, out_dtype=torch.float16, rows=4, hidden=64):
    return (torch.zeros(rows, hidden).half(), torch.ones(hidden).half(), torch.zeros(hidden).half(), 1e-5,
            torch.zeros(rows, hidden, dtype=out_dtype), torch.zeros(rows, hidden, dtype=codes_dtype),
            torch.zeros(rows))


BAD = {
    "out in float32": (dict(out_dtype=torch.float32), "out must be float16"),
    "codes in float16": (dict(codes_dtype=torch.float16), "codes must be float8_e4m3fn or int8"),
}


def refusal_calls():
    import tvm_ffi
    norm = tvm_ffi.get_global_func("fxopt.layer_norm_quantized")
    calls = {case: (lambda kw=kw: norm(*operands(**kw))) for case, (kw, _) in BAD.items()}
    x, g, b, eps, out, codes, scales = operands()
    calls["scales of 3 rows"] = lambda: norm(x, g, b, eps, out, codes, torch.zeros(3))
    calls["codes of 2 rows"] = lambda: norm(x, g, b, eps, out, codes[:2].contiguous(), scales)
    return calls


@pytest.fixture(scope="module")
def refusals():
    return extension_refusals.refusals("tests.backends.test_tvm_cuda_norm_quantize:refusal_calls")


@pytest.mark.parametrize("case, words", [*((c, w) for c, (_, w) in BAD.items()),
                                         ("scales of 3 rows", "one element per row of out"),
                                         ("codes of 2 rows", "codes and out must have as many elements")])
def test_the_quantizing_layer_norm_refuses_bad_operands(refusals, case, words):
    kind, message = refusals[case]
    assert kind == "ValueError" and re.search(words, message), (kind, message)


# ------------------------------------------------------------------------------------ GPU
@pytest.fixture(scope="module")
def kernels():
    import tvm_ffi

    from fxopt.backends.tvm_cuda import extension
    extension.load_extension(os.environ.get("FXOPT_CUDA_EXTENSION") or extension.extension_path())
    return {name: tvm_ffi.get_global_func(name) for name in NAMES}


@pytest.mark.gpu
@pytest.mark.parametrize("code", list(CODES))
@pytest.mark.parametrize("variant", ["layer_norm", "add_layer_norm", "add_layer_norm_sum"])
@examples(10)
@given(rows=st.integers(1, 300), hidden=st.sampled_from([64, 768, 1024, 3072, 4096]), seed=st.integers(0, 2**31))
def test_codes_are_bitwise_the_plain_layer_norm_then_the_row_quantizer(kernels, code, variant, rows, hidden, seed):
    """Every hidden size's kernel shape (a warp a row up to 1024, blocks of 4 and 8 warps beyond), rows with
    outliers: out (and sum) equal the plain kernel's, codes and scales the row quantizer's on that out."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen, device="cuda") * 3).half()
    residual = torch.randn(rows, hidden, generator=gen, device="cuda").half()
    gamma = (torch.rand(hidden, generator=gen, device="cuda") * 4).half()
    beta = torch.randn(hidden, generator=gen, device="cuda").half()
    new = lambda dtype=torch.float16: torch.full((rows, hidden), 7, device="cuda").to(dtype)  # noqa: E731
    out, out_q, total, total_q = new(), new(), new(), new()
    codes, expected_codes = new(CODES[code]), new(CODES[code])
    scales, expected_scales = torch.full((rows,), 7.0, device="cuda"), torch.full((rows,), 7.0, device="cuda")
    head = (x,) if variant == "layer_norm" else (x, residual)
    sums, sums_q = ((total,), (total_q,)) if variant.endswith("sum") else ((), ())
    kernels[f"fxopt.{variant}"](*head, gamma, beta, 1e-5, out, *sums)
    kernels[f"fxopt.{code}.quantize_rows"](out, expected_codes, expected_scales)
    kernels[f"fxopt.{variant}_quantized"](*head, gamma, beta, 1e-5, out_q, *sums_q, codes, scales)
    torch.cuda.synchronize()
    assert torch.equal(out_q, out) and torch.equal(total_q, total)
    assert torch.equal(scales, expected_scales)
    assert torch.equal(codes.view(torch.int8), expected_codes.view(torch.int8))
