"""fxopt.passes.infra.memory: dropped graphs' weights wait for the cyclic collector until enough of them add up."""
import gc
import threading
import weakref

import pytest
import torch

from fxopt.passes.infra import memory


class Cycle:
    """A tensor that only a reference cycle holds, as a dropped graph holds its weights."""

    def __init__(self):
        self.tensor, self.itself = torch.zeros(4), self


@pytest.fixture
def no_automatic_collection():
    memory.release_dropped_graphs()  # collects and starts the count afresh
    gc.disable()
    yield
    gc.enable()


def dropped_cycle() -> weakref.ref:
    return weakref.ref(Cycle())


def test_dropped_graphs_are_collected_once_their_weights_add_up_to_the_step(no_automatic_collection):
    half = memory.COLLECT_STEP_BYTES // 2
    first = dropped_cycle()
    memory.release_dropped_graphs(half)
    assert first() is not None  # below the step: left to the collector
    second = dropped_cycle()
    memory.release_dropped_graphs(half)
    assert first() is None and second() is None


def test_without_a_size_the_collection_is_now(no_automatic_collection):
    memory.release_dropped_graphs(memory.COLLECT_STEP_BYTES - 1)
    dropped = dropped_cycle()
    memory.release_dropped_graphs()
    assert dropped() is None


def trim_threads() -> int:
    return sum(thread.name == memory.TRIM_THREAD_NAME for thread in threading.enumerate())


def test_no_trimming_thread_runs_while_latency_is_measured():
    from fxopt.report.timing import compare_latency

    seen = []
    with memory.trimming_while_resident_grows():
        assert trim_threads() == 1
        compare_latency({"a": lambda: seen.append(trim_threads())}, (), repeats=3, warmup=1)
        assert trim_threads() == 1  # started again after the measurement
    assert seen == [0] * 4 and trim_threads() == 0


def test_optimize_times_its_result_with_no_background_thread(monkeypatch):
    """optimize() trims in a background thread while it works, and stops it while it times the result."""
    import fxopt
    from fxopt import api
    from fxopt.report import timing

    seen = []

    def watched(candidates, *args, **kwargs):
        def watch(fn):
            return lambda *xs: (seen.append(trim_threads()), fn(*xs))[1]
        seen.append(("before", trim_threads()))
        return timing.compare_latency({name: watch(fn) for name, fn in candidates.items()}, *args, **kwargs)

    monkeypatch.setattr(api, "compare_latency", watched)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    optimized = fxopt.optimize(model, (torch.randn(4, 16),), target="eager", progress=False)
    assert optimized.report()["latency_ms"] > 0
    if memory._libc_malloc_trim() is not None and memory.resident_bytes():  # glibc and procfs: the thread exists
        assert seen[0] == ("before", 1)
    assert len(seen) > 2 and all(count == 0 for count in seen[1:])
