"""Capture and the Graph API: metadata, weights, views, errors, no mutation."""
import hashlib

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxopt
from fxopt.errors import CaptureError, InputError, MetadataError
from fxopt.ir import meta as M
from tests.harness import assert_equivalent

aten = torch.ops.aten


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.register_buffer("offset", torch.arange(6.0))

    def forward(self, x):
        return {"y": self.norm(self.lin(x)) + self.offset, "first": x[:, 0]}


def state_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_capture_keeps_output_structure_and_values():
    model, x = Small().eval(), torch.randn(3, 4)
    graph = fxopt.capture(model, (x,))
    out = graph.run(x)
    assert set(out) == {"y", "first"}
    assert_equivalent(model, graph, (x,))


def test_every_value_node_has_tensor_info():
    graph = fxopt.capture(Small(), (torch.randn(3, 4),))
    for node in graph.nodes:
        if node.op != "output":
            assert isinstance(M.tensor_info(node), M.TensorInfo), node
    linear = next(graph.call_nodes(aten.linear.default))
    assert M.tensor_info(linear) == M.TensorInfo((3, 6), torch.float32, torch.device("cpu"))


def test_capture_never_mutates_the_model():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    before = state_hash(model)
    fxopt.capture(model, (torch.randn(5, 4),))
    assert state_hash(model) == before
    assert model.training  # still in the mode the user left it in
    model(torch.randn(5, 4))  # and still usable


def test_weight_helpers_round_trip():
    x = torch.randn(2, 4)
    graph = fxopt.capture(Small(), (x,))
    weight = graph.param("lin_weight")
    assert weight.shape == (6, 4)
    graph.replace_param("lin_weight", weight * 0)
    assert torch.equal(graph.param("lin_weight"), torch.zeros(6, 4))
    new = graph.add_param("extra scale", torch.full((6,), 2.0))
    assert new.target == "extra_scale" and M.tensor_info(new).shape == (6,)
    linear = next(graph.call_nodes(aten.linear.default))
    with graph.fx_graph.inserting_after(linear):
        scaled = graph.fx_graph.call_function(aten.mul.Tensor, (linear, new))
    linear.replace_all_uses_with(scaled)
    scaled.args = (linear, new)
    graph.refresh_meta()
    graph.recompile()
    graph.verify()
    expected = F.layer_norm(2.0 * graph.param("lin_bias").expand(2, 6), (6,), graph.param("norm_weight"),
                            graph.param("norm_bias")) + torch.arange(6.0)
    torch.testing.assert_close(graph.run(x)["y"], expected)


def test_param_count_and_size_count_shared_tensors_once():
    model = Small()
    graph = fxopt.capture(model, (torch.randn(2, 4),))
    assert graph.param_count() == sum(p.numel() for p in model.parameters()) + 6
    assert graph.size_bytes() == graph.param_count() * 4
    graph.replace_param("norm_weight", graph.param("offset"))  # now the same tensor twice
    assert graph.param_count() == sum(p.numel() for p in model.parameters())


def test_size_bytes_not_in_counts_only_the_weights_the_other_graph_lacks():
    graph = fxopt.capture(Small(), (torch.randn(2, 4),))
    changed = graph.copy()
    assert changed.size_bytes_not_in(graph) == 0
    changed.replace_param("lin_weight", torch.zeros(6, 4, dtype=torch.int8))
    assert changed.size_bytes_not_in(graph) == 24 and graph.size_bytes_not_in(changed) == 6 * 4 * 4


def test_param_on_non_weight_node_is_an_error():
    graph = fxopt.capture(Small(), (torch.randn(2, 4),))
    with pytest.raises(MetadataError, match=r"%linear \(aten.linear.default\): is not a weight"):
        graph.param("linear")
    with pytest.raises(MetadataError, match="no node named %nope"):
        graph.node("nope")


