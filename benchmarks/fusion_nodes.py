"""Node counts and eager CPU latency of the `fuse` preset on BERT, GPT-2, ViT (small configs) and the real MiniLM.

    python benchmarks/fusion_nodes.py [--repeats 10] [--out benchmarks/results/fusion_nodes.md]

For each model: capture it, run `cleanup` alone and the `fuse` preset, then
record the node counts, what `fuse` created, the relative error of the fused
graph against the model, and the eager CPU latency of the three graphs:
medians of ``--repeats`` interleaved runs in one process
(``fxopt.report.compare_latency``), reported as ratios to the unfused
captured graph. The result is a Markdown table written to ``--out``, headed by
the command and the machine it ran on.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils import _pytree as pytree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import fxopt  # noqa: E402
from fxopt.backends import eager  # noqa: E402
from fxopt.report import compare_latency  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
aten = torch.ops.aten
SEED = 0
BATCH, SEQ = 4, 128


# -------------------------------------------------------------- models
def bert_small():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=SEQ, attn_implementation="eager")
    torch.manual_seed(SEED)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[BATCH // 2:, SEQ * 3 // 4:] = 0  # half the batch padded
    return model, (ids, mask)


def gpt2_small():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=1000, n_positions=SEQ, n_embd=256, n_layer=4, n_head=4,
                        attn_implementation="eager", use_cache=False)
    torch.manual_seed(SEED)
    model = GPT2Model(config).eval()
    return model, (torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(2)),)


def vit_small():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=1024, attn_implementation="eager")
    torch.manual_seed(SEED)
    model = ViTModel(config, add_pooling_layer=False).eval()
    return model, (torch.randn(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(3)),)


def minilm_real(sentences: int = 32):
    from fxopt.demo.data import minilm, minilm_inputs, real_sentences

    model, tokenizer = minilm()
    return model, minilm_inputs(tokenizer, real_sentences(sentences))


MODELS: Dict[str, Tuple[str, Callable]] = {
    "BERT": (f"4 layers, hidden 256, 4 heads, batch {BATCH} x {SEQ} tokens, padded", bert_small),
    "GPT-2": (f"4 layers, hidden 256, 4 heads, batch {BATCH} x {SEQ} tokens", gpt2_small),
    "ViT": (f"4 layers, hidden 256, 4 heads, batch {BATCH} of 64x64 images (65 tokens)", vit_small),
    "MiniLM": ("real all-MiniLM-L6-v2, 6 layers, hidden 384, 32 real sentences", minilm_real),
}


# ------------------------------------------------------------ measure
def created_ops(graph) -> str:
    counts = {
        "sdpa": sum(1 for _ in graph.call_nodes(aten.scaled_dot_product_attention.default)),
        "merged": sum(1 for _ in graph.call_nodes(aten.split_with_sizes.default)),
        "linear_act": sum(1 for _ in graph.call_nodes(torch.ops.fxopt.linear_act.default)),
        "conv_act": sum(1 for _ in graph.call_nodes(torch.ops.fxopt.conv_act.default)),
    }
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n)


def relative_error(model, graph, inputs) -> float:
    """The largest relative error over the output tensors, the model's own outputs as reference."""
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(model(*inputs)) if isinstance(t, torch.Tensor)]
        got = [t for t in pytree.tree_leaves(graph.run(*inputs)) if isinstance(t, torch.Tensor)]
    return max(((a.double() - b.double()).norm() / a.double().norm()).item() for a, b in zip(want, got))


def measure(name: str, build: Callable, repeats: int) -> List:
    model, inputs = build()
    graph = fxopt.capture(model, inputs)
    cleaned = fxopt.Pipeline("cleanup")(graph).graph
    start = time.perf_counter()
    fused = fxopt.Pipeline("fuse")(graph).graph
    fuse_seconds = time.perf_counter() - start
    candidates = {"unfused": eager.lower(graph), "cleanup": eager.lower(cleaned), "fused": eager.lower(fused)}
    latency = compare_latency(candidates, inputs, repeats=repeats)
    error = relative_error(model, fused, inputs)
    return [name, len(graph), len(cleaned), len(fused), created_ops(fused), f"{error:.1e}",
            f"{latency['unfused'] * 1e3:.1f}", f"{latency['cleanup'] / latency['unfused']:.3f}",
            f"{latency['fused'] / latency['unfused']:.3f}", f"{fuse_seconds:.1f}"]


HEADERS = ["model", "nodes captured", "nodes after cleanup", "nodes after fuse", "fuse created", "rel err (fp32)",
           "unfused ms", "cleanup / unfused", "fuse / unfused", "fuse pass s"]


def markdown(rows: List[List], command: str, repeats: int) -> str:
    lines = [
        "# `fuse` preset: node counts and eager CPU latency",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; latency = median of {repeats} interleaved runs in one process "
        "(`fxopt.report.compare_latency`), eager PyTorch under `inference_mode`, fp32.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join("---" for _ in HEADERS) + "|",
        *("| " + " | ".join(str(v) for v in row) + " |" for row in rows),
        "",
        "Models:",
        *(f"- {name}: {description}" for name, (description, _) in MODELS.items()),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "fusion_nodes.md"))
    args = parser.parse_args(argv)
    if args.repeats < 10:
        parser.error("--repeats must be at least 10 (medians of fewer runs are noise on a shared machine)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name, (_, build) in MODELS.items():
        rows.append(measure(name, build, args.repeats))
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/fusion_nodes.py", *given])
    text = markdown(rows, command, args.repeats)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
