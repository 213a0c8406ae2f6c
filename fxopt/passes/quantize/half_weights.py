"""half-weights: store float32 matrix weights in float16, computed in float32 as before.

    %y = aten.linear(%x, %w, %b)              %w float32 [out, in]
becomes
    %w_f = aten._to_copy(%w_half, dtype=torch.float32)
    %y = aten.linear(%x, %w_f, %b)            still float32 compute

For the layers that mixed precision keeps out of int8: their weights are the
bulk of what is left in float32, and float16 halves them on disk (the
relative rounding error is 2^-11, far below int8's). Backends fold the
upcast once when they load (the x86 backend does); eager upcasts per call.

Only ``get_attr`` weights of linear and convolution ops, with at least two
dims, and only float32 ones, are touched; an integer or int8 weight never is.
``max-abs`` guards range: weights whose largest magnitude exceeds it (float16
tops out at 65504) stay float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.quantize.calibrate import is_weight, quantizable_ops

aten = torch.ops.aten
CAST = aten._to_copy.default


@register_pass
@dataclass(frozen=True)
class HalfWeights(Pass):
    name = "half-weights"
    summary = "store float32 linear/conv weights in float16 (upcast to float32 where they are read)"
    lossy = True
    max_abs: float = 60000.0

    def run(self, graph: Graph) -> PassResult:
        halved = {}
        for node in list(graph.call_nodes()):
            spec = quantizable_ops().get(node.target)
            if spec is None:
                continue
            index = spec["weight"][0]
            weight = node.args[index] if index < len(node.args) else None
            if not self._eligible(graph, weight):
                continue
            if weight not in halved:
                halved[weight] = self._upcast_half(graph, node, weight)
            node.replace_input_with(weight, halved[weight])
        if halved:  # only then is the module recompiled: leave its other get_attrs alone otherwise
            graph.remove_unused_params()
        return PassResult(graph, bool(halved), {"weights": len(halved)})

    def _eligible(self, graph: Graph, weight) -> bool:
        if not is_weight(weight):
            return False
        info = M.node_info(weight)
        if not (isinstance(info, M.TensorInfo) and info.dtype == torch.float32 and len(info.shape) >= 2):
            return False
        return float(graph.param(weight).detach().abs().max()) <= self.max_abs

    @staticmethod
    def _upcast_half(graph: Graph, user, weight):
        rw = Rewriter(graph, user)
        half = rw.param(f"{weight.target}_half", graph.param(weight).detach().half())
        return rw.call(CAST, half, dtype=torch.float32)
