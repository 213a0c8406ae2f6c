"""`make demo`: the real all-MiniLM-L6-v2 through fxopt, with a before/after table.

    python -m fxopt.demo [--sentences 32] [--passes fuse]

Captures the model on real English sentences, runs the pipeline, and compares
the result with the original PyTorch model: graph size, weights, latency
(median of interleaved runs, same process) and the cosine similarity of the
mean-pooled sentence embeddings. The target is eager PyTorch until the x86
int8 backend lands.
"""
from __future__ import annotations

import argparse

import torch

import fxopt
from fxopt.backends import eager
from fxopt.data import mean_pool, minilm, minilm_inputs, real_sentences
from fxopt.report import compare_latency, format_table


def embedding_cosine(reference, candidate, inputs) -> float:
    mask = inputs[1]
    a = mean_pool(reference(*inputs)["last_hidden_state"], mask)
    b = mean_pool(candidate(*inputs)["last_hidden_state"], mask)
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--passes", default="fuse")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = minilm()
    inputs = minilm_inputs(tokenizer, real_sentences(args.sentences))
    print(f"all-MiniLM-L6-v2 on {args.sentences} real sentences, input {tuple(inputs[0].shape)}; "
          f"pipeline {args.passes!r}, target eager")
    graph = fxopt.capture(model, inputs)
    result = fxopt.Pipeline(args.passes)(graph)
    optimized = eager.lower(result.graph)
    reference = lambda *xs: model(*xs, return_dict=True)  # noqa: E731
    with torch.inference_mode():
        cosine = embedding_cosine(reference, optimized, inputs)
    latency = compare_latency({"before": reference, "after": optimized}, inputs, repeats=args.repeats)
    table = format_table(
        ["", "graph nodes", "weights", "size MB", "latency ms", "latency ratio", "embedding cosine"],
        [
            ["before (PyTorch)", len(graph), graph.param_count(), graph.size_bytes() / 1e6,
             latency["before"] * 1e3, 1.0, 1.0],
            ["after (fxopt)", len(result.graph), result.graph.param_count(), result.graph.size_bytes() / 1e6,
             latency["after"] * 1e3, latency["after"] / latency["before"], cosine],
        ],
    )
    print(table)
    return table


if __name__ == "__main__":
    main()
