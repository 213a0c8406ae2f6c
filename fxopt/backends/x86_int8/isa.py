"""Which int8 instructions this CPU has, and what that means for activation codes.

oneDNN (inside PyTorch) picks its own int8 GEMM implementation for the CPU:
AMX tiles, AVX-512 VNNI, AVX-VNNI or plain AVX2. What differs for us is
exactness. With VNNI and AMX, ``u8 x s8`` products are summed straight into
int32, so full 8-bit activation codes give exact int32 accumulation. Without
VNNI, AVX2 adds pairs of products in a *saturating int16* first
(``vpmaddubsw``): ``255 * 127 * 2`` overflows it, and results go wrong. There,
activations get 7-bit codes (``0..127``), the "reduce range" rule PyTorch's
own x86 quantizer follows, which keeps every pair sum in range.

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


@dataclass(frozen=True)
class Isa:
    """An int8 instruction set: its name and whether it accumulates u8 x s8 products exactly."""

    name: str
    exact_8bit: bool

    @property
    def activation_levels(self) -> int:
        """Largest uint8 activation code the kernels may be given without risking saturation."""
        return 255 if self.exact_8bit else 127


ISAS = {
    "amx": Isa("amx", True),
    "avx512-vnni": Isa("avx512-vnni", True),
    "avx-vnni": Isa("avx-vnni", True),
    "avx2": Isa("avx2", False),
}


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
