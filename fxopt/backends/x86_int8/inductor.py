"""The x86 int8 graph compiled by TorchInductor: oneDNN's int8 GEMMs, generated C++ for everything else.

The quantized Graph is already in the form PyTorch's own int8 flow (PT2E)
hands to Inductor: ``quantized_decomposed`` quantize/dequantize around
linears, per-channel int8 weights. With ``freezing``, Inductor's quantization
patterns turn each ``dequantize -> linear(dequantize(w_int8))`` into the same
oneDNN ``qlinear_pointwise`` the eager kernels (``kernels.py``) call, with
prepacked weights, and fuse the ops between GEMMs (LayerNorm, smooth-quant's
multiply, quantize, residual adds) into C++ loops. At batch 1 that removes
most of the per-op dispatch and Python time, which dominates there
(``benchmarks/x86_int8_profile.py``).

Compiling needs a C++ compiler and takes from seconds (small models) to a
minute or more (BERT-base). ``lower`` therefore compiles only when asked, or
with ``compile="auto"`` (the default), measures both paths and keeps the
faster. The compiled module must also be as close to the quantized graph's
output as the eager kernels are (``AGREEMENT_FACTOR``); otherwise, or when
Inductor fails, the eager kernels run and the report says why.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch._inductor.config
import torch.fx as fx

from fxopt.errors import InputError
from fxopt.ir.graph import Graph
from fxopt.ir.ops import EPILOGUE_ACTIVATIONS, fxopt_ops
from fxopt.passes.quantize.mixed_precision import relative_output_error

#: How ``lower`` picks between the eager oneDNN kernels and the Inductor-compiled graph when not told:
#: ``auto`` (compile where a C++ compiler exists, keep the faster), ``always`` or ``never``.
COMPILE_ENV = "FXOPT_X86_COMPILE"
COMPILE_MODES = ("auto", "always", "never")
#: The compiled graph must be about as close to the quantized graph's own output (its Q/DQ ops run in float) as
#: the eager kernels are: within this factor of their relative error, plus ``AGREEMENT_SLACK``. Two int8
#: implementations of one graph round a few activations to neighbouring codes and so differ by ~1-5% on the
#: real MiniLM's last hidden state while their fidelity to fp32 is equal (cosine 0.9980 for both;
#: benchmarks/results/x86_int8_inductor_xeon.md); a wrong scale or layout is far outside this.
AGREEMENT_FACTOR = 1.5
AGREEMENT_SLACK = 1e-3
TIMING_REPEATS = 10
#: Inductor times each GEMM as oneDNN's ``qlinear_pointwise`` and as its own C++ micro-kernel template (AMX or
#: AVX-512 VNNI where the CPU has them) and keeps the faster: at MiniLM's batch 1 on the Xeon the template takes
#: 9 us where oneDNN takes 117 us per GEMM (benchmarks/results/x86_int8_inductor_xeon.md).
INDUCTOR_OPTIONS = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}

QD = torch.ops.quantized_decomposed
aten = torch.ops.aten
_ACTIVATIONS = {"relu": aten.relu.default, "gelu": aten.gelu.default, "silu": aten.silu.default}


@dataclass
class CompileOutcome:
    """What happened to the Inductor path, for the lowering report."""

    kernel_path: str  # "inductor" or "eager-kernels"
    reason: str
    compile_seconds: Optional[float] = None
    eager_ms: Optional[float] = None
    compiled_ms: Optional[float] = None

    def as_dict(self) -> dict:
        return {key: value for key, value in vars(self).items() if value is not None}


def compile_mode(requested: Optional[str], measured: Optional[str] = None) -> str:
    """``requested``, else ``$FXOPT_X86_COMPILE``, else ``measured`` (the path an artifact's build measured faster
    on this ISA: :func:`measured_mode`), else ``auto``; an unknown value is an ``InputError``."""
    mode = requested if requested is not None else os.environ.get(COMPILE_ENV, measured or "auto")
    aliases = {True: "always", False: "never", "1": "always", "0": "never"}
    mode = aliases.get(mode, mode)
    if mode not in COMPILE_MODES:
        raise InputError(f"x86-int8 compile={mode!r}: unknown mode; use one of {', '.join(COMPILE_MODES)} "
                         f"(or set {COMPILE_ENV})")
    return mode


def measured_mode(lowering: dict, isa_name: str) -> Optional[str]:
    """The compile mode that reproduces the kernel path a build chose by measurement (``lowering``: its report),
    so that loading does not compile and time both again: ``always`` where Inductor was faster, ``never`` where
    the eager kernels were. ``None`` where it was not measured or the build ran on another ISA than ``isa_name``."""
    path = lowering.get("kernel_path") or {}
    if path.get("reason") != "measured faster" or lowering.get("isa") != isa_name:
        return None
    return "always" if path.get("kernel_path") == "inductor" else "never"


def cpp_compiler() -> Optional[str]:
    """The C++ compiler Inductor would use, or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return get_cpp_compiler()
    except Exception:  # no compiler (RuntimeError), or an Inductor without this helper
        return None


