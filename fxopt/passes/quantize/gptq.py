"""GPTQ weight rounding (Frantar et al., 2023): ``insert-qdq{...,method=gptq}``.

For int4 group-wise weights (``bits=4``) and for per-channel int8/int7 weights
(``bits=8``/``bits=7``: one group spanning the whole row, its symmetric range
fixed from the original row, as round-to-nearest would choose it).

Rounding each weight to the nearest code ignores how the layer's inputs mix
the columns. GPTQ rounds one input column at a time and spreads that column's
rounding error over the columns not rounded yet, through the inverse Hessian
of the layer's inputs on calibration data:

    H = 2/n · Σ x xᵀ          over the n calibration rows x of the linear's input    [in, in]
    U = cholesky(H⁻¹)ᵀ        upper triangular (H damped by 1% of its mean diagonal)
    for j = 0 .. in-1:        (a group's range is fixed from the updated weights at its first column)
        e = (w_j - dequant(round(w_j))) / U[j, j]
        w_k -= e · U[j, k]    for every k > j

It greedily minimises ``||X Wᵀ - X Ŵᵀ||``; on MiniLM int4 g=128 it lifts the
embedding cosine from 0.94 to 0.98. The codes and QParams have exactly the
format of :func:`~fxopt.passes.quantize.int4.quantize_int4_grouped`; with
uncorrelated inputs (``H`` a multiple of the identity) the two agree code for code.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.ir.meta import INFO_KEY, QParams
from fxopt.passes.quantize.calibrate import _ObservingInterpreter
from fxopt.passes.quantize.int4 import pack_int4
from fxopt.passes.quantize.observers import QDTYPES, qparams_from_range

#: Bytes of Hessian sums (float64) held at once by :class:`LazyHessians` (BERT-base's linears need 1.1 GB in all).
HESSIAN_BUDGET_BYTES = 128 * 2**20
#: Added to H's diagonal, relative to its mean, so that H is invertible (GPTQ's default).
DAMPING = 0.01


class HessianObserver:
    """Accumulates ``2/n · Σ x xᵀ`` over the rows (last dim) of the tensors it observes (batch sums in float64)."""

    def __init__(self):
        self.sum, self.rows = 0.0, 0

    def observe(self, x: torch.Tensor) -> None:
        rows = x.detach().float().reshape(-1, x.shape[-1])
        gram = rows.t() @ rows
        if isinstance(self.sum, torch.Tensor):
            self.sum.add_(gram)  # accumulated in float64 in place: no float64 copy of the batch's sum
        else:
            self.sum = gram.double()
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        h = 2 * self.sum
        h /= max(self.rows, 1)  # in place: one float64 temporary, not two
        return h.float()


def weight_hessians(graph: Graph, linears: Sequence[fx.Node], batches: Iterable[Tuple]) -> Dict[str, torch.Tensor]:
    """Weight target -> the Hessian of its linears' inputs (summed over linears sharing a weight) on ``batches``."""
    inputs = {n.args[0].name: [HessianObserver()] for n in linears}
    interpreter = _ObservingInterpreter(graph.module, inputs)
    with torch.no_grad():
        for batch in batches:
            interpreter.run(*batch)
    by_input: Dict[str, torch.Tensor] = {}
    hessians: Dict[str, torch.Tensor] = {}
    for n in linears:
        if n.args[0].name not in by_input:  # each input's float64 sum is dropped once its Hessian is made
            by_input[n.args[0].name] = inputs.pop(n.args[0].name)[0].hessian()
        h, target = by_input[n.args[0].name], n.args[1].target
        hessians[target] = hessians[target] + h if target in hessians else h
    return hessians


class LazyHessians:
    """:func:`weight_hessians`, computed a chunk of weights at a time, in graph order, as ``get`` asks for them.

    Only one chunk (at most ``budget`` bytes of float64 sums) is held, so GPTQ over a large model does not
    keep every Hessian at once; each chunk costs one pass over ``batches``. The graph is copied first:
    what the caller rewrites afterwards does not change what is observed.
    """

    def __init__(self, graph: Graph, linears: Sequence[fx.Node], batches: Iterable[Tuple],
                 budget: int = HESSIAN_BUDGET_BYTES):
        """``batches`` must be re-iterable (a list, :class:`fxopt.passes.infra.batches.Batches`): each chunk
        streams them again, and none is held here."""
        self.graph, self.batches, self.current = graph.copy(), batches, {}
        self.chunks = _chunks_by_weight([(n.name, n.args[1].target, n.args[0].meta) for n in linears], budget)

    def get(self, target: str):
        if target not in self.current:
            chunk = next((c for c in self.chunks if target in c), None)
            if chunk is None:
                return None
            self.current = {}  # free the last chunk before observing the next
            linears = [self.graph.node(name) for names in chunk.values() for name in names]
            self.current = weight_hessians(self.graph, linears, self.batches)
        return self.current.get(target)


