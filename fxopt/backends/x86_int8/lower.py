"""Lower a quantized Graph (Q/DQ form, from ``insert-qdq``) to int8 kernels on x86.

    %q  = quantize_per_tensor(%x, s, z, -128, 127, int8)       %y = call_module[int8_linear](%x)
    %dq = dequantize_per_tensor(%q, s, z, -128, 127, int8)  ->     oneDNN u8 x s8 -> int32 GEMM with
    %w  = dequantize_per_channel(%w_int8, %w_scale, ...)           scale, bias and gelu in its epilogue
    %y  = fxopt.linear_act(%dq, %w, %b, "gelu")

The same for the dynamic scheme (ranges chosen at run time) and for int8
embedding tables (``Int8Embedding`` gathers rows, then scales them). A linear
whose output feeds only another int8 linear hands over uint8 codes directly:
the requantization is fused into the first GEMM's epilogue.

Everything else runs as it is in PyTorch: LayerNorm, softmax, attention
matmuls, float layers kept by mixed precision. An op that reads dequantized
values but has no int8 kernel here (an int8 matmul between activations, a
conv) runs in float32 on those values, and one warning names such ops.

Where a C++ compiler exists, ``lower`` also compiles the quantized graph with
TorchInductor (``inductor.py``: the same oneDNN int8 GEMMs, with the ops between
them fused into generated C++) and keeps whichever of the two is faster.

The source of truth is the quantized Graph: ``lower`` never changes it, and
an artifact stores it and lowers again on load, for the loading CPU's ISA.
"""
from __future__ import annotations

import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from fxopt.backends.x86_int8 import inductor
from fxopt.backends.x86_int8.isa import Isa, detect_isa
from fxopt.backends.x86_int8.kernels import FUSED_ACTIVATIONS, ActivationCodes, Int8Embedding, Int8Linear
from fxopt.errors import LoweringError, describe_node, op_name
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.memory import release_dropped_graphs
from fxopt.ir.ops import fxopt_ops

aten = torch.ops.aten
QD = torch.ops.quantized_decomposed
TARGET = "x86-int8"
#: The submodule that holds each lowered node's int8 kernel module, under the node's name.
KERNELS = "int8_kernels"


def _q_targets():
    return {
        "static": (QD.quantize_per_tensor.default, QD.dequantize_per_tensor.default),
        "dynamic": (QD.quantize_per_tensor.tensor, QD.dequantize_per_tensor.tensor),
    }


def _dequantize_targets() -> set:
    return {QD.dequantize_per_tensor.default, QD.dequantize_per_tensor.tensor, QD.dequantize_per_channel.default,
            fxopt_ops().dequantize_int4_grouped.default}


@dataclass
class LoweringReport:
    """What ``lower`` did: int8 kernels placed, fused requantizations, float fallbacks."""

    isa: str
    int8_linears: int = 0
    int8_embeddings: int = 0
    fused_requantizations: int = 0
    fused_multipliers: int = 0
    #: Stored int8 weights of ops that run in float (weight-only layers): dequantized once, at load.
    dequantized_weights: int = 0
    inexact_activation_codes: List[str] = field(default_factory=list)
    float_fallbacks: Dict[str, List[str]] = field(default_factory=dict)
    #: Whether calls run the eager kernels or the Inductor-compiled graph, and why (``inductor.choose``).
    compiled: Optional[inductor.CompileOutcome] = None

    def as_dict(self) -> dict:
        return {"isa": self.isa, "int8_linears": self.int8_linears, "int8_embeddings": self.int8_embeddings,
                "fused_requantizations": self.fused_requantizations, "fused_multipliers": self.fused_multipliers,
                "dequantized_weights": self.dequantized_weights,
                "inexact_activation_codes": len(self.inexact_activation_codes),
                "float_fallbacks": {op: len(nodes) for op, nodes in self.float_fallbacks.items()},
                **({"kernel_path": self.compiled.as_dict()} if self.compiled else {})}


