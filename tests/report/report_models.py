"""Models and a full report shared by the report tests: stacked identical blocks, quantized for real."""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn as nn

import fxopt
from fxopt.passes.quantize import calibrate_smoothed
from fxopt.passes.quantize.insert_qdq import InsertQDQ
from fxopt.report.graph_svg import graph_outline
from fxopt.report.layer_error import per_layer_error

WIDTH = 16


class ResidualBlock(nn.Module):
    """Pre-LN residual MLP: x + down(act(up(ln(x))))."""

    def __init__(self, width: int = WIDTH, act: str = "relu"):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()

    def forward(self, x):
        return x + self.down(self.act(self.up(self.ln(x))))


class Stacked(nn.Module):
    """An input projection, blocks, a head: the projection and head make a prefix and suffix around the repeats."""

    def __init__(self, acts=("relu",) * 12, width: int = WIDTH):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList([ResidualBlock(width, a) for a in acts])
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def stacked_case(acts=("relu",) * 12, seed: int = 0):
    torch.manual_seed(seed)
    model = Stacked(acts).eval()
    return model, (torch.randn(2, 5, 8),)


@functools.lru_cache(maxsize=None)
def captured(acts=("relu",) * 12, seed: int = 0):
    """The captured graph of ``stacked_case`` (cached: tests treat it as read-only) and its example inputs."""
    model, example = stacked_case(acts, seed)
    return fxopt.capture(model, example), example


def calibration_batches(n: int = 4, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 5, 8, generator=generator),) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def quantized_pair(acts=("relu",) * 3):
    """(float graph, smooth-quant + static int8 graph, batches), cached: insert-qdq keeps the linears' names."""
    graph, _ = captured(acts)
    batches = calibration_batches()
    calibrated = calibrate_smoothed(graph, batches, 0.8, progress=False)
    quantized = InsertQDQ(scheme="static", activation_matmuls=False)(calibrated).graph
    return graph, quantized, batches


def full_report():
    """A report as optimize() with a search will make it (a fresh copy), and the optimized graph."""
    report, quantized = _full_report()
    return copy.deepcopy(report), quantized


@functools.lru_cache(maxsize=1)
def _full_report():
    graph, quantized, batches = quantized_pair()
    report = {
        "target": "x86-int8", "pipeline": "fuse,insert-qdq{scheme=static}", "params": quantized.param_count(),
        "size_bytes": quantized.size_bytes(), "original_params": graph.param_count(),
        "original_size_bytes": graph.size_bytes(), "latency_ms": 0.8, "original_latency_ms": 1.3,
        "tolerance": {"cosine": 0.99},
        "candidates": [
            _candidate("float", 1.1, 0.9999999, 1e-6, meets=True),
            _candidate("int8", 0.7, 0.98, 0.08, meets=False),
            _candidate("int8, 2 of 7 layers float", 0.8, 0.996, 0.03, meets=True, chosen=True),
            _candidate("half", 1.2, 0.9999, 1e-3, meets=True),
        ],
        "per_layer_error": per_layer_error(graph, quantized, batches),
        "graph_before": graph_outline(graph),
        "passes": {"0:fuse-epilogue": {"matches": {"linear+relu": 3}, "iterations": 1},
                   "1:fold-constants": {"folded": 0}},
        "lowering": {"isa": "avx2", "int8_linears": 7},
    }
    return report, quantized


def _candidate(name, latency, cosine, max_rel_err, meets, chosen=False):
    return {"name": name, "pipeline": f"fuse,{name}", "latency_ms": latency, "speedup": 1.3 / latency,
            "fidelity": {"cosine": cosine, "max_rel_err": max_rel_err}, "meets": meets, "size_bytes": 5000,
            "chosen": chosen}
