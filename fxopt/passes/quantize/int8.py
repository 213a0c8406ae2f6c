"""quantize-int8: linears as int8 x int8 -> int32 GEMMs, activations per token and weights per output channel.

    %y = aten.linear(%x, %w, %b)              %w a float weight [out, in]
becomes
    %y = fxopt.linear_int8(%x, %w, %b)

``fxopt.linear_int8`` (:mod:`fxopt.ir.ops`) quantizes each row of x (a token) and each row of w (an output
channel) to int8, symmetric, with its own scale, absmax / 127, sums the int8 products exactly in int32 and scales
the sums back in fp32 (x's scale, w's scale, then the bias). The scales of x are chosen at run time (dynamic), so
the pass itself needs no calibration; per-channel outliers in x, which per-token scales cannot absorb, are what
``smooth-quant`` (calibrated) moves into the weights first: the ``cuda`` target's ``precision="int8"`` runs
``smooth-quant,quantize-int8``. The weight stays a float parameter: the cuda target quantizes it once, when it
loads the parameters, and runs the product as cuBLASLt's int8 tensor-core GEMM (``fxopt.cublaslt.matmul_int8``)
followed by fxopt's dequantize epilogue (``fxopt.int8.dequantize``).

Only linears whose weight is a parameter with ``in`` and ``out`` multiples of 16 are taken: cuBLASLt's int8
kernels need multiples of 4, and rows of 16 bytes are what its fast ones read. The rest, and the nodes named in
``skip`` (mixed precision), stay in floating point; stats count them (``skipped``) and say why, by node
(``kept_float``). Per element, each operand moves by at most half a step, absmax / 254, of its row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from fxopt.ir.graph import Graph
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.quantize.gemm_linears import linears_to_quantize, retarget_linears

#: in (K) and out (N) multiples of this: 16-byte int8 rows (cuBLASLt's IMMA kernels need 4)
INT8_MULTIPLE = 16


@register_pass
@dataclass(frozen=True)
class QuantizeInt8(Pass):
    name = "quantize-int8"
    summary = "linears as int8 GEMMs with int32 sums: activations per token at run time, weights per output channel"
    lossy = True
    #: Names of linear nodes to leave in floating point (mixed precision); listed in ``kept_float``.
    skip: Tuple[str, ...] = ()

    def run(self, graph: Graph) -> PassResult:
        quantized, kept = linears_to_quantize(graph, self.skip, INT8_MULTIPLE)
        retarget_linears(graph, quantized, fxopt_ops().linear_int8.default)
        return PassResult(graph, bool(quantized), {"linears": len(quantized), "skipped": len(kept),
                                                   "kept_float": kept})
