"""The x86-int8 backend's TorchInductor path (``fxopt/backends/x86_int8/inductor.py``).

The quantized graph compiled with freezing must run int8 GEMMs (not float ones), agree with the quantized
graph as closely as the eager kernels do on inputs it was not compiled on, fall back to the eager kernels
(never crash) when Inductor fails, disagrees or has no compiler, and pick the faster path by measurement in
``auto`` mode. Compiling takes seconds per model here, so the generated-model test draws few examples.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given
from safetensors.torch import save_file

import fxopt
from fxopt.backends import x86_int8
from fxopt.backends.x86_int8 import inductor
from fxopt.errors import InputError
from fxopt.targets.x86_quantize import quantize_for_x86
from tests.backends.test_x86_int8 import QDTYPE, count_linears, few_examples, quantize
from tests.harness import relative_error, token_model_cases

QD = torch.ops.quantized_decomposed
needs_compiler = pytest.mark.skipif(inductor.cpp_compiler() is None, reason="TorchInductor needs a C++ compiler")


class Block(nn.Module):
    """LayerNorm -> linear -> gelu -> linear with a residual: the shape of a transformer FFN."""

    def __init__(self, width=32):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(F.gelu(self.up(h)))


def quantize_as_optimize(graph, inputs, float_share=None):
    """Smooth-quant and static int8 the way ``optimize(target="x86-int8")`` does for this CPU (``float_share=0``:
    as its ``fast`` preset, every linear with int8 activations, also without VNNI)."""
    return quantize_for_x86(graph, inputs, [inputs], progress=False, float_share=float_share)[0]


def quantized_block(batch=4, float_share=None):
    x = torch.randn(batch, 8, 32, generator=torch.Generator().manual_seed(1))
    graph = fxopt.capture(Block().eval(), (x,))
    graph = fxopt.Pipeline("fuse")(graph).graph  # linear_act: the compiled path must split it again
    return quantize_as_optimize(graph, (x,), float_share), x


def fresh_input(x: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)) * 2


def int8_gemms_in(compiled: inductor.CompiledGraph, inputs) -> list:
    """The int8 GEMM kernels in the code Inductor generated for ``compiled``: oneDNN calls in the Python
    wrapper, and C++ kernels built on an int8 micro-GEMM (one per GEMM; max-autotune picks either per GEMM,
    by timing, so a test must accept both)."""
    from torch._inductor.utils import run_and_get_code
    with torch.inference_mode():
        _, code = run_and_get_code(compiled, *inputs)
    parts = "\n".join(code).split("'''")  # the wrapper is Python; each C++ kernel's source is an r'''...''' string
    onednn = [call for python in parts[0::2] for call in re.findall(r"onednn\.qlinear_pointwise\.\w+\(", python)]
    micro = [kernel for kernel in parts[1::2]
             if re.search(r"CppMicroGemm|micro_gemm\w*\s*\(\s*const u?int8_t\s*\*", kernel)]
    return onednn + ["int8 micro-GEMM kernel"] * len(micro)


# ------------------------------------------------------------------ options
def test_compile_modes_and_a_bad_value(monkeypatch):
    monkeypatch.delenv(inductor.COMPILE_ENV, raising=False)
    assert inductor.compile_mode(None) == "auto"
    assert inductor.compile_mode(True) == "always" and inductor.compile_mode(False) == "never"
    monkeypatch.setenv(inductor.COMPILE_ENV, "never")
    assert inductor.compile_mode(None) == "never" and inductor.compile_mode("always") == "always"
    with pytest.raises(InputError, match=r"compile='fast'.*auto, always, never.*FXOPT_X86_COMPILE"):
        x86_int8.lower(quantized_block()[0], compile="fast")


# ------------------------------------------------------------ compiled path
@needs_compiler
def test_the_compiled_block_runs_int8_gemms_and_agrees_on_new_inputs():
    quantized, x = quantized_block()
    lowered = x86_int8.lower(quantized, compile="always")
    path = lowered.report.as_dict()["kernel_path"]
    assert path["kernel_path"] == "inductor" and path["compile_seconds"] > 0
    assert lowered.module is None  # the eager kernels, and their float and packed weights, are freed
    eager = x86_int8.lower(quantized, compile="never")
    for seed in (2, 3):  # not the inputs it was compiled on: nothing of them may be frozen into the code
        other = fresh_input(x, seed)
        reference, out, eager_out = quantized.run(other), lowered(other), eager(other)
        assert relative_error(reference, out) <= inductor.AGREEMENT_FACTOR * relative_error(reference, eager_out) \
            + inductor.AGREEMENT_SLACK
        assert not torch.equal(out, lowered(x))
    # every linear the eager kernels run in int8 is an int8 GEMM in the generated code too
    assert len(int8_gemms_in(inductor.CompiledGraph(quantized), (x,))) == lowered.report.int8_linears >= 1


def test_activation_codes_reach_inductor_as_uint8_with_the_same_values():
    """oneDNN runs a signed-int8 source with a zero point in its reference loop (12 s for one MiniLM GEMM on a
    Zen 4), so the graph Inductor compiles carries the same codes shifted to uint8: the values are unchanged.
    Every linear int8 (without VNNI, optimize's default keeps a quarter of them float, leaving one here)."""
    quantized, x = quantized_block(float_share=0.0)
    module = inductor.inductor_graph(quantized)
    signed = [n for n in quantized.call_nodes(QD.quantize_per_tensor.default) if n.args[5] == torch.int8]
    codes = [n.args[3:] for n in module.graph.nodes if n.target == QD.quantize_per_tensor.default]
    assert len(signed) >= 2 and codes == [(0, 255, torch.uint8)] * len(signed)
    for seed in (2, 3):
        other = fresh_input(x, seed)
        torch.testing.assert_close(module(other), quantized.run(other), rtol=1e-6, atol=1e-6)


@needs_compiler
@few_examples(3)
@given(case=token_model_cases(dtypes=(torch.float32,)))
def test_generated_models_compile_and_stay_as_close_as_the_eager_kernels(case):
    graph = fxopt.capture(case.model, case.inputs)
    assume(count_linears(graph) > 0)
    quantized = quantize_as_optimize(graph, case.inputs)
    lowered = x86_int8.lower(quantized, compile="always", warn=False)
    path = lowered.report.as_dict()["kernel_path"]
    eager = x86_int8.lower(quantized, compile="never", warn=False)
    reference = quantized.run(*case.inputs)
    out = lowered(*case.inputs)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    # compile=always with a compiler and full-range int8 codes: the compiled graph runs, or the test fails
    assert path["kernel_path"] == "inductor" and path["compile_seconds"] > 0, path
    assert lowered.forward is not lowered.module
    assert relative_error(reference, out) <= inductor.AGREEMENT_FACTOR * relative_error(
        reference, eager(*case.inputs)) + inductor.AGREEMENT_SLACK


@needs_compiler
def test_auto_keeps_the_path_it_measured_faster():
    quantized, x = quantized_block()
    lowered = x86_int8.lower(quantized, compile="auto", example_inputs=(x,))
    path = lowered.report.as_dict()["kernel_path"]
    assert path["reason"] == "measured faster"
    faster = "inductor" if path["compiled_ms"] < path["eager_ms"] else "eager-kernels"
    assert path["kernel_path"] == faster
    assert (lowered.forward is lowered.module) == (faster == "eager-kernels")


# ---------------------------------------------------------------- fallbacks
def test_inductor_failure_falls_back_to_the_eager_kernels(monkeypatch):
    quantized, x = quantized_block()

    def broken(graph):
        raise RuntimeError("simulated compiler crash\nsecond line")

    monkeypatch.setattr(inductor, "cpp_compiler", lambda: "g++")
    monkeypatch.setattr(inductor, "CompiledGraph", broken)
    lowered = x86_int8.lower(quantized, compile="always")
    path = lowered.report.as_dict()["kernel_path"]
    assert path == {"kernel_path": "eager-kernels",
                    "reason": "TorchInductor failed: RuntimeError: simulated compiler crash"}
    assert torch.equal(lowered(x), x86_int8.lower(quantized, compile="never")(x))


def test_a_compiled_graph_that_disagrees_is_not_used(monkeypatch):
    quantized, x = quantized_block()

    class Wrong:  # what a wrong scale would do
        def __init__(self, graph):
            self.graph = graph

        def __call__(self, *inputs):
            return self.graph.module(*inputs) * 1.2

    monkeypatch.setattr(inductor, "cpp_compiler", lambda: "g++")
    monkeypatch.setattr(inductor, "CompiledGraph", Wrong)
    path = x86_int8.lower(quantized, compile="always").report.as_dict()["kernel_path"]
    assert path["kernel_path"] == "eager-kernels"
    assert re.match(r"the compiled graph is 0\.2 \(relative\) from the quantized graph's output, the eager kernels",
                    path["reason"]), path["reason"]


def test_no_compiler_or_inexact_codes_keep_the_eager_kernels(monkeypatch):
    quantized, x = quantized_block()
    monkeypatch.setattr(inductor, "cpp_compiler", lambda: None)
    path = x86_int8.lower(quantized, compile="auto").report.as_dict()["kernel_path"]
    assert path == {"kernel_path": "eager-kernels", "reason": "no C++ compiler for TorchInductor (install g++)"}
    monkeypatch.setattr(inductor, "cpp_compiler", lambda: "g++")
    outcome = inductor.choose(quantized, quantized.module, "always", (x,), exact_codes=False)[1]
    assert outcome.kernel_path == "eager-kernels" and "no VNNI" in outcome.reason


@needs_compiler
def test_activation_codes_narrower_than_int8_keep_the_eager_kernels():
    """int7 activation ranges (-64..63 in int8): Inductor's requantization ignores the narrower clamp (17% off
    here when forced), so ``lower`` does not compile such graphs and says so."""
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(1))
    graph = fxopt.Pipeline("fuse")(fxopt.capture(Block().eval(), (x,))).graph
    quantized = quantize(graph, (x,), "static", qdtype="int7")
    lowered = x86_int8.lower(quantized, compile="always")
    path = lowered.report.as_dict()["kernel_path"]
    assert path["kernel_path"] == "eager-kernels" and "fewer levels than their dtype" in path["reason"]
    assert torch.equal(lowered(x), x86_int8.lower(quantized, compile="never")(x))


