"""Which weights ``sparsify`` zeroes: magnitude pruning masks, unstructured or N:M.

A mask is a bool tensor shaped like the weight, True where the weight is kept.

- Unstructured: the ``round(sparsity * numel)`` smallest magnitudes are
  zeroed, either within each weight (``scope=layer``) or over all the
  weights together (``scope=global``, one threshold, so layers whose weights
  are small lose more). The count is exact: ties at the threshold are broken
  by position, so ``sparsity=0.5`` on a weight of all-equal values still
  zeroes half of it.
- N:M semi-structured: along each row (the input dim of a linear weight), in
  every group of M consecutive weights the N largest magnitudes are kept. This
  is the layout sparse tensor cores read (2:4 on NVIDIA Ampere and later).

Magnitudes are compared in float32, so weights of different dtypes rank on
one scale under ``scope=global``.
"""
from __future__ import annotations

import re
from typing import List, Sequence, Tuple

import torch

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> Tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``. Raises ValueError unless it is ``N:M`` with integers 0 < N < M."""
    match = _NM.match(pattern)
    if match is None:
        raise ValueError(f"pattern={pattern} is not of the form N:M")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern={pattern} must keep N of every M weights with 0 < N < M")
    return n, m


def prune_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` fraction zeroes (rounded to the nearest)."""
    return min(numel, int(round(sparsity * numel)))


def keep_largest(magnitudes: torch.Tensor, prune: int) -> torch.Tensor:
    """Mask of a flat tensor keeping all but its ``prune`` smallest entries (ties: the first ones go)."""
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    if prune <= 0:
        return keep
    threshold = torch.kthvalue(magnitudes, prune).values
    below = magnitudes < threshold
    keep &= ~below
    ties = torch.nonzero(magnitudes == threshold).flatten()
    keep[ties[: prune - int(below.sum())]] = False
    return keep


def layer_masks(weights: Sequence[torch.Tensor], sparsity: float) -> List[torch.Tensor]:
    """One mask per weight, each zeroing ``sparsity`` of that weight."""
    masks = []
    for weight in weights:
        flat = _magnitudes(weight)
        masks.append(keep_largest(flat, prune_count(flat.numel(), sparsity)).reshape(weight.shape))
    return masks


def global_masks(weights: Sequence[torch.Tensor], sparsity: float) -> List[torch.Tensor]:
    """Masks zeroing ``sparsity`` of all the weights together, by one magnitude threshold."""
    if not weights:
        return []
    flat = torch.cat([_magnitudes(w) for w in weights])
    keep = keep_largest(flat, prune_count(flat.numel(), sparsity))
    sizes = [w.numel() for w in weights]
    return [part.reshape(w.shape) for part, w in zip(torch.split(keep, sizes), weights)]


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest magnitudes of each group of ``m`` consecutive weights along the last dim."""
    rows, columns = weight.shape
    if columns % m:
        raise ValueError(f"{columns} columns are not a multiple of the group size {m}")
    groups = weight.detach().float().abs().reshape(rows, columns // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(rows, columns)


def nonzeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The number of nonzero weights in each group of ``m`` consecutive ones along the last dim."""
    rows, columns = weight.shape
    return (weight != 0).reshape(rows, columns // m, m).sum(-1)


def _magnitudes(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().abs().reshape(-1)
