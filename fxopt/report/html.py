"""The optimization report as one self-contained HTML file: no scripts, no external files, no network.

    write_html(optimized.report(), "report.html", graph_after=optimized.graph)

Sections: a summary (target, pipeline, weights and latency before and after),
every candidate the accuracy-aware search tried (the chosen one highlighted, and
whether each met the tolerance), the latency-vs-error Pareto plot, the per-layer
error chart, the graph before and after (SVG, repeated layers collapsed), and
what each pass did. Every key of the report is optional: a section without data
says so. Charts are inline SVG (``fxopt.report.plots``, ``fxopt.report.graph_svg``).
The file is written to a temporary name next to ``path`` and renamed into place.
"""
from __future__ import annotations

import os
import uuid
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fxopt.errors import InputError
from fxopt.ir.graph import Graph
from fxopt.report.graph_svg import OUTLINE_FORMAT, collapse, graph_outline, outline_svg
from fxopt.report.html_parts import CSS, details_section, fmt_bytes, fmt_count, fmt_float, passes_section, table
from fxopt.report.plots import error_metric, format_ms, layer_error_svg, pareto_svg

#: Keys the dedicated sections show; everything else goes to "Other details".
SHOWN_KEYS = frozenset({"target", "pipeline", "params", "size_bytes", "original_params", "original_size_bytes",
                        "latency_ms", "original_latency_ms", "candidates", "per_layer_error", "passes",
                        "graph_before", "tolerance"})
WORST_LAYERS = 5


def write_html(report: Dict[str, Any], path: Union[str, Path], graph_after: Union[Graph, dict, None] = None,
               graph_before_outline: Optional[dict] = None) -> Path:
    """Write the report page to ``path`` atomically and return its absolute path."""
    text = render_html(report, graph_after, graph_before_outline)
    path = Path(path).absolute()
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"write_html: cannot write {path}: {exc.strerror or exc}; check that the directory "
                         "exists and is writable") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def render_html(report: Dict[str, Any], graph_after: Union[Graph, dict, None] = None,
                graph_before_outline: Optional[dict] = None) -> str:
    """The report page as HTML text (see :func:`write_html`)."""
    if not isinstance(report, dict):
        raise InputError(f"write_html: report is a {type(report).__name__}, not a dict; pass OptimizedModel.report() "
                         "or an artifact manifest's extra.report")
    before = _outline("graph_before_outline", graph_before_outline or report.get("graph_before"))
    after = _outline("graph_after", graph_outline(graph_after) if isinstance(graph_after, Graph) else graph_after)
    title = f"fxopt report: {report.get('target') or 'unknown target'}"
    body = [f"<h1>{escape(title)}</h1>", _summary(report), _candidates(report), _layer_errors(report),
            _graphs(before, after), passes_section(report.get("passes")),
            details_section({k: v for k, v in report.items() if k not in SHOWN_KEYS})]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _outline(name: str, outline) -> Optional[dict]:
    if outline is None:
        return None
    if not (isinstance(outline, dict) and isinstance(outline.get("nodes"), list)
            and isinstance(outline.get("edges"), list)):
        raise InputError(f"write_html: {name} is not a graph outline (a dict with nodes and edges); pass a Graph "
                         "or what fxopt.report.graph_svg.graph_outline returns")
    if outline.get("format") != OUTLINE_FORMAT:
        raise InputError(f"write_html: {name} has outline format {outline.get('format')!r}, this fxopt draws "
                         f"{OUTLINE_FORMAT}; make the outline again with this fxopt's graph_outline")
    return outline


# ================================================================ sections
def _summary(report: dict) -> str:
    rows = [("Target", escape(str(report.get("target") or "not recorded"))),
            ("Pipeline", f"<code>{escape(str(report['pipeline']))}</code>" if report.get("pipeline") else
             "not recorded"),
            ("Parameters", _before_after(report, "original_params", "params", fmt_count)),
            ("Weight size", _before_after(report, "original_size_bytes", "size_bytes", fmt_bytes, smaller=True)),
            ("Latency", _before_after(report, "original_latency_ms", "latency_ms", format_ms, faster=True)),
            ("Tolerance", _tolerance(report))]
    body = table(["", ""], rows, header=False, align_numbers=False)
    return f"<section id='summary'><h2>Summary</h2>{body}</section>"


def _tolerance(report: dict) -> str:
    tolerance = report.get("tolerance", (report.get("search") or {}).get("tolerance"))
    if tolerance is None:
        return "<span class='empty'>none (no search)</span>"
    if isinstance(tolerance, dict):
        return escape(", ".join(f"{k} {'>=' if k == 'cosine' else '<='} {v}" for k, v in tolerance.items()))
    return escape(str(tolerance))


