"""``fxopt.prune``: structured pruning's public helpers.

    print(fxopt.prune.groups(graph))          # the groups of coupled dims, readable
    scores = fxopt.prune.unit_scores(graph, groups, "l2")

The passes themselves run through the pipeline: ``fxopt.Pipeline("prune-channels{ratio=0.25}")``.
"""
from fxopt.passes.prune import CRITERIA, KINDS, Group, Groups, Member, groups, unit_scores

__all__ = ["groups", "unit_scores", "Group", "Groups", "Member", "KINDS", "CRITERIA"]
