"""2:4 semi-structured sparsity on the GPU against the dense fp16 GEMM, per shape: where it wins and where not.

    # here: build the extension (nvcc, no GPU) and copy it into the tree that travels
    .venv/bin/python -c "from fxopt.backends.tvm_cuda import extension; print(extension.extension_path())"
    # on the GPU machine (tvm_ffi from .tvm; cuSPARSELt from torch's nvidia-cusparselt-cu13 wheel):
    source .tvm/setup.sh && export PYTHONPATH=$PWD:$PYTHONPATH && \\
        python3 benchmarks/gpu_sparse24.py --extension <libfxopt_cuda_ext.so> --out $OUT/sparse24.json

    # CPU dry run of the harness (dense F.linear stands in for the sparse GEMM; numbers mean nothing)
    .venv/bin/python benchmarks/gpu_sparse24.py --dry-run --out /tmp/sparse24.json

For each linear ``y = x W^T (+ b)`` (x: M x K, W: N x K, fp16), W is pruned 2:4 along K by cuSPARSELt (the two
largest magnitudes of every four kept: the pattern the sparse tensor cores take) and both systems multiply by
that same pruned W:

- ``dense``: ``F.linear(x, W, b)``, cuBLAS on the dense pruned weight: the baseline;
- ``fxopt``: ``fxopt.cusparselt.matmul[_bias]`` (fxopt's cuSPARSELt binding, ``cusparselt_gemm.cc``) on the
  compressed W, the output written into a preallocated buffer (as TVM's destination-passing calls do); with
  cuSPARSELt's default algorithm, or with the one ``cusparseLtMatmulSearch`` picks for that shape when
  ``FXOPT_CUSPARSELT_SEARCH=1`` (which crashed on the H100 with cuSPARSELt 0.8.0: see
  benchmarks/results/gpu_sparse24.md). ``FXOPT_CUSPARSELT_FORM`` picks how the GEMM is put to cuSPARSELt.

Latency: ``triton.testing.do_bench`` median (its L2 flush between calls included), after the first call (which
plans). Correctness in the same run:
the relative error (Frobenius) of each output against fp32 math on the same pruned weight; a sparse result
further than 1e-2 counts as wrong (no verdict). Verdict per shape from dense ms / fxopt ms: win (> 1.05x),
loss (< 0.95x), tie. Shapes: BERT-base's linears at M = 1024 (batch 8 x 128; with bias) and Llama-3-8B's
(4096 -> 4096, 4096 -> 14336, 14336 -> 4096; no bias) at M = 16, 128 and 2048 tokens.

``--torch-paths`` also tries torch's own 2:4 paths (``to_sparse_semi_structured``: cuSPARSELt and CUTLASS) in a
subprocess afterwards: on the H100 they failed before (benchmarks/results/gpu_sparse24_failed.json) and took
the CUDA context down with them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: benchmarks.common, fxopt

from benchmarks.common import relative_error  # noqa: E402

#: (model, M, K in, N out, bias)
SHAPES = [("bert-base", 1024, 768, 2304, True), ("bert-base", 1024, 768, 768, True),
          ("bert-base", 1024, 768, 3072, True), ("bert-base", 1024, 3072, 768, True)] + [
    ("llama-8b", m, k, n, False) for m in (16, 128, 2048) for k, n in ((4096, 4096), (4096, 14336), (14336, 4096))]
DRY_SHAPES = [("tiny", 32, 64, 128, True), ("tiny", 16, 128, 64, False)]
MAX_REL_ERR = 1e-2


def verdict(speedup: float) -> str:
    return "win" if speedup > 1.05 else "loss" if speedup < 0.95 else "tie"


def prune_2_4(weight: torch.Tensor) -> torch.Tensor:
    """torch's magnitude 2:4 pruning along K (the dry run's stand-in for cuSPARSELt's prune)."""
    n, k = weight.shape
    groups = weight.reshape(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(n, k)


def is_2_4(weight: torch.Tensor) -> bool:
    """At most two nonzeros in every group of four along K."""
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def time_ms(fn, device: str) -> float:
    if device == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import time
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


class DenseStandIn:
    """The dry run's Sparse24: F.linear on the weight it was given (no compression)."""
    version = 0

    def prune(self, weight):
        return prune_2_4(weight)

    def compress(self, weight):
        return weight

    def linear(self, x, packed, out_features, bias=None, out=None):
        return F.linear(x, packed, bias)

    def search_log(self) -> str:
        return ""


def measure(sparse, model: str, m: int, k: int, n: int, with_bias: bool, device: str) -> dict:
    gen = torch.Generator(device=device).manual_seed(m * 7919 + k * 31 + n)
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(m, k, generator=gen, device=device).to(dtype)
    dense_w = (torch.randn(n, k, generator=gen, device=device) / k ** 0.5).to(dtype)
    bias = (torch.randn(n, generator=gen, device=device) * 0.1).to(dtype) if with_bias else None
    weight = sparse.prune(dense_w)
    row = {"model": model, "M": m, "K": k, "N": n, "bias": with_bias, "pruned_2_4": is_2_4(weight),
           "kept": float((weight != 0).float().mean())}
    reference = x.double() @ weight.double().T + (bias.double() if with_bias else 0)
    out = torch.empty(m, n, device=device, dtype=dtype)
    packed = sparse.compress(weight)
    row["compressed_bytes"] = packed.numel() * packed.element_size()
    row["dense_bytes"] = weight.numel() * weight.element_size()
    systems = {"dense": lambda: F.linear(x, weight, bias),
               "fxopt": lambda: sparse.linear(x, packed, n, bias, out=out)}
    for name, fn in systems.items():
        try:
            result = fn()  # the first call plans (cuSPARSELt's search): before timing
            if name == "fxopt" and getattr(sparse, "form", "col") == "torch":
                result = result.view(n, m).T  # that diagnosis form writes y^T
            row[name + "_rel_err"] = relative_error(reference, result)
            row[name + "_ms"] = time_ms(fn, device)
            row[name + "_tflops"] = 2 * m * k * n / row[name + "_ms"] / 1e9  # dense-equivalent
        except Exception as exc:  # noqa: BLE001  (recorded: one device call reports every shape)
            row[name + "_error"] = f"{type(exc).__name__}: {exc}"[:500]
    if "dense_ms" in row and "fxopt_ms" in row:
        row["speedup"] = row["dense_ms"] / row["fxopt_ms"]
        row["correct"] = row["fxopt_rel_err"] < MAX_REL_ERR and row["pruned_2_4"]
        row["verdict"] = verdict(row["speedup"]) if row["correct"] else "wrong result"
    return row


def markdown(rows) -> str:
    lines = ["| model | M | K -> N | bias | dense fp16 ms | fxopt 2:4 ms | speed-up | verdict | rel err dense | "
             "rel err 2:4 |", "|---|---:|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        def cell(key, fmt):
            return format(r[key], fmt) if key in r else "err"
        lines.append(f"| {r['model']} | {r['M']} | {r['K']} -> {r['N']} | {'yes' if r['bias'] else 'no'} | "
                     f"{cell('dense_ms', '.4f')} | {cell('fxopt_ms', '.4f')} | "
                     f"{format(r['speedup'], '.2f') + 'x' if 'speedup' in r else '-'} | {r.get('verdict', '-')} | "
                     f"{cell('dense_rel_err', '.1e')} | {cell('fxopt_rel_err', '.1e')} |")
    return "\n".join(lines)


def environment(device: str, sparse) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
           "cusparselt_version": sparse.version, "cusparselt_form": getattr(sparse, "form", None),
           "cusparselt_search": os.environ.get("FXOPT_CUSPARSELT_SEARCH", "0") not in ("", "0")}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


TORCH_PATHS = r"""
import json, sys, torch, torch.nn.functional as F
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
sys.path.insert(0, sys.argv[1])
from benchmarks.gpu_sparse24 import prune_2_4
out = {}
for cutlass in (False, True):
    name = "torch-cutlass" if cutlass else "torch-cusparselt"
    try:
        x = torch.randn(1024, 768, device="cuda", dtype=torch.float16)
        w = prune_2_4(torch.randn(768, 768, device="cuda", dtype=torch.float16))
        SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
        y = F.linear(x, to_sparse_semi_structured(w))
        out[name] = {"rel_err": float((y.float() - F.linear(x, w).float()).norm() / F.linear(x, w).float().norm())}
        torch.cuda.synchronize()
    except Exception as exc:
        out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
print(json.dumps(out))
"""


def torch_paths() -> dict:
    """torch's 2:4 paths on BERT's 768 -> 768 at M = 1024, in a subprocess (they can break the CUDA context)."""
    try:
        done = subprocess.run([sys.executable, "-c", TORCH_PATHS, os.path.dirname(HERE)], capture_output=True,
                              text=True, timeout=120)
        lines = done.stdout.strip().splitlines()
        return json.loads(lines[-1]) if done.returncode == 0 and lines else \
            {"error": f"exit {done.returncode}: {done.stderr[-500:]}"}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def main(args) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        sparse = DenseStandIn()
    else:
        from fxopt.backends.tvm_cuda.cusparselt import Sparse24
        sparse = Sparse24(args.extension)
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "env": environment(device, sparse),
              "command": " ".join(["python3"] + sys.argv), "dry_run": args.dry_run, "rows": []}
    for model, m, k, n, bias in (DRY_SHAPES if args.dry_run else SHAPES):
        try:
            row = measure(sparse, model, m, k, n, bias, device)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row = {"model": model, "M": m, "K": k, "N": n, "bias": bias, "error": f"{type(exc).__name__}: {exc}"[:500]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        write(result, args.out)
    result["search_log"] = sparse.search_log()
    if args.torch_paths and not args.dry_run:
        result["torch_paths"] = torch_paths()
    write(result, args.out)
    print(result["search_log"])
    print(markdown(result["rows"]), flush=True)
    return result


def write(result: dict, path) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extension", help="a built libfxopt_cuda_ext.so (not needed for --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the harness with dense stand-ins")
    parser.add_argument("--torch-paths", action="store_true", help="also try torch's 2:4 paths, in a subprocess")
    parser.add_argument("--out")
    main(parser.parse_args())
