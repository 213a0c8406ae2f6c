"""int4-linear: a linear on an int4 group-wise weight as one op, so a backend can dequantize inside its GEMM.

    %w = fxopt.dequantize_int4_grouped(%packed, %scales, %zero_points, 128, torch.float32)
    %y = aten.linear(%x, %w, %b)
becomes
    %y = fxopt.linear_int4(%x, %packed, %scales, %zero_points, 128, %b)

Exact: ``fxopt.linear_int4``'s eager kernel is the same dequantize and linear. Run it after
``insert-qdq{scheme=weight-only,bits=4}``; the ``cuda`` target does for ``precision="int4-weight"``, and its
backend runs the op as ``fxopt.int4.linear`` (up to 64 rows; more: the dequantized weight and a GEMM). Only a
dequantized weight in the linear's own dtype whose sole reader is the linear is taken.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.ir.graph import Graph
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class Int4Linear(Pass):
    name = "int4-linear"
    summary = "linear(x, dequantize_int4_grouped(...)) as one fxopt.linear_int4 (dequantized inside the GEMM)"

    def run(self, graph: Graph) -> PassResult:
        dequantize = fxopt_ops().dequantize_int4_grouped.default
        fused = 0
        for node in list(graph.call_nodes(aten.linear.default)):
            weight = node.args[1]
            if getattr(weight, "target", None) != dequantize or len(weight.users) != 1:
                continue
            packed, scales, zero_points, group_size = weight.args[:4]
            node.target = fxopt_ops().linear_int4.default
            node.args = (node.args[0], packed, scales, zero_points, group_size,
                         node.args[2] if len(node.args) > 2 else None)
            graph.fx_graph.erase_node(weight)
            fused += 1
        if fused:
            graph.recompile()
        return PassResult(graph, bool(fused), {"fused": fused})
