"""precision="fp8", "int8" and "int4-weight" on the cuda target, on the CPU machine: what the Relax module calls,
the build, the artifact.

The numbers are checked on the GPU machine: tests/backends/test_tvm_cuda_fp8.py, test_tvm_cuda_int8.py,
test_tvm_cuda_int4.py (kernels) and
benchmarks/gpu_cuda_target.py (artifacts against the eager fp8 pipeline, benchmarks/results/gpu_cuda_target.md).
"""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import fxopt
from fxopt.errors import InputError, LoweringError

pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the CUDA extension")


class Qkv(torch.nn.Module):
    """Three linears reading one input, a GELU FFN, and a linear cuBLASLt's fp8 GEMM cannot take (10 outputs)."""

    def __init__(self, width=32):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(width, width) for _ in range(3))
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        x = x + self.q(x) * self.k(x) - self.v(x)
        return self.head(x + self.down(torch.nn.functional.gelu(self.up(x))))


def relax_calls(graph):
    from fxopt.backends.tvm_cuda.lower import prepare
    mod, _ = prepare(graph, "float16", keep_params_as_input=True, fused_attention=True)
    main, lifted = mod["main"].script(), mod["main_transform_params"].script()
    return main, lifted


def test_fp8_linears_become_extension_calls_with_weights_quantized_at_load():
    graph = fxopt.capture(Qkv().eval(), (torch.randn(4, 8, 32),))
    quantized = fxopt.Pipeline("quantize-fp8")(graph)
    assert quantized.results[0].stats == {"linears": 5, "skipped": 1}
    main, lifted = relax_calls(quantized.graph)
    # q, k and v read x: one quantization of it; up's and down's inputs one each
    assert main.count("fxopt.fp8.quantize_rows") == 3
    assert main.count("fxopt.cublaslt.matmul_fp8_bias") == 5
    # the five weights are quantized in main_transform_params (run once at load), never per call
    assert lifted.count("fxopt.fp8.quantize_rows") == 5 and "float8_e4m3fn" in lifted
    assert main.count("fxopt.cublaslt.matmul(") + main.count("fxopt.cublaslt.matmul_bias") == 1  # the head, fp16


@pytest.mark.parametrize("precision, matmul", [("fp8", "default"), ("int8", "mma")])
def test_fp8_and_int8_need_cublaslt_and_say_so(precision, matmul):
    from fxopt.backends.tvm_cuda.lower import build
    x = torch.randn(4, 32)
    graph = fxopt.Pipeline(f"quantize-{precision}")(fxopt.capture(Qkv().eval(), (x,))).graph
    with pytest.raises(LoweringError, match=r"fp8, int8 and int4 linears \(linear, linear_1, .*\) .* need "
                                            f"matmul='cublaslt', not matmul='{matmul}'"):
        build(graph, matmul=matmul, compile_kernels=False)
    with pytest.raises(InputError, match=f"precision='{precision}' runs in fxopt's CUDA extension .* drop "
                                         f"matmul='{matmul}'"):
        fxopt.optimize(Qkv().eval(), (x,), target="cuda", precision=precision, calibration_data=[(x,)],
                       options={"matmul": matmul}, progress=False)


def test_precision_is_an_option_of_the_target():
    with pytest.raises(InputError, match="target 'x86-int8': unknown option 'precision'; its options: compile"):
        fxopt.optimize(Qkv().eval(), (torch.randn(4, 32),), target="x86-int8", precision="fp8", progress=False)
    with pytest.raises(InputError, match=r"precision.*'fp16', 'fp8', 'int8', 'int4-weight'"):
        fxopt.optimize(Qkv().eval(), (torch.randn(4, 32),), target="cuda", precision="int3", progress=False)


def test_the_fp8_artifact_records_its_precision_and_loads(tmp_path):
    model = Qkv().eval()
    optimized = fxopt.optimize(model, (torch.randn(4, 32),), target="cuda", precision="fp8", progress=False,
                               options={"keep_float": 0})  # every linear: no calibration data needed
    assert optimized.report()["lowering"]["precision"] == "fp8"
    assert optimized.pipeline.endswith(",quantize-fp8")
    directory = optimized.save(tmp_path / "fp8")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["extra"]["report"]["lowering"]["precision"] == "fp8"
    loaded = fxopt.load(directory)
    assert sum(1 for _ in loaded.graph.call_nodes(torch.ops.fxopt.linear_fp8.default)) == 5
    assert set(loaded.graph.params()) <= set(model.state_dict())  # weights stay float, under their own names


