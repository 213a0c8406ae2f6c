"""fxopt's fp8 GEMM (``fxopt.cublaslt.matmul_fp8``) against torch on the GPU machine, one process, one table.

    # here: build the extension (nvcc, no GPU) and copy it into the tree that travels
    .venv/bin/python -c "from fxopt.backends.tvm_cuda import extension; print(extension.extension_path())"
    mkdir -p build/kernel_tests_lib && cp <that path> build/kernel_tests_lib/
    # on the GPU machine (carry .tvm and build/kernel_tests_lib):
    source .tvm/setup.sh && export PYTHONPATH=$PWD:$PYTHONPATH && \\
        python3 benchmarks/gpu_fp8_gemm.py --extension build/kernel_tests_lib/libfxopt_cuda_ext.so --json $OUT/fp8.json

Shapes are linears of BERT-base and of a Llama-architecture decoder at 1024 tokens (batch 8 x 128) and at 8 and
64 tokens (decode). For each, in the same process: torch fp16 ``F.linear`` (cuBLAS), ``torch._scaled_mm`` fp8
with row-wise scales (what torchao's float8 per-row recipe runs) where this torch has it, and fxopt's fp8 GEMM
with per-token x and per-channel w scales, all timed with ``triton.testing.do_bench`` (median), and each fp8
result checked against fp32 math on the dequantized operands (relative Frobenius error).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
#: (name, N, K) of the linears; M is the token count
LINEARS = [("bert qkv", 2304, 768), ("bert ffn up", 3072, 768), ("bert ffn down", 768, 3072),
           ("llama qkv (12q/4kv)", 1280, 768), ("llama gate+up", 4096, 768), ("llama down", 768, 2048)]
TOKENS = (8, 64, 1024)


def quantize_rows(t: torch.Tensor):
    """(fp8 codes, float32 scale per row): each row's absmax maps to e4m3's largest finite value."""
    scale = t.float().abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
    return (t.float() / scale[:, None]).to(E4M3), scale


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).norm() / reference.norm())


def one_shape(fp8, m: int, n: int, k: int) -> dict:
    from triton.testing import do_bench
    gen = torch.Generator(device="cuda").manual_seed(m * 131 + n * 7 + k)
    x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.float16)
    w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).half()
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    reference = (xq.float() * xs[:, None]) @ (wq.float() * ws[:, None]).T
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    row = {"m": m, "n": n, "k": k}
    row["torch_fp16_ms"] = do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median")
    fp8(xq, wq, xs, ws, out)
    row["fxopt_fp8_err"] = relative_error(out, reference)
    row["fxopt_fp8_ms"] = do_bench(lambda: fp8(xq, wq, xs, ws, out), return_mode="median")
    if hasattr(torch, "_scaled_mm"):
        try:
            call = lambda: torch._scaled_mm(xq, wq.T, scale_a=xs[:, None], scale_b=ws[None, :],  # noqa: E731
                                            out_dtype=torch.float16)
            row["torch_scaled_mm_err"] = relative_error(call(), reference)
            row["torch_scaled_mm_ms"] = do_bench(call, return_mode="median")
        except Exception as exc:  # a torch without row-wise scaling on this card
            row["torch_scaled_mm"] = f"unavailable: {exc}"[:200]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extension", required=True, help="a built libfxopt_cuda_ext.so")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    import tvm_ffi

    from fxopt.backends.tvm_cuda import extension
    extension.load_extension(args.extension)
    fp8 = tvm_ffi.get_global_func("fxopt.cublaslt.matmul_fp8")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'linear':22s} {'M':>5s} {'fp16 ms':>9s} {'fxopt fp8':>10s} {'_scaled_mm':>10s} {'fxopt err':>10s}")
    rows = []
    for name, n, k in LINEARS:
        for m in TOKENS:
            row = {"linear": name, **one_shape(fp8, m, n, k)}
            rows.append(row)
            scaled = row.get("torch_scaled_mm_ms")
            print(f"{name:22s} {m:5d} {row['torch_fp16_ms']:9.4f} {row['fxopt_fp8_ms']:10.4f} "
                  f"{scaled if scaled is None else round(scaled, 4)!s:>10s} {row['fxopt_fp8_err']:10.2e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