def inductor_graph(graph: Graph) -> fx.GraphModule:
    """A copy of the quantized graph in the form Inductor's int8 patterns match.

    ``fxopt.linear_act`` becomes ``linear`` + activation (Inductor fuses them back
    into the qlinear epilogue), and symmetric per-channel weights get explicit
    zero points (Inductor's ``dequantize_per_channel`` lowering requires them).
    """
    work = graph.copy()
    work.fx_graph.eliminate_dead_code()  # e.g. the dequantized tables that ``lower``'s int8 embeddings replaced
    linear_act = fxopt_ops().linear_act.default
    for node in list(work.call_nodes(linear_act)):
        x, weight, bias, activation = node.args
        with work.fx_graph.inserting_before(node):
            linear = work.fx_graph.call_function(aten.linear.default, (x, weight, bias))
            replacement = (work.fx_graph.call_function(_ACTIVATIONS[activation], (linear,))
                           if activation in _ACTIVATIONS else _activation_call(work, linear, activation))
        node.replace_all_uses_with(replacement)
        work.fx_graph.erase_node(node)
    for node in list(work.call_nodes(QD.dequantize_per_channel.default)):
        if node.args[2] is None:
            channels = work.param(node.args[1]).numel()
            zero_points = work.add_param(f"{node.name}_zero_point", torch.zeros(channels, dtype=torch.int64),
                                         before=node)
            node.args = (*node.args[:2], zero_points, *node.args[3:])
    _unsigned_activation_codes(work)
    work.recompile()
    return work.module


def _unsigned_activation_codes(graph: Graph) -> int:
    """Signed int8 activation codes with a zero point become the same codes shifted to uint8 (``q + 128``, zero
    point ``z + 128``, range 0..255): exactly the same values after dequantization. oneDNN has no fast int8 GEMM
    for a *signed* source with a zero point on AVX2 or AVX-512 VNNI: it runs its reference loop ("ref_int8",
    measured 12 s against 4 ms for one 4096x384x384 GEMM on a Zen 4), while u8 x s8 is the form every x86 int8
    kernel takes (and the one PT2E's x86 quantizer emits). Returns how many quantize nodes changed."""
    changed = 0
    for node in list(graph.call_nodes(QD.quantize_per_tensor.default)):
        x, scale, zero_point, qmin, qmax, dtype = node.args
        users = list(node.users)
        if (qmin, qmax, dtype) != (-128, 127, torch.int8) or not users or not all(
                user.target == QD.dequantize_per_tensor.default and tuple(user.args[1:]) == tuple(node.args[1:])
                for user in users):
            continue
        unsigned = (scale, zero_point + 128, 0, 255, torch.uint8)
        node.args = (x, *unsigned)
        for user in users:
            user.args = (node, *unsigned)
        changed += 1
    return changed


def _activation_call(graph: Graph, linear: fx.Node, activation: str) -> fx.Node:
    if activation == "gelu_tanh":
        return graph.fx_graph.call_function(aten.gelu.default, (linear,), {"approximate": "tanh"})
    raise KeyError(f"no aten op for activation {activation!r} (known: {', '.join(EPILOGUE_ACTIVATIONS)})")


class CompiledGraph:
    """``torch.compile`` of the quantized graph with freezing; it compiles on the first call (and on a new shape).

    Freezing (weights inlined as constants, so the int8 weights can be prepacked
    at compile time) is switched on around each call rather than globally: Dynamo
    reads the setting when it traces, and the user's other compiles must not see it.
    """

    def __init__(self, graph: Graph):
        self.module = inductor_graph(graph)
        # A graph captured with static shapes runs at those shapes only (``check_inputs``): compile them as such.
        static = all(d is not None for spec in graph.input_specs for d in spec.shape)
        self.compiled = torch.compile(self.module, dynamic=False if static else None, options=INDUCTOR_OPTIONS)

    def __call__(self, *inputs, **kwargs):
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
            return self.compiled(*inputs, **kwargs)


