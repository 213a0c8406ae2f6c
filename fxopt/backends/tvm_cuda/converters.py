"""Relax converters for fxopt's own ops, passed to ``from_exported_program(custom_convert_map=...)``.

A converter is ``fn(node: torch.fx.Node, importer) -> relax.Var``. ``importer``
is the ``ExportedProgramImporter``: ``importer.env[n]`` is the Relax value of an
earlier node ``n`` and ``importer.block_builder.emit(expr)`` adds a binding.
The map's keys are ``node.target.__name__``, the op and overload without the
namespace: ``"linear_act.default"`` for ``torch.ops.fxopt.linear_act.default``.
"""
from __future__ import annotations

from typing import Callable, Dict


def _activation(name: str) -> Callable:
    from tvm import relax

    table = {
        "relu": relax.op.nn.relu, "gelu": relax.op.nn.gelu, "gelu_tanh": relax.op.nn.gelu_tanh,
        "silu": relax.op.nn.silu,
    }
    return table[name]  # the op's own check rejects any other name at capture time


def _linear_act(node, importer):
    """fxopt.linear_act(input, weight[out, in], bias?, activation): one matmul with its epilogue."""
    from tvm import relax

    x, weight, bias, activation = (importer.env.get(a, a) if a is not None else None for a in node.args)
    dtype = str(x.ty.dtype)  # unlike the stock aten.linear converter, do not force float32 (``.ty`` in 0.27)
    y = importer.block_builder.emit(relax.op.linear(x, weight, bias, out_dtype=dtype))
    return importer.block_builder.emit(_activation(activation)(y))


def _conv_act(node, importer):
    """fxopt.conv_act(input, weight, bias?, stride, padding, dilation, groups, activation) for 1-, 2- and 3-D convs."""
    from tvm import relax

    x, weight, bias = (importer.env[a] if a is not None else None for a in node.args[:3])
    stride, padding, dilation, groups, activation = node.args[3:8]
    convs = {1: relax.op.nn.conv1d, 2: relax.op.nn.conv2d, 3: relax.op.nn.conv3d}
    rank = len(stride)
    bb = importer.block_builder
    y = bb.emit(convs[rank](x, weight, stride, padding, dilation, groups, out_dtype=str(x.ty.dtype)))
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(bias, (1, -1) + (1,) * rank)))
    return bb.emit(_activation(activation)(y))


def _cumsum(node, importer):
    """aten.cumsum with torch's dtype: a bool or integer input sums in int64 unless ``dtype`` says otherwise.

    The stock converter keeps the input dtype, so GPT-2's ``cumsum(mask != 1)``
    became a *bool* cumsum: wrong values, and TVM's GPU scan kernel then stores
    4 bools as an 8-byte ``ushort4`` into shared memory (misaligned address on
    the H100).
    """
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    dtype = str(node.meta["val"].dtype).replace("torch.", "")
    return importer.block_builder.emit(relax.op.cumsum(x, dim, dtype))


def _pow_tensor_scalar(node, importer):
    """x ** n for a float x and n in 2..4 as multiplications: exact for negative x, and cheaper.

    TVM emits ``powf(x, 3.0f)``; compiled with ``--use_fast_math`` that is
    ``exp2(3 * log2(x))``, NaN for every negative x (GPT-2's gelu_new gave NaN).
    Every other case goes to the stock converter.
    """
    from tvm import relax

    x, exponent = importer.env.get(node.args[0]), node.args[1]
    whole = isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and float(exponent).is_integer()
    if x is None or not whole or not 2 <= exponent <= 4 or "float" not in str(x.ty.dtype):
        return importer._pow(node)
    result = x
    for _ in range(int(exponent) - 1):
        result = importer.block_builder.emit(relax.op.multiply(result, x))
    return result


#: Converters for every fxopt op the CUDA backend can lower, and fixes of stock ATen converters.
FXOPT_CONVERTERS: Dict[str, Callable] = {
    "linear_act.default": _linear_act,
    "conv_act.default": _conv_act,
    "cumsum.default": _cumsum,
    "pow.Tensor_Scalar": _pow_tensor_scalar,
}
