"""The graph as a picture: a JSON-able outline of its ops, and an SVG drawing of it with repeated layers collapsed.

    outline = graph_outline(graph)        # {"format": 1, "nodes": [...], "edges": [[src, dst], ...]}
    svg_text = outline_svg(outline)       # <svg ...> for the HTML report

The outline holds what a drawing needs and nothing heavy (no weights): per op
its kind (``linear``), full op name, output shape and dtype, how many weights it
reads, and its module path where the graph still knows it. It is stored in the
report (``report()["graph_before"]``) so an artifact can show the graph it was
made from. The drawing is computed here, with no graphviz: runs of identical
layers become one box marked ``x12`` (``fxopt.report.repeats``), the rest is a
top-down layered layout (each op one row below its deepest input, a row ordered
by where its inputs sit), emitted as SVG text directly.
"""
from __future__ import annotations

from collections import Counter
from html import escape
from typing import Dict, List, Optional, Tuple

from fxopt.ir import meta as M
from fxopt.ir.graph import Graph
from fxopt.report import op_kinds
from fxopt.report.repeats import Repeat, find_repeats
from fxopt.report.svg_layout import Box, layered_layout

OUTLINE_FORMAT = 1
STYLE = {  # category: (fill, stroke)
    "compute": ("#dbe9f6", "#2b6cb0"), "norm": ("#e0f2e9", "#2f855a"), "quant": ("#feebc8", "#c05621"),
    "view": ("#f7f7f7", "#a0aec0"), "elementwise": ("#edf2f7", "#4a5568"), "io": ("#ffffff", "#1a202c"),
    "block": ("#f6f0ff", "#6b46c1"),
}
_CATEGORY_ORDER = {c: i for i, c in enumerate(op_kinds.CATEGORIES)}


# ================================================================= outline
def graph_outline(graph: Graph) -> dict:
    """Ops (not weights) in graph order and the edges between them, as plain JSON data."""
    view = graph.to_networkx()
    fx_nodes = {n.name: n for n in graph.nodes}
    nodes, edges = [], []
    for name, data in view.nodes(data=True):
        if data["op"] == "get_attr":
            continue
        preds = sorted(view.predecessors(name), key=lambda p: view.edges[p, name]["position"])
        info = data["info"]
        nodes.append({
            "name": name, "kind": op_kinds.op_kind(data["target"], data["op"]), "op": data["target"],
            "shape": _shape(info), "dtype": _dtype(info),
            "weights": sum(view.nodes[p]["op"] == "get_attr" for p in preds),
            "module": _module_path(fx_nodes[name]),
        })
        edges += [[p, name] for p in preds if view.nodes[p]["op"] != "get_attr"]
    return {"format": OUTLINE_FORMAT, "nodes": nodes, "edges": edges,
            "params": graph.param_count(), "size_bytes": graph.size_bytes()}


def _shape(info) -> Optional[List]:
    if not isinstance(info, M.TensorInfo):
        return None
    return [d if isinstance(d, int) else str(d) for d in info.shape]


def _dtype(info) -> Optional[str]:
    return str(info.dtype).replace("torch.", "") if isinstance(info, M.TensorInfo) else None


def _module_path(node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) and path else None


