"""optimize(..., dynamic_shapes=): one result for every size within the ranges, a clear error outside them."""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

import fxopt
from fxopt.errors import InputError
from tests.models import tiny_bert

BATCH, SEQ = Dim("batch", min=1, max=16), Dim("seq", min=4, max=48)
RANGES = ({0: BATCH, 1: SEQ}, {0: BATCH, 1: SEQ})


def batch(rows: int, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding in the first row
    return torch.randint(1, 100, (rows, length), generator=gen), mask


def hidden(out) -> torch.Tensor:
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).detach()


def relative_error(reference, other) -> float:
    return float((reference - other).norm() / reference.norm())


@pytest.fixture(scope="module")
def eager_dynamic():
    model, example = tiny_bert()
    return model, fxopt.optimize(model, example, target="eager", dynamic_shapes=RANGES, progress=False)


@pytest.mark.parametrize("rows, length", [(1, 4), (3, 17), (16, 48)])
def test_eager_result_takes_every_size_in_the_ranges(eager_dynamic, rows, length):
    """The example is 2 x 12; sizes at both ends of the ranges and between them match the model itself."""
    model, optimized = eager_dynamic
    inputs = batch(rows, length, seed=rows * 100 + length)
    expected, got = hidden(model(*inputs)), hidden(optimized(*inputs))
    assert got.shape == (rows, length, 32)
    assert relative_error(expected, got) < 1e-5


@pytest.mark.parametrize("rows, length, dim, label, size", [(2, 49, 1, "seq", 49), (17, 8, 0, "batch", 17),
                                                            (2, 3, 1, "seq", 3)])
def test_a_size_outside_the_range_names_the_dim_its_range_and_the_size(eager_dynamic, rows, length, dim, label,
                                                                      size):
    _, optimized = eager_dynamic
    with pytest.raises(InputError) as caught:
        optimized(*batch(rows, length, seed=0))
    message = str(caught.value)
    low, high = (1, 16) if label == "batch" else (4, 48)
    assert f"dim {dim} ({label}) is {size}" in message and f"{low}..{high}" in message


def test_the_ranges_survive_save_and_load(eager_dynamic, tmp_path):
    model, optimized = eager_dynamic
    loaded = fxopt.load(optimized.save(tmp_path / "dynamic"))
    inputs = batch(5, 30, seed=7)
    assert relative_error(hidden(model(*inputs)), hidden(loaded(*inputs))) < 1e-5
    with pytest.raises(InputError, match=r"dim 1 \(seq\) is 60, outside its range 4\.\.48"):
        loaded(*batch(1, 60, seed=8))


def test_a_static_capture_still_names_the_shape_it_wants():
    model, example = tiny_bert()
    optimized = fxopt.optimize(model, example, target="eager", progress=False)
    with pytest.raises(InputError, match=r"shape \[2, 13\] does not match the captured int64\[2, 12\].*"
                       r"optimize\(..., dynamic_shapes=...\)"):
        optimized(*batch(2, 13, seed=1))


def test_cuda_refuses_dynamic_shapes_before_capturing():
    model, example = tiny_bert()
    with pytest.raises(InputError, match="dynamic_shapes= is not supported yet.*x86-int8"):
        fxopt.optimize(model, example, target="cuda", dynamic_shapes=RANGES, progress=False)


@pytest.mark.slow
def test_x86_int8_calibrates_on_batches_of_other_sizes_and_runs_any_size_in_the_ranges():
    """Calibration batches of three other shapes than the example's; two sizes the calibration never saw stay
    within int8's error of the fp32 model (the static int8 build's error on this model is of the same order)."""
    model, example = tiny_bert()
    calibration = [batch(rows, length, seed=rows + length) for rows, length in [(4, 20), (8, 40), (3, 9)]]
    optimized = fxopt.optimize(model, example, target="x86-int8", dynamic_shapes=RANGES,
                               calibration_data=calibration, progress=False)
    for rows, length in [(1, 6), (6, 33)]:
        inputs = batch(rows, length, seed=rows * 10 + length)
        assert relative_error(hidden(model(*inputs)), hidden(optimized(*inputs))) < 3e-2
