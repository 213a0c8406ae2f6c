"""Check and time fxopt's LayerNorm and GELU kernels (norm_act.cu) alone against PyTorch on the GPU machine.

    python3 benchmarks/gpu_norm_act.py --extension build/gpu_att7/libfxopt_cuda_ext.so --json $OUT/norm_act.json
    python3 benchmarks/gpu_norm_act.py --build /tmp/norm_act            # nvcc norm_act.cu alone, no cuBLASLt needed

Correctness: every dtype combination the Relax rewrite can emit (x and residual float16 or float32, gamma/beta
float16 or float32, out float16 or float32, with and without the sum output) over hidden sizes from 8 to 8192
(each kernel configuration: warp per row, 4 and 8 warps per row) and row counts that do not fill a block, against
fp32 math on the same inputs; GELU (erf and tanh) against torch's fp32 GELU, including a size with a tail and an
unaligned view. Pass: max |err| / max |ref| <= 2e-3. Timings: BERT-base shapes (1024 x 768 add + LN, 1024 x 3072
GELU), the kernel against PyTorch eager fp16 (add, then layer_norm; gelu), median of triton's do_bench and the
kernels' own GPU time (CUPTI).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.gpu_attention import build_kernel_only, kernel_time_us, write_json  # noqa: E402

TOL = 2e-3


def build_norm_act_only(folder: str) -> str:
    """norm_act.cu alone into folder/libfxopt_norm_act.so, with extension.py's flags."""
    return build_kernel_only("norm_act.cu", folder, "libfxopt_norm_act.so")


def relative_max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)


DT = {"f16": torch.float16, "f32": torch.float32}
#: (rows, hidden, x, residual (None: plain LN), gamma/beta, out, write the sum)
NORM_CASES = [
    (1024, 768, "f16", "f16", "f32", "f16", False),  # BERT: post-LN, fp32 LN weights
    (1024, 768, "f16", "f16", "f32", "f32", False),  # the output LN
    (1024, 768, "f16", "f32", "f32", "f16", True),  # GPT-2 / ViT first block: fp32 residual, sum kept
    (1024, 768, "f16", "f16", "f16", "f16", True),
    (1024, 768, "f32", None, "f32", "f16", False),  # the embeddings' LN
    (1576, 768, "f16", "f16", "f32", "f16", True),  # ViT's rows
    (7, 64, "f16", "f16", "f16", "f16", False),  # tiny: lanes idle, rows not filling a block
    (3, 8, "f32", "f16", "f16", "f32", True),
    (33, 256, "f16", None, "f16", "f16", False),
    (5, 1000, "f16", "f16", "f32", "f16", False),  # H not a multiple of 32 * 8: masked chunks
    (64, 1024, "f16", "f16", "f32", "f16", True),
    (64, 1600, "f16", "f16", "f32", "f16", False),  # 4 warps a row
    (17, 2048, "f32", "f32", "f32", "f32", True),
    (9, 4096, "f16", "f16", "f16", "f16", True),
    (5, 8192, "f16", "f16", "f32", "f16", True),  # 8 warps a row
]


