"""Calibration data is an explicit object handed to the passes that read it (issue 21), never graph metadata:
no node's meta and nothing a returned graph references holds a batch; a pass that needs data and has none
raises a PassError naming the pass, the option and ``calibration=``; ``Pipeline(spec, calibration=...)`` hands
it to the passes that take it, and a spec cannot carry it."""
import dataclasses
import gc
import weakref

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

import fxopt
from fxopt.passes.infra.batches import Batches
from fxopt.passes.lowrank import LowRank
from fxopt.passes.prune.prune_channels import PruneChannels
from fxopt.passes.quantize.insert_qdq import InsertQDQ
from fxopt.passes.quantize.mixed_precision import MixedPrecision

#: Every pass that reads calibration data, with options that make it read them, and what the error names.
NEEDS_DATA = [
    (InsertQDQ(scheme="weight-only", bits=8, method="gptq"), "method=gptq"),
    (LowRank(rank=2, activation_aware=True), "activation-aware=true"),
    (MixedPrecision(tolerance=0.05), "its sensitivity search"),
    (PruneChannels(ratio=0.5, criterion="taylor"), "criterion=taylor"),
]
#: The passes that read calibration data but need no calibrated graph, in one pipeline; mixed precision (static
#: int8) runs on the calibrated graph.
SPEC = ("prune-ffn{ratio=0.5,criterion=taylor},low-rank{rank=4,activation-aware=true,statistic=covariance},"
        "insert-qdq{scheme=weight-only,method=gptq}")
MIXED = "mixed-precision{tolerance=0.05}"


def tensors_in_meta(graph: fxopt.Graph):
    """The real (not fake, not meta) tensors anywhere in the graph's node metadata, nested containers included."""
    found, stack = [], [n.meta for n in graph.nodes]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend(getattr(value, f.name) for f in dataclasses.fields(value))
        elif isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) and value.device.type != "meta":
            found.append(value)
    return found


def holds_any(graph: fxopt.Graph, batches) -> bool:
    """True when some node's meta holds one of the batches' tensors, or an equal copy of one."""
    inputs = [x for batch in batches for x in batch]
    return any(t is x or (t.shape == x.shape and t.dtype == x.dtype and torch.equal(t, x))
               for t in tensors_in_meta(graph) for x in inputs)


class FFN(nn.Module):
    def __init__(self, width=16, inner=64):
        super().__init__()
        self.up, self.down = nn.Linear(width, inner), nn.Linear(inner, width)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def block():
    torch.manual_seed(0)
    return FFN().eval()


def data(count=3):
    return [(torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(i)),) for i in range(count)]


# ------------------------------------------------------------- never kept
def test_no_node_meta_of_a_calibrated_or_quantized_graph_holds_calibration_data():
    batches = data()
    graph = fxopt.capture(block(), batches[0])
    calibrated = fxopt.calibrate(graph, batches, progress=False)
    mixed = fxopt.Pipeline(MIXED, calibration=batches, debug=True)(calibrated)
    compressed = fxopt.Pipeline(SPEC, calibration=batches, debug=True)(graph)
    assert mixed.modified and all(step.modified for step in compressed.results)
    for kept in (calibrated, mixed.graph, compressed.graph, compressed.graph.copy()):
        assert not holds_any(kept, batches)


def test_the_meta_check_sees_a_batch_stashed_in_meta():
    """The check above would fail if a batch were kept the way calibrate kept one before issue 21."""
    batches = data()
    calibrated = fxopt.calibrate(fxopt.capture(block(), batches[0]), batches, progress=False)
    calibrated.placeholders[0].meta["a_stashed_sample"] = (tuple(batches[:1]),)
    assert holds_any(calibrated, batches)
    calibrated.placeholders[0].meta["a_stashed_sample"] = (tuple(x.clone() for x in batches[0]),)
    assert holds_any(calibrated, batches)


