// fxopt's row quantizers for the TVM CUDA backend: what feeds fxopt.cublaslt.matmul_fp8 and matmul_int8.
//
//   fxopt.fp8.quantize_rows(x, codes, scales)    codes float8_e4m3fn, scale absmax / 448, saturating at +-448
//   fxopt.int8.quantize_rows(x, codes, scales)   codes int8, scale absmax / 127, codes in [-127, 127]
// x [..., K] float16, bfloat16 or float32, contiguous, seen as M rows of K; codes the same shape; scales float32
// [M]. Each row's scale is absmax(row) / the code's largest value, or 1 for a row of zeros, and codes = x / scale
// rounded to nearest even (symmetric: no zero point). Both are IEEE fp32 divisions, so the result is bitwise what
// fxopt.ops.quantize_rows_fp8 / quantize_rows_int8 compute with torch.
// They quantize activations per token on every call, and weights per output channel once, when the model's
// parameters are transformed at load time. One block of kThreads a row: a max-reduction, then a second pass
// over the row (from L1/L2) writing the codes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime_api.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>

#include "quantize_codes.cuh"

namespace fxopt_quantize_rows {

using tvm::ffi::TensorView;
using fxopt_codes::E4m3;
using fxopt_codes::Int8;

constexpr int kThreads = 256;

enum class Input { kHalf, kBfloat, kFloat };

template <Input kInput>
__device__ __forceinline__ float Load(const void* x, int64_t i) {
  if constexpr (kInput == Input::kHalf) return __half2float(static_cast<const __half*>(x)[i]);
  if constexpr (kInput == Input::kBfloat) return __bfloat162float(static_cast<const __nv_bfloat16*>(x)[i]);
  if constexpr (kInput == Input::kFloat) return static_cast<const float*>(x)[i];
}

__device__ __forceinline__ float BlockMax(float value) {
  __shared__ float partial[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = value;
  __syncthreads();
  float total = partial[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) total = fmaxf(total, partial[w]);
  return total;
}

template <typename Codes, Input kInput>
__global__ void QuantizeRows(const void* __restrict__ x, typename Codes::Code* __restrict__ codes,
                             float* __restrict__ scales, int64_t k) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * k;
  float amax = 0.f;
  for (int64_t i = threadIdx.x; i < k; i += kThreads) amax = fmaxf(amax, fabsf(Load<kInput>(x, row + i)));
  amax = BlockMax(amax);
  const float scale = fxopt_codes::RowScale<Codes>(amax);
  for (int64_t i = threadIdx.x; i < k; i += kThreads) codes[row + i] = Codes::Encode(Load<kInput>(x, row + i) / scale);
  if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

// ------------------------------------------------------------------------------------------ host
template <typename Codes>
void Check(bool ok, const char* message) {
  if (!ok) TVM_FFI_THROW(ValueError) << Codes::kName << ": " << message;
}

template <typename Codes>
Input InputKind(const TensorView& x) {
  const DLDataType t = x.dtype();
  const bool is_float = t.code == kDLFloat && t.lanes == 1;
  if (is_float && t.bits == 16) return Input::kHalf;
  if (is_float && t.bits == 32) return Input::kFloat;
  if (t.code == kDLBfloat && t.bits == 16 && t.lanes == 1) return Input::kBfloat;
  TVM_FFI_THROW(TypeError) << Codes::kName << ": x must be float16, bfloat16 or float32";
}

// The rows of x (its elements / K), after every check of the operands.
template <typename Codes>
int64_t CheckedRows(const TensorView& x, const TensorView& codes, const TensorView& scales) {
  Check<Codes>(Codes::Holds(codes.dtype()), Codes::kCodes);
  Check<Codes>(scales.dtype().code == kDLFloat && scales.dtype().bits == 32, "scales must be float32");
  Check<Codes>(x.ndim() >= 1 && x.numel() == codes.numel(), "x must be [..., K] and codes as many elements");
  const int64_t k = x.shape()[x.ndim() - 1];
  Check<Codes>(k > 0, "K must be positive");
  const int64_t rows = x.numel() / k;
  Check<Codes>(scales.numel() == rows, "scales must have one element per row of x (its elements / K)");
  Check<Codes>(x.IsContiguous() && codes.IsContiguous() && scales.IsContiguous(),
               "x, codes and scales must be contiguous (strides are not read)");
  Check<Codes>(x.device().device_type == kDLCUDA && codes.device().device_type == kDLCUDA &&
                   scales.device().device_type == kDLCUDA,
               "tensors must be on the GPU");
  Check<Codes>(rows < (int64_t{1} << 31), "too many rows");
  return rows;
}

template <typename Codes>
void QuantizeRowsLaunch(const TensorView& x, const TensorView& codes, const TensorView& scales) {
  const Input input = InputKind<Codes>(x);
  const int64_t rows = CheckedRows<Codes>(x, codes, scales);
  if (rows == 0) return;
  const int64_t k = x.shape()[x.ndim() - 1];
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, x.device().device_id));
  const void* in = static_cast<const char*>(x.data_ptr()) + x.byte_offset();
  auto* out = reinterpret_cast<typename Codes::Code*>(static_cast<char*>(codes.data_ptr()) + codes.byte_offset());
  auto* scale = reinterpret_cast<float*>(static_cast<char*>(scales.data_ptr()) + scales.byte_offset());
  const unsigned blocks = static_cast<unsigned>(rows);
  if (input == Input::kHalf) QuantizeRows<Codes, Input::kHalf><<<blocks, kThreads, 0, stream>>>(in, out, scale, k);
  if (input == Input::kBfloat) QuantizeRows<Codes, Input::kBfloat><<<blocks, kThreads, 0, stream>>>(in, out, scale, k);
  if (input == Input::kFloat) QuantizeRows<Codes, Input::kFloat><<<blocks, kThreads, 0, stream>>>(in, out, scale, k);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << Codes::kName << ": launch failed: " << cudaGetErrorString(status);
  }
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def(E4m3::kName,
           [](TensorView x, TensorView codes, TensorView scales) { QuantizeRowsLaunch<E4m3>(x, codes, scales); })
      .def(Int8::kName,
           [](TensorView x, TensorView codes, TensorView scales) { QuantizeRowsLaunch<Int8>(x, codes, scales); });
}

}  // namespace fxopt_quantize_rows
