"""fxopt's fp8 GEMM (``fxopt.cublaslt.matmul_fp8``) against torch on the GPU machine, one process, one table.

    # here: build the extension (nvcc, no GPU) and copy it into the tree that travels
    .venv/bin/python -c "from fxopt.backends.tvm_cuda import extension; print(extension.extension_path())"
    mkdir -p build/kernel_tests_lib && cp <that path> build/kernel_tests_lib/
    # on the GPU machine (carry .tvm and build/kernel_tests_lib):
    source .tvm/setup.sh && export PYTHONPATH=$PWD:$PYTHONPATH && \\
        python3 benchmarks/gpu_fp8_gemm.py --extension build/kernel_tests_lib/libfxopt_cuda_ext.so --json $OUT/fp8.json

Shapes are linears of BERT-base and of a Llama-architecture decoder at 1024 tokens (batch 8 x 128) and at 8 and
64 tokens (decode). For each, in the same process: torch fp16 ``F.linear`` (cuBLAS), and ``torch._scaled_mm``
and fxopt's fp8 GEMM each with row-wise scales (per-token x, per-channel w: torchao's float8 per-row recipe) and
with per-tensor scales (torchao's tensorwise recipe), all timed with ``triton.testing.do_bench`` (median), and each fp8
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


def quantize_tensor(t: torch.Tensor):
    """(fp8 codes, float32 scale [1]): the tensor's absmax maps to e4m3's largest finite value."""
    scale = (t.float().abs().amax().clamp(min=1e-12) / E4M3_MAX).reshape(1)
    return (t.float() / scale).to(E4M3), scale


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).norm() / reference.norm())


def measure(row: dict, key: str, call, reference: torch.Tensor) -> None:
    """row[key + "_ms"] (median) and row[key + "_err"], or row[key] = why it could not run."""
    from triton.testing import do_bench
    try:
        row[key + "_err"] = relative_error(call(), reference)
        row[key + "_ms"] = do_bench(call, return_mode="median")
    except Exception as exc:  # recorded, so one device call reports every variant
        row[key] = f"failed: {type(exc).__name__}: {exc}"[:300]


def one_shape(fp8, m: int, n: int, k: int) -> dict:
    """fp16 F.linear; fxopt and torch._scaled_mm fp8 with row-wise (per-token x, per-channel w) scales and with
    per-tensor scales."""
    from triton.testing import do_bench
    gen = torch.Generator(device="cuda").manual_seed(m * 131 + n * 7 + k)
    x = torch.randn(m, k, generator=gen, device="cuda", dtype=torch.float16)
    w = (torch.randn(n, k, generator=gen, device="cuda") / k ** 0.5).half()
    row = {"m": m, "n": n, "k": k}
    row["torch_fp16_ms"] = do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median")
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    for scales in ("rowwise", "tensorwise"):
        rows_x = quantize_rows(x) if scales == "rowwise" else quantize_tensor(x)
        rows_w = quantize_rows(w) if scales == "rowwise" else quantize_tensor(w)
        (xq, xs), (wq, ws) = rows_x, rows_w
        reference = (xq.float() * (xs[:, None] if xs.numel() > 1 else xs)) @ \
            (wq.float() * (ws[:, None] if ws.numel() > 1 else ws)).T

        def fxopt_call():
            fp8(xq, wq, xs, ws, out)
            return out
        measure(row, f"fxopt_fp8_{scales}", fxopt_call, reference)
        scale_a, scale_b = (xs[:, None], ws[None, :]) if scales == "rowwise" else (xs[0], ws[0])
        measure(row, f"torch_scaled_mm_{scales}",
                lambda: torch._scaled_mm(xq, wq.T, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float16),
                reference)
    return row


def cell(row: dict, key: str) -> str:
    value = row.get(key + "_ms")
    return "fail" if value is None else f"{value:.4f}"


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
    keys = ["fxopt_fp8_rowwise", "torch_scaled_mm_rowwise", "fxopt_fp8_tensorwise", "torch_scaled_mm_tensorwise"]
    print(f"{'linear':22s} {'M':>5s} {'fp16 ms':>9s} " + " ".join(f"{key:>26s}" for key in keys))
    rows = []
    for name, n, k in LINEARS:
        for m in TOKENS:
            row = {"linear": name, **one_shape(fp8, m, n, k)}
            rows.append(row)
            print(f"{name:22s} {m:5d} {row['torch_fp16_ms']:9.4f} " + " ".join(f"{cell(row, key):>26s}" for key in keys),
                  flush=True)
    failures = {key: row[key] for row in rows for key in keys if key in row}
    for key, why in failures.items():
        print(f"{key}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
