"""quantize-fp8: linears as float8_e4m3fn GEMMs, activations per token and weights per output channel.

    %y = aten.linear(%x, %w, %b)              %w a float weight [out, in]
becomes
    %y = fxopt.linear_fp8(%x, %w, %b)

``fxopt.linear_fp8`` (:mod:`fxopt.ir.ops`) quantizes each row of x (a token) and each row of w (an output
channel) to e4m3 with its own scale, absmax / 448, and multiplies the dequantized operands. The scales of x are
chosen at run time, so no calibration is needed. The weight stays a float parameter, the one the model's
``state_dict`` names: the ``cuda`` target quantizes it once, when it loads the parameters, and runs the product
as cuBLASLt's fp8 GEMM with both scale vectors in its epilogue (``fxopt.cublaslt.matmul_fp8``).

Only linears whose weight is a parameter with ``in`` and ``out`` multiples of 16 are quantized (cuBLASLt's fp8
GEMM needs 16-byte rows); the rest, and the nodes named in ``skip`` (mixed precision), stay in floating point
and are counted in ``skipped``. The result's error is e4m3's: 3 mantissa bits, about 2^-4 relative per element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from fxopt.ir.graph import Graph
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.quantize.gemm_linears import linears_to_quantize, retarget_linears

#: cuBLASLt's fp8 GEMM reads rows of 16 bytes: in (K) and out (N) multiples of this
FP8_MULTIPLE = 16


@register_pass
@dataclass(frozen=True)
class QuantizeFp8(Pass):
    name = "quantize-fp8"
    summary = "linears as fp8 (e4m3) GEMMs: activations per token at run time, weights per output channel"
    lossy = True
    #: Names of linear nodes to leave in floating point (mixed precision); counted in ``skipped``.
    skip: Tuple[str, ...] = ()

    def run(self, graph: Graph) -> PassResult:
        quantized, kept = linears_to_quantize(graph, self.skip, FP8_MULTIPLE)
        retarget_linears(graph, quantized, fxopt_ops().linear_fp8.default)
        return PassResult(graph, bool(quantized), {"linears": len(quantized), "skipped": len(kept)})
