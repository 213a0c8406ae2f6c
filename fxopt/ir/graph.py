"""Graph: fxopt's IR, a thin wrapper over a ``torch.fx.GraphModule`` of ATen ops.

Weights are ``get_attr`` nodes. Passes read and change them through
:meth:`Graph.param`, :meth:`Graph.replace_param` and :meth:`Graph.add_param`;
tensors are never modified in place, so :meth:`Graph.copy` can share them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import InputError, MetadataError, describe_node
from fxopt.ir import meta as M

NodeOrName = Union[fx.Node, str]
#: Batch norm ops whose args 3 and 4 are the running mean and variance.
BATCH_NORMS = (torch.ops.aten._native_batch_norm_legit_no_training.default, torch.ops.aten.batch_norm.default,
               torch.ops.aten._native_batch_norm_legit.default, torch.ops.aten.native_batch_norm.default)


@dataclass(frozen=True)
class DimRange:
    """The sizes a dynamic dim takes: ``low`` to ``high`` inclusive (``high`` None: unbounded), as given to
    ``dynamic_shapes`` (``torch.export.Dim("batch", min=1, max=64)``)."""

    label: str
    low: int
    high: Optional[int]

    def __contains__(self, size: int) -> bool:
        return size >= self.low and (self.high is None or size <= self.high)

    def describe(self) -> str:
        return f"{self.label}={self.low}..{'' if self.high is None else self.high}"


@dataclass(frozen=True)
class InputSpec:
    """What a graph input must look like: ``None`` in ``shape`` marks a dynamic dim, whose range (where the
    capture knew it) is in ``ranges``, one entry per dim (None for static dims)."""

    name: str
    shape: Tuple[Optional[int], ...]
    dtype: torch.dtype
    ranges: Tuple[Optional[DimRange], ...] = ()

    def range_of(self, dim: int) -> Optional[DimRange]:
        return self.ranges[dim] if dim < len(self.ranges) else None

    def describe(self) -> str:
        dims = ", ".join(str(d) if d is not None else (self.range_of(i).describe() if self.range_of(i) else "?")
                         for i, d in enumerate(self.shape))
        return f"{str(self.dtype).replace('torch.', '')}[{dims}]"


class Graph:
    """An fx GraphModule plus the input specs it was captured with."""

    def __init__(self, module: fx.GraphModule, input_specs: Optional[Sequence[InputSpec]] = None):
        self.module = module
        self.input_specs: Tuple[InputSpec, ...] = tuple(
            input_specs if input_specs is not None else _specs_from_placeholders(module.graph)
        )

    # ----------------------------------------------------------------- access
    @property
    def fx_graph(self) -> fx.Graph:
        return self.module.graph

    @property
    def nodes(self) -> List[fx.Node]:
        return list(self.module.graph.nodes)

    @property
    def placeholders(self) -> List[fx.Node]:
        return [n for n in self.module.graph.nodes if n.op == "placeholder"]

    @property
    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.module.graph.nodes) if n.op == "output")

    def node(self, name: str) -> fx.Node:
        for n in self.module.graph.nodes:
            if n.name == name:
                return n
        raise MetadataError(f"graph: no node named %{name}; see graph.print() for the node names")

    def call_nodes(self, target=None) -> Iterator[fx.Node]:
        """call_function nodes, optionally only those whose target is ``target``."""
        for n in self.module.graph.nodes:
            if n.op == "call_function" and (target is None or n.target == target):
                yield n

    def __len__(self) -> int:
        return len(self.module.graph.nodes)

    # -------------------------------------------------------------------- run
    def run(self, *inputs, **kwargs):
        """Run the graph in eager PyTorch after checking inputs against the input specs."""
        self.check_inputs(inputs, kwargs)
        with torch.no_grad():
            return self.module(*inputs, **kwargs)

    __call__ = run

    def check_inputs(self, args: Sequence, kwargs: Optional[dict] = None) -> None:
        leaves = [x for x in pytree.tree_leaves((tuple(args), kwargs or {})) if x is not None]
        if len(leaves) != len(self.input_specs):
            expected = ", ".join(f"{s.name}: {s.describe()}" for s in self.input_specs)
            raise InputError(
                f"graph inputs: got {len(leaves)} tensors, expected {len(self.input_specs)} ({expected}); "
                "pass the same inputs as the example inputs given to capture()"
            )
        for spec, value in zip(self.input_specs, leaves):
            _check_one_input(spec, value)

    def sample_inputs(self, dynamic_size: int = 2, seed: int = 0) -> Tuple[torch.Tensor, ...]:
        """Inputs that pass :meth:`check_inputs`: seeded normal floats, ones for integers and bools (valid
        token ids, attention masks and indices); a dynamic dim takes ``dynamic_size``."""
        generator = torch.Generator().manual_seed(seed)
        inputs = []
        for spec in self.input_specs:
            shape = [dynamic_size if d is None else d for d in spec.shape]
            if spec.dtype.is_floating_point or spec.dtype.is_complex:
                inputs.append(torch.randn(shape, generator=generator, dtype=spec.dtype))
            else:
                inputs.append(torch.ones(shape, dtype=spec.dtype))
        return tuple(inputs)

    # ---------------------------------------------------------------- weights
    def param(self, node: NodeOrName) -> torch.Tensor:
        """The tensor a ``get_attr`` node refers to."""
        node = self._get_attr_node(node)
        return M._fetch_attr(self.module, node.target)

    def replace_param(self, node: NodeOrName, tensor: torch.Tensor) -> fx.Node:
        """Point a ``get_attr`` node at a new tensor (its metadata follows). Returns the node."""
        node = self._get_attr_node(node)
        old = self.param(node)
        owner, attr = _owner_and_attr(self.module, node.target)
        delattr(owner, attr)
        _store(owner, attr, tensor, as_parameter=isinstance(old, torch.nn.Parameter))
        M.infer_val(node, M.fake_mode_of(self.fx_graph), self.module)
        return node

    def add_param(self, name_hint: str, tensor: torch.Tensor, before: Optional[fx.Node] = None) -> fx.Node:
        """Store a new weight and return a ``get_attr`` node for it."""
        name = self._free_attr_name(name_hint)
        _store(self.module, name, tensor, as_parameter=False)
        anchor = before if before is not None else next(iter(self.module.graph.nodes))
        with self.module.graph.inserting_before(anchor):
            node = self.module.graph.get_attr(name)
        M.infer_val(node, M.fake_mode_of(self.fx_graph), self.module)
        return node

    def params(self) -> Dict[str, torch.Tensor]:
        """Every weight the graph reads, by get_attr target."""
        return {n.target: self.param(n) for n in self.module.graph.nodes if n.op == "get_attr"}

    def remove_unused_params(self) -> int:
        """Erase get_attr nodes nobody reads and drop every tensor no node refers to. Returns tensors dropped."""
        for n in list(self.module.graph.nodes):
            if n.op == "get_attr" and not n.users:
                self.module.graph.erase_node(n)
        referenced = {n.target for n in self.module.graph.nodes if n.op == "get_attr"}
        modules = tuple(f"{n.target}." for n in self.module.graph.nodes if n.op == "call_module")
        stored = [name for name, _ in self.module.named_parameters(remove_duplicate=False)]
        stored += [name for name, _ in self.module.named_buffers(remove_duplicate=False)]
        removed = 0
        for name in stored:
            if name not in referenced and not name.startswith(modules):
                owner, attr = _owner_and_attr(self.module, name)
                delattr(owner, attr)
                removed += 1
        return removed

    def batch_norm_statistics(self) -> set:
        """The weight targets a batch norm reads as its running mean or variance (never trained, never scored)."""
        return {a.target for n in self.call_nodes() if n.target in BATCH_NORMS
                for a in n.args[3:5] if isinstance(a, fx.Node) and a.op == "get_attr"}

    def param_count(self) -> int:
        return sum(t.numel() for t in self._unique_params())

    def size_bytes(self) -> int:
        """Bytes of weight storage, each shared tensor counted once."""
        return sum(t.numel() * t.element_size() for t in self._unique_params())

    def size_bytes_not_in(self, other: "Graph") -> int:
        """Bytes of weight storage that ``other`` does not share: what dropping this graph can free."""
        shared = {t.untyped_storage().data_ptr() for t in other.params().values()}
        return sum(t.numel() * t.element_size() for t in self._unique_params()
                   if t.untyped_storage().data_ptr() not in shared)

    def _unique_params(self) -> List[torch.Tensor]:
        seen, out = set(), []
        for t in self.params().values():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key not in seen:
                seen.add(key)
                out.append(t)
        return out

    # ------------------------------------------------------------- structure
    def copy(self) -> "Graph":
        """A structural copy: new nodes and module, the same (immutable) weight tensors."""
        new_fx = fx.Graph()
        new_fx._codegen = self.module.graph._codegen
        out = new_fx.graph_copy(self.module.graph, {})
        new_fx.output(out)
        return Graph(fx.GraphModule(self.module, new_fx), self.input_specs)

    def recompile(self) -> None:
        self.module.recompile()

    def refresh_meta(self) -> None:
        """Recompute every node's fake value and TensorInfo from the inputs' specs."""
        mode = M.fake_mode_of(self.fx_graph)
        for n in self.module.graph.nodes:
            if n.op == "get_attr" or n.op == "call_function":
                M.infer_val(n, mode, self.module)
            elif n.op == "placeholder":
                M.set_val(n, n.meta["val"])

    def verify(self, check_meta: bool = True) -> None:
        from fxopt.ir.verify import verify

        verify(self, check_meta=check_meta)

    def to_networkx(self):
        from fxopt.ir.nx import to_networkx

        return to_networkx(self)

    def format(self) -> str:
        from fxopt.ir.printer import format_graph

        return format_graph(self)

    def print(self) -> None:
        print(self.format())

    def __repr__(self) -> str:
        return f"<fxopt.Graph {len(self)} nodes, {self.param_count():,} params>"

    # ---------------------------------------------------------------- helpers
    def _get_attr_node(self, node: NodeOrName) -> fx.Node:
        node = self.node(node) if isinstance(node, str) else node
        if node.op != "get_attr":
            raise MetadataError(f"{describe_node(node)}: is not a weight (get_attr) node")
        return node

    def _free_attr_name(self, hint: str) -> str:
        base = re.sub(r"\W", "_", hint) or "param"
        name, i = base, 0
        while hasattr(self.module, name):
            i += 1
            name = f"{base}_{i}"
        return name


def _specs_from_placeholders(graph: fx.Graph) -> List[InputSpec]:
    specs = []
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise MetadataError(f"{describe_node(n)}: graph input is not a tensor; fxopt graphs take tensors only")
        shape = tuple(d if isinstance(d, int) else None for d in val.shape)
        specs.append(InputSpec(n.name, shape, val.dtype))
    return specs


def _check_one_input(spec: InputSpec, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise InputError(f"input {spec.name}: got {type(value).__name__}, expected a tensor {spec.describe()}")
    if value.dtype != spec.dtype:
        raise InputError(
            f"input {spec.name}: dtype {value.dtype} does not match the captured {spec.dtype}; "
            f"cast it with .to({spec.dtype})"
        )
    ok = len(value.shape) == len(spec.shape) and all(
        want is None or want == got for want, got in zip(spec.shape, value.shape)
    )
    if not ok:
        raise InputError(
            f"input {spec.name}: shape {list(value.shape)} does not match the captured {spec.describe()}; "
            "to allow other sizes, capture with dynamic_shapes (fxopt.optimize(..., dynamic_shapes=...) or "
            "fxopt.capture(..., dynamic_shapes=...))"
        )
    for dim, size in enumerate(value.shape):
        allowed = spec.range_of(dim)
        if allowed is not None and size not in allowed:
            raise InputError(
                f"input {spec.name}: dim {dim} ({allowed.label}) is {size}, outside its range "
                f"{allowed.low}..{'' if allowed.high is None else allowed.high} (dynamic_shapes); split or pad the "
                "input to fit, or capture again with a wider range"
            )


def _owner_and_attr(module: torch.nn.Module, target: str):
    *path, attr = target.split(".")
    owner = module
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def _store(owner: torch.nn.Module, attr: str, tensor: torch.Tensor, as_parameter: bool) -> None:
    if as_parameter:
        owner.register_parameter(attr, torch.nn.Parameter(tensor, requires_grad=tensor.requires_grad))
    else:
        owner.register_buffer(attr, tensor)
