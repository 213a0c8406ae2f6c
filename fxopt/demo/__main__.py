"""`make demo`: the real all-MiniLM-L6-v2 through ``fxopt.optimize(target="x86-int8")``, with a before/after table.

    python -m fxopt.demo [--sentences 32] [--calibration 128] [--target x86-int8] [--out DIR]

Captures the model on real English sentences (standard-library docstrings),
quantizes it to int8 calibrated on other real sentences, lowers it to the
int8 kernels of this CPU, saves the artifact and loads it back, and compares
the result with the original PyTorch model: graph size, artifact size,
latency (median of interleaved runs, same process) and the cosine similarity
of the mean-pooled sentence embeddings.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import fxopt
from fxopt.demo.data import mean_pool, minilm, real_sentences
from fxopt.report import compare_latency, format_table


def tokenize(tokenizer, sentences, length: int):
    enc = tokenizer(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def embedding_cosine(reference, candidate, inputs) -> float:
    mask = inputs[1]
    a = mean_pool(reference(*inputs)["last_hidden_state"], mask)
    b = mean_pool(candidate(*inputs)["last_hidden_state"], mask)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


class Phases:
    """One progress line per phase of the demo, with the seconds since it started."""

    def __init__(self, total: int):
        self.started, self.total, self.done = time.perf_counter(), total, 0

    def __call__(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total} {time.perf_counter() - self.started:5.0f} s] {what}", flush=True)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=32, help="batch size of the timed and scored batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per sentence (padded)")
    parser.add_argument("--calibration", type=int, default=128, help="real sentences to calibrate on")
    parser.add_argument("--target", default="x86-int8", choices=list(fxopt.targets.registered_targets()))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="artifact directory (default: a temporary one)")
    args = parser.parse_args(argv)

    phase = Phases(5)
    phase("load all-MiniLM-L6-v2 and tokenize real sentences")
    torch.manual_seed(0)
    model, tokenizer = minilm()
    sentences = real_sentences(args.calibration + args.sentences)
    inputs = tokenize(tokenizer, sentences[-args.sentences:], args.length)
    calibration = [tokenize(tokenizer, sentences[i:i + args.sentences], args.length)
                   for i in range(0, args.calibration - args.sentences + 1, args.sentences)]
    phase(f"optimize: input {tuple(inputs[0].shape)}, target {args.target}, calibrated on "
          f"{len(calibration) * args.sentences} other sentences (calibrate, quantize, lower and compile, time)")
    optimized = fxopt.optimize(model, inputs, target=args.target, calibration_data=calibration)
    out = args.out or os.path.join(tempfile.mkdtemp(prefix="fxopt-demo-"), "minilm")
    phase(f"save the artifact to {out}")
    optimized.save(out)
    phase("load it back with fxopt.load (the kernel path optimize measured faster, no second timing)")
    loaded = fxopt.load(out)
    phase(f"measure: embedding cosine, then latency ({args.repeats} interleaved rounds, medians)")
    reference = lambda *xs: model(*xs, return_dict=True)  # noqa: E731
    with torch.inference_mode():
        cosine = embedding_cosine(reference, loaded, inputs)
    latency = compare_latency({"before": reference, "after": loaded}, inputs, repeats=args.repeats)
    before = optimized.original_graph
    table = format_table(
        ["", "graph nodes", "weights", "size MB", "latency ms", "latency ratio", "embedding cosine"],
        [
            ["before (PyTorch fp32)", len(before), before.param_count(), before.size_bytes() / 1e6,
             latency["before"] * 1e3, 1.0, 1.0],
            [f"after (fxopt {args.target}, loaded from disk)", len(loaded.graph), loaded.graph.param_count(),
             directory_bytes(out) / 1e6, latency["after"] * 1e3, latency["after"] / latency["before"], cosine],
        ],
    )
    print(table)
    lowering = loaded.stats.get("lowering")
    if lowering:
        print(f"int8 kernels for ISA {lowering['isa']}: {lowering['int8_linears']} linears, "
              f"{lowering['int8_embeddings']} embedding tables; artifact: {out}")
    return table


if __name__ == "__main__":
    main()
