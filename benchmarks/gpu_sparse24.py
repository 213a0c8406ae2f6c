"""2:4 semi-structured sparsity on the GPU against the dense fp16 GEMM, per shape: where it wins and where not.

    # GPU machine (torch 2.11+cu130: cuSPARSELt and CUTLASS 2:4 kernels ship in torch)
    python3 benchmarks/gpu_sparse24.py --out $OUT/sparse24.json

    # CPU dry run of the harness (dense F.linear stands in for every sparse kernel; numbers mean nothing)
    .venv/bin/python benchmarks/gpu_sparse24.py --dry-run --out /tmp/sparse24.json

For each linear ``y = x W^T + b`` (x: M x K, W: N x K, fp16), W is pruned 2:4 along K (the two largest
magnitudes of every four kept, the pattern the sparse tensor cores take), and every system multiplies by that
same pruned W:

- ``dense``: ``F.linear(x, W, b)``, cuBLAS(Lt) on the dense pruned weight: the baseline;
- ``cusparselt``: ``F.linear(x, to_sparse_semi_structured(W), b)`` with
  ``SparseSemiStructuredTensor._FORCE_CUTLASS = False`` (torch's cuSPARSELt subclass; the script checks the
  subclass it got), torch's default algorithm;
- ``cusparselt-tuned``: ``torch._cslt_sparse_mm`` on the same packed weight with the algorithm id
  ``torch._cslt_sparse_mm_search`` picks for that shape (the transpose fused, as F.linear does);
- ``cutlass``: ``F.linear`` with ``_FORCE_CUTLASS = True`` (torch's CUTLASS 2:4 kernels).

Latency: ``triton.testing.do_bench`` median. Correctness in the same run: the relative error of each sparse
output against the dense output with the same pruned weight (fp16 rounding only; a wrong layout would be O(1)).
Verdict per shape, from the best sparse system's speed-up over dense: win (> 1.05x), loss (< 0.95x), tie.
Shapes: BERT-base's linears (768->768, 768->3072, 3072->768) and 4096 x 4096, at M = 8, 64, 256, 1024, 4096
tokens (M = 1024 is BERT-base at batch 8 x 128).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: benchmarks.common

from benchmarks.common import relative_error  # noqa: E402

TOKENS = (8, 64, 256, 1024, 4096)
LAYERS = ((768, 768), (768, 3072), (3072, 768), (4096, 4096))  # (K in, N out)
SYSTEMS = ("dense", "cusparselt", "cusparselt-tuned", "cutlass")


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with the two smallest magnitudes of every four consecutive inputs set to zero."""
    n, k = weight.shape
    groups = weight.reshape(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(n, k)


def sparse_weight(weight: torch.Tensor, cutlass: bool):
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        sparse = to_sparse_semi_structured(weight)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = False
    expected = "CUTLASS" if cutlass else "CUSPARSELT"
    if not type(sparse).__name__.upper().endswith(expected):
        raise RuntimeError(f"asked for {expected}, got {type(sparse).__name__}")
    return sparse


def systems_for(x, weight, bias, dry_run: bool) -> dict:
    """name -> (a zero-argument callable, extra facts); the dry run puts dense F.linear behind every name."""
    dense = (lambda: F.linear(x, weight, bias)), {}
    if dry_run:
        return {name: dense for name in SYSTEMS}
    out = {"dense": dense}
    try:
        cslt = sparse_weight(weight, cutlass=False)
        out["cusparselt"] = (lambda: F.linear(x, cslt, bias)), {"subclass": type(cslt).__name__}
        xt = x.t()
        found = torch._cslt_sparse_mm_search(cslt.packed, xt, bias=bias, transpose_result=True)
        alg = found[0] if isinstance(found, (tuple, list)) else int(found)
        out["cusparselt-tuned"] = (lambda: torch._cslt_sparse_mm(cslt.packed, xt, bias=bias, transpose_result=True,
                                                                 alg_id=alg)), {"alg_id": alg}
    except Exception as exc:  # noqa: BLE001
        out["cusparselt"] = None, {"error": f"{type(exc).__name__}: {exc}"[:500]}
    try:
        cutlass = sparse_weight(weight, cutlass=True)
        out["cutlass"] = (lambda: F.linear(x, cutlass, bias)), {"subclass": type(cutlass).__name__}
    except Exception as exc:  # noqa: BLE001
        out["cutlass"] = None, {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return out


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import time
    fn()
    t = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t) / 3 * 1e3


def measure(m: int, k: int, n: int, device: str, dry_run: bool) -> dict:
    gen = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    weight = prune_2_4(torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    bias = (torch.randn(n, generator=gen) * 0.1).to(device, dtype)
    row = {"M": m, "K": k, "N": n, "systems": {}}
    reference = F.linear(x, weight, bias).float()
    for name, (fn, extra) in systems_for(x, weight, bias, dry_run).items():
        entry = dict(extra)
        if fn is not None:
            try:
                out = fn()
                if out.shape != reference.shape:
                    raise RuntimeError(f"output {tuple(out.shape)}, expected {tuple(reference.shape)}")
                entry["rel_err_vs_dense"] = relative_error(reference, out.float())
                entry["ms"] = time_ms(fn, device)
                entry["tflops"] = 2 * m * k * n / entry["ms"] / 1e9  # dense-equivalent
            except Exception as exc:  # noqa: BLE001
                entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["systems"][name] = entry
    dense_ms = row["systems"]["dense"].get("ms")
    sparse = {s: e["ms"] for s, e in row["systems"].items() if s != "dense" and "ms" in e
              and e["rel_err_vs_dense"] < 1e-2}
    if dense_ms and sparse:
        best = min(sparse, key=sparse.get)
        speedup = dense_ms / sparse[best]
        row.update({"best_sparse": best, "speedup": speedup,
                    "verdict": "win" if speedup > 1.05 else "loss" if speedup < 0.95 else "tie"})
    return row


def markdown(rows) -> str:
    lines = ["| M | K -> N | dense ms | cuSPARSELt ms | cuSPARSELt tuned ms | CUTLASS ms | best speed-up | verdict | "
             "max rel err vs dense |", "|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        cells = []
        for s in SYSTEMS:
            e = r["systems"].get(s, {})
            cells.append(f"{e['ms']:.4f}" if "ms" in e else "err" if "error" in e else "-")
        errs = [e["rel_err_vs_dense"] for s, e in r["systems"].items() if s != "dense" and "rel_err_vs_dense" in e]
        speed = f"{r['speedup']:.2f}x ({r['best_sparse']})" if "speedup" in r else "-"
        err = f"{max(errs):.1e}" if errs else "-"
        lines.append(f"| {r['M']} | {r['K']} -> {r['N']} | " + " | ".join(cells)
                     + f" | {speed} | {r.get('verdict', '-')} | {err} |")
    return "\n".join(lines)


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["cusparselt"] = {"available": torch.backends.cusparselt.is_available(),
                                 "version": torch.backends.cusparselt.version()}
        except Exception as exc:  # noqa: BLE001
            env["cusparselt"] = f"{type(exc).__name__}: {exc}"
    return env


def main(args) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "env": environment(device),
              "command": " ".join(["python3"] + sys.argv), "dry_run": args.dry_run, "rows": []}
    layers = LAYERS if not args.dry_run else ((64, 128), (128, 64))
    for k, n in layers:
        for m in tokens:
            try:
                row = measure(m, k, n, device, args.dry_run)
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                row = {"M": m, "K": k, "N": n, "systems": {}, "error": f"{type(exc).__name__}: {exc}"[:500]}
            result["rows"].append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "systems"}), flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    print(markdown(result["rows"]), flush=True)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="the M values")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the harness with dense stand-ins")
    parser.add_argument("--out")
    main(parser.parse_args())
