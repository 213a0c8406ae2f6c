"""Give memory that PyTorch freed back to the operating system (glibc), so resident memory follows live tensors.

Loops that allocate and free many large temporaries (comparing every layer's output, calibrating batch
after batch) leave glibc's heap fragmented: its mmap threshold rises after the first large free, later
tensors come from the heap, and the freed holes between live blocks stay resident. On BERT-base,
``per_layer_error`` at 8x128 kept 1.6 GB resident this way with under 130 MB of live tensors
(``benchmarks/optimize_memory.py``). ``malloc_trim(0)`` returns every free page; it takes about a
millisecond and is a no-op where the C library is not glibc.

A dropped ``Graph`` is not freed when its last reference goes: an fx graph is a web of reference cycles
(nodes and their graph, the module and its graph), so its weights wait for Python's cyclic collector,
which may not run for a long time. ``release_dropped_graphs(dropped_bytes)`` runs it, then ``malloc_trim``:
call it where a step has dropped a graph, with the bytes of the weights it held of its own (the smoothed
weights, a fully quantized copy). A full collection walks every object of the process, however little it
frees (0.2 s on BERT-base, about a second late in the test suite), so it runs once the graphs dropped since
the last one add up to :data:`COLLECT_STEP_BYTES`; a few small graphs wait for the collector's own schedule.

Where the holes come from is not always a loop fxopt owns: a persistent small tensor allocated mid-run
(an observer's range, a quantized weight's codes) is carved out of a freed activation's chunk, so the
next activation of that size extends the heap instead, and Inductor's compile in the x86 backend does
the same. ``trimming_while_resident_grows()`` covers all of them: while its block runs, a background
thread reads the resident set every few milliseconds and trims once it has grown by
:data:`TRIM_STEP_BYTES` since the last trim. ``fxopt.optimize`` runs inside it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import os
import threading
from typing import List, Optional

#: Growth of the resident set, since the last trim, that makes :func:`trimming_while_resident_grows` trim.
TRIM_STEP_BYTES = 32 * 2**20
#: How often that thread reads the resident set (about 10 us per read).
TRIM_POLL_SECONDS = 0.002
#: The trimming thread's name, as ``threading.enumerate()`` shows it.
TRIM_THREAD_NAME = "fxopt-trim"
#: Weights of dropped graphs that :func:`release_dropped_graphs` lets wait for the cyclic collector.
COLLECT_STEP_BYTES = 32 * 2**20

_uncollected_bytes = 0


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """``malloc_trim(0)`` where glibc has it; nothing elsewhere."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def release_dropped_graphs(dropped_bytes: Optional[int] = None) -> None:
    """Collect unreachable graphs (reference cycles) and their tensors, then :func:`return_freed_memory`.

    With ``dropped_bytes`` (the weights of its own that the dropped graph held), collect only once the graphs
    dropped since the last collection held :data:`COLLECT_STEP_BYTES`; without it, collect now.
    """
    global _uncollected_bytes
    _uncollected_bytes += dropped_bytes or 0
    if dropped_bytes is None or _uncollected_bytes >= COLLECT_STEP_BYTES:
        gc.collect()
        _uncollected_bytes = 0
    return_freed_memory()


def resident_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``); 0 where there is no procfs."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Trimmer:
    """The background thread of :func:`trimming_while_resident_grows`; it can be stopped and started again."""

    def __init__(self, step: int, poll: float):
        self.step, self.poll = step, poll
        self.done: Optional[threading.Event] = None
        self.thread: Optional[threading.Thread] = None

    @property
    def running(self) -> bool:
        return self.thread is not None

    def start(self) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=_trim_on_growth, args=(self.done, self.step, self.poll),
                                       name=TRIM_THREAD_NAME, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()
        self.thread = None


_trimmers: List[_Trimmer] = []


@contextlib.contextmanager
def trimming_while_resident_grows(step: int = TRIM_STEP_BYTES, poll: float = TRIM_POLL_SECONDS):
    """Within the block, ``malloc_trim`` whenever the resident set has grown by ``step`` bytes since the last
    trim (a daemon thread; nothing where there is no glibc or no procfs). :func:`no_background_threads` stops
    it for a while."""
    if _libc_malloc_trim() is None or not resident_bytes():
        yield
        return
    trimmer = _Trimmer(step, poll)
    trimmer.start()
    _trimmers.append(trimmer)
    try:
        yield
    finally:
        _trimmers.remove(trimmer)
        if trimmer.running:
            trimmer.stop()


@contextlib.contextmanager
def no_background_threads():
    """Within the block, no trimming thread runs (latency measurements: on 2 cores its polling would share
    them with the timed code); those that ran before start again after it."""
    paused = [trimmer for trimmer in _trimmers if trimmer.running]
    for trimmer in paused:
        trimmer.stop()
    try:
        yield
    finally:
        for trimmer in paused:
            trimmer.start()


def _trim_on_growth(done: threading.Event, step: int, poll: float) -> None:
    low = resident_bytes()
    while not done.wait(poll):
        now = resident_bytes()
        if now > low + step:
            return_freed_memory()
            low = resident_bytes()
        else:
            low = min(low, now)
