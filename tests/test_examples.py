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
