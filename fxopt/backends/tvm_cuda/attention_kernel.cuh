// The device side of fxopt's fused attention (attention.cu has the host side and the TVM-FFI functions).
//
// fxopt's fused attention for the TVM CUDA backend: softmax(Q K^T * scale + bias) V in one kernel.
//
// Relax calls it through R.call_dps_packed (offload.py rewrites R.nn.attention into it):
//   fxopt.attention(q, k, v, scale, causal, out)
//   fxopt.attention_bias(q, k, v, bias, scale, causal, out)
// q [B, L, N, D], k [B, S, N, D], v [B, S, N, Dv], out [B, L, N, Dv]: TVM's BSNH layout, float16,
// D and Dv multiples of 16 up to 256. bias is float16 or float32, [B|1, N|1, L|1, S] (broadcast
// dims of size 1), added to the scaled scores. causal: 0 none, 1 top-left (key j is masked for
// query i when j > i), 2 bottom-right (when j > i + S - L).
//
// FlashAttention-2's forward pass: one block of kWarps warps takes 16 * kWarps queries of one
// (batch, head), each warp 16 query rows. Keys and values stream through shared memory in tiles of
// kKeys, double-buffered with cp.async (the next tile loads while this one is computed). Q K^T and
// P V are raw mma.sync m16n8k16 (fp16 in, fp32 accumulation) on fragments read with ldmatrix; the
// score accumulators stay in registers, where their layout is already the A operand of P V, so a
// tile needs no shared-memory round trip and no block barrier besides the double buffer's. The
// softmax is the online form in base 2 (scale and bias prescaled by log2 e, ex2.approx), with each
// thread's row sums reduced across its quad only at the end, so S is unbounded.
// A fully masked row gives zeros (torch's SDPA math does the same).
//
// At BERT's sizes (S = 128: two tiles a block) the kernel is latency-bound, so what counts is the
// instructions a warp issues between loads: ldmatrix addresses are one per-lane base plus
// compile-time offsets, the copies are unrolled with stepped pointers, the masks run only on tiles
// that cross the end of the keys or the warp's causal diagonal, and the bias loads (two columns a
// load where aligned, once for both rows when it is broadcast over queries) are all issued before
// the tile's wait, with no branch between a load and its use (benchmarks/results/gpu_attention_kernel.md).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <atomic>
#include <cmath>
#include <cstdint>

namespace fxopt_attention {

using tvm::ffi::TensorView;

constexpr int kPad = 8;  // halves of padding per shared row: ldmatrix's 8 row addresses hit distinct banks
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const half* q;
  const half* k;
  const half* v;
  const void* bias;
  half* out;
  int64_t bias_stride[4];  // elements, 0 for broadcast dims
  int bias_pairs;      // columns contiguous, every row 2-element aligned and S even: read two columns at once
  int bias_same_rows;  // the bias is broadcast over queries
  int batch, heads, len_q, len_k, dim, dim_v;
  int q_blocks;  // ceil(len_q / rows per block)
  float scale_log2;  // scale * log2(e)
  int causal;
};

// ------------------------------------------------------------------------------------------- PTX
__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; src_bytes 0 writes zeros (rows past the end).
__device__ __forceinline__ void CopyAsync16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SharedAddress(dst)), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void CopyAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// address: a shared-window byte address (a per-thread base plus compile-time offsets, folded into the instruction)
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// c (16x8 fp32) += a (16x16 fp16, row) * b (16x8 fp16, col)
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t PackHalf2(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// kCount rows x cols halves of a BSNH tensor (row stride `stride`) into shared rows of kLd; zeros past `valid`.
// Thread x copies the 16-byte chunk x % (kDim / 8) of rows x / (kDim / 8), + kThreads / (kDim / 8), ...
template <int kDim, int kLd, int kThreads, int kCount>
__device__ __forceinline__ void LoadRows(half* dst, const half* src, int64_t stride, int valid, int cols) {
  constexpr int kChunks = kDim / 8, kStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kCount % kStep == 0, "rows must split evenly over the threads");
  const int r0 = threadIdx.x / kChunks, c = (threadIdx.x % kChunks) * 8;
  if (c >= cols) return;
  const half* from = src + r0 * stride + c;
  half* to = dst + r0 * kLd + c;
#pragma unroll
  for (int i = 0; i < kCount / kStep; ++i) {
    const bool ok = r0 + i * kStep < valid;
    CopyAsync16(to + i * kStep * kLd, ok ? from + i * kStep * stride : src, ok ? 16 : 0);
  }
}

