"""Which linears the GPU GEMM passes (quantize-fp8, quantize-int8) take, and why each other one stays float.

A linear is taken when its weight is a 2-D parameter (a get_attr: the backend quantizes it once, at load), its
input and weight are fp32, fp16 or bf16 with known shapes, its ``in`` and ``out`` are multiples of the GEMM's
``multiple``, and ``skip`` does not name it (mixed precision). The taken ones become the pass's op, with the same
arguments (input, weight, bias).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.quantize.calibrate import is_weight

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def why_kept_float(node: fx.Node, skip: Sequence[str], multiple: int) -> Optional[str]:
    """None for a linear the GEMM takes; otherwise why it stays in floating point."""
    if node.name in skip:
        return "named in skip"
    x, weight = node.args[0], node.args[1]
    x_info, w_info = M.node_info(x), M.node_info(weight)
    if not (is_weight(weight) and isinstance(w_info, M.TensorInfo) and len(w_info.shape) == 2):
        return "its weight is not a 2-D parameter"
    if not isinstance(x_info, M.TensorInfo) or x_info.dtype not in FLOAT_DTYPES or w_info.dtype not in FLOAT_DTYPES:
        return "not a float32, float16 or bfloat16 linear"
    out_features, in_features = w_info.shape
    if not all(isinstance(d, int) and d % multiple == 0 for d in (in_features, out_features)):
        return f"in={in_features}, out={out_features}: not both multiples of {multiple}"
    return None


def linears_to_quantize(graph: Graph, skip: Sequence[str], multiple: int) -> Tuple[List[fx.Node], Dict[str, str]]:
    """(the linears the GEMM takes, {name: why} for the ones kept in floating point), in graph order."""
    taken, kept = [], {}
    for node in graph.call_nodes(torch.ops.aten.linear.default):
        reason = why_kept_float(node, skip, multiple)
        if reason is None:
            taken.append(node)
        else:
            kept[node.name] = reason
    return taken, kept


def retarget_linears(graph: Graph, linears: Sequence[fx.Node], op) -> None:
    """``aten.linear(x, w[, b])`` -> ``op(x, w, b)`` for each of ``linears``, in place."""
    for node in linears:
        node.target = op
        node.args = (node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None)
    if linears:
        graph.recompile()