def test_networkx_view_is_read_only_and_complete():
    graph = fxopt.capture(Small(), (torch.randn(2, 4),))
    view = graph.to_networkx()
    assert set(view.nodes) == {n.name for n in graph.nodes}
    assert view.has_edge("lin_weight", "linear") and view.nodes["linear"]["target"] == "aten.linear.default"
    assert view.nodes["linear"]["info"].shape == (2, 6)
    with pytest.raises(nx.NetworkXError):
        view.add_edge("linear", "x")


def test_printer_lists_ops_shapes_and_dtypes():
    text = fxopt.capture(Small(), (torch.randn(2, 4),)).format()
    assert "%linear: float32[2, 6] = aten.linear.default(%x, %lin_weight, %lin_bias)" in text
    assert "%lin_weight: float32[6, 4] = weight lin.weight" in text
    assert text.splitlines()[-1].startswith("return")


def test_copy_shares_weights_but_not_structure():
    graph = fxopt.capture(Small(), (torch.randn(2, 4),))
    clone = graph.copy()
    assert clone.param("lin_weight") is graph.param("lin_weight")
    next(clone.call_nodes(aten.linear.default)).target = aten.relu.default
    assert next(graph.call_nodes(aten.linear.default)) is not None


def test_wrong_inputs_get_clear_errors():
    graph = fxopt.capture(Small(), (torch.randn(2, 4),))
    with pytest.raises(InputError, match=r"input x: shape \[3, 4\] does not match the captured float32\[2, 4\]"):
        graph.run(torch.randn(3, 4))
    with pytest.raises(InputError, match=r"input x: dtype torch.float64 does not match"):
        graph.run(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(InputError, match="got 2 tensors, expected 1"):
        graph.run(torch.randn(2, 4), torch.randn(2, 4))


def test_dynamic_batch_is_accepted():
    batch = torch.export.Dim("batch")
    graph = fxopt.capture(Small(), (torch.randn(2, 4),), dynamic_shapes=({0: batch},))
    assert graph.input_specs[0].shape == (None, 4)
    for n in (1, 5):
        x = torch.randn(n, 4)
        assert graph.run(x)["y"].shape == (n, 6)
    result = fxopt.Pipeline("cleanup", debug=True)(graph)
    assert result.graph.run(torch.randn(7, 4))["y"].shape == (7, 6)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # Python branch on a tensor value
            return x * 2
        return x


def test_untraceable_model_names_the_line_and_a_hint():
    with pytest.raises(CaptureError) as info:
        fxopt.capture(DataDependent(), (torch.randn(3),))
    message = str(info.value)
    assert "DataDependent" in message and "test_capture_and_graph.py" in message
    assert "`if x.sum() > 0:" in message
    assert "torch.where" in message  # the hint


class SideEffect(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # Python state the captured graph cannot repeat
        return x * self.calls


def test_python_side_effect_is_a_capture_error():
    model = SideEffect()
    with pytest.raises(CaptureError, match=r"SideEffect: forward\(\) changes the Python attribute `calls`"):
        fxopt.capture(model, (torch.randn(3),))
    assert model.calls == 0


@pytest.mark.parametrize("model, inputs, message", [
    (lambda x: x, (torch.randn(2),), "not a torch.nn.Module"),
    (nn.ReLU(), torch.randn(2), "must be a tuple of tensors"),
    (nn.ReLU(), (torch.randn(2, dtype=torch.complex64),), "complex dtype"),
])
def test_bad_capture_arguments(model, inputs, message):
    with pytest.raises(CaptureError, match=message):
        fxopt.capture(model, inputs)


def test_metadata_accessors_name_the_node():
    graph = fxopt.capture(Small(), (torch.randn(2, 4),))
    linear = next(graph.call_nodes(aten.linear.default))
    del linear.meta[M.INFO_KEY]
    with pytest.raises(MetadataError, match=r"%linear \(aten.linear.default\): has no TensorInfo"):
        M.tensor_info(linear)
    with pytest.raises(MetadataError, match=r"%linear .*has no TensorInfo"):
        graph.verify()
    with pytest.raises(MetadataError, match="has no QParams; calibrate"):
        M.qparams(linear)
