"""Calibration batches that passes can iterate again and again without holding them all in memory.

    with streamed(calibration_data) as batches:   # a list, a DataLoader, or a one-shot generator
        calibrate(graph, batches)                   # each pass iterates the data afresh
        calibrate(smoothed, batches)

- A re-iterable source (a list, a ``DataLoader``, anything whose ``iter()`` starts over) is iterated
  afresh for each pass and never copied: it must give the same batches, in the same order, every time
  (a ``DataLoader`` without ``shuffle``).
- A one-shot iterator (a generator: ``iter(x) is x``) is spilled once, a batch at a time, to a
  temporary directory of safetensors files, and every pass streams them back; the directory is deleted
  by ``close()`` (or ``with``, or when the object is garbage-collected).

Each batch comes out as a tuple of inputs (a lone tensor counts as a 1-tuple). ``take(start, stop)``
is a view of some of the batches (no copy).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any, Iterable, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree


def as_input_tuple(batch: Any) -> tuple:
    """A batch as the tuple of positional inputs it stands for (a lone tensor is a 1-tuple)."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def is_one_shot(data: Iterable) -> bool:
    """True for iterators and generators: iterating them again gives nothing."""
    return isinstance(data, Iterator)


class Batches:
    """Input tuples from ``data``, iterable any number of times; see the module docstring."""

    def __init__(self, data: Iterable, start: int = 0, stop: Optional[int] = None):
        self._source = _SpilledBatches(data) if is_one_shot(data) else data
        self._start, self._stop = start, stop

    def __iter__(self):
        if isinstance(self._source, _SpilledBatches):
            return self._source.read(self._start, self._stop)  # reads only the files in range
        batches = iter(self._source)
        if self._start or self._stop is not None:
            batches = itertools.islice(batches, self._start, self._stop)
        return map(as_input_tuple, batches)

    def __len__(self) -> int:
        """The number of batches where the source knows it (a list, a DataLoader, a spill); else TypeError
        (so ``list(batches)`` does not iterate twice): :meth:`count` iterates for it."""
        if not hasattr(self._source, "__len__"):
            raise TypeError(f"the length of {type(self._source).__name__} is not known without iterating it")
        return self._clip(len(self._source))

    def count(self) -> int:
        """The number of batches, iterating the source once to count them where it has no length."""
        try:
            return len(self)
        except TypeError:
            return self._clip(sum(1 for _ in self._source))

    def _clip(self, total: int) -> int:
        stop = total if self._stop is None else min(self._stop, total)
        return max(stop - self._start, 0)

    def is_empty(self) -> bool:
        return next(iter(self), None) is None

    def take(self, start: int, stop: int) -> "Batches":
        """The batches ``start`` to ``stop`` (like ``batches[start:stop]``, non-negative bounds), as a view."""
        view = Batches.__new__(Batches)
        view._source, view._start = self._source, self._start + start
        view._stop = self._start + stop if self._stop is None else min(self._start + stop, self._stop)
        return view

    def close(self) -> None:
        """Delete the spilled copy of a one-shot source (nothing to do for a re-iterable one)."""
        if isinstance(self._source, _SpilledBatches):
            self._source.close()

    def __enter__(self) -> "Batches":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_batches(data: Iterable) -> Batches:
    """``data`` itself if it is :class:`Batches` already, else ``Batches(data)``."""
    return data if isinstance(data, Batches) else Batches(data)


@contextlib.contextmanager
def streamed(data: Iterable):
    """``data`` as :class:`Batches` for a ``with`` block; what is made here (a spill) is closed at its end,
    a :class:`Batches` given by the caller is left open."""
    if isinstance(data, Batches):
        yield data
        return
    with Batches(data) as batches:
        yield batches


class _SpilledBatches:
    """A one-shot iterable's batches, written one at a time to safetensors files and read back per pass.

    Tensors go to the files (on the CPU; moved back to their device when read); what is not a tensor
    (an int, None, the tuple's structure) stays in memory.
    """

    def __init__(self, data: Iterable):
        from safetensors.torch import save_file

        self.directory = tempfile.mkdtemp(prefix="fxopt-batches-")
        self._delete = weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.layouts: List[Tuple[Any, list]] = []
        try:
            for index, batch in enumerate(data):
                tensors, layout = _split(as_input_tuple(batch))
                save_file(tensors, self._path(index))
                self.layouts.append(layout)
                del batch, tensors  # one batch alive at a time
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.layouts)

    def __iter__(self):
        return self.read(0, None)

    def read(self, start: int, stop: Optional[int]):
        """The batches ``start`` to ``stop`` (None: to the end), each read back from its file."""
        from safetensors.torch import load_file

        for index in range(start, len(self) if stop is None else min(stop, len(self))):
            spec, leaves = self.layouts[index]
            tensors = load_file(self._path(index))
            values = [tensors[str(i)].to(leaf.device) if isinstance(leaf, _TensorSlot) else leaf
                      for i, leaf in enumerate(leaves)]
            yield pytree.tree_unflatten(values, spec)

    def close(self) -> None:
        self._delete()

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"{index}.safetensors")


class _TensorSlot:
    """Where a batch's tensor was: it is read back from the file, onto ``device``."""

    def __init__(self, device: torch.device):
        self.device = device


def _split(batch: tuple):
    """``({leaf index: tensor}, (tree spec, leaves with tensors replaced by slots))``; tensors made contiguous,
    on the CPU, and each with its own storage (safetensors refuses tensors that share memory)."""
    leaves, spec = pytree.tree_flatten(batch)
    tensors, storages = {}, set()
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensor = leaf.detach().cpu().contiguous()
            if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            tensors[str(i)] = tensor
            leaves[i] = _TensorSlot(leaf.device)
    return tensors, (spec, leaves)
