// fxopt's residual + LayerNorm and GELU kernels for the TVM CUDA backend.
//
// Relax calls them through R.call_dps_packed (offload.py rewrites what ToMixedPrecision leaves in fp32
// between casts into them):
//   fxopt.layer_norm(x, gamma, beta, eps, out)                         out = LN(x)
//   fxopt.add_layer_norm(x, residual, gamma, beta, eps, out)           out = LN(x + residual)
//   fxopt.add_layer_norm_sum(x, residual, gamma, beta, eps, out, sum)  the same, and sum = x + residual
//   fxopt.gelu(x, out), fxopt.gelu_tanh(x, out)                        erf and tanh GELU
//   fxopt.[add_]layer_norm[_sum]_quantized(..., out[, sum], codes, scales)
//       the LayerNorms above that also quantize their float16 output per row for an fp8 or int8 GEMM: codes
//       float8_e4m3fn or int8 and a float32 scale per row, bitwise what fxopt.{fp8,int8}.quantize_rows give on
//       `out` (quantize_codes.cuh), without reading `out` back
// LayerNorm normalizes over the last dimension H of `out` (gamma and beta are [H]); x, residual, out and
// sum are any shape with rows * H elements, contiguous. Each of them, and gamma and beta, may be float16
// or float32 (one runtime flag each: the branch is uniform over the grid). The math is fp32: the row is
// held in registers (8 elements a 16-byte load for float16, two for float32), the mean and then the
// variance of the deviations (two passes over registers, no cancellation) are reduced with warp shuffles,
// one warp a row up to H = 1024 (4 rows a block of 128 threads), one block of 4 or 8 warps a row up to
// H = 8192. All of a row's loads (gamma and beta too) are issued before the first is used: one memory round
// trip a row. H must be a multiple of 8 and every pointer 16-byte aligned (TVM's allocations are).
// The sum output is rounded from the fp32 sum the statistics use (pre-LN models read it again: GPT-2,
// ViT). GELU is torch's formula in fp32 (erff / tanhf, not the fast approximations), float16 in and out,
// 8 elements a thread per 16-byte load.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <algorithm>
#include <cstdint>

#include "quantize_codes.cuh"
#include "tensor_view.h"

