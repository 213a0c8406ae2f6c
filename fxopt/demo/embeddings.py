"""How close a compressed sentence-embedding model stays to the original: mean cosine and nearest neighbours.

    batches = sentence_batches(tokenizer, sentences, batch=32, max_length=64)
    reference = sentence_embeddings(model_fn, batches)
    cosine, nn_agreement = embedding_agreement(reference, sentence_embeddings(quantized_fn, batches))

Embeddings are mean-pooled over the attention mask (``fxopt.demo.data.mean_pool``).
NN agreement is the share of sentences whose most similar other sentence is the
same under both models. Used by the MiniLM quantization test and benchmark.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from fxopt.demo.data import mean_pool

Batch = Tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask)


def sentence_batches(tokenizer, sentences: Sequence[str], batch: int = 32, max_length: int = 64) -> List[Batch]:
    """``(input_ids, attention_mask)`` batches, each padded to ``max_length`` (one static shape for a graph)."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(list(sentences[i:i + batch]), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def last_hidden_state(output) -> torch.Tensor:
    """The token states: a tensor itself, the first of a graph's output tuple, or a HF model output's field."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output["last_hidden_state"]  # a ModelOutput, or a plain dict (an artifact loaded without transformers)


def sentence_embeddings(fn: Callable, batches: Sequence[Batch]) -> torch.Tensor:
    """Mean-pooled embeddings of every batch; ``fn(input_ids, attention_mask)`` is a model or a graph."""
    with torch.no_grad():
        return torch.cat([mean_pool(last_hidden_state(fn(ids, mask)), mask) for ids, mask in batches])


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """For each row, the index of the most cosine-similar other row."""
    unit = F.normalize(embeddings, dim=1)
    similarity = unit @ unit.t()
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(dim=1)


def embedding_agreement(reference: torch.Tensor, embeddings: torch.Tensor) -> Tuple[float, float]:
    """``(mean cosine, nearest-neighbour agreement)`` of ``embeddings`` against ``reference``."""
    cosine = F.cosine_similarity(reference, embeddings).mean().item()
    agreement = (nearest_neighbours(embeddings) == nearest_neighbours(reference)).float().mean().item()
    return cosine, agreement


def pooled_cosine_distance(masks: Sequence[torch.Tensor]) -> Callable:
    """A mixed-precision metric: ``1 - mean cosine`` of mean-pooled token states, batches masked by ``masks``."""

    def metric(reference, outputs) -> float:
        ref = torch.cat([mean_pool(r[0], m) for r, m in zip(reference, masks)])
        out = torch.cat([mean_pool(o[0], m) for o, m in zip(outputs, masks)])
        return 1.0 - F.cosine_similarity(ref, out).mean().item()

    return metric
