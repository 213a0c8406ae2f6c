"""GELU, recognised once: the patterns of GELU written out, and fuse-gelu, which makes every GELU one op.

GPT-2's ``gelu_new`` is ``0.5*x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))``
and the exact GELU is sometimes spelled ``0.5*x * (1 + erf(x / sqrt(2)))``: eight
and five elementwise ops with float constants. The patterns here are the only
place fxopt matches those constants:

- ``fuse-epilogue`` turns a chain into ``aten.gelu`` (then into a linear's epilogue);
- :class:`FuseGelu` turns a chain, or an ``aten.gelu``, into ``fxopt.fused_gelu``::

      %mul_3 = aten.mul.Tensor(%mul, %add_1)        # the end of gelu_new's chain
  becomes
      %fused_gelu = fxopt.fused_gelu.default(%x, tanh)

  The CUDA backend runs it before lowering to Relax for its GELU kernel
  (:func:`fxopt.backends.tvm_cuda.lower.prepare`), so Relax sees ``nn.gelu`` /
  ``nn.gelu_tanh`` and never matches constants. It is not in the registry: it
  undoes nothing another pass needs, but a linear's epilogue fusion no longer
  sees an ``aten.gelu`` after it, so it belongs at the end of a backend's lowering.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List

import torch

from fxopt.ir.ops import fxopt_ops
from fxopt.passes.fusion.common import is_number
from fxopt.passes.infra.driver import RewritePass
from fxopt.passes.infra.pattern import Op, OpPattern, PatternBase, Var

aten = torch.ops.aten


def _near(value: float) -> Callable:
    return lambda c: is_number(c) and math.isclose(c, value, rel_tol=1e-6)


def gelu_tanh_chain_patterns() -> List[Op]:
    """``0.5*x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` in the orders the exporter leaves."""
    x = Var("x")
    cube = Op(aten.mul.Tensor, Op(aten.pow.Tensor_Scalar, x, Var("three", where=_near(3.0))),
              Var("c1", where=_near(0.044715)))
    inners = [Op(aten.add.Tensor, x, cube, alpha=1), Op(aten.add.Tensor, cube, x, alpha=1)]
    return [root for inner in inners for root in _half_x_times_one_plus(
        Op(aten.tanh.default, Op(aten.mul.Tensor, inner, Var("c2", where=_near(math.sqrt(2 / math.pi))))))]


def gelu_erf_chain_patterns() -> List[Op]:
    """``0.5*x * (1 + erf(x / sqrt(2)))``, the division also written as ``* (1/sqrt(2))``."""
    x = Var("x")
    scaled = [Op(aten.mul.Tensor, x, Var("c", where=_near(math.sqrt(0.5)))),
              Op(aten.div.Tensor, x, Var("c", where=_near(math.sqrt(2.0))))]
    return [root for inner in scaled for root in _half_x_times_one_plus(Op(aten.erf.default, inner))]


def _half_x_times_one_plus(core: Op) -> List[Op]:
    half = Op(aten.mul.Tensor, Var("x"), Var("half", where=_near(0.5)))
    one_plus = Op(aten.add.Tensor, core, Var("one", where=_near(1.0)), alpha=1)
    return [Op(aten.mul.Tensor, half, one_plus), Op(aten.mul.Tensor, one_plus, half)]


def gelu_chain_patterns(tanh_rewrite: Callable, erf_rewrite: Callable, approximations=("tanh", "none")):
    """OpPatterns ``gelu-tanh-chain`` and ``gelu-erf-chain`` (those of ``approximations``) with these rewrites."""
    patterns: List[PatternBase] = []
    if "tanh" in approximations:
        patterns += [OpPattern(root, tanh_rewrite, name="gelu-tanh-chain") for root in gelu_tanh_chain_patterns()]
    if "none" in approximations:
        patterns += [OpPattern(root, erf_rewrite, name="gelu-erf-chain") for root in gelu_erf_chain_patterns()]
    return patterns


# ---------------------------------------------------------------- fuse-gelu
def fused_gelu_tanh_rewrite(rw, x, **_):
    return rw.call(fxopt_ops().fused_gelu.default, x, "tanh")


def fused_gelu_erf_rewrite(rw, x, **_):
    return rw.call(fxopt_ops().fused_gelu.default, x, "none")


def aten_gelu_rewrite(rw, x, approximate):
    return rw.call(fxopt_ops().fused_gelu.default, x, approximate)


@dataclass(frozen=True)
class FuseGelu(RewritePass):
    """Every GELU, written out or ``aten.gelu``, becomes ``fxopt.fused_gelu(x, approximate)``."""

    name = "fuse-gelu"
    summary = "GELU written out (GPT-2's gelu_new, the erf form) or aten.gelu -> fxopt.fused_gelu"

    def patterns(self) -> List[PatternBase]:
        chains = gelu_chain_patterns(fused_gelu_tanh_rewrite, fused_gelu_erf_rewrite)
        gelu = Op(aten.gelu.default, Var("x"), approximate=Var("approximate"))
        return [*chains, OpPattern(gelu, aten_gelu_rewrite, name="aten-gelu")]
