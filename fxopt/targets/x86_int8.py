"""``x86-int8``: smooth-quant and static int8 (embedding tables too) on oneDNN's int8 kernels for this CPU's ISA,
compiled with TorchInductor where that measures faster (``compile``)."""
from __future__ import annotations

import time
import warnings
from typing import Optional

from fxopt.backends import x86_int8
from fxopt.backends.x86_int8.inductor import COMPILE_MODES
from fxopt.backends.x86_int8.isa import ISA_ORDER, isa_by_name, lacks
from fxopt.errors import ArtifactError
from fxopt.passes.quantize.mixed_precision import run_outputs
from fxopt.search import run_outputs_of
from fxopt.targets.base import Build, Preset, Target, say
from fxopt.targets.candidates import candidate, float_candidates
from fxopt.targets.registry import register_target, target_class
from fxopt.targets.x86_quantize import calibrate_for_x86, float_layers_for, insert_qdq_for_x86, quantize_with

X86_PRESETS = {
    "fast": Preset("fuse", "every linear int8, on every CPU", {"float_share": 0.0}),
    "balanced": Preset("fuse", "int8; on CPUs without VNNI the 25% most sensitive linears keep float "
                               "activations (same size, closer to float)", {"float_share": None}),
}


@register_target
class X86Int8Target(Target):
    name = x86_int8.TARGET
    presets = X86_PRESETS
    default_preset = "balanced"
    #: compile: None: $FXOPT_X86_COMPILE, else the path the saved build measured faster, else auto (measure both).
    #: isa: the deployment CPU's int8 instructions (None: this CPU's); the weight format follows it (7-bit weights
    #: only for avx2). isa_fallback (fxopt.load): load on a CPU that lacks the ISA the artifact was built for,
    #: with a warning, instead of an ArtifactError.
    options = {"compile": (None, *COMPILE_MODES), "isa": (None, *ISA_ORDER), "isa_fallback": (False, True)}
    calibrates = True

    def build(self, context):
        started = time.perf_counter()
        isa = self.built_for()
        say(context.progress, f"fxopt x86-int8: smooth-quant, calibrate int8 ranges, insert Q/DQ for {isa.name} ...")
        quantized, spec = quantize_with(context.fused, context.calibration, context.progress,
                                        context.preset.settings.get("float_share"), isa=isa)
        stats = {"quantize": {"spec": spec, "isa": isa.name, "seconds": round(time.perf_counter() - started, 1)}}
        return Build(quantized, f"{context.pipeline},{spec}", self.name, stats)

    def built_for(self):
        """The ISA the build is for: the ``isa`` option, else this CPU's."""
        return isa_by_name(self.settings["isa"]) if self.settings["isa"] else x86_int8.detect_isa()

    def load(self, graph, directory, manifest):
        """Refuse (ArtifactError) a CPU that lacks the ISA the artifact was built for, unless ``isa_fallback``,
        which warns; then lower on this CPU's kernels."""
        report = (manifest.get("extra") or {}).get("report") or {}
        built_for = (report.get("quantize") or {}).get("isa")
        host = x86_int8.detect_isa()
        if built_for in ISA_ORDER and lacks(host, isa_by_name(built_for)):
            message = (f"{directory}: built for {built_for} (int8 codes sized for its exact accumulation), but this "
                       f"CPU has {host.name}")
            if not self.settings["isa_fallback"]:
                raise ArtifactError(f"{message}; build it here again (or with optimize(..., isa={host.name!r})), "
                                    "or load it with fxopt.load(dir, isa_fallback=True) to run it on this CPU's "
                                    "kernels at lower fidelity")
            warnings.warn(f"{message}: running on this CPU's kernels (activation codes respread where they "
                          "would overflow; less accurate than a build for it)", stacklevel=3)
        return super().load(graph, directory, manifest)

    def lower(self, graph, example_inputs=(), progress=False, built_with=None):
        say(progress, f"fxopt x86-int8: lowering to the int8 kernels of this CPU ({x86_int8.detect_isa().name}) ...")
        return x86_int8.lower(graph, compile=self.settings["compile"], example_inputs=tuple(example_inputs) or None,
                              progress=progress, built_with=built_with)

    def search_lower(self, graph):
        """The eager int8 kernels unless ``compile`` says otherwise: compiling every candidate takes minutes."""
        return x86_int8.lower(graph, compile=self.settings["compile"] or "never", warn=False)

    def float_target(self):
        return target_class("eager")()

    def candidates(self, context):
        yield from float_candidates(self, context)
        calibrated = calibrate_for_x86(context.fused, context.calibration, context.progress)
        quantized, spec = insert_qdq_for_x86(calibrated, calibration=context.calibration, isa=self.built_for())
        yield candidate(self, "int8", f"{context.pipeline},{spec}", quantized, compressed=True,
                        stats={"quantize": {"spec": spec, "isa": self.built_for().name}})
        mixed = self._mixed_precision_candidate(calibrated, context)
        if mixed is not None:
            yield mixed

    def _mixed_precision_candidate(self, calibrated, context) -> Optional[object]:
        """int8 with the most sensitive linears in float: as many as the *lowered* model needs to meet the
        tolerance. The plan is made on the Q/DQ graph; the lowered model (float16-stored float layers, oneDNN's
        rounding) can land just outside, so layers are added in sensitivity order until it meets."""
        tolerance, batches = context.tolerance, context.calibration
        error_metric, bound = tolerance.as_error_metric()
        plan = float_layers_for(calibrated, batches, bound, error_metric, context.progress)
        if not plan.float_layers:  # int8 alone is within the tolerance
            return None
        ranked = [row.name for row in plan.rows]
        reference = run_outputs(context.original, batches)
        for kept in range(len(plan.float_layers), len(ranked)):
            graph, spec = insert_qdq_for_x86(calibrated, ranked[:kept], calibration=batches, isa=self.built_for())
            found = candidate(self, f"int8, {kept} of {len(ranked)} layers float", f"{context.pipeline},{spec}",
                              graph, compressed=True, stats={"mixed_precision": plan.format(),
                                                             "quantize": {"spec": spec, "isa": self.built_for().name}})
            if tolerance.meets(tolerance.value(reference, run_outputs_of(found.runner, batches))):
                return found
        return None
