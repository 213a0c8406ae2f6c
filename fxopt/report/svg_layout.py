"""A top-down layered layout for drawing a DAG of boxes, with no graphviz.

Each box goes one row below its deepest input (a graph input goes just above
its first user, so an attention mask read deep down does not hang at the top).
Rows are filled top to bottom; in a row, each box wants to sit centred under
the mean centre of its inputs, and boxes are pushed right where they would
overlap. A chain of single-input ops thus draws as a straight column.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import networkx as nx

H_GAP, V_GAP, MARGIN = 14, 26, 12


@dataclass(frozen=True)
class Box:
    width: float
    height: float


@dataclass
class Layout:
    boxes: Sequence[Box]
    positions: List[Tuple[float, float]] = field(default_factory=list)  # top-left corners
    width: int = 0
    height: int = 0

    def top(self, i: int) -> Tuple[float, float]:
        x, y = self.positions[i]
        return x + self.boxes[i].width / 2, y

    def bottom(self, i: int) -> Tuple[float, float]:
        x, y = self.positions[i]
        return x + self.boxes[i].width / 2, y + self.boxes[i].height


def layered_layout(boxes: Sequence[Box], edges: Sequence[Tuple[int, int]]) -> Layout:
    """Positions for ``boxes`` (by index) so that every edge ``(src, dst)`` points down."""
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(boxes)))
    dag.add_edges_from(edges)
    levels = _levels(dag)
    rows: Dict[int, List[int]] = {}
    for i in sorted(range(len(boxes)), key=lambda i: (levels[i], i)):
        rows.setdefault(levels[i], []).append(i)
    layout = Layout(boxes, [(0.0, 0.0)] * len(boxes))
    y = float(MARGIN)
    for level in sorted(rows):
        _place_row(layout, dag, rows[level], y)
        y += max(boxes[i].height for i in rows[level]) + V_GAP
    _shift_to_margin(layout)
    layout.height = int(y - V_GAP + MARGIN)
    return layout


def _levels(dag: nx.DiGraph) -> Dict[int, int]:
    order = list(nx.topological_sort(dag))
    level: Dict[int, int] = {}
    for i in order:
        level[i] = max((level[p] + 1 for p in dag.predecessors(i)), default=0)
    for i in reversed(order):  # sources sit just above their first user
        if dag.in_degree(i) == 0 and dag.out_degree(i) > 0:
            level[i] = max(min(level[s] for s in dag.successors(i)) - 1, 0)
    return level


def _place_row(layout: Layout, dag: nx.DiGraph, row: List[int], y: float) -> None:
    def wanted_centre(i: int) -> float:
        centres = [layout.top(p)[0] for p in dag.predecessors(i)]
        return sum(centres) / len(centres) if centres else float("-inf")

    right = float("-inf")
    for i in sorted(row, key=lambda i: (wanted_centre(i), i)):
        width = layout.boxes[i].width
        centre = wanted_centre(i)
        x = centre - width / 2 if centre != float("-inf") else right + H_GAP if right != float("-inf") else 0.0
        x = max(x, right + H_GAP)
        layout.positions[i] = (x, y)
        right = x + width


def _shift_to_margin(layout: Layout) -> None:
    if not layout.positions:
        layout.width = 2 * MARGIN
        return
    left = min(x for x, _ in layout.positions)
    layout.positions = [(x - left + MARGIN, y) for x, y in layout.positions]
    layout.width = int(max(x + b.width for (x, _), b in zip(layout.positions, layout.boxes)) + MARGIN)
