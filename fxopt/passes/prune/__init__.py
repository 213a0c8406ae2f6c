"""Structured pruning with dependency propagation: the ``prune-channels``, ``prune-heads`` and ``prune-ffn`` passes.

``terms`` holds the axis-term unification, ``analysis``/``handlers``/``ops_*`` the dependency analysis,
``groups`` the groups of coupled dims it finds, ``importance`` the criteria, ``apply`` the shrinking,
``prune_channels`` the passes. ``fxopt.prune.groups(graph)`` lists a graph's groups.
"""
from fxopt.passes.prune.groups import KINDS, Group, Groups, Member, groups
from fxopt.passes.prune.importance import CRITERIA, unit_scores
from fxopt.passes.prune.prune_channels import PruneChannels, PruneFFN, PruneHeads

__all__ = ["groups", "Group", "Groups", "Member", "KINDS", "CRITERIA", "unit_scores", "PruneChannels", "PruneHeads",
           "PruneFFN"]
