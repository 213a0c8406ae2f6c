"""Which nodes of a graph TVM can take: decided per op overload, cached, and given to torch.fx's partitioner.

    known = known_converters()                        # TVM's converter names and fxopt's own
    op_support(node, known).supported                 # False for aten.fft_rfft.default
    fallback_reasons(graph, known)                    # {node: "becomes aten._fft_r2c.default: no TVM converter"}
    CapabilityBasedPartitioner(gm, TvmOperatorSupport(known))

An op is supported when every op it becomes after the backend's decomposition
(:func:`~fxopt.backends.tvm_cuda.relax_import.decomposition_table`, the one the build
runs) has a converter. That is found once per op overload: the op is exported
alone, on tensors shaped like the first node's arguments, and decomposed like
the build does it; the answer is cached for the process. A node is supported
when its op is and no tensor it reads or writes is complex (TVM has no complex
dtype, so ``abs`` of an FFT cannot go to TVM although ``abs`` has a converter).
A weight (``get_attr``) goes with the region when every node reading it does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.utils import _pytree as pytree

from fxopt.errors import FxoptError, MetadataError, describe_node, op_name
from fxopt.ir.graph import Graph


@dataclass(frozen=True)
class OpSupport:
    """What one op overload becomes after decomposition, and which of those ops have no converter."""

    op: str
    becomes: Tuple[str, ...]
    missing: Tuple[str, ...]
    #: why the op could not be decomposed on its own (then it runs in PyTorch)
    error: Optional[str] = None

    @property
    def supported(self) -> bool:
        return not self.missing and self.error is None

    def reason(self) -> str:
        if self.error is not None:
            return f"could not be decomposed on its own ({self.error})"
        if self.missing == (self.op,):
            return "no TVM converter"
        return f"becomes {', '.join(self.missing)}: no TVM converter"


_CACHE: Dict[tuple, OpSupport] = {}


def known_converters(custom_convert_map: Optional[dict] = None) -> FrozenSet[str]:
    """The op names (``"linear.default"``, ``"getitem"``) the importer converts: TVM's table and fxopt's."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from fxopt.backends.tvm_cuda.converters import FXOPT_CONVERTERS

    return frozenset(ExportedProgramImporter().convert_map) | frozenset(FXOPT_CONVERTERS) | \
        frozenset(custom_convert_map or {})


def op_support(node: fx.Node, known: FrozenSet[str], kept_whole: Tuple = ()) -> OpSupport:
    """Whether ``node``'s op converts after decomposition; computed once per op overload (and converter set)."""
    key = (node.target, tuple(kept_whole), known)
    if key not in _CACHE:
        _CACHE[key] = _decide(node, known, kept_whole)
    return _CACHE[key]


def _decide(node: fx.Node, known: FrozenSet[str], kept_whole: Tuple) -> OpSupport:
    name = op_name(node)
    if not isinstance(node.target, torch._ops.OpOverload):  # operator.getitem and the like: converted by name
        have = getattr(node.target, "__name__", str(node.target)) in known
        return OpSupport(name, (name,), () if have else (name,))
    try:
        becomes = ops_after_decomposition(node, kept_whole)
    except FxoptError:  # a node without metadata: a broken graph, not an op TVM lacks
        raise
    except Exception as exc:  # an op that cannot be exported alone: leave it to PyTorch
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        return OpSupport(name, (), (), error=f"{type(exc).__name__}: {first_line}")
    missing = tuple(op for op, short in becomes if short not in known)
    return OpSupport(name, tuple(op for op, _ in becomes), missing)


def ops_after_decomposition(node: fx.Node, kept_whole: Tuple = ()) -> Tuple[Tuple[str, str], ...]:
    """The distinct ops ``node``'s op becomes in the build's decomposition, as ``(full name, converter key)``."""
    from fxopt.backends.tvm_cuda.relax_import import decomposition_table

    inputs = [a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    example = tuple(_example_tensor(n) for n in inputs)
    program = torch.export.export(_OneOp(node.target, node.args, node.kwargs), example, strict=False)
    program = program.run_decompositions(decomposition_table(kept_whole))
    found = {}
    for n in program.graph.nodes:
        if n.op == "call_function":
            found.setdefault(op_name(n), getattr(n.target, "__name__", str(n.target)))
    return tuple(found.items())


def _example_tensor(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if val is None:
        raise MetadataError(f"tvm-cuda: {describe_node(node)}: no fake value (meta['val']) to decide TVM support "
                            "from; run graph.refresh_meta() before lowering")
    if not isinstance(val, torch.Tensor):
        raise TypeError(f"argument %{node.name} is a {type(val).__name__}, not a tensor")
    return torch.empty(tuple(val.shape), dtype=val.dtype)  # never read: export traces with fake tensors


class _OneOp(torch.nn.Module):
    """Calls one op with the node's constant arguments and its tensor arguments as the module's inputs."""

    def __init__(self, op, args, kwargs):
        super().__init__()
        self.op, self.op_args, self.op_kwargs = op, args, kwargs

    def forward(self, *tensors):
        it = iter(tensors)
        args, kwargs = pytree.tree_map_only(fx.Node, lambda _: next(it), (self.op_args, self.op_kwargs))
        return self.op(*args, **kwargs)


def complex_dtype(node: fx.Node) -> Optional[torch.dtype]:
    """The first complex dtype among the tensors ``node`` reads or writes, else None."""
    for n in (node, *node.all_input_nodes):
        for leaf in pytree.tree_leaves(n.meta.get("val")):
            if isinstance(leaf, torch.Tensor) and leaf.dtype.is_complex:
                return leaf.dtype
    return None


def fallback_reason(node: fx.Node, known: FrozenSet[str], kept_whole: Tuple = ()) -> Optional[str]:
    """Why a call_function node must run in PyTorch, or None when TVM can take it."""
    support = op_support(node, known, kept_whole)
    if not support.supported:
        return support.reason()
    dtype = complex_dtype(node)
    if dtype is not None:
        return f"{str(dtype).replace('torch.', '')} tensors: TVM has no complex dtype"
    return None


def fallback_reasons(graph: Graph, known: FrozenSet[str], kept_whole: Tuple = ()) -> Dict[fx.Node, str]:
    """Every call_function node TVM cannot take, with the reason, in graph order."""
    reasons = {}
    for node in graph.call_nodes():
        reason = fallback_reason(node, known, kept_whole)
        if reason is not None:
            reasons[node] = reason
    return reasons


class TvmOperatorSupport(OperatorSupportBase):
    """torch.fx's operator-support interface over :func:`fallback_reason`; weights go with their readers."""

    def __init__(self, known: FrozenSet[str], kept_whole: Tuple = ()):
        super().__init__()
        self.known, self.kept_whole = known, tuple(kept_whole)

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        if node.op == "call_function":
            return fallback_reason(node, self.known, self.kept_whole) is None
        if node.op == "get_attr":
            return bool(node.users) and all(
                u.op == "call_function" and fallback_reason(u, self.known, self.kept_whole) is None for u in node.users
            )
        return False
