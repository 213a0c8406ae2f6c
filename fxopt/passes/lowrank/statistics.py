"""Per-input-channel activation scales for activation-aware low-rank (ASVD), from calibration data.

The data are the calibration batches handed to the pass, as GPTQ and mixed precision take theirs:

    fxopt.Pipeline("low-rank{rank=64,activation-aware=true}", calibration=batches)(graph)

Each factored op's input is observed over the channel axis its handler names
(last dim for linears, dim 1 for convolutions):
- ``rms``: ``sqrt(mean x_j²)``, which makes ``||(W - B A) diag(s)||²`` the expected
  output error when channels are uncorrelated (the default);
- ``absmean``: ``mean |x_j|`` (the ASVD paper's statistic);
- ``covariance``: the Cholesky factor ``L`` of ``E[x xᵀ]`` (damped by 1% of its mean diagonal, as GPTQ does),
  which whitens correlated channels too (SVD-LLM): the exact expected output error, and on MiniLM by far the
  smallest loss at a given rank (see benchmarks/results/lowrank_minilm.md).
``alpha`` raises a diagonal statistic to a power (ASVD uses ``absmean`` with 0.5).
Channels that never fired get a floor of 1e-3 of the largest scale, so that
``A = (Σ Vᵀ)[:r] · diag(1/s)`` stays finite.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.passes.quantize.calibrate import _ObservingInterpreter
from fxopt.passes.quantize.gptq import DAMPING

STATISTICS = ("rms", "absmean", "covariance")
#: Smallest scale, relative to the largest, given to channels that were (nearly) always zero.
SCALE_FLOOR = 1e-3


class ChannelMomentObserver:
    """Accumulates, per channel along ``axis``, the sums of ``x²`` and ``|x|`` (float64) and the row count;
    with ``gram=True`` also ``Σ x xᵀ`` over the channels."""

    def __init__(self, axis: int, gram: bool = False):
        self.axis, self.gram = axis, gram
        self.squares, self.absolutes, self.products, self.rows = 0.0, 0.0, 0.0, 0

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().double().movedim(self.axis, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        self.squares = self.squares + (rows * rows).sum(dim=0)
        self.absolutes = self.absolutes + rows.abs().sum(dim=0)
        if self.gram:
            self.products = self.products + rows.t() @ rows
        self.rows += rows.shape[0]

    def statistic(self, name: str, alpha: float = 1.0) -> torch.Tensor:
        """The diagonal scale ``s`` (``rms``, ``absmean``) or the whitening factor ``L`` (``covariance``)."""
        rows = max(self.rows, 1)
        if name == "covariance":
            second_moment = self.products / rows
            identity = torch.eye(second_moment.shape[0], dtype=second_moment.dtype)
            mean_square = second_moment.diagonal().mean()
            if mean_square <= 0:  # the input was always 0: every factorization is as good
                return identity
            return torch.linalg.cholesky(second_moment + DAMPING * mean_square * identity)
        scale = (self.squares / rows).sqrt() if name == "rms" else self.absolutes / rows
        return _with_floor(scale.pow(alpha))


def activation_scales(graph: Graph, ops: Sequence[Tuple[fx.Node, int]], batches: Iterable[Tuple],
                      statistic: str = "rms", alpha: float = 1.0) -> Dict[str, torch.Tensor]:
    """Weight target -> ``s`` ``[in]`` or ``L`` ``[in, in]``, from the inputs of ``ops`` ((node, channel axis)
    pairs) on ``batches``.

    Ops sharing a weight pool their rows.
    """
    per_weight: Dict[str, ChannelMomentObserver] = {}
    watched: Dict[str, list] = {}
    for node, axis in ops:
        observer = per_weight.setdefault(node.args[1].target, ChannelMomentObserver(axis, statistic == "covariance"))
        watchers = watched.setdefault(node.args[0].name, [])
        if observer not in watchers:
            watchers.append(observer)
    interpreter = _ObservingInterpreter(graph.module, watched)
    with torch.no_grad():
        for batch in batches:
            interpreter.run(*batch)
    return {target: obs.statistic(statistic, alpha) for target, obs in per_weight.items()}


def _with_floor(scale: torch.Tensor) -> torch.Tensor:
    top = scale.max()
    if top <= 0:
        return torch.ones_like(scale)
    return scale.clamp_min(SCALE_FLOOR * top)