def test_int8_linears_become_extension_calls_with_weights_quantized_at_load():
    graph = fxopt.capture(Qkv().eval(), (torch.randn(4, 8, 32),))
    quantized = fxopt.Pipeline("quantize-int8")(graph)
    assert quantized.results[0].stats["linears"] == 5
    main, lifted = relax_calls(quantized.graph)
    # q, k and v read x: one quantization of it; up's and down's inputs one each
    assert main.count("fxopt.int8.quantize_rows") == 3
    assert main.count("fxopt.cublaslt.matmul_int8") == 5 and main.count("fxopt.int8.dequantize_bias") == 5
    assert re.search(r'"fxopt.cublaslt.matmul_int8", .*R.Tensor\(\(4, 8, 32\), dtype="int32"\)', main)
    # the five weights are quantized in main_transform_params (run once at load), never per call
    assert lifted.count("fxopt.int8.quantize_rows") == 5 and 'dtype="int8"' in lifted
    assert main.count("fxopt.cublaslt.matmul(") + main.count("fxopt.cublaslt.matmul_bias") == 1  # the head, fp16


def test_fp8_and_int8_linears_reading_one_input_quantize_it_once_each():
    graph = fxopt.capture(Qkv().eval(), (torch.randn(4, 32),))
    mixed = fxopt.Pipeline("quantize-fp8{skip=linear_1},quantize-int8")(graph).graph  # k int8, the rest fp8
    main, _ = relax_calls(mixed)
    assert main.count("fxopt.fp8.quantize_rows") == 3 and main.count("fxopt.int8.quantize_rows") == 1
    assert main.count("fxopt.cublaslt.matmul_fp8_bias") == 4 and main.count("fxopt.cublaslt.matmul_int8") == 1


def test_the_int8_artifact_is_smoothed_on_the_calibration_data_records_its_precision_and_loads(tmp_path):
    model, x = Qkv().eval(), torch.randn(4, 32)
    batches = [(torch.randn(4, 32) * torch.logspace(-1, 1, 32),) for _ in range(3)]  # columns of unequal range
    optimized = fxopt.optimize(model, (x,), target="cuda", precision="int8", calibration_data=batches,
                               options={"keep_float": 0}, progress=False)
    assert optimized.pipeline.endswith(",smooth-quant{alpha=0.5},quantize-int8")
    stats = optimized.report()["quantize"]
    # smooth-quant is exact (power-of-two factors), so it smooths every linear, the head too, which stays float
    assert stats["0:smooth-quant"]["linears"] == 6 and stats["1:quantize-int8"]["linears"] == 5
    assert optimized.report()["lowering"]["precision"] == "int8"
    directory = optimized.save(tmp_path / "int8")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["extra"]["report"]["lowering"]["precision"] == "int8"
    loaded = fxopt.load(directory)
    assert sum(1 for _ in loaded.graph.call_nodes(torch.ops.fxopt.linear_int8.default)) == 5
    # smooth-quant scaled the weights' input columns by powers of two, in place: the smoothed weights are saved
    # under the model's own names, as parameters the library takes at load, not folded into it as constants
    # (the inverse factors it multiplies activations by, where no LayerNorm can absorb them, are new vectors)
    params, original = loaded.graph.params(), model.state_dict()
    assert {name for name in set(params) - set(original) if not name.endswith("_smooth_inverse")} == set()
    changed = [name for name in params if name.endswith(".weight") and not torch.equal(params[name], original[name])]
    assert len(changed) == 6  # the six linears'
    weights = sum(t.numel() * t.element_size() for t in params.values())
    assert (directory / "model.so").stat().st_size < weights + 200_000  # not the weights a second time


def test_int8_without_calibration_data_calibrates_on_the_example_inputs_and_warns():
    with pytest.warns(UserWarning, match=r"target='cuda'\): no calibration_data; calibrating on the example inputs"):
        optimized = fxopt.optimize(Qkv().eval(), (torch.randn(4, 32),), target="cuda", precision="int8",
                                   options={"keep_float": 0}, progress=False)
    assert optimized.report()["quantize"]["1:quantize-int8"]["linears"] == 5


#: int4 as the target built it before its defaults became GPTQ, groups of 32 with zero points and keep_float="auto"
INT4_RTN_G128 = {"int4_group": 128, "int4_zero_point": False, "int4_rounding": "rtn", "keep_float": 0}


