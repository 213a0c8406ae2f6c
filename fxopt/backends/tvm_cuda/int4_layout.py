"""The MMA layout of fxopt's int4 kernel (``int4_gemm.cu``), from fxopt's ``[N, K/2]`` packed codes.

fxopt's int4 layout keeps column ``2j`` of a weight row in the low nibble of byte ``j`` and ``2j + 1`` in the
high one. The kernel wants each lane's A fragment of ``mma.sync.m16n8k16`` in one 4-byte word: for a 16 x 16
tile (rows ``8h + g``, columns ``8j + 2t + e``), lane ``4g + t`` holds the 8 nibbles of ``(h, j, e)`` with nibble
``4e + 2j + h`` at bits ``4 * (4e + 2j + h)``, so nibble pair ``p = 2j + h`` (bits ``4p`` and ``16 + 4p``) is A
register ``p``. Four tiles along K (64 columns) make a lane's 16 bytes, and the 32 lanes' 512 bytes are
contiguous: ``[N/16, K/64, 32, 16]`` bytes.

One description of that permutation serves both implementations: torch (tests, benchmarks) and Relax (the
converter, where the codes are parameters: the rearrangement is lifted to load time, or folded if constant).
"""
from __future__ import annotations

#: rows of a weight tile and columns of K in a lane's 16 bytes: N and K must be multiples
TILE_ROWS, CHUNK_COLUMNS = 16, 64


def split_shape(n: int, k: int):
    """codes [N, K] viewed as [N/16, h, g, K/64, c, j, t, e]: row 16 * tile + 8h + g, column 64 * chunk + 16c +
    8j + 2t + e (c: the tile within the lane's 16 bytes)."""
    return (n // TILE_ROWS, 2, 8, k // CHUNK_COLUMNS, 4, 2, 4, 2)


#: to [N/16, K/64, g, t, c, e, j, h]: lane 4g + t, its word c, and nibble 4e + 2j + h (the last three, h lowest)
LANE_ORDER = (0, 3, 2, 6, 4, 7, 5, 1)


def fits(n: int, k: int) -> bool:
    return n % TILE_ROWS == 0 and k % CHUNK_COLUMNS == 0


def mma_layout(packed):
    """torch: fxopt's packed codes [N, K/2] (uint8) in the kernel's layout [N/16, K/64, 32, 16]."""
    import torch

    n, k = packed.shape[0], 2 * packed.shape[1]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(split_shape(n, k))
    pairs = codes.permute(LANE_ORDER).reshape(-1, 2)  # one byte per row: (low nibble, high nibble)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).reshape(n // TILE_ROWS, k // CHUNK_COLUMNS, 32, 16).contiguous()


def mma_layout_relax(bb, packed):
    """Relax: the same rearrangement of a [N, K/2] uint8 expression (each step emitted: Relax's reshape needs
    its input's type)."""
    from tvm import relax

    n, k = int(packed.ty.shape[0]), 2 * int(packed.ty.shape[1])
    low = bb.emit(relax.op.bitwise_and(packed, relax.const(0x0F, "uint8")))
    high = bb.emit(relax.op.right_shift(packed, relax.const(4, "uint8")))
    codes = bb.emit(relax.op.reshape(bb.emit(relax.op.stack([low, high], axis=2)), split_shape(n, k)))
    pairs = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(codes, LANE_ORDER)), (n * k // 2, 2)))

    def nibble(i: int):
        return bb.emit(relax.op.reshape(bb.emit(relax.op.strided_slice(pairs, [1], [i], [i + 1])), (n * k // 2,)))

    byte = bb.emit(relax.op.bitwise_or(nibble(0), relax.op.left_shift(nibble(1), relax.const(4, "uint8"))))
    return bb.emit(relax.op.reshape(byte, (n // TILE_ROWS, k // CHUNK_COLUMNS, 32, 16)))
