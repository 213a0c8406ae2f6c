"""per_layer_error: where along the graph an optimized model drifts from the original.

    errors = per_layer_error(float_graph, quantized_graph, batches)
    # [{"node": "linear_3", "op": "aten.linear.default", "rel_err": 0.012, "shape": [2, 5, 32],
    #   "rescaled": False}, ...] in graph order

Both graphs run on the same inputs (an ``fx.Interpreter`` records the outputs of
the layer ops: GEMMs, convolutions, attention, embeddings, normalizations; see
``fxopt.report.op_kinds.is_layer_output``) and each layer reports the relative
error ``||a - b|| / ||a||`` over all the batches.

Layers correspond by node name, with the same shape and both floating point.
fxopt's quantization passes keep the names of the ops they quantize (insert-qdq
puts Q/DQ around a linear and leaves the linear's name), so a float graph and
its quantized version compare every linear. Fusion names the op it makes anew
(linear + relu -> ``linear_act_default``), so against the raw capture fused ops
have no counterpart: pass the graph after the lossless passes (the pipeline's
output before quantization) as the reference to compare them too.

Smooth-quant divides some activations by per-channel powers of two, folded into
the LayerNorm or linear that produces them. Such an output differs from the
original by an exact factor per channel, not by error: where the least-squares
factor of every channel (the last dim) is within 7% of a power of two and some
factor is not 1, the pair is compared after multiplying that factor back and
reported with ``"rescaled": True``.

A padded batch's padding positions compute garbage that nothing reads; with
``mask`` (e.g. the attention mask) they are left out of the comparison of every
output with batch and seq dims, ``[batch, seq, hidden]`` or attention's
``[batch, heads, seq, dim]`` (``"masked": True``). ``padding_mask(graph, inputs)``
finds that mask where a graph takes one by Hugging Face's name, a 2-D integer or
bool ``attention_mask`` input; ``optimize`` passes it. Measured on MiniLM
x86-int8 (16 sentences padded to 64, 27% real tokens), layer 3's FFN output
linear is off by 1.87 over all positions and by 0.051 over the real tokens.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from fxopt.errors import InputError, op_name
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.memory import return_freed_memory
from fxopt.report.op_kinds import is_layer_output, op_kind

#: Bytes of the original's layer outputs held at once, waiting for the optimized graph's: beyond it the
#: layers are compared in chunks, both graphs run once per chunk (BERT-base at 8x128 holds ~1.9 GB in all).
REFERENCE_BUDGET_BYTES = 128 * 2**20
#: |log2(factor) - round(log2(factor))| below this counts as an exact power-of-two factor (2**0.1 = 1.07).
POWER_OF_TWO_SLACK = 0.1


def per_layer_error(original: Graph, optimized: Graph, inputs,
                    mask: Optional[Callable[[tuple], torch.Tensor]] = None) -> List[dict]:
    """Relative error of each corresponding layer output, in the original graph's order.

    ``inputs`` is one input tuple (like ``example_inputs``) or a list of input tuples. ``mask(batch)``, if
    given, returns a bool tensor (e.g. a padded batch's attention mask, ``lambda b: b[1].bool()``): outputs
    with dims of its sizes (before the last) are compared on the selected rows only (padding does not count).
    """
    batches = _as_batches(inputs)
    layers = corresponding_layers(original, optimized)
    stats = {name: _ChannelStats() for name in layers}
    chunks = list(_chunks(original, layers, REFERENCE_BUDGET_BYTES))
    for batch in batches:
        rows = None if mask is None else _check_mask(mask(batch))
        for chunk in chunks:
            reference: Dict[str, torch.Tensor] = {}
            _run_recording(original, batch, chunk, reference.__setitem__)
            _run_recording(optimized, batch, chunk,
                           lambda name, value: _compare(stats[name], reference.pop(name), value, rows))
    out = []
    for name, op in layers.items():
        if stats[name].comparable:
            rel_err, rescaled = stats[name].relative_error()
            out.append({"node": name, "op": op, "rel_err": rel_err, "shape": stats[name].shape,
                        "rescaled": rescaled, "masked": stats[name].masked})
    return out


def _compare(stats: "_ChannelStats", reference: torch.Tensor, value: torch.Tensor, rows) -> None:
    stats.add(reference, value, rows)
    del reference
    return_freed_memory()  # the float64 temporaries of add() would otherwise stay resident (fxopt.passes.infra.memory)


def _chunks(original: Graph, layers: Dict[str, str], budget: int):
    """``layers`` in graph order, cut where the reference outputs held at once would pass ``budget`` bytes."""
    chunk, used = {}, 0
    for name, op in layers.items():
        size = _output_bytes(original.node(name), budget)
        if chunk and used + size > budget:
            yield chunk
            chunk, used = {}, 0
        chunk[name] = op
        used += size
    if chunk:
        yield chunk


def _output_bytes(node: fx.Node, budget: int) -> int:
    """The bytes of a node's output from its metadata; an eighth of the budget where a dim is dynamic."""
    info = node.meta.get(M.INFO_KEY)
    if not isinstance(info, M.TensorInfo) or not info.is_static:
        return budget // 8
    return math.prod(info.shape) * info.dtype.itemsize


def corresponding_layers(original: Graph, optimized: Graph) -> Dict[str, str]:
    """``{node name: op}`` of the original's layer ops that the optimized graph has a node of the same name for."""
    names = {n.name for n in optimized.nodes if n.op == "call_function"}
    return {n.name: op_name(n) for n in original.nodes
            if n.op == "call_function" and n.name in names and is_layer_output(op_kind(op_name(n)))}


#: Input names that mark a padded batch's real tokens (Hugging Face's convention): 1 a token, 0 padding.
PADDING_MASK_NAMES = ("attention_mask",)


def padding_mask(graph: Graph, inputs: Sequence) -> Optional[Callable[[tuple], torch.Tensor]]:
    """``mask`` for ``per_layer_error`` where ``graph`` takes a padding mask as one of ``inputs`` (flat tensors),
    else None."""
    if len(graph.input_specs) != len(inputs):  # nested inputs: positions would not match the specs
        return None
    for index, spec in enumerate(graph.input_specs):
        if spec.name in PADDING_MASK_NAMES and len(spec.shape) == 2 and not spec.dtype.is_floating_point:
            return lambda batch, i=index: batch[i].bool()
    return None


def _check_mask(rows) -> torch.Tensor:
    if not (isinstance(rows, torch.Tensor) and rows.dtype == torch.bool and rows.dim() >= 1):
        raise InputError(f"per_layer_error: mask(batch) gave {type(rows).__name__} "
                         f"{getattr(rows, 'dtype', '')}; it must return a bool tensor, e.g. lambda b: b[1].bool()")
    return rows


def _as_batches(inputs) -> List[Tuple[torch.Tensor, ...]]:
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, torch.Tensor) for x in inputs):
        return [tuple(inputs)]
    if isinstance(inputs, (tuple, list)) and inputs:
        return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in inputs]
    raise InputError(f"per_layer_error: inputs is {type(inputs).__name__} {inputs!r:.60}; pass one input tuple "
                     "(like example_inputs) or a non-empty list of input tuples")


