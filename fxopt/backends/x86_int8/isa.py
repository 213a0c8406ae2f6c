"""Which int8 instructions this CPU has, and what that means for activation codes.

oneDNN (inside PyTorch) picks its own int8 GEMM implementation for the CPU:
AMX tiles, AVX-512 VNNI, AVX-VNNI or plain AVX2. What differs for us is
exactness. With VNNI and AMX, ``u8 x s8`` products are summed straight into
int32, so full 8-bit activation codes give exact int32 accumulation. Without
VNNI, AVX2 adds pairs of products in a *saturating int16* first
(``vpmaddubsw``): ``255 * 127 * 2`` overflows it, and results go wrong. There,
activations get 7-bit codes (``0..127``), the "reduce range" rule PyTorch's
own x86 quantizer follows, which keeps every pair sum in range; or the weights
get 7-bit codes (``-63..63``), which keeps it in range with full 8-bit
activations. Per-channel weights lose far less to the seventh bit than
per-tensor activations do, so ``fxopt.optimize`` takes that route on AVX2.

``FXOPT_X86_ISA=avx2|avx512-vnni|amx`` overrides detection (tests use it to
check each path's code range on any machine).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import FrozenSet

from fxopt.errors import LoweringError

ENV_OVERRIDE = "FXOPT_X86_ISA"
#: Largest |weight code| whose pair products with 8-bit activations fit AVX2's saturating int16 (2*255*64 = 32640).
SEVEN_BIT_WEIGHT_MAX = 64


@dataclass(frozen=True)
class Isa:
    """An int8 instruction set: its name and whether it accumulates u8 x s8 products exactly."""

    name: str
    exact_8bit: bool

    @property
    def activation_levels(self) -> int:
        """Largest uint8 activation code the kernels may be given without risking saturation."""
        return 255 if self.exact_8bit else 127

    def activation_levels_for(self, weight_codes) -> int:
        """Largest activation code that is exact against these int8 weight codes.

        Without VNNI a pair of products must fit in int16: ``2 * 255 * 63 = 32130``
        does (and 2 * 255 * 64), so 7-bit weights (``insert-qdq{bits=7}``) take full
        8-bit activations; 8-bit weights need 7-bit activations.
        """
        if self.exact_8bit or int(weight_codes.abs().max()) <= SEVEN_BIT_WEIGHT_MAX:
            return 255
        return 127


ISAS = {
    "amx": Isa("amx", True),
    "avx512-vnni": Isa("avx512-vnni", True),
    "avx-vnni": Isa("avx-vnni", True),
    "avx2": Isa("avx2", False),
}


#: weakest to strongest: an artifact built for one ISA needs a CPU with it or a later one in this order
ISA_ORDER = ("avx2", "avx-vnni", "avx512-vnni", "amx")


def lacks(host: Isa, built_for: Isa) -> bool:
    """Whether a CPU with ``host`` lacks what an artifact built for ``built_for`` was made for."""
    return ISA_ORDER.index(host.name) < ISA_ORDER.index(built_for.name)


def cpu_flags() -> FrozenSet[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_from_flags(flags: FrozenSet[str]) -> Isa:
    if "amx_int8" in flags and "amx_tile" in flags:
        return ISAS["amx"]
    if "avx512_vnni" in flags:
        return ISAS["avx512-vnni"]
    if "avx_vnni" in flags:
        return ISAS["avx-vnni"]
    return ISAS["avx2"]


def isa_by_name(name: str) -> Isa:
    if name not in ISAS:
        raise LoweringError(f"x86-int8: unknown ISA {name!r} (from {ENV_OVERRIDE} or isa=); "
                            f"valid names: {', '.join(ISAS)}")
    return ISAS[name]


@lru_cache(maxsize=1)
def _detected() -> Isa:
    return isa_from_flags(cpu_flags())


def detect_isa() -> Isa:
    """This CPU's int8 ISA, or the one named by ``FXOPT_X86_ISA``."""
    override = os.environ.get(ENV_OVERRIDE)
    return isa_by_name(override) if override else _detected()
