"""Write a rewrite in each pattern style, register it as a pass, run it in a pipeline, check equivalence.

    python examples/custom_pass.py

1. By example: ``x * sigmoid(x)`` (SiLU written out) becomes ``aten.silu``.
2. Declarative: ``relu(relu(x))`` becomes ``relu(x)`` (the Var ``x`` binds once).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

import fxopt
from fxopt import ExamplePattern, Op, OpPattern, RewritePass, Var, register_pass

aten = torch.ops.aten


def silu_pattern(x):
    return x * torch.sigmoid(x)


def silu_replacement(x):
    return torch.nn.functional.silu(x)


def double_relu_rewrite(rw, x):
    return rw.call(aten.relu.default, x)


@register_pass
@dataclass(frozen=True)
class SimplifyActivations(RewritePass):
    name = "simplify-activations"
    summary = "x*sigmoid(x) -> silu(x); relu(relu(x)) -> relu(x)"

    def patterns(self):
        return [
            ExamplePattern(silu_pattern, silu_replacement, example_inputs=(torch.randn(4, 8),)),
            OpPattern(Op(aten.relu.default, Op(aten.relu.default, Var("x"))), double_relu_rewrite),
        ]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = self.up(x)
        h = h * torch.sigmoid(h)
        return torch.relu(torch.relu(self.down(h))).clone()


def main():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(4, 16)
    graph = fxopt.capture(model, (x,))
    result = fxopt.Pipeline("simplify-activations,cleanup", debug=True)(graph)
    print(result.graph.format())
    print("stats:", result.stats["0:simplify-activations"]["matches"])
    error = (result.graph.run(x) - model(x)).abs().max().item()
    print(f"nodes {len(graph)} -> {len(result.graph)}, max abs error {error:.2e}")
    assert error < 1e-6, "the rewrite changed the numbers"
    return result


if __name__ == "__main__":
    main()
