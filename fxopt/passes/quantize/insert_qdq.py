"""insert-qdq: quantize/dequantize pairs around linear, matmul and conv ops.

    %linear = aten.linear(%x, %w, %b)
becomes (scheme=static)
    %q = quantized_decomposed.quantize_per_tensor(%x, 0.02, -3, -128, 127, torch.int8)
    %dq = quantized_decomposed.dequantize_per_tensor(%q, 0.02, -3, -128, 127, torch.int8)
    %dq_w = quantized_decomposed.dequantize_per_channel(%w_int8, %w_scale, None, 0, -128, 127, torch.int8)
    %linear = aten.linear(%dq, %dq_w, %b)

Schemes:
- ``static``: int8 weights per output channel (symmetric), activations per
  tensor from the QParams that ``fxopt.calibrate`` stored;
- ``dynamic``: the same weights; activation ranges chosen at run time
  (``choose_qparams.tensor`` + the ``.tensor`` Q/DQ variants, asymmetric int8);
- ``weight-only``: int8 per-channel weights, float activations; with ``bits=4``,
  int4 linear weights group-wise (``group-size`` 32/64/128 input columns per
  scale, ``symmetric=false`` adds a zero point per group), two codes a byte,
  dequantized by ``fxopt.dequantize_int4_grouped``. Other weighted ops (convs,
  ``mm`` with a ``[in, out]`` weight) and activation matmuls stay in float
  (counted in ``skipped``). ``method=gptq`` chooses the int4 codes with GPTQ
  on the calibration data handed to the pass (``InsertQDQ(..., calibration=
  batches)`` or ``Pipeline(spec, calibration=batches)``); with ``bits=8`` or
  ``bits=7`` it rounds linear weights' per-channel codes with GPTQ.

``activation-matmuls=false`` leaves matmuls between two activations (attention
scores and context) in floating point. ``skip=linear_5;matmul_1`` leaves the
named op nodes in floating point (mixed precision; ``fxopt.passes.quantize.
choose_float_layers`` picks them). ``embeddings=true`` also stores embedding
tables as int8 with a scale per row.

Weights are stored as int8 tensors (``graph.size_bytes()`` shrinks about 4x);
their dequantize ops are in ``UNFOLDABLE_TARGETS`` so fold-constants keeps
them for the backends to pattern-match into int8 kernels. Ops in float64, and
transposed convolutions, are left in floating point (counted in ``skipped``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx

from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.infra.base import Pass, PassResult, calibration_field
from fxopt.passes.infra.batches import Batches
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.quantize.calibrate import (
    activation_inputs, is_weight, linear_targets, quantizable_ops,
)
from fxopt.passes.quantize.gptq import LazyHessians, gptq_int4_grouped, gptq_per_channel
from fxopt.passes.quantize.int4 import GROUP_SIZES, quantize_int4_grouped
from fxopt.passes.quantize.observers import QDTYPES, qparams_from_range

aten = torch.ops.aten
QD = torch.ops.quantized_decomposed
SCHEMES = ("static", "dynamic", "weight-only")
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT8 = QDTYPES["int8"]
BITS = (8, 7, 4)
#: The weight code range of each bit width (int7: [-64, 63] in int8, symmetric so codes stay within ±63).
WEIGHT_QDTYPES = {8: "int8", 7: "int7"}
#: How weight codes are chosen: round to nearest, or GPTQ on the calibration data.
METHODS = ("rtn", "gptq")
#: Weight elements quantized at once by :func:`quantize_weight_per_channel` (16 MB of float32 temporaries).
QUANTIZE_CHUNK_ELEMENTS = 4 * 2**20


def quantize_weight_per_channel(weight: torch.Tensor, axis: int, qdtype: str = "int8"):
    """Symmetric per-channel codes (int8, or int7 stored in int8) of ``weight`` along ``axis`` and their QParams.

    The codes are made a slice of channels at a time (:data:`QUANTIZE_CHUNK_ELEMENTS`), so the float
    temporaries of ``quantize_per_channel`` stay small even for an embedding table.
    """
    weight = weight.detach()
    rows = weight.movedim(axis, 0).reshape(weight.shape[axis], -1)  # min and max are exact in any float dtype
    q = qparams_from_range(rows.amin(dim=1).float(), rows.amax(dim=1).float(), qdtype, "symmetric", axis)
    del rows
    info = QDTYPES[qdtype]
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS * weight.shape[axis] // max(weight.numel(), 1))
    for start in range(0, weight.shape[axis], step):
        size = min(step, weight.shape[axis] - start)
        part = QD.quantize_per_channel(weight.narrow(axis, start, size).float(), q.scale[start:start + size],
                                       q.zero_point[start:start + size], axis, info.qmin, info.qmax, torch.int8)
        codes.narrow(axis, start, size).copy_(part)
    return codes, q


def _out_dtype(dtype: torch.dtype) -> dict:
    return {} if dtype == torch.float32 else {"out_dtype": dtype}


@register_pass
@dataclass(frozen=True)
class InsertQDQ(Pass):
    name = "insert-qdq"
    summary = "insert quantize/dequantize pairs around linear, matmul and conv ops (static, dynamic, weight-only)"
    lossy = True
    scheme: str = "static"
    #: Also quantize matmuls whose inputs are both activations (attention's Q·Kᵀ and P·V).
    activation_matmuls: bool = True
    #: Names of op nodes to leave in floating point (mixed precision); counted in ``skipped``.
    skip: Tuple[str, ...] = ()
    #: 8: int8 weights per channel; 7: int7 weights per channel (codes within ±63, so x86 CPUs without
    #: VNNI, whose GEMM sums pairs of u8 x s8 products in a saturating int16, take full 8-bit activations
    #: exactly); 4: int4 group-wise linear weights (scheme=weight-only only).
    bits: int = 8
    #: Input columns that share an int4 scale (bits=4; default 128).
    group_size: Optional[int] = None
    #: False: int4 groups get a zero point too (the range [min, max] rather than [-amax, amax]).
    symmetric: bool = True
    #: "rtn" rounds each weight to the nearest code; "gptq" spreads rounding errors using the
    #: ``calibration`` data (see fxopt.passes.quantize.gptq).
    method: str = "rtn"
    #: Also store embedding tables as int8, one scale per row (the x86-int8 backend gathers and scales
    #: only the rows it looks up; eager dequantizes the whole table on every call).
    embeddings: bool = False
    #: Input batches GPTQ computes its Hessians on (method=gptq); not an option (see fxopt.passes.infra.base).
    calibration: Optional[Batches] = calibration_field()

    def __post_init__(self):
        super().__post_init__()
        if self.scheme not in SCHEMES:
            raise self.error(f"unknown scheme {self.scheme!r}", hint=f"valid schemes: {', '.join(SCHEMES)}")
        self._check_bits()

    def run(self, graph: Graph) -> PassResult:
        ops = self._without_skipped([n for n in graph.call_nodes() if n.target in quantizable_ops()])
        if not self.activation_matmuls:
            ops = [n for n in ops if self._weight_arg(n) is not None]
        if self.scheme == "static":
            self._require_calibration(ops)
        if self.bits == 4:
            self._require_int4_groups(ops)
        hessians = self._gptq_hessians(graph, ops)
        weights: Dict[tuple, fx.Node] = {}
        acts: Dict[fx.Node, fx.Node] = {}
        stats = {"quantized_ops": 0, "weights": 0, "activations": 0, "skipped": len(set(self.skip))}
        for node in ops:
            if not self._can_quantize(node):
                stats["skipped"] += 1
                continue
            rw = Rewriter(graph, node)
            if self.scheme != "weight-only":
                for act in activation_inputs(node):
                    if act not in acts:
                        acts[act] = self._activation_qdq(rw, act)
                        stats["activations"] += 1
                    node.replace_input_with(act, acts[act])
            weight = self._weight_arg(node)
            if weight is not None:
                key = (weight.target, self._weight_axis(node, weight))
                if key not in weights:
                    weights[key] = self._weight_dq(graph, rw, weight, key[1], hessians.get(weight.target))
                    stats["weights"] += 1
                node.replace_input_with(weight, weights[key])
            stats["quantized_ops"] += 1
        if self.embeddings:
            stats["embeddings"] = self._quantize_embeddings(graph, weights)
        modified = stats["quantized_ops"] + stats.get("embeddings", 0) > 0
        if modified:  # only then is the module recompiled: leave its other get_attrs alone otherwise
            graph.remove_unused_params()
        return PassResult(graph, modified, stats)

    def _quantize_embeddings(self, graph: Graph, weights: Dict[tuple, fx.Node]) -> int:
        count = 0
        for node in list(graph.call_nodes(aten.embedding.default)):
            table = node.args[0]
            info = M.node_info(table)
            if not (is_weight(table) and isinstance(info, M.TensorInfo) and info.dtype in QUANTIZABLE_DTYPES
                    and len(info.shape) == 2):
                continue
            key = (table.target, 0)
            if key not in weights:
                weights[key] = self._int8_weight_dq(graph, Rewriter(graph, node), table, 0)
            node.replace_input_with(table, weights[key])
            count += 1
        return count

    # ------------------------------------------------------------- checks
    def _without_skipped(self, ops):
        unknown = sorted(set(self.skip) - {n.name for n in ops})
        if unknown:
            names = ", ".join(n.name for n in ops[:10]) + (", ..." if len(ops) > 10 else "")
            raise self.error(f"skip={';'.join(unknown)} names no quantizable op of this graph",
                             hint=f"name linear, matmul or conv nodes: {names or 'the graph has none'}")
        return [n for n in ops if n.name not in self.skip]

    def _require_calibration(self, ops) -> None:
        for node in ops:
            if not self._can_quantize(node):
                continue
            for act in activation_inputs(node):
                q = act.meta.get(M.QPARAMS_KEY)
                if q is None:
                    raise self.error(
                        f"input %{act.name} has no calibrated QParams", node,
                        "call fxopt.calibrate(graph, data) before insert-qdq{scheme=static}, "
                        "or use scheme=dynamic or scheme=weight-only",
                    )
                if q.axis is not None:
                    raise self.error(f"input %{act.name} has per-channel QParams (axis={q.axis})", node,
                                     "static activations are quantized per tensor; calibrate without an axis")

    def _check_bits(self) -> None:
        self.check_choices("bits", (str(self.bits),), [str(b) for b in BITS], "bit width")
        if self.bits == 4 and self.scheme != "weight-only":
            raise self.error(f"bits=4 with scheme={self.scheme} is not supported: int4 is for weights only",
                             hint="use insert-qdq{scheme=weight-only,bits=4}, or bits=8 with static and dynamic")
        self.check_choices("method", (self.method,), METHODS, "method")
        if self.bits != 4 and (self.group_size is not None or not self.symmetric):
            raise self.error("group-size and symmetric=false apply to bits=4 only (int8 and int7 weights "
                             "are symmetric per output channel)", hint="drop them, or set bits=4")
        if self.bits == 4:
            self.check_choices("group-size", (str(self.int4_group_size),), [str(g) for g in GROUP_SIZES],
                               "group size")

    @property
    def int4_group_size(self) -> int:
        return self.group_size if self.group_size is not None else GROUP_SIZES[-1]

    def _require_int4_groups(self, ops) -> None:
        for node in ops:
            if not self._can_quantize(node):
                continue
            columns = M.tensor_info(self._weight_arg(node)).shape[1]
            if columns % self.int4_group_size:
                raise self.error(
                    f"group-size={self.int4_group_size} does not divide the weight's {columns} input columns", node,
                    f"choose a group size ({', '.join(map(str, GROUP_SIZES))}) that divides in_features, "
                    f"leave the node in float with skip={node.name}, or use bits=8")

    def _gptq_hessians(self, graph: Graph, ops):
        """method=gptq: weight target -> Hessian of its inputs on the calibration data (``.get``); else empty."""
        if self.method != "gptq":
            return {}
        batches = self.require_calibration("method=gptq", instead="use method=rtn")
        linears = [n for n in ops if self._can_quantize(n) and n.target in linear_targets()
                   and self._weight_arg(n) is not None]
        return LazyHessians(graph, linears, batches)

    def _can_quantize(self, node: fx.Node) -> bool:
        info = M.node_info(node)
        if not isinstance(info, M.TensorInfo) or info.dtype not in QUANTIZABLE_DTYPES:
            return False
        if self.scheme == "dynamic" and info.dtype != torch.float32:
            return False  # choose_qparams.tensor takes float32 only
        if self.bits == 4 and (node.target not in linear_targets() or self._weight_arg(node) is None):
            return False
        transposed = node.target == aten.convolution.default and bool(node.args[6])
        return not transposed

    @staticmethod
    def _weight_arg(node: fx.Node) -> Optional[fx.Node]:
        index, _ = quantizable_ops()[node.target]["weight"]
        arg = node.args[index] if index < len(node.args) else None
        if not is_weight(arg):
            return None
        info = M.node_info(arg)
        ok = isinstance(info, M.TensorInfo) and info.dtype in QUANTIZABLE_DTYPES and len(info.shape) >= 2
        return arg if ok else None

    # ------------------------------------------------------------ rewrites
    def _activation_qdq(self, rw: Rewriter, act: fx.Node) -> fx.Node:
        dtype = M.tensor_info(act).dtype
        if self.scheme == "dynamic":
            eps = torch.finfo(torch.float32).eps
            pair = rw.call(QD.choose_qparams.tensor, act, INT8.qmin, INT8.qmax, eps, torch.int8)
            scale, zp = rw.call(operator.getitem, pair, 0), rw.call(operator.getitem, pair, 1)
            q = rw.call(QD.quantize_per_tensor.tensor, act, scale, zp, INT8.qmin, INT8.qmax, torch.int8)
            return rw.call(QD.dequantize_per_tensor.tensor, q, scale, zp, INT8.qmin, INT8.qmax, torch.int8,
                           **_out_dtype(dtype))
        qp = act.meta[M.QPARAMS_KEY]
        info = QDTYPES[qp.qdtype]
        scale, zp = float(qp.scale), int(qp.zero_point)
        q = rw.call(QD.quantize_per_tensor.default, act, scale, zp, info.qmin, info.qmax, info.storage)
        M.set_qparams(q, qp)
        return rw.call(QD.dequantize_per_tensor.default, q, scale, zp, info.qmin, info.qmax, info.storage,
                       **_out_dtype(dtype))

    @staticmethod
    def _weight_axis(node: fx.Node, weight: fx.Node) -> int:
        _, axis = quantizable_ops()[node.target]["weight"]
        return axis % len(M.tensor_info(weight).shape)

    def _weight_dq(self, graph: Graph, rw: Rewriter, weight: fx.Node, axis: int,
                   hessian: Optional[torch.Tensor] = None) -> fx.Node:
        if self.bits == 4:
            return self._int4_weight_dq(graph, rw, weight, hessian)
        return self._int8_weight_dq(graph, rw, weight, axis, WEIGHT_QDTYPES[self.bits], hessian)

    def _int8_weight_dq(self, graph: Graph, rw: Rewriter, weight: fx.Node, axis: int,
                        qdtype: str = "int8", hessian: Optional[torch.Tensor] = None) -> fx.Node:
        """Per-channel codes of ``weight`` (int8, or int7 in int8 storage; GPTQ-rounded given its inputs'
        ``hessian``) and the dequantize that reads them."""
        tensor = graph.param(weight)
        if hessian is not None and axis == 0 and tensor.dim() == 2:
            codes, qp = gptq_per_channel(tensor, hessian, qdtype)
        else:
            codes, qp = quantize_weight_per_channel(tensor, axis, qdtype)
        codes_node = rw.param(f"{weight.target}_{qdtype}", codes)
        scale_node = rw.param(f"{weight.target}_scale", qp.scale)
        M.set_qparams(codes_node, qp)
        info = QDTYPES[qdtype]
        return rw.call(QD.dequantize_per_channel.default, codes_node, scale_node, None, axis, info.qmin, info.qmax,
                       torch.int8, **_out_dtype(tensor.dtype))

    def _int4_weight_dq(self, graph: Graph, rw: Rewriter, weight: fx.Node, hessian: Optional[torch.Tensor]
                        ) -> fx.Node:
        tensor = graph.param(weight)
        scheme = "symmetric" if self.symmetric else "asymmetric"
        if hessian is None:
            packed, qp = quantize_int4_grouped(tensor, self.int4_group_size, scheme)
        else:
            packed, qp = gptq_int4_grouped(tensor, hessian, self.int4_group_size, scheme)
        packed_node = rw.param(f"{weight.target}_int4", packed)
        scale_node = rw.param(f"{weight.target}_scale", qp.scale)
        zero_point_node = None if self.symmetric else rw.param(f"{weight.target}_zero_point", qp.zero_point)
        M.set_qparams(packed_node, qp)
        return rw.call(fxopt_ops().dequantize_int4_grouped.default, packed_node, scale_node, zero_point_node,
                       self.int4_group_size, tensor.dtype)
