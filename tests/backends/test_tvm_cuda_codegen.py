"""The TVM CUDA backend on a machine without a GPU: Relax import, CUDA codegen for sm_90, kernels as a fatbin.

Numerics are checked by running the imported Relax module on the CPU (TVM's
llvm target): the CUDA kernels themselves run only on the GPU machine.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils import _pytree as pytree

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends import tvm_cuda  # noqa: E402
from fxopt.backends.tvm_cuda import device_binary  # noqa: E402
from fxopt.errors import LoweringError  # noqa: E402
from tests.harness import relative_error  # noqa: E402
from tests.models import tiny_bert, tiny_gpt2  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile CUDA kernels")


def host_target():
    """llvm for this CPU: LLVM's generic x86-64 lowers float16 arithmetic into library calls, which made the JIT
    of a tiny fp16 BERT take ~20 s at its first call (2 s for the host CPU)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def run_on_cpu(mod, inputs):
    """Build a Relax module for the llvm target and run ``main``: the reference for what the import means."""
    from tvm import relax

    executable = tvm.compile(mod, target=host_target())
    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x.numpy()) for x in inputs])
    outs = [out] if hasattr(out, "numpy") else [out[i] for i in range(len(out))]
    return [torch.from_numpy(o.numpy()) for o in outs]


def assert_matches_eager(graph, mod, inputs, tol=1e-5):
    expected = pytree.tree_leaves(graph.run(*inputs))
    got = run_on_cpu(mod, inputs)
    assert len(got) == len(expected)
    for e, g in zip(expected, got):
        assert g.dtype == e.dtype and tuple(g.shape) == tuple(e.shape)
        assert relative_error(e, g) < tol


@pytest.fixture(scope="module")
def bert():
    model, inputs = tiny_bert()
    return fxopt.capture(model, inputs), inputs


@pytest.fixture(scope="module")
def bert_fp16(bert):
    """tiny BERT built for sm_90 in fp16, kernels compiled at build time when nvcc is there."""
    graph, _ = bert
    return tvm_cuda.build(graph, dtype="float16", arch="sm_90", compile_kernels=shutil.which("nvcc") is not None)


# ------------------------------------------------------------------ Relax
def test_tiny_bert_imports_to_relax_and_matches_eager(bert):
    graph, inputs = bert
    mod = tvm_cuda.to_relax(graph)
    main = mod["main"]
    assert [gv.name_hint for gv in mod.functions] == ["main"]
    assert [p.name for p in main.params] == ["input_ids", "attention_mask"]  # weights are bound constants
    assert [str(p.ty.dtype) for p in main.params] == ["int64", "int64"]
    assert_matches_eager(graph, mod, inputs)


def test_gpt2_cumsum_and_pow_follow_torch_semantics():
    """cumsum(bool) sums in int64 (stock: bool); x**3 is x*x*x (stock powf: NaN under fast math for x < 0)."""
    model, inputs = tiny_gpt2()
    graph = fxopt.capture(model, inputs)
    mod = tvm_cuda.to_relax(graph)
    script = mod.script()
    assert 'R.cumsum(' in script and 'dtype="int64"' in script.split("R.cumsum(")[1].splitlines()[0]
    assert "R.power(" not in script
    assert_matches_eager(graph, mod, inputs)


class _Erfinv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.erfinv(torch.tanh(self.fc(x)))


def test_op_without_converter_raises_lowering_error_naming_it():
    graph = fxopt.capture(_Erfinv(), (torch.randn(2, 4),))
    expected = r"node %erfinv \(aten\.erfinv\.default\): no Relax converter; pass custom_convert_map"
    with pytest.raises(LoweringError, match=expected):
        tvm_cuda.to_relax(graph)


def test_custom_convert_map_lowers_the_op():
    from tvm import relax

    def erfinv_as_identity(node, importer):  # the converter signature: (fx.Node, importer) -> relax.Var
        return importer.block_builder.emit(relax.op.multiply(importer.env[node.args[0]], relax.const(1.0)))

    graph = fxopt.capture(_Erfinv(), (torch.randn(2, 4),))
    mod = tvm_cuda.to_relax(graph, custom_convert_map={"erfinv.default": erfinv_as_identity})
    assert "R.tanh(" in mod.script() and "erfinv" not in mod.script()


