"""Search candidates every target can offer: the float graph and its low-rank factorisations."""
from __future__ import annotations

from typing import Iterator

from fxopt.passes.lowrank import LowRank
from fxopt.search import Candidate
from fxopt.targets.calibration import PASS_CALIBRATION_BATCHES

#: Low-rank candidates of the search: the share of the factored linears' weights each keeps.
LOW_RANK_RATIOS = (0.75, 0.5)


def float_candidates(target, context) -> Iterator[Candidate]:
    """The pipeline's float graph, then its linears factored (whitened SVD) to keep :data:`LOW_RANK_RATIOS` of
    their weights; each lowered for the search by the target that runs float graphs for ``target``."""
    fused, spec = context.fused, context.pipeline
    target = target.float_target()
    yield candidate(target, "float", spec, fused, compressed=False)
    sample = context.calibration.take(0, PASS_CALIBRATION_BATCHES)  # whitening reads their activations
    for ratio in LOW_RANK_RATIOS:
        step = LowRank(ratio=ratio, activation_aware=True, statistic="covariance", calibration=sample)
        result = step(fused)
        if result.modified:
            yield candidate(target, f"low-rank {ratio:g}", f"{spec},{step.spec()}", result.graph, compressed=True,
                            stats={"low_rank": result.stats})


def candidate(target, name: str, pipeline: str, graph, compressed: bool, stats=None) -> Candidate:
    """A candidate lowered by ``target`` the quick way (``search_lower``) for measuring."""
    runner = target.search_lower(graph)
    lowering = target.lowering_report(runner)
    return Candidate(name, pipeline, graph, runner, target.name, compressed=compressed,
                     stats={**(stats or {}), **({"lowering": lowering} if lowering else {})})
