"""fxopt's own ops, defined with ``torch.library`` in the ``fxopt`` namespace.

Each op has a real CPU kernel and a fake (meta) kernel, so a graph that uses
it stays runnable, exportable and lowerable. The passes that introduce ops
(quantization, CSR, fused epilogues) define them here.
"""
from __future__ import annotations

import torch

NAMESPACE = "fxopt"

#: Ops that constant folding must leave alone even when all inputs are weights,
#: because backends pattern-match them (e.g. dequantize of an int8 weight).
#: Passes that define such ops add to this set.
UNFOLDABLE_TARGETS: set = set()


def fxopt_ops():
    """The namespace object ``torch.ops.fxopt``."""
    return getattr(torch.ops, NAMESPACE)
