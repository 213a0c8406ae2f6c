"""Pass and PassResult: the unit of graph transformation.

A pass is a frozen dataclass whose fields are its options, with a dash-case
``name``. Calling a pass never changes the Graph it is given: it runs on a
structural copy (weights are shared, never modified in place) and returns the
new graph in a :class:`PassResult`. A pass that fails therefore leaves its
input untouched.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict

from fxopt.errors import PassError, describe_node
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of all passes. Subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    #: One line shown by ``fxopt passes``.
    summary: ClassVar[str] = ""
    #: True for passes that change numbers (quantization, pruning, low-rank):
    #: their equivalence is checked with a loss bound, not float tolerance.
    lossy: ClassVar[bool] = False

    def requires(self, graph: Graph) -> None:
        """Raise PassError when the graph lacks what this pass needs. Default: TensorInfo everywhere."""
        require_tensor_info(self, graph)

    def ensures(self, graph: Graph) -> None:
        """Raise PassError when the output breaks a promise of this pass. Default: nothing."""

    def run(self, graph: Graph) -> PassResult:
        raise NotImplementedError(f"{type(self).__name__} must implement run(graph)")

    def __call__(self, graph: Graph) -> PassResult:
        self.requires(graph)
        result = self.run(graph.copy())
        if result.modified:
            result.graph.recompile()
        self.ensures(result.graph)
        return result

    # ---------------------------------------------------------------- options
    def options(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The pipeline-spec form of this pass, listing options that differ from defaults."""
        changed = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if value != default:
                changed.append(f"{f.name.replace('_', '-')}={_format_option(value)}")
        return self.name + ("{" + ",".join(changed) + "}" if changed else "")

    def check_choices(self, option: str, values, valid, noun: str) -> None:
        """Raise PassError when a tuple option is empty or names values outside ``valid``."""
        unknown = [v for v in values if v not in valid]
        if unknown or not values:
            raise self.error(f"{option}={';'.join(values)!r} names unknown {noun} {unknown}",
                             hint=f"choose from {', '.join(valid)}")

    def error(self, message: str, node=None, hint: str = "") -> PassError:
        """A PassError in the house form: ``"<pass>: node %x (op): <problem>; <hint>"``."""
        where = f"{self.name}: node {describe_node(node)}" if node is not None else self.name
        return PassError(f"{where}: {message}" + (f"; {hint}" if hint else ""))


def require_tensor_info(pass_: Pass, graph: Graph) -> None:
    for node in graph.module.graph.nodes:
        if M.is_value_node(node) and M.node_info(node) is None:
            raise pass_.error(
                "has no TensorInfo", node, "capture the model with fxopt.capture, or call graph.refresh_meta()"
            )


def _format_option(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ";".join(_format_option(v) for v in value)
    return str(value)
