"""Calibration streams its batches (issue 11): a one-shot generator's batches are never all alive at once,
a re-iterable is iterated again for each pass rather than copied, and both give what a list gives."""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

import fxopt
from fxopt.targets.x86_quantize import quantize_for_x86
from fxopt.passes.quantize.calibrate import calibrate

BATCHES = 16
#: Batches kept on the graphs: none, since calibration data is handed to the passes that read it (issue 21).
KEPT_ON_GRAPHS = 0


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 8)).eval()


def batch(index: int) -> tuple:
    return (torch.randn(4, 16, generator=torch.Generator().manual_seed(index)) * (1 + index % 3),)


class Liveness:
    """Counts the batches this test made that are still alive, and the most alive at once."""

    def __init__(self):
        self.alive = self.most = 0

    def track(self, value: tuple) -> tuple:
        self.alive += 1
        self.most = max(self.most, self.alive)
        weakref.finalize(value[0], self._dropped)
        return value

    def _dropped(self):
        self.alive -= 1


class FreshBatches:
    """A re-iterable (like a DataLoader): every iteration makes new tensors, equal to the last iteration's."""

    def __init__(self, liveness: Liveness):
        self.liveness, self.iterations = liveness, 0

    def __iter__(self):
        self.iterations += 1
        return (self.liveness.track(batch(i)) for i in range(BATCHES))


def quantized_outputs(data):
    graph = fxopt.Pipeline("fuse")(fxopt.capture(mlp(), batch(0))).graph
    quantized, spec = quantize_for_x86(graph, batch(0), data, progress=False)
    return quantized.run(*batch(99)), spec


def test_a_generator_is_streamed_and_quantizes_as_the_same_batches_in_a_list_do():
    liveness = Liveness()
    expected, expected_spec = quantized_outputs([batch(i) for i in range(BATCHES)])
    got, spec = quantized_outputs(liveness.track(batch(i)) for i in range(BATCHES))
    assert spec == expected_spec
    assert torch.equal(got, expected)
    assert liveness.most <= 2  # the one being spilled to disk, and the generator's next
    assert liveness.alive == 0


def test_a_re_iterable_is_iterated_once_per_pass_and_never_held_whole():
    liveness = Liveness()
    source = FreshBatches(liveness)
    expected, _ = quantized_outputs([batch(i) for i in range(BATCHES)])
    got, _ = quantized_outputs(source)
    assert torch.equal(got, expected)
    assert source.iterations >= 2  # calibrate, smooth-quant's second calibrate (and, without VNNI, the ranking)
    assert liveness.most <= KEPT_ON_GRAPHS + 2 < BATCHES


def test_calibrate_reads_a_generator_batch_by_batch():
    liveness = Liveness()
    graph = fxopt.capture(mlp(), batch(0))
    calibrate(graph, (liveness.track(batch(i)) for i in range(BATCHES)), progress=False)
    assert liveness.most <= 2


def test_the_search_splits_a_generator_into_fit_and_held_out_batches():
    data = (batch(i) for i in range(4))
    optimized = fxopt.optimize(mlp(), batch(0), target="eager", calibration_data=data,
                               tolerance={"cosine": 0.9}, progress=False)
    assert optimized.report()["fidelity_batches"] == {"fit": 3, "held_out": 1}