namespace fxopt_norm_act {

using fxopt_tensor::DataPtr;
using fxopt_tensor::Aligned16;

using tvm::ffi::TensorView;

struct NormParams {
  const void* x;
  const void* residual;  // null: plain LayerNorm
  const void* gamma;
  const void* beta;
  void* out;
  void* sum;  // null: not written
  void* codes;     // null: not written; else a row's codes of `out` as stored (float16), and its scale
  float* scales;
  bool int8_codes;  // codes int8, else float8_e4m3fn
  int64_t rows;
  int hidden;
  float eps;
  bool x_half, residual_half, gamma_half, beta_half, out_half, sum_half;
};

// ------------------------------------------------------------------------------------ 8-wide access
// Loads only issue (raw bits into registers); Convert8 is the first use. A row's loads, gamma's and beta's
// included, are all issued before any of them is waited for: the dtype branches between them are uniform
// and a branch does not wait for an outstanding load, a use does.
__device__ __forceinline__ void Load8(const void* base, int64_t index, bool is_half, uint4 raw[2]) {
  if (is_half) {
    raw[0] = __ldg(reinterpret_cast<const uint4*>(static_cast<const half*>(base) + index));
  } else {
    const uint4* p = reinterpret_cast<const uint4*>(static_cast<const float*>(base) + index);
    raw[0] = __ldg(p);
    raw[1] = __ldg(p + 1);
  }
}

__device__ __forceinline__ void Convert8(const uint4 raw[2], bool is_half, float v[8]) {
  if (is_half) {
    const half2* h = reinterpret_cast<const half2*>(&raw[0]);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  } else {
    const float* f = reinterpret_cast<const float*>(raw);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = f[k];
  }
}

__device__ __forceinline__ void Store8(void* base, int64_t index, bool is_half, const float v[8]) {
  if (is_half) {
    uint4 raw;
    half2* h = reinterpret_cast<half2*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(static_cast<half*>(base) + index) = raw;
  } else {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + index);
    p[0] = make_float4(v[0], v[1], v[2], v[3]);
    p[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

struct Plus {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// `op` over the threads of a row: a warp's shuffle, then (kWarps > 1) the warps' partials in shared memory.
template <int kWarps, typename Op>
__device__ __forceinline__ float RowReduce(float value, float* partial, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  if constexpr (kWarps == 1) {
    return value;
  } else {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partial[warp] = value;
    __syncthreads();
    float total = partial[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total = op(total, partial[w]);
    return total;
  }
}

// A row's codes and scale from its values as stored in float16 (v holds them, rounded): 8 codes a chunk.
template <typename Codes, int kChunks, int kWarps>
__device__ __forceinline__ void StoreCodes(const NormParams& p, const float (&v)[kChunks][8], int64_t row,
                                           int lane, float* partial) {
  constexpr int kRowThreads = 32 * kWarps;
  const int chunks = p.hidden / 8;
  float amax = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
    if (c * kRowThreads + lane < chunks)
#pragma unroll
      for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(v[c][k]));
  const float scale = fxopt_codes::RowScale<Codes>(RowReduce<kWarps>(amax, partial, Max{}));
  auto* codes = static_cast<typename Codes::Code*>(p.codes) + row * p.hidden;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int chunk = c * kRowThreads + lane;
    if (chunk < chunks) {
      typename Codes::Code packed[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) packed[k] = Codes::Encode(v[c][k] / scale);
      *reinterpret_cast<uint2*>(codes + chunk * 8) = *reinterpret_cast<const uint2*>(packed);
    }
  }
  if (lane == 0) p.scales[row] = scale;
}

// kWarps == 1: a warp per row, kRowsPerBlock rows a block. kWarps > 1: a block of kWarps warps per row.
// kChunks: 8-element chunks a thread holds; the row's chunk c * threads + lane, if below H / 8.
template <int kChunks, int kWarps>
__global__ void __launch_bounds__(kWarps == 1 ? 128 : 32 * kWarps) LayerNormKernel(NormParams p) {
  constexpr int kRowThreads = 32 * kWarps;
  __shared__ float partial[3][kWarps];
  const int lane = kWarps == 1 ? threadIdx.x % 32 : threadIdx.x;
  const int64_t row = kWarps == 1 ? static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32
                                  : static_cast<int64_t>(blockIdx.x);
  if (row >= p.rows) return;  // a whole warp (kWarps == 1) or block: no barrier is left waiting
  const int chunks = p.hidden / 8;
  const int64_t base = row * p.hidden;
  // every load first (x, residual, gamma, beta), then the math
  uint4 xs[kChunks][2], rs[kChunks][2], gs[kChunks][2], bs[kChunks][2];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int chunk = c * kRowThreads + lane;
    if (chunk < chunks) {
      Load8(p.x, base + chunk * 8, p.x_half, xs[c]);
      if (p.residual != nullptr) Load8(p.residual, base + chunk * 8, p.residual_half, rs[c]);
      Load8(p.gamma, chunk * 8, p.gamma_half, gs[c]);
      Load8(p.beta, chunk * 8, p.beta_half, bs[c]);
    }
  }
  float v[kChunks][8];
  float sum = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int chunk = c * kRowThreads + lane;
    if (chunk < chunks) {
      Convert8(xs[c], p.x_half, v[c]);
      if (p.residual != nullptr) {
        float r[8];
        Convert8(rs[c], p.residual_half, r);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[c][k] += r[k];
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) sum += v[c][k];
    }
  }
  const float inv_hidden = 1.f / static_cast<float>(p.hidden);
  const float mean = RowReduce<kWarps>(sum, partial[0], Plus{}) * inv_hidden;
  float squares = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (c * kRowThreads + lane < chunks) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float d = v[c][k] - mean;
        squares += d * d;
      }
    }
  }
  if (p.sum != nullptr) {  // stored while the shuffles run
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int chunk = c * kRowThreads + lane;
      if (chunk < chunks) Store8(p.sum, base + chunk * 8, p.sum_half, v[c]);
    }
  }
  const float rstd = rsqrtf(RowReduce<kWarps>(squares, partial[1], Plus{}) * inv_hidden + p.eps);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int chunk = c * kRowThreads + lane;
    if (chunk < chunks) {
      float g[8], b[8];
      Convert8(gs[c], p.gamma_half, g);
      Convert8(bs[c], p.beta_half, b);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[c][k] = (v[c][k] - mean) * rstd * g[k] + b[k];
      Store8(p.out, base + chunk * 8, p.out_half, v[c]);
      if (p.codes != nullptr) {  // the codes quantize `out` as stored: float16 (the host requires it)
#pragma unroll
        for (int k = 0; k < 8; ++k) v[c][k] = __half2float(__float2half_rn(v[c][k]));
      }
    }
  }
  if (p.codes == nullptr) return;
  if (p.int8_codes) {
    StoreCodes<fxopt_codes::Int8, kChunks, kWarps>(p, v, row, lane, partial[2]);
  } else {
    StoreCodes<fxopt_codes::E4m3, kChunks, kWarps>(p, v, row, lane, partial[2]);
  }
}

