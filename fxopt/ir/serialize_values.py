"""Node arguments and call targets of a Graph as JSON values, and back (the graph.json format is in serialize.py).

Call targets are qualified names: ``"ns::op.overload"`` for torch ops (resolved
through ``torch.ops``, which only finds registered operators) or a name from
:data:`BUILTIN_TARGETS` (``"operator.getitem"``). Argument values are JSON
scalars and lists, or one-key objects: ``{"node": name}``, ``{"tuple": [...]}``,
``{"float": "inf"}``, ``{"dtype": "float32"}``, ``{"device": "cpu"}``,
``{"layout": "strided"}``, ``{"memory_format": "contiguous_format"}``,
``{"slice": [start, stop, step]}``, ``{"ellipsis": true}``. Nothing read is
imported or evaluated.
"""
from __future__ import annotations

import builtins
import math
import operator
import re
from typing import Any, Dict

import torch
import torch.fx as fx

from fxopt.errors import ArtifactError, describe_node

#: The Python callables exported graphs call (mostly on SymInts), by the name stored in graph.json.
BUILTIN_TARGETS: Dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift")},
    **{f"math.{n}": getattr(math, n) for n in ("sqrt", "ceil", "floor", "trunc")},
    **{f"builtins.{n}": getattr(builtins, n) for n in ("abs", "min", "max", "round", "int", "float", "bool")},
    **{f"torch.{n}": getattr(torch, n) for n in (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum")
       if hasattr(torch, n)},
}
_BUILTIN_NAMES = {id(fn): name for name, fn in BUILTIN_TARGETS.items()}

#: dtype, layout and memory-format objects by the name stored in graph.json ("float32").
DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.layout)}
_MEMORY_FORMATS = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.memory_format)}
_OP_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)::([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, the form graph.json stores."""
    return str(dtype).removeprefix("torch.")


def target_to_json(node: fx.Node) -> str:
    """The qualified name of what ``node`` calls (or its string target: a placeholder's name, a get_attr's path)."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    if id(target) in _BUILTIN_NAMES:
        return _BUILTIN_NAMES[id(target)]
    raise ArtifactError(
        f"graph_to_json: {describe_node(node)}: target {target!r} cannot be saved; an artifact holds torch ops "
        f"(torch.ops.ns.op.overload) and these Python functions only: {', '.join(sorted(BUILTIN_TARGETS))}"
    )


def value_to_json(node: fx.Node, value) -> Any:
    """One argument of ``node`` as a JSON value (see the module docstring); ArtifactError for what cannot be saved."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, tuple):
        return {"tuple": [value_to_json(node, v) for v in value]}
    if isinstance(value, list):
        return [value_to_json(node, v) for v in value]
    if isinstance(value, slice):
        return {"slice": [value_to_json(node, v) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    for key, kind in (("dtype", torch.dtype), ("layout", torch.layout), ("memory_format", torch.memory_format)):
        if isinstance(value, kind):
            return {key: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise ArtifactError(
        f"graph_to_json: {describe_node(node)}: an argument of type {type(value).__name__} cannot be saved; "
        "artifacts hold nodes, None, bool, int, float, str, lists, tuples, slices, dtypes, devices, layouts "
        "and memory formats (store tensors as weights with graph.add_param)"
    )


def resolve_target(qualified: str, node_name: str = "?"):
    """The callable a qualified target name stands for: a registered torch op or an allowed builtin."""
    if qualified in BUILTIN_TARGETS:
        return BUILTIN_TARGETS[qualified]
    match = _OP_NAME.match(qualified)
    op = _registered_op(*match.groups()) if match else None
    if op is None:
        raise ArtifactError(
            f"graph.json: node %{node_name}: unknown op {qualified!r}; an artifact may call registered torch ops "
            "and a fixed set of Python builtins only: import the library that registers the op, or re-save the "
            "artifact with this fxopt and torch"
        )
    return op


def _registered_op(namespace: str, name: str, overload: str):
    _register_op_libraries()
    space = getattr(torch.ops, namespace, None)
    if not isinstance(space, torch._ops._OpNamespace):
        return None
    try:
        op = getattr(getattr(space, name), overload)
    except (AttributeError, RuntimeError):
        return None
    return op if isinstance(op, torch._ops.OpOverload) else None


def _register_op_libraries() -> None:
    """Import the (fixed) modules that register the op namespaces fxopt graphs use."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (quantized_decomposed)

    import fxopt.ir.ops  # noqa: F401  (fxopt)


def value_from_json(value, node_name: str, nodes: Dict[str, fx.Node]):
    """The argument :func:`value_to_json` encoded; ``nodes`` are those defined so far, by name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [value_from_json(v, node_name, nodes) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise ArtifactError(f"graph.json: node %{node_name}: malformed argument {value!r}; the file is corrupted")
    (key, body), = value.items()
    if key == "node":
        if body not in nodes:
            raise ArtifactError(f"graph.json: node %{node_name}: refers to %{body}, which is not defined before it; "
                                "the file is corrupted")
        return nodes[body]
    if key == "tuple":
        return tuple(value_from_json(v, node_name, nodes) for v in body)
    if key == "slice":
        return slice(*(value_from_json(v, node_name, nodes) for v in body))
    if key == "float":
        return float(lookup({"inf": "inf", "-inf": "-inf", "nan": "nan"}, body, "non-finite float"))
    if key == "ellipsis":
        return Ellipsis
    if key == "device":
        return _device_from_json(body, node_name)
    tables = {"dtype": DTYPES, "layout": _LAYOUTS, "memory_format": _MEMORY_FORMATS}
    if key in tables:
        return lookup(tables[key], body, key)
    raise ArtifactError(f"graph.json: node %{node_name}: unknown argument kind {key!r}; the file is corrupted "
                        "or from another fxopt version")


def _device_from_json(text: str, node_name: str) -> torch.device:
    try:
        return torch.device(text)
    except (RuntimeError, TypeError) as exc:
        raise ArtifactError(f"graph.json: node %{node_name}: bad device {text!r}: {exc}") from exc


def lookup(table: dict, name, what: str):
    """``table[name]``, or an ArtifactError naming ``what`` was unknown and the valid names."""
    if not isinstance(name, str) or name not in table:
        raise ArtifactError(f"graph.json: unknown {what} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]
