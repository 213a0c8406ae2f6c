"""Observers: watch a tensor's values over calibration batches and choose QParams.

    obs = make_observer("mse", qdtype="int8", scheme="symmetric", axis=0)
    for batch in batches:
        obs.observe(batch)
    q = obs.qparams()        # QParams(scale, zero_point, qdtype, scheme, axis)

Every observer works per tensor (``axis=None``) or per channel (``axis=k``),
symmetric (zero point 0, range ``[-amax, amax]``) or asymmetric (range
``[min, max]`` widened to include 0), for ``int8``, ``uint8``, ``int7`` and ``int4``
(int7 and int4 values are stored in int8 with the ranges [-64, 63] and [-8, 7]). Observers stream:
memory does not grow with the number of batches. ``percentile`` and ``mse``
keep a bounded random sample of the values (``sample_size`` per channel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Type

import torch

from fxopt.errors import PassError
from fxopt.ir.meta import QParams


@dataclass(frozen=True)
class QDtype:
    name: str
    storage: torch.dtype
    qmin: int
    qmax: int


QDTYPES: Dict[str, QDtype] = {
    "int8": QDtype("int8", torch.int8, -128, 127),
    "uint8": QDtype("uint8", torch.uint8, 0, 255),
    "int4": QDtype("int4", torch.int8, -8, 7),
    # 7-bit activation codes: x86 CPUs without VNNI add pairs of u8 x s8 products in a saturating
    # int16, so their int8 kernels need activations in 0..127 (PyTorch's "reduce range").
    "int7": QDtype("int7", torch.int8, -64, 63),
}
SCHEMES = ("symmetric", "asymmetric")
#: Symmetric ranges need a signed type: a zero point of 0 in uint8 would waste half the codes.
_UNSUPPORTED = {("uint8", "symmetric"): "uint8 has no negative codes for a symmetric range; "
                                       "use scheme='asymmetric' with uint8, or qdtype='int8'"}
_EPS = torch.finfo(torch.float32).eps


def qdtype_info(qdtype: str, scheme: str = "symmetric", where: str = "observer") -> QDtype:
    """The storage type and range of ``qdtype``; PassError for unknown names or unsupported combinations."""
    if qdtype not in QDTYPES:
        raise PassError(f"{where}: unknown qdtype {qdtype!r}; valid qdtypes: {', '.join(QDTYPES)}")
    if scheme not in SCHEMES:
        raise PassError(f"{where}: unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    problem = _UNSUPPORTED.get((qdtype, scheme))
    if problem:
        raise PassError(f"{where}: qdtype {qdtype!r} with scheme {scheme!r} is not supported: {problem}")
    return QDTYPES[qdtype]


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, qdtype: str, scheme: str,
                       axis: Optional[int] = None) -> QParams:
    """QParams that map ``[lo, hi]`` (per channel when ``axis`` is set) onto ``qdtype``'s codes.

    Symmetric: ``scale = amax / qmax`` and zero point 0, so every value in
    ``[-amax, amax]`` quantizes without clamping. Asymmetric: the range is
    widened to include 0 (so 0 is exact) and spread over all codes.
    """
    info = qdtype_info(qdtype, scheme)
    lo, hi = lo.detach().float(), hi.detach().float()
    if scheme == "symmetric":
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / info.qmax).clamp(min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int64)
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (info.qmax - info.qmin)).clamp(min=_EPS)
        zero_point = (info.qmin - torch.round(lo / scale)).clamp(info.qmin, info.qmax).to(torch.int64)
    return QParams(scale, zero_point, qdtype, scheme, axis)


def fake_quantize(x: torch.Tensor, q: QParams) -> torch.Tensor:
    """Quantize then dequantize ``x`` with ``q`` (float math; used to score candidate ranges)."""
    info = QDTYPES[q.qdtype]
    scale, zp = q.scale, q.zero_point
    if q.axis is not None:
        shape = [1] * x.dim()
        shape[q.axis] = -1
        scale, zp = scale.view(shape), zp.view(shape)
    codes = torch.clamp(torch.round(x / scale) + zp, info.qmin, info.qmax)
    return (codes - zp) * scale


class Observer:
    """Base class: validates the configuration and reduces batches to per-channel rows."""

    name = ""

    def __init__(self, qdtype: str = "int8", scheme: str = "symmetric", axis: Optional[int] = None):
        qdtype_info(qdtype, scheme, where=f"{self.name} observer")
        self.qdtype, self.scheme, self.axis = qdtype, scheme, axis
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.axis is not None and not -x.dim() <= self.axis < x.dim():
            raise PassError(f"{self.name} observer: axis {self.axis} is out of range for a tensor of shape "
                            f"{list(x.shape)}; pass an axis in [-{x.dim()}, {x.dim() - 1}]")
        self._update(self._rows(x))
        self.batches += 1

    def qparams(self) -> QParams:
        if self.batches == 0:
            raise PassError(f"{self.name} observer: saw no data; give calibration at least one batch")
        lo, hi = self._range()
        return qparams_from_range(lo, hi, self.qdtype, self.scheme, self.axis)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[channels, values]`` (one row for per-tensor observers)."""
        if self.axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(()) if self.axis is None else t

    def _update(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """The smallest and largest value seen."""

    name = "minmax"

    def __init__(self, qdtype="int8", scheme="symmetric", axis=None):
        super().__init__(qdtype, scheme, axis)
        self.lo: Optional[torch.Tensor] = None
        self.hi: Optional[torch.Tensor] = None

    def _update(self, rows):
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _range(self):
        return self._finish(self.lo), self._finish(self.hi)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """An exponential moving average of each batch's min and max (``averaging_constant``)."""

    name = "moving-average-minmax"

    def __init__(self, qdtype="int8", scheme="symmetric", axis=None, averaging_constant: float = 0.01):
        super().__init__(qdtype, scheme, axis)
        if not 0 < averaging_constant <= 1:
            raise PassError(f"{self.name} observer: averaging_constant={averaging_constant} must be in (0, 1]")
        self.c = averaging_constant

    def _update(self, rows):
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)


