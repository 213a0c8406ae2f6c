"""The verifier: fx lint plus fxopt's metadata invariants.

Runs after every pass in tests and with ``debug=True``. It checks that:
- the fx graph is well formed (``lint``: topological order, valid targets);
- every value node carries TensorInfo;
- every get_attr refers to an existing tensor;
- the graph inputs still match the captured input specs;
- with ``check_meta``, each op's recorded TensorInfo agrees with what its
  inputs' metadata implies (catches passes that leave stale metadata).
"""
from __future__ import annotations

import torch

from fxopt.errors import MetadataError, describe_node
from fxopt.ir import meta as M


def verify(graph, check_meta: bool = True) -> None:
    """Raise MetadataError naming the first node that breaks an invariant."""
    try:
        graph.module.graph.lint()
    except Exception as exc:  # fx raises RuntimeError for several distinct problems
        raise MetadataError(f"verify: the fx graph is malformed: {exc}; the last pass produced an invalid graph") from exc
    _check_inputs(graph)
    mode = M.fake_mode_of(graph.module.graph) if check_meta else None
    for node in graph.module.graph.nodes:
        if node.op == "get_attr":
            _check_weight(graph, node)
        if M.is_value_node(node) and M.node_info(node) is None:
            raise MetadataError(f"verify: {describe_node(node)}: has no TensorInfo; the pass that built it must set it")
        if check_meta and node.op == "call_function":
            _check_inferred(node, mode)


def _check_inputs(graph) -> None:
    placeholders = graph.placeholders
    if len(placeholders) != len(graph.input_specs):
        raise MetadataError(
            f"verify: graph has {len(placeholders)} inputs but {len(graph.input_specs)} input specs; "
            "passes must not add or remove graph inputs"
        )


def _check_weight(graph, node) -> None:
    try:
        value = graph.param(node)
    except AttributeError as exc:
        raise MetadataError(f"verify: {describe_node(node)}: refers to a missing weight `{node.target}`") from exc
    if not isinstance(value, torch.Tensor):
        raise MetadataError(f"verify: {describe_node(node)}: `{node.target}` is a {type(value).__name__}, not a tensor")
    info = M.node_info(node)
    if isinstance(info, M.TensorInfo) and (info.dtype != value.dtype or info.shape != tuple(value.shape)):
        raise MetadataError(
            f"verify: {describe_node(node)}: recorded TensorInfo {info} differs from the stored weight "
            f"{M.TensorInfo.of(value)}; change weights through graph.replace_param()"
        )


def _check_inferred(node, mode) -> None:
    recorded = M.node_info(node)
    saved_val = node.meta.get("val")
    try:
        M.infer_val(node, mode)
        inferred = M.node_info(node)
    except Exception as exc:
        raise MetadataError(f"verify: {describe_node(node)}: cannot run on its inputs' metadata: {exc}") from exc
    finally:
        M.set_val(node, saved_val)
    if not _infos_agree(recorded, inferred):
        raise MetadataError(
            f"verify: {describe_node(node)}: recorded TensorInfo {recorded} differs from {inferred} implied by its "
            "inputs; the pass changed the node without updating metadata (call graph.refresh_meta())"
        )


def _infos_agree(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_infos_agree(x, y) for x, y in zip(a, b))
    if isinstance(a, M.TensorInfo) and isinstance(b, M.TensorInfo):
        return a.dtype == b.dtype and M.shapes_equal(a.shape, b.shape)
    return a is None and b is None
