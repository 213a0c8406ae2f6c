"""``fxopt report DIR --html report.html`` on real saved artifacts, and its errors."""
import json
import re

import fxopt
from fxopt.backends.artifact import save_artifact
from fxopt.cli import main
from tests.report.report_models import full_report, stacked_case
from tests.report.test_html_report import Elements


def test_report_of_an_optimized_eager_artifact(tmp_path, capsys):
    model, example = stacked_case(("relu",) * 4)
    optimized = fxopt.optimize(model, example, target="eager", progress=False)
    optimized.save(tmp_path / "artifact")
    assert main(["report", str(tmp_path / "artifact"), "--html", str(tmp_path / "report.html")]) == 0
    out = capsys.readouterr().out
    report = optimized.report()
    assert "target eager" in out and f"pipeline {optimized.pipeline}" in out
    assert f"{report['original_params']:,} -> {report['params']:,} params" in out
    assert f"wrote {tmp_path / 'report.html'}" in out
    html = Elements((tmp_path / "report.html").read_text())
    assert len(html.under("graph-after", "rect")) >= 4 and "\u00d74" in html.by_id("graph-after")["text"]
    summary = html.by_id("summary")["text"]
    assert "eager" in summary and optimized.pipeline in summary


def test_report_reads_the_before_graph_candidates_and_layer_errors_from_the_manifest(tmp_path, capsys):
    report, quantized = full_report()
    save_artifact(quantized, tmp_path / "artifact", target="x86-int8",
                  extra={"pipeline": report["pipeline"], "report": json.loads(json.dumps(report))})
    assert main(["report", str(tmp_path / "artifact"), "--html", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    worst = max(report["per_layer_error"], key=lambda r: r["rel_err"])
    assert "latency: 1.3 ms -> 0.8 ms (1.62x faster)" in out
    assert "search: 4 candidates, chosen int8, 2 of 7 layers float (0.8 ms, cosine 0.996, met the tolerance)" in out
    assert f"per-layer error: {len(report['per_layer_error'])} layers, worst {worst['node']}" in out
    html = Elements((tmp_path / "r.html").read_text())
    assert html.under("graph-before", "rect") and html.under("graph-after", "rect")
    assert html.under("pareto-plot", "svg") and html.under("layer-error-chart", "svg")


def test_summary_only_without_html(tmp_path, capsys):
    model, example = stacked_case(("relu",))
    fxopt.optimize(model, example, target="eager", progress=False).save(tmp_path / "a")
    assert main(["report", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "search: no search was run" in out and "wrote" not in out
    assert re.search(r"latency: \S+ ms -> \S+ ms \(\S+x faster\)", out), out  # timed by optimize
    assert list(tmp_path.iterdir()) == [tmp_path / "a"]


def test_a_directory_that_is_not_an_artifact_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["report", str(tmp_path), "--html", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxopt report: ") and "manifest.json: missing" in err and "is not an fxopt artifact" in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not an fxopt artifact" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_a_tampered_artifact_is_refused(tmp_path, capsys):
    model, example = stacked_case(("relu",))
    fxopt.optimize(model, example, target="eager", progress=False).save(tmp_path / "a")
    graph_file = tmp_path / "a" / "graph.json"
    graph_file.write_text(graph_file.read_text().replace('"linear"', '"linear_x"', 1))
    assert main(["report", str(tmp_path / "a")]) == 2
    assert "graph.json" in capsys.readouterr().err
