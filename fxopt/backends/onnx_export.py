"""``fxopt.export_onnx(optimized, path)``: an fxopt graph as an ONNX model with QuantizeLinear/DequantizeLinear.

    optimized = fxopt.optimize(model, example_inputs, target="x86-int8", calibration_data=batches)
    fxopt.export_onnx(optimized, "minilm-int8.onnx")
    onnxruntime.InferenceSession("minilm-int8.onnx").run(None, {"input_ids": ..., "attention_mask": ...})

What comes out is the graph's own Q/DQ form (the "QDQ format" ONNX Runtime and
TensorRT read): activations as ``QuantizeLinear -> DequantizeLinear`` pairs with
the calibrated scale and zero point, weights as int8 initializers behind a
per-axis ``DequantizeLinear``, float16 weights (``half-weights``) behind a
``Cast``. Nothing is folded to float32, so the file is about the size of the
fxopt artifact and a runtime can fuse each DQ -> MatMul/Gemm/Conv -> Q group
into an int8 kernel. Inputs keep the graph's input names; outputs are the
graph's output leaves in order. Shapes are those the graph was captured with
(dims captured as dynamic stay dynamic).

Why torch.onnx (``dynamo=True``, onnxscript's torchlib) and not an emitter of
our own: fxopt graphs are ATen graphs, and torchlib already translates every
ATen op they contain (attention, layer norm, embedding, views, ...) and its
optimizer keeps Q/DQ ops out of constant folding. Tried on real MiniLM, it
failed only on fxopt's own ops. We add translations where it lacks one or is
loose (see :mod:`fxopt.backends.onnx_translations`): fxopt's fused
``linear_act``/``conv_act``; per-tensor Q whose code range is narrower than its
storage type (int7 codes); per-channel DQ with an explicit zero point, which
ONNX Runtime's fusions need. The optimizer runs as ``optimize=True`` would run
it, except that it never folds a float16 weight's upcast into float32. Then one
rewrite: a weight read as ``DequantizeLinear(axis=0) -> Transpose -> MatMul``
(how ``aten.linear`` is translated) becomes ``DequantizeLinear(axis=1) ->
MatMul`` on the transposed int8 initializer, the form QDQ fusions recognise.

Not exported (a :class:`~fxopt.errors.LoweringError` names the node): dynamic
activation quantization (``choose_qparams`` and the ``.tensor`` Q/DQ variants),
int4 group-wise weights and CSR sparse linears. Needs the ``[onnx]`` extra
(onnx, onnxscript).

ONNX Runtime: its basic-level ``MatMulAddFusion`` rewrites a 3-D ``MatMul + Add``
into ``Reshape -> Gemm -> Reshape`` before its QDQ fusions run, which hides the
``DQ -> MatMul`` pattern; create the session with
``disabled_optimizers=["MatMulAddFusion"]`` and every int8 linear runs as
``MatMulIntegerToFloat`` (measured with onnxruntime 1.32; the results agree either way).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from fxopt.errors import InputError, LoweringError, describe_node
from fxopt.ir.graph import Graph
from fxopt.ir.ops import fxopt_ops

WHERE = "export-onnx"
QD = torch.ops.quantized_decomposed
#: Above this many bytes of weights, tensors go to a side file (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
#: The Q/DQ and fxopt ops the export handles; other ops of these namespaces get a LoweringError.
SUPPORTED_SPECIAL_OPS = frozenset({
    QD.quantize_per_tensor.default, QD.dequantize_per_tensor.default,
    QD.quantize_per_channel.default, QD.dequantize_per_channel.default,
    fxopt_ops().linear_act.default, fxopt_ops().conv_act.default,
})
_SPECIAL_NAMESPACES = ("quantized_decomposed", "fxopt")
#: Hints for the special ops that are known not to export.
_UNSUPPORTED_HINTS = {
    "choose_qparams": "dynamic activation quantization has no QDQ export; quantize with "
                      "insert-qdq{scheme=static} after fxopt.calibrate, or scheme=weight-only",
    "dequantize_int4_grouped": "int4 group-wise weights have no ONNX export yet; use insert-qdq with bits=8",
    "csr_linear": "ONNX has no sparse matmul; export the graph as it was before the sparsify pass",
}


def export_onnx(optimized: Any, path: Union[str, os.PathLike], example_inputs: Optional[Sequence] = None) -> Path:
    """Write ``optimized`` (an :class:`fxopt.OptimizedModel` or :class:`fxopt.Graph`) to ``path`` as ONNX.

    ``example_inputs`` are only traced (never used for values); by default they are built from the graph's
    input specs. Returns the path written.
    """
    graph = _graph_of(optimized)
    check_exportable(graph)
    onnx_program = _torch_onnx_export(graph, _example_inputs(graph, example_inputs))
    fold_weight_transposes(onnx_program.model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path), external_data=graph.size_bytes() > EXTERNAL_DATA_BYTES)
    return path


def _graph_of(optimized: Any) -> Graph:
    graph = optimized if isinstance(optimized, Graph) else getattr(optimized, "graph", None)
    if not isinstance(graph, Graph):
        raise InputError(f"{WHERE}: expected an fxopt.OptimizedModel or fxopt.Graph, got "
                         f"{type(optimized).__name__}; call fxopt.optimize(model, example_inputs) first")
    return graph


def check_exportable(graph: Graph) -> None:
    """Raise LoweringError naming the first quantized_decomposed or fxopt op the export cannot translate."""
    for node in graph.call_nodes():
        namespace = getattr(node.target, "namespace", None)
        if namespace in _SPECIAL_NAMESPACES and node.target not in SUPPORTED_SPECIAL_OPS:
            name = node.target._opname
            hint = _UNSUPPORTED_HINTS.get(name, "file an fxopt issue naming the op")
            raise LoweringError(f"{WHERE}: node {describe_node(node)}: no ONNX translation for this op; {hint}")
    _require_onnx()


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise LoweringError(f"{WHERE}: needs {' and '.join(missing)}; install the extra: pip install 'fxopt[onnx]'")


# ------------------------------------------------------------------ export
def _example_inputs(graph: Graph, given: Optional[Sequence]) -> tuple:
    if given is not None:
        graph.check_inputs(tuple(given))
        return tuple(given)
    inputs = []
    for spec, node in zip(graph.input_specs, graph.placeholders):
        shape = [size if size is not None else _size_hint(node, dim) for dim, size in enumerate(spec.shape)]
        inputs.append(torch.zeros(shape, dtype=spec.dtype))
    return tuple(inputs)


def _size_hint(node, dim: int) -> int:
    value = node.meta.get("val")
    size = value.shape[dim] if value is not None else None
    hint = getattr(getattr(size, "node", None), "hint", None)
    if hint is None:
        raise InputError(f"{WHERE}: input %{node.name} has a dynamic dim {dim} with no size hint; "
                         "pass example_inputs=(...) to export_onnx")
    return int(hint)


def _dynamic_shapes(graph: Graph):
    if all(None not in spec.shape for spec in graph.input_specs):
        return None
    auto = torch.export.Dim.AUTO
    return tuple({d: auto for d, size in enumerate(spec.shape) if size is None} for spec in graph.input_specs)


def _torch_onnx_export(graph: Graph, inputs: tuple):
    from fxopt.backends.onnx_translations import translation_table

    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # torch.onnx prints progress
            # an ATen graph has no train-mode behaviour (and an exported module refuses .eval())
            warnings.filterwarnings("ignore", message=".*training mode.*")
            program = torch.onnx.export(graph.module, inputs, dynamo=True, external_data=False, optimize=False,
                                        custom_translation_table=translation_table(),
                                        dynamic_shapes=_dynamic_shapes(graph), verbose=False)
    except Exception as exc:  # torch.onnx raises its own error types; report them as ours
        raise _export_error(exc) from exc
    from onnxscript import optimizer

    optimizer.optimize_ir(program.model, should_fold=_keep_half_weights)  # what optimize=True runs, but ...
    return program


def _export_error(exc: Exception) -> LoweringError:
    """A LoweringError naming the node torch.onnx failed on (``%histc (aten.histc.default)``) when it says."""
    text = str(exc)
    found = re.search(r"translating node %(\S+) .*?target=(?:torch\.ops\.)?([\w.:]+)", text)
    where = f"node %{found.group(1)} ({found.group(2)})" if found else "the graph"
    problem = ("torch.onnx has no ONNX translation for this op" if "No ONNX function found" in text
               else f"torch.onnx failed to export it ({type(exc).__name__})")
    return LoweringError(f"{WHERE}: {where}: {problem}; rewrite the model without it, or add a translation to "
                         "fxopt.backends.onnx_translations (the chained exception has torch.onnx's report)")


def _keep_half_weights(node) -> Optional[bool]:
    """... never folds a float16/bfloat16 weight's upcast into a float32 initializer (twice the bytes)."""
    from onnxscript import ir

    source = node.inputs[0] if node.op_type == "Cast" and node.inputs else None
    if source is not None and source.is_initializer() and source.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
        return False
    return None  # the optimizer's own rules