class _Recorder(fx.Interpreter):
    """Runs a graph node by node and hands the tensor outputs of the watched nodes to ``on_value``."""

    def __init__(self, module: fx.GraphModule, watched, on_value: Callable[[str, torch.Tensor], None]):
        super().__init__(module)
        self.watched, self.on_value = watched, on_value

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.watched and isinstance(value, torch.Tensor):
            self.on_value(n.name, value)
        return value


def _run_recording(graph: Graph, batch: tuple, watched, on_value) -> None:
    graph.check_inputs(batch)
    with torch.no_grad():
        _Recorder(graph.module, watched, on_value).run(*batch)


class _ChannelStats:
    """Per-channel (last dim) sums over batches, in float64: enough for the error under any per-channel factor."""

    def __init__(self):
        self.shape, self.comparable, self.masked = None, True, False
        self.ref_sq = self.out_sq = self.cross = self.diff_sq = None

    def add(self, a: torch.Tensor, b: torch.Tensor, rows: Optional[torch.Tensor] = None) -> None:
        same = a.shape == b.shape and a.is_floating_point() and b.is_floating_point()
        self.comparable = self.comparable and same
        if not self.comparable:
            return
        self.shape = list(a.shape)
        selected = None if rows is None else _rows_for(a.shape, rows)
        if selected is not None:
            a, b, self.masked = a[selected], b[selected], True
        a, b = _channels(a), _channels(b)
        sums = ((a * a).sum(0), (b * b).sum(0), (a * b).sum(0), ((a - b) ** 2).sum(0))
        if self.ref_sq is None:
            self.ref_sq, self.out_sq, self.cross, self.diff_sq = sums
        else:
            for mine, more in zip((self.ref_sq, self.out_sq, self.cross, self.diff_sq), sums):
                mine += more

    def relative_error(self) -> Tuple[float, bool]:
        """``(||a - b|| / ||a||, rescaled)``; b times its per-channel power-of-two factor where it has one."""
        norm = float(self.ref_sq.sum())
        factors = self._power_of_two_factors()
        if factors is None:
            diff = float(self.diff_sq.sum())
        else:  # ||a - c b||^2 per channel = aa - 2 c ab + c^2 bb
            diff = max(float((self.ref_sq - 2 * factors * self.cross + factors ** 2 * self.out_sq).sum()), 0.0)
        error = math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)
        return error, factors is not None

    def _power_of_two_factors(self):
        live = self.out_sq > 0
        if not bool(live.any()) or self.ref_sq.numel() < 2:
            return None
        least_squares = torch.where(live, self.cross / self.out_sq.clamp_min(1e-300), torch.ones_like(self.cross))
        if bool((least_squares[live] <= 0).any()):
            return None
        exponents = torch.log2(least_squares[live])
        rounded = exponents.round()
        if bool(((exponents - rounded).abs() > POWER_OF_TWO_SLACK).any()) or bool((rounded == 0).all()):
            return None
        factors = torch.ones_like(self.cross)
        factors[live] = torch.exp2(rounded)
        return factors


def _rows_for(shape, rows: torch.Tensor) -> Optional[torch.Tensor]:
    """``rows`` spread over ``shape[:-1]``: its dims matched, in order, to the first leading dims of equal size
    (``[batch, seq]`` on ``[batch, seq, hidden]`` or on attention's ``[batch, heads, seq, dim]``); None if none."""
    leading, dims = shape[:-1], []
    for size in rows.shape:
        start = dims[-1] + 1 if dims else 0
        match = next((d for d in range(start, len(leading)) if leading[d] == size), None)
        if match is None:
            return None
        dims.append(match)
    view = [1] * len(leading)
    for d, size in zip(dims, rows.shape):
        view[d] = size
    return rows.reshape(view).expand(*leading)


def _channels(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float64 rows of its last dim (a 0-d or 1-d tensor is one row)."""
    t = t.detach().double()
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(-1, t.shape[-1])
