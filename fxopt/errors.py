"""The fxopt error hierarchy.

Every error fxopt raises on purpose derives from :class:`FxoptError`, so a user
can catch one class. Messages follow one form::

    "<where>: <problem>; <hint>"

where ``<where>`` names the pass, node, op, option or file involved.
"""
from __future__ import annotations


class FxoptError(Exception):
    """Base class of every error fxopt raises on purpose."""


class CaptureError(FxoptError):
    """A model could not be captured into an fxopt Graph."""


class PassError(FxoptError):
    """A pass failed, or was given bad options or an unsuitable graph."""


class PatternError(FxoptError):
    """A rewrite pattern is malformed, or a rewrite did not converge."""


class MetadataError(FxoptError):
    """A node lacks the metadata (TensorInfo, QParams) a reader asked for."""


class LoweringError(FxoptError):
    """A backend could not lower a graph, or its target is unavailable."""


class DeviceError(LoweringError):
    """The target's device is not on this machine (``cuda`` without a GPU): code generation works, running does not."""


class PartitionWarning(UserWarning):
    """Part of a graph runs in PyTorch because the target cannot lower it (the warning names the ops)."""


class ArtifactError(FxoptError):
    """A saved artifact is missing, corrupted, tampered with or from another version."""


class InputError(FxoptError):
    """Inputs given at run time do not match the captured input specs."""


def op_name(node) -> str:
    """A short readable name of what a node does: ``aten.linear.default``, ``getitem``, ``placeholder``."""
    if node.op == "call_function":
        target = node.target
        if hasattr(target, "_schema"):  # a torch op overload: aten.linear.default
            return str(target)
        return getattr(target, "__name__", str(target))
    if node.op in ("call_module", "call_method", "get_attr"):
        return f"{node.op} {node.target}"
    return node.op


def describe_node(node) -> str:
    """``%name (op)`` for messages, e.g. ``%conv1 (aten.convolution.default)``."""
    return f"%{node.name} ({op_name(node)})"
