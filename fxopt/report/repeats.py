"""Find repeated blocks (the layers of a Transformer, the blocks of a ResNet stage) in a graph outline.

A graph drawn op by op is unreadable past a few layers; drawn with each run of
identical layers as one box marked "x12" it fits on a screen. Layers are found
structurally, so this works on graphs loaded from an artifact (no module names).
The ops are taken in graph order (topological, as torch.export emits them),
without inputs, outputs and weights. Ops ``[s, s + p)`` are a *copy* of the next
``p`` ops when:

- op ``i`` and op ``i + p`` have the same kind and as many inputs;
- an input inside the window is matched by the same input one period later
  (the same inner edge in the next copy);
- an input from outside the window is matched by one from outside the next
  window: the previous layer's output, the embeddings (which need not sit right
  before the first layer), or the very same node (an attention mask every layer
  reads); two graph inputs match only if they are the same one.

Each op pair turns these rules into a threshold: the window is a copy when it
starts after every threshold of its ops, so all windows of a period are checked
in one vectorized pass. ``k`` back-to-back copies are a repeat; the one covering
most ops wins (then the shorter period: one layer, not two), and the ops before
and after it are searched the same way.

A repeat can start at any rotation of the layer (``[LayerNorm, q, k, v, ...]``
instead of ``[q, k, v, ..., LayerNorm]``) when both have as many copies. Where
nodes carry module paths (a freshly captured graph), the rotation starting at
the highest-level module boundary is chosen, so that a block is
``encoder.layer.N`` itself. Otherwise (and among equals) the rotation that
leaves the ops around it most repetitive: when two mixed-precision layers differ
from the four after them, cutting at the layer boundary keeps them a "x2" box.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

Ref = Union[int, str]  # an op's position in the sequence, or the name of an input outside it
_NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class Repeat:
    """``count`` copies of ops ``[start, start + period)``, back to back, in the op sequence."""

    start: int
    period: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.period * self.count


def find_repeats(kinds: Sequence[str], inputs: Sequence[Sequence[Ref]], modules: Optional[Sequence] = None,
                 min_period: int = 3) -> List[Repeat]:
    """The repeated blocks of an op sequence, in order; ``inputs[i]`` lists op ``i``'s inputs (Ref)."""
    ids = _kind_ids(kinds)
    found: List[Repeat] = []
    pending = [(0, len(kinds))]
    while pending:
        lo, hi = pending.pop()
        best = _best_repeat(ids, inputs, lo, hi, min_period, modules)
        if best is not None:
            found.append(best)
            pending += [(lo, best.start), (best.stop, hi)]
    return sorted(found, key=lambda r: r.start)


def _kind_ids(kinds: Sequence[str]) -> np.ndarray:
    table: dict = {}
    return np.array([table.setdefault(k, len(table)) for k in kinds], dtype=np.int64)


def _best_repeat(ids: np.ndarray, inputs, lo: int, hi: int, min_period: int, modules) -> Optional[Repeat]:
    found = _best_period(ids, inputs, lo, hi, min_period)
    if found is None:
        return None
    _, period, counts = found
    most = int(counts.max())
    starts = (np.flatnonzero(counts == most) + lo).tolist()

    def rank(start: int):
        stop = start + period * most
        neighbours = _coverage(ids, inputs, lo, start, min_period) + _coverage(ids, inputs, stop, hi, min_period)
        return _boundary_depth(modules, start) if modules else 0, -neighbours, start

    return Repeat(min(starts, key=rank) if len(starts) > 1 else starts[0], period, most)


def _best_period(ids: np.ndarray, inputs, lo: int, hi: int, min_period: int):
    """``(coverage, period, copy counts per start)`` of the period whose repeat covers most ops, or None."""
    best = None
    for period in range(min_period, (hi - lo) // 2 + 1):
        counts = _copy_counts(ids, inputs, lo, hi, period)
        if counts is not None and counts.max() >= 2 and (best is None or counts.max() * period > best[0]):
            best = (int(counts.max()) * period, period, counts)
    return best


def _coverage(ids: np.ndarray, inputs, lo: int, hi: int, min_period: int) -> int:
    found = _best_period(ids, inputs, lo, hi, min_period)
    return 0 if found is None else found[0]


def _copy_counts(ids: np.ndarray, inputs, lo: int, hi: int, period: int) -> Optional[np.ndarray]:
    """For each window start s in [lo, hi - period]: how many back-to-back copies start there (1: none)."""
    same = ids[lo:hi - period] == ids[lo + period:hi]  # op lo + k against op lo + k + period
    filled = np.concatenate(([0], np.cumsum(same)))
    if not (filled[period:] - filled[:-period] == period).any():  # no window of ops all of the same kinds
        return None
    threshold = np.full(len(same), _NEVER, dtype=np.int64)
    for k in np.flatnonzero(same).tolist():
        threshold[k] = _threshold(inputs[lo + k], inputs[lo + k + period], period)
    starts = np.arange(lo, hi - 2 * period + 1)
    latest = np.lib.stride_tricks.sliding_window_view(threshold, period).max(axis=1)
    is_copy = latest < starts  # window [s, s + period) is a copy of the next one
    counts = np.ones(hi - period - lo + 1, dtype=np.int64)
    for k in range(len(is_copy) - 1, -1, -1):
        if is_copy[k]:
            counts[k] = counts[k + period] + 1
    return counts


def _threshold(first: Sequence[Ref], later: Sequence[Ref], period: int) -> int:
    """The largest window start that op pair (i, i + period) rules out (its inputs compared as in the docstring)."""
    if len(first) != len(later):
        return _NEVER
    bound = -1
    for a, b in zip(first, later):
        a_int, b_int = isinstance(a, int), isinstance(b, int)
        if a_int and b_int and b == a + period:
            continue  # the same edge one copy later: fine wherever the window starts
        if not (a_int or b_int) and a != b:
            return _NEVER  # two different graph inputs
        if a_int:
            bound = max(bound, a)  # a must lie before the window
        if b_int:
            bound = max(bound, b - period)  # b must lie before the next window
    return bound


def _boundary_depth(modules, index: int) -> int:
    """How many leading module-path parts op ``index`` shares with the op before it (0: a top-level boundary)."""
    if index == 0 or not modules[index] or not modules[index - 1]:
        return 1 << 20
    here, before = modules[index].split("."), modules[index - 1].split(".")
    depth = 0
    while depth < min(len(here), len(before)) and here[depth] == before[depth]:
        depth += 1
    return depth
