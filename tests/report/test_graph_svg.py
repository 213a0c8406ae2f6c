"""graph_outline and outline_svg: JSON-able outlines, 12 stacked blocks drawn as one "x12" box (with and without
module paths), no collapsing where blocks differ (but layers that differ only in which linears are int8 do
collapse), and an SVG whose boxes and edges match the collapsed graph."""
import json
import re

import pytest
import torch

from fxopt.passes.quantize import calibrate_smoothed
from fxopt.passes.quantize.insert_qdq import InsertQDQ
from fxopt.report.graph_svg import collapse, graph_outline, outline_svg
from fxopt.report.repeats import Repeat, find_repeats
from tests.report.report_models import calibration_batches, captured

def outline_of(acts, strip_modules=False):
    graph, _ = captured(tuple(acts))
    outline = graph_outline(graph)
    if strip_modules:  # as for a graph loaded from an artifact: graph.json keeps no module paths
        outline = {**outline, "nodes": [{**n, "module": None} for n in outline["nodes"]]}
    return outline


def ops(outline):
    return [n for n in outline["nodes"] if n["kind"] not in ("input", "output")]


def test_outline_is_json_with_ops_edges_and_no_weights():
    graph, _ = captured(("relu",) * 12)
    outline = graph_outline(graph)
    assert json.loads(json.dumps(outline)) == outline
    names = {n["name"] for n in outline["nodes"]}
    assert names == {n.name for n in graph.nodes if n.op != "get_attr"}
    assert all(src in names and dst in names for src, dst in outline["edges"])
    first_linear = next(n for n in outline["nodes"] if n["kind"] == "linear")
    assert first_linear["weights"] == 2 and first_linear["shape"] == [2, 5, 16] and first_linear["module"] == "inp"
    assert outline["params"] == graph.param_count()


@pytest.mark.parametrize("strip_modules", [False, True])
def test_twelve_identical_blocks_collapse_into_one_x12_box(strip_modules):
    outline = outline_of(["relu"] * 12, strip_modules)
    items, edges = collapse(outline)
    blocks = [it for it in items if it["type"] == "block"]
    assert len(blocks) == 1 and blocks[0]["count"] == 12
    period = blocks[0]["period"]
    assert len(ops(outline)) == 12 * period + 2  # everything but the input projection and head is in the block
    assert len(items) == len(outline["nodes"]) - 12 * period + 1
    if not strip_modules:  # aligned to the module boundary: the block is blocks.N itself
        assert blocks[0]["modules"] == ("blocks.0", "blocks.11")
    kinds = dict(blocks[0]["kinds"])
    assert kinds["linear"] == 2 and kinds["layer_norm"] == 1 and kinds["relu"] == 1
    assert [items[s]["kind"] if items[s]["type"] == "op" else "block" for s, _ in edges] == \
        ["input", "linear", "block", "linear"]


def test_a_different_block_in_the_middle_is_not_swallowed():
    outline = outline_of(["relu"] * 4 + ["gelu"] + ["relu"] * 4)
    items, _ = collapse(outline)
    blocks = [it for it in items if it["type"] == "block"]
    assert sorted(b["count"] for b in blocks) == [4, 4]
    assert any(it["type"] == "op" and it["kind"] == "gelu" for it in items)  # the odd block stays drawn op by op


def test_svg_draws_one_box_per_item_and_one_path_per_edge():
    outline = outline_of(["relu"] * 12)
    items, edges = collapse(outline)
    svg = outline_svg(outline, svg_id="g1")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<rect") == len(items) < len(outline["nodes"])
    assert len(re.findall(r'<path class="edge"', svg)) == len(edges)
    assert svg.count('class="block ') == 1 and "\u00d712" in svg and "blocks.0 \u2026 blocks.11" in svg
    assert 'marker-end="url(#g1-arrow)"' in svg
    width, height = map(int, re.search(r'width="(\d+)" height="(\d+)"', svg).groups())
    assert 100 < width < 1000 and 100 < height < 1200


