"""merge-siblings: ops that multiply the same input by different weights become one wider op and a split.

BERT's Q, K and V projections::

    %q = aten.linear.default(%x, %wq, %bq)
    %k = aten.linear.default(%x, %wk, %bk)
    %v = aten.linear.default(%x, %wv, %bv)
become
    %merged = aten.linear.default(%x, %wq_merged, %bq_merged)     # weights concatenated: [3*out, in]
    %split = aten.split_with_sizes.default(%merged, [out, out, out], -1)
    %q = getitem(%split, 0)  ...

This is not a local rewrite, so it is a plain pass driven by a handler table
keyed by op (validated at import): ``aten.linear`` (weight ``[out, in]``),
``aten.addmm`` (GPT-2's Conv1D, weight ``[in, out]``, beta = alpha = 1) and
``aten.matmul`` by a 2-D weight. Siblings must read the same input node, have
weights (and biases, all or none) that are get_attr nodes of one dtype and
input width. The outputs are the same numbers (one GEMM computes each output
element exactly as before in the shapes measured; see the tests), but they
are now strided slices of the merged result: a group is merged only if every
op downstream still runs on that layout (e.g. a ``view`` that would need
contiguous memory blocks it).
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.passes.fusion.common import is_weight, layout_change_is_safe, static_shape, tensor_info_of, \
    with_arguments
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.infra.pattern import node_argument
from fxopt.passes.infra.registry import register_pass

aten = torch.ops.aten


@dataclass(frozen=True)
class SiblingKind:
    """Where one kind of op keeps its input, weight and bias, and which weight dim holds its outputs."""

    input_index: int
    weight_index: int
    bias_index: Optional[int]
    out_dim: int
    literals: Dict[str, object] = field(default_factory=dict)  # arguments that must hold these values


SIBLING_KINDS: Dict[object, SiblingKind] = {
    aten.linear.default: SiblingKind(input_index=0, weight_index=1, bias_index=2, out_dim=0),
    aten.addmm.default: SiblingKind(input_index=1, weight_index=2, bias_index=0, out_dim=1,
                                    literals={"beta": 1, "alpha": 1}),
    aten.matmul.default: SiblingKind(input_index=0, weight_index=1, bias_index=None, out_dim=1),
}


def _validate_handlers(table: Dict[object, SiblingKind]) -> None:
    for target, kind in table.items():
        names = [a.name for a in target._schema.arguments]
        indices = [kind.input_index, kind.weight_index] + ([kind.bias_index] if kind.bias_index is not None else [])
        if max(indices) >= len(names) or kind.out_dim not in (0, 1) or not set(kind.literals) <= set(names):
            raise AssertionError(f"merge-siblings: handler for {target} does not fit its schema {target._schema}")


_validate_handlers(SIBLING_KINDS)


# ------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Sibling:
    node: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]


def as_sibling(node: fx.Node, kind: SiblingKind) -> Optional[Sibling]:
    """The node's weight and bias when it may join a merge, else None."""
    weight = node_argument(node, kind.weight_index)[1]
    bias = node_argument(node, kind.bias_index)[1] if kind.bias_index is not None else None
    shape = static_shape(weight) if is_weight(weight) else None
    if shape is None or len(shape) != 2 or static_shape(node) is None:
        return None
    if bias is not None and not (is_weight(bias) and static_shape(bias) == (shape[kind.out_dim],)):
        return None
    if any(node_argument(node, name)[1] != value for name, value in kind.literals.items()):
        return None
    return Sibling(node, weight, bias)


def sibling_groups(graph: Graph, min_siblings: int) -> List[Tuple[SiblingKind, List[Sibling]]]:
    """Candidates grouped by (op, input, with bias, weight dtype, input width), in graph order."""
    groups: Dict[tuple, List[Sibling]] = defaultdict(list)
    for node in graph.fx_graph.nodes:
        kind = SIBLING_KINDS.get(node.target) if node.op == "call_function" else None
        sibling = as_sibling(node, kind) if kind is not None else None
        if sibling is None:
            continue
        weight = tensor_info_of(sibling.weight)
        key = (node.target, node_argument(node, kind.input_index)[1], sibling.bias is None, weight.dtype,
               weight.shape[1 - kind.out_dim])
        groups[key].append(sibling)
    return [(SIBLING_KINDS[key[0]], members) for key, members in groups.items() if len(members) >= min_siblings]


# ------------------------------------------------------------------ merge
def merge_group(graph: Graph, kind: SiblingKind, members: List[Sibling]) -> bool:
    """Replace ``members`` by one wider op and a split; False (graph unchanged) if a user needs the old layout."""
    rw = Rewriter(graph, members[0].node)
    weights = [graph.param(m.weight) for m in members]
    changes = {kind.weight_index: rw.param(f"{members[0].weight.target}_merged", torch.cat(weights, kind.out_dim))}
    if members[0].bias is not None:
        biases = torch.cat([graph.param(m.bias) for m in members])
        changes[kind.bias_index] = rw.param(f"{members[0].bias.target}_merged", biases)
    args, kwargs = with_arguments(members[0].node, changes)
    merged = rw.call(members[0].node.target, *args, **kwargs)
    sizes = [w.shape[kind.out_dim] for w in weights]
    parts = rw.call(aten.split_with_sizes.default, merged, sizes, -1)
    outputs = [rw.call(operator.getitem, parts, i) for i in range(len(members))]
    if not all(layout_change_is_safe(graph, m.node, out.meta["val"]) for m, out in zip(members, outputs)):
        rw.erase_dead(rw.inserted)
        return False
    for member, out in zip(members, outputs):
        rw.replace(member.node, out)
    rw.erase_dead([m.node for m in members])
    return True


@register_pass
@dataclass(frozen=True)
class MergeSiblings(Pass):
    """``min_siblings``: the smallest group worth merging (at least 2)."""

    name = "merge-siblings"
    summary = "linear/addmm/matmul ops sharing an input -> one wider op + split (e.g. BERT's Q/K/V)"
    min_siblings: int = 2

    def __post_init__(self):
        if self.min_siblings < 2:
            raise self.error(f"min-siblings={self.min_siblings} would merge single ops", hint="use 2 or more")

    def run(self, graph: Graph) -> PassResult:
        merged, blocked = [], 0
        for kind, members in sibling_groups(graph, self.min_siblings):
            if merge_group(graph, kind, members):
                merged.append(len(members))
            else:
                blocked += 1
        if merged or blocked:
            graph.remove_unused_params()
        if merged:
            graph.refresh_meta()  # the users of the slices now see strided values
        stats = {"groups": len(merged), "merged": sum(merged), "blocked_by_layout": blocked}
        return PassResult(graph, bool(merged), stats)
