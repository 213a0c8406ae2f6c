"""Axis terms: what each axis of each tensor is made of, found by unification.

Every axis of every tensor in the graph gets a *term*:

- an ``Atom``: an indivisible axis class of a given size (e.g. "the 4 attention heads of layer 0");
- a ``Prod`` of terms: a row-major product, e.g. a linear's 32 outputs viewed as 4 heads x 8 dims
  are ``Prod(heads, head_dim)``;
- a ``Cat`` of terms: a concatenation, e.g. GPT-2's fused qkv output is ``Cat(q, k, v)``.

Ops relate the axes of their inputs and outputs by *unifying* terms (Hindley-Milner style, with a
union-find over atoms). An atom unified with a product or concatenation is refined into it, and
two products of different factorizations are split until their factors line up; a split that is
impossible (an axis both concatenated and reshaped across the pieces) fails, and the caller
blocks every atom involved. Afterwards each atom is a group of coupled dims: pruning unit ``u`` of
an atom removes, in every axis whose term mentions the atom, the positions whose index along that
atom is ``u`` (:func:`unit_of`, :func:`kept_mask`).

Size-1 factors and size-0 parts carry no positions and are dropped when a term is flattened.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch

_ids = itertools.count()


class Atom:
    """An axis class: a union-find node; its root may be bound to a Prod or Cat it was refined into."""

    __slots__ = ("id", "size", "parent", "binding")

    def __init__(self, size: int):
        self.id = next(_ids)
        self.size = size
        self.parent: Optional[Atom] = None
        self.binding: Optional[Term] = None

    def __repr__(self) -> str:
        return f"a{self.id}({self.size})"


@dataclass(frozen=True, eq=False)
class Prod:
    factors: Tuple["Term", ...]


@dataclass(frozen=True, eq=False)
class Cat:
    parts: Tuple["Term", ...]


Term = Union[Atom, Prod, Cat]


def find(atom: Atom) -> Atom:
    root = atom
    while root.parent is not None:
        root = root.parent
    while atom.parent is not None:  # path compression
        atom.parent, atom = root, atom.parent
    return root


def resolve(term: Term) -> Term:
    """An unbound root atom, or the Prod/Cat the term stands for."""
    while isinstance(term, Atom):
        root = find(term)
        if root.binding is None:
            return root
        term = root.binding
    return term


def size(term: Term) -> int:
    term = resolve(term)
    if isinstance(term, Atom):
        return term.size
    if isinstance(term, Prod):
        total = 1
        for f in term.factors:
            total *= size(f)
        return total
    return sum(size(p) for p in term.parts)


def factors(term: Term) -> List[Term]:
    """The term as a flat row-major product (size-1 factors dropped)."""
    term = resolve(term)
    if isinstance(term, Prod):
        return [f for sub in term.factors for f in factors(sub)]
    return [term] if size(term) != 1 else []


def parts(term: Term) -> List[Term]:
    """The term as a flat concatenation (size-0 parts dropped)."""
    term = resolve(term)
    if isinstance(term, Cat):
        return [p for sub in term.parts for p in parts(sub)]
    return [term] if size(term) != 0 else []


def atoms(term: Term) -> List[Atom]:
    """The unbound root atoms a term is made of, in order, each once."""
    term = resolve(term)
    if isinstance(term, Atom):
        return [term]
    children = term.factors if isinstance(term, Prod) else term.parts
    return list(dict.fromkeys(a for c in children for a in atoms(c)))


def product(terms) -> Term:
    terms = tuple(terms)
    return terms[0] if len(terms) == 1 else Prod(terms)


# --------------------------------------------------------------- unification
def simplify(term: Term) -> Term:
    """``resolve``, and a product of one factor (or concatenation of one part) is that factor."""
    term = resolve(term)
    if isinstance(term, Prod) and len(factors(term)) == 1:
        return simplify(factors(term)[0])
    if isinstance(term, Cat) and len(parts(term)) == 1:
        return simplify(parts(term)[0])
    return term


def unify(a: Term, b: Term) -> bool:
    """Make ``a`` and ``b`` the same axis. False when that is impossible (the caller blocks both)."""
    ra, rb = simplify(a), simplify(b)
    if ra is rb:
        return True
    if size(ra) != size(rb):
        return False
    if size(ra) <= 1 and not (isinstance(ra, Atom) and isinstance(rb, Atom)):
        return True  # nothing to couple: no positions, or one position that is never pruned
    if isinstance(ra, Atom) and isinstance(rb, Atom):
        ra.parent = rb
        return True
    if isinstance(ra, Atom) or isinstance(rb, Atom):
        atom, other = (ra, rb) if isinstance(ra, Atom) else (rb, ra)
        if any(x is atom for x in atoms(other)):
            return False
        atom.binding = other
        return True
    fa, fb = factors(ra), factors(rb)
    if len(fa) > 1 or len(fb) > 1:
        return _unify_lists(fa, fb, _split_product)
    return _unify_lists(parts(ra), parts(rb), _split_concat)


def _unify_lists(xs: List[Term], ys: List[Term], split) -> bool:
    xs, ys = list(xs), list(ys)
    while xs and ys:
        sx, sy = size(xs[0]), size(ys[0])
        if sx == sy:
            if not unify(xs.pop(0), ys.pop(0)):
                return False
            continue
        small, big = (xs, ys) if sx < sy else (ys, xs)
        pieces = split(big[0], size(small[0]))
        if pieces is None:
            return False
        big[0:1] = pieces
    return not xs and not ys


def _split_product(term: Term, first: int) -> Optional[List[Term]]:
    """Refine an atom of size ``n`` into ``Prod(first, n / first)``."""
    term = resolve(term)
    if not isinstance(term, Atom) or term.size % first:
        return None
    pieces = [Atom(first), Atom(term.size // first)]
    term.binding = Prod(tuple(pieces))
    return pieces


def _split_concat(term: Term, first: int) -> Optional[List[Term]]:
    """Refine an atom of size ``n`` into ``Cat(first, n - first)``."""
    term = resolve(term)
    if not isinstance(term, Atom) or not 0 < first < term.size:
        return None
    pieces = [Atom(first), Atom(term.size - first)]
    term.binding = Cat(tuple(pieces))
    return pieces


# ------------------------------------------------------------------ positions
def unit_of(term: Term, atom: Atom) -> Optional[torch.Tensor]:
    """For each position of an axis with this term, its index along ``atom`` (-1 where the atom is absent).

    None when the term does not mention the atom at all.
    """
    atom = find(atom)
    if not any(a is atom for a in atoms(term)):
        return None
    return _unit_of(term, atom)


def _unit_of(term: Term, atom: Atom) -> torch.Tensor:
    term = resolve(term)
    if isinstance(term, Atom):
        n = term.size
        return torch.arange(n) if term is atom else torch.full((n,), -1, dtype=torch.long)
    if isinstance(term, Cat):
        return torch.cat([_unit_of(p, atom) for p in parts(term)])
    fs = factors(term)
    sizes = [size(f) for f in fs]
    result = torch.full(sizes, -1, dtype=torch.long)
    for i, f in enumerate(fs):
        inner = _unit_of(f, atom)
        if (inner >= 0).any():
            shape = [1] * len(fs)
            shape[i] = sizes[i]
            result = torch.where(result < 0, inner.view(shape).expand(sizes), result)
    return result.reshape(-1)


def kept_mask(term: Term, kept: Dict[Atom, torch.Tensor]) -> Optional[torch.Tensor]:
    """Which positions of an axis survive when each atom keeps only ``kept[atom]``; None when all do."""
    mask = None
    for atom, units in kept.items():
        index = unit_of(term, atom)
        if index is None:
            continue
        keep = (index < 0) | torch.isin(index, units)
        mask = keep if mask is None else mask & keep
    if mask is None or bool(mask.all()):
        return None
    return mask


def kept_size(term: Term, kept: Dict[Atom, torch.Tensor]) -> int:
    """The size of an axis once each atom keeps only ``kept[atom]`` (arithmetic; nothing is materialized)."""
    term = resolve(term)
    if isinstance(term, Atom):
        return len(kept[term]) if term in kept else term.size
    if isinstance(term, Prod):
        total = 1
        for f in term.factors:
            total *= kept_size(f, kept)
        return total
    return sum(kept_size(p, kept) for p in term.parts)


def describe(term: Term, names: Dict[Atom, str]) -> str:
    """``heads(4)x8``-style text for a term; atoms without a name show their size."""
    term = resolve(term)
    if isinstance(term, Atom):
        return f"{names[term]}({term.size})" if term in names else str(term.size)
    if isinstance(term, Prod):
        return "x".join(describe(f, names) for f in factors(term)) or "1"
    return "[" + "+".join(describe(p, names) for p in parts(term)) + "]"
