"""How important each unit of a group is: magnitude, Taylor, and attention-head importance.

Scores are summed over every weight axis the group slices (``groups.Member``), each position
credited to the unit it belongs to (``terms.unit_of``):

- ``l1``: ``sum |w|``; ``l2``: ``sqrt(sum w^2)`` (group magnitude, as in DepGraph / Torch-Pruning);
- ``taylor``: ``sum over batches of (sum over the unit's weights of w * dL/dw)^2``, the first-order
  change of ``L`` when the unit is removed (Molchanov et al., 2019), over all the group's weights;
- ``head``: the same over the weights that *consume* the unit only (an attention output
  projection's input columns, an FFN's down-projection columns). ``sum w * dL/dw`` over those is
  exactly ``dL/dxi`` for a gate ``xi`` multiplying the unit's output: the head importance of Michel
  et al. (2019, "Are Sixteen Heads Really Better than One?").

Without labels, ``L`` is a random projection of the outputs, ``sum(y * r)`` with ``r ~ N(0, 1)``
drawn per batch: the expectation of ``(dL/dxi)^2`` over ``r`` is ``||dy/dxi||^2``, how far the
outputs move when the unit goes. Pass ``loss_fn(outputs) -> scalar`` for a task loss instead.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from fxopt.ir.graph import Graph
from fxopt.passes.prune import terms as T
from fxopt.passes.prune.groups import Group, Member

CRITERIA = ("l1", "l2", "taylor", "head")


def _per_unit(tensor: torch.Tensor, member: Member, group: Group) -> torch.Tensor:
    """Sum ``tensor`` (shaped like the member's weight) into one value per unit of ``group``."""
    unit = T.unit_of(member.term, group.atom)
    rows = tensor.movedim(member.axis, 0).reshape(tensor.shape[member.axis], -1).sum(dim=1)
    valid = unit >= 0
    return torch.zeros(group.units, dtype=rows.dtype).index_add_(0, unit[valid], rows[valid])


def magnitude(graph: Graph, group: Group, power: int) -> torch.Tensor:
    """``l1`` (power 1) or ``l2`` (power 2) norm of each unit over all the group's weights."""
    params = graph.params()
    total = torch.zeros(group.units, dtype=torch.float64)
    for member in group.members:
        total += _per_unit(params[member.target].detach().double().abs().pow(power), member, group)
    return total if power == 1 else total.sqrt()


def gradient_scores(graph: Graph, groups: Sequence[Group], batches: Sequence[tuple], consumers_only: bool,
                    loss_fn: Optional[Callable] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Taylor (``consumers_only=False``) or head importance (``True``) of every unit of ``groups``, by group name."""
    stored = graph.params()
    targets = sorted({m.target for g in groups for m in _members(g, consumers_only, stored)}
                     - graph.batch_norm_statistics())
    params = {t: stored[t].detach().clone().requires_grad_(True) for t in targets}
    scores = {g.name: torch.zeros(g.units, dtype=torch.float64) for g in groups}
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        with torch.enable_grad():
            outputs = torch.func.functional_call(graph.module, params, tuple(batch))
            loss = loss_fn(outputs) if loss_fn is not None else _random_projection(outputs, generator)
            grads = dict(zip(targets, torch.autograd.grad(loss, [params[t] for t in targets], allow_unused=True)))
        for g in groups:
            per_unit = torch.zeros(g.units, dtype=torch.float64)
            for member in _members(g, consumers_only, stored):
                grad = grads.get(member.target)
                if grad is not None:
                    product = (params[member.target].detach() * grad).double()
                    per_unit += _per_unit(product, member, g)
            scores[g.name] += per_unit ** 2
    return scores


def _members(group: Group, consumers_only: bool, stored: Dict[str, torch.Tensor]):
    members = [m for m in group.members if m.role == "in"] if consumers_only else group.members
    return [m for m in members if stored[m.target].is_floating_point()]


def _random_projection(outputs, generator: torch.Generator) -> torch.Tensor:
    leaves = [y for y in pytree.tree_leaves(outputs) if isinstance(y, torch.Tensor) and y.is_floating_point()]
    total = 0.0
    for y in leaves:
        r = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        total = total + (y * r).sum()
    return total


def unit_scores(graph: Graph, groups: Sequence[Group], criterion: str, batches: Sequence[tuple] = (),
                loss_fn: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """Importance of every unit of every group in ``groups`` under ``criterion`` (one of :data:`CRITERIA`)."""
    if criterion in ("l1", "l2"):
        return {g.name: magnitude(graph, g, 1 if criterion == "l1" else 2) for g in groups}
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    return gradient_scores(graph, groups, batches, consumers_only=criterion == "head", loss_fn=loss_fn)


def keep_most_important(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of the ``len(scores) - remove`` highest-scoring units; ties keep the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[: len(scores) - remove]), dtype=torch.long)
