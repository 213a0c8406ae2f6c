"""Time fxopt's fused attention kernel alone against torch SDPA on the GPU machine (BERT-base shapes).

    python3 benchmarks/gpu_attention.py --extension build/gpu_att4/libfxopt_cuda_ext.so
    python3 benchmarks/gpu_attention.py --build /tmp/att --check-all --json $OUT/attention.json

--extension loads a built libfxopt_cuda_ext.so (and cuBLASLt); --build compiles attention.cu alone with nvcc
(extension.py's flags plus -Xptxas -v, whose report goes beside the library), so the GPU machine needs no
cuBLASLt headers. --define NAME=VALUE (repeatable) passes -D to that build, for trying variants
(FXOPT_ATTENTION_WARPS, FXOPT_ATTENTION_MIN_BLOCKS); --library loads such a build again; --quick times only the
BERT-base cases; --profile-once makes three BERT-base calls and exits (for ncu).

Prints one line per case: the kernel's median latency (triton do_bench, L2 flushed before each call), torch
SDPA's, the kernels' own GPU time from torch.profiler (CUPTI, no launch overhead), and the max error against
fp32 math. --check-all first runs the correctness cases (bias fp16/fp32 with broadcast, causal 1 and 2 with
L != S, D 32/64/128/256, D != Dv, L not a multiple of 64, S = 1, fully masked rows).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def math_reference(q, k, v, bias, scale: float, causal: int) -> torch.Tensor:
    """softmax(Q Kᵀ·scale + bias) V in fp32, BSNH in and out; fully masked rows give zeros like the kernel."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.float()
    if causal:
        length, source = scores.shape[-2:]
        keep = torch.ones(length, source, dtype=torch.bool, device=q.device).tril(source - length if causal == 2 else 0)
        scores = scores.masked_fill(~keep, float("-inf"))
    weights = scores.softmax(-1).nan_to_num(0.0)  # a row of -inf only: softmax gives NaN, the kernel zeros
    return (weights @ v).transpose(1, 2)


def build_kernel_only(source: str, folder: str, name: str, extra_flags=()) -> str:
    """nvcc one of the extension's .cu files alone into folder/name, with extension.py's flags (no cuBLASLt)."""
    import tvm_ffi

    from fxopt.backends.tvm_cuda import extension

    ffi_root = os.path.dirname(tvm_ffi.__file__)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    command = ["nvcc", "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17", *extension.GENCODE, *extra_flags,
               os.path.join(extension.HERE, source), "-o", path, f"-I{os.path.join(ffi_root, 'include')}",
               f"-L{os.path.join(ffi_root, 'lib')}", "-lcudart", "-ltvm_ffi"]
    done = subprocess.run(command, capture_output=True, text=True)
    with open(os.path.join(folder, "ptxas.txt"), "w") as f:  # nvcc output (the -Xptxas -v report, if asked)
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"nvcc failed:\n{done.stderr[-4000:]}")
    return path


