"""Relax rewrites that hand work to fxopt's CUDA extension (:mod:`fxopt.backends.tvm_cuda.extension`).

- :func:`offload_attention`, on the fp32 import *before* ``ToMixedPrecision``:
  ``nn.attention[_bias]`` (what ``aten.scaled_dot_product_attention`` imports
  to, BSNH layout) becomes ``fxopt.attention[_bias]`` on fp16 casts of q, k and
  v. It cannot wait: TVM 0.27's ToMixedPrecision rebuilds ``nn.attention``
  without its bias and scale (a wrong answer for every masked or rescaled SDPA).
- :func:`offload`, on the fp16 module after ``ToMixedPrecision``, before
  ``LegalizeOps``: a 16-bit ``matmul`` with fp32 accumulation cast back to 16
  bits, and a bias ``add`` that follows it, become ``fxopt.cublaslt.matmul[_bias]``.
"""
from __future__ import annotations

import math
from typing import List, Optional

GEMM = "fxopt.cublaslt.matmul"
GEMM_BIAS = "fxopt.cublaslt.matmul_bias"
ATTENTION = "fxopt.attention"
ATTENTION_BIAS = "fxopt.attention_bias"
HALF_DTYPES = ("float16", "bfloat16")
#: ``nn.attention``'s causal_mask attribute -> the kernel's ``causal`` argument
CAUSAL_CODES = {None: 0, "TopLeft": 1, "BottomRight": 2}


# ----------------------------------------------------------- Relax rewrite
def _sinfo(expr):
    """The expression's type (TVM 0.27's name for struct info): shape and dtype, or None where not normalized."""
    return getattr(expr, "ty", None)


def _dtype(expr) -> Optional[str]:
    dtype = getattr(_sinfo(expr), "dtype", None)
    return None if dtype is None else str(dtype)  # a DataType: equal to its name, but hashed differently


