"""Structured pruning: ratio against measured eager CPU latency and against FLOPs.

    python benchmarks/prune_latency.py            # writes benchmarks/results/prune_latency.md

Two models, each cleaned up first (``cleanup``; the CNN also ``fold-conv-bn``: without it, eval-mode clones
and BatchNorm, which pruning does not shrink or shrinks less, blur the comparison), then pruned at 0, 25, 50
and 75%:
- the real all-MiniLM-L6-v2 on 32 sentences padded to 128 tokens, ``prune-channels`` on heads and FFN
  neurons (the hidden size is fixed by the graph's output);
- a VGG-style CNN (conv 3->64->128->256, 3x3, BN, ReLU, pools) on 16 images of 64x64, ``prune-channels`` on
  conv channels.

Latency: the median of interleaved runs of every variant in one process (``fxopt.report.timing.
compare_latency``), as a ratio to the unpruned graph. FLOPs: 2 x multiply-adds of the linear, matmul and
conv ops, counted from the graph's TensorInfo. GEMM/conv ms: the self time of the GEMM and convolution kernels
in one profiled call (torch.profiler), the part of the latency that pruning shrinks with the FLOPs; the rest
(LayerNorm, residual adds, softmax over the fixed hidden size, copies, allocation) shrinks less or not at all.
On a machine shared with other jobs the ratios are noisy; re-run on a quiet machine before quoting them.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from typing import Dict, List

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxopt  # noqa: E402
from fxopt.ir import meta as M  # noqa: E402
from fxopt.report.timing import compare_latency, format_table  # noqa: E402

RATIOS = (0.0, 0.25, 0.5, 0.75)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prune_latency.md")
aten = torch.ops.aten
MATMULS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default)
CONVS = (aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


def flops(graph) -> int:
    """2 x multiply-adds of every linear, matmul and convolution."""
    total = 0
    for node in graph.call_nodes():
        if node.target not in MATMULS + CONVS:
            continue
        if node.target in CONVS:  # each output reads in/groups x kernel inputs
            reduced = 1
            for d in M.tensor_info(node.args[1]).shape[1:]:
                reduced *= d
        else:  # linear(x, W), addmm(b, x, W): x's last dim; mm/bmm/matmul(a, b): a's last dim
            operand = node.args[0] if node.target in (aten.linear.default, aten.mm.default, aten.bmm.default,
                                                      aten.matmul.default) else node.args[1]
            reduced = M.tensor_info(operand).shape[-1]
        total += 2 * M.tensor_info(node).numel * reduced
    return total


def clean(graph, spec: str):
    """What a deployment pipeline runs first (eval-mode clones and dropouts gone, BN folded into convs)."""
    return fxopt.Pipeline(spec)(graph).graph


def minilm_case():
    from fxopt.demo.data import minilm, real_sentences

    model, tokenizer = minilm()
    enc = tokenizer(real_sentences(32), padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    inputs = (enc["input_ids"], enc["attention_mask"])
    return clean(fxopt.capture(model, inputs), "cleanup"), inputs, "prune-channels{{ratio={},kinds=heads;ffn}}"


def cnn_case():
    torch.manual_seed(0)
    layers, c = [], 3
    for width in (64, 128, 256):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.MaxPool2d(2)]
        c = width
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()
    x = torch.randn(16, 3, 64, 64)
    return clean(fxopt.capture(model, (x,)), "cleanup,fold-conv-bn"), (x,), "prune-channels{{ratio={},kinds=channels}}"


#: The ATen kernels whose self time is the GEMM/convolution work (the profiler's names).
COMPUTE_KERNELS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                   "aten::_slow_conv2d_forward", "aten::thnn_conv2d"}


def compute_ms(module, inputs, calls: int = 5) -> float:
    """Milliseconds a call spends in GEMM and convolution kernels (self time, torch.profiler; median of calls)."""
    from torch.profiler import ProfilerActivity, profile

    times = []
    with torch.inference_mode():
        module(*inputs)
        for _ in range(calls):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                module(*inputs)
            times.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in COMPUTE_KERNELS) / 1e3)
    return statistics.median(times)


def measure(name: str, case, repeats: int) -> List[list]:
    graph, inputs, spec = case()
    variants: Dict[str, fxopt.Graph] = {}
    for ratio in RATIOS:
        variants[f"{ratio:.2f}"] = fxopt.Pipeline(spec.format(ratio))(graph).graph if ratio else graph
    latency = compare_latency({k: g.module for k, g in variants.items()}, inputs, repeats=repeats)
    compute = {k: compute_ms(g.module, inputs) for k, g in variants.items()}
    base_latency, base_flops = latency["0.00"], flops(graph)
    rows = []
    for key, g in variants.items():
        rows.append([name, key, f"{g.param_count():,}", round(flops(g) / 1e9, 2), round(flops(g) / base_flops, 3),
                     round(latency[key] * 1e3, 1), round(latency[key] / base_latency, 3), round(compute[key], 1),
                     round(compute[key] / compute["0.00"], 3)])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    rows = measure("MiniLM 32x128", minilm_case, args.repeats) + measure("VGG CNN 16x3x64x64", cnn_case, args.repeats)
    headers = ["model", "ratio", "params", "GFLOPs", "FLOPs vs 0", "median ms", "latency vs 0", "GEMM/conv ms",
               "GEMM/conv vs 0"]
    text = "\n".join([
        "# Structured pruning: ratio vs latency and FLOPs (eager CPU)", "",
        f"`python benchmarks/prune_latency.py --repeats {args.repeats}`; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads. Latency is the median "
        "of interleaved runs in one process (fxopt.report.timing.compare_latency), as a ratio to the unpruned graph.",
        "", "```", format_table(headers, rows), "```", ""])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
