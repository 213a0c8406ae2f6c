"""The report's charts, drawn with matplotlib and returned as SVG text to inline in the HTML.

- ``pareto_svg(candidates)``: latency against error for every candidate the
  search tried; the Pareto front (no other candidate is both faster and more
  accurate) is joined by a line, the chosen one is a star, candidates that
  missed the tolerance are hollow.
- ``layer_error_svg(per_layer_error)``: one horizontal bar per layer, in graph
  order, coloured by op category (GEMM/conv/attention or normalization).

Error is ``1 - cosine`` where every candidate reports a cosine, else
``max_rel_err``, on a log axis (the interesting differences are 1e-4 against
1e-3, not 0.999 against 0.9999).
"""
from __future__ import annotations

import io
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fxopt.report.op_kinds import op_category, op_kind  # noqa: E402

#: Text stays text in the SVG (smaller, selectable); the browser supplies the font.
_RC = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}
_COLOURS = {"compute": "#2b6cb0", "norm": "#2f855a", "other": "#718096"}
#: Errors of exactly 0 are drawn at this floor on the log axis.
ERROR_FLOOR = 1e-9


def candidate_error(candidate: dict, metric: str) -> Optional[float]:
    """The candidate's error on the plot's axis: ``1 - cosine`` or ``max_rel_err``; None when it lacks it."""
    fidelity = candidate.get("fidelity") or {}
    value = fidelity.get(metric)
    if not isinstance(value, (int, float)):
        return None
    return 1.0 - value if metric == "cosine" else float(value)


def error_metric(candidates: Sequence[dict]) -> str:
    """``cosine`` when every candidate has one, else ``max_rel_err``."""
    has_cosine = all(isinstance((c.get("fidelity") or {}).get("cosine"), (int, float)) for c in candidates)
    return "cosine" if has_cosine else "max_rel_err"


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points no other point beats on both coordinates (lower is better), by latency."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(ox <= x and oy <= y and (ox < x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def pareto_svg(candidates: Sequence[dict], original_latency_ms: Optional[float] = None,
               tolerance=None) -> Optional[str]:
    """The latency-vs-error plot as SVG text; None when no candidate has both a latency and an error.

    ``tolerance`` is what optimize() was given (``{"cosine": 0.99}``, ``{"max_rel_err": 0.01}`` or a float
    max_rel_err); it is drawn as a line where it is on the plot's axis.
    """
    metric = error_metric(candidates)
    drawn = [(c, float(c["latency_ms"]), candidate_error(c, metric)) for c in candidates
             if isinstance(c.get("latency_ms"), (int, float)) and candidate_error(c, metric) is not None]
    if not drawn:
        return None
    points = [(latency, max(error, ERROR_FLOOR)) for _, latency, error in drawn]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(7.2, 4.4))
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="#a0aec0", zorder=1,
                label="Pareto front")
        for (candidate, _, _), (x, y) in zip(drawn, points):
            _draw_candidate(ax, candidate, x, y)
        ax.scatter([], [], s=40, color="#2b6cb0", label="met the tolerance")
        if any(c.get("meets") is False for c, _, _ in drawn):
            ax.scatter([], [], s=40, color="white", edgecolor="#c53030", label="missed the tolerance")
        if original_latency_ms:
            ax.axvline(original_latency_ms, color="#4a5568", linestyle="--", linewidth=1,
                       label=f"original {format_ms(original_latency_ms)}")
        line = tolerance_on_axis(tolerance, metric)
        if line is not None:
            ax.axhline(max(line, ERROR_FLOOR), color="#c05621", linestyle=":", linewidth=1,
                       label=f"tolerance {line:g}")
        ax.set_yscale("log")
        ax.set_xlabel("latency (ms, lower is better)")
        ax.set_ylabel(("1 - cosine" if metric == "cosine" else "max relative error") + " (lower is better)")
        ax.legend(loc="best", frameon=False)
        return _to_svg(fig)


def format_ms(value: float) -> str:
    return f"{value:.3g} ms" if value < 1000 else f"{value:,.0f} ms"


def tolerance_on_axis(tolerance, metric: str) -> Optional[float]:
    """The tolerance as an error on the plot's axis (``1 - cosine`` or ``max_rel_err``), or None."""
    if isinstance(tolerance, dict) and isinstance(tolerance.get(metric), (int, float)):
        return 1.0 - tolerance[metric] if metric == "cosine" else float(tolerance[metric])
    if isinstance(tolerance, (int, float)) and not isinstance(tolerance, bool) and metric == "max_rel_err":
        return float(tolerance)
    return None


def _draw_candidate(ax, candidate: dict, x: float, y: float) -> None:
    meets = candidate.get("meets", True)
    if candidate.get("chosen"):
        ax.scatter([x], [y], marker="*", s=220, color="#d69e2e", edgecolor="#1a202c", zorder=3, label="chosen",
                   gid="candidate-chosen")
    else:
        ax.scatter([x], [y], s=40, zorder=2, color="#2b6cb0" if meets else "white",
                   edgecolor="#2b6cb0" if meets else "#c53030", gid="candidate-met" if meets else "candidate-missed")
    ax.annotate(str(candidate.get("name", "?")), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)


def layer_error_svg(per_layer_error: Sequence[dict]) -> Optional[str]:
    """Horizontal bars of each layer's relative error, first layer on top; None when there are no layers."""
    if not per_layer_error:
        return None
    rows = list(per_layer_error)
    labels = [_layer_label(r) for r in rows]
    colours = [_COLOURS.get(op_category(op_kind(r.get("op", ""))), _COLOURS["other"]) for r in rows]
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.17 * len(rows)))
        positions = range(len(rows))
        bars = ax.barh(list(positions), [float(r["rel_err"]) for r in rows], color=colours, height=0.7)
        for i, bar in enumerate(bars):
            bar.set_gid(f"layer-bar-{i}")  # the SVG group's id: one per layer
        ax.set_yticks(list(positions), labels, fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # the first layer on top
        ax.set_xlim(left=0)
        ax.set_xlabel("relative error ||a - b|| / ||a|| of the layer's output")
        ax.grid(axis="x", color="#e2e8f0")
        ax.set_axisbelow(True)
        return _to_svg(fig)


def _layer_label(row: dict) -> str:
    kind = op_kind(row.get("op", ""))
    name = str(row["node"])
    label = name if name.startswith(kind) else f"{name} ({kind})"
    return label + (" *" if row.get("rescaled") else "")


def _to_svg(fig) -> str:
    buffer = io.StringIO()
    fig.tight_layout()
    fig.savefig(buffer, format="svg", metadata={"Date": None})  # no timestamp: the same report, the same page
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG is inlined in HTML