# ================================================================ collapse
def collapse(outline: dict) -> Tuple[List[dict], List[Tuple[int, int]]]:
    """The items to draw (ops, and one item per repeated block) and the edges between them, by item index.

    Quantize/dequantize ops are matched as part of the op they feed: after mixed precision some layers keep a
    float linear, and a 12-layer BERT should still be one "x12" box (which says how many int8 ops each copy has).
    """
    ops = [n for n in outline["nodes"] if n["kind"] not in ("input", "output")]
    kind_of = {n["name"]: n["kind"] for n in outline["nodes"]}
    quant = {n["name"] for n in ops if _is_quantization(n)}
    shown = [n for n in ops if n["name"] not in quant]
    position = {n["name"]: i for i, n in enumerate(shown)}
    preds, succs = _adjacency(outline["edges"])
    refs = [_refs_through_quantization(preds.get(n["name"], []), preds, quant, position) for n in shown]
    modules = [n.get("module") for n in shown]
    repeats = find_repeats([n["kind"] for n in shown], refs, modules if any(modules) else None)
    block_of = {shown[i]["name"]: r for r in repeats for i in range(r.start, r.stop)}
    block_of.update(_quantization_blocks(quant, succs, block_of))
    items, item_of, block_item = [], {}, {}
    for node in outline["nodes"]:
        repeat = block_of.get(node["name"])
        if repeat is None:
            item_of[node["name"]] = len(items)
            items.append({"type": "op", **node})
            continue
        if repeat.start not in block_item:
            block_item[repeat.start] = len(items)
            items.append(_block_item(shown, repeat, _int8_ops_per_copy(shown, repeat, preds, kind_of)))
        item_of[node["name"]] = block_item[repeat.start]
    edges = sorted({(item_of[s], item_of[d]) for s, d in outline["edges"]
                    if s in item_of and d in item_of and item_of[s] != item_of[d]})
    return items, edges


def _is_quantization(node: dict) -> bool:
    return op_kinds.op_category(node["kind"]) == "quant"


def _adjacency(edges) -> Tuple[Dict[str, list], Dict[str, list]]:
    preds: Dict[str, list] = {}
    succs: Dict[str, list] = {}
    for src, dst in edges:
        preds.setdefault(dst, []).append(src)
        succs.setdefault(src, []).append(dst)
    return preds, succs


def _refs_through_quantization(sources, preds, quant, position) -> list:
    """An op's inputs as repeat references, looking through quantize/dequantize ops to what they quantize
    (a weight's dequantize has no op input: it drops out, like the float weight it replaces)."""
    refs = []
    for src in sources:
        if src in quant:
            refs += _refs_through_quantization(preds.get(src, []), preds, quant, position)
        else:
            refs.append(position.get(src, src))
    return refs


def _quantization_blocks(quant, succs, block_of) -> Dict[str, Repeat]:
    """Each quantize/dequantize op whose every consumer lies in one repeated block belongs to that block."""
    found: Dict[str, Repeat] = {}

    def consumers(name):
        for dst in succs.get(name, []):
            yield from consumers(dst) if dst in quant else (dst,)

    for name in quant:
        blocks = {block_of.get(dst) for dst in consumers(name)}
        if len(blocks) == 1 and None not in blocks:
            found[name] = blocks.pop()
    return found


def _int8_ops_per_copy(shown: List[dict], repeat: Repeat, preds, kind_of) -> List[int]:
    """How many ops of each copy read a dequantized input (int8 GEMMs, once lowered)."""
    def reads_int8(node):
        return any(kind_of[src].startswith("dequantize") for src in preds.get(node["name"], []))

    return [sum(reads_int8(n) for n in shown[start:start + repeat.period])
            for start in range(repeat.start, repeat.stop, repeat.period)]


def _block_item(ops: List[dict], repeat: Repeat, int8_per_copy: List[int]) -> dict:
    first = ops[repeat.start:repeat.start + repeat.period]
    last = ops[repeat.stop - repeat.period:repeat.stop]
    counts = Counter(n["kind"] for n in first)
    ranked = sorted(counts.items(), key=lambda kv: (_CATEGORY_ORDER[op_kinds.op_category(kv[0])], -kv[1], kv[0]))
    return {"type": "block", "start": repeat.start, "period": repeat.period, "count": repeat.count,
            "kinds": ranked, "modules": (_common_module(first), _common_module(last)),
            "int8_per_copy": int8_per_copy}


def _common_module(ops: List[dict]) -> Optional[str]:
    paths = [n["module"].split(".") for n in ops if n.get("module")]
    if not paths:
        return None
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common) or None


