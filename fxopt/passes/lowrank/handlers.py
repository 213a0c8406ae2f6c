"""low-rank's handler table: for each op it factors, which nodes qualify and how the op is split in two.

    linear(x, W, b)                   ->  linear(linear(x, A), B, b)
    linear_act(x, W, b, act)          ->  linear_act(linear(x, A), B, b, act)
    conv(x, W[out,in,1,1], b, s, p)   ->  conv(convolution(x, A[r,in,1,1], None, s, p), B[out,r,1,1], b)

A convolution qualifies when its kernel is 1 in every spatial dim, it is not
grouped and not transposed: then it is a linear over the channel dim. Stride,
padding and dilation stay on the first conv; padded positions read zeros there,
so the second conv (stride 1, no padding) adds only the bias at them, as before.

The table is keyed by op and checked against the ops' schemas at import, so a
torch upgrade that moves an argument fails loudly here, not with wrong numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.fx as fx

from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.quantize.calibrate import is_weight

aten = torch.ops.aten


def _arg(node: fx.Node, index: int, default=None):
    return node.args[index] if index < len(node.args) else default


def _float_weight_info(node: fx.Node) -> Optional[M.TensorInfo]:
    weight = _arg(node, 1)
    if not is_weight(weight):
        return None
    info = M.node_info(weight)
    if isinstance(info, M.TensorInfo) and info.dtype.is_floating_point and info.is_static:
        return info
    return None


@dataclass(frozen=True)
class LinearHandler:
    """``op(x, W[out, in], bias, ...)`` computing ``x @ Wᵀ``: the input channel is x's last dim."""

    channel_axis = -1

    def is_eligible(self, node: fx.Node) -> bool:
        info = _float_weight_info(node)
        return info is not None and len(info.shape) == 2 and not node.kwargs

    @staticmethod
    def matrix(weight: torch.Tensor) -> torch.Tensor:
        return weight

    @staticmethod
    def shaped(factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return factor

    def split(self, graph: Graph, node: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        """Insert ``linear(x, A)`` before ``node`` and make ``node`` read it with weight ``B``. Returns the new op."""
        first = Rewriter(graph, node).call(aten.linear.default, node.args[0], a)
        node.update_arg(0, first)
        node.update_arg(1, b)
        return first


@dataclass(frozen=True)
class ConvHandler:
    """A convolution op; ``transposed_index`` is None for ops that are never transposed."""

    groups_index: int
    transposed_index: Optional[int] = None
    channel_axis = 1

    def is_eligible(self, node: fx.Node) -> bool:
        info = _float_weight_info(node)
        if info is None or len(info.shape) < 3 or node.kwargs:
            return False
        one_by_one = all(d == 1 for d in info.shape[2:])
        transposed = self.transposed_index is not None and bool(_arg(node, self.transposed_index, False))
        return one_by_one and _arg(node, self.groups_index, 1) == 1 and not transposed

    @staticmethod
    def matrix(weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], weight.shape[1])

    @staticmethod
    def shaped(factor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return factor.reshape(*factor.shape, *weight.shape[2:])

    def split(self, graph: Graph, node: fx.Node, a: fx.Node, b: fx.Node) -> fx.Node:
        dims = len(M.tensor_info(node.args[1]).shape) - 2
        stride, padding, dilation = (_per_dim(_arg(node, i, d), dims) for i, d in ((3, 1), (4, 0), (5, 1)))
        first = Rewriter(graph, node).call(aten.convolution.default, node.args[0], a, None, stride, padding, dilation,
                                           False, [0] * dims, 1)
        args = list(node.args) + [None] * (self.groups_index + 1 - len(node.args))  # fill omitted defaults
        args[0], args[1] = first, b
        args[3], args[4], args[5] = [1] * dims, [0] * dims, [1] * dims
        args[self.groups_index] = 1
        node.args = tuple(args)  # transposed (False) and output padding stay as they were
        return first


def _per_dim(value, dims: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * dims if len(values) == 1 else values


def handlers() -> Dict[object, object]:
    """Op -> its handler."""
    ops = fxopt_ops()
    linear = LinearHandler()
    conv = ConvHandler(groups_index=6)
    return {
        aten.linear.default: linear,
        ops.linear_act.default: linear,
        aten.conv1d.default: conv, aten.conv2d.default: conv, aten.conv3d.default: conv,
        ops.conv_act.default: conv,
        aten.convolution.default: ConvHandler(groups_index=8, transposed_index=6),
    }


def _check_table() -> None:
    """Each op's schema must have its arguments where its handler reads and writes them."""
    for op, handler in handlers().items():
        names = [a.name for a in op._schema.arguments]
        expected = {0: ("input", "self"), 1: ("weight",)}
        if isinstance(handler, ConvHandler):
            expected.update({2: ("bias",), 3: ("stride",), 4: ("padding",), 5: ("dilation",),
                             handler.groups_index: ("groups",)})
            if handler.transposed_index is not None:
                expected.update({handler.transposed_index: ("transposed",),
                                 handler.transposed_index + 1: ("output_padding",)})
        for index, allowed in expected.items():
            if index >= len(names) or names[index] not in allowed:
                raise RuntimeError(f"low-rank handler table: {op} has no argument {allowed[0]!r} at position "
                                   f"{index} (schema: {op._schema}); update fxopt/passes/lowrank/handlers.py")


_check_table()