class _LinearAct(torch.nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.fc, self.activation = torch.nn.Linear(8, 16), activation

    def forward(self, x):
        return torch.ops.fxopt.linear_act(x, self.fc.weight, self.fc.bias, self.activation)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
def test_fxopt_linear_act_lowers_through_the_builtin_converter(activation):
    inputs = (torch.randn(3, 8),)
    graph = fxopt.capture(_LinearAct(activation), inputs)
    assert any("linear_act" in str(n.target) for n in graph.call_nodes())
    assert_matches_eager(graph, tvm_cuda.to_relax(graph), inputs)


# ------------------------------------------------------------- CUDA codegen
def test_fp16_build_generates_half_cuda_kernels_for_sm_90(bert_fp16):
    assert bert_fp16.target.attrs["arch"] == "sm_90"
    source = bert_fp16.cuda_source
    kernels = source.count("__global__")
    assert kernels >= 30
    assert "half* __restrict__" in source  # ToMixedPrecision took effect
    assert source.count("fused_matmul") >= 6  # every linear and attention matmul is its own fused kernel
    assert "layer_norm" in source and "softmax" in source


def test_fp16_matmul_of_tensor_core_size_uses_wmma():
    lin = torch.nn.Linear(256, 256)
    graph = fxopt.capture(lin, (torch.randn(128, 256),))
    lib = tvm_cuda.build(graph, dtype="float16", compile_kernels=False)
    assert "wmma::mma_sync" in lib.cuda_source and lib.fatbin is None


def test_cuda_graph_option_rewrites_main_to_capture_and_replay(bert, bert_fp16):
    """Kernels that read only static buffers (not main's inputs or outputs) are captured once, then replayed."""
    graph, _ = bert
    captured = tvm_cuda.build(graph, dtype="float16", cuda_graph=True, compile_kernels=False)
    assert "vm.builtin.cuda_graph" not in bert_fp16.executable.mod.as_text()
    assert "vm.builtin.cuda_graph.run_or_capture" in captured.executable.mod.as_text()


def test_unknown_dtype_and_arch_are_refused(bert):
    graph, _ = bert
    with pytest.raises(LoweringError, match=r"dtype 'bfloat16' is not supported; valid dtypes: float16, float32"):
        tvm_cuda.build(graph, dtype="bfloat16")
    with pytest.raises(LoweringError, match=r"arch '90' is not a CUDA SM name"):
        tvm_cuda.build(graph, arch="90")


# --------------------------------------------------------- kernels as binary
@needs_nvcc
def test_kernels_are_compiled_to_a_fatbin_at_build_time(bert_fp16):
    fatbin = bert_fp16.fatbin
    assert device_binary.is_cuda_fatbin(fatbin)
    for name in ("layer_norm_kernel", "fused_softmax"):
        assert name.encode() in fatbin  # kernel symbols of the embedded cubin


@needs_nvcc
def test_exported_library_holds_the_fatbin_not_the_source(bert_fp16, tmp_path):
    path = bert_fp16.export(str(tmp_path / "bert.so"))
    rows, children, entries = device_binary.split_blob(device_binary.read_packed_blob(path))
    assert [kind for kind, _ in entries] == ["relax.VMExecutable", "_lib", "cuda"]
    fmt, _, code = device_binary.split_cuda_payload(entries[2][1], {bert_fp16.fatbin})
    assert fmt == "fatbin" and code == bert_fp16.fatbin
    assert b"__global__" not in (tmp_path / "bert.so").read_bytes()


def test_packed_blob_round_trips(bert_fp16):
    blob = tvm.get_global_func("runtime.ModulePackImportsToTensor")(bert_fp16.executable.mod).numpy().tobytes()
    assert device_binary.join_blob(*device_binary.split_blob(blob)) == blob
    fmt, _, code = device_binary.split_cuda_payload(device_binary.split_blob(blob)[2][2][1],
                                                    {bert_fp16.cuda_source.encode()})
    assert fmt == "cuda" and code.decode() == bert_fp16.cuda_source


def test_a_length_lookalike_in_the_fmap_does_not_hide_the_code():
    """Seen in an int4 build: eight bytes of the fmap read as the length of everything after them."""
    import struct
    code = b"extern \"C\" __global__ void k() {}"
    tail = struct.pack("<Q", len(code)) + code
    fmap = b"\x01\x00" + struct.pack("<Q", len(tail) + 3) + b"\x00\x00\x00"  # a lookalike of len(rest)
    payload = struct.pack("<Q", 4) + b"cuda" + fmap + tail
    assert device_binary.split_cuda_payload(payload)[2] != code  # the first fit is the lookalike
    fmt, raw_fmap, found = device_binary.split_cuda_payload(payload, {code})
    assert (fmt, raw_fmap, found) == ("cuda", fmap, code)
