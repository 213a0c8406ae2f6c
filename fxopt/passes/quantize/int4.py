"""Int4 group-wise weights: quantize a linear weight per group of input columns and pack two codes a byte.

    packed, q = quantize_int4_grouped(weight, group_size=128, scheme="symmetric")
    weight_hat = torch.ops.fxopt.dequantize_int4_grouped(packed, q.scale, None, 128, torch.float32)

``weight`` is ``[out, in]``; every ``group_size`` consecutive columns of a row
get their own range, chosen by :func:`qparams_from_range` over the int4 codes
[-8, 7]: symmetric (zero point 0, scale ``amax / 7``) or asymmetric (the
group's ``[min, max]`` widened to include 0, spread over all 16 codes). Every
weight is within ``scale / 2`` of its dequantized value. ``packed`` is uint8
``[out, in / 2]`` in the layout :data:`fxopt.ir.ops.INT4_OFFSET` describes;
``q.scale`` and ``q.zero_point`` are ``[out, in / group_size]``.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import torch

from fxopt.ir.meta import QParams
from fxopt.ir.ops import INT4_OFFSET
from fxopt.passes.quantize.observers import QDTYPES, qparams_from_range

INT4 = QDTYPES["int4"]
#: The group sizes insert-qdq offers for int4 weights.
GROUP_SIZES = (32, 64, 128)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Int4 codes in [-8, 7] with an even last dim -> uint8 with two codes a byte (even column in the low nibble)."""
    nibbles = (codes.to(torch.int16) + INT4_OFFSET).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[out, in]`` -> float32 ``[out, in / group_size, group_size]``."""
    return weight.detach().float().reshape(weight.shape[0], -1, group_size)


def int4_group_qparams(weight: torch.Tensor, group_size: int, scheme: str) -> QParams:
    """Per-group QParams of a ``[out, in]`` weight: scale and zero point ``[out, in / group_size]``."""
    groups = _groups(weight, group_size)
    q = qparams_from_range(groups.amin(dim=-1), groups.amax(dim=-1), "int4", scheme, axis=0)
    return dataclasses.replace(q, zero_point=q.zero_point.to(torch.int8), group_size=group_size)


def quantize_int4_grouped(weight: torch.Tensor, group_size: int, scheme: str = "symmetric"
                          ) -> Tuple[torch.Tensor, QParams]:
    """The packed uint8 codes ``[out, in / 2]`` of ``weight`` and their per-group QParams."""
    q = int4_group_qparams(weight, group_size, scheme)
    codes = torch.round(_groups(weight, group_size) / q.scale.unsqueeze(-1)) + q.zero_point.unsqueeze(-1)
    codes = codes.clamp(INT4.qmin, INT4.qmax).reshape(weight.shape)
    return pack_int4(codes), q
