"""Weights as inputs for the TVM CUDA backend: nothing embedded, a manifest by name, fed from a state_dict.

The CPU tests build the same Relax module for TVM's llvm target and run it
through :mod:`fxopt.backends.tvm_cuda.runtime`. The ``gpu`` test runs a library
built for sm_90 by ``benchmarks/gpu_bert.py --build DIR --models bert-tiny``
(``FXOPT_TVM_CUDA_ARTIFACTS=DIR``) under the TVM runtime alone.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

tvm = pytest.importorskip("tvm")

import fxopt  # noqa: E402
from fxopt.backends import tvm_cuda  # noqa: E402
from fxopt.backends.tvm_cuda import runtime  # noqa: E402
from fxopt.errors import InputError  # noqa: E402
from tests.harness import relative_error  # noqa: E402
from tests.models import tiny_bert  # noqa: E402


def _has_compiler() -> bool:
    try:
        tvm.get_global_func("relax.transform.LiftTransformParams")
        return True
    except Exception:  # runtime-only TVM (the GPU machine)
        return False


needs_compiler = pytest.mark.skipif(not _has_compiler(), reason="needs the TVM compiler, not the runtime alone")


def build_llvm(graph, dtype):
    """What ``tvm_cuda.build(keep_params_as_input=True)`` makes, compiled for the CPU instead."""
    mod, weights = tvm_cuda.prepare(graph, dtype, keep_params_as_input=True)
    executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    params = [tvm_cuda.ParamSpec(n, tuple(t.shape), str(t.dtype)[6:], runtime.tensor_crc32(t)) for n, t in weights]
    return tvm_cuda.CudaLibrary(executable, None, "", None, [s.name for s in graph.input_specs], params)


@pytest.fixture(scope="module")
def bert():
    model, inputs = tiny_bert()
    graph = fxopt.Pipeline("cleanup")(fxopt.capture(model, inputs)).graph
    return model, inputs, graph


@needs_compiler
def test_prepare_lifts_weight_casts_into_transform_params(bert):
    _, _, graph = bert
    mod, weights = tvm_cuda.prepare(graph, "float16", keep_params_as_input=True)
    assert sorted(gv.name_hint for gv in mod.functions) == ["main", tvm_cuda.TRANSFORM_PARAMS]
    main, transform = mod["main"], mod[tvm_cuda.TRANSFORM_PARAMS]
    assert int(main.attrs["num_input"]) == 2 and "params" not in main.attrs
    assert [p.name for p in main.params[:2]] == ["input_ids", "attention_mask"]
    assert len(transform.params) == 1  # one tuple: the fp32 weights in manifest order
    assert len(transform.params[0].ty.fields) == len(weights)
    assert "R.astype(" in transform.script()  # the fp32 -> fp16 weight casts run once, there
    matrices = [str(p.ty.dtype) for p in main.params[2:] if len(p.ty.shape) == 2]
    # the linears (6 a layer, and the pooler) reach main cast to fp16 already; the word-embedding table
    # is gathered in fp32
    assert sorted(matrices) == ["float16"] * 13 + ["float32"]


@needs_compiler
def test_weight_names_are_state_dict_keys_in_main_order(bert):
    model, _, graph = bert
    _, weights = tvm_cuda.prepare(graph, "float16", keep_params_as_input=True)
    names = [n for n, _ in weights]
    state = model.state_dict()
    assert names and all(n in state for n in names)
    assert len(set(names)) == len(names)
    for name, tensor in weights:
        assert torch.equal(tensor, state[name])
    # buffers and constants folded by cleanup stay in the library; parameters are all passed
    params = {n for n, _ in graph.module.named_parameters()}
    assert set(names) == params


@needs_compiler
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_library_fed_from_state_dict_matches_eager(bert, tmp_path, dtype, tol):
    model, inputs, graph = bert
    lib = build_llvm(graph, dtype)
    path = lib.export(str(tmp_path / "bert.so"))
    manifest = json.load(open(tmp_path / "bert.params.json"))
    assert tvm_cuda.params_json_path(path) == str(tmp_path / "bert.params.json")
    assert manifest["format"] == "fxopt.tvm_cuda.params/1" and manifest["transform"] == tvm_cuda.TRANSFORM_PARAMS
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    assert [p["name"] for p in manifest["params"]] == lib.param_names
    assert all(isinstance(p["crc32"], int) for p in manifest["params"])

    loaded = runtime.load(path, device="cpu")
    assert loaded.param_names == lib.param_names
    loaded.set_params(model.state_dict())
    expected = model(*inputs).last_hidden_state
    got = loaded(*inputs)
    got = got if torch.is_tensor(got) else got[0]
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert relative_error(expected, got) < tol


@needs_compiler
def test_set_params_refuses_missing_changed_and_late_weights(bert, tmp_path):
    model, inputs, graph = bert
    path = build_llvm(graph, "float32").export(str(tmp_path / "bert.so"))
    state = model.state_dict()
    name = runtime.load(path, device="cpu").param_names[0]

    with pytest.raises(InputError, match=r"set_params: 1 weights missing"):
        runtime.load(path, device="cpu").set_params({k: v for k, v in state.items() if k != name})
    changed = {**state, name: state[name] + 1}
    lib = runtime.load(path, device="cpu")
    assert lib.crc_mismatches(changed) == [name] and lib.crc_mismatches(state) == []
    with pytest.raises(InputError, match=rf"weight {name} differs from the one the library was built with"):
        lib.set_params(changed)
    with pytest.raises(InputError, match=r"weights are not set"):
        lib(*inputs)
    lib.set_params(state)
    lib(*inputs)
    with pytest.raises(InputError, match=r"has run already"):
        lib.set_params(state)


@needs_compiler
def test_cuda_build_keeps_weights_out_and_still_uses_cuda_graphs(bert, tmp_path):
    _, _, graph = bert
    lib = tvm_cuda.build(graph, dtype="float16", cuda_graph=True, compile_kernels=False, keep_params_as_input=True)
    embedded = tvm_cuda.build(graph, dtype="float16", cuda_graph=True, compile_kernels=False)
    assert lib.param_names and not embedded.param_names
    text = lib.executable.mod.as_text()
    assert f"@{tvm_cuda.TRANSFORM_PARAMS}:" in text
    # weights after num_input count as static: the kernels that read them are still captured
    captures = text.count("vm.builtin.cuda_graph.run_or_capture")
    assert captures >= 1 and captures == embedded.executable.mod.as_text().count("vm.builtin.cuda_graph.run_or_capture")
    assert lib.params_manifest()["params"][0]["name"] == lib.param_names[0]


# ------------------------------------------------------------------- GPU
ARTIFACTS = os.environ.get("FXOPT_TVM_CUDA_ARTIFACTS")


@pytest.mark.gpu
@pytest.mark.skipif(not ARTIFACTS, reason="set FXOPT_TVM_CUDA_ARTIFACTS: a gpu_bert.py --build DIR --models bert-tiny")
# the dlight build, and the cuBLASLt + fused-attention build (gpu_bert.py --variants "cleanup,fuse-attention+cublaslt")
@pytest.mark.parametrize("library", ["bert-tiny.so", "bert-tiny-cleanup-fuse-attention-cublaslt.so"])
def test_runtime_only_library_on_gpu_matches_eager_and_replays_cuda_graphs(library):
    from benchmarks.gpu_bert import bert_tiny

    if not os.path.exists(os.path.join(ARTIFACTS, library)):
        pytest.skip(f"{library} is not in {ARTIFACTS}")
    model, (input_ids, mask) = bert_tiny()
    lib = runtime.load(os.path.join(ARTIFACTS, library), device="cuda")
    assert lib.crc_mismatches(model.state_dict()) == []
    lib.set_params(model.state_dict())
    model = model.cuda()
    gen = torch.Generator().manual_seed(7)
    other_ids = torch.randint(0, 1000, input_ids.shape, generator=gen)
    padded = mask.clone()
    padded[1, 10:] = 0
    with torch.inference_mode():
        for ids, m in [(input_ids, mask), (other_ids, padded), (input_ids, mask), (other_ids, padded)]:
            ids, m = ids.cuda(), m.cuda()
            expected = model(ids, m).last_hidden_state
            got = lib(ids, m)
            got = got if torch.is_tensor(got) else got[0]
            assert got.is_cuda and got.shape == expected.shape
            assert relative_error(expected, got) < 5e-3  # fp16 kernels; replays see the new inputs
