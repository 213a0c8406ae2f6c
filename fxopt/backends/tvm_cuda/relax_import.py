"""Import an fxopt Graph into TVM Relax: re-export to core ATen, check every op has a converter, import.

    mod = to_relax(graph)                      # tvm.IRModule with a Relax "main"
    mod, weights = import_graph(graph, None, keep_params_as_input=True)

Steps 1-3 of :mod:`fxopt.backends.tvm_cuda.lower`: ``torch.export`` the
graph's GraphModule again and decompose it to core ATen (less the ops kept
whole for fxopt's kernels); check every op against the importer's converter
table, so an op without a converter raises :class:`LoweringError` naming it;
import with ``from_exported_program``, fxopt's own ops through
``custom_convert_map`` (:mod:`fxopt.backends.tvm_cuda.converters`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils import _pytree as pytree

from fxopt.errors import LoweringError
from fxopt.ir.graph import Graph

#: Converter signature taken by ``from_exported_program(custom_convert_map=...)``:
#: ``fn(node: torch.fx.Node, importer: BaseFXGraphImporter) -> relax.Var``; keys
#: are ``node.target.__name__`` such as ``"linear_act.default"``.
Converter = Callable[..., object]


def to_relax(
    graph: Graph,
    custom_convert_map: Optional[Dict[str, Converter]] = None,
    keep_params_as_input: bool = False,
):
    """Import ``graph`` into a ``tvm.IRModule`` whose ``main`` takes the graph's inputs in order.

    Weights are bound as constants unless ``keep_params_as_input``; then ``main``
    takes them after the inputs and ``mod["main"].attrs["params"]`` holds them.
    """
    return import_graph(graph, custom_convert_map, keep_params_as_input)[0]


def import_graph(graph: Graph, custom_convert_map, keep_params_as_input: bool, keep_attention: bool = False):
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
            f"tvm-cuda: from_exported_program failed: {type(exc).__name__}: {first_line(exc)}; "
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
            f"tvm-cuda: torch.export of the captured graph failed: {type(exc).__name__}: {first_line(exc)}; "
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


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


