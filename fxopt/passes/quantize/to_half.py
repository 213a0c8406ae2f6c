"""to-half, to-bfloat16: compute a float32 graph in float16 / bfloat16, keeping norms and softmax in float32.

    %ln = aten.layer_norm(%x, [384], %ln_w, %ln_b)          float32
    %y = aten.linear(%ln, %w, %b)                           float32
becomes (to-half)
    %ln = aten.layer_norm(%x, [384], %ln_w, %ln_b)          float32, its weights too
    %ln_h = aten._to_copy(%ln, dtype=torch.float16)
    %y = aten.linear(%ln_h, %w, %b)                         float16: %w and %b are stored in float16
    %y_f = aten._to_copy(%y, dtype=torch.float32)           the output keeps its dtype

Every op that reads float32 values computes in the low dtype, except the
groups ``keep-fp32`` names (default all three):
- ``norms``: layer/group/batch/RMS norm;
- ``softmax``: softmax and log-softmax;
- ``reductions``: sum, mean, var, std, norms of vectors, cumsum, logsumexp, prod.
Their inputs are cast back up to float32. Weights that only low-precision ops
read are stored in the low dtype (``graph.size_bytes()`` halves); the others
stay float32. Graph inputs and outputs keep their dtypes: casts sit at the
boundary. Ops whose output dtype is fixed (factories and casts with a
``dtype``, Q/DQ) are left alone and their float32 results are cast where a
low-precision op reads them. Values of other dtypes (float64, already half)
are not touched: a graph without float32 values is not modified.

Stats: ``weights`` stored in the low dtype, ``casts`` inserted, and how many
ops compute in the low dtype (``low_ops``) and in float32 (``fp32_ops``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar, Dict, Tuple

import torch
import torch.fx as fx

from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.ir.ops import QDQ_TARGETS, fxopt_ops
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten
CAST = aten._to_copy.default
ASSERT_METADATA = aten._assert_tensor_metadata.default

#: ``keep-fp32`` group -> the ops that stay in float32.
FP32_GROUPS: Dict[str, frozenset] = {
    "norms": frozenset({
        aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default, aten.group_norm.default,
        aten.native_group_norm.default, aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
        aten.instance_norm.default,
    }),
    "softmax": frozenset({
        aten.softmax.int, aten._softmax.default, aten._safe_softmax.default, aten.log_softmax.int,
        aten._log_softmax.default,
    }),
    "reductions": frozenset({
        aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.var.correction, aten.var.dim,
        aten.var_mean.correction, aten.std.correction, aten.std.dim, aten.linalg_vector_norm.default,
        aten.norm.ScalarOpt_dim, aten.cumsum.default, aten.logsumexp.default, aten.prod.default, aten.prod.dim_int,
    }),
}

#: Ops whose output dtype does not follow their inputs: they are never cast.
FIXED_DTYPE_TARGETS = frozenset(QDQ_TARGETS | {aten.to.dtype, fxopt_ops().dequantize_int4_grouped.default})

LOW, FP32, FIXED = "low", "fp32", "fixed"


@dataclass(frozen=True)
class _ToLowPrecision(Pass):
    """Shared by to-half and to-bfloat16; subclasses set ``name`` and ``low_dtype``."""

    lossy = True
    low_dtype: ClassVar[torch.dtype] = torch.float16
    keep_fp32: Tuple[str, ...] = tuple(FP32_GROUPS)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dtype = str(cls.low_dtype).replace("torch.", "")
        cls.summary = f"compute in {dtype}, norms/softmax/reductions in float32; inputs and outputs keep their dtype"

    def __post_init__(self):
        if self.keep_fp32:
            self.check_choices("keep-fp32", self.keep_fp32, tuple(FP32_GROUPS), "op groups")

    def run(self, graph: Graph) -> PassResult:
        original = {n: M.node_info(n) for n in graph.nodes}
        kinds = {n: self._kind(n) for n in graph.call_nodes()}
        stats = Counter(weights=self._store_weights_low(graph, kinds), casts=0, low_ops=0, fp32_ops=0)
        casts: Dict[Tuple[fx.Node, torch.dtype], fx.Node] = {}
        mode = M.fake_mode_of(graph.fx_graph)
        for node, kind in kinds.items():
            if node.target is ASSERT_METADATA:
                _follow_checked_dtype(node)
            elif kind != FIXED and self._cast_inputs(graph, node, kind, casts):
                stats[f"{kind}_ops"] += 1
            M.infer_val(node, mode, graph.module)
        self._restore_output_dtypes(graph, original, casts)
        stats["casts"] = len(casts)
        return PassResult(graph, stats["casts"] + stats["weights"] > 0, dict(stats))

    def _kind(self, node: fx.Node) -> str:
        if any(node.target in FP32_GROUPS[group] for group in self.keep_fp32):
            return FP32
        if node.target in FIXED_DTYPE_TARGETS or node.kwargs.get("dtype") is not None:
            return FIXED
        return LOW

    def _store_weights_low(self, graph: Graph, kinds: Dict[fx.Node, str]) -> int:
        """Store float32 weights in the low dtype when only low-precision ops read them. Returns how many."""
        readers: Dict[str, list] = {}
        for node in graph.nodes:
            if node.op == "get_attr":
                readers.setdefault(node.target, []).append(node)
        converted = 0
        for nodes in readers.values():
            tensor = graph.param(nodes[0])
            only_low = all(kinds.get(user) == LOW for n in nodes for user in n.users)
            if tensor.dtype == torch.float32 and only_low:
                for node in nodes:
                    graph.replace_param(node, tensor.to(self.low_dtype))
                converted += 1
        return converted

    def _cast_inputs(self, graph: Graph, node: fx.Node, kind: str, casts) -> bool:
        """Cast the float inputs a ``kind`` op must not read in their dtype; True when the op computes in float."""
        want, other = (self.low_dtype, torch.float32) if kind == LOW else (torch.float32, self.low_dtype)
        computes = False

        def cast(arg):
            nonlocal computes
            info = M.node_info(arg)
            if not isinstance(info, M.TensorInfo) or info.dtype not in (want, other):
                return arg
            computes = True
            return arg if info.dtype == want else _cast(graph, node, arg, want, casts)

        node.args = fx.node.map_arg(node.args, cast)
        node.kwargs = fx.node.map_arg(node.kwargs, cast)
        return computes

    def _restore_output_dtypes(self, graph: Graph, original, casts) -> None:
        output = graph.output_node

        def restore(arg):
            before, now = original.get(arg), M.node_info(arg)
            if isinstance(before, M.TensorInfo) and isinstance(now, M.TensorInfo) and before.dtype != now.dtype:
                return _cast(graph, output, arg, before.dtype, casts)
            return arg

        output.args = fx.node.map_arg(output.args, restore)


def _cast(graph: Graph, reader: fx.Node, value: fx.Node, dtype: torch.dtype, casts) -> fx.Node:
    """``value`` cast to ``dtype``, one cast node per value and dtype, placed before its first reader."""
    key = (value, dtype)
    if key not in casts:
        casts[key] = Rewriter(graph, reader).call(CAST, value, dtype=dtype)
    return casts[key]


def _follow_checked_dtype(node: fx.Node) -> None:
    """``_assert_tensor_metadata(x, ..., dtype)`` after x changed dtype: check the new one."""
    checked = M.node_info(node.args[0])
    if not isinstance(checked, M.TensorInfo):
        return
    if node.kwargs.get("dtype") is not None:
        node.update_kwarg("dtype", checked.dtype)
    elif len(node.args) > 3 and node.args[3] is not None:
        node.update_arg(3, checked.dtype)


@register_pass
@dataclass(frozen=True)
class ToHalf(_ToLowPrecision):
    name = "to-half"
    low_dtype = torch.float16


@register_pass
@dataclass(frozen=True)
class ToBFloat16(_ToLowPrecision):
    name = "to-bfloat16"
    low_dtype = torch.bfloat16
