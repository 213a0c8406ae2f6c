"""fxopt.csr_linear against the dense linear on this CPU: where CSR wins, and the crossover sparsify uses.

    python benchmarks/sparse_linear.py [--quick] [--repeats 25] [--threads 2]
                                       [--out benchmarks/results/sparse_linear.md]

For a 4096x4096 and a 768->3072 linear (weight [3072, 768]), magnitude-pruned
to 50/70/90/95/99% sparsity, at batch 1 and 32 rows: the latency of each way
of computing ``x @ W.T + b`` as a ratio to the dense ``F.linear`` with the same
pruned weight: medians of interleaved runs in one process, as
``fxopt.report.timing.compare_latency`` takes them (the minima are reported
too). Inference mode; the weights are built once, outside the timing. Before
each timed call 64 MB are written (``--flush-mb``), so every candidate starts
with cold caches, as each layer of a model larger than the cache does; without
it, the candidate timed right after another reading the same CSR arrays starts
warm. The candidates:

- ``csr_linear``: the op as sparsify emits it (int32 indices; addmm(bias, W, x^T)
  made contiguous; for one row, addmv from ``CSR_MV_MIN_NONZEROS`` nonzeros up);
- ``csr_mm_int32``: (W @ x^T)^T + b with int32 indices, even for one row (no mv path);
- ``csr_addmm_noncontig``: addmm(bias, W, x^T)^T left non-contiguous: what the
  op's final transposing copy costs (the op keeps it: ``aten.linear``'s result is
  contiguous and a later ``view`` may need that);
- ``csr_mm_int64``: W @ x^T with torch's default int64 indices;
- ``sparse_mm``: ``torch.sparse.mm(W, x^T)`` (int64);
- ``bsr_16``: W in block-sparse rows (16x16 blocks) @ x^T;
- ``dense_at_csrT``: x @ W^T with W in CSR (recorded as unsupported when torch refuses it).

The crossover written at the end is, per row count, the largest measured
density at which ``csr_linear`` beat dense for both shapes (and at every lower
measured density): ``CSR_MAX_DENSITY_ONE_ROW`` / ``CSR_MAX_DENSITY_MANY_ROWS``
in fxopt/passes/sparse/csr.py are set from it. A second table gives the bytes
of each weight as stored: dense, dense with zeros compressed by gzip (safetensors
itself does not compress) and CSR.

The machine is shared: the report records the load average before and after.
Writes a markdown report to ``--out`` and the same numbers as JSON next to it.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import fxopt  # noqa: E402,F401  (registers torch.ops.fxopt)
from benchmarks.gpu_attention import write_json  # noqa: E402
from benchmarks.x86_int8 import cpu_model, git_revision, load  # noqa: E402
from fxopt.passes.sparse import csr as csr_choice  # noqa: E402
from fxopt.passes.sparse.magnitude import layer_masks  # noqa: E402
from fxopt.report.timing import format_table  # noqa: E402

SHAPES = ((4096, 4096), (3072, 768))  # weight [out, in]
SPARSITIES = (0.5, 0.7, 0.9, 0.95, 0.99)
BATCHES = (1, 32)
DEFAULT_OUT = "benchmarks/results/sparse_linear.md"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class CacheFlusher:
    """Writes a buffer larger than the last-level cache, so the next call finds its weights in DRAM."""

    def __init__(self, megabytes: int):
        self.buffer = torch.zeros(megabytes * 2**20 // 4) if megabytes else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.add_(1.0)


def interleaved_samples(candidates: Dict[str, Callable], inputs: Sequence, repeats: int, flush: CacheFlusher,
                        warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds of every call, candidates interleaved (A, B, A, B, ...) as in
    ``fxopt.report.timing.compare_latency``, which returns medians only: the minimum is reported too, since
    on a shared machine it shows what the kernel does when it has the cores. ``flush`` runs before each
    timed call: otherwise a candidate that reads the arrays the previous one just read starts warm."""
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(warmup):
        for fn in candidates.values():
            fn(*inputs)
    for _ in range(repeats):
        for name, fn in candidates.items():
            flush()
            start = time.perf_counter()
            fn(*inputs)
            samples[name].append(time.perf_counter() - start)
    return samples


