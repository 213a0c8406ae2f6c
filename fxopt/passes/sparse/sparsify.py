"""sparsify: magnitude pruning of linear weights, stored as CSR where that is measurably faster.

    sparsify{sparsity=0.9}                  each linear weight loses its 90% smallest magnitudes
    sparsify{sparsity=0.9,scope=global}     one magnitude threshold over all the linear weights
    sparsify{sparsity=0.9,format=csr}       every aten.linear becomes fxopt.csr_linear, however dense
    sparsify{pattern=2:4}                   keep the 2 largest of every 4 consecutive input weights

Unstructured pruning (the default, ``sparsity`` 0.5) then turns each
``aten.linear`` whose pruned weight is sparse enough for CSR to beat the dense
product (the crossover measured on this machine, see
:mod:`fxopt.passes.sparse.csr`) into

    %y = fxopt.csr_linear(%x, %crow, %col, %values, out_features, in_features, %bias)

with the three CSR arrays as new weights. Every other pruned linear keeps a
dense weight with zeros. ``format=csr`` or ``format=dense`` overrides the
choice for all of them.

``pattern=N:M`` keeps, along each row of the weight (the input dim), the N
largest magnitudes of every M consecutive weights: the layout of sparse tensor
cores (2:4). Those weights stay dense with zeros. A weight whose input dim is
not a multiple of M is left as it is and counted in ``stats["skipped"]``.

Targets are ``aten.linear`` and ``fxopt.linear_act`` (fuse-epilogue's fused
linear) reading a floating-point 2-D ``get_attr`` weight. ``linear_act``
weights are pruned but stay dense: CSR would undo the fused epilogue. A weight
shared by several linears is pruned once; biases are never pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.ir.ops import fxopt_ops
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.driver import Rewriter
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.quantize.calibrate import is_weight, linear_targets
from fxopt.passes.sparse import magnitude
from fxopt.passes.sparse.csr import csr_is_faster, density, rows_per_call, to_csr

aten = torch.ops.aten
DEFAULT_SPARSITY = 0.5
UNSTRUCTURED = "unstructured"
PATTERN_HINT = "write pattern=unstructured, or pattern=N:M (keep N of every M consecutive weights, 0 < N < M), e.g. 2:4"


@register_pass
@dataclass(frozen=True)
class Sparsify(Pass):
    name = "sparsify"
    summary = "magnitude-prune linear weights (unstructured or N:M); CSR sparse linears where measured faster"
    lossy = True
    sparsity: Optional[float] = None
    scope: Literal["layer", "global"] = "layer"
    pattern: str = UNSTRUCTURED
    format: Literal["auto", "csr", "dense"] = "auto"

    def __post_init__(self):
        self.check_choices("scope", (self.scope,), ("layer", "global"), "scopes")
        self.check_choices("format", (self.format,), ("auto", "csr", "dense"), "formats")
        if self.pattern != UNSTRUCTURED:
            self._check_nm_options()
        elif self.sparsity is not None and not (math.isfinite(self.sparsity) and 0 <= self.sparsity < 1):
            raise self.error(f"option sparsity={self.sparsity} is outside [0, 1)",
                             hint="give the fraction of weights to zero, e.g. sparsity=0.9")

    def _check_nm_options(self) -> None:
        try:
            magnitude.parse_nm(self.pattern)
        except ValueError as exc:
            raise self.error(f"option {exc}", hint=PATTERN_HINT) from None
        for option, value, default in (("sparsity", self.sparsity, None), ("scope", self.scope, "layer")):
            if value != default:
                raise self.error(f"option {option}={value} does not apply to pattern={self.pattern}",
                                 hint=f"N:M keeps N of every M weights in each layer; drop {option}")
        if self.format == "csr":
            raise self.error(f"option format=csr does not apply to pattern={self.pattern}",
                             hint="N:M weights stay dense with zeros for sparse tensor cores; use pattern=unstructured")

    # ------------------------------------------------------------------ run
    def run(self, graph: Graph) -> PassResult:
        users = linears_by_weight(graph)
        weights = list(users)
        masks = self._masks([graph.param(w) for w in weights])
        counts = {"csr": 0, "dense": 0, "skipped": 0}
        zeros = total = 0
        for weight, mask in zip(weights, masks):
            if mask is None:
                counts["skipped"] += 1
                continue
            pruned = graph.param(weight).detach().masked_fill(~mask, 0)
            zeros, total = zeros + int((pruned == 0).sum()), total + pruned.numel()
            for kind in self._rewrite_users(graph, weight, pruned, bool(mask.all()), users[weight]):
                counts[kind] += 1
        modified = counts["csr"] + counts["dense"] > 0
        if modified:  # an unmodified graph is not recompiled, so its code must keep every get_attr
            graph.remove_unused_params()
        stats = {"pattern": self.pattern, "layers": len(weights) - counts["skipped"], **counts,
                 "sparsity": zeros / total if total else 0.0}
        if self.pattern == UNSTRUCTURED:
            stats["scope"] = self.scope
        return PassResult(graph, modified, stats)

    def _masks(self, tensors: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """A keep-mask per weight; None where the pattern cannot apply (N:M on a width not a multiple of M)."""
        if self.pattern != UNSTRUCTURED:
            n, m = magnitude.parse_nm(self.pattern)
            return [magnitude.nm_mask(t, n, m) if t.shape[1] % m == 0 else None for t in tensors]
        sparsity = DEFAULT_SPARSITY if self.sparsity is None else self.sparsity
        if self.scope == "global":
            return magnitude.global_masks(tensors, sparsity)
        return magnitude.layer_masks(tensors, sparsity)

    def _rewrite_users(self, graph: Graph, weight: fx.Node, pruned: torch.Tensor, unchanged: bool,
                       linears: List[fx.Node]) -> List[str]:
        """Point each linear at the pruned weight, dense or as CSR; returns the format chosen for each."""
        dense_node, csr_nodes, kinds = None, None, []
        pruned_density = density(pruned)
        for node in linears:
            if self._wants_csr(node, pruned_density):
                if csr_nodes is None:
                    csr_nodes = [graph.add_param(f"{weight.target}_csr_{part}", t)
                                 for part, t in zip(("crow", "col", "values"), to_csr(pruned))]
                to_csr_linear(graph, node, csr_nodes, tuple(pruned.shape))
                kinds.append("csr")
            elif not unchanged:
                if dense_node is None:
                    dense_node = graph.add_param(f"{weight.target}_pruned", pruned)
                node.replace_input_with(weight, dense_node)
                kinds.append("dense")
        return kinds

    def _wants_csr(self, node: fx.Node, weight_density: float) -> bool:
        if self.pattern != UNSTRUCTURED or node.target != aten.linear.default or self.format == "dense":
            return False
        return self.format == "csr" or csr_is_faster(weight_density, rows_per_call(node.args[0]))


def linears_by_weight(graph: Graph) -> Dict[fx.Node, List[fx.Node]]:
    """Each floating-point 2-D get_attr weight read by a linear, with the linears that read it."""
    users: Dict[fx.Node, List[fx.Node]] = {}
    for node in graph.call_nodes():
        if node.target not in linear_targets() or len(node.args) < 2 or not is_weight(node.args[1]):
            continue
        tensor = graph.param(node.args[1])
        if tensor.is_floating_point() and tensor.dim() == 2:
            users.setdefault(node.args[1], []).append(node)
    return users


def to_csr_linear(graph: Graph, node: fx.Node, csr_nodes: List[fx.Node], shape: Tuple[int, int]) -> fx.Node:
    """Replace ``aten.linear(x, w, bias)`` by ``fxopt.csr_linear(x, crow, col, values, out, in, bias)``."""
    x = node.args[0]
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    rw = Rewriter(graph, node)
    new = rw.call(fxopt_ops().csr_linear.default, x, *csr_nodes, shape[0], shape[1], bias)
    rw.replace(node, new)
    rw.erase_dead([node])
    return new
