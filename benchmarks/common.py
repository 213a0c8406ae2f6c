"""Helpers shared by the benchmarks: deterministic models that both machines build identically, CUDA-event
timing and the git revision a result came from."""
from __future__ import annotations

import os
import subprocess
import zlib

import torch


def deterministic_init_(model: torch.nn.Module, std: float = 0.02) -> torch.nn.Module:
    """Give every parameter values that depend only on its name, so any machine builds the same model.

    Weights are N(0, std) from a generator seeded with crc32(name); LayerNorm
    weights are 1 and biases small, as in a trained Transformer.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
            if "LayerNorm.weight" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight") \
                    or name.endswith("ln_f.weight") or "layernorm" in name.lower() and name.endswith("weight") \
                    or name == "norm.weight":  # Llama's final RMSNorm
                values = 1.0 + values
            param.copy_(values.to(param.dtype))
    return model


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    a, b = reference.double(), other.double()
    return ((a - b).norm() / a.norm()).item()


def bert_base(batch: int = 8, seq: int = 128):
    from transformers import BertConfig, BertModel

    config = BertConfig(attn_implementation="sdpa")
    model = deterministic_init_(BertModel(config, add_pooling_layer=False)).eval()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, config.vocab_size, (batch, seq), generator=gen)
    return model, (input_ids, torch.ones(batch, seq, dtype=torch.long))


def bert_tiny(batch: int = 2, seq: int = 16):
    """BERT's structure at toy size, for the GPU benchmarks' CPU dry runs (the same code
    paths as ``bert_base``)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=1000, attn_implementation="sdpa")
    model = deterministic_init_(BertModel(config, add_pooling_layer=False)).eval()
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, seq * 5 // 8:] = 0  # padding: the attention bias must reach every kernel
    return model, (torch.randint(0, config.vocab_size, (batch, seq), generator=gen), mask)


def gpt2_small(batch: int = 8, seq: int = 128):
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(attn_implementation="sdpa", use_cache=False)
    model = deterministic_init_(GPT2Model(config)).eval()
    gen = torch.Generator().manual_seed(2)
    return model, (torch.randint(0, config.vocab_size, (batch, seq), generator=gen),)


def vit_base(batch: int = 8):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(attn_implementation="sdpa")
    model = deterministic_init_(ViTModel(config, add_pooling_layer=False)).eval()
    gen = torch.Generator().manual_seed(3)
    return model, (torch.randn(batch, 3, 224, 224, generator=gen),)


def llama_stack(batch: int = 8, seq: int = 128):
    """Issue 22's Llama-architecture decoder: 12 layers, hidden 768, 12 query / 4 kv heads (GQA), SwiGLU of 2048,
    RoPE, RMSNorm; the full-sequence forward of the base model (no LM head, no cache)."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, use_cache=False,
                         attn_implementation="sdpa")
    model = deterministic_init_(LlamaModel(config)).eval()
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(1000, config.vocab_size, (batch, seq), generator=gen)
    return model, (input_ids, torch.ones(batch, seq, dtype=torch.long))


MODELS = {"bert": bert_base, "gpt2": gpt2_small, "vit": vit_base, "llama": llama_stack}


def minilm_halves(sentences: int, batch: int = 32, max_length: int = 64) -> dict:
    """The MiniLM fidelity protocol of the benchmarks: the real model and tokenizer, ``sentences`` real sentences
    split in halves (calibration, evaluation; batches padded to ``max_length``), the captured fp32 graph and its
    mean-pooled embeddings of the evaluation half (the reference)."""
    import fxopt
    from fxopt.demo.data import minilm, real_sentences
    from fxopt.demo.embeddings import sentence_batches, sentence_embeddings
    model, tokenizer = minilm()
    texts = real_sentences(sentences)
    half = sentences // 2
    calibration = sentence_batches(tokenizer, texts[:half], batch, max_length)
    evaluation = sentence_batches(tokenizer, texts[half:], batch, max_length)
    graph = fxopt.capture(model, calibration[0])
    return {"model": model, "tokenizer": tokenizer, "calibration": calibration, "evaluation": evaluation,
            "graph": graph, "reference": sentence_embeddings(graph, evaluation)}


def cuda_median_ms(fn, warmup: int = 10, repeats: int = 50) -> float:
    """Median milliseconds of ``fn`` on the GPU, each call between two CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def git_rev() -> str:
    """The short hash of the checkout the benchmarks run from ("?" where there is none, as on the GPU machine)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "?"
    except OSError:
        return "?"
