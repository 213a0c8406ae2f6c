"""torchao's fp8 and int8 dynamic quantization under torch.compile: the baselines issue 22 sets for BERT-base.

    # GPU machine (torch 2.11; torchao carried as a wheel, see the device README):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/gpu_torchao_bert.py --out $OUT/torchao_bert.json [--deadline 300]

    # CPU dry run of the same code paths (BERT's structure at toy size, no CUDA graphs or timing of note):
    .venv/bin/python benchmarks/gpu_torchao_bert.py --device cpu --model bert-tiny --systems eager32,eager16,ao-int8

BERT-base with deterministic weights and SDPA attention (``benchmarks/common.py``), batch 8 x 128, all-ones
mask, fp16. One process; the reference is torch eager fp32 in the same run, and every system reports the relative
error of its last hidden state against it (``benchmarks.common.relative_error``), once before and once after its
timed calls (CUDA-graph replays must be right too). Latency: ``triton.testing.do_bench`` median, as
``gpu_bert.py``. Systems, in this order:

- ``eager32``, ``eager16``: torch eager fp32 and fp16;
- ``reduce-overhead``: torch.compile(mode="reduce-overhead") fp16 (CUDA graphs);
- ``ao-fp8-ro``, ``ao-int8-ro``: torchao ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``
  (per-row e4m3 activations and weights, torch._scaled_mm) and ``Int8DynamicActivationInt8WeightConfig()``
  (per-token int8 activations, per-channel int8 weights) on every nn.Linear of the fp16 model, then
  torch.compile reduce-overhead;
- ``ao-fp8-ma``, ``ao-int8-ma``, ``max-autotune``: the same three under mode="max-autotune" (last: each
  compiles for a minute or more; plain fp16 max-autotune last of all, since earlier runs measured it; a system
  that would start past ``--deadline`` is skipped and says so).

torchao's configs set its recommended inductor options (coordinate-descent tuning, int_mm fused with the scale
multiply) globally when applied, so the plain torch systems run first and are not affected by them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root: benchmarks.common

from benchmarks.common import bert_base, bert_tiny, relative_error  # noqa: E402

SYSTEMS = ["eager32", "eager16", "reduce-overhead", "ao-fp8-ro", "ao-int8-ro", "ao-fp8-ma", "ao-int8-ma",
           "max-autotune"]
LABELS = {"eager32": "torch eager fp32", "eager16": "torch eager fp16 (SDPA)",
          "reduce-overhead": "torch.compile reduce-overhead fp16", "max-autotune": "torch.compile max-autotune fp16",
          "ao-fp8-ro": "torchao fp8 per-row dynamic, compile reduce-overhead",
          "ao-fp8-ma": "torchao fp8 per-row dynamic, compile max-autotune",
          "ao-int8-ro": "torchao int8 dynamic, compile reduce-overhead",
          "ao-int8-ma": "torchao int8 dynamic, compile max-autotune"}


MODELS = {"bert": bert_base, "bert-tiny": bert_tiny}


def hidden(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def torchao_config(kind: str):
    from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                      Int8DynamicActivationInt8WeightConfig, PerRow)
    if kind == "fp8":
        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    return Int8DynamicActivationInt8WeightConfig()


class Bench:
    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.device = torch.device(args.device)
        self.result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "env": environment(args),
                       "command": " ".join(["python3"] + sys.argv), "model": args.model, "systems": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable) -> float:
        if self.device.type == "cuda":
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                                 return_mode="median"))
        fn()
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        return sorted(samples)[len(samples) // 2]

    def save(self):
        if self.args.out:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump(self.result, f, indent=1)


def run(args) -> dict:
    bench = Bench(args)
    model, inputs = MODELS[args.model]()
    inputs = tuple(x.to(bench.device) for x in inputs)
    model32 = copy.deepcopy(model).to(bench.device)
    with torch.inference_mode():
        reference = hidden(model32(*inputs)).float().clone()
    model16 = copy.deepcopy(model).to(bench.device).half()
    rows = bench.result["systems"]

    def record(key: str, fn: Callable, extra: Optional[dict] = None):
        with torch.inference_mode():
            t = time.perf_counter()
            for _ in range(3):  # compile, then reduce-overhead and max-autotune record CUDA graphs on a later call
                out = hidden(fn()).float().clone()
            bench.sync()
            row = {"system": LABELS[key], "first_calls_s": round(time.perf_counter() - t, 1),
                   "rel_err": relative_error(reference, out), **(extra or {})}
            row["latency_ms"] = bench.time_ms(fn)
            row["rel_err_after_timing"] = relative_error(reference, hidden(fn()).float())
        rows[key] = row
        print(f"[torchao-bert] {key}: {row['latency_ms']:.3f} ms, rel err {row['rel_err']:.2e}, first calls "
              f"{row['first_calls_s']} s ({bench.elapsed():.0f} s)", flush=True)

    def compiled(base: torch.nn.Module, mode: str, quantize: Optional[str]) -> Callable:
        torch._dynamo.reset()
        candidate = copy.deepcopy(base)
        extra = {}
        if quantize:
            import torchao
            from torchao.quantization import quantize_
            quantize_(candidate, torchao_config(quantize))
            extra["torchao"] = torchao.__version__
            extra["weight_type"] = type(candidate.encoder.layer[0].attention.self.query.weight).__name__
        # the CPU dry run has no CUDA graphs: it compiles with the default mode
        fn = torch.compile(candidate, mode=mode if bench.device.type == "cuda" else None)
        return (lambda: fn(*inputs)), extra

    plans = {"eager32": lambda: ((lambda: model32(*inputs)), {}),
             "eager16": lambda: ((lambda: model16(*inputs)), {}),
             "reduce-overhead": lambda: compiled(model16, "reduce-overhead", None),
             "max-autotune": lambda: compiled(model16, "max-autotune", None),
             "ao-fp8-ro": lambda: compiled(model16, "reduce-overhead", "fp8"),
             "ao-fp8-ma": lambda: compiled(model16, "max-autotune", "fp8"),
             "ao-int8-ro": lambda: compiled(model16, "reduce-overhead", "int8"),
             "ao-int8-ma": lambda: compiled(model16, "max-autotune", "int8")}
    for key in [s for s in SYSTEMS if s in args.systems.split(",")]:
        if bench.elapsed() > args.deadline:
            rows[key] = {"system": LABELS[key], "skipped": f"deadline ({bench.elapsed():.0f} s spent)"}
            print(f"[torchao-bert] {key}: skipped, deadline", flush=True)
            continue
        try:
            fn, extra = plans[key]()
            record(key, fn, extra)
        except Exception as exc:  # keep the other systems' numbers
            traceback.print_exc()
            rows[key] = {"system": LABELS[key], "error": f"{type(exc).__name__}: {exc}"[:2000]}
        bench.save()
    bench.result["total_s"] = round(bench.elapsed(), 1)
    bench.save()
    print(markdown(bench.result), flush=True)
    return bench.result


def markdown(result: dict) -> str:
    lines = ["| system | median ms | rel err vs fp32 | after timing | first 3 calls s |", "|---|---:|---:|---:|---:|"]
    for row in result["systems"].values():
        if "latency_ms" in row:
            lines.append(f"| {row['system']} | {row['latency_ms']:.3f} | {row['rel_err']:.2e} | "
                         f"{row['rel_err_after_timing']:.2e} | {row['first_calls_s']} |")
        else:
            lines.append(f"| {row['system']} | {row.get('error') or row.get('skipped')} | | | |")
    return "\n".join(lines)


def environment(args) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import torchao
        env["torchao"] = torchao.__version__
    except Exception as exc:  # noqa: BLE001
        env["torchao"] = f"not importable: {type(exc).__name__}: {exc}"
    return env


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert", choices=list(MODELS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of: {', '.join(SYSTEMS)}")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds; later systems are skipped")
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=500)
    parser.add_argument("--out")
    run(parser.parse_args())