# ---------------------------------------------------------------- artifacts
FRESH_PROCESS = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file
    import fxopt
    loaded = fxopt.load(sys.argv[1], compile="always")
    data = load_file(sys.argv[2])
    out = loaded(data["x"].clone())
    path = loaded.stats["lowering"]["kernel_path"]
    assert path["kernel_path"] == "inductor", path
    error = ((out - data["reference"]).norm() / data["reference"].norm()).item()
    print(f"{error:.6f}")
""")


@needs_compiler
def test_an_artifact_loads_compiled_in_a_fresh_process(tmp_path):
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(1))
    optimized = fxopt.optimize(Block().eval(), (x,), target="x86-int8", calibration_data=[(x,)], progress=False)
    path = optimized.save(tmp_path / "model")
    other = fresh_input(x, 4)
    reference, eager_out = optimized.graph.run(other), optimized(other)
    save_file({"x": other, "reference": reference}, str(tmp_path / "data.safetensors"))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), str(tmp_path / "data.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    error = float(done.stdout.strip().splitlines()[-1])
    assert error <= inductor.AGREEMENT_FACTOR * relative_error(reference, eager_out) + inductor.AGREEMENT_SLACK


@needs_compiler
def test_the_default_path_end_to_end_measures_at_build_and_loads_what_it_measured(tmp_path, monkeypatch):
    """What a user gets with no option or environment: optimize compiles, times both kernel paths and keeps the
    faster; the artifact loads that path again without timing (the same ISA) and gives the same outputs."""
    monkeypatch.delenv(inductor.COMPILE_ENV, raising=False)
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(1))
    optimized = fxopt.optimize(Block().eval(), (x,), target="x86-int8", calibration_data=[(x,)], progress=False)
    built = optimized.report()["lowering"]["kernel_path"]
    assert built["reason"] == "measured faster" and built["compile_seconds"] > 0
    assert built["kernel_path"] == ("inductor" if built["compiled_ms"] < built["eager_ms"] else "eager-kernels")
    other = fresh_input(x, 5)
    expected = optimized(other)
    monkeypatch.setattr(inductor, "_faster", lambda *a: pytest.fail("load timed the kernel paths again"))
    loaded = fxopt.load(optimized.save(tmp_path / "model"))
    path = loaded.stats["lowering"]["kernel_path"]
    assert path["kernel_path"] == built["kernel_path"]
    assert path["reason"] == ("compile=always" if built["kernel_path"] == "inductor" else "compile=never")
    assert torch.equal(loaded(other), expected)


def test_a_build_on_another_isa_or_unmeasured_is_measured_again(monkeypatch):
    lowering = {"isa": "avx2", "kernel_path": {"kernel_path": "inductor", "reason": "measured faster"}}
    assert inductor.measured_mode(lowering, "avx2") == "always"
    assert inductor.measured_mode({**lowering, "kernel_path": {"kernel_path": "eager-kernels",
                                                               "reason": "measured faster"}}, "avx2") == "never"
    assert inductor.measured_mode(lowering, "amx") is None
    assert inductor.measured_mode({"isa": "avx2", "kernel_path": {"kernel_path": "inductor",
                                                                  "reason": "compile=always"}}, "avx2") is None
    monkeypatch.delenv(inductor.COMPILE_ENV, raising=False)
    assert inductor.compile_mode(None, "never") == "never" and inductor.compile_mode(None, None) == "auto"
    assert inductor.compile_mode("auto", "never") == "auto"  # an explicit request wins, then the environment
    monkeypatch.setenv(inductor.COMPILE_ENV, "always")
    assert inductor.compile_mode(None, "never") == "always"
