"""``build(matmul="cublaslt")``: GEMMs to cuBLASLt and attention to fxopt's kernel, checked without a GPU.

The Relax rewrites (offload.py) are checked for meaning on the CPU: the module
is built for llvm and the ``fxopt.*`` packed functions are registered as numpy
references, so a wrong operand order, bias, scale, mask or causal flag shows as
a wrong answer against eager PyTorch. The CUDA extension itself is compiled
with nvcc and loaded in a subprocess (its functions would clash with the
references); its kernels run on the GPU machine (benchmarks/gpu_bert.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends import tvm_cuda  # noqa: E402
from fxopt.backends.tvm_cuda import extension, lower, offload  # noqa: E402
from tests.backends.test_tvm_cuda_codegen import assert_matches_eager  # noqa: E402

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the CUDA extension")


# ------------------------------------------------------------- references
def _f32(t) -> np.ndarray:
    return t.numpy().astype(np.float32)


def _write(out, value: np.ndarray) -> None:
    out.copyfrom(value.astype(out.numpy().dtype))


def ref_matmul(a, b, out, bias=None):
    a, b = _f32(a), _f32(b)
    y = a.reshape(-1, a.shape[-1]) @ b if b.ndim == 2 else a @ b
    _write(out, y.reshape(out.shape) + (0 if bias is None else _f32(bias)))


def ref_attention(q, k, v, scale, causal, out, bias=None):
    q, k, v = (_f32(t).transpose(0, 2, 1, 3) for t in (q, k, v))  # BSNH -> BNSH
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    if bias is not None:
        scores = scores + _f32(bias)
    if causal:
        length, source = scores.shape[-2:]
        shift = source - length if causal == 2 else 0
        scores = np.where(np.tril(np.ones((length, source), bool), k=shift), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    _write(out, ((weights / weights.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3))


REFERENCES = {
    offload.GEMM: ref_matmul,
    offload.GEMM_BIAS: lambda a, b, bias, out: ref_matmul(a, b, out, bias),
    offload.ATTENTION: ref_attention,
    offload.ATTENTION_BIAS: lambda q, k, v, bias, scale, causal, out: ref_attention(q, k, v, scale, causal, out, bias),
}


@pytest.fixture(scope="module", autouse=True)
def numpy_references():
    for name, fn in REFERENCES.items():
        tvm.register_global_func(name, fn, override=True)


# ----------------------------------------------------------------- models
def bert(heads: int = 4, hidden: int = 64):
    """A 2-layer BERT with head size hidden/heads and a padded second sequence (so the mask matters)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, 100, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    return model, (ids, mask)


def gpt2():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4, attn_implementation="eager",
                        use_cache=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2Model(config).eval(), (torch.randint(0, 100, (2, 20)),)


def offloaded(model, inputs, dtype="float16"):
    graph = fxopt.Pipeline("cleanup,fuse-attention")(fxopt.capture(model, inputs)).graph
    mod, _ = lower.prepare(graph, dtype, fused_attention=True)
    return graph, mod


def calls(mod) -> dict:
    text = mod["main"].script()
    return {name: text.count(f'R.call_dps_packed("{name}"') for name in REFERENCES}


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("case", ["bert", "gpt2"])
def test_offloaded_module_matches_eager(case):
    model, inputs = {"bert": bert, "gpt2": gpt2}[case]()
    graph, mod = offloaded(model, inputs)
    counts = calls(mod)
    layers = 2
    gemms_per_layer = {"bert": 6, "gpt2": 4}[case]  # BERT: Q, K, V, out, FFN in, FFN out; GPT-2: QKV fused
    assert counts[offload.GEMM] + counts[offload.GEMM_BIAS] == gemms_per_layer * layers
    if case == "bert":  # the padding mask is an attention bias
        assert (counts[offload.ATTENTION], counts[offload.ATTENTION_BIAS]) == (0, layers)
    else:  # causal: fuse-attention turns the constant causal mask into is_causal
        assert counts[offload.ATTENTION] + counts[offload.ATTENTION_BIAS] == layers
    assert_matches_eager(graph, mod, inputs, tol=5e-3)


