// fxopt's weight-only int4 GEMM: tensor-core MMAs on weights dequantized in registers (made for few rows: decode).
//
//   fxopt.int4.linear(x, packed, scales, out)               out = x @ dequantize(packed, scales)^T
//   fxopt.int4.linear_zp(x, packed, scales, zeros, out)     with a zero point per group
// x [..., K] float16 with M = its rows (64 per block); packed uint8 [N / 16, K / 64, 32, 16] in the MMA layout
// below (fxopt.backends.tvm_cuda.int4_layout makes it from fxopt's [N, K / 2] layout); scales float32 [N, K / G] and
// zeros int8 [N, K / G] for groups of G consecutive columns, G a multiple of 16; out float16 [..., N].
// w[n, k] = (nibble - 8 - zero) * scale, as fxopt.dequantize_int4_grouped computes it.
//
// The MMA is mma.sync m16n8k16 with the weight as A (16 weight rows by 16 columns of K) and x as B (16 columns
// of K by 8 rows of x), so one MMA serves up to 8 rows of x and the GEMM stays bound by the weight's bytes. The
// layout gives each lane exactly its A fragment: for a 16 x 16 tile, lane 4g + t holds rows g and g + 8 at
// columns 2t, 2t + 1, 2t + 8 and 2t + 9, in one 4-byte word whose nibble pair p (bits 4p and 16 + 4p) is A
// register p; a lane's 16 bytes are 4 consecutive tiles along K (64 columns), and the 32 lanes' 512 bytes are
// contiguous. A nibble pair becomes a half2 exactly: OR it into the exponent of 1024 and subtract 1032 + zero.
// The MMAs sum the steps of one group (up to 64 columns) in fp32, and that sum is multiplied by the group's
// scale once, so the result is exact on small integers.
//
// A block computes 16 weight rows; its 8 warps take interleaved 64-column chunks of K (kUnroll 16-byte loads
// in flight per lane) and sum their partial results through shared memory.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>
#include "tensor_view.h"

namespace fxopt_int4 {

using fxopt_tensor::DataPtr;

using tvm::ffi::TensorView;

constexpr int kWarps = 8;
constexpr int kChunk = 64;     // columns of K in a lane's 16 bytes
constexpr int kTileRows = 16;  // weight rows of a block (the MMA's M)
constexpr int kMaxM = 64;      // rows of x per block: 8 MMA tiles of 8
constexpr uint32_t kMagic = 0x64006400u;  // half2(1024, 1024)
constexpr float kBias = 1024.f + 8.f;     // 1024 from the magic, 8 the nibble's offset

struct Int4Params {
  const half* x;
  const uint4* packed;  // [N / 16, K / 64, 32 lanes] 16-byte words
  const float* scales;  // [N, K / G]
  const int8_t* zeros;  // [N, K / G] or null
  half* out;
  int m, n, k, group;
  int groups;  // K / group
};

// A register `pair` of a lane's word: the two nibbles at bits 4 * pair and 16 + 4 * pair, minus `bias` (half2).
__device__ __forceinline__ uint32_t Dequantize(uint32_t word, int pair, half2 bias) {
  uint32_t raw = ((word >> (4 * pair)) & 0x000F000Fu) | kMagic;
  half2 value = __hsub2(*reinterpret_cast<half2*>(&raw), bias);
  return *reinterpret_cast<uint32_t*>(&value);
}

// d += a * b: one m16n8k16 MMA, fp32 accumulators.
__device__ __forceinline__ void Mma(const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (&d)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x's B fragment for MMA tile `tile` at column `col`: row 8 * tile + g, columns col + 2t (+ 1) and + 8 (+ 9).
__device__ __forceinline__ void LoadX(const Int4Params& p, int tile, int col, int g, int t, uint32_t& b0,
                                      uint32_t& b1) {
  const int row = 8 * tile + g;
  b0 = b1 = 0u;
  if (row < p.m) {
    const uint32_t* x = reinterpret_cast<const uint32_t*>(p.x + static_cast<int64_t>(row) * p.k + col + 2 * t);
    b0 = __ldg(x);
    b1 = __ldg(x + 4);
  }
}

// kSteps consecutive 16-column steps of one group (words[first], ...): the MMAs sum the dequantized codes times x
// in fp32, and the sum is added to acc once, times the group's scale (rows g and g + 8 have their own).
template <int kTiles, int kSteps>
__device__ __forceinline__ void ScaledSteps(const Int4Params& p, const uint32_t (&words)[4], int first, int col,
                                            int row0, int g, int t, float (&acc)[kTiles][4]) {
  const int64_t group0 = static_cast<int64_t>(row0) * p.groups + col / p.group;
  const int64_t group1 = group0 + 8 * p.groups;
  const float zero0 = p.zeros ? static_cast<float>(p.zeros[group0]) : 0.f;
  const float zero1 = p.zeros ? static_cast<float>(p.zeros[group1]) : 0.f;
  const half2 bias0 = __float2half2_rn(kBias + zero0), bias1 = __float2half2_rn(kBias + zero1);
  float sum[kTiles][4] = {};
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const uint32_t word = words[first + s];
    const uint32_t a[4] = {Dequantize(word, 0, bias0), Dequantize(word, 1, bias1), Dequantize(word, 2, bias0),
                           Dequantize(word, 3, bias1)};
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile) {
      uint32_t b0, b1;
      LoadX(p, tile, col + 16 * s, g, t, b0, b1);
      Mma(a, b0, b1, sum[tile]);
    }
  }
  const float scale0 = __ldg(p.scales + group0), scale1 = __ldg(p.scales + group1);
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile) {
    acc[tile][0] = fmaf(scale0, sum[tile][0], acc[tile][0]);
    acc[tile][1] = fmaf(scale0, sum[tile][1], acc[tile][1]);
    acc[tile][2] = fmaf(scale1, sum[tile][2], acc[tile][2]);
    acc[tile][3] = fmaf(scale1, sum[tile][3], acc[tile][3]);
  }
}

