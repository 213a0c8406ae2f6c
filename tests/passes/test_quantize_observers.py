"""Observers and fxopt.calibrate: ranges, the scale/2 error bound, streaming, errors."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import fxopt
from fxopt.ir import meta as M
from fxopt.passes.quantize import OBSERVERS, QDTYPES, fake_quantize, make_observer
from tests.harness import examples

QD = torch.ops.quantized_decomposed
COMBOS = [(q, s) for q in QDTYPES for s in ("symmetric", "asymmetric") if (q, s) != ("uint8", "symmetric")]


def qdq(x, q):
    """Quantize-dequantize with torch's quantized_decomposed ops (what insert-qdq emits)."""
    info = QDTYPES[q.qdtype]
    if q.axis is None:
        codes = QD.quantize_per_tensor(x, float(q.scale), int(q.zero_point), info.qmin, info.qmax, info.storage)
        return QD.dequantize_per_tensor(codes, float(q.scale), int(q.zero_point), info.qmin, info.qmax,
                                        info.storage), codes
    codes = QD.quantize_per_channel(x, q.scale, q.zero_point, q.axis, info.qmin, info.qmax, info.storage)
    return QD.dequantize_per_channel(codes, q.scale, q.zero_point, q.axis, info.qmin, info.qmax,
                                     info.storage), codes


def broadcast(t, x, axis):
    if axis is None:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.view(shape)


# ------------------------------------------------------------ identity range
@examples(25)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 2**16),
       qdtype=st.sampled_from(["int8", "uint8", "int4"]), per_channel=st.booleans())
def test_identity_range_qdq_is_bit_exact_on_integers(shape, seed, qdtype, per_channel):
    info = QDTYPES[qdtype]
    torch.manual_seed(seed)
    x = torch.randint(info.qmin, info.qmax + 1, shape).float()
    axis = len(shape) - 1 if per_channel else None
    n = shape[axis] if per_channel else 1
    scale, zero = torch.ones(n), torch.zeros(n, dtype=torch.int64)  # uint8's 0..255 hold x as is
    if axis is None:
        scale, zero = scale[0], zero[0]
    q = fxopt.QParams(scale, zero, qdtype, "asymmetric", axis)
    out, codes = qdq(x, q)
    assert torch.equal(out, x)
    assert torch.equal(fake_quantize(x, q), x)
    assert codes.dtype == info.storage


# ----------------------------------------------------------- the scale/2 bound
@examples(25)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(sorted(OBSERVERS)), combo=st.sampled_from(COMBOS),
       per_channel=st.booleans(), batches=st.integers(1, 3), spread=st.floats(0.01, 100.0))
def test_observed_range_quantizes_within_half_a_scale(seed, kind, combo, per_channel, batches, spread):
    qdtype, scheme = combo
    torch.manual_seed(seed)
    data = [torch.randn(3, 5, 4) * spread + torch.randn(()) * spread for _ in range(batches)]
    axis = 1 if per_channel else None
    obs = make_observer(kind, qdtype, scheme, axis)
    for x in data:
        obs.observe(x)
    q = obs.qparams()
    assert q.qdtype == qdtype and q.scheme == scheme and q.axis == axis
    assert (q.scale > 0).all() and (q.zero_point >= QDTYPES[qdtype].qmin).all()
    if scheme == "symmetric":
        assert (q.zero_point == 0).all()
    info = QDTYPES[qdtype]
    for x in data:
        out, codes = qdq(x, q)
        half = broadcast(q.scale, x, axis) / 2
        inside = (codes > info.qmin) & (codes < info.qmax)  # not clipped: the error is a rounding error
        err = (out - x).abs()
        assert (err[inside] <= (half * (1 + 1e-4)).expand_as(x)[inside] + 1e-6).all()
        if kind == "minmax":  # min-max clips nothing: every value is within half a scale
            assert (err <= half * (1 + 1e-4) + 1e-6).all()


