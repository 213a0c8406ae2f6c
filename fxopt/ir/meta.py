"""Per-node metadata: TensorInfo on every value, QParams on quantized tensors.

Metadata lives in ``node.meta`` under fxopt's own keys. Always read it through
the accessors here: they raise :class:`MetadataError` naming the node when it
is missing, instead of a bare ``KeyError``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxopt.errors import MetadataError, describe_node

INFO_KEY = "fxopt_info"
QPARAMS_KEY = "fxopt_qparams"


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of one tensor value. Dims may be symbolic (``torch.SymInt``)."""

    shape: Tuple[Union[int, torch.SymInt], ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorInfo":
        return cls(tuple(tensor.shape), tensor.dtype, tensor.device)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def numel(self) -> Optional[int]:
        """Number of elements, or None when a dim is symbolic."""
        if not self.is_static:
            return None
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{str(self.dtype).replace('torch.', '')}[{dims}]"


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of a tensor.

    ``axis`` is None for per-tensor quantization; ``scheme`` is e.g.
    ``"symmetric"`` or ``"asymmetric"``; ``group_size`` is set for group-wise
    (int4) weights.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qdtype: str
    scheme: str = "symmetric"
    axis: Optional[int] = None
    group_size: Optional[int] = None


NodeInfo = Union[TensorInfo, Tuple[Optional[TensorInfo], ...], None]


def info_from_value(value) -> NodeInfo:
    """TensorInfo of a tensor, a tuple of them for a tuple/list of tensors, None otherwise."""
    if isinstance(value, torch.Tensor):
        return TensorInfo.of(value)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(TensorInfo.of(v) if isinstance(v, torch.Tensor) else None for v in value)
    return None


def is_value_node(node: fx.Node) -> bool:
    """Nodes that produce a tensor (or tuple of tensors) and so must carry TensorInfo."""
    if node.op == "output":
        return False
    val = node.meta.get("val")
    if node.op in ("placeholder", "get_attr"):
        return val is None or info_from_value(val) is not None
    return info_from_value(val) is not None if "val" in node.meta else True


def tensor_info(node: fx.Node) -> TensorInfo:
    """The TensorInfo of a single-tensor node; raises MetadataError naming the node."""
    info = node.meta.get(INFO_KEY)
    if info is None:
        raise MetadataError(
            f"{describe_node(node)}: has no TensorInfo; run graph.refresh_meta() after editing the graph "
            "by hand, or build nodes through a Rewriter"
        )
    if not isinstance(info, TensorInfo):
        raise MetadataError(
            f"{describe_node(node)}: produces a tuple of tensors, not one tensor; read the getitem node "
            "that selects the element you need"
        )
    return info


def node_info(node: fx.Node) -> NodeInfo:
    """The raw metadata: TensorInfo, a tuple of them, or None for non-tensor values."""
    return node.meta.get(INFO_KEY)


def set_val(node: fx.Node, value) -> None:
    """Record a (fake) value on a node and derive its TensorInfo."""
    node.meta["val"] = value
    info = info_from_value(value)
    if info is None:
        node.meta.pop(INFO_KEY, None)
    else:
        node.meta[INFO_KEY] = info


def qparams(node: fx.Node) -> QParams:
    """The QParams of a quantized node; raises MetadataError naming the node."""
    q = node.meta.get(QPARAMS_KEY)
    if q is None:
        raise MetadataError(
            f"{describe_node(node)}: has no QParams; calibrate the graph (fxopt.calibrate) before quantizing"
        )
    return q


def set_qparams(node: fx.Node, q: QParams) -> None:
    node.meta[QPARAMS_KEY] = q


def fake_mode_of(graph: fx.Graph) -> FakeTensorMode:
    """The FakeTensorMode the graph's values were traced under, or a new one."""
    vals = [n.meta["val"] for n in graph.nodes if "val" in n.meta]
    mode = detect_fake_mode(vals)
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def _fakeify(mode: FakeTensorMode, x):
    if isinstance(x, fx.Node):
        x = x.meta.get("val")
    if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
        return mode.from_tensor(x, static_shapes=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_fakeify(mode, v) for v in x)
    return x


def infer_val(node: fx.Node, mode: Optional[FakeTensorMode] = None, module: Optional[torch.nn.Module] = None):
    """Compute a node's fake value from its inputs' fake values and record it.

    Works for ``call_function`` nodes (ATen ops, fxopt custom ops, getitem) and
    ``get_attr`` nodes (given the owning module).
    """
    mode = mode or fake_mode_of(node.graph)
    if node.op == "get_attr":
        if module is None:
            raise MetadataError(f"{describe_node(node)}: need the owning module to infer a get_attr value")
        value = _fakeify(mode, _fetch_attr(module, node.target))
    elif node.op == "call_function":
        args = fx.node.map_aggregate(node.args, lambda a: _fakeify(mode, a))
        kwargs = fx.node.map_aggregate(node.kwargs, lambda a: _fakeify(mode, a))
        _require_inputs_have_vals(node)
        with mode:
            value = node.target(*args, **kwargs)
    else:
        raise MetadataError(f"{describe_node(node)}: cannot infer metadata of a {node.op} node")
    set_val(node, value)
    return value


def _require_inputs_have_vals(node: fx.Node) -> None:
    for inp in node.all_input_nodes:
        if "val" not in inp.meta:
            raise MetadataError(
                f"{describe_node(node)}: input {describe_node(inp)} has no value metadata; "
                "infer inputs before their users (topological order)"
            )


def _fetch_attr(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def shapes_equal(a: Sequence, b: Sequence) -> bool:
    """True when two (possibly symbolic) shapes are provably equal."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))