def test_head_size_not_a_multiple_of_16_keeps_tvm_attention():
    graph, mod = offloaded(*bert(heads=4, hidden=32))  # head size 8
    counts = calls(mod)
    assert counts[offload.ATTENTION] == counts[offload.ATTENTION_BIAS] == 0
    assert counts[offload.GEMM] + counts[offload.GEMM_BIAS] == 12
    assert_matches_eager(graph, mod, bert(heads=4, hidden=32)[1], tol=5e-3)


def test_float32_build_offloads_nothing():
    _, mod = offloaded(*bert(), dtype="float32")
    assert sum(calls(mod).values()) == 0


def test_unknown_matmul_option_names_the_choices():
    model, inputs = bert()
    with pytest.raises(fxopt.LoweringError, match="valid: default, mma, cublaslt"):
        tvm_cuda.build(fxopt.capture(model, inputs), matmul="cublas")


@needs_nvcc
def test_build_exports_the_extension_and_lists_it(tmp_path):
    model, inputs = bert()
    graph = fxopt.Pipeline("cleanup,fuse-attention")(fxopt.capture(model, inputs)).graph
    lib = tvm_cuda.build(graph, matmul="cublaslt", cuda_graph=True, keep_params_as_input=True)
    assert [os.path.basename(p) for p in lib.extensions] == [extension.EXTENSION_NAME]
    path = lib.export(str(tmp_path / "bert.so"))
    manifest = json.load(open(tvm_cuda.params_json_path(path)))
    assert manifest["extensions"] == [extension.EXTENSION_NAME]
    assert (tmp_path / extension.EXTENSION_NAME).exists()
    assert "__global__" in lib.cuda_source  # TVM's own kernels (layer norm, softmax-free glue) are still there


@needs_nvcc
def test_extension_loads_and_registers_its_functions():
    """Compiled here, loaded in a fresh process (libcublasLt from the nvidia-cublas wheel), functions registered."""
    path = extension.extension_path()
    code = (
        "import sys, tvm_ffi; from fxopt.backends.tvm_cuda.extension import load_extension; "
        "load_extension(sys.argv[1]); "
        "print(','.join(n for n in ('fxopt.cublaslt.matmul', 'fxopt.cublaslt.matmul_bias', 'fxopt.attention', "
        "'fxopt.attention_bias') if tvm_ffi.get_global_func(n, allow_missing=True) is not None)); "
        "print(tvm_ffi.get_global_func('fxopt.cublaslt.version')())"
    )
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names, version = done.stdout.split()
    assert names.split(",") == ["fxopt.cublaslt.matmul", "fxopt.cublaslt.matmul_bias", "fxopt.attention",
                                "fxopt.attention_bias"]
    assert int(version) >= 130000  # cuBLASLt 13


def test_missing_cublas_headers_raise_a_lowering_error(monkeypatch):
    monkeypatch.setattr(extension, "nvidia_dirs", lambda kind: [])
    with pytest.raises(fxopt.LoweringError, match="pip install 'nvidia-cublas"):
        extension.extension_path()


def test_without_the_kernel_attention_is_decomposed_so_tvm_mixed_precision_cannot_drop_the_mask():
    """TVM 0.27's ToMixedPrecision rebuilds nn.attention without bias and scale: only the kernel path keeps SDPA."""
    model, inputs = bert()
    graph = fxopt.Pipeline("cleanup,fuse-attention")(fxopt.capture(model, inputs)).graph
    assert any("scaled_dot_product_attention" in str(n.target) for n in graph.call_nodes())
    mod, _ = lower.prepare(graph, "float16")
    assert "R.nn.attention" not in mod["main"].script()
    assert_matches_eager(graph, mod, inputs, tol=5e-3)
