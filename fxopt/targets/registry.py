"""Targets by name: the built-in ones and those a user adds with :func:`register_target`."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type, Union

from fxopt.errors import InputError
from fxopt.targets.base import Target

_TARGETS: Dict[str, Type[Target]] = {}


def register_target(cls: Type[Target]) -> Type[Target]:
    """Make a :class:`Target` subclass known by its ``name`` (a class decorator); the name must be new."""
    if not (isinstance(cls, type) and issubclass(cls, Target)):
        raise InputError(f"register_target: {cls!r} is not a subclass of fxopt.targets.Target")
    if not cls.name or not cls.presets or cls.default_preset not in cls.presets:
        raise InputError(f"register_target: {cls.__name__} needs a name and presets including its default_preset "
                         f"{cls.default_preset!r}")
    if cls.name in _TARGETS and _TARGETS[cls.name] is not cls:
        raise InputError(f"register_target: a target named {cls.name!r} exists ({_TARGETS[cls.name].__name__}); "
                         "choose another name")
    _TARGETS[cls.name] = cls
    return cls


def registered_targets() -> Dict[str, Type[Target]]:
    return dict(_TARGETS)


def target_class(name: str) -> Type[Target]:
    if name not in _TARGETS:
        raise InputError(f"unknown target {name!r}; valid targets: {', '.join(_TARGETS)}")
    return _TARGETS[name]


def resolve_target(target: Union[str, Target], options: Optional[Mapping[str, Any]] = None) -> Target:
    """A Target instance from a name (with ``options``) or an instance (which carries its own options)."""
    if isinstance(target, Target):
        if options:
            raise InputError(f"target {target.name!r}: options= goes with a target name; an instance carries its "
                             "own (e.g. X86Int8Target(compile='never'))")
        return target
    if not isinstance(target, str):
        raise InputError(f"target {target!r} is neither a target name ({', '.join(_TARGETS)}) nor a Target")
    return target_class(target)(**dict(options or {}))