// A lane's 64-column chunk (4 steps): one scale per group of kGroupSteps steps (16, 32 or >= 64 columns).
template <int kTiles, int kGroupSteps>
__device__ __forceinline__ void Chunk(const Int4Params& p, const uint4& packed, int col, int row0, int g, int t,
                                      float (&acc)[kTiles][4]) {
  const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
  for (int first = 0; first < 4; first += kGroupSteps)
    ScaledSteps<kTiles, kGroupSteps>(p, words, first, col + 16 * first, row0, g, t, acc);
}

// The warps' partial sums through shared memory; lane 4g + t of the result writes rows g, g + 8 of the block
// (output columns) for x rows 8 * tile + 2t and + 1.
template <int kTiles>
__device__ __forceinline__ void SumAndStore(const Int4Params& p, float (&acc)[kTiles][4], int warp, int lane) {
  __shared__ float partial[kWarps][kTiles][4][32];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][tile][i][lane] = acc[tile][i];
  __syncthreads();
  for (int slot = threadIdx.x; slot < kTiles * 4 * 32; slot += blockDim.x) {
    const int tile = slot / 128, i = (slot / 32) % 4, l = slot % 32;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][tile][i][l];
    const int row = 8 * tile + 2 * (l % 4) + (i & 1), col = blockIdx.x * kTileRows + l / 4 + 8 * (i >> 1);
    if (row < p.m) p.out[static_cast<int64_t>(row) * p.n + col] = __float2half_rn(sum);
  }
}

// The up to 64 rows of x (and of out) that block row blockIdx.y computes.
__device__ __forceinline__ Int4Params RowsOfBlock(Int4Params p) {
  const int first = blockIdx.y * kMaxM;
  p.x += static_cast<int64_t>(first) * p.k;
  p.out += static_cast<int64_t>(first) * p.n;
  p.m = min(kMaxM, p.m - first);
  return p;
}

// kUnroll: 16-byte weight loads a lane has in flight (fewer for 8 tiles of x, whose accumulators need registers)
template <int kTiles, int kGroupSteps, int kUnroll = (kTiles >= 8 ? 2 : 4)>
__global__ void __launch_bounds__(32 * kWarps, 2) Int4Linear(Int4Params all_rows) {
  const Int4Params p = RowsOfBlock(all_rows);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int chunks = p.k / kChunk, row0 = blockIdx.x * kTileRows + g;
  const uint4* packed = p.packed + static_cast<int64_t>(blockIdx.x) * chunks * 32 + lane;
  float acc[kTiles][4];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[tile][i] = 0.f;
  for (int first = warp; first < chunks; first += kWarps * kUnroll) {
    uint4 words[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int chunk = first + u * kWarps;
      if (chunk < chunks) words[u] = __ldcs(packed + static_cast<int64_t>(chunk) * 32);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int chunk = first + u * kWarps;
      if (chunk >= chunks) break;
      Chunk<kTiles, kGroupSteps>(p, words[u], chunk * kChunk, row0, g, t, acc);
    }
  }
  SumAndStore<kTiles>(p, acc, warp, lane);
}

// ------------------------------------------------------------------------------------------ host
void Check(bool ok, const char* message) {
  if (!ok) TVM_FFI_THROW(ValueError) << "fxopt.int4.linear: " << message;
}

