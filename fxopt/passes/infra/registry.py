"""The pass registry: ``@register_pass`` classes and named presets."""
from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Dict, List, Type

from fxopt.errors import PassError
from fxopt.passes.infra.base import Pass

_PASSES: Dict[str, Type[Pass]] = {}
_PRESETS: Dict[str, str] = {}
_DASH_CASE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(cls: Type[Pass]) -> Type[Pass]:
    """Class decorator: make a pass available to Pipeline specs by its ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PassError(f"register_pass: {cls!r} is not a subclass of fxopt.Pass; derive your pass from Pass")
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
        raise PassError(
            f"register_pass: {cls.__name__} must be a frozen dataclass; decorate it with @dataclass(frozen=True)"
        )
    if not _DASH_CASE.match(cls.name or ""):
        raise PassError(f"register_pass: {cls.__name__}.name {cls.name!r} must be dash-case, e.g. 'fold-conv-bn'")
    existing = _PASSES.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise PassError(
            f"register_pass: name {cls.name!r} is already taken by {existing.__module__}.{existing.__qualname__}; "
            "choose another name"
        )
    _PASSES[cls.name] = cls
    return cls


def register_preset(name: str, spec: str) -> None:
    """Name a pipeline spec so that other specs can use it like a pass."""
    if name in _PASSES:
        raise PassError(f"register_preset: {name!r} is already a pass name; choose another preset name")
    _PRESETS[name] = spec


def pass_class(name: str) -> Type[Pass]:
    try:
        return _PASSES[name]
    except KeyError:
        raise PassError(unknown_name_message("pipeline", "pass", name, sorted(_PASSES) + sorted(_PRESETS))) from None


def preset_spec(name: str):
    return _PRESETS.get(name)


def registered_passes() -> Dict[str, Type[Pass]]:
    return dict(sorted(_PASSES.items()))


def registered_presets() -> Dict[str, str]:
    return dict(sorted(_PRESETS.items()))


def unknown_name_message(where: str, kind: str, name: str, valid: List[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    plural = kind + ("es" if kind.endswith("s") else "s")
    return f"{where}: unknown {kind} {name!r}; {suggestion}valid {plural}: {', '.join(valid) or '(none)'}"
