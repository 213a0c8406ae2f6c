"""Split a graph into regions TVM builds and the nodes PyTorch runs between them, with torch.fx's partitioner.

    plan = propose(graph, known_converters())      # which nodes fall back, and why; the regions' node sets
    glue, regions = split(graph, plan.partitions)  # the glue: an fx.GraphModule that calls region_0, region_1, ...
    region_graph(glue, regions[0])                 # an fxopt Graph of one region, for lower.build

Partitions come from :class:`~torch.fx.passes.infra.partitioner.CapabilityBasedPartitioner`
over :class:`~fxopt.backends.tvm_cuda.support.TvmOperatorSupport`; the glue is
:func:`~torch.fx.passes.utils.fuser_utils.fuse_by_partitions` of a copy of the
graph, so it holds the unsupported nodes and one ``call_module`` per region.
A region keeps its weights as ``get_attr`` nodes under their ``state_dict`` names,
so each one builds like a whole graph, its weights passed in at load time.

What an artifact stores, ``partition.json`` beside the region libraries::

    {"format": "fxopt.tvm_cuda.partition/1",
     "regions": [{"name": "region_0", "library": "region_0.so", "nodes": ["inp_weight", "linear", ...],
                  "inputs": ["x"], "outputs": 1}, ...],
     "fallback": [{"node": "fft_rfft", "op": "aten.fft_rfft.default", "reason": "becomes ...: no TVM converter"}]}

The glue graph is data: ``graph.json`` (the saved graph) with each region's
nodes replaced by its call. :func:`glue_from_saved` rebuilds it that way and
checks each region's inputs against the stored ones, so nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Dict, FrozenSet, List, Sequence, Tuple

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from fxopt.backends.tvm_cuda.support import TvmOperatorSupport, fallback_reasons
from fxopt.errors import ArtifactError, op_name
from fxopt.ir.graph import Graph

PARTITION_FILE = "partition.json"
PARTITION_FORMAT = "fxopt.tvm_cuda.partition/1"
REGION_PREFIX = "region_"


@dataclass(frozen=True)
class Region:
    """One part of the graph TVM builds: the nodes it covers, the outer values it takes and how many it returns."""

    name: str
    nodes: Tuple[str, ...]
    inputs: Tuple[str, ...]
    outputs: int

    @property
    def library(self) -> str:
        return f"{self.name}.so"


@dataclass(frozen=True)
class Fallback:
    """A node that runs in PyTorch, and why TVM cannot take it."""

    node: str
    op: str
    reason: str


@dataclass
class Plan:
    """The node sets of the regions (graph order) and the nodes that fall back to PyTorch."""

    partitions: List[Tuple[str, ...]]
    fallback: List[Fallback]
    regions: List[Region] = field(default_factory=list)  # filled by :func:`split`

    def fallback_ops(self) -> Dict[str, int]:
        return dict(Counter(f.op for f in self.fallback))

    def warning(self) -> str:
        """The one message that says which ops run in PyTorch (with counts and reasons)."""
        reasons: Dict[str, str] = {}
        for f in self.fallback:
            reasons.setdefault(f.op, f.reason)
        ops = ", ".join(f"{op} x{count} ({reasons[op]})" for op, count in self.fallback_ops().items())
        n = len(self.fallback)
        return (f"tvm-cuda: {n} op{'s' if n != 1 else ''} run{'s' if n == 1 else ''} in PyTorch between "
                f"{len(self.regions)} TVM region{'s' if len(self.regions) != 1 else ''}: {ops}; to compile "
                "them too, rewrite them into supported ATen ops or give tvm_cuda.build a custom_convert_map")

    def to_json(self) -> dict:
        return {"format": PARTITION_FORMAT,
                "regions": [{**asdict(r), "library": r.library} for r in self.regions],
                "fallback": [asdict(f) for f in self.fallback]}


# ------------------------------------------------------------------ plan
def propose(graph: Graph, known: FrozenSet[str], kept_whole: Tuple = ()) -> Plan:
    """The fallback nodes and the partitions of the rest, by torch.fx's capability-based partitioner."""
    reasons = fallback_reasons(graph, known, kept_whole)
    fallback = [Fallback(n.name, op_name(n), reason) for n, reason in reasons.items()]
    partitioner = CapabilityBasedPartitioner(graph.module, TvmOperatorSupport(known, kept_whole),
                                             allows_single_node_partition=True)
    order = {n: i for i, n in enumerate(graph.fx_graph.nodes)}
    partitions = []
    for partition in partitioner.propose_partitions():
        nodes = sorted(partition.nodes, key=order.__getitem__)
        if any(n.op == "call_function" for n in nodes):  # weights alone are no region
            partitions.append(tuple(n.name for n in nodes))
    partitions.sort(key=lambda names: order[graph.node(names[0])])
    return Plan(partitions, fallback)