bool Is(const TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

// The kernel for kTiles tiles of 8 rows of x, and the steps that share a scale: 4 when a group spans whole 64-column
// chunks, 2 when it spans 32-column halves, else 1.
template <int kTiles>
void Launch(const Int4Params& p, cudaStream_t stream) {
  const dim3 blocks(static_cast<unsigned>(p.n / kTileRows), static_cast<unsigned>((p.m + kMaxM - 1) / kMaxM));
  if (p.group % 64 == 0) return Int4Linear<kTiles, 4><<<blocks, 32 * kWarps, 0, stream>>>(p);
  if (p.group % 32 == 0) return Int4Linear<kTiles, 2><<<blocks, 32 * kWarps, 0, stream>>>(p);
  Int4Linear<kTiles, 1><<<blocks, 32 * kWarps, 0, stream>>>(p);
}

// Kernels for 1, 2, 4 and 8 tiles of 8 rows of x; M rounds up (the extra rows read as zeros, never written).
// More than 64 rows: a grid row of blocks per 64 rows of x, each dequantizing the weight again (from L2).
void Dispatch(const Int4Params& p, cudaStream_t stream) {
  if (p.m <= 8) return Launch<1>(p, stream);
  if (p.m <= 16) return Launch<2>(p, stream);
  if (p.m <= 32) return Launch<4>(p, stream);
  Launch<8>(p, stream);
}

void CheckShapes(const TensorView& x, const TensorView& packed, const TensorView& scales, const TensorView* zeros,
                 const TensorView& out) {
  Check(x.ndim() >= 1 && scales.ndim() == 2, "x must be [..., K] and scales [N, K/G]");
  Check(packed.ndim() == 4 && packed.shape()[2] == 32 && packed.shape()[3] == 16,
        "packed must be [N/16, K/64, 32, 16] (the MMA layout: fxopt.backends.tvm_cuda.int4_layout.mma_layout)");
  const int64_t k = x.shape()[x.ndim() - 1], n = packed.shape()[0] * kTileRows;
  Check(k % kChunk == 0 && packed.shape()[1] * kChunk == k, "K must be a multiple of 64, and packed [N/16, K/64, "
        "32, 16] for x [..., K]");
  const int64_t groups = scales.shape()[1];
  Check(scales.shape()[0] == n && groups > 0 && k % groups == 0 && (k / groups) % 16 == 0,
        "scales must be [N, K/G] with the group size G a multiple of 16");
  Check(!zeros || (zeros->ndim() == 2 && zeros->shape()[0] == n && zeros->shape()[1] == groups),
        "zeros must be shaped like scales");
  const int64_t m = x.numel() / k;
  Check(m >= 1 && m <= 65535LL * kMaxM, "x must have 1 to 4,194,240 rows");
  Check(out.numel() == m * n, "out must have M * N elements");
}

void Int4LinearLaunch(const TensorView& x, const TensorView& packed, const TensorView& scales,
                      const TensorView* zeros, const TensorView& out) {
  TVM_FFI_CHECK(Is(x, kDLFloat, 16) && Is(out, kDLFloat, 16), TypeError)
      << "fxopt.int4.linear: x and out must be float16";
  TVM_FFI_CHECK(Is(packed, kDLUInt, 8) && Is(scales, kDLFloat, 32) && (!zeros || Is(*zeros, kDLInt, 8)), TypeError)
      << "fxopt.int4.linear: packed must be uint8, scales float32 and zeros int8";
  CheckShapes(x, packed, scales, zeros, out);
  Check(x.IsContiguous() && packed.IsContiguous() && scales.IsContiguous() && out.IsContiguous() &&
            (!zeros || zeros->IsContiguous()),
        "tensors must be contiguous");
  Check(reinterpret_cast<uintptr_t>(DataPtr(x)) % 4 == 0 && reinterpret_cast<uintptr_t>(DataPtr(packed)) % 16 == 0,
        "x must be 4-byte and packed 16-byte aligned");
  Check(x.device().device_type == kDLCUDA, "tensors must be on the GPU");
  const int64_t k = x.shape()[x.ndim() - 1];
  Int4Params p{static_cast<const half*>(DataPtr(x)), static_cast<const uint4*>(DataPtr(packed)),
               static_cast<const float*>(DataPtr(scales)), zeros ? static_cast<const int8_t*>(DataPtr(*zeros)) : nullptr,
               static_cast<half*>(DataPtr(out)), static_cast<int>(x.numel() / k),
               static_cast<int>(packed.shape()[0] * kTileRows), static_cast<int>(k),
               static_cast<int>(k / scales.shape()[1]), static_cast<int>(scales.shape()[1])};
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, x.device().device_id));
  Dispatch(p, stream);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "fxopt.int4.linear: launch failed: " << cudaGetErrorString(status);
  }
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("fxopt.int4.linear", [](TensorView x, TensorView packed, TensorView scales,
                                   TensorView out) { Int4LinearLaunch(x, packed, scales, nullptr, out); })
      .def("fxopt.int4.linear_zp", [](TensorView x, TensorView packed, TensorView scales, TensorView zeros,
                                      TensorView out) { Int4LinearLaunch(x, packed, scales, &zeros, out); });
}

}  // namespace fxopt_int4
