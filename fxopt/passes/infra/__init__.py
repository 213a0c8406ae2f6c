"""Pass infrastructure: Pass, Pipeline, the registry, the rewrite engine, and Batches (calibration data)."""
from fxopt.passes.infra.base import Pass, PassResult, calibration_field
from fxopt.passes.infra.batches import Batches
from fxopt.passes.infra.driver import RewritePass, Rewriter, apply_patterns
from fxopt.passes.infra.pattern import AnyValue, ExamplePattern, Match, Op, OpPattern, Var, node_argument
from fxopt.passes.infra.pipeline import Pipeline, PipelineResult
from fxopt.passes.infra.registry import (
    register_pass, register_preset, registered_passes, registered_presets,
)

__all__ = [
    "Pass", "PassResult", "calibration_field", "Batches", "RewritePass", "Rewriter", "apply_patterns", "AnyValue",
    "ExamplePattern", "Match", "Op", "OpPattern", "Var", "node_argument", "Pipeline", "PipelineResult",
    "register_pass", "register_preset", "registered_passes", "registered_presets",
]
