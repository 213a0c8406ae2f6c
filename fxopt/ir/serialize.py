"""A Graph as plain JSON: no pickle, no eval, no import of names read from the file.

``graph_to_json(graph)`` returns a dict that ``json.dumps(..., allow_nan=False)``
accepts; ``graph_from_json(data, params)`` rebuilds the Graph from it and the
weight tensors (stored elsewhere, e.g. safetensors), keyed by get_attr target.
The format (``format_version`` 1)::

    {"format_version": 1,
     "input_specs": [{"name": "x", "shape": [null, 4], "dtype": "float32"}],
     "nodes": [
       {"name": "x", "op": "placeholder", "target": "x", "val": {"shape": ["s0", 4], "dtype": "float32"}},
       {"name": "l_weight", "op": "get_attr", "target": "l.weight"},
       {"name": "linear", "op": "call_function", "target": "aten::linear.default",
        "args": [{"node": "x"}, {"node": "l_weight"}, null], "kwargs": {}},
       {"name": "output", "op": "output", "target": "output", "args": [[{"node": "linear"}]], "kwargs": {}}],
     "symbols": {"s0": 3},                       # dynamic dim -> its example size
     "params": {"l.weight": {"kind": "parameter", "dtype": "float32", "shape": [4, 4], "stride": [4, 1],
                             "requires_grad": true}},
     "codegen": {"orig_args": ["x"], "in_spec": "<treespec_dumps>", "out_spec": "<treespec_dumps>"}}

Call targets and argument values are encoded by ``serialize_values.py``, the
weights' descriptions (``params``) and the module rebuilt from them by
``serialize_weights.py``. Node metadata is recomputed on load (``refresh_meta``);
QParams of one scale are kept.
"""
from __future__ import annotations

import json
import re
from typing import Dict, List, Optional

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from fxopt.errors import ArtifactError, describe_node
from fxopt.ir import meta as M
from fxopt.ir.graph import DimRange, Graph, InputSpec
from fxopt.ir.serialize_values import (  # noqa: F401  (BUILTIN_TARGETS, resolve_target: importable from here too)
    BUILTIN_TARGETS, DTYPES, dtype_name, lookup, resolve_target, target_to_json,
    value_from_json as _value_from_json, value_to_json as _value_to_json,
)
from fxopt.ir.serialize_weights import check_weights_described, param_to_json, weights_module

FORMAT_VERSION = 1

_NODE_OPS = ("placeholder", "get_attr", "call_function", "output")


# =================================================================== encode
def graph_to_json(graph: Graph) -> dict:
    """The graph's structure, input specs, pytree codegen and weight descriptions as a JSON-able dict."""
    symbols: Dict[str, int] = {}
    return {
        "format_version": FORMAT_VERSION,
        "input_specs": [_spec_to_json(s) for s in graph.input_specs],
        "nodes": [_node_to_json(graph, n, symbols) for n in graph.fx_graph.nodes],
        "symbols": symbols,
        "params": {target: param_to_json(graph, target, t) for target, t in graph.params().items()},
        "codegen": _codegen_to_json(graph.fx_graph),
    }


def _spec_to_json(spec: InputSpec) -> dict:
    entry = {"name": spec.name, "shape": list(spec.shape), "dtype": dtype_name(spec.dtype)}
    if any(spec.ranges):  # a dynamic capture's ranges: [label, low, high or null] per dim, null for static dims
        entry["ranges"] = [None if r is None else [r.label, r.low, r.high] for r in spec.ranges]
    return entry


def _spec_from_json(entry: dict) -> InputSpec:
    ranges = tuple(None if r is None else DimRange(str(r[0]), int(r[1]), None if r[2] is None else int(r[2]))
                   for r in entry.get("ranges", ()))
    return InputSpec(entry["name"], tuple(entry["shape"]), lookup(DTYPES, entry["dtype"], "dtype"), ranges)


