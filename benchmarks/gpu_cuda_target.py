"""``optimize(target="cuda")`` artifacts built here, loaded and run on the GPU machine in a fresh process.

    python benchmarks/gpu_cuda_target.py build --out build/cuda_target     # here: TVM + nvcc, no GPU needed
    python3 benchmarks/gpu_cuda_target.py check --dir build/cuda_target   # there: fxopt.load, run, compare, time

``build`` optimizes two models for ``cuda`` and saves each artifact with its
inputs and the fp32 PyTorch outputs: a transformer block (attention + FFN) and
a small BERT (4 layers, hidden 256, vocab 8192: the artifact must travel; BERT-base's
fp32 weights are 435 MB). ``check`` needs neither the models' code nor the TVM
compiler (runtime only): it loads each artifact with ``fxopt.load`` (checksums,
no pickle), runs it, reports the relative error against fp32 PyTorch and the
median latency (CUDA events, after warm-up), and writes
``benchmarks/results/gpu_cuda_target.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fxopt  # noqa: E402
from benchmarks.common import cuda_median_ms  # noqa: E402


def small_bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                        vocab_size=8192, attn_implementation="sdpa")
    ids = torch.randint(0, config.vocab_size, (8, 128))
    return BertModel(config).eval(), (ids, torch.ones_like(ids))


def block():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from tests.backends.test_cuda_target import Block
    torch.manual_seed(0)
    return Block(256, 4).eval(), (torch.randn(8, 128, 256),)


class SpectralBlock(torch.nn.Module):
    """Attention, |rfft| mixing over the sequence (an op TVM cannot import), then an FFN: a partitioned build."""

    def __init__(self, width=256, heads=4, seq=128):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mix = torch.nn.Linear(seq // 2 + 1, seq)
        self.ffn = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = self.norm1(x + self.out(att.transpose(1, 2).reshape(b, t, c)))
        mixed = self.mix(torch.fft.rfft(x, dim=1).abs().transpose(1, 2)).transpose(1, 2)
        x = self.norm2(x + mixed)
        return x + self.ffn(x)


def spectral_block():
    torch.manual_seed(0)
    return SpectralBlock().eval(), (torch.randn(8, 128, 256),)


#: name -> (the model and its inputs, the cuda target's precision)
MODELS = {"block": (block, "fp16"), "bert-small": (small_bert, "fp16"), "spectral-block": (spectral_block, "fp16"),
          "block-fp8": (block, "fp8"), "bert-small-fp8": (small_bert, "fp8")}


def last_hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def build(out: str, names) -> None:
    for name in names:
        make, precision = MODELS[name]
        model, inputs = make()
        optimized = fxopt.optimize(model, inputs, target="cuda", precision=precision)
        optimized.save(os.path.join(out, name))
        with torch.no_grad():
            tensors = {f"input_{i}": x.contiguous() for i, x in enumerate(inputs)}
            tensors["expected"] = last_hidden(model(*inputs)).contiguous()
            if precision == "fp8":  # the same pipeline run by fxopt.linear_fp8's eager (reference) kernel
                reference = fxopt.optimize(model, inputs, target="eager", progress=False,
                                           passes=optimized.report()["pipeline"])
                tensors["expected_fp8_eager"] = last_hidden(reference(*inputs)).float().contiguous()
        save_file(tensors, os.path.join(out, f"{name}.io.safetensors"))
        print(json.dumps({"model": name, "build_s": optimized.report()["lowering"]["seconds"]}), flush=True)


def relative(out, expected) -> float:
    return ((out.float().cpu() - expected).norm() / expected.norm()).item()


def check(directory: str, names, results: str) -> list:
    rows = []
    for name in names:
        io = load_file(os.path.join(directory, f"{name}.io.safetensors"))
        inputs = [io[k].cuda() for k in sorted(k for k in io if k.startswith("input_"))]
        loaded = fxopt.load(os.path.join(directory, name), allow_torch_mismatch=True)  # built under torch 2.13 here
        out = loaded(*inputs)
        out = out["last_hidden_state"] if isinstance(out, dict) else out
        plan = getattr(loaded.runner, "plan", None)
        rows.append({"model": name, "precision": MODELS[name][1], "rel_err": relative(out, io["expected"]),
                     "rel_err_vs_eager_fp8": relative(out, io["expected_fp8_eager"]) if "expected_fp8_eager" in io
                     else None, "median_ms": cuda_median_ms(lambda: loaded(*inputs)),
                     "shape": list(inputs[0].shape), "gpu": torch.cuda.get_device_name(),
                     "regions": len(plan.regions) if plan is not None else 1,
                     "in_pytorch": sorted(plan.fallback_ops()) if plan is not None else []})
        print(json.dumps(rows[-1]), flush=True)
    write(rows, results)
    return rows



def write(rows, path: str) -> None:
    lines = ["# optimize(target=\"cuda\") artifacts on the GPU machine", "",
             "Built on the CPU machine with `python benchmarks/gpu_cuda_target.py build --out build/cuda_target`, "
             "loaded and run in a fresh process on the GPU machine with `python3 benchmarks/gpu_cuda_target.py "
             "check --dir build/cuda_target` (runtime-only TVM, no model source). Latency includes fxopt's "
             "call path (input checks, DLPack), median of 50 after 10 warm-up calls.", "",
             "fp8 rows: `optimize(target=\"cuda\", precision=\"fp8\")`; their second error is against the same "
             "pipeline run in PyTorch on the CPU machine (fxopt.linear_fp8's eager kernel).", "",
             "| model | precision | input | GPU | TVM regions | ops in PyTorch | rel err vs fp32 PyTorch | "
             "rel err vs eager fp8 | median ms |",
             "|---|---|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        fp8 = "-" if r.get("rel_err_vs_eager_fp8") is None else f"{r['rel_err_vs_eager_fp8']:.2e}"
        lines.append(f"| {r['model']} | {r['precision']} | {r['shape']} | {r['gpu']} | {r['regions']} | "
                     f"{', '.join(r['in_pytorch']) or '-'} | {r['rel_err']:.2e} | {fp8} | {r['median_ms']:.3f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "check"])
    parser.add_argument("--out", default="build/cuda_target")
    parser.add_argument("--dir", default="build/cuda_target")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                          "gpu_cuda_target.md"), help="check: the table's file")
    args = parser.parse_args()
    chosen = args.models.split(",")
    build(args.out, chosen) if args.command == "build" else check(args.dir, chosen, args.results)
