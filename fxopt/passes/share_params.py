"""share-params: store weights that hold the same values once.

Models often carry copies: an embedding table and an LM head that were tied
before saving but loaded as two tensors, LayerNorm weights that are all ones,
repeated constant masks. Two ``get_attr`` weights of the same shape and dtype
that are equal are merged: every user reads the first (in graph order), the
others are dropped (``graph.remove_unused_params``), and ``graph.size_bytes``
counts the survivor once.

Equal means, by option:
- by default, bit-identical (lossless, what ``graph.size_bytes`` also treats as one tensor);
- ``atol``/``rtol``: every element within ``|a - b| <= atol + rtol·|b|`` (``torch.allclose``), b the survivor;
- ``across-layers=true`` also merges weights of different layers whose whole tensors are within ``epsilon``
  in relative Frobenius norm, ``||a - b|| <= epsilon·||b||`` (ALBERT-style cross-layer sharing of layers that
  are nearly the same; a few elements may differ more than an elementwise tolerance would allow).
The last two change numbers (by at most the tolerance per weight); tolerances
are 0 by default. A weight only ever merges into a survivor, never a chain of
near-matches, so each merged weight is within tolerance of the values it now reads.

Stats: ``shared`` (weights merged into another), ``exact``/``within_tolerance``/``across_layers`` (how each
matched), ``same_tensor_nodes`` (get_attr nodes that already read the same stored tensor, merged too),
``params_removed`` (elements no longer stored, from ``graph.param_count()``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx

from fxopt.ir.graph import Graph
from fxopt.passes.infra.base import Pass, PassResult
from fxopt.passes.infra.registry import register_pass


@register_pass
@dataclass(frozen=True)
class ShareParams(Pass):
    name = "share-params"
    summary = "store weights with equal values once (exact by default; atol/rtol or across-layers to share near-equal)"
    atol: float = 0.0
    rtol: float = 0.0
    across_layers: bool = False
    #: across-layers: the largest relative Frobenius distance ``||a - b|| / ||b||`` of weights shared.
    epsilon: float = 1e-3

    def __post_init__(self):
        for option, value in (("atol", self.atol), ("rtol", self.rtol)):
            if not value >= 0.0:
                raise self.error(f"{option}={value} is negative", hint="tolerances are >= 0; 0 means exact")
        if not 0.0 <= self.epsilon < 1.0:
            raise self.error(f"epsilon={self.epsilon} is outside [0, 1)",
                             hint="a relative distance such as 1e-3; 0 means exact")

    def run(self, graph: Graph) -> PassResult:
        stats = {"shared": 0, "exact": 0, "within_tolerance": 0, "across_layers": 0, "same_tensor_nodes": 0}
        params_before = graph.param_count()
        survivors: Dict[Tuple, List[fx.Node]] = {}  # (shape, dtype, device, grad) -> weights kept, in graph order
        by_content: Dict[Tuple, fx.Node] = {}  # (shape, dtype, device, grad, digest) -> the survivor with those bytes
        for node in [n for n in graph.fx_graph.nodes if n.op == "get_attr" and n.users]:  # dead ones just go
            tensor = graph.param(node)
            if not isinstance(tensor, torch.Tensor):
                continue
            # requires_grad too: a BatchNorm's running statistics (buffers) must not read a parameter that requires
            # grad (a fresh BatchNorm's running_var equals its weight), which autograd refuses there
            kind = (tuple(tensor.shape), tensor.dtype, tensor.device, tensor.requires_grad)
            content = kind + (_digest(tensor),)
            match, how = by_content.get(content), "exact"
            if match is not None and not torch.equal(_bytes(graph.param(match)), _bytes(tensor)):
                match = None  # a digest collision: compare the bytes, never trust a hash alone
            if match is None:
                match, how = self._near_match(graph, tensor, survivors.get(kind, ()))
            if match is None:
                survivors.setdefault(kind, []).append(node)
                by_content.setdefault(content, node)
                continue
            self._merge(graph, node, match, stats, how)
        modified = stats["shared"] + stats["same_tensor_nodes"] > 0
        if modified:  # only then is the module recompiled: leave its other get_attrs alone otherwise
            graph.remove_unused_params()
        stats["params_removed"] = params_before - graph.param_count()
        return PassResult(graph, modified, stats)

    def _near_match(self, graph: Graph, tensor: torch.Tensor, candidates) -> Tuple[Optional[fx.Node], str]:
        """The first survivor within the elementwise tolerance, else within epsilon (across-layers), else None."""
        if not tensor.is_floating_point():
            return None, ""
        if self.atol > 0 or self.rtol > 0:
            for node in candidates:
                if torch.allclose(tensor, graph.param(node), rtol=self.rtol, atol=self.atol):
                    return node, "within_tolerance"
        if self.across_layers:
            values = tensor.detach().double()
            for node in candidates:
                other = graph.param(node).detach().double()
                if (values - other).norm() <= self.epsilon * other.norm():
                    return node, "across_layers"
        return None, ""

    @staticmethod
    def _merge(graph: Graph, duplicate: fx.Node, survivor: fx.Node, stats: dict, how: str) -> None:
        """Point the duplicate's users at the survivor (an earlier node, so the order stays valid)."""
        duplicate.replace_all_uses_with(survivor)
        if duplicate.target == survivor.target or _same_storage(graph.param(duplicate), graph.param(survivor)):
            stats["same_tensor_nodes"] += 1  # two nodes reading one stored tensor: nothing to save but a node
            return
        stats["shared"] += 1
        stats[how] += 1


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(_bytes(tensor).cpu().numpy().tobytes(), digest_size=16).hexdigest()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())