template <int kBias>
__device__ __forceinline__ float BiasAt(const void* row, int at) {
  if constexpr (kBias == 1) return __half2float(static_cast<const half*>(row)[at]);
  return __ldg(static_cast<const float*>(row) + at);
}

// elements col and col + 1 of a bias row; the host checked that they are adjacent and 2-element aligned
template <int kBias>
__device__ __forceinline__ float2 BiasPair(const void* row, int col) {
  if constexpr (kBias == 1) return __half22float2(*reinterpret_cast<const __half2*>(static_cast<const half*>(row) + col));
  return __ldg(reinterpret_cast<const float2*>(static_cast<const float*>(row) + col));
}

// ---------------------------------------------------------------------------------------- kernel
// kDim: the head sizes D and Dv rounded up (32, 64, 128, 256); steps past the real ones are skipped.
// kBias: 0 none, 1 float16, 2 float32.
#ifndef FXOPT_ATTENTION_MIN_BLOCKS
#define FXOPT_ATTENTION_MIN_BLOCKS 4  // blocks per SM that head sizes up to 64 must fit: 128 registers (no spill on sm_90)
#endif

template <int kDim, int kKeys, int kWarps, int kBias>
__global__ void __launch_bounds__(kWarps * 32, kDim <= 64 ? FXOPT_ATTENTION_MIN_BLOCKS : 1) FlashKernel(Params p) {
  constexpr int kRows = kWarps * 16, kThreads = kWarps * 32, kLd = kDim + kPad;
  constexpr int kKeyBlocks = kKeys / 8;  // n-blocks of 8 keys in a tile
  constexpr int kDimBlocks = kDim / 8;   // n-blocks of 8 output columns
  extern __shared__ __align__(16) unsigned char smem[];
  half* qs = reinterpret_cast<half*>(smem);  // kRows x kLd
  half* ks = qs + kRows * kLd;               // 2 x kKeys x kLd
  half* vs = ks + 2 * kKeys * kLd;           // 2 x kKeys x kLd

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int bh = blockIdx.x / p.q_blocks, b = bh / p.heads, n = bh % p.heads;
  const int q0 = (blockIdx.x % p.q_blocks) * kRows;
  const int D = p.dim, Dv = p.dim_v, L = p.len_q, S = p.len_k;
  const int64_t qk_stride = static_cast<int64_t>(p.heads) * D, v_stride = static_cast<int64_t>(p.heads) * Dv;
  const half* q_src = p.q + (static_cast<int64_t>(b) * L * p.heads + n) * D;
  const half* k_src = p.k + (static_cast<int64_t>(b) * S * p.heads + n) * D;
  const half* v_src = p.v + (static_cast<int64_t>(b) * S * p.heads + n) * Dv;

  // the last key any query of this block may see
  int key_end = S;
  if (p.causal == 1) key_end = min(S, q0 + kRows);
  if (p.causal == 2) key_end = min(S, q0 + kRows + S - L);
  const int tiles = key_end > 0 ? (key_end + kKeys - 1) / kKeys : 0;

  LoadRows<kDim, kLd, kThreads, kRows>(qs, q_src + q0 * qk_stride, qk_stride, min(kRows, L - q0), D);
  if (tiles > 0) {
    LoadRows<kDim, kLd, kThreads, kKeys>(ks, k_src, qk_stride, min(kKeys, S), D);
    LoadRows<kDim, kLd, kThreads, kKeys>(vs, v_src, v_stride, min(kKeys, S), Dv);
  }
  CopyAsyncCommit();

  // ldmatrix row addresses of this lane: Q as the A operand, K as the B operand of Q K^T, V (transposed) of P V
  const uint32_t q_frag = SharedAddress(qs + (warp * 16 + lane % 16) * kLd + (lane / 16) * 8);
  const uint32_t k_frag = SharedAddress(ks + ((lane / 16) * 8 + lane % 8) * kLd + ((lane / 8) % 2) * 8);
  const uint32_t v_frag = SharedAddress(vs + (((lane / 8) % 2) * 8 + lane % 8) * kLd + (lane / 16) * 8);

  // this thread's two query rows: g and g + 8 of the warp's 16
  const int row[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  const int diagonal = p.causal == 2 ? S - L : 0;  // key j is masked for row i when j > i + diagonal
  const void* bias_row[2] = {nullptr, nullptr};
  int bias_col_stride = 0;
  if constexpr (kBias != 0) {
    bias_col_stride = static_cast<int>(p.bias_stride[3]);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t at = b * p.bias_stride[0] + n * p.bias_stride[1] + min(row[i], L - 1) * p.bias_stride[2];
      bias_row[i] = kBias == 1 ? static_cast<const void*>(static_cast<const half*>(p.bias) + at)
                               : static_cast<const void*>(static_cast<const float*>(p.bias) + at);
    }
  }

  float o[kDimBlocks][4];
#pragma unroll
  for (int j = 0; j < kDimBlocks; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int tile = 0; tile < tiles; ++tile) {
    const int k0 = tile * kKeys;
    const uint32_t buffer = (tile & 1) * kKeys * kLd * sizeof(half);
    if (tile + 1 < tiles) {  // the other buffer was released by the barrier closing the previous tile
      const int next = k0 + kKeys;
      half* kn = ks + ((tile + 1) & 1) * kKeys * kLd;
      half* vn = vs + ((tile + 1) & 1) * kKeys * kLd;
      LoadRows<kDim, kLd, kThreads, kKeys>(kn, k_src + next * qk_stride, qk_stride, min(kKeys, S - next), D);
      LoadRows<kDim, kLd, kThreads, kKeys>(vn, v_src + next * v_stride, v_stride, min(kKeys, S - next), Dv);
      CopyAsyncCommit();
    }

    // the bias of this thread's scores, raw, read before waiting so that the loads all fly behind the copies
    // (no branch between a load and its use; columns past S are clamped in bounds, and masked below)
    float bias[kKeyBlocks][4];
    if constexpr (kBias != 0) {
      if (p.bias_pairs) {  // two columns a load; rows g and g + 8 share it when the bias ignores queries
        if (p.bias_same_rows) {
#pragma unroll
          for (int j = 0; j < kKeyBlocks; ++j) {
            const float2 x = BiasPair<kBias>(bias_row[0], min(k0 + j * 8 + t * 2, S - 2));
            bias[j][0] = bias[j][2] = x.x, bias[j][1] = bias[j][3] = x.y;
          }
        } else {
#pragma unroll
          for (int j = 0; j < kKeyBlocks; ++j) {
            const int col = min(k0 + j * 8 + t * 2, S - 2);
            const float2 x = BiasPair<kBias>(bias_row[0], col), y = BiasPair<kBias>(bias_row[1], col);
            bias[j][0] = x.x, bias[j][1] = x.y, bias[j][2] = y.x, bias[j][3] = y.y;
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < kKeyBlocks; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            bias[j][e] = BiasAt<kBias>(bias_row[e / 2], min(k0 + j * 8 + t * 2 + (e & 1), S - 1) * bias_col_stride);
          }
        }
      }
    }

    if (tile + 1 < tiles) {
      CopyAsyncWait<1>();
    } else {
      CopyAsyncWait<0>();
    }
    __syncthreads();

    // scores = Q K^T: this warp's 16 rows x the tile's kKeys keys, in registers
    float s[kKeyBlocks][4];
#pragma unroll
    for (int j = 0; j < kKeyBlocks; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {
      if (kk * 16 < D) {
        uint32_t a[4];
        LdMatrixX4(a, q_frag + kk * 16 * sizeof(half));
#pragma unroll
        for (int j = 0; j < kKeys / 16; ++j) {
          uint32_t bk[4];
          LdMatrixX4(bk, k_frag + buffer + (j * 16 * kLd + kk * 16) * sizeof(half));
          Mma(s[2 * j], a, bk[0], bk[1]);
          Mma(s[2 * j + 1], a, bk[2], bk[3]);
        }
      }
    }

    // scale and bias, in log2 units; the masks only on tiles that cross the end of the keys or this warp's diagonal
#pragma unroll
    for (int j = 0; j < kKeyBlocks; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] *= p.scale_log2;
        if constexpr (kBias != 0) s[j][e] = fmaf(bias[j][e], kLog2e, s[j][e]);
      }
    }
    if (k0 + kKeys > S || (p.causal != 0 && k0 + kKeys - 1 > q0 + warp * 16 + diagonal)) {
#pragma unroll
      for (int j = 0; j < kKeyBlocks; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = k0 + j * 8 + t * 2 + (e & 1);
          if (col >= S || (p.causal != 0 && col > row[e / 2] + diagonal)) s[j][e] = -INFINITY;
        }
      }
    }
    float tile_max[2] = {row_max[0], row_max[1]};
