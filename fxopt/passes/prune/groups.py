"""Groups of coupled dims: what must be pruned together, found by the axis analysis.

    >>> print(fxopt.prune.groups(graph))          # a 2-layer BERT, hidden 32, 4 heads of 8
    #0 hidden:encoder.layer.0.attention.output.dense  32 units, 724 params each, fixed: it is a graph output
        other embeddings.word_embeddings.weight[1]                  #0(32)
        ...
    #1 heads:encoder.layer.0.attention.self.query  4 units, 1,048 params each, prunable
        out   encoder.layer.0.attention.self.query.weight[0]    #1(4)x#2(8)
        out   encoder.layer.0.attention.self.query.bias[0]      #1(4)x#2(8)
        ...
        out   encoder.layer.0.attention.self.value.weight[0]    #1(4)x#3(8)
        in    encoder.layer.0.attention.output.dense.weight[1]  #1(4)x#3(8)
    #2 head-dim:encoder.layer.0.attention.self.query  8 units, 264 params each, prunable

Each member is a weight axis and its term: ``#1(4)x#2(8)`` is 4 units of group #1 (heads) times 8 of
group #2 (the query/key dims of a head), row-major.

A group is an atom of the analysis (``terms.py``) that some weight axis mentions. Its units are
pruned together in every weight axis whose term mentions it: a residual stream couples every
block's output features, LayerNorm, embeddings and the graph output; a head couples the q, k and v
output rows and the output projection's input columns (GQA: a key/value head and the query heads
that read it); a depthwise conv couples its input and output channels.

Kinds, from the roles the ops gave the group (``ops_compute.py``): ``channels`` (conv channels),
``heads`` (an attention matmul's head axis; with GQA, the key/value heads), ``query-heads`` (GQA: the
query heads sharing one key/value head), ``head-dim`` (the dims inside a head), ``hidden`` (a
residual stream or normalized features), ``ffn`` (the neurons between two linears), ``other``.
A group is prunable when nothing blocks it (a graph input or output, an unknown op, ...) and some
weight produces it (has it in an ``out`` axis).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from fxopt.ir.graph import Graph
from fxopt.passes.prune import terms as T
from fxopt.passes.prune.analysis import Analysis, analyse

KINDS = ("heads", "query-heads", "ffn", "channels", "hidden", "head-dim", "other")


@dataclass(frozen=True)
class Member:
    """One weight axis a group slices: ``target`` (get_attr), ``axis``, its term and its role."""

    target: str
    axis: int
    term: T.Term
    role: str  # "out" (produces the units), "in" (consumes them), "other" (norm weights, BN statistics, ...)
    numel: int


@dataclass(eq=False)
class Group:
    name: str
    kind: str
    atom: T.Atom
    index: int
    members: List[Member]
    blocked: List[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        return self.atom.size

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.units > 1 and any(m.role == "out" for m in self.members)

    def params_per_unit(self) -> int:
        """Weights removed with each unit (exact unless one weight has two axes in the group)."""
        return sum(m.numel // self.units for m in self.members)

    def status(self) -> str:
        if self.prunable:
            return "prunable"
        if self.blocked:
            return "fixed: " + "; ".join(self.blocked)
        return "fixed: no weight produces it" if self.units > 1 else "fixed: a single unit"

    def describe(self, names: Dict[T.Atom, str]) -> str:
        head = f"#{self.index} {self.name}  {self.units} units, {self.params_per_unit():,} params each, {self.status()}"
        width = max((len(f"{m.target}[{m.axis}]") for m in self.members), default=0)
        rows = [f"    {m.role:<5} {f'{m.target}[{m.axis}]':<{width}}  {T.describe(m.term, names)}"
                for m in self.members]
        return "\n".join([head, *rows])

    def __repr__(self) -> str:
        return f"<Group {self.name}: {self.units} units, {'prunable' if self.prunable else 'fixed'}>"


class Groups(list):
    """The groups of a graph, printable as the readable listing shown in the module docstring."""

    def __str__(self) -> str:
        names = {g.atom: f"#{g.index}" for g in self}
        return "\n".join(g.describe(names) for g in self)

    def by_name(self, name: str) -> Group:
        for g in self:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups: {', '.join(g.name for g in self)}")


def groups(graph: Graph) -> Groups:
    """Every group of coupled dims in ``graph`` (prunable or not), in graph order."""
    return find_groups(graph)[1]


def find_groups(graph: Graph) -> Tuple[Analysis, Groups]:
    an = analyse(graph)
    reasons, roles = an.atom_reasons(), an.atom_roles()
    members: Dict[T.Atom, List[Member]] = {}
    for target, axes in an.param_axes.items():
        numel = _numel(an, target)
        for axis, term in enumerate(axes or ()):
            role = an.param_roles.get((target, axis), "other")
            for atom in T.atoms(term):
                if atom.size > 1:
                    members.setdefault(atom, []).append(Member(target, axis, term, role, numel))
    found = Groups()
    taken: Dict[str, int] = {}
    heads = {a for a in members if "attention" in roles.get(a, set())}
    for atom, atom_members in members.items():
        if all(m.role == "other" for m in atom_members):
            continue  # kernel taps, vocabulary rows: no weight produces or consumes them as features
        kind = _kind(roles.get(atom, set()))
        if kind == "heads" and _nested_in_heads(atom, atom_members, heads):
            kind = "query-heads"
        name = _unique(f"{kind}:{_source(atom, atom_members)}", taken)
        found.append(Group(name, kind, atom, len(found), atom_members, reasons.get(atom, [])))
    return an, found


def _nested_in_heads(atom: T.Atom, members: List[Member], heads: set) -> bool:
    """GQA: the query heads that share one key/value head appear inside it, ``kv_heads x per_kv x dim``."""
    for m in members:
        fs = T.factors(m.term)
        position = next(i for i, f in enumerate(fs) if atom in T.atoms(f))
        if any(a in heads for f in fs[:position] for a in T.atoms(f)):
            return True
    return False


def _numel(an: Analysis, target: str) -> int:
    total = 1
    for d in an.info(next(n for n in an.graph.nodes if n.op == "get_attr" and n.target == target)).shape:
        total *= d
    return total


def _kind(roles: set) -> str:
    if "conv" in roles:
        return "channels"
    if "attention" in roles:
        return "heads"
    if roles & {"contract", "attn-free"}:
        return "head-dim"
    if "out" not in roles:
        return "other"
    if roles & {"norm", "residual", "embedding"}:
        return "hidden"
    return "ffn"


def _source(atom: T.Atom, members: List[Member]) -> str:
    """The weight that best names a group: one producing it, where it is the outermost, simplest factor."""
    def rank(item):
        position, m = item
        outer = T.factors(m.term)[:1] == [atom] or T.simplify(m.term) is atom
        return (m.role != "out", not outer, len(T.atoms(m.term)), position)

    _, best = min(enumerate(members), key=rank)
    for suffix in (".weight", "_weight"):
        if best.target.endswith(suffix):
            return best.target[: -len(suffix)]
    return best.target


def _unique(name: str, taken: Dict[str, int]) -> str:
    taken[name] = taken.get(name, 0) + 1
    return name if taken[name] == 1 else f"{name}#{taken[name]}"
