"""fxopt.passes.infra.batches: calibration data iterated again and again, a one-shot iterator spilled to disk."""
from __future__ import annotations

import os

import pytest
import torch

from fxopt.passes.infra.batches import Batches, as_batches, as_input_tuple, streamed


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, generator=gen), torch.randint(0, 9, (2, 5), generator=gen),
            torch.rand(6, generator=gen) > 0.5, torch.randn(2, 3, generator=gen).to(torch.bfloat16)]


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            if isinstance(y, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y)
            else:
                assert x == y


def test_a_generator_is_spilled_once_and_read_back_exactly_on_every_pass():
    source = _tensors()
    shared = torch.arange(12.0)
    expected = [(source[0], source[1]), (source[2],), (source[3], 7, None), (shared[:6], shared[6:].view(2, 3))]
    pulled = []

    def generate():
        for batch in [(source[0], source[1]), source[2], [source[3], 7, None], (shared[:6], shared[6:].view(2, 3))]:
            pulled.append(1)
            yield batch

    batches = Batches(generate())
    assert len(pulled) == 4  # the generator is read once, up front
    for _ in range(2):
        _assert_same_batches(list(batches), expected)
    assert len(batches) == 4 and len(pulled) == 4
    _assert_same_batches(list(batches.take(1, 3)), expected[1:3])
    directory = batches._source.directory
    assert sorted(os.listdir(directory)) == [f"{i}.safetensors" for i in range(4)]
    batches.close()
    assert not os.path.exists(directory)


def test_a_re_iterable_is_iterated_afresh_not_copied():
    class Source:
        def __init__(self, items):
            self.items, self.iterations = items, 0

        def __iter__(self):
            self.iterations += 1
            return iter(self.items)

    items = [(t,) for t in _tensors()]
    source = Source(items)
    batches = Batches(source)
    assert source.iterations == 0
    for round_ in (1, 2):
        got = list(batches)
        assert source.iterations == round_
        assert all(a[0] is b[0] for a, b in zip(got, items))  # the very same tensors: nothing copied
    with pytest.raises(TypeError, match="not known without iterating"):
        len(batches)  # the source has no __len__
    assert batches.count() == 4 and source.iterations == 3  # counted by iterating once more
    assert [b[0] is items[2][0] for b in batches.take(2, 3)] == [True]


def test_views_lengths_and_emptiness():
    data = [(torch.tensor([i]),) for i in range(8)]
    batches = as_batches(data)
    assert as_batches(batches) is batches
    assert len(batches) == 8 and len(batches.take(6, 8)) == 2 and len(batches.take(6, 20)) == 2
    assert [int(b[0]) for b in batches.take(2, 6).take(1, 3)] == [3, 4]
    assert not batches.is_empty()
    assert Batches([]).is_empty() and Batches(iter([])).is_empty()
    assert as_input_tuple(data[0][0]) == (data[0][0],) and as_input_tuple([1, 2]) == (1, 2)


def test_streamed_closes_only_what_it_made():
    with streamed(iter([(torch.ones(2),)])) as made:
        directory = made._source.directory
        assert os.path.isdir(directory)
    assert not os.path.exists(directory)
    given = Batches(iter([(torch.ones(2),)]))
    with streamed(given) as same:
        assert same is given
    assert os.path.isdir(given._source.directory)  # the caller's Batches stays usable
    given.close()


def test_a_spill_is_deleted_when_garbage_collected():
    batches = Batches(iter([(torch.ones(2),)]))
    directory = batches._source.directory
    del batches
    assert not os.path.exists(directory)


def test_a_failing_generator_leaves_no_spill_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)

    def broken():
        yield (torch.ones(2),)
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        Batches(broken())
    assert not any(p.name.startswith("fxopt-batches-") for p in tmp_path.iterdir())
