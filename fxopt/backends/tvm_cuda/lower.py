"""Lower an fxopt Graph to TVM Relax and build it for CUDA (TVM 0.27).

    mod = to_relax(graph)                      # tvm.IRModule with a Relax "main"
    lib = build(graph, dtype="float16")        # CudaLibrary: VM executable + kernel fatbin
    lib.export("model.so")                     # loads under the TVM runtime alone, no compiler

    lib = build(graph, keep_params_as_input=True)
    lib.export("model.so")                     # also writes model.params.json: the weights to pass, by name

The steps, in order:

1. ``torch.export`` the graph's GraphModule again (it is already ATen, so this
   is cheap: 0.3-0.6 s for the tiny HF models) and decompose it to core ATen;
2. check every op against the importer's converter table, so an op without a
   converter raises :class:`LoweringError` naming it, rather than an assert
   deep inside TVM;
3. import with ``from_exported_program``; fxopt's own ops go through
   ``custom_convert_map`` (see :mod:`fxopt.backends.tvm_cuda.converters`);
4. fp16: ``ToMixedPrecision`` on the fp32 import (fp16 matmuls with fp32
   accumulation); the importer cannot take a ``.half()`` model directly;
5. the CUDA pipeline: legalize, fuse, dlight default GPU schedules, then
   memory planning, optionally CUDA graphs;
6. compile the generated CUDA source to a fatbin with nvcc at build time, so
   the exported library never needs a compiler where it is loaded.

Weights as inputs (``keep_params_as_input=True``): the model's parameters are
not embedded (BERT-base in fp16 would make a 220 MB library). ``main`` takes
the user inputs, then the *transformed* weights; ``main_transform_params``
takes the fp32 weights as one tuple, in the order of
:attr:`CudaLibrary.param_names` (the graph's ``get_attr`` targets, i.e. the
model's ``state_dict`` keys), and returns them transformed: cast to fp16,
transposed for the matmuls, constant slices precomputed. It runs once at load
time, so no weight cast runs per call. Buffers and constants that passes
folded (``folded_*``) stay bound in the library.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

from fxopt.backends.tvm_cuda.runtime import PARAMS_FORMAT, params_json_path, tensor_crc32
from fxopt.errors import LoweringError
from fxopt.ir.graph import Graph

TARGET = "cuda"
DTYPES = ("float16", "float32")
#: ``build(matmul=...)``: "default" is dlight's gpu.Matmul (WMMA); "mma" tries
#: :class:`~fxopt.backends.tvm_cuda.matmul_mma.MatmulMMA` (ldmatrix + mma.sync + cp.async, sm_80+) first;
#: "cublaslt" calls cuBLASLt for 16-bit GEMMs and fxopt's fused kernel for fp16 attention
#: (:mod:`fxopt.backends.tvm_cuda.extension`, :mod:`fxopt.backends.tvm_cuda.offload`).
MATMULS = ("default", "mma", "cublaslt")

#: Converter signature taken by ``from_exported_program(custom_convert_map=...)``:
#: ``fn(node: torch.fx.Node, importer: BaseFXGraphImporter) -> relax.Var``; keys
#: are ``node.target.__name__`` such as ``"linear_act.default"``.
Converter = Callable[..., object]

#: The function ``LiftTransformParams`` makes from ``main``: fp32 weights in, transformed weights out.
TRANSFORM_PARAMS = "main_transform_params"


@dataclass(frozen=True)
class ParamSpec:
    """One weight the library takes at run time: its ``state_dict`` key, shape, dtype and a crc32 of its bytes."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    crc32: Optional[int] = None

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "crc32": self.crc32}



@dataclass
class CudaLibrary:
    """A built model: the Relax VM executable and its kernels compiled to a fatbin.

    ``executable`` holds the host code (LLVM) and a CUDA module that carries the
    CUDA *source*; ``fatbin`` is that source compiled by nvcc at build time, and
    :meth:`export` writes it into the library in place of the source.
    """

    executable: object  # tvm.runtime.Executable
    target: object  # tvm.target.Target
    cuda_source: str
    fatbin: Optional[bytes]
    #: graph input names, in ``main``'s order
    input_names: List[str] = field(default_factory=list)
    #: the weights ``main_transform_params`` takes, in order; empty when weights are embedded
    params: List[ParamSpec] = field(default_factory=list)
    #: shared libraries the VM calls into (the cuBLASLt extension); loaded before the library
    extensions: List[str] = field(default_factory=list)

    @property
    def param_names(self) -> List[str]:
        """The ordered weight names (``state_dict`` keys) the runtime must pass; empty when weights are embedded."""
        return [p.name for p in self.params]

    @property
    def params_as_input(self) -> bool:
        return bool(self.params)

    def params_manifest(self) -> dict:
        """What a runtime needs to call the library: entry points, input names and the weights in order."""
        return {
            "format": PARAMS_FORMAT, "entry": "main", "transform": TRANSFORM_PARAMS if self.params else None,
            "inputs": list(self.input_names), "params": [p.to_json() for p in self.params],
            "extensions": [os.path.basename(e) for e in self.extensions],
        }

    def export(self, path: str) -> str:
        """Write a shared library that ``tvm.runtime.load_module`` loads without a CUDA compiler.

        With weights as inputs, or extensions, also write :func:`params_json_path`
        (``model.params.json``) beside it; extensions are copied beside it too.
        """
        from fxopt.backends.tvm_cuda.device_binary import export_library

        export_library(self.executable, path, {self.cuda_source: self.fatbin} if self.fatbin else {})
        for extension in self.extensions:
            shutil.copyfile(extension, os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(extension)))
        if self.params or self.extensions:
            with open(params_json_path(path), "w") as f:
                json.dump(self.params_manifest(), f, indent=1)
        return path


