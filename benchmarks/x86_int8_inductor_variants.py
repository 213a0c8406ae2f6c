"""x86-int8 kernel paths side by side: eager oneDNN kernels, Inductor with oneDNN GEMMs, Inductor with autotuned GEMMs.

    python benchmarks/x86_int8_inductor_variants.py latency [--batch 1] [--rounds 4] [--minilm-random-weights]
    python benchmarks/x86_int8_inductor_variants.py fidelity --dir build/x86_fidelity

``latency``: one MiniLM optimized for x86-int8 with ``compile=never``, then the
same quantized graph compiled twice (``options=None``: every GEMM is oneDNN's
``qlinear_pointwise``; ``max_autotune`` with the CPP and ATen backends: each GEMM
timed as oneDNN and as Inductor's C++ micro-kernel), and what ``lower(compile="always")``
runs (``max_autotune`` on the graph with int8 embeddings that gather rows, instead of
the dequantized tables the plain graph has); ``--rounds`` interleaved medians of
each, with eager fp32 as the baseline.

``fidelity``: an artifact from ``benchmarks/x86_int8_fidelity.py build``, run on
each path: relative error of the last hidden state to the quantized graph (its
Q/DQ ops in float) and to the eager kernels, and mean cosine / nearest-neighbour
agreement of sentence embeddings against the stored fp32 reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxopt  # noqa: E402
from fxopt.backends import x86_int8  # noqa: E402
from fxopt.backends.x86_int8 import inductor  # noqa: E402
from fxopt.report import compare_latency  # noqa: E402
from fxopt.demo.embeddings import embedding_agreement, last_hidden_state, sentence_embeddings  # noqa: E402

AUTOTUNE = dict(inductor.INDUCTOR_OPTIONS)


def compiled_variants(graph, inputs) -> dict:
    """``{"inductor-onednn": fn, "inductor-autotune": fn}``, each compiled (and run once) on ``inputs``."""
    variants = {}
    for name, options in (("inductor-onednn", None), ("inductor-autotune", AUTOTUNE)):
        inductor.INDUCTOR_OPTIONS = options
        compiled = inductor.CompiledGraph(graph)
        started = time.perf_counter()
        with torch.inference_mode():
            compiled(*inputs)
        print(f"{name}: compiled in {time.perf_counter() - started:.0f} s", flush=True)
        variants[name] = compiled
    inductor.INDUCTOR_OPTIONS = AUTOTUNE
    return variants


def latency(args) -> None:
    from benchmarks.x86_int8 import random_minilm
    from fxopt.demo.data import minilm, real_sentences
    model, tokenizer = random_minilm() if args.minilm_random_weights else minilm()
    enc = tokenizer(real_sentences(max(8, args.batch))[: args.batch], padding="max_length", max_length=128,
                    truncation=True, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    optimized = fxopt.optimize(model, inputs, target="x86-int8", calibration_data=[inputs], progress=False)
    eager = x86_int8.lower(optimized.graph, compile="never", warn=False)
    lowered = x86_int8.lower(optimized.graph, compile="always", warn=False, example_inputs=inputs)
    candidates = {"fp32": lambda *x: model(*x), "eager-kernels": eager,
                  **compiled_variants(optimized.graph, inputs), "lower-always": lowered}
    for round_ in range(args.rounds):
        medians = compare_latency(candidates, inputs, repeats=args.repeats)
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {seconds * 1e3:.2f} ms ({medians['fp32'] / seconds:.2f}x)"
                                                  for name, seconds in medians.items()), flush=True)


def fidelity(args) -> None:
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(args.dir, "evaluation.safetensors"))
    batches = [(tensors[f"ids_{i}"].clone(), tensors[f"mask_{i}"].clone())
               for i in range(sum(k.startswith("ids_") for k in tensors))]
    loaded = x86_int8.load(os.path.join(args.dir, "artifact"), allow_torch_mismatch=True, compile="never")
    graph = loaded.graph
    variants = {"eager-kernels": loaded, **compiled_variants(graph, batches[0])}

    def rel(a, b) -> float:
        a, b = last_hidden_state(a), last_hidden_state(b)
        return round(((a - b).norm() / b.norm()).item(), 5)

    with torch.inference_mode():
        for label, inputs in (("inputs from the specs (ones)", graph.sample_inputs()), ("real batch 0", batches[0])):
            reference, eager = graph.module(*inputs), loaded(*inputs)
            print(f"{label}: rel. error to the Q/DQ graph", {k: rel(v(*inputs), reference) for k, v in variants.items()})
            print(f"{label}: rel. error to the eager kernels", {k: rel(v(*inputs), eager) for k, v in variants.items()})
        for name, fn in {**variants, "Q/DQ graph": graph.module}.items():
            cosine, nn = embedding_agreement(tensors["reference"], sentence_embeddings(fn, batches))
            print(f"{name}: cosine {cosine:.4f}, nearest-neighbour agreement {nn:.4f} ({len(tensors['reference'])} "
                  f"sentences)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("latency", "fidelity"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--minilm-random-weights", action="store_true")
    parser.add_argument("--dir", default="build/x86_fidelity")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    latency(args) if args.mode == "latency" else fidelity(args)


if __name__ == "__main__":
    main()