// ------------------------------------------------------------------------------------------- GELU
constexpr int kGeluErf = 0;
constexpr int kGeluTanh = 1;

template <int kMode>
__device__ __forceinline__ float Gelu(float x) {
  if constexpr (kMode == kGeluErf) {
    return x * 0.5f * (1.f + erff(x * 0.70710678118654752440f));  // torch: x * 0.5 * (1 + erf(x / sqrt 2))
  } else {
    const float inner = 0.79788456080286535588f * (x + 0.044715f * x * x * x);  // sqrt(2 / pi)
    return 0.5f * x * (1.f + tanhf(inner));
  }
}

template <int kMode>
__global__ void __launch_bounds__(256) GeluKernel(const half* __restrict__ x, half* __restrict__ out,
                                                  int64_t n) {
  const int64_t vectors = n / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t i = first; i < vectors; i += stride) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(x) + i);
    const half2* h = reinterpret_cast<const half2*>(&raw);
    uint4 result;
    half2* r = reinterpret_cast<half2*>(&result);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __half22float2(h[k]);
      r[k] = __floats2half2_rn(Gelu<kMode>(f.x), Gelu<kMode>(f.y));
    }
    reinterpret_cast<uint4*>(out)[i] = result;
  }
  for (int64_t i = vectors * 8 + first; i < n; i += stride) out[i] = __float2half_rn(Gelu<kMode>(__half2float(x[i])));
}

// Unaligned pointers: one element a thread.
template <int kMode>
__global__ void __launch_bounds__(256) GeluScalarKernel(const half* __restrict__ x, half* __restrict__ out,
                                                        int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = __float2half_rn(Gelu<kMode>(__half2float(x[i])));
  }
}

// ------------------------------------------------------------------------------------------ host
void Check(bool ok, const char* function, const char* message) {
  if (!ok) TVM_FFI_THROW(ValueError) << function << ": " << message;
}

void CheckCuda(cudaError_t status, const char* function) {
  if (status != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << function << ": launch failed: " << cudaGetErrorString(status);
  }
}

// float16 -> true, float32 -> false; anything else is refused.
bool HalfOrFloat(const TensorView& t, const char* function, const char* name) {
  const bool is_half = t.dtype().code == kDLFloat && t.dtype().bits == 16 && t.dtype().lanes == 1;
  const bool is_float = t.dtype().code == kDLFloat && t.dtype().bits == 32 && t.dtype().lanes == 1;
  if (!is_half && !is_float) TVM_FFI_THROW(ValueError) << function << ": " << name << " must be float16 or float32";
  Check(t.IsContiguous(), function, "tensors must be contiguous");
  Check(Aligned16(DataPtr(t)), function, "tensors must be 16-byte aligned");
  return is_half;
}