#pragma unroll
    for (int j = 0; j < kKeyBlocks; ++j) {
      tile_max[0] = fmaxf(tile_max[0], fmaxf(s[j][0], s[j][1]));
      tile_max[1] = fmaxf(tile_max[1], fmaxf(s[j][2], s[j][3]));
    }
    float base[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 1));
      tile_max[i] = fmaxf(tile_max[i], __shfl_xor_sync(0xffffffff, tile_max[i], 2));
      base[i] = tile_max[i] == -INFINITY ? 0.f : tile_max[i];  // a row masked so far keeps zeros
      const float factor = Exp2(row_max[i] - base[i]);
      row_max[i] = tile_max[i];
      row_sum[i] *= factor;
#pragma unroll
      for (int j = 0; j < kDimBlocks; ++j) o[j][2 * i] *= factor, o[j][2 * i + 1] *= factor;
    }

    // P = exp2(s - max) goes straight into the A fragments of P V
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      uint32_t a[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float* sj = s[2 * kk + h];
        const float p0 = Exp2(sj[0] - base[0]), p1 = Exp2(sj[1] - base[0]);
        const float p2 = Exp2(sj[2] - base[1]), p3 = Exp2(sj[3] - base[1]);
        row_sum[0] += p0 + p1;
        row_sum[1] += p2 + p3;
        a[2 * h] = PackHalf2(p0, p1);
        a[2 * h + 1] = PackHalf2(p2, p3);
      }