def _node_to_json(graph: Graph, node: fx.Node, symbols: Dict[str, int]) -> dict:
    if node.op not in _NODE_OPS:
        raise ArtifactError(f"graph_to_json: {describe_node(node)}: {node.op} nodes cannot be saved; "
                            "inline the submodule (capture the model again) before saving")
    entry = {"name": node.name, "op": node.op, "target": target_to_json(node)}
    if node.op in ("call_function", "output"):
        entry["args"] = [_value_to_json(node, a) for a in node.args]
        entry["kwargs"] = {k: _value_to_json(node, v) for k, v in node.kwargs.items()}
    if node.op == "placeholder":
        entry["val"] = _placeholder_val_to_json(node, symbols)
    # Stack traces are not saved: they hold the building machine's source paths, and are most of the text.
    # Per-channel QParams are not saved either: their scales are weights of the graph already (MBs of JSON).
    qparams = node.meta.get(M.QPARAMS_KEY)
    if qparams is not None and torch.as_tensor(qparams.scale).numel() == 1:
        entry["qparams"] = _qparams_to_json(node, qparams)
    return entry


def _placeholder_val_to_json(node: fx.Node, symbols: Dict[str, int]) -> dict:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ArtifactError(f"graph_to_json: {describe_node(node)}: graph input has no tensor value; "
                            "run graph.refresh_meta() first")
    return {"shape": [_dim_to_json(d, symbols) for d in val.shape], "dtype": dtype_name(val.dtype)}


def _dim_to_json(dim, symbols: Dict[str, int]):
    if isinstance(dim, int):
        return dim
    name = str(dim.node.expr)
    symbols[name] = int(dim.node.hint)
    return name


def _qparams_to_json(node: fx.Node, q: M.QParams) -> dict:
    def field(value):
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().reshape(-1).tolist()
            return {"tensor": {"dtype": dtype_name(value.dtype), "shape": list(value.shape),
                               "values": [_value_to_json(node, v) for v in flat]}}
        return _value_to_json(node, value)

    return {"scale": field(q.scale), "zero_point": field(q.zero_point), "qdtype": q.qdtype, "scheme": q.scheme,
            "axis": q.axis, "group_size": q.group_size}


def _codegen_to_json(fx_graph: fx.Graph) -> Optional[dict]:
    codegen = fx_graph._codegen
    if not isinstance(codegen, _PyTreeCodeGen):
        return None
    info = codegen.pytree_info
    out_spec = pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None
    return {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec), "out_spec": out_spec}


# =================================================================== decode
def graph_from_json(data: dict, params: Dict[str, torch.Tensor]) -> Graph:
    """Rebuild a Graph from :func:`graph_to_json`'s dict and its weights (keyed by get_attr target)."""
    _check_format(data)
    try:
        return _build_graph(data, params)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"graph.json: malformed ({type(exc).__name__}: {exc}); the file is corrupted or was not "
                            "written by graph_to_json, save the artifact again") from exc


def _build_graph(data: dict, params: Dict[str, torch.Tensor]) -> Graph:
    fx_graph = fx.Graph()
    fx_graph._codegen = _codegen_from_json(data.get("codegen"))
    check_weights_described(data)
    nodes: Dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        nodes[entry["name"]] = _node_from_json(fx_graph, entry, nodes)
    module = fx.GraphModule(weights_module(data["params"], params), fx_graph)
    specs = [_spec_from_json(s) for s in data["input_specs"]]
    graph = Graph(module, specs)
    _set_placeholder_vals(graph, data["nodes"], data.get("symbols", {}))
    _recompute_meta(graph)
    _restore_qparams(graph, data["nodes"])
    return graph


def _check_format(data: dict) -> None:
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"graph.json: format_version {version!r}, this fxopt reads {FORMAT_VERSION}; "
                            "save the artifact again with this fxopt version")


def _codegen_from_json(entry: Optional[dict]) -> fx.graph.CodeGen:
    if entry is None:
        return fx.graph.CodeGen()
    out_spec = _treespec_loads(entry["out_spec"]) if entry["out_spec"] is not None else None
    return _PyTreeCodeGen(_PyTreeInfo(list(entry["orig_args"]), _treespec_loads(entry["in_spec"]), out_spec))