# ---------------------------------------------------------------- to Relax
def to_relax(
    graph: Graph,
    custom_convert_map: Optional[Dict[str, Converter]] = None,
    keep_params_as_input: bool = False,
):
    """Import ``graph`` into a ``tvm.IRModule`` whose ``main`` takes the graph's inputs in order.

    Weights are bound as constants unless ``keep_params_as_input``; then ``main``
    takes them after the inputs and ``mod["main"].attrs["params"]`` holds them.
    """
    return _import(graph, custom_convert_map, keep_params_as_input)[0]


def _import(graph: Graph, custom_convert_map, keep_params_as_input: bool, keep_attention: bool = False):
    """``to_relax``, also returning ``(state_dict key, tensor)`` of each weight ``main`` takes after its inputs."""
    require_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    from fxopt.backends.tvm_cuda.converters import FXOPT_CONVERTERS

    converters = {**FXOPT_CONVERTERS, **(custom_convert_map or {})}
    program = exported_program(graph, KEPT_WHOLE if keep_attention else ())
    check_supported(program, converters)
    try:
        mod = from_exported_program(
            program, keep_params_as_input=keep_params_as_input, custom_convert_map=converters,
            run_ep_decomposition=False,  # exported_program() has decomposed already
        )
    except Exception as exc:  # the importer raises bare asserts, KeyErrors and TVM errors
        raise LoweringError(
            f"tvm-cuda: from_exported_program failed: {type(exc).__name__}: {_first_line(exc)}; "
            "the converter of one op rejected its arguments, see the chained traceback"
        ) from exc
    if not keep_params_as_input:
        return mod, []
    # The importer binds buffers and constants, and keeps the PARAMETER inputs, in signature order.
    kinds = torch.export.graph_signature.InputKind
    specs = [s for s in program.graph_signature.input_specs if s.kind is kinds.PARAMETER]
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    weights = [p.name for p in main.params[num_input:]]
    if weights != [s.arg.name for s in specs]:
        raise LoweringError(
            f"tvm-cuda: the imported main takes weights {weights[:3]}..., the exported program's parameters are "
            f"{[s.arg.name for s in specs][:3]}...; the importer's order changed"
        )
    return mod, [(s.target, program.state_dict[s.target]) for s in specs]


def exported_program(graph: Graph, kept_whole: Tuple = ()) -> "torch.export.ExportedProgram":
    """Re-export the graph's ATen GraphModule and decompose it to core ATen, the importer's best-covered set."""
    args, kwargs = _example_inputs(graph)
    try:
        program = torch.export.export(graph.module, args, kwargs=kwargs, strict=False)
        return program.run_decompositions(decomposition_table(kept_whole))
    except Exception as exc:
        raise LoweringError(
            f"tvm-cuda: torch.export of the captured graph failed: {type(exc).__name__}: {_first_line(exc)}; "
            "run graph.lint() to check the graph"
        ) from exc


#: Ops kept whole, for fxopt's fused attention kernel, rather than decomposed to core ATen:
#: SDPA imports to ``nn.attention``, one kernel instead of ~20 ops (its decomposition also adds
#: a NaN-safe softmax that costs more than the attention itself). Only with the kernel: TVM's
#: own ``nn.attention`` loses its bias and scale in ToMixedPrecision (see offload.py).
KEPT_WHOLE = (torch.ops.aten.scaled_dot_product_attention.default,)


def kept_whole_for(dtype: str, matmul: str) -> Tuple:
    """The ops :func:`build` keeps whole for these options (:data:`KEPT_WHOLE` with fxopt's fp16 attention)."""
    return KEPT_WHOLE if matmul == "cublaslt" and dtype == "float16" else ()


