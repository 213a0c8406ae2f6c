"""per_layer_error: every layer found, zero against itself, int8-sized against a quantized graph, smooth-quant's
power-of-two rescaling undone (and only then), padding left out where optimize finds an attention mask, bad inputs
refused."""
import pytest
import torch
from torch.utils import _pytree as pytree

import fxopt
from fxopt.errors import InputError
from fxopt.passes.quantize import calibrate_smoothed
from fxopt.report.layer_error import corresponding_layers, per_layer_error
from tests.harness import relative_error
from tests.report.report_models import calibration_batches, captured, quantized_pair

aten = torch.ops.aten
LAYER_TARGETS = (aten.linear.default, aten.layer_norm.default)


def layer_names(graph):
    return [n.name for n in graph.nodes if n.op == "call_function" and n.target in LAYER_TARGETS]


def test_identical_graphs_have_zero_error_on_every_layer_in_graph_order():
    graph, _ = captured(("relu", "gelu", "relu"))
    errors = per_layer_error(graph, graph.copy(), calibration_batches(2))
    assert [e["node"] for e in errors] == layer_names(graph)  # 8 linears + 3 LayerNorms, in order
    assert len(errors) == 11 and all(e["rel_err"] == 0.0 and not e["rescaled"] for e in errors)
    assert errors[0]["shape"] == [2, 5, 16] and errors[0]["op"] == "aten.linear.default"


def test_quantized_graph_keeps_linear_names_and_shows_int8_sized_error():
    graph, quantized, batches = quantized_pair()
    errors = {e["node"]: e for e in per_layer_error(graph, quantized, batches)}
    linears = [n.name for n in graph.call_nodes(aten.linear.default)]
    assert set(linears) <= set(errors), "insert-qdq must keep the quantized linears' names"
    for name in linears:  # 8-bit weights and activations: about 1% per layer, never exact, never broken
        assert 1e-4 < errors[name]["rel_err"] < 0.1, (name, errors[name]["rel_err"])
        assert not errors[name]["rescaled"]


def layer_output(graph, name, batch):
    """The value of node ``name`` on ``batch``: the graph cut to that node as its only output."""
    cut = graph.copy()
    cut.output_node.args = ((cut.node(name),),)
    cut.fx_graph.eliminate_dead_code()
    cut.recompile()
    with torch.no_grad():
        (value,) = pytree.tree_leaves(cut.module(*batch))
    return value


def test_each_error_is_the_relative_error_of_that_layer_output():
    graph, quantized, batches = quantized_pair()
    batch = batches[0]
    errors = per_layer_error(graph, quantized, batch)  # one input tuple is one batch
    for entry in errors[:4]:
        expected = relative_error(layer_output(graph, entry["node"], batch),
                                  layer_output(quantized, entry["node"], batch))
        if not entry["rescaled"]:
            assert entry["rel_err"] == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_a_mask_leaves_padding_rows_out():
    graph, quantized, batches = quantized_pair()
    batch = batches[0]  # x: [2, 5, 8]; the mask keeps 3 of the 10 positions
    rows = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    errors = per_layer_error(graph, quantized, batch, mask=lambda b: rows)
    unmasked = {e["node"]: e["rel_err"] for e in per_layer_error(graph, quantized, batch)}
    assert all(e["masked"] for e in errors)
    for entry in errors:
        if not entry["rescaled"]:
            a, b = layer_output(graph, entry["node"], batch), layer_output(quantized, entry["node"], batch)
            assert entry["rel_err"] == pytest.approx(relative_error(a[rows], b[rows]), rel=1e-6, abs=1e-12)
    assert any(abs(e["rel_err"] - unmasked[e["node"]]) > 1e-4 for e in errors)  # the mask changed something
    with pytest.raises(InputError, match=r"mask\(batch\) gave Tensor torch.int64; it must return a bool"):
        per_layer_error(graph, quantized, batch, mask=lambda b: rows.long())


def test_mask_rows_follow_batch_and_seq_dims_also_in_attention_layout():
    from fxopt.report.layer_error import _rows_for
    rows = torch.tensor([[True, True, False], [True, False, False]])  # [batch 2, seq 3]
    assert torch.equal(_rows_for((2, 3, 8), rows), rows)
    heads = _rows_for((2, 4, 3, 8), rows)  # [batch, heads, seq, dim]: the same rows in every head
    assert heads.shape == (2, 4, 3) and all(torch.equal(heads[:, h], rows) for h in range(4))
    assert _rows_for((6, 8), rows) is None and _rows_for((2, 8), rows) is None  # no seq dim: compared in full


def test_smooth_quant_rescaling_is_undone_for_layernorms_only():
    graph, example = captured(("relu", "relu"))
    batches = calibration_batches(3)
    smoothed = calibrate_smoothed(graph, batches, 0.8, progress=False)  # float, weights and LN rescaled
    errors = {e["node"]: e for e in per_layer_error(graph, smoothed, batches)}
    norms = [n.name for n in graph.call_nodes(aten.layer_norm.default)]
    assert {n for n in errors if errors[n]["rescaled"]} == set(norms)
    assert all(errors[n]["rel_err"] < 1e-5 for n in errors), errors  # smoothing is exact up to float rounding
    for name in norms:  # compared as they are, the LayerNorm outputs differ by the smoothing factors
        raw = relative_error(layer_output(graph, name, example), layer_output(smoothed, name, example))
        assert raw > 0.1, (name, raw)


def test_layers_of_another_shape_or_without_a_namesake_are_left_out():
    graph, _ = captured(("relu",) * 3)
    other, _ = captured(("relu",), seed=3)  # 1 block: linear_3 is its [2, 5, 4] head
    errors = per_layer_error(graph, other, calibration_batches(1))
    assert [e["node"] for e in errors] == ["linear", "layer_norm", "linear_1", "linear_2"]
    assert all(e["rel_err"] > 0.01 for e in errors)  # other weights: different values
    assert corresponding_layers(graph, other)["linear_3"] == "aten.linear.default"  # same name, shape differs


def test_bad_inputs_raise_clear_errors():
    graph, quantized, _ = quantized_pair()
    with pytest.raises(InputError, match="per_layer_error: inputs is list.*pass one input tuple"):
        per_layer_error(graph, quantized, [])
    with pytest.raises(InputError, match=r"input x: shape \[3, 8\] does not match"):
        per_layer_error(graph, quantized, (torch.randn(3, 8),))


def test_optimize_leaves_padding_out_of_the_report_where_the_model_takes_an_attention_mask():
    from fxopt.report.layer_error import padding_mask
    from tests import models
    model, (ids, mask) = models.tiny_bert()  # the second sequence is padded from position 8
    graph = fxopt.capture(model, (ids, mask))
    found = padding_mask(graph, (ids, mask))
    assert torch.equal(found((ids, mask)), mask.bool())
    assert padding_mask(captured()[0], captured()[1]) is None  # no attention_mask input: compared in full
    optimized = fxopt.optimize(model, (ids, mask), target="x86-int8", calibration_data=[(ids, mask)] * 2,
                               progress=False)
    errors = optimized.report()["per_layer_error"]
    seq_shaped = [e for e in errors if len(e["shape"]) >= 3]
    assert seq_shaped and all(e["masked"] for e in seq_shaped)
    unmasked = {e["node"]: e["rel_err"] for e in per_layer_error(
        fxopt.Pipeline("fuse")(graph).graph, optimized.graph, (ids, mask))}
    assert any(abs(e["rel_err"] - unmasked[e["node"]]) > 1e-4 for e in seq_shaped if e["node"] in unmasked)
