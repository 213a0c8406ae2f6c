"""fxopt's IR: an fx GraphModule of ATen ops with metadata on every node."""
from fxopt.ir.capture import capture
from fxopt.ir.graph import Graph, InputSpec
from fxopt.ir.meta import QParams, TensorInfo, node_info, qparams, set_qparams, tensor_info

__all__ = [
    "capture", "Graph", "InputSpec", "TensorInfo", "QParams",
    "tensor_info", "node_info", "qparams", "set_qparams",
]
