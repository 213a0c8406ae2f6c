"""Cleanup passes: dead code, constant folding, CSE, no-op removal."""
from fxopt.passes.cleanup.cse import EliminateCommonSubexpressions
from fxopt.passes.cleanup.dead_code import EliminateDeadCode
from fxopt.passes.cleanup.fold_constants import FoldConstants
from fxopt.passes.cleanup.remove_noop import RemoveNoop
from fxopt.passes.infra.registry import register_preset

register_preset("cleanup", "remove-noop,fold-constants,eliminate-common-subexpressions,eliminate-dead-code")

__all__ = ["EliminateCommonSubexpressions", "EliminateDeadCode", "FoldConstants", "RemoveNoop"]
