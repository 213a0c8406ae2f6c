"""prune-channels (and prune-heads, prune-ffn): structured pruning that physically shrinks the weights.

    fxopt.Pipeline("prune-channels{ratio=0.25}")            heads, FFN neurons and conv channels
    fxopt.Pipeline("prune-heads{ratio=0.25,criterion=head}", calibration=batches)   attention heads only
    fxopt.Pipeline("prune-ffn{ratio=0.5}")                   FFN neurons only

The dependency analysis (``groups.py``) finds the groups of coupled dims; each selected group
loses ``floor(units * ratio)`` of its units (or see ``scope``), the least important ones under ``criterion``
(``importance.py``), in every weight that touches them (``apply.py``). The graph's inputs and
outputs keep their shapes: groups that reach them are fixed and listed in the stat ``fixed``.

Options:
- ``ratio``: the share of units each selected group loses (0 leaves the graph as it is);
- ``ratios=pattern:ratio;...``: per-group ratios, each pattern a regular expression searched in
  the group names ``fxopt.prune.groups(graph)`` prints (``heads:encoder\\.layer\\.0\\..*:0.5``);
- ``kinds``: which kinds of groups to prune (``heads``, ``query-heads``, ``ffn``, ``channels``, ``hidden``,
  ``head-dim``); with GQA, ``heads`` removes key/value heads with the query heads that read them;
- ``skip``: group-name patterns to leave alone;
- ``criterion``: ``l1``, ``l2`` (default), ``taylor`` or ``head`` (the last two read the calibration data handed
  to the pass: ``PruneChannels(..., calibration=batches)`` or ``Pipeline(spec, calibration=batches)``);
- ``scope``: ``group`` (default: every group loses ``ratio`` of its units) or ``global`` (each kind loses ``ratio``
  of all its units, the least important across groups, scores L2-normalized per group as Michel et al. do for
  heads; every group keeps at least one unit). Groups named in ``ratios`` always use their own ratio.

A ratio that would remove every unit of a group, a group named in ``ratios`` that cannot be
pruned, and a group blocked by an op the analysis does not know are errors naming the node.
Stats: ``pruned`` (group -> [kept, units]), ``kept`` (group -> kept unit indices), ``fixed``
(selected groups left alone -> why), ``params_removed``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import Pass, PassResult, calibration_field
from fxopt.passes.infra.batches import Batches
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.prune.apply import shrink
from fxopt.passes.prune.groups import KINDS, Group, find_groups
from fxopt.passes.prune.importance import CRITERIA, keep_most_important, unit_scores

SCOPES = ("group", "global")


@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    name = "prune-channels"
    summary = "structured pruning: drop the least important heads, FFN neurons and conv channels, shrinking weights"
    lossy = True
    ratio: float = 0.0
    ratios: Tuple[str, ...] = ()
    kinds: Tuple[str, ...] = ("heads", "ffn", "channels")
    skip: Tuple[str, ...] = ()
    criterion: str = "l2"
    scope: str = "group"
    #: Input batches the gradients of criterion=taylor or head are taken on; not an option (see
    #: fxopt.passes.infra.base).
    calibration: Optional[Batches] = calibration_field()

    def __post_init__(self):
        super().__post_init__()
        self._check_ratio("ratio", self.ratio)
        self.check_choices("scope", (self.scope,), SCOPES, "scope")
        self.check_choices("kinds", self.kinds, KINDS, "group kinds")
        self.check_choices("criterion", (self.criterion,), CRITERIA, "criterion")
        for pattern in (*self.skip, *self.group_ratios()):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise self.error(f"{pattern!r} is not a regular expression ({exc})",
                                 hint="escape special characters with a backslash") from None

    def _check_ratio(self, option: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise self.error(f"{option}={value} is outside [0, 1]", hint="the share of units to remove, e.g. 0.25")

    def group_ratios(self) -> Dict[str, float]:
        """The ``ratios`` option as pattern -> ratio."""
        parsed = {}
        for item in self.ratios:
            pattern, sep, value = item.rpartition(":")
            try:
                ratio = float(value)
            except ValueError:
                ratio = None
            if not sep or not pattern or ratio is None:
                raise self.error(f"ratios entry {item!r} is not pattern:ratio",
                                 hint="e.g. ratios=heads:.*layer\\.0\\..*:0.5")
            self._check_ratio(f"ratios entry {item!r}", ratio)
            parsed[pattern] = ratio
        return parsed

    # ------------------------------------------------------------------ run
    def run(self, graph: Graph) -> PassResult:
        an, groups = find_groups(graph)
        selected, fixed = self._select(graph, an, groups)
        stats = {"pruned": {}, "kept": {}, "fixed": fixed, "params_removed": 0}
        to_score = [g for g, ratio, _ in selected if ratio > 0]
        if not to_score:
            return PassResult(graph, False, stats)
        scores = unit_scores(graph, to_score, self.criterion, self._batches_to_score(graph, to_score))
        removals = self._removals(graph, selected, scores)
        if not removals:
            return PassResult(graph, False, stats)
        kept = {}
        for group, remove in removals.items():
            kept[group.atom] = keep_most_important(scores[group.name], remove)
            stats["pruned"][group.name] = [group.units - remove, group.units]
            stats["kept"][group.name] = kept[group.atom].tolist()
        stats["params_removed"] = shrink(graph, an, kept, self.name)
        return PassResult(graph, True, stats)

    def _select(self, graph: Graph, an, groups: List[Group]):
        """(group, ratio, named in ratios) for every selected prunable group, and the selected ones left alone."""
        named = self.group_ratios()
        for pattern in named:
            if not any(re.search(pattern, g.name) for g in groups):
                raise self.error(f"ratios pattern {pattern!r} matches no group",
                                 hint=f"group names: {_examples(groups)}; see fxopt.prune.groups(graph)")
        selected, fixed = [], {}
        for group in groups:
            ratio = next((r for p, r in named.items() if re.search(p, group.name)), None)
            explicit = ratio is not None
            if ratio is None and (group.kind not in self.kinds or any(re.search(p, group.name) for p in self.skip)):
                continue
            self._check_unknown_ops(an, group)
            if not group.prunable:
                if explicit:
                    raise self.error(f"group {group.name} cannot be pruned ({group.status()})",
                                     _producer(graph, group), "remove it from ratios")
                fixed[group.name] = group.status()
                continue
            selected.append((group, self.ratio if ratio is None else ratio, explicit))
        return selected, fixed

    def _removals(self, graph: Graph, selected, scores: Dict[str, torch.Tensor]) -> Dict[Group, int]:
        """How many units each group loses: its own share, or (scope=global) a share of its kind's pool."""
        counts: Dict[Group, int] = {}
        pools: Dict[str, List[Group]] = {}
        for group, ratio, explicit in selected:
            if ratio == 0:
                continue
            if self.scope == "global" and not explicit:
                pools.setdefault(group.kind, []).append(group)
                continue
            counts[group] = int(math.floor(group.units * ratio + 1e-9))
            if counts[group] >= group.units:
                raise self.error(f"ratio {ratio} would remove all {group.units} units of group {group.name}",
                                 _producer(graph, group), "use a ratio below 1, or leave the group out with skip=")
        for kind, pool in pools.items():
            counts.update(self._global_counts(graph, kind, pool, scores))
        return {g: c for g, c in counts.items() if c > 0}

    def _global_counts(self, graph: Graph, kind: str, pool: List[Group], scores) -> Dict[Group, int]:
        """The least important units of all the kind's groups, scores L2-normalized per group (Michel et al.)."""
        total = int(math.floor(sum(g.units for g in pool) * self.ratio + 1e-9))
        if total > sum(g.units - 1 for g in pool):
            raise self.error(f"ratio {self.ratio} would remove every unit of some {kind} group",
                             _producer(graph, pool[0]), "use a smaller ratio")
        ranked = []
        for index, group in enumerate(pool):
            values = scores[group.name]
            norm = float(values.norm())
            ranked += [(float(v) / norm if norm > 0 else 0.0, index, unit) for unit, v in enumerate(values)]
        counts = {g: 0 for g in pool}
        for _, index, _ in sorted(ranked):
            if total == 0:
                break
            if counts[pool[index]] < pool[index].units - 1:
                counts[pool[index]] += 1
                total -= 1
        return counts

    def _check_unknown_ops(self, an, group: Group) -> None:
        for node in an.unknown:
            marker = f"%{node.name} ("
            if any(reason.startswith(marker) for reason in group.blocked):
                raise self.error(f"the pruning analysis does not know this op, and it touches group {group.name}",
                                 node, "add a handler in fxopt/passes/prune/handlers.py, or leave the group out "
                                       "with skip=")

    def _batches_to_score(self, graph: Graph, to_score: List[Group]) -> Iterable[tuple]:
        """The calibration batches (criterion=taylor or head), or none (l1, l2: weights alone)."""
        if self.criterion in ("l1", "l2"):
            return ()
        return self.require_calibration(f"criterion={self.criterion}", _producer(graph, to_score[0]),
                                        instead="use criterion=l2")


def _producer(graph: Graph, group: Group) -> Optional[torch.fx.Node]:
    """The first op that reads a weight producing the group (for error messages)."""
    targets = {m.target for m in group.members if m.role == "out"} or {m.target for m in group.members}
    for node in graph.call_nodes():
        if any(a.op == "get_attr" and a.target in targets for a in node.all_input_nodes):
            return node
    return None


def _examples(groups: List[Group], limit: int = 4) -> str:
    names = [g.name for g in groups if g.prunable][:limit]
    return ", ".join(names) + (", ..." if len(groups) > limit else "") if names else "the graph has none prunable"


@register_pass
@dataclass(frozen=True)
class PruneHeads(PruneChannels):
    name = "prune-heads"
    summary = "structured pruning of attention heads (prune-channels with kinds=heads)"
    kinds: Tuple[str, ...] = ("heads",)


@register_pass
@dataclass(frozen=True)
class PruneFFN(PruneChannels):
    name = "prune-ffn"
    summary = "structured pruning of FFN neurons (prune-channels with kinds=ffn)"
    kinds: Tuple[str, ...] = ("ffn",)