#pragma unroll
      for (int nv = 0; nv < kDim / 16; ++nv) {
        if (nv * 16 < Dv) {
          uint32_t bv[4];
          LdMatrixX4Trans(bv, v_frag + buffer + (kk * 16 * kLd + nv * 16) * sizeof(half));
          Mma(o[2 * nv], a, bv[0], bv[1]);
          Mma(o[2 * nv + 1], a, bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this tile's buffers
  }
  CopyAsyncWait<0>();  // with no tiles, Q may still be landing in the rows written below

  // normalize, stage the warp's 16 x Dv outputs in its own Q rows (only this warp read them), store 16 bytes a lane
  half* staged = qs + warp * 16 * kLd;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] += __shfl_xor_sync(0xffffffff, row_sum[i], 1);
    row_sum[i] += __shfl_xor_sync(0xffffffff, row_sum[i], 2);
    const float inverse = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
#pragma unroll
    for (int j = 0; j < kDimBlocks; ++j) {
      if (j * 8 < Dv) {
        *reinterpret_cast<uint32_t*>(staged + (g + 8 * i) * kLd + j * 8 + t * 2) =
            PackHalf2(o[j][2 * i] * inverse, o[j][2 * i + 1] * inverse);
      }
    }
  }
  __syncwarp();
  half* out = p.out + ((static_cast<int64_t>(b) * L + q0 + warp * 16) * p.heads + n) * Dv;
  for (int idx = lane; idx < 16 * kDimBlocks; idx += 32) {
    const int r = idx / kDimBlocks, c = (idx % kDimBlocks) * 8;
    if (c < Dv && q0 + warp * 16 + r < L) {
      *reinterpret_cast<uint4*>(out + r * v_stride + c) = *reinterpret_cast<const uint4*>(staged + r * kLd + c);
    }
  }
}

}  // namespace fxopt_attention
