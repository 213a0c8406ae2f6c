"""x86-int8 built for a deployment CPU (``isa=``), recorded in the artifact and checked where it is loaded."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxopt
from fxopt.backends.x86_int8.isa import ENV_OVERRIDE
from fxopt.errors import ArtifactError

SEVEN_BIT_MAX = 64  # |weight code| that AVX2's saturating int16 pair sums allow with 8-bit activations


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def build(isa, tmp_path=None):
    torch.manual_seed(0)
    model = Mlp().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 32, generator=gen),) for _ in range(4)]
    optimized = fxopt.optimize(model, batches[0], target="x86-int8", calibration_data=batches, progress=False,
                               options={"isa": isa, "compile": "never"})
    return model, batches[0][0], optimized


def largest_weight_code(optimized) -> int:
    codes = [t for t in optimized.graph.params().values() if t.dtype == torch.int8]
    assert codes, "no int8 weights in the build"
    return max(int(t.abs().max()) for t in codes)


@pytest.mark.parametrize("isa, seven_bit", [("avx2", True), ("avx512-vnni", False), ("amx", False)])
def test_the_weight_format_follows_the_isa_built_for_not_this_cpu(isa, seven_bit):
    _, _, optimized = build(isa)
    assert optimized.report()["quantize"]["isa"] == isa
    assert ("bits=7" in optimized.pipeline) == seven_bit  # static int8 linears: 7-bit weights only for AVX2
    if not seven_bit:  # full 8-bit codes where VNNI accumulates exactly
        assert largest_weight_code(optimized) > SEVEN_BIT_MAX


def test_a_cpu_lacking_the_isa_refuses_the_artifact_unless_fallback_is_allowed(tmp_path, monkeypatch):
    model, x, optimized = build("avx512-vnni")
    path = optimized.save(tmp_path / "vnni")
    monkeypatch.setenv(ENV_OVERRIDE, "avx2")
    with pytest.raises(ArtifactError, match="built for avx512-vnni.*this CPU has avx2.*isa_fallback=True"):
        fxopt.load(path)
    with pytest.warns(UserWarning, match="built for avx512-vnni.*running on this CPU's kernels"):
        loaded = fxopt.load(path, isa_fallback=True)
    reference = model(x)
    assert float((loaded(x) - reference).norm() / reference.norm()) < 5e-2


def test_an_artifact_built_for_a_weaker_isa_loads_anywhere_without_a_warning(tmp_path, monkeypatch, recwarn):
    _, x, optimized = build("avx2")
    path = optimized.save(tmp_path / "avx2")
    monkeypatch.setenv(ENV_OVERRIDE, "amx")
    loaded = fxopt.load(path)
    assert torch.equal(loaded(x), optimized(x))
    assert not [w for w in recwarn if "built for" in str(w.message)]