def choose(graph: Graph, eager: Callable, mode: str, inputs: Sequence[torch.Tensor], exact_codes: bool,
           progress: bool = False, compile_source: Optional[Graph] = None) -> Tuple[Callable, CompileOutcome]:
    """The faster of the eager kernels and the compiled graph (or what ``mode`` forces), with why.

    ``graph`` is the quantized graph the outputs are checked against; ``compile_source``
    (default ``graph``) is what Inductor compiles: the same computation, e.g. with
    embeddings that gather int8 rows (``lower`` passes that, see ``lower._compile_source``).
    """
    refusal = _why_not_compile(graph, mode, exact_codes)
    if refusal:
        return eager, CompileOutcome("eager-kernels", refusal)
    if progress:
        print("fxopt x86-int8: compiling with TorchInductor (GEMM kernels autotuned: ~1 min for MiniLM on 2 cores), "
              "then timing it against the eager int8 kernels ...", file=sys.stderr, flush=True)
    try:
        compiled, seconds, compiled_err, eager_err = _compile_and_check(graph, compile_source or graph, eager,
                                                                        inputs)
    except Exception as exc:  # Inductor failures must not break lowering: the eager kernels always work
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        return eager, CompileOutcome("eager-kernels", f"TorchInductor failed: {type(exc).__name__}: {first_line}")
    if not compiled_err <= AGREEMENT_FACTOR * eager_err + AGREEMENT_SLACK:
        return eager, CompileOutcome("eager-kernels", f"the compiled graph is {compiled_err:.2g} (relative) from the "
                                                      f"quantized graph's output, the eager kernels {eager_err:.2g}",
                                     seconds)
    if mode == "always":
        return compiled, CompileOutcome("inductor", "compile=always", seconds)
    forward, outcome = _faster(eager, compiled, inputs, seconds)
    if progress:
        print(f"fxopt x86-int8: compiled in {seconds:.0f} s; {outcome.compiled_ms:.1f} ms compiled vs "
              f"{outcome.eager_ms:.1f} ms eager kernels: keeping the {outcome.kernel_path}", file=sys.stderr, flush=True)
    return forward, outcome


def _why_not_compile(graph: Graph, mode: str, exact_codes: bool) -> Optional[str]:
    if mode == "never":
        return "compile=never"
    if not exact_codes:
        return ("the graph's activation codes exceed what this CPU's int8 GEMM takes exactly (no VNNI); "
                "only the eager kernels narrow them")
    narrowed = _narrowed_activation_codes(graph)
    if narrowed:
        return (f"activations quantized to fewer levels than their dtype (e.g. %{narrowed}: int7 calibration); "
                f"Inductor's int8 patterns assume the full range (measured: 17% off on a test block)")
    if cpp_compiler() is None:
        return "no C++ compiler for TorchInductor (install g++)"
    return None


def _narrowed_activation_codes(graph: Graph) -> Optional[str]:
    """The first activation quantize whose ``[quant_min, quant_max]`` is not its dtype's whole range."""
    for node in graph.call_nodes(QD.quantize_per_tensor.default):
        qmin, qmax, dtype = node.args[3:6]
        info = torch.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):
            return node.name
    return None


def _faster(eager: Callable, compiled: Callable, inputs, compile_seconds: float) -> Tuple[Callable, CompileOutcome]:
    from fxopt.report.timing import compare_latency
    medians = compare_latency({"eager": eager, "compiled": compiled}, inputs, repeats=TIMING_REPEATS)
    eager_ms, compiled_ms = round(medians["eager"] * 1e3, 3), round(medians["compiled"] * 1e3, 3)
    faster = compiled_ms < eager_ms
    outcome = CompileOutcome("inductor" if faster else "eager-kernels", "measured faster", compile_seconds,
                             eager_ms, compiled_ms)
    return (compiled if faster else eager), outcome


def _compile_and_check(graph: Graph, source: Graph, eager: Callable, inputs: Sequence[torch.Tensor]
                       ) -> Tuple[Callable, float, float, float]:
    """The compiled ``source``, its compile seconds, and its and the eager kernels' relative error to ``graph``'s
    output (its Q/DQ ops run in float).

    The order keeps the peak low: the Q/DQ graph's run (it dequantizes every
    weight) before the compile, the eager kernels' (which packs their weights)
    after its temporaries are gone.
    """
    with torch.inference_mode():
        reference = graph.module(*inputs)
        compiled = CompiledGraph(source)
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # Inductor prints every GEMM's autotuning table
            got = compiled(*inputs)
        seconds = time.perf_counter() - started
        return compiled, round(seconds, 1), _relative_error(got, reference), _relative_error(eager(*inputs), reference)


def _relative_error(got, expected) -> float:
    """``||y - ŷ|| / ||y||`` over every float output (mixed precision's metric)."""
    floats = lambda out: [t for t in torch.utils._pytree.tree_leaves(out)  # noqa: E731
                          if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return relative_output_error([floats(expected)], [floats(got)])
