"""BERT-base (random init from its config) built for an NVIDIA GPU through TVM, saved, and run where a GPU is.

    python examples/bert_cuda.py [--layers 12] [--out bert-cuda]

The build (TVM code generation + nvcc) runs on any machine with nvcc; the
artifact (library, weights, manifest) runs on a GPU machine with
``fxopt.load(dir)``. Without a GPU, calling it raises ``fxopt.DeviceError``.
Measured on an H100 (batch 8 x 128): 0.803 ms vs torch.compile's 1.000 ms
(benchmarks/results/gpu_bert_norm_act.md).
"""
from __future__ import annotations

import argparse

import torch

import fxopt


def make_bert(layers: int = 12, batch: int = 8, seq: int = 128):
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
    model = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return model, (ids, torch.ones_like(ids))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default="bert-cuda")
    args = parser.parse_args(argv)

    model, inputs = make_bert(args.layers, args.batch, args.seq)
    optimized = fxopt.optimize(model, inputs, target="cuda")
    directory = optimized.save(args.out)
    print(f"built {optimized.pipeline} in {optimized.report()['lowering']['seconds']} s; saved {directory}")
    if not torch.cuda.is_available():
        print("no GPU here: copy the artifact to a GPU machine and run fxopt.load(dir)(*inputs)")
        return optimized, None
    loaded = fxopt.load(directory)
    out = loaded(*(x.cuda() for x in inputs))
    hidden = out["last_hidden_state"]  # the model's own output structure
    with torch.no_grad():
        expected = model(*inputs).last_hidden_state
    error = ((hidden.float().cpu() - expected).norm() / expected.norm()).item()
    print(f"relative error vs PyTorch fp32: {error:.2e}")
    return optimized, error


if __name__ == "__main__":
    main()
