"""fxopt.ir.memory: dropped graphs' weights wait for the cyclic collector until enough of them add up."""
import gc
import weakref

import pytest
import torch

from fxopt.ir import memory


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
