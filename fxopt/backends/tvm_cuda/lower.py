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

from typing import Dict, Optional

from fxopt.backends.tvm_cuda.convert_fp8 import LINEAR_FP8
from fxopt.backends.tvm_cuda.convert_int4 import LINEAR_INT4, takes_kernel
from fxopt.backends.tvm_cuda.convert_int8 import LINEAR_INT8
from fxopt.backends.tvm_cuda.library import TRANSFORM_PARAMS, CudaLibrary, ParamSpec
from fxopt.backends.tvm_cuda.relax_import import (
    KEPT_WHOLE, Converter, check_supported, decomposition_table, exported_program, first_line, import_graph,
    kept_whole_for, require_tvm, to_relax,
)
from fxopt.backends.tvm_cuda.runtime import params_json_path, tensor_crc32
from fxopt.errors import LoweringError
from fxopt.ir.graph import Graph

__all__ = [
    "TARGET", "DTYPES", "MATMULS", "TRANSFORM_PARAMS", "CudaLibrary", "ParamSpec", "Converter", "KEPT_WHOLE",
    "build", "prepare", "to_relax", "to_mixed_precision", "cuda_pipeline", "cuda_target", "exported_program",
    "check_supported", "decomposition_table", "kept_whole_for", "require_tvm", "params_json_path",
]

TARGET = "cuda"
DTYPES = ("float16", "float32")
#: ``build(matmul=...)``: "default" is dlight's gpu.Matmul (WMMA); "mma" tries
#: :class:`~fxopt.backends.tvm_cuda.matmul_mma.MatmulMMA` (ldmatrix + mma.sync + cp.async, sm_80+) first;
#: "cublaslt" calls cuBLASLt for 16-bit GEMMs and fxopt's fused kernel for fp16 attention
#: (:mod:`fxopt.backends.tvm_cuda.extension`, :mod:`fxopt.backends.tvm_cuda.offload`).
MATMULS = ("default", "mma", "cublaslt")

#: ``import_graph`` under the name earlier callers (and tests) use.
_import = import_graph


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
    check_extension_ops(graph, matmul)
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
                f"tvm-cuda: building for {arch} failed: {type(exc).__name__}: {first_line(exc)}"
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
    but attention, before LiftTransformParams. Every GELU is made one
    ``fxopt.fused_gelu`` op first (:class:`~fxopt.passes.fusion.fuse_gelu.FuseGelu`),
    so Relax finds GELU by its op.

    Returns ``(mod, weights)``: ``weights`` lists ``(state_dict key, tensor)``
    in the order ``main_transform_params`` takes them (empty when the weights
    are bound). Target-independent, so tests compile it for llvm too.
    """
    from tvm import relax

    use_extension = fused_attention and dtype == "float16"
    if use_extension:
        from fxopt.passes.fusion.fuse_gelu import FuseGelu

        graph = FuseGelu()(graph).graph
    mod, weights = import_graph(graph, custom_convert_map, keep_params_as_input, keep_attention=use_extension)
    if keep_params_as_input:
        mod["main"] = mod["main"].without_attr("params")  # the fp32 values: unused, and they travel with mod
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


def check_extension_ops(graph, matmul: str) -> None:
    """fp8 and int8 linears (and int4 ones of up to 64 rows) run only through fxopt's CUDA extension: refuse any
    other matmul path, naming the nodes."""
    def needs_extension(node) -> bool:
        name = getattr(node.target, "__name__", "")
        if name == LINEAR_INT4:
            shape = getattr(node.args[0].meta.get("val"), "shape", None)
            return shape is not None and takes_kernel(tuple(shape), int(node.args[1].meta["val"].shape[0]),
                                                      node.args[4])
        return name in (LINEAR_FP8, LINEAR_INT8)

    nodes = [n.name for n in graph.call_nodes() if needs_extension(n)]
    if nodes and matmul != "cublaslt":
        listed = ", ".join(nodes[:5]) + (" ..." if len(nodes) > 5 else "")
        raise LoweringError(f"tvm-cuda: fp8, int8 and int4 linears ({listed}) run in fxopt's CUDA extension and "
                            f"need matmul='cublaslt', not matmul={matmul!r}; build with matmul='cublaslt' or "
                            "quantize them otherwise")
