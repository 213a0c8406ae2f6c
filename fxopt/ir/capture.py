"""Capture a model into an fxopt Graph through ``torch.export`` (non-strict)."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import os
import traceback
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from fxopt.errors import CaptureError
from fxopt.ir import meta as M
from fxopt.ir.graph import DimRange, Graph

_TORCH_DIR = os.path.dirname(torch.__file__)
_FXOPT_DIR = os.path.dirname(os.path.dirname(__file__))

_HINTS = (
    (("data-dependent", "DataDependent", "GuardOnDataDependent", "Could not guard on data-dependent"),
     "the model branches in Python on a tensor's value; use torch.where / torch.cond instead of `if`, "
     "or move the decision out of forward()"),
    (("Constraints violated", "specialized", "dynamic_shapes"),
     "a dim marked dynamic was fixed by the model's code; drop it from dynamic_shapes or mark it static"),
    (("Unsupported", "not supported"),
     "the model uses a construct torch.export cannot trace; rewrite that line in plain tensor ops"),
)


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    dynamic_shapes: Optional[Any] = None,
    example_kwargs: Optional[dict] = None,
    eval_mode: bool = True,
) -> Graph:
    """Capture ``model`` into a :class:`Graph` of ATen ops with ``get_attr`` weights.

    The model is deep-copied first, so the caller's model is never mutated. Its parameters are not
    copied: the graph's weights share their storage (a BERT-base would otherwise take twice its 440 MB)
    and no fxopt pass or backend writes to a weight in place; a pass that changes a weight makes a new
    tensor (the hypothesis tests of every pass check that the model stays byte-identical). Buffers,
    which a captured graph may update, are copied.
    ``eval_mode`` captures the copy in eval mode (dropout and BatchNorm behave
    as at inference). ``dynamic_shapes`` is passed to ``torch.export``.
    """
    _check_arguments(model, example_inputs)
    work = copy.deepcopy(model, memo=_shared_parameters(model))
    if eval_mode:
        work.eval()
    args = tuple(example_inputs)
    changes = _watch_python_state(work)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        try:
            exported = torch.export.export(
                work, args, kwargs=example_kwargs, dynamic_shapes=dynamic_shapes, strict=False
            )
            exported = exported.run_decompositions({})
        except Exception as exc:  # the exporter's errors have no common base class
            raise _capture_error(model, exc) from exc
        if changes:
            raise _side_effect_error(model, changes[0])
        module = exported.module()
    _drop_export_guards(module)
    graph = Graph(module)
    if dynamic_shapes is not None:
        graph.input_specs = _with_ranges(graph.input_specs, exported.range_constraints,
                                         _dim_labels(work, dynamic_shapes, len(args)), module)
    graph.refresh_meta()
    return graph


def _dim_labels(model: torch.nn.Module, dynamic_shapes: Any, n_args: int) -> Dict[Tuple[int, int], str]:
    """(input index, dim) -> the name of the ``torch.export.Dim`` the caller gave it, for error messages."""
    if isinstance(dynamic_shapes, dict):  # keyed by forward()'s parameter names
        names = list(inspect.signature(model.forward).parameters)[:n_args]
        per_input = [dynamic_shapes.get(name) for name in names]
    else:
        per_input = list(dynamic_shapes)
    labels = {}
    for index, dims in enumerate(per_input):
        items = dims.items() if isinstance(dims, dict) else enumerate(dims or ())
        for dim, spec in items:
            if spec is not None and getattr(spec, "__name__", None):
                labels[(index, dim)] = spec.__name__
    return labels


def _finite(bound) -> Optional[int]:
    """A range bound as an int, or None for torch's unbounded ``int_oo``."""
    try:
        return int(bound)
    except (OverflowError, TypeError, ValueError, AttributeError):
        return None


def _with_ranges(specs, range_constraints, labels, module) -> tuple:
    """``specs`` with each dynamic dim's range from torch.export's range constraints."""
    bounds = {str(symbol): (_finite(r.lower) or 0, _finite(r.upper)) for symbol, r in range_constraints.items()}
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    ranged = []
    for index, (spec, node) in enumerate(zip(specs, placeholders)):
        ranges = []
        for dim, size in enumerate(node.meta["val"].shape):
            bound = bounds.get(str(size)) if isinstance(size, torch.SymInt) else None
            ranges.append(None if bound is None else DimRange(labels.get((index, dim), str(size)), *bound))
        ranged.append(dataclasses.replace(spec, ranges=tuple(ranges)))
    return tuple(ranged)


def _shared_parameters(model: torch.nn.Module) -> dict:
    """A deepcopy memo that maps each parameter to a new Parameter over the same storage."""
    return {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}


def _check_arguments(model, example_inputs) -> None:
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"capture: model is a {type(model).__name__}, not a torch.nn.Module; wrap the function in a Module"
        )
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, (tuple, list)):
        raise CaptureError(
            "capture: example_inputs must be a tuple of tensors, e.g. (x,) for a single input"
        )
    for i, x in enumerate(example_inputs):
        if isinstance(x, torch.Tensor) and x.is_complex():
            raise CaptureError(
                f"capture: example input {i} has complex dtype {x.dtype}; fxopt supports real "
                "floating-point and integer tensors, split complex inputs into real and imaginary parts"
            )


_PLAIN_TYPES = (int, float, bool, str, list, dict, tuple, set, type(None))


def _python_state(model: torch.nn.Module) -> dict:
    """Plain Python attributes of every submodule, copied: what a forward() could mutate unseen."""
    state = {}
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if not attr.startswith("_") and attr != "training" and isinstance(value, _PLAIN_TYPES):
                try:
                    state[(prefix, attr)] = copy.deepcopy(value)
                except Exception:  # an uncopyable container holding arbitrary objects
                    continue
    return state


def _watch_python_state(work: torch.nn.Module) -> list:
    """Record Python-attribute changes made by forward() while it is traced.

    torch.export restores module attributes after tracing, so the check runs in
    hooks around the traced call itself.
    """
    changes: list = []
    before: dict = {}

    def snapshot(module, args):
        before.clear()
        before.update(_python_state(work))

    def compare(module, args, output):
        after = _python_state(work)
        changes.extend((key, value, after[key]) for key, value in before.items() if after.get(key, value) != value)

    work.register_forward_pre_hook(snapshot)
    work.register_forward_hook(compare)
    return changes


def _side_effect_error(model, change) -> CaptureError:
    (prefix, attr), old, new = change
    owner = type(model).__name__ + (f".{prefix}" if prefix else "")
    return CaptureError(
        f"capture: {owner}: forward() changes the Python attribute `{attr}` ({old!r} -> {new!r}); the captured "
        "graph cannot repeat Python side effects, so keep such state in a registered buffer updated with tensor "
        "ops, or move it out of forward()"
    )


def _drop_export_guards(module: fx.GraphModule) -> None:
    """Remove the ``_guards_fn`` call that ``ExportedProgram.module()`` inserts; Graph.run checks inputs."""
    for node in list(module.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            module.graph.erase_node(node)
    if hasattr(module, "_guards_fn"):
        delattr(module, "_guards_fn")
    module.recompile()


def _capture_error(model, exc: Exception) -> CaptureError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = _user_source_line(exc)
    hint = next(
        (h for keys, h in _HINTS if any(k in str(exc) or k in type(exc).__name__ for k in keys)),
        "simplify the line named above, or capture a smaller sub-module",
    )
    location = f" at {where}" if where else ""
    return CaptureError(
        f"capture: torch.export could not trace {type(model).__name__}{location}: "
        f"{type(exc).__name__}: {reason}; {hint}"
    )


def _user_source_line(exc: Exception) -> Optional[str]:
    """The deepest frame of the traceback that is the user's code, not torch's or fxopt's."""
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        filename = os.path.abspath(frame.filename)
        if filename.startswith(_TORCH_DIR) or filename.startswith(_FXOPT_DIR) or "<" in frame.filename:
            continue
        found = f"{frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return found