def without_partition(plan: Plan, graph: Graph, index: int, reason: str) -> Plan:
    """The plan with partition ``index`` run in PyTorch (its build failed): its call nodes join the fallback."""
    dropped = plan.partitions[index]
    fallback = plan.fallback + [
        Fallback(name, op_name(graph.node(name)), reason) for name in dropped
        if graph.node(name).op == "call_function"
    ]
    return Plan(plan.partitions[:index] + plan.partitions[index + 1:], fallback)


# ----------------------------------------------------------------- split
def split(graph: Graph, partitions: Sequence[Sequence[str]]) -> Tuple[fx.GraphModule, List[Region]]:
    """The glue module (region calls plus the fallback nodes, flat inputs and outputs) and its regions.

    The graph itself is not changed: the split works on a structural copy that shares the weights.
    """
    module = graph.copy().module
    by_name = {n.name: n for n in module.graph.nodes}
    fuse_by_partitions(module, [dict.fromkeys(by_name[name] for name in names) for names in partitions],
                       prefix=REGION_PREFIX, always_return_tuple=True)
    glue = fx.GraphModule(module, module.graph)  # keeps only what the glue reads: fallback weights, regions
    glue.graph._codegen = fx.graph.CodeGen()  # called with the flat inputs, returns the flat outputs
    glue.recompile()
    regions = []
    for node in glue.graph.nodes:
        if node.op == "call_module" and node.target.startswith(REGION_PREFIX):
            index = int(node.target[len(REGION_PREFIX):])
            outputs = len(glue.get_submodule(node.target).graph.output_node().args[0])
            regions.append(Region(node.target, tuple(partitions[index]), tuple(a.name for a in node.args), outputs))
    regions.sort(key=lambda r: int(r.name[len(REGION_PREFIX):]))
    return glue, regions


def region_graph(glue: fx.GraphModule, region: Region) -> Graph:
    """One region as an fxopt Graph: its inputs are the outer values it reads, its weights ``get_attr`` nodes."""
    return Graph(glue.get_submodule(region.name))


def output_dtypes(glue: fx.GraphModule, region: Region) -> List[torch.dtype]:
    """The dtypes the graph computes for a region's outputs (the library may return fp16 where it was fp32)."""
    outputs = glue.get_submodule(region.name).graph.output_node().args[0]
    return [n.meta["val"].dtype for n in outputs]


# ------------------------------------------------------------ artifacts
def write_plan(plan: Plan, directory: str) -> str:
    path = os.path.join(directory, PARTITION_FILE)
    with open(path, "w") as f:
        json.dump(plan.to_json(), f, indent=1)
    return path


def read_plan(path: str) -> Plan:
    """The plan saved in ``partition.json``; ArtifactError when it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != PARTITION_FORMAT:
            raise ArtifactError(f"{path}: format {data.get('format')!r} is not {PARTITION_FORMAT!r}; save the "
                                "artifact again with this fxopt")
        regions = [Region(r["name"], tuple(r["nodes"]), tuple(r["inputs"]), int(r["outputs"]))
                   for r in data["regions"]]
        fallback = [Fallback(f["node"], f["op"], f["reason"]) for f in data["fallback"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{path}: malformed ({type(exc).__name__}: {exc}); the artifact is corrupted, "
                            "save it again") from exc
    return Plan([r.nodes for r in regions], fallback, regions)


def glue_from_saved(graph: Graph, plan: Plan, where: str) -> fx.GraphModule:
    """Rebuild the glue of a saved plan from the saved graph, checking it splits the way it did at build time."""
    names = {n.name for n in graph.fx_graph.nodes}
    for region in plan.regions:
        unknown = [n for n in region.nodes if n not in names]
        if unknown:
            raise ArtifactError(f"{where}: {region.name} covers node %{unknown[0]}, which graph.json does not "
                                "have; the partition does not belong to this graph, save the artifact again")
    glue, regions = split(graph, plan.partitions)
    if regions != plan.regions:
        raise ArtifactError(f"{where}: the saved graph splits into regions {[(r.name, r.inputs) for r in regions]}, "
                            f"the partition says {[(r.name, r.inputs) for r in plan.regions]}; save the artifact "
                            "again with this fxopt and torch")
    return glue
