"""``eager``: the pipeline's graph run by PyTorch, the reference every other target is measured against."""
from __future__ import annotations

from fxopt.backends import eager
from fxopt.targets.base import Preset, Target
from fxopt.targets.registry import register_target

#: Fusion is both the fastest eager pipeline and exact, so ``fast`` and ``balanced`` are the same pipeline here;
#: ``small`` also stores matrix weights in float16 (half the bytes, computed in float32 as before).
EAGER_PRESETS = {
    "fast": Preset("fuse", "fusion (exact)"),
    "balanced": Preset("fuse", "fusion (exact); the same as fast on eager"),
    "small": Preset("fuse,half-weights", "fusion, matrix weights stored in float16 (half the size)"),
}


@register_target
class EagerTarget(Target):
    name = "eager"
    presets = EAGER_PRESETS
    default_preset = "balanced"

    def lower(self, graph, example_inputs=(), progress=False, built_with=None):
        return eager.lower(graph)