class Mlp(torch.nn.Module):
    """Two linears int4 can take (256 and 128 input columns) and one it cannot (48: not a group of 128)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(256, 128), torch.nn.Linear(128, 48), torch.nn.Linear(48, 16)

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


@pytest.mark.parametrize("rows, kernel_calls, gemms", [(4, 2, 1), (96, 0, 3)])
def test_int4_weight_uses_the_kernel_for_few_rows_and_a_gemm_for_more(rows, kernel_calls, gemms):
    x = torch.randn(rows, 256)
    optimized = fxopt.optimize(Mlp().eval(), (x,), target="cuda", precision="int4-weight", progress=False,
                               options=INT4_RTN_G128)
    assert optimized.pipeline.endswith("insert-qdq{scheme=weight-only,bits=4,group-size=128,method=rtn,"
                                       "skip=linear_2},int4-linear")
    assert optimized.report()["lowering"]["precision"] == "int4-weight"
    graph = fxopt.Pipeline(optimized.pipeline)(fxopt.capture(Mlp().eval(), (x,))).graph
    assert sum(1 for _ in graph.call_nodes(torch.ops.fxopt.linear_int4.default)) == 2
    main, _ = relax_calls(graph)
    assert main.count("fxopt.int4.linear") == kernel_calls
    assert main.count("fxopt.cublaslt.matmul") == gemms
    # never unpacked per call: the packed weights are pass-made constants (bound in the library), so the GEMM
    # path's dequantization and the kernel path's MMA layout read constants only (one unpacking per int4
    # linear), and the pipeline's FoldConstant folds them at build time
    shifts = [line for line in main.splitlines() if "R.right_shift(" in line]
    assert len(shifts) == 2 and all("R.right_shift(metadata[" in s for s in shifts)


def test_int4_linear_is_the_same_math_as_dequantize_then_linear():
    graph = fxopt.capture(Mlp().eval(), (torch.randn(3, 256),))
    spec = "insert-qdq{scheme=weight-only,bits=4,group-size=128,skip=linear_2}"
    quantized = fxopt.Pipeline(spec)(graph).graph
    fused = fxopt.Pipeline("int4-linear")(quantized)
    assert fused.results[0].stats == {"fused": 2}
    assert not any(n.target == torch.ops.fxopt.dequantize_int4_grouped.default for n in fused.graph.call_nodes())
    x = torch.randn(3, 256)
    assert torch.equal(fused.graph.module(x), quantized.module(x))


def test_the_int4_artifact_records_its_precision_and_loads(tmp_path):
    optimized = fxopt.optimize(Mlp().eval(), (torch.randn(2, 256),), target="cuda", precision="int4-weight",
                               progress=False, options=INT4_RTN_G128)
    directory = optimized.save(tmp_path / "int4")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["extra"]["report"]["lowering"]["precision"] == "int4-weight"
    loaded = fxopt.load(directory)
    assert sum(1 for _ in loaded.graph.call_nodes(torch.ops.fxopt.linear_int4.default)) == 2
    packed = [t for name, t in loaded.graph.params().items() if name.endswith("weight_int4")]
    assert len(packed) == 2 and all(t.dtype == torch.uint8 for t in packed)  # int4 codes, two a byte, on disk


def test_keep_float_builds_fp16_gemms_beside_fp8_ones_and_records_the_choice(tmp_path):
    """Mixed precision adds no new op: the kept linears are plain linears, cuBLASLt's fp16 GEMMs."""
    torch.manual_seed(0)
    model, x = Qkv().eval(), torch.randn(4, 8, 32)
    batches = [(torch.randn(4, 8, 32),) for _ in range(2)]
    optimized = fxopt.optimize(model, (x,), target="cuda", precision="fp8", calibration_data=batches,
                               options={"keep_float": 2}, progress=False)
    plan = optimized.report()["keep_float"]
    assert plan["kept"] == 2 and plan["of"] == 5 and len(plan["sensitivity"]) == 5
    assert optimized.pipeline.endswith(f",quantize-fp8{{skip={';'.join(plan['keep_float'])}}}")
    main, _ = relax_calls(optimized.graph)
    assert main.count("fxopt.cublaslt.matmul_fp8_bias") == 3
    assert main.count("fxopt.cublaslt.matmul(") + main.count("fxopt.cublaslt.matmul_bias") == 3  # 2 kept, the head
    directory = optimized.save(tmp_path / "fp8-mixed")
    report = json.loads((directory / "manifest.json").read_text())["extra"]["report"]
    assert report["lowering"]["keep_float"] == 2 and report["keep_float"]["keep_float"] == plan["keep_float"]
    loaded = fxopt.load(directory)
    assert sum(1 for _ in loaded.graph.call_nodes(torch.ops.fxopt.linear_fp8.default)) == 3


def test_the_default_int4_recipe_builds_zero_point_kernels_and_records_its_options(tmp_path):
    """GPTQ on the calibration data, groups of 32 with a zero point each: fxopt.int4.linear_zp for few rows."""
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    optimized = fxopt.optimize(Mlp().eval(), (x,), target="cuda", precision="int4-weight",
                               calibration_data=[(torch.randn(4, 256),) for _ in range(3)], progress=False)
    assert "group-size=32,symmetric=false,method=gptq" in optimized.pipeline
    lowering = optimized.report()["lowering"]
    assert (lowering["int4_group"], lowering["int4_zero_point"], lowering["int4_rounding"]) == (32, True, "gptq")
    assert lowering["keep_float"] == "auto" and "fidelity_target" in optimized.report()["keep_float"]
    main, _ = relax_calls(optimized.graph)
    int4 = sum(1 for _ in optimized.graph.call_nodes(torch.ops.fxopt.linear_int4.default))
    assert int4 == 2 - optimized.report()["keep_float"]["kept"]  # linear_2 (48 columns) is never int4
    assert main.count("fxopt.int4.linear_zp") == int4
