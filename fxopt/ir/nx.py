"""A read-only networkx view of a Graph, keyed by node name.

Derived from the fx graph each time; it never stands in for the source of
truth. Dependency analyses (pruning) and the report's drawings read it.
"""
from __future__ import annotations

import networkx as nx

from fxopt.errors import op_name
from fxopt.ir import meta as M


def to_networkx(graph) -> nx.DiGraph:
    """A frozen DiGraph: one vertex per fx node (attributes op, target, info), one edge per use."""
    view = nx.DiGraph()
    for node in graph.module.graph.nodes:
        view.add_node(node.name, op=node.op, target=op_name(node), info=M.node_info(node))
    for node in graph.module.graph.nodes:
        for position, inp in enumerate(node.all_input_nodes):
            view.add_edge(inp.name, node.name, position=position)
    return nx.freeze(view)