def _before_after(report: dict, before_key: str, after_key: str, fmt, smaller=False, faster=False) -> str:
    before, after = report.get(before_key), report.get(after_key)
    if not isinstance(after, (int, float)):
        return "<span class='empty'>not measured</span>"
    if not isinstance(before, (int, float)):
        return f"{fmt(after)} <span class='empty'>(no original to compare)</span>"
    ratio = ""
    if after and (smaller or faster):
        ratio = f" &middot; {before / after:.2f}&times; {'smaller' if smaller else 'faster'}"
    return f"{fmt(before)} &rarr; <b>{fmt(after)}</b>{ratio}"


def _candidates(report: dict) -> str:
    candidates = report.get("candidates") or []
    head = "<section id='candidates'><h2>Candidates and the Pareto plot</h2>"
    if not candidates:
        return head + ("<p class='empty'>No accuracy-aware search was run, so there are no candidates to compare "
                       "(optimize() searches when given a tolerance).</p></section>")
    rows, classes = [], []
    for c in candidates:
        fidelity = c.get("fidelity") or {}
        meets = c.get("meets")
        rows.append((escape(str(c.get("name", "?"))) + (" <b>(chosen)</b>" if c.get("chosen") else ""),
                     f"<code>{escape(str(c.get('pipeline', '')))}</code>", fmt_float(c.get("latency_ms")),
                     fmt_float(c.get("speedup"), suffix="&times;"), fmt_float(fidelity.get("cosine"), digits=5),
                     fmt_float(fidelity.get("max_rel_err")), fmt_bytes(c.get("size_bytes")),
                     "yes" if meets else "no" if meets is False else "&ndash;"))
        classes.append("chosen" if c.get("chosen") else "missed" if meets is False else "")
    columns = ["candidate", "pipeline", "latency ms", "speedup", "cosine", "max rel err", "weights",
               "met tolerance"]
    plot = pareto_svg(candidates, report.get("original_latency_ms"), report.get("tolerance"))
    metric = "1 &minus; cosine" if error_metric(candidates) == "cosine" else "max relative error"
    figure = (f"<figure id='pareto-plot'>{plot}<figcaption>Latency against {metric} of every candidate; the line "
              "joins the Pareto front, the star is the chosen candidate.</figcaption></figure>" if plot else
              "<p class='empty'>The candidates have no latency and fidelity to plot.</p>")
    return head + table(columns, rows, row_classes=classes) + figure + "</section>"


def _layer_errors(report: dict) -> str:
    layers: List[dict] = report.get("per_layer_error") or []
    head = "<section id='layer-error'><h2>Per-layer error</h2>"
    if not layers:
        return head + ("<p class='empty'>No per-layer error was recorded (it compares the original and the "
                       "optimized graph on sample inputs: fxopt.report.layer_error.per_layer_error).</p></section>")
    worst = sorted(layers, key=lambda r: -float(r["rel_err"]))[:WORST_LAYERS]
    rows = [(escape(str(r["node"])), f"<code>{escape(str(r.get('op', '')))}</code>", fmt_float(r["rel_err"]))
            for r in worst]
    note = ("<p class='note'>* compared after undoing smooth-quant's per-channel power-of-two scaling.</p>"
            if any(r.get("rescaled") for r in layers) else "")
    if any(r.get("masked") for r in layers):
        note += "<p class='note'>Token outputs are compared on the unpadded positions only (the mask).</p>"
    worst_table = f"<h3>Worst {len(worst)} layers</h3>" + table(["node", "op", "relative error"], rows)
    if all(float(r["rel_err"]) == 0.0 for r in layers):
        note, worst_table = note + "<p class='note'>Every layer's output is exactly the original's (error 0).</p>", ""
    return (head + f"<p>Relative error <code>||a &minus; b|| / ||a||</code> of each layer's output, {len(layers)} "
            f"layers in graph order.</p><figure id='layer-error-chart'>{layer_error_svg(layers)}</figure>{note}"
            f"{worst_table}</section>")


def _graphs(before: Optional[dict], after: Optional[dict]) -> str:
    columns = []
    for title, outline, svg_id, missing in (
            ("Before", before, "graph-before", "The graph before optimization was not recorded in this report."),
            ("After", after, "graph-after", "The optimized graph was not given.")):
        if outline is None:
            columns.append(f"<div class='graph'><h3>{title}</h3><p class='empty'>{missing}</p></div>")
            continue
        items, _ = collapse(outline)
        ops = sum(1 for n in outline["nodes"] if n["kind"] not in ("input", "output"))
        blocks = sum(1 for it in items if it["type"] == "block")
        caption = f"{ops} ops drawn as {len(items)} boxes" + (f", {blocks} repeated blocks collapsed" if blocks else "")
        columns.append(f"<div class='graph'><h3>{title}</h3><p class='note'>{caption}</p>"
                       f"<div class='scroll'>{outline_svg(outline, svg_id)}</div></div>")
    return "<section id='graphs'><h2>Graph before and after</h2><div class='graphs'>" + "".join(columns) + \
        "</div></section>"

