"""Drop the copies the import and the rewrites leave around fxopt's kernels, exactly (a Relax rewrite table):

- ``permute_dims(permute_dims(x, p), q)`` becomes one permutation, or ``x``;
- ``astype(x, t)`` with ``x`` already ``t`` becomes ``x``;
- ``astype(layout ops(astype(x16, float32)), float16)`` becomes ``layout ops(x16)``
  (fp16 -> fp32 -> fp16 is lossless, and reshapes and permutations commute with casts).
"""
from __future__ import annotations

from typing import List

from fxopt.backends.tvm_cuda.extension_calls import HALF_DTYPES
from fxopt.backends.tvm_cuda.relax_exprs import dtype_of, op_name
from fxopt.backends.tvm_cuda.rewrite_table import RelaxRewrite, apply_table

LAYOUT_OPS = ("relax.reshape", "relax.permute_dims")


def layout_glue_table() -> List[RelaxRewrite]:
    from tvm.relax.dpl import is_op, wildcard

    x, inner = wildcard(), wildcard()
    first = is_op("relax.permute_dims")(inner)
    return [
        RelaxRewrite("cast", is_op("relax.astype")(x), simplify_cast, {"x": x}),
        RelaxRewrite("permute-twice", is_op("relax.permute_dims")(first), compose_permutations,
                     {"first": first, "inner": inner}),
    ]


def simplify_layout_glue(func, rounds: int = 4):
    """``func`` with :func:`layout_glue_table` applied until nothing changes (at most ``rounds`` times)."""
    from tvm import relax

    for _ in range(rounds):
        simpler, fired = apply_table(func, layout_glue_table())
        if not fired:
            break
        func = relax.analysis.remove_all_unused(simpler)
    return func


def simplify_cast(expr, facts, x):
    """``x`` for a cast to its own dtype; ``layout ops(x16)`` for a 16-bit round trip; else None."""
    target = str(expr.attrs.dtype)
    if dtype_of(x) == target:
        return x
    chain, inner = [], value_of(x, facts.values)
    while op_name(inner) in LAYOUT_OPS:
        chain.append(inner)
        inner = value_of(inner.args[0], facts.values)
    if op_name(inner) != "relax.astype" or dtype_of(inner) != "float32" or dtype_of(inner.args[0]) != target or \
            target not in HALF_DTYPES:
        return None
    return _replay(inner.args[0], chain)


def compose_permutations(expr, facts, first, inner):
    """``permute_dims(first = permute_dims(inner, p), q)`` as one permutation of ``inner``, or ``inner`` itself."""
    from tvm import relax

    first = facts.values[first]
    if expr.attrs.axes is None or first.attrs.axes is None:
        return None
    p, q = [int(a) for a in first.attrs.axes], [int(a) for a in expr.attrs.axes]
    composed = [p[i] for i in q]
    if composed == list(range(len(composed))):
        return inner
    return relax.op.permute_dims(inner, composed)


def value_of(expr, values):
    """What a variable is bound to, looking through ``TupleGetItem`` of a bound tuple; else ``expr``."""
    from tvm import relax

    value = values.get(expr, expr) if isinstance(expr, relax.Var) else expr
    if isinstance(value, relax.TupleGetItem):
        whole = values.get(value.tuple_value, value.tuple_value)
        if isinstance(whole, relax.Tuple):
            return value_of(whole.fields[value.index], values)
    return value


def _replay(x, chain):
    """Apply the layout ops of ``chain`` (outermost first) to ``x``, innermost first."""
    from tvm import relax

    for op in reversed(chain):
        if op_name(op) == "relax.reshape":
            x = relax.op.reshape(x, op.args[1])
        else:
            x = relax.op.permute_dims(x, op.attrs.axes)
    return x
