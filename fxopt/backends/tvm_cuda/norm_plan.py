"""What fxopt's LayerNorm kernel can take of a Relax ``nn.layer_norm`` call, and how its output goes back in place."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from fxopt.backends.tvm_cuda.extension_calls import MAX_NORM_HIDDEN, NORM_DTYPES
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, static_shape, tvm_float

#: what an fp32 LayerNorm's consumers may be for the kernel to write it in fp16 (cast back to fp32 for them):
#: the casts to the next GEMM, and the next residual add, which the next LayerNorm's kernel takes in fp16
HALF_FRIENDLY_CONSUMERS = ("relax.astype", "relax.reshape", "relax.permute_dims", "relax.add", "relax.nn.layer_norm")


@dataclass(frozen=True)
class NormPlan:
    """A LayerNorm the kernel takes: its shape and dtype, gamma, beta, eps, and the dtype the kernel writes."""

    shape: List[int]
    dtype: str
    gamma: object
    beta: object
    eps: object  # a Relax PrimValue holding a float64
    out_dtype: str


def layer_norm_plan(call, facts) -> Optional[NormPlan]:
    """The plan for a ``nn.layer_norm`` call over the last axis, static shape, H a multiple of 8; else None.

    The kernel writes fp16 where the LayerNorm is fp16, or where every reader of its output
    takes fp16 just as well (:data:`HALF_FRIENDLY_CONSUMERS`); else fp32.
    """
    from tvm import relax

    shape, dtype = static_shape(call), dtype_of(call)
    if not shape or dtype not in NORM_DTYPES:
        return None
    hidden, attrs = shape[-1], call.attrs
    if [int(a) for a in attrs.axes] not in ([-1], [len(shape) - 1]) or not attrs.center or not attrs.scale or \
            hidden % 8 or hidden > MAX_NORM_HIDDEN:
        return None
    gamma, beta = call.args[1], call.args[2]
    if any(static_shape(t) != [hidden] or dtype_of(t) not in NORM_DTYPES for t in (gamma, beta)):
        return None
    var = facts.var_of(call)
    if not isinstance(var, relax.DataflowVar):
        return None
    half = dtype == "float16" or all(kind in HALF_FRIENDLY_CONSUMERS for kind in facts.reader_kinds(var))
    eps = relax.prim_value(tvm_float(float(attrs.epsilon)))
    return NormPlan(shape, dtype, gamma, beta, eps, "float16" if half else "float32")


def restore(out, out_shape: List[int], out_dtype: str, shape: List[int], dtype: str):
    """``out`` (of ``out_shape``, ``out_dtype``) reshaped and cast to what it replaces."""
    from tvm import relax

    if out_shape != shape:
        out = relax.op.reshape(out, shape)
    if out_dtype != dtype:
        out = relax.op.astype(out, dtype)
    return out
