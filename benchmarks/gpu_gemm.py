"""BERT-base's matmuls alone: TVM 0.27 tensor-core schedules against torch (cuBLAS) on the GPU.

Two steps, on two machines (like benchmarks/gpu_bert.py):

    # here (TVM compiler + nvcc, no GPU): build every candidate x shape, export .so with a fatbin each
    .venv/bin/python benchmarks/gpu_gemm.py --build build/gpu_gemm [--candidates a,b] [--shapes qkv,ffn_up]

    # on the GPU machine (torch; TVM runtime only, from .tvm/):
    source .tvm/setup.sh && python3 benchmarks/gpu_gemm.py --run build/gpu_gemm --out $OUT

Shapes (batch 8 x seq 128 = 1024 tokens): ``Y[1024, N] = X[1024, K] . W[N, K]^T`` as in F.linear,
fp16 inputs; out fp32 (what fxopt's BERT build does today: ToMixedPrecision's fp32-out matmul) or
fp16 (fp32 accumulation cast in the epilogue, or fp16 accumulation).

Candidates (each a PrimFunc ``main(A, B, C)`` scheduled here, one library per candidate x shape):

- ``dlight_f32out`` / ``dlight_f16out``: dlight's default ``gpu.Matmul`` (WMMA), fxopt's path today;
- ``mma*``: :mod:`fxopt.backends.tvm_cuda.matmul_mma` (ldmatrix + mma.sync + cp.async pipeline),
  several tiles, fp16 out, and ``*_f32out`` for fp32 out.

``--run`` times each library's ``main`` with CUDA events (median of repeated batches, after a
warm-up) on torch-allocated tensors passed by DLPack, times ``torch.nn.functional.linear`` in fp16
the same way, and checks every result against fp32 torch (relative Frobenius error).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPES = {  # name: (M, N, K)
    "qkv_out": (1024, 768, 768),
    "ffn_up": (1024, 3072, 768),
    "ffn_down": (1024, 768, 3072),
}


# ---------------------------------------------------------------- build
def matmul_func(m: int, n: int, k: int, out_dtype: str, accum: str = "float32"):
    """``C[m, n] = sum_k A[m, k] * B[n, k]`` in ``accum``, then cast to ``out_dtype`` (a separate block)."""
    from tvm import te

    a = te.placeholder((m, k), "float16", name="A")
    b = te.placeholder((n, k), "float16", name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r].astype(accum) * b[j, r].astype(accum), axis=r), name="C")
    if out_dtype != accum:
        d = te.compute((m, n), lambda i, j: c[i, j].astype(out_dtype), name="D")
        return te.create_prim_func([a, b, d]).with_attr("global_symbol", "main")
    return te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")


def candidates() -> Dict[str, dict]:
    """name -> {"out": dtype, "accum": dtype, "rule": a callable making the dlight rule}."""
    from fxopt.backends.tvm_cuda.matmul_mma import CONFIGS

    out = {
        "dlight_f32out": {"out": "float32", "accum": "float32", "mma": None},
        "dlight_f16out": {"out": "float16", "accum": "float32", "mma": None},
        "dlight_f16acc": {"out": "float16", "accum": "float16", "mma": None},
    }
    for name, cfg in CONFIGS.items():
        out[name] = {"out": "float16", "accum": cfg.accum, "mma": name}
    first = next(iter(CONFIGS))
    out[first + "_f32out"] = {"out": "float32", "accum": "float32", "mma": first}
    return out


def schedule(func, cand: dict, target):
    """The scheduled IRModule of one candidate, or an exception saying why the rule declined."""
    import tvm
    from tvm.s_tir import dlight as dl

    from fxopt.backends.tvm_cuda.matmul_mma import CONFIGS, MatmulMMA, as_dlight_rule

    mod = tvm.IRModule({"main": func})
    if cand["mma"] is None:
        rules = [dl.gpu.Matmul(), dl.gpu.Fallback()]
    else:
        rules = [as_dlight_rule(MatmulMMA(CONFIGS[cand["mma"]]))]
    with target:
        mod = dl.ApplyDefaultSchedule(*rules)(mod)
    if not mod["main"].attrs or "tirx.is_scheduled" not in mod["main"].attrs.keys():
        raise RuntimeError("no rule scheduled the matmul")
    return mod


def build_all(out_dir: str, names: List[str], shapes: List[str], arch: str) -> dict:
    import tvm

    from fxopt.backends.tvm_cuda.device_binary import (
        compile_fatbin, cuda_source, export_library, preload_tensor_intrinsics,
    )
    from fxopt.backends.tvm_cuda.lower import cuda_target

    preload_tensor_intrinsics()
    target = cuda_target(arch)
    cands = candidates()
    os.makedirs(out_dir, exist_ok=True)
    manifest = {"arch": arch, "date": datetime.date.today().isoformat(), "shapes": {s: SHAPES[s] for s in shapes},
                "libs": [], "failed": []}
    for name in names:
        cand = cands[name]
        for shape in shapes:
            m, n, k = SHAPES[shape]
            t0 = time.time()
            try:
                mod = schedule(matmul_func(m, n, k, cand["out"], cand["accum"]), cand, target)
                with tvm.transform.PassContext(opt_level=3, config={"tirx.use_async_copy": True}):
                    lib = tvm.compile(mod, target=target)
                source = cuda_source(lib)
                fatbin = compile_fatbin(source, target)
                path = os.path.join(out_dir, f"{name}__{shape}.so")
                export_library(lib, path, {source: fatbin})
                with open(path[:-3] + ".cu", "w") as f:
                    f.write(source)
            except Exception as exc:  # noqa: BLE001 - report and go on with the other candidates
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                print(f"FAILED {name} {shape}: {msg}", flush=True)
                manifest["failed"].append({"candidate": name, "shape": shape, "error": msg[:500]})
                continue
            entry = {"candidate": name, "shape": shape, "lib": os.path.basename(path), "out": cand["out"],
                     "accum": cand["accum"], "build_s": round(time.time() - t0, 2),
                     "ldmatrix": source.count("ldmatrix"), "mma_sync": source.count("mma.sync"),
                     "wmma": source.count("wmma::mma_sync"), "cp_async": source.count("cp.async.cg") +
                     source.count("cp.async.ca")}
            print(json.dumps(entry), flush=True)
            manifest["libs"].append(entry)
    with open(os.path.join(out_dir, "build.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ------------------------------------------------------------------ run
def run_all(lib_dir: str, out_dir: str, iters: int = 200) -> dict:
    import torch

    import tvm
    from fxopt.backends.tvm_cuda.runtime import load_cuda_runtime

    load_cuda_runtime()
    with open(os.path.join(lib_dir, "build.json")) as f:
        manifest = json.load(f)
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def bench(fn) -> float:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / iters)
        return sorted(times)[len(times) // 2]

    data, rows = {}, []
    for shape, (m, n, k) in manifest["shapes"].items():
        a = (torch.randn(m, k, generator=gen) * 0.5).half().to(dev)
        b = (torch.randn(n, k, generator=gen) / k ** 0.5).half().to(dev)
        ref = torch.nn.functional.linear(a.float(), b.float())
        data[shape] = (a, b, ref)
        flops = 2 * m * n * k
        for label, fn in [("torch F.linear fp16", lambda: torch.nn.functional.linear(a, b)),
                          ("torch matmul fp16 (fp32 out cast)", lambda: torch.matmul(a, b.t()).float())]:
            us = bench(fn)
            err = float((fn().float() - ref).norm() / ref.norm())
            rows.append({"candidate": label, "shape": shape, "us": us, "tflops": flops / us / 1e6, "rel_err": err})
            print(json.dumps(rows[-1]), flush=True)
    for entry in manifest["libs"]:
        shape = entry["shape"]
        m, n, k = manifest["shapes"][shape]
        a, b, ref = data[shape]
        row = {"candidate": entry["candidate"], "shape": shape}
        try:
            lib = tvm.runtime.load_module(os.path.join(lib_dir, entry["lib"]))
            func = lib["main"]
            c = torch.empty(m, n, dtype=getattr(torch, entry["out"]), device=dev)
            args = [tvm.runtime.from_dlpack(x) for x in (a, b, c)]
            c.fill_(float("nan"))
            func(*args)
            torch.cuda.synchronize()
            row["rel_err"] = float((c.float() - ref).norm() / ref.norm())
            row["us"] = bench(lambda: func(*args))
            row["tflops"] = 2 * m * n * k / row["us"] / 1e6
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).strip()[-300:]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(), "iters": iters,
              "build": {k: v for k, v in manifest.items() if k != "libs"}, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_gemm.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "gpu_gemm.md"), "w") as f:
        f.write(markdown(result))
    return result


def markdown(result: dict) -> str:
    shapes = list(result["build"]["shapes"])
    cands = []
    for r in result["rows"]:
        if r["candidate"] not in cands:
            cands.append(r["candidate"])
    cell = {(r["candidate"], r["shape"]): r for r in result["rows"]}
    head = "| candidate | " + " | ".join(f"{s} {tuple(result['build']['shapes'][s])}" for s in shapes) + " |\n"
    head += "|---" * (len(shapes) + 1) + "|\n"
    lines = []
    for c in cands:
        cells = []
        for s in shapes:
            r = cell.get((c, s))
            if r is None:
                cells.append("not built")
            elif "error" in r:
                cells.append("error")
            else:
                cells.append(f"{r['us']:.1f} µs, {r['tflops']:.0f} TF/s, err {r['rel_err']:.1e}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return (f"{result['device']}, torch {result['torch']}, {result['date']}; µs = median of 7 batches of "
            f"{result['iters']} launches (CUDA events); err = ‖C − C_fp32‖/‖C_fp32‖ vs torch fp32.\n\n"
            + head + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", metavar="DIR")
    parser.add_argument("--run", metavar="DIR")
    parser.add_argument("--out", default=".")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--candidates", default="all")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    if args.build:
        names = list(candidates()) if args.candidates == "all" else args.candidates.split(",")
        build_all(args.build, names, args.shapes.split(","), args.arch)
    if args.run:
        run_all(args.run, args.out, args.iters)


if __name__ == "__main__":
    main()