def run_norm_checks(functions) -> list:
    plain, added, with_sum = functions["fxopt.layer_norm"], functions["fxopt.add_layer_norm"], \
        functions["fxopt.add_layer_norm_sum"]
    results = []
    torch.manual_seed(0)
    for rows, hidden, xd, rd, gd, od, keep_sum in NORM_CASES:
        x = (torch.randn(rows, hidden, device="cuda") * 3 + 1).to(DT[xd])
        r = None if rd is None else torch.randn(rows, hidden, device="cuda").to(DT[rd])
        gamma = (torch.rand(hidden, device="cuda") + 0.5).to(DT[gd])
        beta = torch.randn(hidden, device="cuda").to(DT[gd])
        out = torch.full((rows, hidden), float("nan"), device="cuda", dtype=DT[od])
        total = torch.full((rows, hidden), float("nan"), device="cuda", dtype=torch.float16) if keep_sum else None
        eps = 1e-5
        if r is None:
            plain(x, gamma, beta, eps, out)
        elif total is None:
            added(x, r, gamma, beta, eps, out)
        else:
            with_sum(x, r, gamma, beta, eps, out, total)
        torch.cuda.synchronize()
        summed = x.float() + (0 if r is None else r.float())
        ref = torch.nn.functional.layer_norm(summed, (hidden,), gamma.float(), beta.float(), eps)
        err = relative_max_err(out, ref)
        sum_err = relative_max_err(total, summed) if total is not None else 0.0
        ok = bool(torch.isfinite(out).all()) and err <= TOL and sum_err <= TOL
        case = f"LN rows {rows} H {hidden} x {xd} residual {rd} gamma {gd} out {od} sum {keep_sum}"
        print(f"check {case}: max err/max|ref| {err:.2e}, sum {sum_err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
        results.append({"case": case, "rel_err": err, "sum_rel_err": sum_err, "ok": ok})
    return results


def run_gelu_checks(functions) -> list:
    results = []
    torch.manual_seed(0)
    for name, approximate in (("fxopt.gelu", "none"), ("fxopt.gelu_tanh", "tanh")):
        for n, offset in ((1024 * 3072, 0), (1001, 0), (4099, 1)):
            base = (torch.randn(n + offset, device="cuda") * 3).half()
            x = base[offset:]  # offset 1: a 2-byte-aligned view, the scalar kernel
            out = torch.full((n + offset,), float("nan"), device="cuda", dtype=torch.float16)[offset:]
            functions[name](x, out)
            torch.cuda.synchronize()
            ref = torch.nn.functional.gelu(x.float(), approximate=approximate)
            err = relative_max_err(out, ref)
            torch16 = relative_max_err(torch.nn.functional.gelu(x, approximate=approximate), ref)
            ok = bool(torch.isfinite(out).all()) and err <= TOL
            case = f"{name} n {n} offset {offset}"
            print(f"check {case}: max err/max|ref| {err:.2e} (torch fp16 {torch16:.2e}) {'ok' if ok else 'FAIL'}",
                  flush=True)
            results.append({"case": case, "rel_err": err, "torch_fp16_rel_err": torch16, "ok": ok})
    return results


def run_timings(functions) -> list:
    import triton.testing

    torch.manual_seed(0)
    x, r = (torch.randn(1024, 768, device="cuda").half() for _ in range(2))
    gamma, beta = torch.rand(768, device="cuda") + 0.5, torch.randn(768, device="cuda")
    out, total = torch.empty_like(x), torch.empty_like(x)
    h = torch.randn(1024, 3072, device="cuda").half()
    gout = torch.empty_like(h)
    g16, b16 = gamma.half(), beta.half()
    cases = [
        ("add + LN 1024x768 (out)", lambda: functions["fxopt.add_layer_norm"](x, r, gamma, beta, 1e-12, out),
         lambda: torch.nn.functional.layer_norm(x + r, (768,), g16, b16, 1e-12)),
        ("add + LN 1024x768 (out, sum)",
         lambda: functions["fxopt.add_layer_norm_sum"](x, r, gamma, beta, 1e-12, out, total),
         lambda: torch.nn.functional.layer_norm(x + r, (768,), g16, b16, 1e-12)),
        ("gelu 1024x3072", lambda: functions["fxopt.gelu"](h, gout), lambda: torch.nn.functional.gelu(h)),
        ("gelu_tanh 1024x3072", lambda: functions["fxopt.gelu_tanh"](h, gout),
         lambda: torch.nn.functional.gelu(h, approximate="tanh")),
    ]
    results = []
    for case, ours, theirs in cases:
        ours_us = triton.testing.do_bench(ours, warmup=25, rep=100, return_mode="median") * 1e3
        theirs_us = triton.testing.do_bench(theirs, warmup=25, rep=100, return_mode="median") * 1e3
        ours_gpu, theirs_gpu = kernel_time_us(ours), kernel_time_us(theirs)
        print(f"time {case}: fxopt {ours_us:.1f} us (kernel {ours_gpu:.2f}), torch eager fp16 {theirs_us:.1f} us "
              f"(kernels {theirs_gpu:.2f})", flush=True)
        results.append({"case": case, "fxopt_us": ours_us, "fxopt_kernel_us": ours_gpu, "torch_us": theirs_us,
                        "torch_kernels_us": theirs_gpu})
    return results


NAMES = ("fxopt.layer_norm", "fxopt.add_layer_norm", "fxopt.add_layer_norm_sum", "fxopt.gelu", "fxopt.gelu_tanh")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extension", help="a built libfxopt_cuda_ext.so")
    parser.add_argument("--build", help="compile norm_act.cu alone into this folder and use it")
    parser.add_argument("--no-timings", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import tvm_ffi

    if args.build:
        ctypes.CDLL(os.path.abspath(build_norm_act_only(args.build)), mode=ctypes.RTLD_GLOBAL)
    elif args.extension:
        from fxopt.backends.tvm_cuda.extension import load_extension

        load_extension(args.extension)
    else:
        parser.error("give --extension or --build")
    functions = {name: tvm_ffi.get_global_func(name) for name in NAMES}
    report = {"device": torch.cuda.get_device_name()}
    report["checks"] = run_norm_checks(functions) + run_gelu_checks(functions)
    print(f"checks: {sum(c['ok'] for c in report['checks'])}/{len(report['checks'])} ok", flush=True)
    if not args.no_timings:
        report["timings"] = run_timings(functions)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
