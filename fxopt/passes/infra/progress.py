"""One progress bar for every long loop (calibration, sensitivity, search, training): tqdm, off unless asked.

    for batch in progress_bar(batches, "calibrate", "batch", enabled=progress):
        ...

The bar goes to stderr and is cleared when done (``leave=False``); ``total`` defaults
to ``len(items)`` where tqdm can tell. ``items=None`` with ``total`` gives a bar to
``update()`` by hand.
"""
from __future__ import annotations

from typing import Iterable, Optional


def progress_bar(items: Optional[Iterable], desc: str, unit: str, enabled: bool, total: Optional[int] = None):
    """A tqdm bar over ``items`` labelled ``desc``, counting ``unit``s; disabled (silent) unless ``enabled``."""
    from tqdm.auto import tqdm  # imported on use: fxopt imports fast without touching tqdm's notebook detection

    return tqdm(items, desc=desc, unit=unit, total=total, disable=not enabled, leave=False)