class X86Int8Module:
    """A quantized graph lowered to x86 int8 kernels: call it like the model's forward."""

    target = TARGET

    def __init__(self, graph: Graph, module: fx.GraphModule, isa: Isa, report: LoweringReport,
                 forward: Optional[Callable] = None):
        self.graph = graph  # the quantized source graph (what an artifact stores)
        self.module = module  # the graph on the eager int8 kernels; None when the compiled graph runs (freed)
        self.forward = forward or module  # what a call runs: ``module``, or the Inductor-compiled graph
        self.isa = isa
        self.report = report

    def __call__(self, *inputs, **kwargs):
        self.graph.check_inputs(inputs, kwargs)
        with torch.inference_mode():
            return self.forward(*inputs, **kwargs)

    def save(self, directory) -> str:
        from fxopt.backends.artifact import save_artifact
        return save_artifact(self.graph, directory, target=TARGET,
                             extra={"isa_at_build": self.isa.name, "lowering": self.report.as_dict()})


def lower(graph: Graph, isa: Optional[Isa] = None, warn: bool = True, compile: Optional[str] = None,
          example_inputs: Optional[Sequence[torch.Tensor]] = None, progress: bool = False,
          built_with: Optional[dict] = None) -> X86Int8Module:
    """Lower ``graph`` for ``isa`` (default: this CPU's). ``graph`` itself is not changed.

    ``compile`` picks the kernel path (``inductor.py``): ``"auto"`` (the default, or
    ``$FXOPT_X86_COMPILE``) compiles the graph with TorchInductor where a C++ compiler
    exists and keeps it if it is faster on ``example_inputs`` (default: inputs made
    from the graph's input specs); ``"always"`` keeps it whenever it compiles and
    agrees; ``"never"`` runs the eager oneDNN kernels. ``built_with`` (an artifact's lowering report): when
    neither ``compile`` nor the environment says otherwise, keep the path that build measured faster on this
    ISA instead of measuring again.
    """
    isa = isa or detect_isa()
    mode = inductor.compile_mode(compile, inductor.measured_mode(built_with or {}, isa.name))
    work = graph.copy()
    report = LoweringReport(isa.name)
    _fold_weight_upcasts(work)
    _lower_embeddings(work, report)
    compile_source = work.copy() if mode != "never" else None
    _lower_linears(work, isa, report)
    work.fx_graph.eliminate_dead_code()
    _fold_weight_dequantize(work, report)
    _fuse_requantization(work, report)
    work.remove_unused_params()
    _find_float_fallbacks(work, report)
    work.recompile()
    if warn:
        _warn(report)
    inputs = tuple(example_inputs) if example_inputs is not None else graph.sample_inputs()
    forward, report.compiled = inductor.choose(graph, work.module, mode, inputs,
                                               exact_codes=not report.inexact_activation_codes, progress=progress,
                                               compile_source=compile_source)
    if forward is work.module:
        return X86Int8Module(graph, work.module, isa, report)
    del work
    release_dropped_graphs()  # the eager kernels' float and packed weights: the compiled graph has its own
    return X86Int8Module(graph, None, isa, report, forward)


def load(directory, allow_torch_mismatch: bool = False, compile: Optional[str] = None) -> X86Int8Module:
    """Load an ``x86-int8`` artifact saved by :meth:`X86Int8Module.save` and lower it for this CPU
    (``compile`` as for :func:`lower`; ``"never"`` loads fastest)."""
    from fxopt.backends.artifact import load_artifact
    from fxopt.errors import ArtifactError
    graph, manifest = load_artifact(directory, allow_torch_mismatch)
    if manifest.get("target") != TARGET:
        raise ArtifactError(f"{directory}: the artifact's target is {manifest.get('target')!r}, not {TARGET!r}; "
                            f"load it with the backend for its target")
    return lower(graph, compile=compile, built_with=manifest.get("extra", {}).get("lowering"))


# ----------------------------------------------------------------- linears
def _fold_weight_upcasts(graph: Graph) -> None:
    """``_to_copy(%w_half, dtype=float32)`` of a stored weight (``half-weights``): upcast once, here."""
    for node in list(graph.call_nodes(aten._to_copy.default)):
        source = node.args[0]
        if _is_param(source) and set(node.kwargs) == {"dtype"}:
            upcast = graph.add_param(f"{source.target}_upcast", graph.param(source).to(node.kwargs["dtype"]),
                                     before=node)
            node.replace_all_uses_with(upcast)
            graph.fx_graph.erase_node(node)


