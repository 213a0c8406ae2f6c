"""x86-int8 vs fp32 eager at each thread count: is the int8 model's best thread count the machine's?

    python3 benchmarks/x86_int8_threads.py [--threads 1,2,4,8,16] [--batches 1,32] [--minilm-random-weights]

For small batches the int8 GEMMs are short and the model's elementwise ops
(quantize, residual add, LayerNorm, softmax) are tiny, so thread-pool
synchronisation at full width can cost more than it saves. At each thread
count, fp32 eager and fxopt x86-int8 run interleaved in one process (median of
``--repeats``); the ratio that matters is int8 at its best count against fp32
at its best count. Writes ``benchmarks/results/x86_int8_threads_<host>.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxopt  # noqa: E402
from fxopt.demo.data import minilm, real_sentences  # noqa: E402
from fxopt.demo.embeddings import sentence_batches  # noqa: E402
from fxopt.report.timing import compare_latency  # noqa: E402

SEQ = 128


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2,4,8,16")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--minilm-random-weights", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.minilm_random_weights:
        from benchmarks.x86_int8 import random_minilm
        model, tokenizer = random_minilm()
    else:
        model, tokenizer = minilm()
    threads = [t for t in map(int, args.threads.split(",")) if t <= os.cpu_count()]
    rows = []
    for batch in map(int, args.batches.split(",")):
        data = sentence_batches(tokenizer, real_sentences(batch * 5), batch, SEQ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = fxopt.optimize(model, data[0], target="x86-int8", calibration_data=data[1:], progress=False)
        fp32 = lambda ids, mask: model(input_ids=ids, attention_mask=mask)  # noqa: E731
        for count in threads:
            torch.set_num_threads(count)
            seconds = compare_latency({"fp32": fp32, "int8": int8}, data[0], repeats=args.repeats, warmup=3)
            rows.append({"batch": batch, "threads": count, "fp32_ms": seconds["fp32"] * 1e3,
                         "int8_ms": seconds["int8"] * 1e3})
            print(json.dumps(rows[-1]), flush=True)
    return write(rows, args)


def write(rows, args) -> dict:
    lines = [f"# x86-int8 vs fp32 by thread count ({platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__})",
             "", f"`python3 benchmarks/x86_int8_threads.py {' '.join(sys.argv[1:])}`; MiniLM "
             f"{'random weights' if args.minilm_random_weights else 'real weights'}, seq {SEQ}, median of "
             f"{args.repeats} interleaved runs per thread count.", "",
             "| batch | threads | fp32 ms | int8 ms | int8 speedup at this count |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['threads']} | {r['fp32_ms']:.2f} | {r['int8_ms']:.2f} | "
                     f"{r['fp32_ms'] / r['int8_ms']:.2f}× |")
    lines.append("")
    for batch in sorted({r["batch"] for r in rows}):
        mine = [r for r in rows if r["batch"] == batch]
        best_fp32 = min(mine, key=lambda r: r["fp32_ms"])
        best_int8 = min(mine, key=lambda r: r["int8_ms"])
        full = max(mine, key=lambda r: r["threads"])
        lines.append(f"- batch {batch}: best fp32 {best_fp32['fp32_ms']:.2f} ms ({best_fp32['threads']} threads), "
                     f"best int8 {best_int8['int8_ms']:.2f} ms ({best_int8['threads']} threads): "
                     f"{best_fp32['fp32_ms'] / best_int8['int8_ms']:.2f}× best vs best; "
                     f"{full['fp32_ms'] / best_int8['int8_ms']:.2f}× against fp32 at {full['threads']} threads")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"x86_int8_threads_{platform.node() or 'host'}.md")
    text = "\n".join(lines) + "\n"
    with open(out, "w") as f:
        f.write(text)
    print(text)
    return {"rows": rows}


if __name__ == "__main__":
    main()