def _treespec_loads(text: str) -> pytree.TreeSpec:
    """treespec_loads, turning node types this process has not registered (e.g. HF ModelOutputs
    before ``import transformers``) into dicts with the same keys rather than failing."""
    try:
        return pytree.treespec_loads(text)
    except (KeyError, NotImplementedError, ValueError, TypeError):
        protocol, schema = json.loads(text)
        return pytree.treespec_loads(json.dumps([protocol, _unknown_types_as_dicts(schema)]))


def _unknown_types_as_dicts(schema: dict) -> dict:
    known = getattr(pytree, "SERIALIZED_TYPE_TO_PYTHON_TYPE", {})
    children = [_unknown_types_as_dicts(c) for c in schema["children_spec"]]
    kind = schema["type"]
    if kind is not None and kind not in known:
        keys = json.loads(schema["context"]) if schema["context"] else None
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ArtifactError(f"graph.json: output type {kind} is not registered with torch's pytree in this "
                                "process; import the library that defines it before loading")
        kind = "builtins.dict"
    return {**schema, "type": kind, "children_spec": children}


def _node_from_json(fx_graph: fx.Graph, entry: dict, nodes: Dict[str, fx.Node]) -> fx.Node:
    name, op = entry["name"], entry["op"]
    if op not in _NODE_OPS:
        raise ArtifactError(f"graph.json: node %{name}: unknown node kind {op!r}; the file is corrupted or "
                            "from another fxopt version")
    target = resolve_target(entry["target"], name) if op == "call_function" else entry["target"]
    args = tuple(_value_from_json(a, name, nodes) for a in entry.get("args", []))
    kwargs = {k: _value_from_json(v, name, nodes) for k, v in entry.get("kwargs", {}).items()}
    node = fx_graph.create_node(op, target, args, kwargs, name=name)
    if node.name != name:
        raise ArtifactError(f"graph.json: node %{name} was renamed %{node.name}; node names must be unique")
    return node


def _set_placeholder_vals(graph: Graph, entries: List[dict], symbols: Dict[str, int]) -> None:
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    sizes: Dict[str, torch.SymInt] = {}

    def size(dim):
        if isinstance(dim, int):
            return dim
        if dim not in sizes:
            source = ConstantSource(re.sub(r"\W", "_", dim))
            symbol = env.create_symbol(symbols[dim], source, dynamic_dim=DimDynamic.DYNAMIC)
            sizes[dim] = env.create_symintnode(symbol, hint=symbols[dim], source=source)
        return sizes[dim]

    vals = {e["name"]: e["val"] for e in entries if e["op"] == "placeholder"}
    for node in graph.placeholders:
        val = vals[node.name]
        with mode:
            fake = torch.empty([size(d) for d in val["shape"]], dtype=lookup(DTYPES, val["dtype"], "dtype"))
        M.set_val(node, fake)


def _recompute_meta(graph: Graph) -> None:
    try:
        graph.refresh_meta()
    except Exception as exc:  # an op's fake kernel can raise anything
        raise ArtifactError(
            f"graph.json: the saved graph does not run on this torch's ops: {type(exc).__name__}: {exc}; "
            "save the artifact again with this torch version"
        ) from exc


def _restore_qparams(graph: Graph, entries: List[dict]) -> None:
    by_name = {n.name: n for n in graph.fx_graph.nodes}
    for entry in entries:
        if "qparams" in entry:
            q = entry["qparams"]
            field = lambda v: _qparam_field(v, entry["name"])  # noqa: E731
            M.set_qparams(by_name[entry["name"]], M.QParams(
                field(q["scale"]), field(q["zero_point"]), q["qdtype"], q["scheme"], q["axis"], q["group_size"]))


def _qparam_field(value, node_name: str):
    if isinstance(value, dict) and "tensor" in value:
        body = value["tensor"]
        values = [_value_from_json(v, node_name, {}) for v in body["values"]]
        dtype = lookup(DTYPES, body["dtype"], "dtype")
        return torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else None).to(dtype).reshape(
            body["shape"])
    return _value_from_json(value, node_name, {})