class _SampleObserver(MinMaxObserver):
    """Keeps the exact min/max plus a bounded uniform sample of ``sample_size`` values per channel."""

    def __init__(self, qdtype="int8", scheme="symmetric", axis=None, sample_size: int = 16384, seed: int = 0):
        super().__init__(qdtype, scheme, axis)
        self.sample_size = sample_size
        self.sample: Optional[torch.Tensor] = None
        self.seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    def _update(self, rows):
        super()._update(rows)
        n = rows.shape[1]
        # Weight each batch by its size: keep a share of the sample proportional to the values seen.
        keep_old = 0 if self.sample is None else round(self.sample_size * self.seen / (self.seen + n))
        keep_new = min(n, self.sample_size - keep_old)
        parts = [] if self.sample is None else [self._pick(self.sample, min(keep_old, self.sample.shape[1]))]
        parts.append(self._pick(rows, keep_new))
        self.sample = torch.cat(parts, dim=1)
        self.seen += n

    def _pick(self, rows: torch.Tensor, k: int) -> torch.Tensor:
        if k >= rows.shape[1]:
            return rows
        idx = torch.randperm(rows.shape[1], generator=self.generator)[:k]
        return rows[:, idx]


class PercentileObserver(_SampleObserver):
    """The ``percentile`` (e.g. 99.99) of |x| (symmetric) or of x at both ends (asymmetric)."""

    name = "percentile"

    def __init__(self, qdtype="int8", scheme="symmetric", axis=None, percentile: float = 99.99, **kw):
        super().__init__(qdtype, scheme, axis, **kw)
        if not 50 < percentile <= 100:
            raise PassError(f"{self.name} observer: percentile={percentile} must be in (50, 100]")
        self.p = percentile / 100

    def _range(self):
        s = self.sample
        if self.scheme == "symmetric":
            amax = torch.quantile(s.abs(), self.p, dim=1)
            return self._finish(-amax), self._finish(amax)
        return self._finish(torch.quantile(s, 1 - self.p, dim=1)), self._finish(torch.quantile(s, self.p, dim=1))


class MSEObserver(_SampleObserver):
    """The clipping range, a fraction of the min/max range, with the least quantization MSE on the sample.

    Tries ``steps`` fractions from ``min_fraction`` to 1 and keeps, per channel,
    the one whose quantize-dequantize error on the kept sample is smallest.
    """

    name = "mse"

    def __init__(self, qdtype="int8", scheme="symmetric", axis=None, steps: int = 100, min_fraction: float = 0.2,
                 **kw):
        super().__init__(qdtype, scheme, axis, **kw)
        if steps < 1 or not 0 < min_fraction <= 1:
            raise PassError(f"{self.name} observer: steps={steps} must be >= 1 and min_fraction={min_fraction} "
                            "in (0, 1]")
        self.steps, self.min_fraction = steps, min_fraction

    def _range(self):
        lo, hi, s = self.lo, self.hi, self.sample
        best_err = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for f in torch.linspace(self.min_fraction, 1.0, self.steps).tolist():
            q = qparams_from_range(lo * f, hi * f, self.qdtype, self.scheme, axis=0)
            err = (fake_quantize(s, q) - s).pow(2).mean(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo * f, best_lo), torch.where(better, hi * f, best_hi)
        return self._finish(best_lo), self._finish(best_hi)


OBSERVERS: Dict[str, Type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver)
}


def make_observer(kind: str, qdtype: str = "int8", scheme: str = "symmetric", axis: Optional[int] = None,
                  **options) -> Observer:
    """An observer by name: ``minmax``, ``moving-average-minmax``, ``percentile`` or ``mse``."""
    if kind not in OBSERVERS:
        raise PassError(f"observer: unknown observer {kind!r}; valid observers: {', '.join(OBSERVERS)}")
    return OBSERVERS[kind](qdtype, scheme, axis, **options)
