"""A tensor-core matmul schedule for TVM 0.27: ``ldmatrix`` + ``mma.sync`` + ``cp.async`` pipelining.

dlight's default ``gpu.Matmul`` tensorizes fp16 matmuls with WMMA (``wmma::load_matrix_sync`` /
``mma_sync``) in one fixed tile (128x128x64, 16 warps), with a register-staged (not
``cp.async``) shared-memory double buffer. On the H100 that reaches 28-56 TFLOP/s for BERT's
shapes. This module is the other tensor-core path the installed TVM has intrinsics for, the one
MetaSchedule's ``MultiLevelTilingTensorCore`` uses on sm_80+: ``mma_ldmatrix_f16_*`` loads
fragments from (dynamic) shared memory, ``mma_f16f16f32_trans_b`` / ``mma_f16f16f16_trans_b``
compute ``m16n8k16`` tiles, and the global->shared copies run as ``cp.async`` in a 3-stage
software pipeline (``software_pipeline_async_stages``), with the fragment loads of step k+1
overlapped with the MMAs of step k.

    rule = MatmulMMA(MMAConfig(...))          # a dlight ScheduleRule; None for what it cannot take
    sch = rule.apply(prim_func, target, False)

It takes a PrimFunc whose one reduction block is an fp16 x fp16 matmul (any layout dlight's
``get_index_map`` normalizes, batch allowed) with static sizes divisible by the block tile, and
fuses whatever follows it (cast, bias, activation) into the shared->global store. Anything else
returns None, so the default rules after it in ``ApplyDefaultSchedule`` take over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


@dataclass(frozen=True)
class MMAConfig:
    """Block tile = (warps_m * frags_m * 16) x (warps_n * frags_n * 16) x (k_frags * 16)."""

    warps_m: int = 2
    warps_n: int = 2
    frags_m: int = 4  # 16-row MMA tiles per warp along M
    frags_n: int = 4  # 16-col MMA tiles per warp along N
    k_frags: int = 2  # 16-deep MMA steps per shared-memory stage
    #: "float32": fp32 accumulators (mma_f16f16f32); "float16": fp16 accumulators (mma_f16f16f16)
    accum: str = "float32"
    #: software-pipeline the K loop (cp.async global->shared, 3 stages; fragments one step ahead)
    pipeline: bool = True
    vector: int = 8  # fp16 elements per thread per copy (8 = 16 bytes, the cp.async maximum)

    @property
    def block_m(self) -> int:
        return self.warps_m * self.frags_m * 16

    @property
    def block_n(self) -> int:
        return self.warps_n * self.frags_n * 16

    @property
    def block_k(self) -> int:
        return self.k_frags * 16

    @property
    def name(self) -> str:
        acc = "f32acc" if self.accum == "float32" else "f16acc"
        pipe = "" if self.pipeline else "_nopipe"
        return f"mma{self.block_m}x{self.block_n}x{self.block_k}_w{self.warps_m}x{self.warps_n}_{acc}{pipe}"


#: The configurations the benchmark tries (benchmarks/gpu_gemm.py), by name.
CONFIGS = {
    c.name: c
    for c in [
        MMAConfig(2, 2, 4, 4, 2),  # 128x128x32, 4 warps
        MMAConfig(2, 2, 2, 4, 2),  # 64x128x32, 4 warps: 2x the CTAs for the N=768 shapes
        MMAConfig(2, 2, 2, 2, 4),  # 64x64x64, 4 warps: fails in TVM (merged shared.dyn f16/f32 access_ptr check)
        MMAConfig(2, 4, 4, 4, 2),  # 128x256x32, 8 warps
        MMAConfig(4, 2, 2, 4, 2),  # 128x128x32, 8 warps
        MMAConfig(2, 2, 4, 4, 2, accum="float16"),
        MMAConfig(2, 2, 2, 4, 2, accum="float16"),
    ]
}


#: What ``build(matmul="mma")`` tries, in order: the first tile that divides the matmul is used.
PIPELINE_CONFIGS = [MMAConfig(2, 2, 2, 4, 2)]  # 64x128x32: best measured on 2 of 3 BERT shapes (gpu_gemm.md)


class MatmulMMA:
    """A dlight ``GPUScheduleRule``: fp16 matmul -> ldmatrix/mma.sync with a cp.async pipeline."""

    def __init__(self, config: Optional[MMAConfig] = None, configs: Optional[List[MMAConfig]] = None):
        #: tried in order; the first whose tile divides the shape is used
        self.configs = list(configs or [config or MMAConfig()])

    # dlight calls rule.apply(func, target, tunable); ApplyDefaultSchedule takes any object with
    # apply() once wrapped (see as_dlight_rule).
    def apply(self, func, target, _tunable=False):
        from tvm import s_tir, tirx
        from tvm.s_tir.dlight.analysis import get_root_block
        from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks

        if not isinstance(func, tirx.PrimFunc) or "dlight.do_not_tensorize" in func.attrs.keys():
            return None
        if target.kind.name != "cuda" or _sm(target) < 80:
            return None
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(get_root_block(sch))
        reduction_blocks = get_reduction_blocks(sch, blocks)
        if reduction_blocks is None or len(reduction_blocks) != 1:
            return None
        main = sch.get(reduction_blocks[0])
        if len(main.reads) < 2 or any(r.source.dtype != "float16" for r in main.reads[:2]):
            return None
        if main.writes[0].source.dtype not in ("float16", "float32") or get_index_map(main) is None:
            return None
        for config in self.configs:
            if config.accum == "float16" and main.writes[0].source.dtype != "float16":
                continue
            try:
                result = _schedule(s_tir.Schedule(func), config)
            except Exception:  # a tile that does not fit this function: try the next one
                result = None
            if result is not None:
                return result
        return None


def as_dlight_rule(rule: MatmulMMA):
    """Wrap :class:`MatmulMMA` as a real ``dl.gpu.GPUScheduleRule`` for ``dl.ApplyDefaultSchedule``."""
    from tvm.s_tir.dlight.gpu.base import GPUScheduleRule

    class _Rule(GPUScheduleRule):
        def apply(self, func, target, tunable):  # noqa: D102
            return rule.apply(func, target, tunable)

    return _Rule()


def _sm(target) -> int:
    arch = str(target.attrs.get("arch", ""))
    digits = "".join(ch for ch in arch.replace("sm_", "") if ch.isdigit())
    return int(digits) if digits else 0


def _static(extent) -> Optional[int]:
    from tvm import tirx

    return int(extent.value) if isinstance(extent, tirx.expr.IntImm) else None


def _schedule(sch, cfg: MMAConfig):
    from tvm.s_tir.dlight.analysis import get_root_block
    from tvm.s_tir.dlight.gpu.matmul import auto_inline_consumer_chain, auto_inline_producers
    from tvm.s_tir.dlight.gpu.matmul import get_index_map, get_reduction_blocks
    from tvm.s_tir.tensor_intrin.cuda import get_mma_intrin_group, shared_16x16_to_ldmatrix_32x8_layout

    main_block = get_reduction_blocks(sch, sch.get_child_blocks(get_root_block(sch)))[0]
    out_dtype = sch.get(main_block).writes[0].source.dtype

    # Step 1. Normalize to C[S, I, J] += A[S, I, K] * B[S, J, K] (dlight's own normalization).
    reindex_a = sch.reindex(main_block, ("read", 0))
    reindex_b = sch.reindex(main_block, ("read", 1))
    reindex_c = sch.reindex(main_block, ("write", 0))
    matmul_map, a_map, b_map, c_map = get_index_map(sch.get(main_block))
    sch.transform_layout(reindex_a, ("write", 0), a_map)
    sch.transform_layout(reindex_b, ("write", 0), b_map)
    sch.transform_layout(reindex_c, ("read", 0), c_map)
    sch.transform_block_layout(main_block, matmul_map)

    block = main_block
    batch, i, j, k = sch.get_loops(block)
    m, n, kk = (_static(sch.get(x).extent) for x in (i, j, k))
    if None in (m, n, kk) or m % cfg.block_m or n % cfg.block_n or kk % cfg.block_k:
        return None

    # Step 2. 16x16x16 MMA tiles, blockized; then block / warp / fragment tiling.
    i, i_inner = sch.split(i, factors=[None, 16])
    j, j_inner = sch.split(j, factors=[None, 16])
    k, k_inner = sch.split(k, factors=[None, 16])
    sch.reorder(i, j, k, i_inner, j_inner, k_inner)
    block_inner = block
    block_outer = sch.blockize(i_inner)

    i0, i1, i2 = sch.split(i, factors=[None, cfg.warps_m, cfg.frags_m])
    j0, j1, j2 = sch.split(j, factors=[None, cfg.warps_n, cfg.frags_n])
    k0, k1 = sch.split(k, factors=[None, cfg.k_frags])
    sch.reorder(i0, j0, i1, j1, k0, k1, i2, j2)
    bx = sch.fuse(i0, j0)
    ty = sch.fuse(i1, j1)
    sch.bind(batch, "blockIdx.y")
    sch.bind(bx, "blockIdx.x")
    sch.bind(ty, "threadIdx.y")
    num_warps = cfg.warps_m * cfg.warps_n

    # Step 3. global -> shared.dyn (vectorized, cp.async when pipelined), padded rows against bank conflicts.
    def fetch_to_shared(index):
        read = sch.cache_read(block_outer, index, "shared.dyn")
        sch.compute_at(read, k0)
        fused = sch.fuse(*sch.get_loops(read)[-2:])
        _, f_ty, f_tx, f_vec = sch.split(fused, factors=[None, num_warps, 32, cfg.vector])
        sch.bind(f_tx, "threadIdx.x")
        sch.bind(f_ty, "threadIdx.y")
        sch.vectorize(f_vec)
        sch.storage_align(read, 0, axis=-2, factor=32, offset=8)
        return read

    a_shared = fetch_to_shared(0)
    b_shared = fetch_to_shared(1)
    auto_inline_producers(sch, a_shared)
    auto_inline_producers(sch, b_shared)

    # Step 4. shared -> warp fragments (ldmatrix) at k1; accumulators in warp registers.
    a_warp = sch.cache_read(block_outer, 0, "warp")
    b_warp = sch.cache_read(block_outer, 1, "warp")
    sch.compute_at(a_warp, k1)
    sch.compute_at(b_warp, k1)

    store_shared = sch.cache_write(block_outer, 0, "shared.dyn")
    c_warp = sch.cache_write(block_outer, 0, "warp")
    sch.reverse_compute_at(c_warp, ty)
    sch.reverse_compute_at(store_shared, bx)  # shared -> global by the whole CTA, coalesced
    sch.storage_align(store_shared, 0, axis=-2, factor=32, offset=8 if out_dtype == "float16" else 4)

    def tile_fragment(blk):
        a, b = sch.get_loops(blk)[-2:]
        a0, a1 = sch.split(a, factors=[None, 16])
        b0, b1 = sch.split(b, factors=[None, 16])
        sch.reorder(a0, b0, a1, b1)
        return a1

    loop_a = tile_fragment(a_warp)
    loop_b = tile_fragment(b_warp)
    loop_c = tile_fragment(c_warp)

    def fragment_map(s, a, b):  # (batch, row, col) -> (batch, row tile, col tile, lane, element)
        return (s, a // 16, b // 16, *shared_16x16_to_ldmatrix_32x8_layout(a % 16, b % 16))

    sch.transform_layout(a_warp, ("write", 0), fragment_map)
    sch.transform_layout(b_warp, ("write", 0), fragment_map)
    sch.transform_layout(c_warp, ("read", 0), fragment_map)

    init = sch.decompose_reduction(block_outer, k0)
    init_inner = sch.get_child_blocks(init)[0]

    intrins = get_mma_intrin_group(
        load_scope="shared.dyn", store_scope="shared.dyn", in_dtype="float16", out_dtype=cfg.accum,
        trans_a=False, trans_b=True,
        not_use_mma_store_intrinic=cfg.accum == "float16",  # only the plain-store f16 intrinsic exists for shared.dyn
    )
    sch.tensorize(loop_a, intrins["load_a"])
    sch.tensorize(loop_b, intrins["load_b"])
    sch.tensorize(sch.get_loops(block_inner)[-3], intrins["compute"])
    sch.tensorize(sch.get_loops(init_inner)[-2], intrins["init"])
    sch.tensorize(loop_c, intrins["store"])

    # Step 5. epilogue (reindex, cast, bias, activation) fused into the coalesced shared -> global copy.
    auto_inline_consumer_chain(sch, store_shared)
    out_loops = sch.get_loops(store_shared)
    fused = sch.fuse(*out_loops[-2:])
    vec = 4 if out_dtype == "float32" else 8
    _, f_ty, f_tx, f_vec = sch.split(fused, factors=[None, num_warps, 32, vec])
    sch.bind(f_tx, "threadIdx.x")
    sch.bind(f_ty, "threadIdx.y")
    sch.vectorize(f_vec)

    # Step 6. software pipeline, as MetaSchedule's MultiLevelTilingTensorCore does for mma:
    # inner (k1): fragments of step k1+1 load while step k1 computes;
    # outer (k0): [A copy, B copy, inner prologue, inner body, inner epilogue], cp.async, 3 stages.
    if cfg.pipeline:
        sch.annotate(k1, "software_pipeline_stage", [0, 0, 1])
        sch.annotate(k1, "software_pipeline_order", [0, 1, 2])
        sch.annotate(k0, "software_pipeline_stage", [0, 0, 1, 2, 2])
        sch.annotate(k0, "software_pipeline_order", [0, 1, 3, 2, 4])
        sch.annotate(k0, "software_pipeline_async_stages", [0])
    return sch