# ---------------------------------------------------- weight transposes
def fold_weight_transposes(model) -> int:
    """``DQ(W, axis=0) -> Transpose([1, 0]) -> MatMul`` -> ``DQ(W.T, axis=1) -> MatMul``. Returns the count.

    Only where the int8 initializer, its DequantizeLinear and the Transpose have no other reader.
    """
    import numpy as np
    from onnxscript import ir

    count = 0
    for transpose in list(model.graph):
        dequant = _foldable_dequantize(transpose)
        if dequant is None:
            continue
        codes = dequant.inputs[0]
        transposed = ir.tensor(np.ascontiguousarray(codes.const_value.numpy().T), name=f"{codes.name}_t")
        new_codes = ir.Value(name=transposed.name, shape=ir.Shape(transposed.shape), type=ir.TensorType(codes.dtype),
                             const_value=transposed)
        model.graph.register_initializer(new_codes)
        dequant.replace_input_with(0, new_codes)
        dequant.attributes["axis"] = ir.AttrInt64("axis", 1)
        dequant.outputs[0].shape = ir.Shape(transposed.shape)
        transpose.outputs[0].replace_all_uses_with(dequant.outputs[0])
        model.graph.remove(transpose, safe=True)
        _drop_initializer(model.graph, codes)
        count += 1
    return count


def _foldable_dequantize(node):
    """The DequantizeLinear feeding ``node`` if ``node`` is a [1, 0] Transpose of a per-axis-0 int8 weight."""
    if node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != [1, 0]:
        return None
    dequant = node.inputs[0].producer()
    if dequant is None or dequant.op_type != "DequantizeLinear" or len(node.inputs[0].uses()) != 1:
        return None
    codes = dequant.inputs[0]
    if codes.const_value is None or len(codes.uses()) != 1 or codes.shape is None or len(codes.shape) != 2:
        return None
    if dequant.attributes.get_int("axis", 1) != 0 or dequant.attributes.get_int("block_size", 0):
        return None
    out = node.outputs[0]
    if out.is_graph_output() or not all(u.node.op_type == "MatMul" and u.idx == 1 for u in out.uses()):
        return None
    return dequant


def _drop_initializer(graph, value) -> None:
    if not value.uses() and value.name in graph.initializers:
        del graph.initializers[value.name]
