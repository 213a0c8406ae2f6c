"""``cuda``: TVM Relax for NVIDIA GPUs; fxopt's attention kernel takes the whole attention, cuBLASLt the GEMMs.

It builds on any machine (code generation through TVM and nvcc needs no GPU) and runs where there is one: a
built model can be saved here and loaded on the GPU machine; calling it without a GPU raises DeviceError.
Its search (``tolerance=``) tries every precision and measures them on the GPU: in one process where there is
one, else in two steps (``fxopt.search_bundle`` here, ``fxopt.pick`` on the GPU machine; :mod:`fxopt.bundle`).
"""
from __future__ import annotations

import time

from fxopt.errors import DeviceError, InputError
from fxopt.targets.base import Build, OpenValues, Preset, Target, say
from fxopt.targets.candidates import candidate
from fxopt.targets.cuda_quantize import check_count, check_fidelity, plan_keep_float, quantize
from fxopt.targets.registry import register_target

#: smooth-quant's migration strength before int8 GEMMs with per-token activations (the ``smooth_alpha``
#: option's default). Real MiniLM, every linear int8, cosine / NN against fp32 on 128 held-out sentences (eager
#: reference kernel, fp32): no smoothing 0.9975 / 0.930; alpha 0.3 0.9973 / 0.953, 0.5 0.9987 / 0.969, 0.65
#: 0.9987 / 0.953, 0.8 0.9985 / 0.922 (tests/passes/test_quantize_int8.py).
INT8_SMOOTH_ALPHA = 0.5
#: The options that say how a precision quantizes, and the precisions each applies to.
QUANTIZE_OPTIONS = {"keep_float": ("fp8", "int8", "int4-weight"), "fidelity": ("fp8", "int8", "int4-weight"),
                    "smooth_alpha": ("int8",), "int4_group": ("int4-weight",),
                    "int4_zero_point": ("int4-weight",), "int4_rounding": ("int4-weight",)}

#: The fastest measured on the H100 (benchmarks/results/gpu_bert_norm_act.md); epilogue fusion is TVM's.
CUDA_PRESETS = {"fast": Preset("cleanup,fuse-attention", "attention fused into fxopt's kernel, float16 compute")}