cudaStream_t Stream(const TensorView& t) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, t.device().device_id));
}

template <int kChunks, int kWarps>
void LaunchNorm(const NormParams& p, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kWarps == 1 ? 4 : 1;
  const int64_t blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  Check(blocks < (int64_t{1} << 31), "fxopt.layer_norm", "too many rows");
  LayerNormKernel<kChunks, kWarps><<<static_cast<unsigned>(blocks), 32 * kWarps * kRowsPerBlock, 0, stream>>>(p);
}

void DispatchNorm(const NormParams& p, cudaStream_t stream) {
  const int chunks = p.hidden / 8;
  if (chunks <= 32) return LaunchNorm<1, 1>(p, stream);
  if (chunks <= 64) return LaunchNorm<2, 1>(p, stream);
  if (chunks <= 96) return LaunchNorm<3, 1>(p, stream);
  if (chunks <= 128) return LaunchNorm<4, 1>(p, stream);
  if (chunks <= 256) return LaunchNorm<2, 4>(p, stream);
  if (chunks <= 384) return LaunchNorm<3, 4>(p, stream);
  if (chunks <= 512) return LaunchNorm<4, 4>(p, stream);
  return LaunchNorm<4, 8>(p, stream);
}

// The codes and scales of a quantizing LayerNorm: e4m3 or int8 codes like out (float16), a float32 scale a row.
void SetCodes(NormParams& p, const TensorView& out, const TensorView& codes, const TensorView& scales) {
  const char* fn = "fxopt.layer_norm_quantized";
  Check(p.out_half, fn, "out must be float16 (the codes quantize it as stored)");
  const bool e4m3 = fxopt_codes::E4m3::Holds(codes.dtype()), int8 = fxopt_codes::Int8::Holds(codes.dtype());
  Check(e4m3 || int8, fn, "codes must be float8_e4m3fn or int8");
  Check(codes.numel() == out.numel(), fn, "codes and out must have as many elements");
  Check(scales.dtype().code == kDLFloat && scales.dtype().bits == 32 && scales.numel() == p.rows, fn,
        "scales must be float32 with one element per row of out");
  Check(codes.IsContiguous() && scales.IsContiguous(), fn, "codes and scales must be contiguous");
  Check(Aligned16(DataPtr(codes)), fn, "codes must be 16-byte aligned");
  p.codes = DataPtr(codes);
  p.scales = static_cast<float*>(DataPtr(scales));
  p.int8_codes = int8;
}

void LayerNorm(const TensorView& x, const TensorView* residual, const TensorView& gamma, const TensorView& beta,
               double eps, const TensorView& out, const TensorView* sum, const TensorView* codes = nullptr,
               const TensorView* scales = nullptr) {
  const char* fn = "fxopt.layer_norm";
  Check(out.ndim() >= 1 && gamma.ndim() == 1 && beta.ndim() == 1, fn, "gamma and beta must be 1-D [H]");
  const int64_t hidden = out.shape()[out.ndim() - 1];
  Check(gamma.shape()[0] == hidden && beta.shape()[0] == hidden, fn, "gamma and beta must have H elements");
  Check(hidden > 0 && hidden % 8 == 0 && hidden <= 8192, fn, "H must be a multiple of 8 up to 8192");
  const int64_t numel = out.numel();
  Check(x.numel() == numel, fn, "x and out must have as many elements");
  Check(residual == nullptr || residual->numel() == numel, fn, "residual and out must have as many elements");
  Check(sum == nullptr || sum->numel() == numel, fn, "sum and out must have as many elements");
  NormParams p{};
  p.x_half = HalfOrFloat(x, fn, "x");
  p.x = DataPtr(x);
  if (residual != nullptr) {
    p.residual_half = HalfOrFloat(*residual, fn, "residual");
    p.residual = DataPtr(*residual);
  }
  p.gamma_half = HalfOrFloat(gamma, fn, "gamma");
  p.beta_half = HalfOrFloat(beta, fn, "beta");
  p.out_half = HalfOrFloat(out, fn, "out");
  p.gamma = DataPtr(gamma);
  p.beta = DataPtr(beta);
  p.out = DataPtr(out);
  if (sum != nullptr) {
    p.sum_half = HalfOrFloat(*sum, fn, "sum");
    p.sum = DataPtr(*sum);
  }
  p.rows = numel / hidden;
  p.hidden = static_cast<int>(hidden);
  p.eps = static_cast<float>(eps);
  if (codes != nullptr) SetCodes(p, out, *codes, *scales);
  if (p.rows == 0) return;
  cudaStream_t stream = Stream(out);
  DispatchNorm(p, stream);
  CheckCuda(cudaGetLastError(), fn);
}

