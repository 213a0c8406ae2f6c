"""Let fxopt choose: every candidate pipeline is built and measured; the fastest within the tolerance wins.

    python examples/search_with_tolerance.py

A tight tolerance keeps the model in float; a loose one takes the fastest
compressed candidate. Both decisions come from latencies measured here, printed
as a table and kept in ``optimized.report()["candidates"]``.
"""
from __future__ import annotations

import torch

import fxopt


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512), torch.nn.LayerNorm(512),
    ).eval()


def main(tolerances=({"cosine": 0.99999}, {"cosine": 0.99})) -> dict:
    """Each tolerance's search (``report()["search"]``: the candidates measured, and the one chosen)."""
    model = make_model()
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(64, 512, generator=gen),) for _ in range(4)]
    searches = {}
    for tolerance in tolerances:
        optimized = fxopt.optimize(model, calibration[0], target="x86-int8", calibration_data=calibration,
                                   tolerance=tolerance)
        report = optimized.report()
        searches[str(tolerance)] = report["search"]
        print(f"tolerance {tolerance}: chose {report['search']['chosen']!r} "
              f"({report['latency_ms']:.3f} ms vs {report['original_latency_ms']:.3f} ms before), "
              f"target {optimized.target}\n")
    return searches


if __name__ == "__main__":
    main()
