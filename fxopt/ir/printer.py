"""A readable listing of a Graph: one line per node with op, inputs, shape and dtype."""
from __future__ import annotations

import torch.fx as fx

from fxopt.errors import op_name
from fxopt.ir import meta as M


def format_graph(graph) -> str:
    lines = []
    for node in graph.module.graph.nodes:
        lines.append(_format_node(node))
    return "\n".join(lines)


def _format_node(node: fx.Node) -> str:
    if node.op == "output":
        return f"return {_format_args(node.args[0])}"
    info = _format_info(M.node_info(node))
    if node.op == "placeholder":
        return f"%{node.name}: {info} = input"
    if node.op == "get_attr":
        return f"%{node.name}: {info} = weight {node.target}"
    args = ", ".join(_format_args(a) for a in node.args)
    kwargs = ", ".join(f"{k}={_format_args(v)}" for k, v in node.kwargs.items())
    joined = ", ".join(part for part in (args, kwargs) if part)
    return f"%{node.name}: {info} = {op_name(node)}({joined})"


def _format_info(info) -> str:
    if info is None:
        return "-"
    if isinstance(info, tuple):
        return "(" + ", ".join(_format_info(i) for i in info) + ")"
    return str(info)


def _format_args(arg) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (tuple, list)):
        inner = ", ".join(_format_args(a) for a in arg)
        return f"[{inner}]"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_format_args(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, float):
        return repr(arg)
    return str(arg)
