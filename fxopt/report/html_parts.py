"""Building blocks of the HTML report: the stylesheet, tables, number formats and the generic sections.

Everything that comes from a report is escaped here or by the caller; the page
has no scripts.
"""
from __future__ import annotations

import json
from html import escape
from typing import Any, Iterable, List, Optional, Sequence

CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1400px; color: #1a202c;
       padding: 0 16px; font-size: 14px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #e2e8f0; padding-bottom: 4px; }
h3 { font-size: 15px; margin-bottom: 4px; }
section { margin-bottom: 32px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #e2e8f0; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f7fafc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #fefcbf; font-weight: bold; }
tr.missed td { color: #9b2c2c; }
tr.idle td { color: #a0aec0; }
code { font-size: 12px; word-break: break-all; }
.empty { color: #718096; font-style: italic; }
.note { color: #4a5568; font-size: 12px; }
figure { margin: 12px 0; }
figcaption { color: #4a5568; font-size: 12px; }
.graphs { display: flex; gap: 24px; align-items: flex-start; }
.graph { flex: 1; min-width: 0; }
.scroll { overflow: auto; max-height: 1200px; border: 1px solid #e2e8f0; }
pre { background: #f7fafc; padding: 8px; overflow: auto; max-height: 480px; font-size: 12px; }
"""


def fmt_float(value, digits: int = 4, suffix: str = "") -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "&ndash;"
    return f"{value:.{digits}g}{suffix}"


def fmt_count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else fmt_float(value)


def fmt_bytes(value) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "&ndash;"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def table(columns: Sequence[str], rows: Iterable[Sequence[str]], header: bool = True,
          row_classes: Optional[Sequence[str]] = None, align_numbers: bool = True) -> str:
    """An HTML table of already-escaped cells; cells that look like numbers are right-aligned."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>")
    for i, row in enumerate(rows):
        css = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        cells = "".join(f"<td class='num'>{c}</td>" if align_numbers and _numeric(c) else f"<td>{c}</td>" for c in row)
        out.append(f"<tr{css}>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _numeric(cell: str) -> bool:
    head = cell.split(" ")[0].replace(",", "").replace("&times;", "")
    try:
        float(head)
        return True
    except ValueError:
        return False


def passes_section(passes: Optional[dict]) -> str:
    """One row per pass that ran, with its stats flattened to ``key = value``; passes that did nothing greyed."""
    head = "<section id='passes'><h2>What each pass did</h2>"
    if not passes:
        return head + "<p class='empty'>No per-pass statistics were recorded.</p></section>"
    rows, classes = [], []
    for name, stats in passes.items():
        items = list(_flatten(stats))
        text = "<br>".join(f"{escape(k)} = {escape(_short(v))}" for k, v in items) or "&ndash;"
        rows.append((escape(str(name)), text))
        classes.append("" if any(_did_something(v) for _, v in items) else "idle")
    return head + table(["pass", "stats"], rows, row_classes=classes) + "</section>"


def _flatten(value: Any, prefix: str = ""):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}.{key}" if prefix else str(key))
    elif prefix:
        yield prefix, value
    else:
        yield "value", value


def _did_something(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value != 0
    return value not in (None, "", [], {})


def _short(value, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def details_section(rest: dict) -> str:
    """The report's other keys (quantization, lowering, ...) as indented JSON."""
    if not rest:
        return ""
    body: List[str] = [f"<h3>{escape(str(key))}</h3><pre>{escape(json.dumps(value, indent=1, default=str))}</pre>"
                       for key, value in rest.items()]
    return "<section id='details'><h2>Other details</h2>" + "".join(body) + "</section>"