def _lower_linears(graph: Graph, isa: Isa, report: LoweringReport) -> None:
    linear_act = fxopt_ops().linear_act.default
    for node in list(graph.call_nodes()):
        if node.target not in (aten.linear.default, linear_act):
            continue
        activation = node.args[3] if node.target == linear_act else "none"
        parts = _int8_linear_parts(graph, node)
        if parts is None:
            continue
        x, codes_spec, weight_codes, weight_scale, bias = parts
        levels = isa.activation_levels_for(weight_codes)
        codes = None
        if codes_spec is not None:
            codes, exact = ActivationCodes.for_levels(*codes_spec, levels=levels)
            if not exact:
                report.inexact_activation_codes.append(node.name)
        module = Int8Linear(weight_codes, weight_scale, bias, codes, activation, levels)
        multiplied = _channel_multiplier(graph, x, module.in_features) if codes is not None else None
        if multiplied is not None:
            x, multiplier = multiplied
            module.multiply_input(multiplier)
            report.fused_multipliers += 1
        _replace_with_module(graph, node, module, x)
        report.int8_linears += 1


def _int8_linear_parts(graph: Graph, node: fx.Node):
    """(float input, static code spec or None, int8 weight, weight scales, bias) when ``node`` has int8 kernels."""
    act, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not _is_float32(node):  # the kernels take and return float32; bf16/fp16 linears stay as they are
        return None
    source = _quantized_source(act)
    weight_parts = _per_channel_int8_weight(graph, weight, axis=0)
    if source is None or weight_parts is None or not (bias is None or _is_param(bias)):
        return None
    x, codes_spec = source
    return x, codes_spec, *weight_parts, (graph.param(bias) if bias is not None else None)


def _channel_multiplier(graph: Graph, x: fx.Node, channels: int) -> Optional[Tuple[fx.Node, torch.Tensor]]:
    """For ``x = mul(a, m)`` with a stored per-channel ``m`` that only quantizes read: ``(a, m)``.

    That is smooth-quant's ``x / s`` where it could not be folded into a LayerNorm
    (the residual reads the LayerNorm too); the int8 linear multiplies before quantizing.
    """
    if not (x.op == "call_function" and x.target == aten.mul.Tensor and len(x.args) == 2 and not x.kwargs):
        return None
    a, m = x.args
    quantizes = {targets[0] for targets in _q_targets().values()}
    if not (isinstance(a, fx.Node) and _is_param(m) and all(u.target in quantizes for u in x.users)):
        return None
    multiplier = graph.param(m)
    if multiplier.dim() != 1 or multiplier.numel() != channels or not _is_float32(a):
        return None
    return a, multiplier


def _quantized_source(act) -> Optional[Tuple[fx.Node, Optional[tuple]]]:
    """For ``dequantize(quantize(x))`` in int8 or uint8: ``(x, (scale, zp, qmin, qmax))``, or ``(x, None)`` if dynamic."""
    if not isinstance(act, fx.Node) or act.op != "call_function":
        return None
    for scheme, (q_target, dq_target) in _q_targets().items():
        q = act.args[0] if act.target == dq_target else None
        if not (isinstance(q, fx.Node) and q.target == q_target):
            continue
        x, scale, zp, qmin, qmax, dtype = q.args[:6]
        if dtype not in (torch.int8, torch.uint8) or (qmin, qmax) != tuple(act.args[3:5]):
            return None
        if scheme == "dynamic":
            return x, None
        return x, (float(scale), int(zp), int(qmin), int(qmax))
    return None


def _per_channel_int8_weight(graph: Graph, weight, axis: int):
    """(int8 codes, scales) of ``dequantize_per_channel(codes, scales, None, axis, ...)`` over stored weights."""
    if not (isinstance(weight, fx.Node) and weight.target == QD.dequantize_per_channel.default):
        return None
    codes, scales, zero_points, w_axis = weight.args[:4]
    if not (_is_param(codes) and _is_param(scales) and w_axis == axis):
        return None
    tensor = graph.param(codes)
    if tensor.dtype != torch.int8 or tensor.dim() != 2:
        return None
    if zero_points is not None:
        if not _is_param(zero_points) or graph.param(zero_points).abs().max() != 0:
            return None
    return tensor, graph.param(scales)


def _is_float32(node: fx.Node) -> bool:
    info = M.node_info(node)
    return isinstance(info, M.TensorInfo) and info.dtype == torch.float32