# ==================================================================== draw
def outline_svg(outline: dict, svg_id: str = "graph") -> str:
    """SVG text drawing ``outline`` top-down, each run of identical layers one box marked ``xN``."""
    items, edges = collapse(outline)
    boxes = [_box(item) for item in items]
    layout = layered_layout(boxes, edges)
    marker = f"{svg_id}-arrow"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(svg_id)}" class="fxopt-graph" '
        f'width="{layout.width}" height="{layout.height}" viewBox="0 0 {layout.width} {layout.height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="11">',
        f'<defs><marker id="{marker}" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
        'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#718096"/></marker></defs>',
    ]
    for src, dst in edges:
        (x1, y1), (x2, y2) = layout.bottom(src), layout.top(dst)
        bend = max((y2 - y1) / 2, 12)
        parts.append(f'<path class="edge" d="M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + bend:.1f} {x2:.1f},{y2 - bend:.1f} '
                     f'{x2:.1f},{y2:.1f}" fill="none" stroke="#718096" stroke-width="1" '
                     f'marker-end="url(#{marker})"/>')
    for item, box, (x, y) in zip(items, boxes, layout.positions):
        parts.append(_draw_item(item, box, x, y))
    parts.append("</svg>")
    return "\n".join(parts)


_CHAR_WIDTH, _LINE_HEIGHT, _PAD = 6.6, 14, 8


def _lines(item: dict) -> List[str]:
    if item["type"] == "block":
        first, last = item["modules"]
        title = f"\u00d7{item['count']}  " + (f"{first} \u2026 {last}" if first and last else "repeated block")
        kinds = [f"{kind} \u00d7{n}" if n > 1 else kind for kind, n in item["kinds"]]
        rows, row = [f"{item['period']} ops each:"], ""
        for text in kinds:
            if row and len(row) + len(text) > 44:
                rows.append(row)
                row = ""
            row = f"{row}, {text}" if row else text
        return [title] + rows + [row] + _int8_line(item["int8_per_copy"])
    shape = "" if item.get("shape") is None else "[" + ", ".join(str(d) for d in item["shape"]) + "]"
    label = item["kind"] if item["kind"] not in ("input", "output") else f"{item['kind']} {item['name']}"
    return [label, shape] if shape else [label]


def _int8_line(per_copy: List[int]) -> List[str]:
    if not any(per_copy):
        return []
    if len(set(per_copy)) == 1:
        return [f"int8: {per_copy[0]} ops each"]
    return ["int8 ops per copy: " + " ".join(str(n) for n in per_copy)]


def _box(item: dict) -> Box:
    lines = _lines(item)
    width = max(len(text) for text in lines) * _CHAR_WIDTH + 2 * _PAD
    return Box(width=round(max(width, 60)), height=len(lines) * _LINE_HEIGHT + _PAD)


def _draw_item(item: dict, box: Box, x: float, y: float) -> str:
    category = "block" if item["type"] == "block" else op_kinds.op_category(item["kind"])
    fill, stroke = STYLE[category]
    tooltip = (f"{item['count']} copies of a {item['period']}-op block" if item["type"] == "block"
               else f"%{item['name']} ({item['op']}), {item.get('weights', 0)} weights")
    dash = ' stroke-dasharray="5,3" stroke-width="2"' if category == "block" else ""
    rx = 14 if category == "io" else 4
    out = [f'<g class="{"block" if category == "block" else "op"} {category}"><title>{escape(tooltip)}</title>',
           f'<rect x="{x:.1f}" y="{y:.1f}" width="{box.width}" height="{box.height}" rx="{rx}" fill="{fill}" '
           f'stroke="{stroke}"{dash}/>']
    for i, text in enumerate(_lines(item)):
        weight = ' font-weight="bold"' if i == 0 and category in ("block", "compute") else ""
        size = ' font-size="9"' if i > 0 and item["type"] == "op" else ""
        out.append(f'<text x="{x + box.width / 2:.1f}" y="{y + _PAD / 2 + (i + 0.8) * _LINE_HEIGHT:.1f}" '
                   f'text-anchor="middle"{weight}{size}>{escape(text)}</text>')
    out.append("</g>")
    return "".join(out)
