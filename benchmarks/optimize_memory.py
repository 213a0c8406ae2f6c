"""Peak resident memory of ``fxopt.optimize`` on BERT-base, against the fp32 model's size.

    python benchmarks/optimize_memory.py [--targets eager,x86-int8] [--batch 8] [--seq 128] [--batches 8]
                                         [--out benchmarks/results/optimize_memory.md]

Each target runs in a fresh process (the peak, ``ru_maxrss``, is a process's lifetime high-water mark):

1. import torch, transformers and fxopt, then read the resident set: the *runtime* baseline;
2. build BERT-base (``BertConfig()``, random init, eager attention) and its example inputs;
3. ``fxopt.optimize(model, inputs, target=T, calibration_data=<a generator of --batches batches>)``.

Reported: the fp32 parameter bytes, the peak RSS during optimize above the runtime baseline (so the model's
own weights count once), and that as a multiple of the model's size. The bar (issue 11): under 3x.
The calibration batches come from a generator, so optimize never receives them as one list.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

BAR = 3.0
CHILD = "--child"


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(target: str, batch: int, seq: int, batches: int) -> dict:
    """Run in a fresh process: the runtime baseline, the model size, and the peak during optimize."""
    import warnings

    import torch

    import fxopt
    from benchmarks.common import bert_base

    runtime = rss_bytes()
    model, example = bert_base(batch, seq)
    model_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    before = peak_bytes()

    def calibration():
        gen = torch.Generator().manual_seed(7)
        for _ in range(batches):
            yield (torch.randint(1000, 30000, (batch, seq), generator=gen), torch.ones(batch, seq, dtype=torch.long))

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxopt.optimize(model, example, target=target, calibration_data=calibration(), progress=False)
    seconds = time.perf_counter() - started
    peak = peak_bytes()
    return {"target": target, "runtime_bytes": runtime, "model_bytes": model_bytes, "peak_bytes": peak,
            "peak_before_optimize_bytes": before, "above_runtime_bytes": peak - runtime,
            "times_model": (peak - runtime) / model_bytes, "seconds": round(seconds, 1)}


def run_child(target: str, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), CHILD, target, "--batch", str(args.batch),
               "--seq", str(args.seq), "--batches", str(args.batches)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{target}: the measuring process failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows, args, command: str) -> str:
    mb = 1e6
    lines = ["# Peak memory of fxopt.optimize on BERT-base", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.platform()}, Python {platform.python_version()}; "
             f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}.", "",
             f"BERT-base (random init), example batch {args.batch}x{args.seq}; calibration: a generator of "
             f"{args.batches} batches of the same shape. Each target in a fresh process; peak = ru_maxrss; "
             "above runtime = peak minus the resident set after importing torch, transformers and fxopt "
             "(before the model exists), so the model's weights count once. Bar: under "
             f"{BAR:g}x the fp32 model.", "",
             "| target | fp32 model MB | runtime MB | peak MB | peak above runtime MB | x model | optimize s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['model_bytes'] / mb:.0f} | {r['runtime_bytes'] / mb:.0f} | "
                     f"{r['peak_bytes'] / mb:.0f} | {r['above_runtime_bytes'] / mb:.0f} | "
                     f"**{r['times_model']:.2f}** | {r['seconds']} |")
    verdict = all(r["times_model"] < BAR for r in rows)
    lines += ["", f"All under {BAR:g}x: **{'yes' if verdict else 'no'}**.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="eager,x86-int8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument(CHILD, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.seq, args.batches)))
        return
    rows = [run_child(target, args) for target in args.targets.split(",")]
    text = report(rows, args, "python benchmarks/optimize_memory.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