def _is_param(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def _replace_with_module(graph: Graph, node: fx.Node, module: torch.nn.Module, *args) -> fx.Node:
    """Replace ``node`` by a call of ``module``, kept as ``int8_kernels.<node name>`` (node names are unique)."""
    name = f"{KERNELS}.{node.name}"
    if not graph.module.add_submodule(name, module):
        raise LoweringError(f"x86-int8: node %{node.name}: the graph module's attribute {KERNELS!r} is not a module, "
                            "so the int8 kernels have nowhere to go; rename that parameter or buffer")
    with graph.fx_graph.inserting_before(node):
        new = graph.fx_graph.call_module(name, tuple(args))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.fx_graph.erase_node(node)
    return new


# -------------------------------------------------------------- embeddings
def _lower_embeddings(graph: Graph, report: LoweringReport) -> None:
    for node in list(graph.call_nodes(aten.embedding.default)):
        weight, ids = node.args[0], node.args[1]
        parts = _per_channel_int8_weight(graph, weight, axis=0)
        if parts is None or not _is_float32(node):  # Int8Embedding returns float32
            continue
        padding_idx = node.args[2] if len(node.args) > 2 else -1
        _replace_with_module(graph, node, Int8Embedding(*parts, None, padding_idx), ids)
        report.int8_embeddings += 1


def _fold_weight_dequantize(graph: Graph, report: LoweringReport) -> None:
    """``dequantize_per_channel`` of stored codes that no int8 kernel took (weight-only int8 layers, whose
    activations stay float): dequantize once, here, so each call runs a plain float GEMM. The artifact
    keeps the int8 codes; only memory holds the float copy."""
    for node in list(graph.call_nodes(QD.dequantize_per_channel.default)):
        codes, scales, zero_points = node.args[:3]
        if not (_is_param(codes) and _is_param(scales) and (zero_points is None or _is_param(zero_points))):
            continue
        values = [graph.param(a) if _is_param(a) else a for a in node.args]
        weight = node.target(*values, **node.kwargs)
        folded = graph.add_param(f"{codes.target}_dequantized", weight, before=node)
        node.replace_all_uses_with(folded)
        graph.fx_graph.erase_node(node)
        report.dequantized_weights += 1


# ---------------------------------------------------- fused requantization
def _fuse_requantization(graph: Graph, report: LoweringReport) -> None:
    """``int8_linear -> int8_linear`` with nothing in between: the first one emits the second one's codes."""
    for node in graph.fx_graph.nodes:
        consumer = _int8_linear(graph, node)
        if consumer is None or consumer.input_codes is None or consumer.input_multiplier is not None:
            continue
        source = node.args[0]
        producer = _int8_linear(graph, source)
        if producer is None or producer.output_codes is not None or len(source.users) != 1:
            continue
        if producer.activation not in FUSED_ACTIVATIONS:  # applied after the GEMM: it needs float output
            continue
        producer.output_codes = consumer.input_codes
        consumer.takes_codes = True
        report.fused_requantizations += 1


def _int8_linear(graph: Graph, node) -> Optional[Int8Linear]:
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    module = graph.module.get_submodule(node.target)
    return module if isinstance(module, Int8Linear) else None


# ----------------------------------------------------------------- reports
def _find_float_fallbacks(graph: Graph, report: LoweringReport) -> None:
    """Ops that read dequantized values and got no int8 kernel: they run in float32."""
    dequantize = _dequantize_targets()
    for node in graph.call_nodes():
        if node.target in dequantize or node.target is operator.getitem:
            continue
        reads = [a for a in node.all_input_nodes if a.op == "call_function" and a.target in dequantize]
        if reads:
            report.float_fallbacks.setdefault(op_name(node), []).append(node.name)


def _warn(report: LoweringReport) -> None:
    if report.float_fallbacks:
        ops = "; ".join(f"{op} x{len(nodes)} ({', '.join('%' + n for n in nodes[:3])}"
                        f"{', ...' if len(nodes) > 3 else ''})" for op, nodes in report.float_fallbacks.items())
        warnings.warn(f"x86-int8: no int8 kernel for {ops}; these run in float32 on dequantized inputs. "
                      f"To avoid the quantize/dequantize cost, leave them in float (e.g. insert-qdq"
                      f"{{activation-matmuls=false}} or skip=<node>)", stacklevel=3)
    if report.inexact_activation_codes:
        warnings.warn(f"x86-int8: this CPU ({report.isa}) has no VNNI, so its int8 GEMM saturates with 8-bit "
                      f"activations; {len(report.inexact_activation_codes)} linears use 7-bit activation codes "
                      f"over the calibrated ranges instead (less accurate). Calibrate with qdtype='int7' "
                      f"(fxopt.optimize does on such CPUs) to make the graph say what the kernels compute",
                      stacklevel=3)