def _static_shape(expr) -> Optional[List[int]]:
    shape = getattr(_sinfo(expr), "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def is_offloadable(a, b, matmul, cast) -> bool:
    """A 16-bit GEMM with fp32 accumulation cast back to its input dtype, shaped as the extension takes it."""
    dtype = _dtype(a)
    if dtype not in HALF_DTYPES or _dtype(b) != dtype or _dtype(matmul) != "float32" or _dtype(cast) != dtype:
        return False
    sa, sb = _static_shape(a), _static_shape(b)
    if sa is None or sb is None or len(sa) < 2:
        return False
    return len(sb) == 2 or (len(sb) == 3 and len(sa) == 3 and sa[0] == sb[0])


def is_bias_for(bias, gemm, add_dtype: Optional[str]) -> bool:
    """A 1-D [N] bias in the GEMM's dtype, or in float32 added to the GEMM's widened output."""
    shape = _static_shape(bias)
    return shape is not None and len(shape) == 1 and _dtype(bias) == add_dtype and \
        add_dtype in (_dtype(gemm), "float32") and shape[0] == _static_shape(gemm)[-1]


def offload(mod):
    """Rewrite every Relax function's 16-bit GEMMs (and their bias adds) into cuBLASLt calls, then tidy the glue."""
    return _each_function(mod, lambda func: simplify_layout_glue(_fuse_bias(_offload_gemms(func))))


def offload_attention(mod):
    """Rewrite every Relax function's float32 ``nn.attention[_bias]`` into fxopt's fp16 kernel, cast around it."""
    return _each_function(mod, _offload_attention)


def _each_function(mod, rewrite):
    from tvm import relax

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = rewrite(func)
    return mod


def _offload_gemms(func):
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    a, b = wildcard(), wildcard()
    matmul = is_op("relax.matmul")(a, b)
    cast = is_op("relax.astype")(matmul)

    def rewrite(expr, matched):
        if not is_offloadable(matched[a], matched[b], matched[matmul], expr):
            return expr
        return relax.op.call_dps_packed(GEMM, [matched[a], matched[b]], out_ty=_sinfo(expr))

    return rewrite_call(cast, rewrite, func)


def _fuse_bias(func):
    """``add(gemm, bias)`` -> ``gemm_bias``; ``add(astype(gemm, f32), bias32)`` -> ``astype(gemm_bias(.., bias16), f32)``.

    The second form is what ToMixedPrecision leaves where the sum feeds fp32
    work (a residual add, GELU); cuBLASLt adds the bias in its fp32 epilogue
    before the one rounding to 16 bits.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    gemm, bias = is_op("relax.call_dps_packed")(wildcard(), wildcard()), wildcard()
    widened = is_op("relax.astype")(gemm)
    add = (is_op("relax.add")(gemm, bias) | is_op("relax.add")(bias, gemm) |
           is_op("relax.add")(widened, bias) | is_op("relax.add")(bias, widened))
    uses = _use_counts(func)

    def rewrite(expr, matched):
        call = matched[gemm]
        gemm_var = max(expr.args, key=lambda arg: len(_static_shape(arg) or ()))  # the bias is 1-D
        if call.args[0].global_symbol != GEMM or not is_bias_for(matched[bias], call, _dtype(expr)) or \
                uses.get(gemm_var, 0) > 1:
            return expr
        if widened in matched and uses.get(matched[widened].args[0], 0) > 1:
            return expr
        bias16 = matched[bias] if _dtype(matched[bias]) == _dtype(call) else relax.op.astype(matched[bias], _dtype(call))
        fused = relax.op.call_dps_packed(GEMM_BIAS, [*call.args[1].fields, bias16], out_ty=_sinfo(call))
        return fused if _dtype(expr) == _dtype(call) else relax.op.astype(fused, _dtype(expr))

    return rewrite_call(add, rewrite, func)


def _use_counts(func) -> dict:
    """How many times each variable of ``func`` is read."""
    from tvm import relax

    counts: dict = {}

    @relax.expr_functor.visitor
    class Reads(relax.PyExprVisitor):
        def visit_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

        def visit_dataflow_var_(self, var):
            counts[var] = counts.get(var, 0) + 1

    Reads().visit_expr(func)
    return counts


def attention_arguments(call) -> Optional[tuple]:
    """(scale, causal code) of a float32 ``nn.attention[_bias]`` call the kernel can take in fp16, or None."""
    q, k, v = call.args[:3]
    shapes = [_static_shape(t) for t in (q, k, v)]
    if any(s is None or len(s) != 4 for s in shapes) or {_dtype(t) for t in (q, k, v)} != {"float32"}:
        return None
    head, head_v = shapes[0][3], shapes[2][3]
    if head % 16 or head_v % 16 or head > 256 or head_v > 256 or call.attrs.window_size is not None:
        return None
    if call.attrs.causal_mask not in CAUSAL_CODES:
        return None
    scale = call.attrs.scale
    return (float(scale.value) if scale is not None else 1.0 / math.sqrt(head)), CAUSAL_CODES[call.attrs.causal_mask]


def _offload_attention(func):
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    plain = is_op("relax.nn.attention")(wildcard(), wildcard(), wildcard())
    biased = is_op("relax.nn.attention_bias")(wildcard(), wildcard(), wildcard(), wildcard())

    def rewrite(expr, _matched):
        found = attention_arguments(expr)
        if found is None:
            return expr
        scale, causal = found
        name = ATTENTION_BIAS if len(expr.args) == 4 else ATTENTION
        halves = [relax.op.astype(t, "float16") for t in expr.args[:3]]
        extra = [relax.prim_value(tvm_float(scale)), relax.prim_value(causal)]
        out_ty = relax.TensorType(_static_shape(expr), "float16")
        call = relax.op.call_dps_packed(name, [*halves, *expr.args[3:], *extra], out_ty=out_ty)
        return relax.op.astype(call, "float32")

    return rewrite_call(plain | biased, rewrite, func)


def tvm_float(value: float):
    """A float64 PrimExpr: the packed function takes a C double."""
    import tvm

    return tvm.tirx.FloatImm("float64", value)  # TVM 0.27 (pinned) names the TIR module tirx


# ------------------------------------------------------------ glue around the calls
LAYOUT_OPS = ("relax.reshape", "relax.permute_dims")


def simplify_layout_glue(func, rounds: int = 4):
    """Drop the copies the import leaves around attention and GEMMs, exactly:

    - ``permute_dims(permute_dims(x, p), q)`` becomes one permutation, or ``x``;
    - ``astype(x, t)`` with ``x`` already ``t`` becomes ``x``;
    - ``astype(layout ops(astype(x16, float32)), float16)`` becomes ``layout ops(x16)``
      (fp16 -> fp32 -> fp16 is lossless, and reshapes and permutations commute with casts).
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.astype")(wildcard()) | is_op("relax.permute_dims")(wildcard())
    for _ in range(rounds):
        values = relax.analysis.get_var2val(func)
        simpler = rewrite_call(pattern, lambda expr, _m: _simpler(expr, values), func)
        if simpler.same_as(func):
            break
        func = relax.analysis.remove_all_unused(simpler)
    return func


def _value(expr, values):
    """What a variable is bound to (dpl hands over calls whose arguments are variables)."""
    from tvm import relax

    return values.get(expr, expr) if isinstance(expr, relax.Var) else expr


def _op_name(expr) -> Optional[str]:
    op = getattr(expr, "op", None)
    return getattr(op, "name", None)


def _simpler(expr, values):
    if _op_name(expr) == "relax.permute_dims":
        return _composed_permutation(expr, values)
    target = str(expr.attrs.dtype)
    source = expr.args[0]
    if _dtype(source) == target:
        return source
    chain, inner = [], _value(source, values)
    while _op_name(inner) in LAYOUT_OPS:
        chain.append(inner)
        inner = _value(inner.args[0], values)
    if _op_name(inner) != "relax.astype" or _dtype(inner) != "float32" or _dtype(inner.args[0]) != target or \
            target not in HALF_DTYPES:
        return expr
    return _replay(inner.args[0], chain)


def _composed_permutation(expr, values):
    from tvm import relax

    inner = _value(expr.args[0], values)
    if _op_name(inner) != "relax.permute_dims" or expr.attrs.axes is None or inner.attrs.axes is None:
        return expr
    first, second = [int(a) for a in inner.attrs.axes], [int(a) for a in expr.attrs.axes]
    composed = [first[i] for i in second]
    if composed == list(range(len(composed))):
        return inner.args[0]
    return relax.op.permute_dims(inner.args[0], composed)


def _replay(x, chain):
    """Apply the layout ops of ``chain`` (outermost first) to ``x``, innermost first."""
    from tvm import relax

    for op in reversed(chain):
        if _op_name(op) == "relax.reshape":
            x = relax.op.reshape(x, op.args[1])
        else:
            x = relax.op.permute_dims(x, op.attrs.axes)
    return x
