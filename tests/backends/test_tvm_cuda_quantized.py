"""Issue 5's graphs on the TVM CUDA backend, on a machine without a GPU: insert-qdq's int8 (static, dynamic,
weight-only) and int4 (weight-only, group-wise) graphs, and to-half / to-bfloat16 graphs, import to Relax and
match eager on TVM's CPU target (rounding included), and build CUDA code for sm_90.

The Q/DQ ops lower to float arithmetic that TVM's FuseOps merges into the
neighbouring elementwise kernels; the matmuls stay float (no int8 GEMM yet).
Weights the graph stores (int8 codes, packed int4) are constants of the
module, so ``build`` folds their dequantization at build time: the int4 unpack
kernel is only emitted when the packed weight reaches ``main`` at run time.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends import tvm_cuda  # noqa: E402
from fxopt.passes.quantize.int4 import quantize_int4_grouped  # noqa: E402
from tests.backends.test_tvm_cuda_codegen import assert_matches_eager, run_on_cpu  # noqa: E402
from tests.harness import TOLERANCE  # noqa: E402

QD = torch.ops.quantized_decomposed
SPECS = [
    "insert-qdq{scheme=static}", "insert-qdq{scheme=dynamic}", "insert-qdq{scheme=weight-only}",
    "insert-qdq{scheme=weight-only,bits=4,group-size=64,symmetric=false}",
]


class AttentionMLP(nn.Module):
    """Linears (weights) and a matmul of two activations, so every Q/DQ form insert-qdq emits appears."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 32)

    def forward(self, x):
        h = self.up(x)
        return self.down(torch.relu(torch.softmax(h @ h.transpose(-1, -2), dim=-1) @ h))


@pytest.fixture(scope="module")
def float_graph():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 64)
    return fxopt.capture(AttentionMLP(), (x,)), (x,)


def quantize(graph, inputs, spec):
    if "static" in spec:
        graph = fxopt.calibrate(graph, [inputs], progress=False)
    return fxopt.Pipeline(spec)(graph).graph


@pytest.mark.parametrize("spec", SPECS)
def test_quantized_graph_imports_to_relax_and_matches_eager(float_graph, spec):
    graph, inputs = float_graph
    quantized = quantize(graph, inputs, spec)
    assert_matches_eager(quantized, tvm_cuda.to_relax(quantized), inputs)


class QuantizeOnly(nn.Module):
    """The int8 codes themselves as outputs: static (float scale) and dynamic (scale from choose_qparams)."""

    def forward(self, x):
        static = QD.quantize_per_tensor.default(x, 0.5, 3, -128, 127, torch.int8)
        scale, zero_point = QD.choose_qparams.tensor(x, -128, 127, 1e-7, torch.int8)
        dynamic = QD.quantize_per_tensor.tensor(x, scale, zero_point, -128, 127, torch.int8)
        return static, dynamic, QD.dequantize_per_tensor.tensor(dynamic, scale, zero_point, -128, 127, torch.int8)


def test_quantize_codes_match_eager_exactly_ties_to_even_included():
    x = torch.arange(-70.0, 70.0, 0.25).reshape(8, -1)  # x / 0.5 hits every .5 tie; the ends clamp
    graph = fxopt.capture(QuantizeOnly(), (x,))
    static, dynamic, dequantized = run_on_cpu(tvm_cuda.to_relax(graph), (x,))
    expected = graph(x)
    assert torch.equal(static, expected[0]) and torch.equal(dynamic, expected[1])
    assert torch.equal(dequantized, expected[2])


class Int4Dequantize(nn.Module):
    """The packed weight as a run-time input, so the unpack kernel is not folded away at build time."""

    def __init__(self, weight, group_size, scheme):
        super().__init__()
        _, q = quantize_int4_grouped(weight, group_size, scheme)
        self.group_size = group_size
        self.register_buffer("scales", q.scale)
        self.register_buffer("zero_points", None if scheme == "symmetric" else q.zero_point)

    def forward(self, packed):
        return torch.ops.fxopt.dequantize_int4_grouped(packed, self.scales, self.zero_points, self.group_size,
                                                       torch.float16)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_int4_dequantize_is_exact_on_cpu_and_one_cuda_kernel_for_sm_90(scheme):
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    packed, _ = quantize_int4_grouped(weight, 64, scheme)
    graph = fxopt.capture(Int4Dequantize(weight, 64, scheme), (packed,))
    assert torch.equal(run_on_cpu(tvm_cuda.to_relax(graph), (packed,))[0], graph(packed))
    lib = tvm_cuda.build(graph, dtype="float16", arch="sm_90", compile_kernels=False)
    assert lib.target.attrs["arch"] == "sm_90"
    kernels = [line for line in lib.cuda_source.splitlines() if line.startswith('extern "C" __global__')]
    assert len(kernels) == 2 and "bitwise_and_right_shift" in kernels[0]  # declaration + definition of one kernel
    assert "uchar* __restrict__ packed" in lib.cuda_source
    assert ">> (uchar)4" in lib.cuda_source and "& (uchar)15" in lib.cuda_source


def test_static_int8_graph_builds_cuda_for_sm_90(float_graph):
    graph, inputs = float_graph
    lib = tvm_cuda.build(quantize(graph, inputs, SPECS[0]), dtype="float16", arch="sm_90", compile_kernels=False)
    assert lib.cuda_source.count("__global__") >= 4
    assert "nearbyintf(" in lib.cuda_source  # activations are quantized (ties to even) inside the fused kernels


@pytest.mark.parametrize("name, dtype", [("to-half", torch.float16), ("to-bfloat16", torch.bfloat16)])
def test_16_bit_graph_imports_and_matches_eager(float_graph, name, dtype):
    """The stock matmul converters forced float32 results: a 16-bit graph's bias add failed to import."""
    graph, inputs = float_graph
    low = fxopt.Pipeline(name)(graph).graph
    assert_matches_eager(low, tvm_cuda.to_relax(low), inputs, tol=TOLERANCE[dtype])


def test_half_graph_builds_half_cuda_kernels_for_sm_90(float_graph):
    graph, _ = float_graph
    half = fxopt.Pipeline("to-half")(graph).graph
    lib = tvm_cuda.build(half, dtype="float32", arch="sm_90", compile_kernels=False)
    assert "half* __restrict__" in lib.cuda_source and lib.cuda_source.count("__global__") >= 4