template <int kMode>
void GeluLaunch(const TensorView& x, const TensorView& out) {
  const char* fn = kMode == kGeluErf ? "fxopt.gelu" : "fxopt.gelu_tanh";
  const bool half_in = x.dtype().code == kDLFloat && x.dtype().bits == 16 && x.dtype().lanes == 1;
  const bool half_out = out.dtype().code == kDLFloat && out.dtype().bits == 16 && out.dtype().lanes == 1;
  Check(half_in && half_out, fn, "x and out must be float16");
  Check(x.IsContiguous() && out.IsContiguous(), fn, "x and out must be contiguous");
  const int64_t n = out.numel();
  Check(x.numel() == n, fn, "x and out must have as many elements");
  if (n == 0) return;
  const half* in = static_cast<const half*>(DataPtr(x));
  half* result = static_cast<half*>(DataPtr(out));
  cudaStream_t stream = Stream(out);
  constexpr int kThreads = 256;
  if (Aligned16(in) && Aligned16(result)) {
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n / 8 + kThreads - 1) / kThreads, 1 << 16));
    GeluKernel<kMode><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, result, n);
  } else {
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16);
    GeluScalarKernel<kMode><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, result, n);
  }
  CheckCuda(cudaGetLastError(), fn);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("fxopt.layer_norm",
           [](TensorView x, TensorView gamma, TensorView beta, double eps, TensorView out) {
             LayerNorm(x, nullptr, gamma, beta, eps, out, nullptr);
           })
      .def("fxopt.add_layer_norm",
           [](TensorView x, TensorView residual, TensorView gamma, TensorView beta, double eps, TensorView out) {
             LayerNorm(x, &residual, gamma, beta, eps, out, nullptr);
           })
      .def("fxopt.add_layer_norm_sum",
           [](TensorView x, TensorView residual, TensorView gamma, TensorView beta, double eps, TensorView out,
              TensorView sum) { LayerNorm(x, &residual, gamma, beta, eps, out, &sum); })
      .def("fxopt.layer_norm_quantized",
           [](TensorView x, TensorView gamma, TensorView beta, double eps, TensorView out, TensorView codes,
              TensorView scales) { LayerNorm(x, nullptr, gamma, beta, eps, out, nullptr, &codes, &scales); })
      .def("fxopt.add_layer_norm_quantized",
           [](TensorView x, TensorView residual, TensorView gamma, TensorView beta, double eps, TensorView out,
              TensorView codes, TensorView scales) {
             LayerNorm(x, &residual, gamma, beta, eps, out, nullptr, &codes, &scales);
           })
      .def("fxopt.add_layer_norm_sum_quantized",
           [](TensorView x, TensorView residual, TensorView gamma, TensorView beta, double eps, TensorView out,
              TensorView sum, TensorView codes, TensorView scales) {
             LayerNorm(x, &residual, gamma, beta, eps, out, &sum, &codes, &scales);
           })
      .def("fxopt.gelu", [](TensorView x, TensorView out) { GeluLaunch<kGeluErf>(x, out); })
      .def("fxopt.gelu_tanh", [](TensorView x, TensorView out) { GeluLaunch<kGeluTanh>(x, out); });
}

}  // namespace fxopt_norm_act
