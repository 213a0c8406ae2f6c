"""Predicates shared by the cleanup passes."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxopt.ir.ops import UNFOLDABLE_TARGETS


def is_pure(node: fx.Node) -> bool:
    """A call whose result depends only on its arguments: no side effects, no randomness."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if node.is_impure():
        return False
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags:
        return False
    schema = getattr(node.target, "_schema", None)
    return schema is None or not schema.is_mutable


def can_fold(node: fx.Node) -> bool:
    return is_pure(node) and node.target not in UNFOLDABLE_TARGETS