def build_attention_only(folder: str, defines) -> str:
    """attention.cu alone into folder/libfxopt_attention.so; the ptxas report (-Xptxas -v) is kept beside it."""
    return build_kernel_only("attention.cu", folder, "libfxopt_attention.so",
                             ["-Xptxas", "-v", *[f"-D{d}" for d in defines]])


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def kernel_time_us(fn, names=None, iters: int = 50) -> float:
    """Mean GPU time per call of the kernels whose names contain any of `names`, or of all kernels when None
    (torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and (names is None or any(n in event.name for n in names)):
            total += event.device_time  # us
    return total / iters


CHECKS = [  # batch, len_q, len_k, heads, dim, dim_v, bias (None | "f32" | "f16", shape kind), causal
    (8, 128, 128, 12, 64, 64, ("f32", "b11s"), 0),
    (8, 128, 128, 12, 64, 64, ("f16", "b11s"), 0),
    (8, 128, 128, 12, 64, 64, None, 0),
    (2, 128, 128, 4, 64, 64, ("f32", "bnls"), 0),
    (2, 77, 77, 3, 64, 64, ("f16", "1nls"), 0),
    (2, 77, 77, 3, 64, 64, ("f32", "11l1"), 0),
    (2, 77, 150, 3, 64, 64, None, 1),
    (2, 77, 150, 3, 64, 64, None, 2),
    (2, 150, 77, 3, 64, 64, None, 1),
    (2, 150, 77, 3, 64, 64, ("f32", "b11s"), 2),
    (2, 100, 100, 2, 32, 32, None, 1),
    (2, 100, 130, 2, 128, 128, ("f16", "b11s"), 0),
    (2, 70, 200, 2, 256, 256, ("f32", "b11s"), 2),
    (2, 64, 64, 2, 48, 80, None, 0),
    (2, 33, 65, 2, 256, 16, None, 0),
    (3, 5, 1, 2, 64, 64, None, 0),
    (3, 1, 1, 2, 64, 64, ("f32", "b11s"), 0),
    (3, 1, 300, 2, 64, 64, None, 2),
    (1, 1000, 1000, 2, 64, 64, ("f16", "b11s"), 1),
    (2, 64, 64, 2, 64, 64, ("f32", "masked"), 0),  # some rows fully masked with -inf
    (2, 64, 64, 2, 64, 64, ("f16", "masked"), 1),
]


def make_bias(kind, batch, heads, length, source, dtype):
    shape = {"b11s": (batch, 1, 1, source), "bnls": (batch, heads, length, source), "1nls": (1, heads, length, source),
             "11l1": (1, 1, length, 1), "masked": (batch, heads, length, source)}[kind]
    bias = torch.randn(shape, device="cuda") * 2
    if kind == "b11s":
        bias = torch.zeros(shape, device="cuda")
        bias[1:, ..., source * 3 // 4:] = -1e4 if dtype == torch.float16 else -1e9
    if kind == "masked":
        bias[:, :, ::3, :] = float("-inf")
    return bias.to(dtype)


def run_checks(plain, biased):
    results = []
    torch.manual_seed(1)
    for batch, length, source, heads, dim, dim_v, bias_spec, causal in CHECKS:
        q = torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.float16)
        k = torch.randn(batch, source, heads, dim, device="cuda", dtype=torch.float16)
        v = torch.randn(batch, source, heads, dim_v, device="cuda", dtype=torch.float16)
        bias = None
        if bias_spec is not None:
            dtype = torch.float32 if bias_spec[0] == "f32" else torch.float16
            bias = make_bias(bias_spec[1], batch, heads, length, source, dtype)
        out = torch.full((batch, length, heads, dim_v), float("nan"), device="cuda", dtype=torch.float16)
        scale = dim ** -0.5
        if bias is None:
            plain(q, k, v, scale, causal, out)
        else:
            biased(q, k, v, bias, scale, causal, out)
        torch.cuda.synchronize()
        ref = math_reference(q, k, v, bias, scale, causal)
        err = (out.float() - ref).abs().max().item()
        rel = err / max(ref.abs().max().item(), 1e-6)
        ok = bool(torch.isfinite(out).all().item()) and rel <= 2e-3
        line = (f"check B{batch} L{length} S{source} N{heads} D{dim} Dv{dim_v} bias={bias_spec} causal={causal}: "
                f"max err {err:.2e} (rel to max|ref| {rel:.2e}) {'ok' if ok else 'FAIL'}")
        print(line, flush=True)
        results.append({"case": line.split(":")[0], "max_abs_err": err, "rel_err": rel, "ok": ok})
    return results


TIMINGS = [(8, 128, 12, 64, "f32", 0), (8, 128, 12, 64, "f16", 0), (8, 128, 12, 64, None, 0),
           (8, 128, 12, 64, None, 1), (8, 512, 12, 64, None, 0), (8, 512, 12, 64, "f32", 0), (1, 128, 1, 64, None, 0),
           (4, 1024, 16, 128, None, 1)]


def run_timings(plain, biased, quick: bool = False):
    import triton.testing

    results = []
    torch.manual_seed(0)
    for batch, length, heads, dim, bias_kind, causal in TIMINGS[:3] if quick else TIMINGS:
        q, k, v = (torch.randn(batch, length, heads, dim, device="cuda", dtype=torch.float16) for _ in range(3))
        bias = None
        if bias_kind is not None:
            bias = torch.zeros(batch, 1, 1, length, device="cuda")
            bias[1:, :, :, length * 3 // 4:] = -1e4
            bias = bias.to(torch.float32 if bias_kind == "f32" else torch.float16)
        out = torch.empty_like(q)
        scale = dim ** -0.5
        call = (lambda: biased(q, k, v, bias, scale, causal, out)) if bias is not None else \
            (lambda: plain(q, k, v, scale, causal, out))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        ref = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qt, kt, vt, attn_mask=bias, is_causal=bool(causal), scale=scale)
        call()
        torch.cuda.synchronize()
        err = (out.float() - math_reference(q, k, v, bias, scale, causal)).abs().max().item()
        ours = triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median") * 1e3
        theirs = triton.testing.do_bench(ref, warmup=25, rep=200, return_mode="median") * 1e3
        ours_gpu = kernel_time_us(call, ["FlashKernel", "AttentionKernel"])
        theirs_gpu = kernel_time_us(ref, ["flash", "fmha", "attention", "Attention", "efficient"])
        line = (f"B{batch} L{length} N{heads} D{dim} bias={bias_kind} causal={causal}: fxopt {ours:.1f} us "
                f"(kernel {ours_gpu:.1f}), torch SDPA {theirs:.1f} us (kernels {theirs_gpu:.1f}), "
                f"max err vs fp32 math {err:.2e}")
        print(line, flush=True)
        results.append({"case": line.split(":")[0], "fxopt_us": ours, "fxopt_kernel_us": ours_gpu, "sdpa_us": theirs,
                        "sdpa_kernels_us": theirs_gpu, "max_abs_err": err})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extension", help="a built libfxopt_cuda_ext.so")
    parser.add_argument("--build", help="compile attention.cu alone into this folder and use it")
    parser.add_argument("--library", help="a libfxopt_attention.so that --build made")
    parser.add_argument("--define", action="append", default=[], help="NAME=VALUE for the --build compile")
    parser.add_argument("--check-all", action="store_true", help="run the correctness cases first")
    parser.add_argument("--no-timings", action="store_true")
    parser.add_argument("--quick", action="store_true", help="time only the three BERT-base cases")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--profile-once", action="store_true",
                        help="call the BERT-base kernel with an fp32 mask 3 times and exit (for ncu)")
    args = parser.parse_args()
    import tvm_ffi

    if args.build:
        ctypes.CDLL(os.path.abspath(build_attention_only(args.build, args.define)), mode=ctypes.RTLD_GLOBAL)
    elif args.library:
        ctypes.CDLL(os.path.abspath(args.library), mode=ctypes.RTLD_GLOBAL)
    elif args.extension:
        from fxopt.backends.tvm_cuda.extension import load_extension

        load_extension(args.extension)
    else:
        parser.error("give --extension, --build or --library")
    plain, biased = tvm_ffi.get_global_func("fxopt.attention"), tvm_ffi.get_global_func("fxopt.attention_bias")
    if args.profile_once:
        q, k, v = (torch.randn(8, 128, 12, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        bias, out = torch.zeros(8, 1, 1, 128, device="cuda"), torch.empty_like(q)
        for _ in range(3):
            biased(q, k, v, bias, 0.125, 0, out)
        torch.cuda.synchronize()
        return
    report = {"device": torch.cuda.get_device_name(), "defines": args.define}
    if args.check_all:
        report["checks"] = run_checks(plain, biased)
        print(f"checks: {sum(c['ok'] for c in report['checks'])}/{len(report['checks'])} ok", flush=True)
    if not args.no_timings:
        report["timings"] = run_timings(plain, biased, args.quick)
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