def pruned_weight(shape, sparsity: float, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return weight.masked_fill(~layer_masks([weight], sparsity)[0], 0)


def candidates(weight: torch.Tensor, bias: torch.Tensor) -> Dict[str, Callable]:
    """Every way of computing ``x @ weight.T + bias`` that is compared, by name."""
    crow, col, values = csr_choice.to_csr(weight)
    out_features, in_features = weight.shape
    csr64 = weight.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(crow, col, values, weight.shape)
    bsr = weight.to_sparse_bsr((16, 16))
    op = torch.ops.fxopt.csr_linear
    table = {
        "dense": lambda x: F.linear(x, weight, bias),
        "csr_linear": lambda x: op(x, crow, col, values, out_features, in_features, bias),
        "csr_mm_int32": lambda x: (csr32 @ x.T).T + bias,
        "csr_addmm_noncontig": lambda x: torch.addmm(bias.unsqueeze(1), csr32, x.T).T,
        "csr_mm_int64": lambda x: (csr64 @ x.T).T + bias,
        "sparse_mm": lambda x: torch.sparse.mm(csr64, x.T).T + bias,
        "bsr_16": lambda x: (bsr @ x.T).T + bias,
        "dense_at_csrT": lambda x: x @ csr64.T + bias,
    }
    return table


def supported(table: Dict[str, Callable], x: torch.Tensor, reference: torch.Tensor) -> Dict[str, Callable]:
    """The candidates that run and agree with dense; the others are reported by their error."""
    kept, refused = {}, {}
    for name, fn in table.items():
        try:
            err = ((fn(x) - reference).norm() / reference.norm()).item()
        except (RuntimeError, NotImplementedError) as exc:
            refused[name] = str(exc).splitlines()[0][:80]
            continue
        if err > 1e-4:
            refused[name] = f"wrong result (relative error {err:.2g})"
        else:
            kept[name] = fn
    return kept, refused


def measure(repeats: int, sparsities, batches, flush: CacheFlusher) -> List[dict]:
    rows = []
    for shape in SHAPES:
        for sparsity in sparsities:
            weight = pruned_weight(shape, sparsity)
            bias = torch.randn(shape[0]) * 0.02
            for batch in batches:
                x = torch.randn(batch, shape[1], generator=torch.Generator().manual_seed(batch))
                table, refused = supported(candidates(weight, bias), x, F.linear(x, weight, bias))
                samples = interleaved_samples(table, (x,), repeats, flush)
                seconds = {k: statistics.median(v) for k, v in samples.items()}
                fastest = {k: min(v) for k, v in samples.items()}
                dense = seconds["dense"]
                rows.append({"out": shape[0], "in": shape[1], "sparsity": sparsity, "batch": batch,
                             "density": csr_choice.density(weight), "dense_ms": dense * 1e3,
                             "ratio": {k: v / dense for k, v in seconds.items() if k != "dense"},
                             "min_ratio": {k: v / fastest["dense"] for k, v in fastest.items() if k != "dense"},
                             "refused": refused})
                best = min(rows[-1]["ratio"].items(), key=lambda kv: kv[1])
                log(f"{shape[0]}x{shape[1]} sparsity {sparsity} batch {batch}: dense {dense * 1e3:.3f} ms, "
                    f"csr_linear {rows[-1]['ratio']['csr_linear']:.3f}x, best {best[0]} {best[1]:.3f}x")
    return rows


def crossover(rows: List[dict], batch: int, key: str = "ratio") -> Optional[float]:
    """The largest density d measured such that csr_linear beat dense for every shape at every density <= d
    (by the median ratio, or by ``key="min_ratio"``)."""
    densities = sorted({round(1 - r["sparsity"], 4) for r in rows if r["batch"] == batch})
    best = None
    for d in densities:
        at_d = [r for r in rows if r["batch"] == batch and round(1 - r["sparsity"], 4) == d]
        if not all(r[key]["csr_linear"] < 1.0 for r in at_d):
            break
        best = d
    return best


def sizes(shape, sparsities) -> List[dict]:
    """Bytes as stored: dense float32, that with zeros gzip-compressed, and the CSR arrays (int32 indices)."""
    out = []
    for sparsity in sparsities:
        weight = pruned_weight(shape, sparsity)
        raw = weight.numpy().tobytes()
        csr_bytes = sum(t.numel() * t.element_size() for t in csr_choice.to_csr(weight))
        out.append({"sparsity": sparsity, "dense": len(raw), "dense_gzip": len(gzip.compress(raw, 6)),
                    "csr": csr_bytes})
    return out


def wins(rows: List[dict], names: List[str]) -> List[str]:
    """One line per shape and batch: the sparsities at which csr_linear beat dense, and the fastest variant."""
    lines = []
    for key in sorted({(r["out"], r["in"], r["batch"]) for r in rows}):
        mine = [r for r in rows if (r["out"], r["in"], r["batch"]) == key]
        won = [f"{r['sparsity']:.0%} ({r['ratio']['csr_linear']:.2f}x)" for r in mine if r["ratio"]["csr_linear"] < 1]
        fastest = [min(names, key=lambda n: r["ratio"].get(n, float("inf"))) for r in mine]
        lines.append(f"- {key[0]}x{key[1]}, batch {key[2]}: csr_linear beats dense at "
                     f"{', '.join(won) or 'no measured sparsity'}; fastest variant per sparsity: {', '.join(fastest)}")
    return lines


def markdown(rows, size_rows, info, crossovers) -> str:
    names = list(rows[0]["ratio"])
    header = ["shape [out x in]", "sparsity", "batch", "dense ms", *names]
    table = [[f"{r['out']}x{r['in']}", r["sparsity"], r["batch"], r["dense_ms"],
              *(r["ratio"].get(n, "n/a") for n in names)] for r in rows]
    refused = sorted({f"{k}: {v}" for r in rows for k, v in r["refused"].items()})
    busy = isinstance(info["load_before"], float) and info["load_before"] > info["cpus"]
    lines = [
        "# fxopt.csr_linear vs dense linear (CPU)", "",
        *([f"**The machine was busy (load average {info['load_before']:.1f} on {info['cpus']} CPUs): these "
           "timings are unreliable; run again when it is quiet.**", ""] if busy else []),
        f"Run {info['date']} on {info['cpu']} ({info['cpus']} CPUs), torch {info['torch']}, "
        f"torch threads {info['threads']}, git {info['git']}; load average {info['load_before']} before, "
        f"{info['load_after']} after; {info['repeats']} interleaved repeats, medians; "
        f"{info['flush_mb']} MB written before each timed call (cold caches, as for the layers of a model "
        "larger than the cache).", "",
        "Latency of each candidate as a ratio to dense `F.linear` with the same pruned weight (< 1: faster).", "",
        "```", format_table(header, table), "```", "",
        "The same as ratios of the fastest call of each (less sensitive to other processes on the machine):", "",
        "```", format_table(header, [[*row[:4], *(r["min_ratio"].get(n, "n/a") for n in names)]
                                     for row, r in zip(table, rows)]), "```", "",
        "Refused or unsupported candidates: " + ("; ".join(refused) if refused else "none") + "", "",
        "## Where CSR wins", "", *wins(rows, names), "",
        "## Crossover (largest density where csr_linear beat dense for both shapes)", "",
        f"- one row (batch 1): density <= {crossovers['one_row']} "
        f"(fxopt/passes/sparse/csr.py CSR_MAX_DENSITY_ONE_ROW = {csr_choice.CSR_MAX_DENSITY_ONE_ROW})",
        f"- 32 rows: density <= {crossovers['many_rows']} "
        f"(CSR_MAX_DENSITY_MANY_ROWS = {csr_choice.CSR_MAX_DENSITY_MANY_ROWS})",
        f"- by the fastest calls instead of medians: one row <= {crossovers['one_row_min']}, "
        f"32 rows <= {crossovers['many_rows_min']}", "",
        "## Bytes as stored, 768->3072 weight (safetensors does not compress: dense-with-zeros stays dense size)", "",
        "```", format_table(["sparsity", "dense", "dense gzip", "csr (int32)"],
                            [[s["sparsity"], s["dense"], s["dense_gzip"], s["csr"]] for s in size_rows]), "```", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, sparsities 0.5/0.9/0.99: a smoke run")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--flush-mb", type=int, default=64,
                        help="MB written before each timed call (0: warm caches); default: larger than the L3")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    sparsities = (0.5, 0.9, 0.99) if args.quick else SPARSITIES
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "git": git_revision(), "load_before": load(), "repeats": repeats, "quick": args.quick,
            "flush_mb": args.flush_mb}
    with torch.inference_mode():
        rows = measure(repeats, sparsities, BATCHES, CacheFlusher(args.flush_mb))
    size_rows = sizes((3072, 768), sparsities)
    info["load_after"] = load()
    crossovers = {"one_row": crossover(rows, 1), "many_rows": crossover(rows, 32),
                  "one_row_min": crossover(rows, 1, "min_ratio"), "many_rows_min": crossover(rows, 32, "min_ratio")}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(markdown(rows, size_rows, info, crossovers))
    write_json(os.path.splitext(args.out)[0] + ".json",
               {"info": info, "rows": rows, "sizes": size_rows, "crossover": crossovers})
    log(f"crossover: one row {crossovers['one_row']}, 32 rows {crossovers['many_rows']}; wrote {args.out}")


if __name__ == "__main__":
    main()
