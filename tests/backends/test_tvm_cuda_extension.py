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
from tests.backends.test_tvm_cuda_codegen import assert_matches_eager, run_on_cpu  # noqa: E402

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


def ref_layer_norm(x, gamma, beta, eps, out, residual=None, total=None):
    hidden = out.shape[-1]
    v = _f32(x).reshape(-1, hidden) + (0 if residual is None else _f32(residual).reshape(-1, hidden))
    if total is not None:
        _write(total, v.reshape(total.shape))
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean) ** 2).mean(-1, keepdims=True)
    _write(out, ((v - mean) / np.sqrt(var + eps) * _f32(gamma) + _f32(beta)).reshape(out.shape))


def ref_gelu(x, out, approximate="none"):
    _write(out, torch.nn.functional.gelu(torch.from_numpy(_f32(x)), approximate=approximate).numpy())


REFERENCES = {
    offload.GEMM: ref_matmul,
    offload.GEMM_BIAS: lambda a, b, bias, out: ref_matmul(a, b, out, bias),
    offload.ATTENTION: ref_attention,
    offload.ATTENTION_BIAS: lambda q, k, v, bias, scale, causal, out: ref_attention(q, k, v, scale, causal, out, bias),
    offload.LAYER_NORM: ref_layer_norm,
    offload.ADD_LAYER_NORM: lambda x, r, gamma, beta, eps, out: ref_layer_norm(x, gamma, beta, eps, out, r),
    offload.ADD_LAYER_NORM_SUM: lambda x, r, gamma, beta, eps, out, total: ref_layer_norm(x, gamma, beta, eps, out, r,
                                                                                           total),
    offload.GELU: ref_gelu,
    offload.GELU_TANH: lambda x, out: ref_gelu(x, out, "tanh"),
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


def vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
                       patch_size=8, attn_implementation="eager")
    torch.manual_seed(0)
    model = ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():  # LayerNorms initialize to ones and zeros: give them values, so a swapped gamma shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model, (torch.randn(2, 3, 32, 32),)


MODELS = {"bert": bert, "gpt2": gpt2, "vit": vit}


def offloaded(model, inputs, dtype="float16"):
    graph = fxopt.Pipeline("cleanup,fuse-attention")(fxopt.capture(model, inputs)).graph
    mod, _ = lower.prepare(graph, dtype, fused_attention=True)
    return graph, mod


def calls(mod) -> dict:
    text = mod["main"].script()
    return {name: text.count(f'R.call_dps_packed("{name}"') for name in REFERENCES}


# ------------------------------------------------------------------ tests
#: (layer_norm, add_layer_norm, add_layer_norm_sum, gelu, gelu_tanh) calls of the 2-layer models:
#: BERT (post-LN): the embeddings' LN (their sum broadcasts), then residual + LN twice a layer, the sum read once;
#: GPT-2 and ViT (pre-LN): the first LN, then each residual sum is also read by the next residual add, but the last
NORM_ACT_CALLS = {"bert": (1, 4, 0, 2, 0), "gpt2": (1, 1, 3, 0, 2), "vit": (1, 1, 3, 2, 0)}


@pytest.mark.parametrize("case", ["bert", "gpt2", "vit"])
def test_offloaded_module_matches_eager(case):
    model, inputs = MODELS[case]()
    graph, mod = offloaded(model, inputs)
    counts = calls(mod)
    layers = 2
    # BERT, ViT: Q, K, V, out, FFN in, FFN out; GPT-2: QKV fused
    gemms_per_layer = {"bert": 6, "gpt2": 4, "vit": 6}[case]
    assert counts[offload.GEMM] + counts[offload.GEMM_BIAS] == gemms_per_layer * layers
    if case == "bert":  # the padding mask is an attention bias
        assert (counts[offload.ATTENTION], counts[offload.ATTENTION_BIAS]) == (0, layers)
    else:  # causal: fuse-attention turns the constant causal mask into is_causal
        assert counts[offload.ATTENTION] + counts[offload.ATTENTION_BIAS] == layers
    assert tuple(counts[name] for name in offload.NORM_ACT_FUNCTIONS) == NORM_ACT_CALLS[case]
    text = mod["main"].script()
    assert "R.nn.layer_norm" not in text and "R.nn.gelu" not in text and "R.tanh" not in text
    assert_matches_eager(graph, mod, inputs, tol=5e-3)


def test_fp32_layer_norms_write_fp16_except_the_output():
    """BERT's fp32 residual stream: each kernel writes fp16 and the next reads it, with no cast kernel between."""
    _, mod = offloaded(*bert())
    main = mod["main"]
    text = main.script()
    assert text.count('dtype="float32")) = R.astype(') == 0  # no fp16 -> fp32 cast of an LN output is left
    out_types = [str(call.ty.dtype) for call in _packed_calls(main, (offload.LAYER_NORM, offload.ADD_LAYER_NORM))]
    assert out_types == ["float16"] * 4 + ["float32"]  # the last is the model's output