def test_minmax_per_channel_range_is_the_channel_extremes():
    x = torch.tensor([[-1.0, 2.0, 0.5], [-4.0, 1.0, 3.0]])
    obs = make_observer("minmax", "int8", "symmetric", axis=0)
    obs.observe(x)
    torch.testing.assert_close(obs.qparams().scale, torch.tensor([2.0, 4.0]) / 127)
    asym = make_observer("minmax", "uint8", "asymmetric")
    asym.observe(x)
    q = asym.qparams()
    torch.testing.assert_close(q.scale, torch.tensor(7.0 / 255))
    assert int(q.zero_point) == round(4.0 / (7.0 / 255))


def test_moving_average_follows_recent_batches_slowly():
    obs = make_observer("moving-average-minmax", "int8", "symmetric", averaging_constant=0.5)
    obs.observe(torch.tensor([1.0]))
    obs.observe(torch.tensor([3.0]))
    torch.testing.assert_close(obs.qparams().scale, torch.tensor(2.0 / 127))


def test_percentile_and_mse_clip_outliers_and_mse_lowers_the_error():
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[:4] = torch.tensor([80.0, -60.0, 70.0, -90.0])  # a few huge outliers
    scales, errors = {}, {}
    for kind in ("minmax", "percentile", "mse"):
        options = {"percentile": 99.9} if kind == "percentile" else {}
        obs = make_observer(kind, "int8", "symmetric", **options)
        obs.observe(x)
        q = obs.qparams()
        scales[kind] = float(q.scale)
        errors[kind] = (fake_quantize(x, q) - x).pow(2).mean().item()
    assert scales["percentile"] < scales["minmax"] / 5
    assert scales["mse"] < scales["minmax"]
    assert errors["mse"] < errors["minmax"]


# --------------------------------------------------------------------- errors
def test_unsupported_qdtype_scheme_combinations_raise():
    with pytest.raises(fxopt.PassError, match="qdtype 'uint8' with scheme 'symmetric' is not supported.*asymmetric"):
        make_observer("minmax", "uint8", "symmetric")
    with pytest.raises(fxopt.PassError, match="unknown qdtype 'int3'; valid qdtypes: int8, uint8, int4"):
        make_observer("minmax", "int3")
    with pytest.raises(fxopt.PassError, match="unknown scheme 'affine'"):
        make_observer("mse", "int8", "affine")
    with pytest.raises(fxopt.PassError, match="unknown observer 'kl'.*minmax"):
        make_observer("kl")
    with pytest.raises(fxopt.PassError, match="saw no data"):
        make_observer("minmax").qparams()


# ------------------------------------------------------------------ calibrate
class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h), h @ h.transpose(0, 1)


def test_calibrate_streams_a_generator_and_leaves_the_input_graph_alone():
    torch.manual_seed(0)
    graph = fxopt.capture(TwoLinears(), (torch.randn(2, 4),))
    batches = ((torch.randn(2, 4) * (i + 1),) for i in range(5))  # no len(): streamed
    calibrated = fxopt.calibrate(graph, batches, observer="minmax", progress=False)
    observed = {n.name for n in calibrated.fx_graph.nodes if M.QPARAMS_KEY in n.meta}
    # x feeds linear a; relu feeds linear b and the matmul's left side (observed once); the transpose its right
    assert observed == {"x", "relu", "transpose"}
    assert not any(M.QPARAMS_KEY in n.meta for n in graph.fx_graph.nodes)
    q = M.qparams(calibrated.node("relu"))
    assert q.axis is None and q.scheme == "asymmetric" and int(q.zero_point) == -128  # relu >= 0


def test_calibrate_errors():
    graph = fxopt.capture(TwoLinears(), (torch.randn(2, 4),))
    with pytest.raises(fxopt.PassError, match="calibrate: the data iterable gave no batches"):
        fxopt.calibrate(graph, [], progress=False)
    with pytest.raises(fxopt.InputError):
        fxopt.calibrate(graph, [(torch.randn(3, 5),)], progress=False)
    relu_only = fxopt.capture(nn.ReLU(), (torch.randn(2, 4),))
    with pytest.raises(fxopt.PassError, match="nothing to calibrate"):
        fxopt.calibrate(relu_only, [(torch.randn(2, 4),)], progress=False)
