"""Targets: what ``fxopt.optimize`` builds for, one module each, all with the shape of :class:`Target`.

- ``eager`` (:mod:`fxopt.targets.eager`): the pipeline's graph run by PyTorch, the reference;
- ``x86-int8`` (:mod:`fxopt.targets.x86_int8`): static int8 on oneDNN's kernels for this CPU;
- ``cuda`` (:mod:`fxopt.targets.cuda`): TVM Relax with fxopt's kernels and cuBLASLt, for NVIDIA GPUs.

``register_target`` adds one: subclass :class:`Target`, give it a ``name`` and ``presets``, override what differs.
"""
from fxopt.targets.base import Build, BuildContext, Preset, Target
from fxopt.targets.registry import register_target, registered_targets, resolve_target, target_class
from fxopt.targets import eager, x86_int8, cuda  # noqa: F401  (registers the built-in targets, in this order)
from fxopt.targets.eager import EagerTarget
from fxopt.targets.x86_int8 import X86Int8Target
from fxopt.targets.cuda import CudaTarget

__all__ = ["Target", "Preset", "Build", "BuildContext", "register_target", "registered_targets", "resolve_target",
           "target_class", "EagerTarget", "X86Int8Target", "CudaTarget"]