def _packed_calls(func, names):
    from tvm import relax

    found = []
    for block in func.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", None) == "relax.call_dps_packed" and \
                    value.args[0].global_symbol in names:
                found.append(value)
    return found


class LinearNorm(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x):
        return self.norm(torch.nn.functional.gelu(self.linear(x)) + x)


def test_layer_norm_of_a_size_not_a_multiple_of_8_stays_with_tvm():
    torch.manual_seed(0)
    model, inputs = LinearNorm(12).eval(), (torch.randn(2, 5, 12),)
    graph, mod = offloaded(model, inputs)
    counts = calls(mod)
    assert counts[offload.LAYER_NORM] + counts[offload.ADD_LAYER_NORM] + counts[offload.ADD_LAYER_NORM_SUM] == 0
    assert "R.nn.layer_norm" in mod["main"].script()
    assert counts[offload.GELU] == 1  # elementwise: any size
    assert_matches_eager(graph, mod, inputs, tol=5e-3)


def test_layer_norm_without_16_bit_input_reads_fp32():
    torch.manual_seed(0)
    model, inputs = LinearNorm(16).eval(), (torch.randn(2, 5, 16),)
    graph, mod = offloaded(model, inputs)
    (call,) = _packed_calls(mod["main"], offload.NORM_ACT_FUNCTIONS[:3])
    assert call.args[0].global_symbol == offload.ADD_LAYER_NORM
    assert sorted(str(a.ty.dtype) for a in call.args[1].fields[:2]) == ["float16", "float32"]  # gelu out, input x
    assert_matches_eager(graph, mod, inputs, tol=5e-3)


def _fp32_split_module():
    """GPT-2's QKV glue as ToMixedPrecision leaves it: fp16 GEMM out, widened, reshaped, split, each part cast back."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 24), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            widened = bb.emit(relax.op.reshape(bb.emit(relax.op.astype(x, "float32")), (2, 2, 24)))
            parts = bb.emit(relax.op.split(widened, [8, 16], axis=2))
            outs = [bb.emit(relax.op.astype(bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(parts, i)),
                                                                     (2, 2, 2, 4))), "float16")) for i in range(3)]
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def test_fp32_split_of_a_16_bit_tensor_becomes_a_16_bit_split():
    mod = _fp32_split_module()
    text = offload.offload(mod)["main"].script()
    assert "float32" not in text and text.count("R.split(") == 1
    x = (torch.randn(4, 24) * 3).half()
    for expected, got in zip(run_on_cpu(_fp32_split_module(), (x,)), run_on_cpu(offload.offload(mod), (x,))):
        assert torch.equal(expected, got)


def test_norm_act_offload_can_be_turned_off():
    model, inputs = bert()
    graph = fxopt.Pipeline("cleanup,fuse-attention")(fxopt.capture(model, inputs)).graph
    mod, _ = lower.prepare(graph, "float16", fused_attention=True)
    assert sum(calls(mod)[name] for name in offload.NORM_ACT_FUNCTIONS) == 7
    from tvm import relax

    raw = lower.to_mixed_precision(offload.offload_attention(lower._import(graph, None, False, True)[0]), "float16")
    plain = offload.offload(raw, norm_act=False)
    assert sum(calls(plain)[name] for name in offload.NORM_ACT_FUNCTIONS) == 0
    assert isinstance(plain["main"], relax.Function)


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
    assert "__global__" in lib.cuda_source  # TVM's own kernels (the mask, embedding glue) are still there
    assert "layer_norm" not in lib.cuda_source and "gelu" not in lib.cuda_source  # fxopt's kernels took them


@needs_nvcc
def test_extension_loads_and_registers_its_functions():
    """Compiled here, loaded in a fresh process (libcublasLt from the nvidia-cublas wheel), functions registered."""
    path = extension.extension_path()
    code = (
        "import sys, tvm_ffi; from fxopt.backends.tvm_cuda.extension import load_extension; "
        "load_extension(sys.argv[1]); "
        "print(','.join(n for n in ('fxopt.cublaslt.matmul', 'fxopt.cublaslt.matmul_bias', 'fxopt.attention', "
        "'fxopt.attention_bias', 'fxopt.layer_norm', 'fxopt.add_layer_norm', 'fxopt.add_layer_norm_sum', "
        "'fxopt.gelu', 'fxopt.gelu_tanh') if tvm_ffi.get_global_func(n, allow_missing=True) is not None)); "
        "print(tvm_ffi.get_global_func('fxopt.cublaslt.version')())"
    )
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names, version = done.stdout.split()
    assert names.split(",") == ["fxopt.cublaslt.matmul", "fxopt.cublaslt.matmul_bias", "fxopt.attention",
                                "fxopt.attention_bias", *offload.NORM_ACT_FUNCTIONS]
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