def test_layout_puts_every_edge_downward():
    outline = outline_of(["relu", "gelu", "relu"])
    svg = outline_svg(outline)
    for match in re.finditer(r'd="M[\d.]+,([\d.]+) C[^"]* [\d.]+,([\d.]+)"', svg):
        assert float(match.group(2)) > float(match.group(1))


def test_find_repeats_shares_outer_inputs_and_lets_the_first_copy_read_from_far_away():
    # prefix: a(0) b(1) c(2); three copies of [x, y, z] where y also reads the external mask "m" and
    # the first copy reads op 0 (not the op just before it), later copies read the previous copy's z.
    kinds = ["a", "b", "c"] + ["x", "y", "z"] * 3 + ["head"]
    inputs = [[], [0], [1]]
    for copy in range(3):
        start = 3 + 3 * copy
        inputs += [[0 if copy == 0 else start - 1], [start, "m"], [start + 1, start]]
    inputs.append([11])
    assert find_repeats(kinds, inputs) == [Repeat(start=3, period=3, count=3)]
    inputs[7] = [6, "other"]  # the second copy's y reads another input: it is a different block
    assert all(r.count < 3 for r in find_repeats(kinds, inputs))


@pytest.mark.parametrize("strip_modules", [False, True])
def test_two_kinds_of_layers_each_collapse_when_cut_at_the_layer_boundary(strip_modules):
    """As after mixed precision: the first layers differ from the rest; the rest's repeat must not start inside
    the last differing layer (which would leave that layer unable to repeat)."""
    outline = outline_of(["gelu"] * 2 + ["relu"] * 4, strip_modules)
    items, _ = collapse(outline)
    assert sorted((it["count"], it["period"]) for it in items if it["type"] == "block") == [(2, 5), (4, 5)]
    assert [it["kind"] for it in items if it["type"] == "op"] == ["input", "linear", "linear", "output"]


def test_layers_that_differ_only_in_which_linears_are_int8_still_collapse_into_one_box():
    """After mixed precision some layers keep float linears: quantize/dequantize ops are matched as part of the
    op they feed, so the 12 layers stay one box, which lists how many int8 ops each copy has."""
    graph, _ = captured(("relu",) * 12)
    calibrated = calibrate_smoothed(graph, calibration_batches(), 0.8, progress=False)
    linears = [n.name for n in calibrated.call_nodes() if n.target == torch.ops.aten.linear.default]
    float_kept = [linears[3], linears[8], linears[9]]  # linears[0] is the input projection: blocks 1, 3 and 4
    quantized = InsertQDQ(scheme="static", activation_matmuls=False, skip=float_kept)(calibrated).graph
    outline = graph_outline(quantized)
    items, edges = collapse(outline)
    blocks = [it for it in items if it["type"] == "block"]
    assert [(b["count"], b["int8_per_copy"]) for b in blocks] == [(12, [2, 1, 2, 1, 1] + [2] * 7)]
    in_block = len(outline["nodes"]) - len(items) + 1
    quant_ops = sum(n["kind"].startswith(("quantize", "dequantize")) for n in ops(outline))
    assert in_block == 12 * blocks[0]["period"] + quant_ops - 2 * 3  # all but the projection's and head's Q/DQ
    drawn = [it["kind"] for it in items if it["type"] == "op"]
    assert drawn.count("linear") == 2 and "relu" not in drawn and "layer_norm" not in drawn
    svg = outline_svg(outline)
    assert "int8 ops per copy: 2 1 2 1 1 2 2 2 2 2 2 2" in svg and svg.count('class="block ') == 1
    float_items, _ = collapse(outline_of(["relu"] * 12))
    assert "int8" not in outline_svg(outline_of(["relu"] * 12)) and len(float_items) < len(items)
