"""low-rank: replace linear and 1x1-conv weights by two thin factors from a truncated SVD.

    %y = aten.linear(%x, %w, %b)          %w [out, in]
becomes
    %h = aten.linear(%x, %w_a)            %w_a = (Σ Vᵀ)[:r]   [r, in]
    %y = aten.linear(%h, %w_b, %b)        %w_b = U[:, :r]     [out, r]

(1x1 convolutions likewise, see ``handlers.py``; the arithmetic is in ``factorize.py``).

Choose the rank with one of (more than one is an error):
- ``rank=64``: the same rank everywhere (capped at ``min(in, out)``);
- ``energy=0.95``: per layer, the smallest rank keeping that share of the squared singular values (the default);
- ``ratio=0.5``: keep that share of the selected layers' parameters, ranks spread across layers greedily by
  singular-value energy share (``factorize.allocate_ratio``).
``ranks=linear_4:32;linear_5:48`` fixes the rank of the named op nodes; on its own it factors only them.

``layers=`` and ``skip=`` take regular expressions (``;``-separated, no commas or braces) searched in each op
node's name and in its weight's name, e.g. ``layers=intermediate;layer\\.[0-9]+\\.output`` for BERT's FFNs.

A layer whose factors would not be smaller, ``r·(in+out) >= in·out``, is left dense and listed in the stat
``skipped_no_gain`` (``force=true`` factors it anyway: full-rank factors reproduce the weight, for testing).

``activation-aware=true`` (ASVD) scales the weight's input columns by activation statistics before the SVD
(``statistics.py``); ``statistic=covariance`` whitens by their full second moment instead (SVD-LLM). It reads
the calibration data handed to it: ``LowRank(..., activation_aware=True, calibration=batches)`` or
``Pipeline("low-rank{...,activation-aware=true}", calibration=batches)``. At equal rank it loses less output
accuracy: MiniLM with its 12 FFN linears at rank 192 keeps an embedding cosine of 0.67 (plain), 0.79 (rms), 0.92
(covariance) to fp32 (benchmarks/results/lowrank_minilm.md).

A weight that other ops read as well (an LM head tied to the embedding table, a shared weight whose other
reader is filtered out) is not factored: the dense tensor would stay besides the factors. Its name is listed
in the stat ``skipped_shared``.

Stats: ``factored`` (weights), ``ranks`` and ``skipped_no_gain`` (op node -> rank), ``skipped_shared``,
``params_before`` and ``params_after`` (of the weights considered).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import Pass, PassResult, calibration_field
from fxopt.passes.infra.batches import Batches
from fxopt.passes.infra.registry import register_pass
from fxopt.passes.lowrank.factorize import (
    Spectrum, allocate_ratio, energy_rank, factors, saves_params, spectrum,
)
from fxopt.passes.lowrank.handlers import handlers
from fxopt.passes.lowrank.statistics import STATISTICS, activation_scales

DEFAULT_ENERGY = 0.95


@register_pass
@dataclass(frozen=True)
class LowRank(Pass):
    name = "low-rank"
    summary = "factor linear and 1x1-conv weights into two thin ones by truncated SVD (plain or activation-aware)"
    lossy = True
    rank: Optional[int] = None
    #: ``node:rank`` pairs fixing the rank of single op nodes.
    ranks: Tuple[str, ...] = ()
    energy: Optional[float] = None
    ratio: Optional[float] = None
    activation_aware: bool = False
    #: activation-aware: "rms" (sqrt of mean x²) or "absmean" (mean |x|) per input channel, raised to ``alpha``;
    #: or "covariance" (whitening by the Cholesky factor of E[x xᵀ]).
    statistic: str = "rms"
    alpha: float = 1.0
    layers: Tuple[str, ...] = ()
    skip: Tuple[str, ...] = ()
    force: bool = False
    #: Input batches the activation statistics are taken on (activation-aware); not an option (see
    #: fxopt.passes.infra.base).
    calibration: Optional[Batches] = calibration_field()

    def __post_init__(self):
        super().__post_init__()
        chosen = [f"{k}={v}" for k, v in (("rank", self.rank), ("energy", self.energy), ("ratio", self.ratio))
                  if v is not None]
        if len(chosen) > 1:
            raise self.error(f"{' and '.join(chosen)} both choose the rank",
                             hint="give only one of rank, energy, ratio")
        if self.rank is not None and self.rank <= 0:
            raise self.error(f"rank={self.rank} must be a positive integer", hint="e.g. rank=64")
        for option, value in (("energy", self.energy), ("ratio", self.ratio)):
            if value is not None and not 0.0 < value <= 1.0:
                raise self.error(f"{option}={value} is outside (0, 1]", hint=f"e.g. {option}=0.9")
        self.check_choices("statistic", (self.statistic,), STATISTICS, "statistic")
        if not 0.0 < self.alpha <= 2.0:
            raise self.error(f"alpha={self.alpha} is outside (0, 2]", hint="1 for rms, 0.5 for absmean (ASVD)")
        if (self.statistic, self.alpha) != ("rms", 1.0) and not self.activation_aware:
            raise self.error("statistic and alpha apply to activation-aware=true only", hint="drop them, or add "
                             "activation-aware=true")
        if self.statistic == "covariance" and self.alpha != 1.0:
            raise self.error(f"alpha={self.alpha} applies to statistic=rms or absmean only",
                             hint="covariance whitening takes no exponent; drop alpha")
        self.fixed_ranks()
        for option in ("layers", "skip"):
            for pattern in getattr(self, option):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise self.error(f"{option}={pattern!r} is not a regular expression ({exc})",
                                     hint="escape special characters with a backslash") from None

    def fixed_ranks(self) -> Dict[str, int]:
        """The ``ranks`` option as node name -> rank."""
        fixed = {}
        for item in self.ranks:
            name, sep, value = item.partition(":")
            if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
                raise self.error(f"ranks entry {item!r} is not node:rank with a positive rank",
                                 hint="e.g. ranks=linear_4:32;linear_5:48")
            fixed[name.strip()] = int(value)
        return fixed

    # ------------------------------------------------------------------ run
    def run(self, graph: Graph) -> PassResult:
        ops = self._select(graph)
        groups: Dict[str, List[fx.Node]] = {}  # weight target -> the op nodes reading it, in graph order
        for node in ops:
            groups.setdefault(node.args[1].target, []).append(node)
        read_elsewhere = self._read_elsewhere(graph, groups)
        groups = {t: nodes for t, nodes in groups.items() if t not in read_elsewhere}
        if self.ranks and self.rank is None and self.energy is None and self.ratio is None:  # only named ones
            groups = {t: nodes for t, nodes in groups.items() if any(n.name in self.fixed_ranks() for n in nodes)}
        ops = [n for n in ops if n.args[1].target in groups]
        table = handlers()
        scales = self._activation_scales(graph, ops) if ops and self.activation_aware else {}
        spectra = {target: spectrum(table[nodes[0].target].matrix(graph.param(nodes[0].args[1])), scales.get(target))
                   for target, nodes in groups.items()}
        ranks = self._choose_ranks(spectra, groups)
        stats = {"factored": 0, "ranks": {}, "skipped_no_gain": {}, "skipped_shared": sorted(read_elsewhere),
                 "params_before": 0, "params_after": 0}
        for target in (t for t in groups if t in ranks):
            self._factor(graph, groups[target], spectra[target], ranks[target], stats)
        if stats["factored"]:  # only then is the module recompiled: leave its other get_attrs alone otherwise
            graph.remove_unused_params()
        return PassResult(graph, stats["factored"] > 0, stats)

    def _factor(self, graph: Graph, nodes: List[fx.Node], spec: Spectrum, rank: int, stats: dict) -> None:
        out_features, in_features = spec.out_features, spec.in_features
        stats["params_before"] += out_features * in_features
        if not self.force and not saves_params(rank, out_features, in_features):
            stats["skipped_no_gain"][nodes[0].name] = rank
            stats["params_after"] += out_features * in_features
            return
        handler = handlers()[nodes[0].target]
        weight = graph.param(nodes[0].args[1])
        a, b = factors(spec, rank, weight.dtype)
        target = nodes[0].args[1].target
        a_node = graph.add_param(f"{target}_lowrank_a", handler.shaped(a, weight), before=nodes[0])
        b_node = graph.add_param(f"{target}_lowrank_b", handler.shaped(b, weight), before=nodes[0])
        for node in nodes:
            handler.split(graph, node, a_node, b_node)
        stats["factored"] += 1
        stats["ranks"][nodes[0].name] = a.shape[0]
        stats["params_after"] += a.numel() + b.numel()

    # ------------------------------------------------------------ selection
    def _select(self, graph: Graph) -> List[fx.Node]:
        table = handlers()
        eligible = [n for n in graph.call_nodes() if n.target in table and table[n.target].is_eligible(n)]
        selected = [n for n in eligible if not self.layers or any(self._matches(p, n) for p in self.layers)]
        selected = [n for n in selected if not any(self._matches(p, n) for p in self.skip)]
        for option in ("layers", "skip"):
            for pattern in getattr(self, option):
                if not any(self._matches(pattern, n) for n in eligible):
                    raise self.error(f"{option}={pattern!r} matches no linear or 1x1 conv of this graph",
                                     hint=f"patterns are searched in op and weight names: {_examples(eligible)}")
        unknown = sorted(set(self.fixed_ranks()) - {n.name for n in selected})
        if unknown:
            raise self.error(f"ranks names {', '.join(unknown)}, not a selected linear or 1x1 conv",
                             hint=f"name op nodes such as {_examples(selected)}")
        return selected

    @staticmethod
    def _read_elsewhere(graph: Graph, groups: Dict[str, List[fx.Node]]) -> List[str]:
        """Weights that ops outside their group also read (a tied embedding, a filtered-out layer): factoring them
        would keep the dense tensor as well, so they are left alone."""
        readers: Dict[str, set] = {}
        for node in graph.fx_graph.nodes:
            if node.op == "get_attr" and node.target in groups:
                readers.setdefault(node.target, set()).update(node.users)
        return [t for t, nodes in groups.items() if not readers.get(t, set()) <= set(nodes)]

    @staticmethod
    def _matches(pattern: str, node: fx.Node) -> bool:
        return re.search(pattern, node.name) is not None or re.search(pattern, node.args[1].target) is not None

    def _activation_scales(self, graph: Graph, ops: List[fx.Node]) -> Dict[str, torch.Tensor]:
        batches = self.require_calibration("activation-aware=true", ops[0], instead="drop activation-aware")
        table = handlers()
        pairs = [(n, table[n.target].channel_axis) for n in ops]
        return activation_scales(graph, pairs, batches, self.statistic, self.alpha)

    # ---------------------------------------------------------------- ranks
    def _choose_ranks(self, spectra: Dict[str, Spectrum], groups: Dict[str, List[fx.Node]]) -> Dict[str, int]:
        """Weight target -> rank (capped at full rank), for every weight to factor."""
        fixed_by_node = self.fixed_ranks()
        fixed = {}  # a weight read by several named ops takes the rank of the first
        for target, nodes in groups.items():
            named = [fixed_by_node[n.name] for n in nodes if n.name in fixed_by_node]
            if named:
                fixed[target] = named[0]
        rest = {t: s for t, s in spectra.items() if t not in fixed}
        if self.rank is not None:
            chosen = {t: self.rank for t in rest}
        elif self.ratio is not None:
            chosen = allocate_ratio(rest, self.ratio) if rest else {}
        elif self.energy is not None or not fixed:
            chosen = {t: energy_rank(s, self.energy or DEFAULT_ENERGY) for t, s in rest.items()}
        else:  # only ``ranks`` given: factor just those
            chosen = {}
        chosen.update(fixed)
        return {t: min(r, spectra[t].full_rank) for t, r in chosen.items()}


def _examples(nodes: List[fx.Node], limit: int = 4) -> str:
    shown = ", ".join(f"{n.name} ({n.args[1].target})" for n in nodes[:limit])
    return (shown + (", ..." if len(nodes) > limit else "")) or "the graph has none"

