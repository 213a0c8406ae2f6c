"""Where the time of one MiniLM call goes on x86: eager fp32 against fxopt x86-int8, op by op.

    python benchmarks/x86_int8_profile.py [--batch 1] [--repeats 30] [--rounds 1] [--minilm-random-weights] [--compile]

Prints, for each candidate, the median latency (interleaved) and torch.profiler's
table of self CPU time per op over ``--repeats`` calls. With ``--compile`` it
also times ``torch.compile`` (inductor) of the fp32 model. (fxopt's own
x86-int8 path compiles with Inductor where that is faster: see the printed
lowering report's ``kernel_path``.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxopt  # noqa: E402
from benchmarks.x86_int8 import random_minilm  # noqa: E402
from fxopt.demo.data import minilm, real_sentences  # noqa: E402
from fxopt.report import compare_latency  # noqa: E402


def profile_table(fn, inputs, repeats: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for _ in range(3):
            fn(*inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                fn(*inputs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds (each its own median)")
    parser.add_argument("--minilm-random-weights", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of fp32")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    model, tokenizer = random_minilm() if args.minilm_random_weights else minilm()
    sentences = real_sentences(max(8, args.batch))[: args.batch]
    enc = tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    started = time.perf_counter()
    optimized = fxopt.optimize(model, inputs, target="x86-int8", calibration_data=[inputs], progress=False)
    print(f"optimize {time.perf_counter() - started:.1f} s; lowering {optimized.report().get('lowering')}")
    print(f"threads {torch.get_num_threads()}; c++ compiler {shutil.which('g++') or shutil.which('c++')}")

    def fp32(*x):
        return model(*x)

    candidates = {"fp32": fp32, "int8": optimized}
    if args.compile:
        for name, fn in (("fp32 compiled", model),):
            try:
                compiled = torch.compile(fn)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    compiled(*inputs)
                print(f"{name}: compiled in {time.perf_counter() - t0:.1f} s")
                candidates[name] = compiled
            except Exception as exc:  # report and go on
                print(f"{name}: torch.compile failed: {type(exc).__name__}: {str(exc)[:400]}")
    for round_ in range(args.rounds):
        medians = compare_latency(candidates, inputs, repeats=args.repeats)
        print(f"round {round_ + 1} of {args.rounds}:")
        for name, seconds in medians.items():
            print(f"{name:>16}: {seconds * 1e3:8.2f} ms   {medians['fp32'] / seconds:5.2f}x faster than fp32")
    if not args.no_profile:
        for name in ("fp32", "int8"):
            print(f"\n=== {name}: self CPU time over {args.repeats} calls")
            print(profile_table(candidates[name], inputs, args.repeats, args.rows))


if __name__ == "__main__":
    main()
