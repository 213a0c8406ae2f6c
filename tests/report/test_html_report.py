"""write_html: a self-contained page with the candidates table, the Pareto plot, the per-layer error chart and the
graphs before/after; clear messages where a section has no data; atomic writes; clear errors."""
import re
from html.parser import HTMLParser

import pytest

from fxopt.errors import InputError
from fxopt.report.html import render_html, write_html
from fxopt.report.plots import pareto_front
from tests.report.report_models import full_report


class Elements(HTMLParser):
    """Each element's tag, attributes and the text inside it, and the SVG under each figure/div id."""

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.found = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = {"tag": tag, "attrs": dict(attrs), "text": "", "inside": [e["attrs"].get("id") for e in self.stack]}
        self.found.append(element)
        if tag not in ("br", "meta", "rect", "path", "use", "circle", "line", "ellipse", "polyline", "polygon"):
            self.stack.append(element)

    def handle_endtag(self, tag):
        if any(e["tag"] == tag for e in self.stack):
            while self.stack.pop()["tag"] != tag:
                pass

    def handle_data(self, data):
        for element in self.stack:
            element["text"] += data

    def under(self, element_id, tag):
        return [e for e in self.found if e["tag"] == tag and element_id in e["inside"]]

    def by_id(self, element_id):
        return next(e for e in self.found if e["attrs"].get("id") == element_id)


@pytest.fixture(scope="module")
def page():
    report, quantized = full_report()
    return report, quantized, render_html(report, graph_after=quantized)


def test_pareto_plot_marks_front_and_chosen(page):
    report, _, text = page
    html = Elements(text)
    (svg,) = html.under("pareto-plot", "svg")
    plot_text = html.by_id("pareto-plot")["text"]
    assert all(c["name"] in plot_text for c in report["candidates"])  # every candidate is labelled on the plot
    assert "Pareto front" in plot_text and "chosen" in plot_text and "missed the tolerance" in plot_text
    assert "tolerance 0.01" in plot_text and "original 1.3 ms" in plot_text  # 1 - cosine 0.99, the baseline
    points = [e["attrs"]["id"] for e in html.under("pareto-plot", "g") if e["attrs"].get("id", "").startswith("cand")]
    assert sorted(points) == ["candidate-chosen", "candidate-met", "candidate-met", "candidate-missed"]
    assert all(html.under(p, "use") or html.under(p, "path") for p in points)  # each point is drawn
    rows = [e for e in html.found if e["tag"] == "tr" and "candidates" in e["inside"]]
    assert [r["attrs"].get("class") for r in rows[1:]] == [None, "missed", "chosen", None]
    assert "(chosen)" in rows[3]["text"] and rows[2]["text"].rstrip().endswith("no")


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.1, 1e-8), (0.7, 2e-2), (0.8, 4e-3), (1.2, 1e-4), (0.9, 5e-3)]
    assert pareto_front(points) == [1, 2, 0]  # (1.2, 1e-4) is beaten by (1.1, 1e-8); (0.9, 5e-3) by (0.8, 4e-3)


def test_layer_error_chart_has_one_bar_per_layer_labelled(page):
    report, _, text = page
    html = Elements(text)
    chart_text = html.by_id("layer-error-chart")["text"]
    assert all(layer["node"] in chart_text for layer in report["per_layer_error"])
    bars = [e for e in html.under("layer-error-chart", "g") if e["attrs"].get("id", "").startswith("layer-bar-")]
    assert len(bars) == len(report["per_layer_error"])
    assert all(len(html.under(bar["attrs"]["id"], "path")) == 1 for bar in bars)
    worst = max(report["per_layer_error"], key=lambda r: r["rel_err"])
    assert worst["node"] in html.by_id("layer-error")["text"].split("Worst")[1]


def test_graphs_before_and_after_are_drawn_with_blocks_collapsed(page):
    _, quantized, text = page
    html = Elements(text)
    for graph_id in ("graph-before", "graph-after"):
        rects = html.under(graph_id, "rect")
        edges = [p for p in html.under(graph_id, "path") if p["attrs"].get("class") == "edge"]
        assert len(rects) >= 5 and len(edges) >= 4, graph_id
        assert "\u00d73" in html.by_id(graph_id)["text"]  # the three blocks are one box
    assert len(html.under("graph-after", "rect")) < len(quantized.nodes)
    assert "quantize_per_tensor" in html.by_id("graph-after")["text"]
    assert "quantize_per_tensor" not in html.by_id("graph-before")["text"]


def test_page_is_self_contained(page):
    text = page[2]
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert not re.search(r'(src|href)="(https?:|//)', text)  # nothing loads from elsewhere
    summary = Elements(text).by_id("summary")["text"]
    assert "1.3 ms" in summary and "0.8 ms" in summary and "1.62\u00d7 faster" in summary
    assert "cosine >= 0.99" in summary


def test_empty_report_says_what_is_missing():
    text = render_html({})
    for message in ("No accuracy-aware search was run", "No per-layer error was recorded",
                    "The graph before optimization was not recorded", "The optimized graph was not given",
                    "No per-pass statistics were recorded", "not measured"):
        assert message in text
    assert "<svg" not in text


def test_write_is_atomic_and_errors_are_clear(tmp_path):
    report, quantized = full_report()
    path = write_html(report, tmp_path / "report.html", graph_after=quantized)
    assert path.read_text().startswith("<!DOCTYPE html>") and [p.name for p in tmp_path.iterdir()] == ["report.html"]
    with pytest.raises(InputError, match="write_html: cannot write .*missing.*check that the directory exists"):
        write_html(report, tmp_path / "missing" / "report.html")
    with pytest.raises(InputError, match="write_html: report is a list, not a dict"):
        write_html([], tmp_path / "r.html")
    with pytest.raises(InputError, match="write_html: graph_before_outline is not a graph outline"):
        write_html(report, tmp_path / "r.html", graph_before_outline={"nodes": "x"})
    with pytest.raises(InputError, match="graph_after has outline format 0, this fxopt draws 1; make the outline"):
        write_html(report, tmp_path / "r.html", graph_after={**report["graph_before"], "format": 0})
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_exact_layers_are_said_to_be_exact():
    layers = [{"node": "linear", "op": "aten.linear.default", "rel_err": 0.0},
              {"node": "layer_norm", "op": "aten.layer_norm.default", "rel_err": 0.0}]
    html = Elements(render_html({"per_layer_error": layers}))
    assert "exactly the original's" in html.by_id("layer-error")["text"]
    bars = [g for g in html.under("layer-error-chart", "g") if g["attrs"].get("id", "").startswith("layer-bar")]
    assert len(bars) == 2
    assert "Worst" not in html.by_id("layer-error")["text"]  # no ranking of zeros
    assert "exactly" not in render_html({"per_layer_error": [{**layers[0], "rel_err": 1e-3}]})
