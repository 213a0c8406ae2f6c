"""Pass and PassResult: the unit of graph transformation.

A pass is a frozen dataclass whose fields are its options, with a dash-case
``name``. Calling a pass never changes the Graph it is given: it runs on a
structural copy (weights are shared, never modified in place) and returns the
new graph in a :class:`PassResult`. A pass that fails therefore leaves its
input untouched.

A pass that reads calibration data (GPTQ, activation-aware low-rank, mixed
precision, Taylor pruning) declares a ``calibration`` field with
:func:`calibration_field`. The data is handed to it explicitly, never read from
the graph, and never written into it:

    LowRank(ratio=0.5, activation_aware=True, calibration=batches)(graph)
    Pipeline("low-rank{ratio=0.5,activation-aware=true}", calibration=batches)(graph)

The field is not an option: a spec string cannot set it and ``spec()`` leaves it out.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Iterable, List, Optional

from fxopt.errors import PassError, describe_node
from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.passes.infra.batches import Batches, as_batches

#: The name of the field through which a pass takes calibration data (see :func:`calibration_field`).
CALIBRATION_FIELD = "calibration"


def calibration_field():
    """Declare a pass's ``calibration`` field: calibration batches (:class:`Batches`, or a list or DataLoader of
    input tuples, made :class:`Batches` by ``Pass.__post_init__``), None by default, left out of specs,
    equality and repr."""
    return field(default=None, compare=False, repr=False)


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

    def __post_init__(self):
        """Make given calibration data :class:`Batches` once (a one-shot generator is spilled once, here).
        Subclasses that take calibration data and define ``__post_init__`` call this one."""
        data = getattr(self, CALIBRATION_FIELD, None)
        if data is not None:
            object.__setattr__(self, CALIBRATION_FIELD, as_batches(data))

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

    # ------------------------------------------------------- calibration data
    @classmethod
    def takes_calibration(cls) -> bool:
        """True for passes with a ``calibration`` field (:func:`calibration_field`)."""
        return any(f.name == CALIBRATION_FIELD for f in dataclasses.fields(cls))

    def with_calibration(self, data: Optional[Iterable]) -> "Pass":
        """This pass, given ``data`` if it takes calibration data and has none of its own; else itself."""
        if data is None or not self.takes_calibration() or getattr(self, CALIBRATION_FIELD) is not None:
            return self
        return dataclasses.replace(self, **{CALIBRATION_FIELD: data})

    def require_calibration(self, needed_by: str, node=None, instead: str = "") -> Batches:
        """The calibration batches given to this pass; a PassError saying how to give them when there are none.

        ``needed_by`` names the option that needs them (``"method=gptq"``); ``instead`` the way around them.
        """
        data = getattr(self, CALIBRATION_FIELD, None)
        if data is None:
            hint = (f"pass it as {type(self).__name__}(..., calibration=batches) or "
                    "Pipeline(spec, calibration=batches), batches a list of input tuples")
            raise self.error(f"{needed_by} needs calibration data and none was given", node,
                             hint + (f", or {instead}" if instead else ""))
        batches = as_batches(data)
        if batches.is_empty():
            raise self.error(f"{needed_by} needs calibration data and the calibration given has no batches", node,
                             "pass at least one input tuple")
        return batches

    # ---------------------------------------------------------------- options
    def options(self) -> Dict[str, Any]:
        """The options (every field but ``calibration``, which is data) by field name."""
        return {f.name: getattr(self, f.name) for f in option_fields(self)}

    def spec(self) -> str:
        """The pipeline-spec form of this pass, listing options that differ from defaults."""
        changed = []
        for f in option_fields(self):
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


def option_fields(pass_or_class) -> List[dataclasses.Field]:
    """The dataclass fields of a pass that are options (settable in a spec): all but ``calibration``."""
    return [f for f in dataclasses.fields(pass_or_class) if f.name != CALIBRATION_FIELD]


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