def decomposition_table(kept_whole: Tuple = ()):
    """torch.export's default core-ATen decompositions, less the ops in ``kept_whole``."""
    table = torch.export.default_decompositions()
    for op in kept_whole:
        table.pop(op, None)
    return table


def _example_inputs(graph: Graph) -> Tuple[tuple, dict]:
    """Zero tensors shaped like the input specs, put back into the module's (args, kwargs) structure."""
    leaves = []
    for spec in graph.input_specs:
        if any(d is None for d in spec.shape):
            raise LoweringError(
                f"tvm-cuda: input {spec.name} has a dynamic shape {spec.describe()}; "
                "the CUDA backend builds static shapes only, capture without dynamic_shapes"
            )
        leaves.append(torch.zeros(spec.shape, dtype=spec.dtype))
    in_spec = getattr(getattr(graph.module.graph._codegen, "pytree_info", None), "in_spec", None)
    if in_spec is None:
        return tuple(leaves), {}
    args, kwargs = pytree.tree_unflatten(leaves, in_spec)
    return tuple(args), dict(kwargs)


def check_supported(program, converters: Dict[str, Converter]) -> None:
    """Raise :class:`LoweringError` naming every op the importer has no converter for."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().convert_map) | set(converters)
    missing: List[str] = [
        f"%{node.name} ({node.target})" for node in program.graph.nodes
        if node.op == "call_function" and node.target.__name__ not in known
    ]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise LoweringError(
            f"tvm-cuda: node {', '.join(missing[:5])}{more}: no Relax converter; pass "
            "custom_convert_map={'<op>.<overload>': fn}, rewrite the op into supported ATen ops before lowering, "
            "or use fxopt.optimize(target='cuda'), which runs such ops in PyTorch between TVM regions"
        )


def require_tvm() -> None:
    """Raise :class:`LoweringError` with the install line when Apache TVM cannot be imported."""
    try:
        import tvm  # noqa: F401
    except ImportError as exc:
        raise LoweringError(
            f"tvm-cuda: Apache TVM is not importable ({exc}); pip install apache-tvm==0.27.0.post1 "
            "'apache-tvm-ffi>=0.1.14.post0,<0.1.15'"
        ) from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------ build
def cuda_target(arch: str = "sm_90"):
    """The TVM 0.27 CUDA target; targets are JSON dicts now (the ``"cuda -arch=..."`` string is refused)."""
    import tvm

    if not arch.startswith("sm_"):
        raise LoweringError(f"tvm-cuda: arch {arch!r} is not a CUDA SM name; use e.g. 'sm_90' or 'sm_90a'")
    return tvm.target.Target({"kind": "cuda", "arch": arch})


def build(
    graph: Graph,
    dtype: str = "float16",
    arch: str = "sm_90",
    cuda_graph: bool = False,
    compile_kernels: bool = True,
    fast_math: bool = False,
    custom_convert_map: Optional[Dict[str, Converter]] = None,
    keep_params_as_input: bool = False,
    matmul: str = "default",
) -> CudaLibrary:
    """Lower ``graph`` to a Relax VM executable for ``arch``, kernels compiled to a fatbin unless told not to.

    ``dtype="float16"`` computes matmuls in fp16 with fp32 accumulation; the
    graph's inputs and outputs keep their dtypes. ``cuda_graph`` turns on
    ``relax.backend.use_cuda_graph``: RewriteCUDAGraph lifts the static parts
    of ``main`` into functions captured once and replayed as CUDA graphs.
    ``fast_math`` compiles the kernels with nvcc ``--use_fast_math``.
    ``keep_params_as_input`` leaves the weights out of the library: ``main``
    takes them (transformed) after the inputs, ``main_transform_params``
    transforms them once, and :attr:`CudaLibrary.params` says which to pass.
    Buffers and pass-made constants stay embedded.
    ``matmul="mma"`` schedules fp16 matmuls whose sizes divide a tile with
    ldmatrix + mma.sync and a cp.async pipeline (sm_80+) instead of dlight's
    WMMA rule; the others fall back to it (benchmarks/results/gpu_gemm.md).
    It is **experimental**: correct in the standalone GEMM benchmark, but the
    whole BERT-base built with it fails on the H100 with
    ``cudaErrorMisalignedAddress`` (benchmarks/results/gpu_bert.md, second run).
    """
    require_tvm()
    import tvm

    from fxopt.backends.tvm_cuda import extension
    from fxopt.backends.tvm_cuda.device_binary import compile_fatbin, cuda_source, preload_tensor_intrinsics

    if dtype not in DTYPES:
        raise LoweringError(f"tvm-cuda: dtype {dtype!r} is not supported; valid dtypes: {', '.join(DTYPES)}")
    if matmul not in MATMULS:
        raise LoweringError(f"tvm-cuda: matmul {matmul!r} is not known; valid: {', '.join(MATMULS)}")
    target = cuda_target(arch)
    mod, weights = prepare(graph, dtype, keep_params_as_input, custom_convert_map,
                           fused_attention=matmul == "cublaslt")
    preload_tensor_intrinsics()
    config = {"relax.backend.use_cuda_graph": cuda_graph}
    if matmul == "mma":
        config["tirx.use_async_copy"] = True  # the MMA schedule's pipelined copies become cp.async
    with tvm.transform.PassContext(opt_level=3, config=config):
        try:
            executable = tvm.compile(mod, target=target, relax_pipeline=cuda_pipeline(target, matmul))
        except Exception as exc:
            raise LoweringError(
                f"tvm-cuda: building for {arch} failed: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
    source = cuda_source(executable)
    fatbin = compile_fatbin(source, target, fast_math) if compile_kernels else None
    extensions = [extension.extension_path()] if matmul == "cublaslt" and compile_kernels else []
    params = [
        ParamSpec(name, tuple(t.shape), str(t.dtype).replace("torch.", ""), tensor_crc32(t)) for name, t in weights
    ]
    return CudaLibrary(executable, target, source, fatbin, [s.name for s in graph.input_specs], params, extensions)


def prepare(
    graph: Graph,
    dtype: str = "float16",
    keep_params_as_input: bool = False,
    custom_convert_map: Optional[Dict[str, Converter]] = None,
    fused_attention: bool = False,
):
    """The Relax module :func:`build` compiles, before any target-specific pass, and the weights it takes.

    ``fused_attention`` (fp16 only) hands attention to fxopt's kernel,
    16-bit GEMMs to cuBLASLt, and residual add + LayerNorm and GELU to fxopt's
    kernels (:mod:`fxopt.backends.tvm_cuda.offload`): all after ToMixedPrecision
    but attention, before LiftTransformParams.

    Returns ``(mod, weights)``: ``weights`` lists ``(state_dict key, tensor)``
    in the order ``main_transform_params`` takes them (empty when the weights
    are bound). Target-independent, so tests compile it for llvm too.
    """
    from tvm import relax

    mod, weights = _import(graph, custom_convert_map, keep_params_as_input,
                           keep_attention=fused_attention and dtype == "float16")
    if keep_params_as_input:
        mod["main"] = mod["main"].without_attr("params")  # the fp32 values: unused, and they travel with mod
    use_extension = fused_attention and dtype == "float16"
    if use_extension:
        from fxopt.backends.tvm_cuda.offload import offload, offload_attention

        mod = offload_attention(mod)
    mod = to_mixed_precision(mod, dtype)
    if use_extension:
        # GEMMs, then LN/GELU; before LiftTransformParams, so the bias casts it adds run once, at load time
        mod = offload(mod)
    if keep_params_as_input:
        # After ToMixedPrecision, so the fp32->fp16 casts (and weight transposes) are lifted into
        # main_transform_params and run once at load time, not on every call.
        mod = relax.transform.LiftTransformParams()(mod)
    return mod, weights


def to_mixed_precision(mod, dtype: str):
    """For fp16, rewrite the fp32 module so matmuls and convs take fp16 and accumulate in fp32."""
    from tvm import relax

    if dtype == "float32":
        return mod
    return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)


def cuda_pipeline(target, matmul: str = "default"):
    """TVM's CUDA pipeline spelled out: what each stage is for is said inline."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    first = []
    if matmul == "mma":
        from fxopt.backends.tvm_cuda.matmul_mma import PIPELINE_CONFIGS, MatmulMMA, as_dlight_rule

        first = [as_dlight_rule(MatmulMMA(configs=PIPELINE_CONFIGS))]

    @tvm.transform.module_pass(opt_level=0, name="fxopt.tvm_cuda.pipeline")
    def pipeline(mod, _ctx):
        passes = [
            relax.backend.DispatchSampling(),  # library dispatch: sampling and sort/scan kernels
            relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),  # every Relax op -> a TIR PrimFunc
            relax.transform.AnnotateTIROpPattern(),  # mark elementwise / reduction / injective
            relax.transform.FoldConstant(),  # e.g. the fp16 casts of bound weights
            relax.transform.FuseOps(),  # matmul + bias + activation, reshapes into consumers
            relax.transform.FuseTIR(),
            dl.ApplyDefaultSchedule(  # thread bindings; Matmul uses WMMA tensor cores for fp16
                *first, dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback(),
            ),
            *cuda.dataflow_lower_passes(target),  # leave dataflow form, explicit calls
            *cuda.finalize_passes(target),  # memory planning, RewriteCUDAGraph, VM lowering
        ]
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline
