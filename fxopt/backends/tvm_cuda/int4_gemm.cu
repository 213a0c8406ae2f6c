// fxopt's weight-only int4 GEMM for few rows (decode): dequantize in registers, multiply, never write the weight.
//
//   fxopt.int4.linear(x, packed, scales, out)               out = x @ dequantize(packed, scales)^T
//   fxopt.int4.linear_zp(x, packed, scales, zeros, out)     with a zero point per group
// x [..., K] float16 with M = its rows, 1 to 16; packed uint8 [N, K / 2] in fxopt's int4 layout (column 2j in
// the low nibble of byte j, 2j + 1 in the high one, each nibble the code + 8: fxopt.ir.ops.INT4_OFFSET);
// scales float32 [N, K / G] and zeros int8 [N, K / G] for groups of G consecutive columns, G a multiple of 32;
// out float16 [..., N]. w[n, k] = (code - zero) * scale, as fxopt.dequantize_int4_grouped computes it.
//
// At M <= 16 the GEMM is memory-bound on the weight: int4 reads a quarter of fp16's bytes. A block of 8 warps
// stages x in shared memory (M * K * 2 bytes, at most 200 KiB) and each warp computes kRows output columns:
// every lane streams 4-byte words of packed codes (8 weights) for its rows, kUnroll words at once so enough
// loads are in flight, dequantizes them in registers and accumulates M dot products in fp32 (x's 8 values a
// 16-byte shared load, the warp's lanes on consecutive ones); a warp shuffle sums the lanes.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>

namespace fxopt_int4 {

using tvm::ffi::TensorView;

constexpr int kWarps = 8;
constexpr int kRows = 4;    // output columns (weight rows) a warp computes
constexpr int kUnroll = 4;  // 4-byte words (8 codes) a lane loads per row before it computes
// x is staged whole in shared memory: M rounded up to the kernel's rows, times K, in float16, at most this
constexpr int64_t kMaxSharedBytes = 200 * 1024;
constexpr int kMaxM = 16;
constexpr int kOffset = 8;  // a nibble is the code + 8

struct Int4Params {
  const half* x;
  const uint4* packed;  // [N, K / 2] bytes, read as 4-byte words of 8 codes
  const float* scales;  // [N, K / G]
  const int8_t* zeros;  // [N, K / G] or null
  half* out;
  int m, n, k, group;  // m <= kM of the kernel: rows from m on are zeros in shared memory and not written
};

// acc[m] += sum over the word's 8 columns (col .. col + 7) of w * x[m]; x[m]'s 8 values are one 16-byte
// shared-memory load, and the 32 lanes of a warp read 32 consecutive ones: no bank conflicts.
template <int kM>
__device__ __forceinline__ void Accumulate(uint32_t word, float scale, float zero, const half* x_smem, int k, int col,
                                           float (&acc)[kM]) {
  float w[8];
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    const uint32_t byte = (word >> (8 * b)) & 0xFFu;
    w[2 * b] = (static_cast<float>(byte & 0xFu) - kOffset - zero) * scale;
    w[2 * b + 1] = (static_cast<float>(byte >> 4) - kOffset - zero) * scale;
  }
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    const uint4 raw = *reinterpret_cast<const uint4*>(x_smem + static_cast<int64_t>(m) * k + col);
    const half2* xs = reinterpret_cast<const half2*>(&raw);
    float sum = acc[m];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 v = __half22float2(xs[j]);
      sum = fmaf(w[2 * j], v.x, fmaf(w[2 * j + 1], v.y, sum));
    }
    acc[m] = sum;
  }
}

template <int kM>
__global__ void __launch_bounds__(32 * kWarps) Int4Linear(Int4Params p) {
  extern __shared__ uint4 x_words[];
  const int words_x = p.m * p.k / 8;
  for (int i = threadIdx.x; i < kM * p.k / 8; i += blockDim.x) {
    x_words[i] = i < words_x ? reinterpret_cast<const uint4*>(p.x)[i] : make_uint4(0, 0, 0, 0);
  }
  __syncthreads();
  const half* x_smem = reinterpret_cast<const half*>(x_words);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int first_row = (blockIdx.x * kWarps + warp) * kRows;
  const int words = p.k / 8, groups = p.k / p.group;  // 4-byte words of 8 codes a row
  const uint32_t* packed = reinterpret_cast<const uint32_t*>(p.packed);
  float acc[kRows][kM];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[r][m] = 0.f;
  for (int base = lane; base < words; base += 32 * kUnroll) {
    uint32_t loaded[kRows][kUnroll];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int word = base + 32 * u, row = first_row + r;
        if (word < words && row < p.n) loaded[r][u] = packed[static_cast<int64_t>(row) * words + word];
      }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int word = base + 32 * u, row = first_row + r;
        if (word < words && row < p.n) {
          const int64_t g = static_cast<int64_t>(row) * groups + (word * 8) / p.group;
          const float zero = p.zeros != nullptr ? static_cast<float>(p.zeros[g]) : 0.f;
          Accumulate<kM>(loaded[r][u], p.scales[g], zero, x_smem, p.k, word * 8, acc[r]);
        }
      }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = first_row + r;
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0 && row < p.n && m < p.m) p.out[static_cast<int64_t>(m) * p.n + row] = __float2half_rn(v);
    }
  }
}

// ------------------------------------------------------------------------------------------ host
void Check(bool ok, const char* message) {
  if (!ok) TVM_FFI_THROW(ValueError) << "fxopt.int4.linear: " << message;
}

bool Is(const TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

void* DataPtr(const TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

template <int kM>
void Launch(const Int4Params& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kM) * p.k * sizeof(half);
  if (smem > 48 * 1024) {
    cudaFuncSetAttribute(Int4Linear<kM>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  }
  const int rows_per_block = kWarps * kRows;
  const unsigned blocks = static_cast<unsigned>((p.n + rows_per_block - 1) / rows_per_block);
  Int4Linear<kM><<<blocks, 32 * kWarps, smem, stream>>>(p);
}

// Kernels for 1, 2, 4, 8 and 16 rows; M rounds up to the next (its extra rows are zeros, never written).
void Dispatch(const Int4Params& p, cudaStream_t stream) {
  if (p.m == 1) return Launch<1>(p, stream);
  if (p.m == 2) return Launch<2>(p, stream);
  if (p.m <= 4) return Launch<4>(p, stream);
  if (p.m <= 8) return Launch<8>(p, stream);
  Launch<16>(p, stream);
}

void Int4LinearLaunch(const TensorView& x, const TensorView& packed, const TensorView& scales,
                      const TensorView* zeros, const TensorView& out) {
  TVM_FFI_CHECK(Is(x, kDLFloat, 16) && Is(out, kDLFloat, 16), TypeError)
      << "fxopt.int4.linear: x and out must be float16";
  TVM_FFI_CHECK(Is(packed, kDLUInt, 8) && Is(scales, kDLFloat, 32) && (!zeros || Is(*zeros, kDLInt, 8)), TypeError)
      << "fxopt.int4.linear: packed must be uint8, scales float32 and zeros int8";
  Check(x.ndim() >= 1 && packed.ndim() == 2 && scales.ndim() == 2, "x must be [..., K], packed [N, K/2], scales 2-D");
  const int64_t k = x.shape()[x.ndim() - 1], n = packed.shape()[0];
  Check(packed.shape()[1] * 2 == k, "packed must be [N, K/2] for x [..., K]");
  Check(k % 32 == 0, "K must be a multiple of 32");
  const int64_t groups = scales.shape()[1];
  Check(scales.shape()[0] == n && groups > 0 && k % groups == 0 && (k / groups) % 32 == 0,
        "scales must be [N, K/G] with the group size G a multiple of 32");
  Check(!zeros || (zeros->ndim() == 2 && zeros->shape()[0] == n && zeros->shape()[1] == groups),
        "zeros must be shaped like scales");
  const int64_t m = x.numel() / k;
  Check(m >= 1 && m <= kMaxM, "x must have 1 to 16 rows (larger M: dequantize and use a GEMM)");
  const int64_t rounded = m <= 2 ? m : (m <= 4 ? 4 : (m <= 8 ? 8 : 16));
  Check(rounded * k * 2 <= kMaxSharedBytes, "x must fit shared memory: M (rounded up to 1, 2, 4, 8 or 16) * K * 2 "
        "bytes at most 200 KiB (K = 14336: up to 4 rows)");
  Check(out.numel() == m * n, "out must have M * N elements");
  Check(x.IsContiguous() && packed.IsContiguous() && scales.IsContiguous() && out.IsContiguous() &&
            (!zeros || zeros->IsContiguous()),
        "tensors must be contiguous");
  Check(reinterpret_cast<uintptr_t>(DataPtr(x)) % 16 == 0 && reinterpret_cast<uintptr_t>(DataPtr(packed)) % 16 == 0,
        "x and packed must be 16-byte aligned");
  Check(x.device().device_type == kDLCUDA, "tensors must be on the GPU");
  Int4Params p{static_cast<const half*>(DataPtr(x)), static_cast<const uint4*>(DataPtr(packed)),
               static_cast<const float*>(DataPtr(scales)), zeros ? static_cast<const int8_t*>(DataPtr(*zeros)) : nullptr,
               static_cast<half*>(DataPtr(out)), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
               static_cast<int>(k / groups)};
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
