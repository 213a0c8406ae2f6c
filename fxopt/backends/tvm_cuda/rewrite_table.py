"""Relax rewrite tables: rows of a ``tvm.relax.dpl`` pattern and a builder, applied by TVM's pattern rewriter.

The Relax counterpart of the fx passes' declarative patterns
(:mod:`fxopt.passes.infra.pattern`)::

    lhs, rhs = wildcard(), wildcard()
    product = is_op("relax.matmul")(lhs, rhs)
    RelaxRewrite("cublaslt-gemm", is_op("relax.astype")(product), offload_gemm,
                 captures={"lhs": lhs, "rhs": rhs, "product": product})

    def offload_gemm(expr, facts, lhs, rhs, product):   # -> the replacement of ``expr``, or None to decline
        ...

``expr`` is the matched call (the pattern's root, its arguments variables),
the captures are the variables the named sub-patterns matched (None where an
alternative ``|`` left one unmatched; a parameter or constant as itself), and
``facts`` is a :class:`~fxopt.backends.tvm_cuda.relax_exprs.FunctionFacts` of
the function as the round began. :func:`apply_table` applies every row at once
(``PatternMatchingRewriter``, rows joined with ``|``) in rounds until no row
fires; within a round a place waits while its pattern reads another place a row
rewrites, so each rewrite sees its inputs already rewritten, as in binding
order (see :func:`_one_round`). Builders must be pure: a round calls them once
to find the places, once to rewrite. A row that declines leaves ``expr`` as it was.
"""
from __future__ import annotations

import functools
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from fxopt.backends.tvm_cuda.relax_exprs import FunctionFacts
from fxopt.errors import LoweringError
from fxopt.passes.infra.driver import kept_firing

#: rounds before a table that keeps firing is an error (a 2-layer model needs about 6, BERT-base about 30)
MAX_ROUNDS = 200
#: how many bindings deep a row's pattern looks through the arguments of the call it matches
LOOK_THROUGH = 4


@dataclass(frozen=True)
class RelaxRewrite:
    """One row: where ``pattern`` matches, ``build(expr, facts, **captures)`` returns the replacement or None."""

    name: str
    pattern: object  # a tvm.relax.dpl.DFPattern whose root is the call replaced
    build: Callable[..., Optional[object]]
    captures: Mapping[str, object] = field(default_factory=dict)  # capture name -> sub-pattern of ``pattern``


def apply_table(func, table: Sequence[RelaxRewrite], max_rounds: int = MAX_ROUNDS) -> Tuple[object, Counter]:
    """``func`` with the rows of ``table`` applied until none fires, and how many times each row fired (by name)."""
    from tvm import relax

    fired: Counter = Counter()
    history: List[Counter] = []
    for _ in range(max_rounds):
        func, this_round = _one_round(func, table)
        if not this_round:
            return func, fired
        fired += this_round
        history.append(this_round)
        func = relax.analysis.remove_all_unused(func)
    raise _not_converged(table, history)


def _one_round(func, table: Sequence[RelaxRewrite]) -> Tuple[object, Counter]:
    """One round: find where rows would fire, then rewrite those that read no other such place.

    TVM's rewriter matches against the bindings as they were before its pass, and visits them in
    an order of its own. So a round first asks every row where it would fire (builders are pure),
    then rewrites only the places whose pattern reads (within :data:`LOOK_THROUGH` bindings) no
    other such place: every rewrite sees its inputs final, as if the function were rewritten in
    binding order, and a chain (each LayerNorm reading the previous one's output) takes a round a link.
    """
    from tvm.relax.dpl import PatternMatchingRewriter

    facts = FunctionFacts.of(func)
    probe = _Round(facts, ready=None)
    _apply(func, table, probe, PatternMatchingRewriter)
    places = set(probe.cones)
    ready = {var for var, cone in probe.cones.items() if not (cone & (places - {var}))}
    if not ready:
        return func, Counter()
    state = _Round(facts, ready)
    return _apply(func, table, state, PatternMatchingRewriter), state.fired


def _apply(func, table, state: "_Round", rewriter_class):
    rewriters = [rewriter_class.from_pattern(row.pattern, state.rewriter(row)) for row in table]
    rewritten = functools.reduce(operator.or_, rewriters)(func)
    if state.failures:  # raised here, not through TVM's FFI, which would turn them into a bare RuntimeError
        raise state.failures[0]
    return rewritten


class _Round:
    """One pass of a round: the facts it began with, which places may change (None: only probe), what fired."""

    def __init__(self, facts: FunctionFacts, ready: Optional[set]):
        self.facts, self.ready = facts, ready
        self.cones: Dict = {}  # place (the variable of a call a row would rewrite) -> the variables its pattern reads
        self.fired: Counter = Counter()
        self.failures: List[Exception] = []

    def rewriter(self, row: RelaxRewrite):
        def rewrite(expr, matched):
            place = self.facts.var_of(expr)
            if self.failures or place is None or (self.ready is not None and place not in self.ready):
                return expr  # a call this round made (TVM offers its own output again) waits for the next round
            captures = {name: self.facts.as_var(matched[p]) if p in matched else None
                        for name, p in row.captures.items()}
            try:
                replacement = row.build(expr, self.facts, **captures)
            except Exception as exc:
                self.failures.append(_as_lowering_error(exc, row, expr))
                return expr
            if replacement is None:
                return expr
            if self.ready is None:
                self.cones[place] = self.cone(expr)
                return expr
            self.fired[row.name] += 1
            return replacement

        return rewrite

    def cone(self, expr, depth: int = LOOK_THROUGH) -> set:
        """The variables ``expr`` reads, and those their values read, ``depth`` bindings deep."""
        from tvm import relax

        found = set()
        for var in relax.analysis.free_vars(expr):
            found.add(var)
            value = self.facts.values.get(var)
            if depth > 1 and value is not None:
                found |= self.cone(value, depth - 1)
        return found


def _not_converged(table: Sequence[RelaxRewrite], history: List[Counter]) -> LoweringError:
    names = kept_firing(history)
    return LoweringError(
        f"tvm-cuda: the Relax rewrite table ({', '.join(row.name for row in table)}) did not converge after "
        f"{len(history)} rounds; rows that kept firing in the last rounds: {names}; a row's replacement "
        "probably matches a row again"
    )


def _as_lowering_error(exc: Exception, row: RelaxRewrite, expr) -> LoweringError:
    if isinstance(exc, LoweringError):
        return exc
    error = LoweringError(f"tvm-cuda: Relax rewrite {row.name} failed on {_describe(expr)}: {type(exc).__name__}: "
                          f"{exc}; this is a bug in fxopt's rewrite table, please report it with the model")
    error.__cause__ = exc
    return error


def _describe(expr) -> str:
    op = getattr(getattr(expr, "op", None), "name", None)
    return f"a call of {op}" if op else type(expr).__name__


def each_function(mod, rewrite: Callable):
    """``rewrite`` applied to every Relax function of ``mod`` (in place); returns ``mod``."""
    from tvm import relax

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gvar] = rewrite(func)
    return mod


def matches_by_row(func, table: Sequence[RelaxRewrite]) -> Dict[str, int]:
    """How many times each row of ``table`` fires on ``func`` (for tests and reports)."""
    return dict(apply_table(func, table)[1])
