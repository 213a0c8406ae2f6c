"""fxopt: a compiler-style graph transformation toolkit for PyTorch models.

    graph = fxopt.capture(model, example_inputs)
    result = fxopt.Pipeline("cleanup")(graph)
    out = result.graph.run(*example_inputs)
"""
from fxopt import errors
from fxopt.errors import (
    ArtifactError, CaptureError, DeviceError, FxoptError, InputError, LoweringError, MetadataError, PassError, PatternError,
)
from fxopt.ir import Graph, QParams, TensorInfo, capture
from fxopt.passes import (
    AnyValue, ExamplePattern, Match, Op, OpPattern, Pass, PassResult, Pipeline, PipelineResult, RewritePass,
    Rewriter, Var, apply_patterns, register_pass, register_preset, registered_passes, registered_presets,
)

from fxopt.passes.quantize import calibrate
from fxopt import prune, train
from fxopt.api import load, optimize
from fxopt.bundle import pick, search_bundle
from fxopt.optimized import OptimizedModel
from fxopt import targets
from fxopt.targets import Target, register_target, registered_targets
from fxopt.backends.onnx_export import export_onnx

__version__ = "0.1.0"

__all__ = [
    "optimize", "load", "search_bundle", "pick", "OptimizedModel", "targets", "Target", "register_target", "registered_targets", "export_onnx", "capture", "calibrate", "prune", "train", "Graph", "TensorInfo", "QParams", "Pipeline", "PipelineResult", "Pass", "PassResult", "RewritePass",
    "Rewriter", "ExamplePattern", "OpPattern", "Op", "Var", "AnyValue", "Match", "apply_patterns", "register_pass",
    "register_preset", "registered_passes", "registered_presets", "errors", "FxoptError", "CaptureError",
    "PassError", "PatternError", "MetadataError", "LoweringError", "ArtifactError", "InputError", "DeviceError", "__version__",
]
