"""Reading TVM 0.27 Relax expressions: types, shapes, op names, and what a function binds and reads.

TVM is imported inside the functions, so importing this module never needs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


def type_of(expr):
    """The expression's type (TVM 0.27's name for struct info): shape and dtype, or None where not normalized."""
    return getattr(expr, "ty", None)


def dtype_of(expr) -> Optional[str]:
    dtype = getattr(type_of(expr), "dtype", None)
    return None if dtype is None else str(dtype)  # a DataType: equal to its name, but hashed differently


def static_shape(expr) -> Optional[List[int]]:
    shape = getattr(type_of(expr), "shape", None)
    if shape is None:
        return None
    try:
        return [int(d) for d in shape]
    except (TypeError, ValueError):
        return None


def op_name(expr) -> Optional[str]:
    """``"relax.add"`` for a call of ``R.add``; None for anything else."""
    op = getattr(expr, "op", None)
    return getattr(op, "name", None)


def tvm_float(value: float):
    """A float64 PrimExpr: the extension's packed functions take a C double."""
    import tvm

    return tvm.tirx.FloatImm("float64", value)  # TVM 0.27 (pinned) names the TIR module tirx


@dataclass
class FunctionFacts:
    """What a Relax function binds and reads, taken before a round of a rewrite table.

    ``values``: each bound variable's value; ``readers``: for each variable, the value of
    each binding that reads it (``"output"`` for the function's result); ``counts``: how
    many times each variable is read (``add(x, x)`` reads x twice); ``params``: the
    function's parameters.
    """

    values: Dict
    readers: Dict
    counts: Dict
    params: frozenset
    bound_to: Dict = field(default_factory=dict)  # value -> its variable
    position: Dict = field(default_factory=dict)  # bound variable -> its place in binding order

    def __post_init__(self):
        self.bound_to = {value: var for var, value in self.values.items()}
        self.position = {var: i for i, var in enumerate(self.values)}

    @classmethod
    def of(cls, func) -> "FunctionFacts":
        from tvm import relax

        values: Dict = {}  # in binding order
        readers: Dict = {}
        body = func.body
        for block in getattr(body, "blocks", []):
            for binding in block.bindings:
                values[binding.var] = binding.value
                for var in relax.analysis.free_vars(binding.value):
                    readers.setdefault(var, []).append(binding.value)
        for var in relax.analysis.free_vars(body.body if hasattr(body, "body") else body):
            readers.setdefault(var, []).append("output")
        return cls(values, readers, _read_counts(func), frozenset(func.params))

    def uses(self, var) -> int:
        """How many times ``var`` is read."""
        return self.counts.get(var, 0)

    def reader_kinds(self, var) -> List[str]:
        """The op names (or node kinds: ``TupleGetItem``, ``output``) of the bindings that read ``var``."""
        return [r if isinstance(r, str) else op_name(r) or type(r).__name__ for r in self.readers.get(var, [])]

    def var_of(self, value):
        """The variable ``value`` is bound to, or None (a value a rewrite made, or one not bound)."""
        return self.bound_to.get(value)

    def as_var(self, expr):
        """``expr``'s variable where it is bound, else ``expr`` (a parameter, a constant, a shape)."""
        var = self.var_of(expr)
        return expr if var is None else var

    def bound_before(self, expr, var) -> bool:
        """Whether ``expr`` exists where ``var`` is bound: a parameter, a constant, or bound earlier."""
        where = self.position.get(expr)
        return where is None or where < self.position.get(var, len(self.position))

    def knows(self, var) -> bool:
        """Whether ``var`` existed when these facts were taken (a parameter or a bound variable)."""
        return var in self.values or var in self.params


def _read_counts(func) -> dict:
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
