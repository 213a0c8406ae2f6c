"""Pipeline: an ordered list of passes, built from Pass objects or a spec string.

Spec grammar: ``name{opt=value,opt2=value},name2``. Option names are
dash-case forms of the pass's dataclass fields; values are parsed by the
field's type (``true``/``false``, numbers, strings; ``a;b`` for tuples).
A preset name expands to its spec.

Calibration data cannot be written in a spec: ``Pipeline(spec, calibration=batches)``
hands it to every pass that takes it (``Pass.takes_calibration``) and was not
given its own. The data stays with the passes, never on the graphs they return.
"""
from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from fxopt.errors import FxoptError, PassError
from fxopt.ir.graph import Graph
from fxopt.passes.infra import registry
from fxopt.passes.infra.base import CALIBRATION_FIELD, Pass, PassResult, option_fields
from fxopt.passes.infra.batches import as_batches

_ITEM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(\{([^{}]*)\})?\s*(,|$)")
DumpHook = Callable[[str, Graph], None]


@dataclass
class PipelineResult:
    graph: Graph
    results: List[PassResult] = field(default_factory=list)
    pass_names: List[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(r.modified for r in self.results)

    @property
    def stats(self) -> Dict[str, Dict[str, Any]]:
        return {f"{i}:{name}": r.stats for i, (name, r) in enumerate(zip(self.pass_names, self.results))}


class Pipeline:
    """Run passes in order. ``debug`` runs the verifier after every pass (also set by FXOPT_DEBUG=1).

    ``calibration`` (a list or DataLoader of input tuples, a generator, or :class:`Batches`) goes to the
    passes that take calibration data and were given none of their own.
    """

    def __init__(
        self,
        passes: Union[str, Sequence[Union[Pass, str]]],
        debug: Optional[bool] = None,
        dump: Optional[DumpHook] = None,
        calibration: Optional[Iterable] = None,
    ):
        parsed = parse(passes) if isinstance(passes, str) else _from_list(passes)
        data = None if calibration is None else as_batches(calibration)  # a generator is spilled once, for all
        self.passes: List[Pass] = [p.with_calibration(data) for p in parsed]
        self.debug = debug if debug is not None else os.environ.get("FXOPT_DEBUG") == "1"
        self.dump = dump

    @property
    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({self.spec!r})"

    def __len__(self) -> int:
        return len(self.passes)

    def __call__(self, graph: Graph) -> PipelineResult:
        result = PipelineResult(graph)
        if self.debug:
            graph.verify()
        for index, pass_ in enumerate(self.passes):
            step = self._run_one(pass_, result.graph, result.pass_names, index)
            result.results.append(step)
            result.pass_names.append(pass_.name)
            result.graph = step.graph
            if self.dump is not None:
                self.dump(pass_.name, step.graph)
        return result

    def _run_one(self, pass_: Pass, graph: Graph, ran: List[str], index: int) -> PassResult:
        try:
            step = pass_(graph)
            if self.debug:
                step.graph.verify()
            return step
        except Exception as exc:
            raise _in_context(exc, pass_, ran, index, len(self.passes)) from exc


def _in_context(exc: Exception, pass_: Pass, ran: List[str], index: int, total: int) -> FxoptError:
    before = ", ".join(ran) if ran else "none"
    message = f"pipeline step {index + 1}/{total} '{pass_.spec()}' failed (passes run before it: {before}): {exc}"
    cls = type(exc) if isinstance(exc, FxoptError) else PassError
    try:
        return cls(message)
    except TypeError:  # a user subclass with another signature
        return PassError(message)


# --------------------------------------------------------------------- parsing
def parse(spec: str) -> List[Pass]:
    """Parse a spec string into Pass objects, expanding presets."""
    passes: List[Pass] = []
    position = 0
    spec = spec.strip()
    while position < len(spec):
        item = _ITEM.match(spec, position)
        if item is None or item.end() == position:
            raise PassError(
                f"pipeline spec: cannot parse {spec[position:]!r} at character {position}; "
                "write passes as name{option=value,...} separated by commas"
            )
        name, options = item.group(1), item.group(3)
        preset = registry.preset_spec(name)
        if preset is not None:
            if options:
                raise PassError(f"pipeline spec: preset {name!r} takes no options; list its passes instead")
            passes.extend(parse(preset))
        else:
            passes.append(make_pass(name, _split_options(name, options or "")))
        position = item.end()
    if not passes:
        raise PassError("pipeline spec: empty; name at least one pass (see `fxopt passes`)")
    return passes


def make_pass(name: str, options: Dict[str, str]) -> Pass:
    """Instantiate a registered pass from string options, checking names and types."""
    cls = registry.pass_class(name)
    fields = {f.name: f for f in option_fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in options.items():
        attr = key.replace("-", "_")
        if attr == CALIBRATION_FIELD:
            raise PassError(f"{name}: calibration data cannot be written in a spec; "
                            "pass it as Pipeline(spec, calibration=batches)")
        if attr not in fields:
            valid = [f.replace("_", "-") for f in fields]
            raise PassError(registry.unknown_name_message(name, "option", key, valid))
        kwargs[attr] = parse_option_value(name, key, raw, hints[attr])
    try:
        return cls(**kwargs)
    except FxoptError:
        raise
    except (TypeError, ValueError) as exc:
        raise PassError(f"{name}: bad options {options}: {exc}") from exc


def _split_options(name: str, text: str) -> Dict[str, str]:
    options: Dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise PassError(f"{name}: option {part!r} is not key=value; write e.g. {name}{{ratio=0.5}}")
        options[key.strip()] = value.strip()
    return options


def parse_option_value(pass_name: str, key: str, raw: str, hint) -> Any:
    """Convert ``raw`` to the option's annotated type; PassError names the option on failure."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union and type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        return parse_option_value(pass_name, key, raw, hint)
    if origin is typing.Literal:
        if raw not in [str(a) for a in args]:
            raise PassError(f"{pass_name}: option {key}={raw!r} is not one of {', '.join(map(str, args))}")
        return next(a for a in args if str(a) == raw)
    if origin in (tuple, list):
        inner = args[0] if args else str
        return tuple(parse_option_value(pass_name, key, part, inner) for part in raw.split(";") if part)
    return _parse_scalar(pass_name, key, raw, hint)


def _parse_scalar(pass_name: str, key: str, raw: str, hint) -> Any:
    if hint is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise PassError(f"{pass_name}: option {key}={raw!r} is not a boolean; use true or false")
    if hint in (int, float):
        try:
            return hint(raw)
        except ValueError:
            raise PassError(f"{pass_name}: option {key}={raw!r} is not {'an integer' if hint is int else 'a number'}") from None
    return raw


def _from_list(items: Sequence[Union[Pass, str]]) -> List[Pass]:
    passes: List[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, str):
            passes.extend(parse(item))
        else:
            raise PassError(f"pipeline: {item!r} is neither a Pass nor a spec string")
    return passes