def test_no_returned_graph_keeps_a_batch_alive():
    batches = data()
    alive = [weakref.ref(x) for batch in batches for x in batch]
    graph = fxopt.capture(block(), tuple(x.clone() for x in batches[0]))
    calibrated = fxopt.calibrate(graph, batches, progress=False)
    mixed = fxopt.Pipeline(MIXED, calibration=batches)(calibrated).graph
    compressed = fxopt.Pipeline(SPEC, calibration=batches)(graph).graph
    del batches
    gc.collect()
    assert [ref() is None for ref in alive] == [True] * len(alive)
    assert all(len(g) > 0 for g in (calibrated, mixed, compressed))  # the graphs are still alive


# ---------------------------------------------------------- missing data
@pytest.mark.parametrize("pass_, needed_by", NEEDS_DATA, ids=lambda p: getattr(p, "name", ""))
def test_a_pass_that_needs_data_and_has_none_says_what_to_pass(pass_, needed_by):
    batches = data()
    graph = fxopt.calibrate(fxopt.capture(block(), batches[0]), batches, progress=False)
    message = (rf"{pass_.name}: (node %\w+ \([\w.]+\): )?{needed_by} needs calibration data and none was given; "
               rf"pass it as {type(pass_).__name__}\(\.\.\., calibration=batches\) or "
               rf"Pipeline\(spec, calibration=batches\)")
    with pytest.raises(fxopt.PassError, match=message):
        pass_(graph)
    assert pass_.with_calibration(batches)(graph).modified  # with the data it runs


@pytest.mark.parametrize("pass_, needed_by", NEEDS_DATA, ids=lambda p: getattr(p, "name", ""))
def test_an_empty_calibration_is_refused_too(pass_, needed_by):
    graph = fxopt.capture(block(), data()[0])
    with pytest.raises(fxopt.PassError, match=rf"{needed_by} needs calibration data and the calibration given has "
                                              r"no batches; pass at least one input tuple"):
        pass_.with_calibration([])(fxopt.calibrate(graph, data(), progress=False))


# ------------------------------------------------------------ the pipeline
def test_the_pipeline_hands_data_only_to_passes_that_take_it_and_keeps_a_pass_s_own():
    batches, own = data(), data(1)
    pipeline = fxopt.Pipeline(["fold-constants", LowRank(rank=2, activation_aware=True, calibration=own),
                               "mixed-precision"], calibration=batches)
    fold, low_rank, mixed = pipeline.passes
    assert not fold.takes_calibration() and not hasattr(fold, "calibration")
    assert list(low_rank.calibration) == own  # given its own: kept
    assert isinstance(mixed.calibration, Batches) and list(mixed.calibration) == batches


def test_calibration_is_not_an_option_of_the_spec():
    spec = "low-rank{rank=2,activation-aware=true}"
    pipeline = fxopt.Pipeline(spec, calibration=data())
    assert pipeline.spec == spec and "calibration" not in pipeline.passes[0].options()
    assert pipeline.passes == fxopt.Pipeline(spec).passes  # the data is not part of a pass's identity
    with pytest.raises(fxopt.PassError, match=r"low-rank: calibration data cannot be written in a spec; pass it as "
                                              r"Pipeline\(spec, calibration=batches\)"):
        fxopt.Pipeline("low-rank{rank=2,calibration=x}")


def test_a_generator_given_to_the_pipeline_is_spilled_once_for_every_pass():
    batches = data()
    pipeline = fxopt.Pipeline("low-rank{rank=2,activation-aware=true},prune-ffn{ratio=0.5,criterion=taylor}",
                              calibration=(b for b in batches))
    low_rank, prune = pipeline.passes
    assert low_rank.calibration is prune.calibration
    assert [torch.equal(a[0], b[0]) for a, b in zip(prune.calibration, batches)] == [True] * len(batches)
    graph = fxopt.capture(block(), batches[0])
    on_list = fxopt.Pipeline(pipeline.spec, calibration=batches)(graph).graph
    assert torch.equal(pipeline(graph).graph(*batches[0]), on_list(*batches[0]))
