"""Short names and categories of graph ops, shared by the report's drawings and its per-layer error.

``op_kind("aten.linear.default")`` is ``"linear"``; ``op_category("linear")`` is
``"compute"``. The categories colour the graph drawing; ``is_layer_output``
picks the ops whose outputs the per-layer error chart reports (the ops that do
the arithmetic a compression pass changes, not every view or add).
"""
from __future__ import annotations

#: Kinds whose names contain one of these do the heavy arithmetic: GEMMs, convolutions, attention.
_COMPUTE_WORDS = ("linear", "matmul", "conv", "attention", "addmm", "baddbmm", "embedding")
_COMPUTE_KINDS = frozenset({"mm", "bmm"})
_NORM_WORDS = ("layer_norm", "batch_norm", "group_norm", "rms_norm", "instance_norm")
_VIEW_KINDS = frozenset({
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "slice",
    "select", "getitem", "contiguous", "clone", "alias", "flatten", "unflatten", "split", "split_with_sizes",
    "chunk", "unbind", "cat", "stack", "_to_copy", "to", "detach", "lift_fresh_copy", "sym_size",
})
_IO_KINDS = frozenset({"input", "output"})
CATEGORIES = ("compute", "norm", "quant", "view", "elementwise", "io")


def op_kind(target: str, node_op: str = "call_function") -> str:
    """A short readable kind: ``aten.linear.default`` -> ``linear``, a placeholder -> ``input``."""
    if node_op == "placeholder":
        return "input"
    if node_op == "output":
        return "output"
    if node_op == "get_attr":
        return "weight"
    parts = str(target).split(".")
    return parts[1] if len(parts) == 3 else parts[-1]


def op_category(kind: str) -> str:
    """One of :data:`CATEGORIES`, by kind."""
    if kind in _IO_KINDS:
        return "io"
    if "quantize" in kind:
        return "quant"
    if any(word in kind for word in _NORM_WORDS):
        return "norm"
    if kind in _COMPUTE_KINDS or any(word in kind for word in _COMPUTE_WORDS):
        return "compute"
    if kind in _VIEW_KINDS:
        return "view"
    return "elementwise"


def is_layer_output(kind: str) -> bool:
    """Whether the per-layer error reports this kind: embeddings, GEMMs, convolutions, attention, norms."""
    return op_category(kind) in ("compute", "norm")