@register_target
class CudaTarget(Target):
    name = "cuda"
    presets = CUDA_PRESETS
    #: precision: "fp16" (GEMMs in float16, fp32 accumulation), "fp8" (linears as e4m3 GEMMs), "int8"
    #: (smooth-quant, then linears as int8 GEMMs with int32 sums) or "int4-weight" (linear weights int4 per group
    #: of input columns; few-row calls in fxopt's int4 kernel). How the last three quantize:
    #: - keep_float: "auto" keeps the linears most sensitive to it (measured on the calibration data) in float16
    #:   until the output fidelity reaches ``fidelity``; N (an int) keeps the N most sensitive; 0 quantizes all;
    #: - fidelity: the padding-masked output cosine "auto" aims for (None: the precision's default,
    #:   fxopt.targets.cuda_quantize.DEFAULT_FIDELITY);
    #: - smooth_alpha (int8): smooth-quant's migration strength;
    #: - int4_group, int4_zero_point, int4_rounding (int4-weight): input columns per scale, a zero point per group,
    #:   GPTQ (on the calibration data) or round-to-nearest codes.
    #: The defaults meet issue 22's fidelity bars on the real all-MiniLM-L6-v2
    #: (benchmarks/results/minilm_cuda_fidelity.md).
    options = {"matmul": ("cublaslt", "default", "mma"), "dtype": ("float16", "float32"),
               "precision": ("fp16", "fp8", "int8", "int4-weight"),
               "keep_float": OpenValues(("auto",), check_count, "a number of linears (an int >= 0)"),
               "fidelity": OpenValues((None,), check_fidelity, "an output cosine (a float in (0, 1])"),
               "smooth_alpha": OpenValues((INT8_SMOOTH_ALPHA,), lambda a: isinstance(a, float) and 0 <= a <= 1,
                                          "a float in [0, 1]"),
               "int4_group": (32, 64, 128), "int4_zero_point": (True, False), "int4_rounding": ("gptq", "rtn")}
    #: the per-layer comparison would run the whole model on the CPU of a machine that may be only the builder
    reports_layer_error = False
    #: the search's speedups are against fp16 on the same GPU (what optimize builds without tolerance=)
    search_baseline = "fp16"
    #: GPU calls take well under a millisecond: more rounds for a stable median
    search_rounds = 100

    def __init__(self, **options):
        super().__init__(**options)
        precision = self.settings["precision"]
        for key, value in options.items():  # a default value is no request (the search passes all settings)
            if precision not in QUANTIZE_OPTIONS.get(key, (precision,)) and value != self.options[key][0]:
                raise InputError(f"target 'cuda': option {key}= applies to precision "
                                 f"{' or '.join(map(repr, QUANTIZE_OPTIONS[key]))}, not {precision!r}; drop it "
                                 f"or choose one of those precisions")
        if options.get("fidelity") is not None and self.settings["keep_float"] != "auto":
            raise InputError(f"target 'cuda': fidelity={options['fidelity']} is the target of keep_float='auto'; "
                             f"with keep_float={self.settings['keep_float']} it would be ignored: drop one")

    @property
    def calibrates(self) -> bool:
        """Whether the precision reads calibration data: int8's smooth-quant, int4's GPTQ and the keep_float
        search do. Without ``calibration_data`` it calibrates on the example inputs, and optimize warns."""
        settings = self.settings
        return settings["precision"] != "fp16" and (settings["keep_float"] != 0 or settings["precision"] == "int8"
                                                    or settings["int4_rounding"] == "gptq"
                                                    and settings["precision"] == "int4-weight")

    def check_dynamic_shapes(self) -> None:
        raise InputError("optimize(target='cuda'): dynamic_shapes= is not supported yet: the cuda build plans its "
                         "kernels, CUDA graphs and memory for the example inputs' shapes; drop dynamic_shapes (and "
                         "build one artifact per shape you serve), or use target='x86-int8' or 'eager', which take "
                         "any size within the ranges")

    def check_search(self, measure_here=True):
        if measure_here and not self.runs_here():
            raise DeviceError(
                "optimize: tolerance= on target='cuda' measures every candidate on the GPU, and this machine has "
                "none (torch.cuda.is_available() is False); search in two steps: build the candidates here with "
                "fxopt.search_bundle(model, example_inputs, DIR, target='cuda', tolerance=..., calibration_data=...) "
                "(CLI: fxopt search-bundle MODULE:FACTORY --target cuda --tolerance cosine=0.999 --out DIR), copy "
                "DIR to the GPU machine and choose there with fxopt.pick(DIR) (CLI: fxopt pick DIR --out ARTIFACT)")

    def search_precisions(self):
        """What the search tries: every precision, fp16 first (its baseline); only fp16 unless matmul is
        'cublaslt' (the low precisions run in fxopt's CUDA extension)."""
        if self.settings["matmul"] != "cublaslt":
            return ("fp16",)
        return self.options["precision"]

    def candidates(self, context):
        """One candidate per :meth:`search_precisions`, each built as ``optimize(precision=...)`` builds it (int8
        calibrated on the search's fitting batches) and lowered with TVM and nvcc."""
        for precision in self.search_precisions():
            target = type(self)(**{**self.settings, "precision": precision})
            build = target.build(context)
            yield candidate(target, precision, build.pipeline, build.graph, compressed=precision != "fp16",
                            stats=build.stats)

    def timing_inputs(self, inputs):
        import torch
        return tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs)

    def build(self, context):
        """The pipeline's graph, its linears quantized as ``precision`` says, the ``keep_float`` ones in float16
        (:mod:`fxopt.targets.cuda_quantize`)."""
        precision = self.settings["precision"]
        if precision == "fp16":
            return Build(context.fused, context.pipeline, self.name)
        if self.settings["matmul"] != "cublaslt":
            raise InputError(f"optimize(target='cuda'): precision={precision!r} runs in fxopt's CUDA extension "
                             f"(cuBLASLt's fp8 and int8 GEMMs, the int4 kernel); drop "
                             f"matmul={self.settings['matmul']!r} (the default, 'cublaslt', is needed)")
        graph = self._calibrated(context) if precision == "int8" else context.fused
        stats = {}
        keep = ()
        if self.settings["keep_float"] != 0:
            say(context.progress, f"fxopt cuda: {precision}: measuring which linears to keep in float16 ...")
            plan = plan_keep_float(graph, precision, self.settings, context.calibration, context.progress)
            keep, stats["keep_float"] = plan.keep, plan.as_dict()
        quantized, spec, stats["quantize"] = quantize(graph, precision, self.settings, keep, context.calibration)
        say(context.progress, f"fxopt cuda: {precision}: {spec}")
        return Build(quantized, f"{context.pipeline},{spec}", self.name, stats)

    @staticmethod
    def _calibrated(context):
        """The pipeline's graph with activation statistics from the calibration batches (the example inputs
        when optimize got no calibration_data)."""
        from fxopt.passes.quantize.calibrate import calibrate
        return calibrate(context.fused, context.calibration, progress=context.progress)

    def runs_here(self) -> bool:
        import torch
        return torch.cuda.is_available()

    def device_description(self):
        import torch
        return torch.cuda.get_device_name() if self.runs_here() else "torch.cuda.is_available() is False"

    def lower(self, graph, example_inputs=(), progress=False, built_with=None):
        from fxopt.backends.tvm_cuda import deploy
        say(progress, f"fxopt cuda: building with TVM and nvcc ({self.settings}) ...")
        started = time.perf_counter()
        runner = deploy.build_target(graph, **self.build_options())
        runner.build_seconds = round(time.perf_counter() - started, 1)
        return runner

    def build_options(self):
        """The settings the TVM build takes (precision and how it quantizes are applied to the graph, by
        :meth:`build`)."""
        return {key: value for key, value in self.settings.items()
                if key != "precision" and key not in QUANTIZE_OPTIONS}

    def lowering_report(self, runner):
        from fxopt.backends.tvm_cuda import deploy
        if not hasattr(runner, "build_seconds"):  # loaded from an artifact: nothing was built here
            return {}
        return {**deploy.build_summary(runner), **self.settings, "seconds": getattr(runner, "build_seconds", None)}

    def load(self, graph, directory, manifest):
        from fxopt.backends.tvm_cuda import deploy
        return deploy.load_target(graph, str(directory))
