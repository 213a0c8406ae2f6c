"""Latency measured, not counted: medians of interleaved runs, reported as ratios to a baseline.

Interleaving (A, B, A, B, ...) keeps a noisy shared machine from favouring
whichever candidate ran during a quiet moment.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch

from fxopt.passes.infra.memory import no_background_threads
from fxopt.passes.infra.progress import progress_bar


def compare_latency(candidates: Dict[str, Callable], inputs: Sequence, repeats: int = 10,
                    warmup: int = 2, progress: bool = False) -> Dict[str, float]:
    """Median seconds per call for each candidate, measured interleaved in one process (``progress``: a bar of
    the rounds, each timing every candidate once). fxopt's background threads are stopped meanwhile. Where a
    candidate ran on a GPU (CUDA initialized by the warm-up), each call is timed from an idle device to the end
    of its work (``torch.cuda.synchronize`` before and after), not to the return of its asynchronous launch."""
    samples: Dict[str, List[float]] = {name: [] for name in candidates}
    with torch.inference_mode(), no_background_threads():
        for _ in range(warmup):
            for fn in candidates.values():
                fn(*inputs)
        sync = _device_sync()
        for _ in progress_bar(range(repeats), "latency", "round", progress):
            for name, fn in candidates.items():
                sync()
                start = time.perf_counter()
                fn(*inputs)
                sync()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def _device_sync() -> Callable[[], None]:
    """``torch.cuda.synchronize`` once CUDA is in use in this process, else nothing."""
    return torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else _nothing


def _nothing() -> None:
    pass


def format_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain-text table with right-aligned numeric columns."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))  # noqa: E731
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
