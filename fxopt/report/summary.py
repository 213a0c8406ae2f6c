"""A few lines of plain text summing up a report, for ``fxopt report DIR`` on a terminal.

    target x86-int8, pipeline fuse,insert-qdq{...}
    weights: 22,713,216 -> 22,713,216 params, 90.9 MB -> 23.3 MB (3.90x smaller)
    latency: 12.1 ms -> 7.3 ms (1.66x faster)
    search: 4 candidates, chosen int8-mixed (0.8 ms, cosine 0.996, met the tolerance)
    per-layer error: 37 layers, worst linear_5 (0.021)

Every key is optional; a missing one reads "not recorded".
"""
from __future__ import annotations

from typing import List, Optional

from fxopt.report.plots import format_ms


def text_summary(report: dict, graph_ops: Optional[int] = None) -> str:
    lines = [f"target {report.get('target', 'not recorded')}, pipeline {report.get('pipeline') or 'not recorded'}",
             _weights_line(report), _latency_line(report), _search_line(report.get("candidates") or []),
             _layers_line(report.get("per_layer_error") or [])]
    if graph_ops is not None:
        lines.append(f"graph: {graph_ops} ops")
    return "\n".join(lines)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _megabytes(value) -> str:
    return f"{value / 1e6:.2f} MB"


def _weights_line(report: dict) -> str:
    params, size = report.get("params"), report.get("size_bytes")
    if not (_number(params) and _number(size)):
        return "weights: not recorded"
    before_params, before_size = report.get("original_params"), report.get("original_size_bytes")
    if not (_number(before_params) and _number(before_size)) or not size:
        return f"weights: {params:,} params, {_megabytes(size)}"
    return (f"weights: {before_params:,} -> {params:,} params, {_megabytes(before_size)} -> {_megabytes(size)} "
            f"({before_size / size:.2f}x smaller)")


def _latency_line(report: dict) -> str:
    latency, before = report.get("latency_ms"), report.get("original_latency_ms")
    if not _number(latency):
        return "latency: not measured"
    if not _number(before) or not latency:
        return f"latency: {format_ms(latency)}"
    return f"latency: {format_ms(before)} -> {format_ms(latency)} ({before / latency:.2f}x faster)"


def _search_line(candidates: List[dict]) -> str:
    if not candidates:
        return "search: no search was run (no candidates)"
    chosen = next((c for c in candidates if c.get("chosen")), None)
    if chosen is None:
        return f"search: {len(candidates)} candidates, none chosen"
    facts = []
    if _number(chosen.get("latency_ms")):
        facts.append(format_ms(chosen["latency_ms"]))
    cosine = (chosen.get("fidelity") or {}).get("cosine")
    if _number(cosine):
        facts.append(f"cosine {cosine:.4g}")
    if chosen.get("meets") is not None:
        facts.append("met the tolerance" if chosen["meets"] else "missed the tolerance")
    return f"search: {len(candidates)} candidates, chosen {chosen.get('name', '?')} ({', '.join(facts)})"


def _layers_line(layers: List[dict]) -> str:
    if not layers:
        return "per-layer error: not recorded"
    worst = max(layers, key=lambda r: float(r["rel_err"]))
    return f"per-layer error: {len(layers)} layers, worst {worst['node']} ({float(worst['rel_err']):.3g})"