def _chunks_by_weight(linears, budget: int) -> List[Dict[str, List[str]]]:
    """Chunks of ``{weight target: [linear node names]}``, in order, each within ``budget`` bytes of sums."""
    by_weight: Dict[str, List[str]] = {}
    sizes: Dict[str, int] = {}
    for name, target, input_meta in linears:
        by_weight.setdefault(target, []).append(name)
        info = input_meta.get(INFO_KEY)
        width = info.shape[-1] if info is not None and isinstance(info.shape[-1], int) else 4096
        sizes[target] = sizes.get(target, 0) + 8 * width * width
    chunks, used = [{}], 0
    for target, names in by_weight.items():
        if chunks[-1] and used + sizes[target] > budget:
            chunks.append({})
            used = 0
        chunks[-1][target] = names
        used += sizes[target]
    return chunks


def inverse_hessian_factor(hessian: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """The upper Cholesky factor of the damped ``H⁻¹``; inputs that were always 0 get a unit diagonal.

    Each step drops the matrix before it, so at most two ``[in, in]`` float64 matrices are alive.
    """
    h = hessian.to(torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True).float()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """GPTQ is thousands of tiny sequential ops: intra-op threads only add waits (10x slower on a busy 2-core CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_int4_grouped(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, scheme: str = "symmetric",
                      damping: float = DAMPING) -> Tuple[torch.Tensor, QParams]:
    """The packed uint8 codes ``[out, in / 2]`` GPTQ chooses for ``weight`` and their per-group QParams."""
    with _one_thread():
        codes, scales, zero_points = _gptq(weight.detach().float().t().contiguous(),
                                           inverse_hessian_factor(hessian, damping), group_size, scheme, "int4")
    qp = QParams(torch.stack(scales, 1), torch.stack(zero_points, 1).to(torch.int8), "int4", scheme, 0, group_size)
    return pack_int4(codes.t()), qp


def gptq_per_channel(weight: torch.Tensor, hessian: torch.Tensor, qdtype: str = "int8",
                     damping: float = DAMPING) -> Tuple[torch.Tensor, QParams]:
    """Symmetric per-output-channel codes ``[out, in]`` (int8 storage) GPTQ chooses for a linear weight."""
    with _one_thread():
        codes, scales, zero_points = _gptq(weight.detach().float().t().contiguous(),
                                           inverse_hessian_factor(hessian, damping), weight.shape[1], "symmetric",
                                           qdtype)
    qp = QParams(scales[0], zero_points[0], qdtype, "symmetric", 0)
    return codes.t().to(torch.int8).contiguous(), qp


def _gptq(columns: torch.Tensor, u: torch.Tensor, group_size: int, scheme: str, qdtype: str):
    """GPTQ on ``columns`` = Wᵀ ``[in, out]`` (input column j is the contiguous row j), changed in place.

    Returns the codes ``[in, out]`` (as floats) and each group's scales and zero points.
    """
    codes = torch.empty_like(columns)
    scales: List[torch.Tensor] = []
    zero_points: List[torch.Tensor] = []
    for start in range(0, columns.shape[0], group_size):
        end = start + group_size
        group = columns[start:end]
        q = qparams_from_range(group.amin(dim=0), group.amax(dim=0), qdtype, scheme, axis=0)
        errors = _round_group(group, u[start:end, start:end], q, codes[start:end], QDTYPES[qdtype])
        columns[end:] -= u[start:end, end:].t() @ errors
        scales.append(q.scale)
        zero_points.append(q.zero_point)
    return codes, scales, zero_points


def _round_group(group: torch.Tensor, u: torch.Tensor, q: QParams, codes: torch.Tensor, info) -> torch.Tensor:
    """Round a group's columns (the rows of ``group``) in order, each one's error fed into the later ones, in place."""
    errors = torch.empty_like(group)
    for j in range(group.shape[0]):
        codes[j] = torch.clamp(torch.round(group[j] / q.scale) + q.zero_point, info.qmin, info.qmax)
        errors[j] = (group[j] - (codes[j] - q.zero_point) * q.scale) / u[j, j]
        group[j:] -= u[j, j:, None] * errors[j]
    return errors
