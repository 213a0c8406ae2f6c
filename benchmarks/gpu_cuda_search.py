"""The search on cuda (issue 22): every precision built here, measured and chosen on the GPU machine.

    # here (TVM + nvcc, no GPU): the bundle, through the CLI
    .venv/bin/fxopt search-bundle benchmarks.gpu_cuda_search:bert_small --target cuda \
        --tolerance cosine=0.999 --out build/cuda_search/bundle
    # the GPU machine (TVM's runtime only, no model source): measure, choose, save the winner
    source .tvm/setup.sh && python3 -m fxopt.cli pick build/cuda_search/bundle --allow-torch-mismatch \
        --out $OUT/chosen

``bert_small`` is a BERT of 4 layers, hidden 256, 4 heads, FFN 1024, vocabulary 8192, with deterministic weights
(``benchmarks.common.deterministic_init_``), batch 8 x 128 with padding in half the rows, and 8 calibration
batches of the same shape (the last 2 held out to measure fidelity). Small enough that its bundle (four
candidates, the float weights once) travels with the working tree.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import deterministic_init_  # noqa: E402

BATCH, SEQ, CALIBRATION_BATCHES = 8, 128, 8


def bert_small():
    """``(model, example_inputs, calibration_data)`` for ``fxopt search-bundle``."""
    from transformers import BertConfig, BertModel
    config = BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                        vocab_size=8192, attn_implementation="sdpa")
    model = deterministic_init_(BertModel(config, add_pooling_layer=False)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [_batch(gen, config.vocab_size) for _ in range(CALIBRATION_BATCHES)]
    return model, _batch(torch.Generator().manual_seed(0), config.vocab_size), batches


def _batch(gen, vocab):
    ids = torch.randint(1000, vocab, (BATCH, SEQ), generator=gen)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    lengths = torch.randint(SEQ // 4, SEQ + 1, (BATCH // 2,), generator=gen)
    for row, length in enumerate(lengths):  # half the rows padded
        mask[row, length:] = 0
    return ids, mask
