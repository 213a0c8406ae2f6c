"""The arithmetic of low-rank factorization: truncated SVD, and how to choose the ranks.

A weight ``W`` ``[out, in]`` becomes ``B @ A`` with

    W · diag(s) = U Σ Vᵀ                  (s = 1 for plain SVD; per-input-channel activation scales otherwise)
    A = (Σ Vᵀ)[:r] · diag(1/s)            [r, in]
    B = U[:, :r]                          [out, r]

By Eckart-Young, plain SVD minimises ``||W - B A||_F`` over rank-r factors. The
activation-aware form (ASVD) minimises ``||(W - B A) · diag(s)||_F`` instead:
with ``s`` the root mean square of each input channel and uncorrelated
channels, that is the expected output error ``E||(W - B A) x||²``, which is
what the model sees. With correlated channels the exact form of that error is
``||(W - B A) L||_F`` for ``L`` the Cholesky factor of ``E[x xᵀ]`` (whitening, as
in SVD-LLM): a 2-D lower-triangular ``scale`` ``L`` is used in place of
``diag(s)``, and ``A = (Σ Vᵀ)[:r] · L⁻¹``.

Ranks come from one of three rules:
- a fixed rank;
- an energy threshold: the smallest ``r`` whose squared singular values hold that fraction of ``||W·diag(s)||²``;
- a global parameter budget (:func:`allocate_ratio`): every layer starts at rank 1, then the singular values with
  the largest share of their own layer's energy are added, across all layers, while the budget allows.

All arithmetic is float64; the factors are cast back to the weight's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from fxopt.passes.quantize.gptq import _one_thread


@dataclass(frozen=True)
class Spectrum:
    """The SVD of one (scaled) weight ``W · diag(s)``, float64, and the scale ``s`` it was taken with."""

    u: torch.Tensor  # [out, k]
    singular_values: torch.Tensor  # [k], descending
    vh: torch.Tensor  # [k, in]
    scale: Optional[torch.Tensor]  # [in] (diagonal), [in, in] (lower-triangular L) or None for plain SVD

    @property
    def out_features(self) -> int:
        return self.u.shape[0]

    @property
    def in_features(self) -> int:
        return self.vh.shape[1]

    @property
    def full_rank(self) -> int:
        return self.singular_values.shape[0]

    def energy_shares(self) -> torch.Tensor:
        """Each singular value's share of the total squared norm (all zeros for a zero matrix)."""
        squares = self.singular_values ** 2
        total = squares.sum()
        return squares / total if total > 0 else torch.zeros_like(squares)


def spectrum(weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> Spectrum:
    """SVD of ``weight`` ``[out, in]`` times ``diag(scale)`` (1-D) or ``scale`` (2-D), in float64."""
    matrix = weight.detach().double()
    if scale is not None:
        scale = scale.detach().double()
        matrix = matrix * scale.unsqueeze(0) if scale.dim() == 1 else matrix @ scale
    with _one_thread():  # LAPACK's SVD with intra-op threads is 10-60x slower on a busy 2-core CPU
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return Spectrum(u, s, vh, scale)


def factors(spec: Spectrum, rank: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` with ``B @ A`` the best rank-``r`` approximation of the (scaled) weight."""
    rank = max(1, min(rank, spec.full_rank))
    a = spec.singular_values[:rank, None] * spec.vh[:rank]
    if spec.scale is not None and spec.scale.dim() == 1:
        a = a / spec.scale.unsqueeze(0)
    elif spec.scale is not None:  # a @ L⁻¹
        a = torch.linalg.solve_triangular(spec.scale, a, upper=False, left=False)
    b = spec.u[:, :rank]
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def factor_weight(weight: torch.Tensor, rank: int, scale: Optional[torch.Tensor] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shortcut: ``factors(spectrum(weight, scale), rank, weight.dtype)``."""
    return factors(spectrum(weight, scale), rank, weight.dtype)


def energy_rank(spec: Spectrum, energy: float) -> int:
    """The smallest rank whose singular values hold ``energy`` of the squared norm (1 for a zero matrix)."""
    if spec.singular_values.sum() == 0:
        return 1
    kept = torch.cumsum(spec.energy_shares(), 0)
    # 1e-12: the shares of an exactly rank-r matrix may sum to 1 - 1e-16 at r.
    return min(int((kept < energy - 1e-12).sum().item()) + 1, spec.full_rank)


def factored_params(rank: int, out_features: int, in_features: int) -> int:
    return rank * (out_features + in_features)


def saves_params(rank: int, out_features: int, in_features: int) -> bool:
    """Whether rank-``r`` factors are smaller than the dense weight: ``r·(in+out) < in·out``."""
    return factored_params(rank, out_features, in_features) < out_features * in_features


def stored_params(rank: int, out_features: int, in_features: int) -> int:
    """What a layer costs at ``rank``: the factors, or the dense weight when factors would not be smaller."""
    return min(factored_params(rank, out_features, in_features), out_features * in_features)


def allocate_ratio(spectra: Dict[str, Spectrum], ratio: float) -> Dict[str, int]:
    """Ranks that keep at most ``ratio`` of the layers' dense parameters (rank 1 each at least).

    Greedy over all singular values of all layers, largest share of its own
    layer's energy first. A layer's cost is :func:`stored_params`, so once its
    factors stop saving anything, further ranks are free (it stays dense).
    """
    budget = ratio * sum(s.out_features * s.in_features for s in spectra.values())
    ranks = {name: 1 for name in spectra}
    spent = sum(stored_params(1, s.out_features, s.in_features) for s in spectra.values())
    candidates = [(float(share), name, index) for name, s in spectra.items()
                  for index, share in enumerate(s.energy_shares().tolist()) if index > 0]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))  # ties: deterministic by name, then index
    closed = set()  # layers whose next singular value did not fit: later (smaller) ones are not taken either
    for _, name, index in candidates:
        if name in closed:
            continue
        s = spectra[name]
        extra = (stored_params(index + 1, s.out_features, s.in_features)
                 - stored_params(index, s.out_features, s.in_features))
        if spent + extra > budget:
            closed.add(name)
            continue
        ranks[name] = index + 1
        spent += extra
    return ranks
