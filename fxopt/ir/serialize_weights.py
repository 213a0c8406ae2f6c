"""The weights of a Graph as graph.json describes them (kind, dtype, shape, stride), and the module rebuilt from
that description and the weight tensors stored beside it (e.g. safetensors)."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from fxopt.errors import ArtifactError
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.ir.serialize_values import dtype_name


def param_to_json(graph: Graph, target: str, tensor) -> dict:
    """How graph.json describes the weight at ``target``: parameter, buffer or constant, dtype, shape, stride."""
    if not isinstance(tensor, torch.Tensor):
        raise ArtifactError(f"graph_to_json: get_attr `{target}` is a {type(tensor).__name__}, not a tensor; "
                            "graphs with submodules (e.g. torch.cond branches) cannot be saved")
    return {"kind": _param_kind(graph.module, target), "dtype": dtype_name(tensor.dtype),
            "shape": list(tensor.shape), "stride": list(tensor.stride()), "requires_grad": bool(tensor.requires_grad)}


def _param_kind(module: torch.nn.Module, target: str) -> str:
    *path, attr = target.split(".")
    owner = M._fetch_attr(module, ".".join(path)) if path else module
    if attr in owner._parameters:
        return "parameter"
    if attr in owner._buffers:
        return "buffer"
    return "constant"


def check_weights_described(data: dict) -> None:
    """ArtifactError unless every get_attr node of graph.json reads a weight its ``params`` describe."""
    read = {e["target"] for e in data["nodes"] if e["op"] == "get_attr"}
    missing = sorted(read - set(data["params"]))
    if missing:
        raise ArtifactError(f"graph.json: get_attr nodes read {', '.join(missing)}, which `params` does not "
                            "describe; the file is corrupted, save the artifact again")


def weights_module(described: Dict[str, dict], params: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module holding each described weight at its dotted path, checked against its description."""
    root = torch.nn.Module()
    for target, spec in described.items():
        tensor = params.get(target)
        _check_weight(target, spec, tensor)
        *path, attr = target.split(".")
        owner = root
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, torch.nn.Module())
            owner = getattr(owner, part)
        _install(owner, attr, tensor, spec)
    return root


def _check_weight(target: str, spec: dict, tensor: Optional[torch.Tensor]) -> None:
    if tensor is None:
        raise ArtifactError(f"weights: no tensor for `{target}`, which graph.json reads; the weights file does not "
                            "belong to this graph, save the artifact again")
    if dtype_name(tensor.dtype) != spec["dtype"] or list(tensor.shape) != list(spec["shape"]):
        raise ArtifactError(
            f"weights: `{target}` is {dtype_name(tensor.dtype)}{list(tensor.shape)} but graph.json expects "
            f"{spec['dtype']}{spec['shape']}; the weights file does not belong to this graph, save the artifact again"
        )


def _install(owner: torch.nn.Module, attr: str, tensor: torch.Tensor, spec: dict) -> None:
    # get_attr of a plain tensor attribute: GraphModule turns it into a buffer, as capture's unlifting does
    tensor = _with_stride(tensor, spec.get("stride"))
    if spec["kind"] == "parameter":
        owner.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=spec["requires_grad"]))
    else:
        owner.register_buffer(attr, tensor)


def _with_stride(tensor: torch.Tensor, stride: Optional[List[int]]) -> torch.Tensor:
    """The tensor laid out with the saved strides (e.g. a transposed weight): kernels pick their path, and so
    their rounding, by layout. Broadcast (stride 0) weights stay contiguous."""
    if stride is None or list(tensor.stride()) == list(stride) or 0 in stride:
        return tensor
    return torch.empty_strided(tensor.shape, stride, dtype=tensor.dtype).copy_(tensor)
