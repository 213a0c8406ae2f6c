// fxopt's int8 GEMM epilogue for the TVM CUDA backend: the int32 products of fxopt.cublaslt.matmul_int8 back to
// 16-bit floats, with the row quantizers' scales and the bias.
//
//   fxopt.int8.dequantize(acc, x_scale, w_scale, out)              out = acc * x_scale[m] * w_scale[n]
//   fxopt.int8.dequantize_bias(acc, x_scale, w_scale, bias, out)   ... + bias[n]
// acc int32 [..., N] (M rows of N); x_scale float32 [M] (per token), w_scale float32 [N] (per output channel);
// out and bias float16 or bfloat16. In fp32, as written, left to right, one rounding per operation (no fused
// multiply-add), so the result is bitwise what fxopt.ops.dequantize_int32_rows computes with torch.
//
// cuBLASLt's int8 GEMM cannot do this itself: with int8 operands it writes int32, or int8 with one alpha per row
// of its output, never a float16 product scaled per row and per column.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <cstdint>
#include "tensor_view.h"

namespace fxopt_int8_dequantize {

using fxopt_tensor::DataPtr;

using tvm::ffi::TensorView;

constexpr int kThreads = 256;
constexpr const char* kName = "fxopt.int8.dequantize";

__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void Store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void Store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename Out>
__global__ void Dequantize(const int32_t* __restrict__ acc, const float* __restrict__ x_scale,
                           const float* __restrict__ w_scale, const Out* __restrict__ bias, Out* __restrict__ out,
                           int64_t total, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    const int64_t row = i / n, col = i - row * n;
    float value = __fmul_rn(__fmul_rn(__int2float_rn(acc[i]), x_scale[row]), w_scale[col]);
    if (bias != nullptr) value = __fadd_rn(value, ToFloat(bias[col]));
    Store(out + i, value);
  }
}

// ------------------------------------------------------------------------------------------ host
void Check(bool ok, const char* message) {
  if (!ok) TVM_FFI_THROW(ValueError) << kName << ": " << message;
}

bool IsType(const TensorView& t, DLDataTypeCode code, int bits) {
  return t.dtype().code == code && t.dtype().bits == bits && t.dtype().lanes == 1;
}

bool IsHalf(const TensorView& t) { return IsType(t, kDLFloat, 16); }

bool SameType(const TensorView& a, const TensorView& b) {
  return a.dtype().code == b.dtype().code && a.dtype().bits == b.dtype().bits && a.dtype().lanes == b.dtype().lanes;
}

void CheckOperands(const TensorView& acc, const TensorView& xs, const TensorView& ws, const TensorView* bias,
                   const TensorView& out) {
  if (!IsType(acc, kDLInt, 32)) TVM_FFI_THROW(TypeError) << kName << ": acc must be int32";
  if (!IsType(xs, kDLFloat, 32) || !IsType(ws, kDLFloat, 32)) {
    TVM_FFI_THROW(TypeError) << kName << ": x_scale and w_scale must be float32";
  }
  if (!IsHalf(out) && !IsType(out, kDLBfloat, 16)) {
    TVM_FFI_THROW(TypeError) << kName << ": out must be float16 or bfloat16";
  }
  Check(acc.ndim() >= 1 && acc.numel() == out.numel(), "acc must be [..., N] and out as many elements");
  const int64_t n = acc.shape()[acc.ndim() - 1];
  Check(n > 0 && ws.numel() == n, "w_scale must have N elements (acc's last dimension)");
  Check(xs.numel() == acc.numel() / n, "x_scale must have one element per row of acc (its elements / N)");
  Check(bias == nullptr || (bias->numel() == n && SameType(*bias, out)), "bias must be [N] in the dtype of out");
  Check(acc.IsContiguous() && xs.IsContiguous() && ws.IsContiguous() && out.IsContiguous() &&
            (bias == nullptr || bias->IsContiguous()),
        "operands must be contiguous (strides are not read)");
  Check(acc.device().device_type == kDLCUDA && xs.device().device_type == kDLCUDA &&
            ws.device().device_type == kDLCUDA && out.device().device_type == kDLCUDA &&
            (bias == nullptr || bias->device().device_type == kDLCUDA),
        "tensors must be on the GPU");
}

template <typename Out>
void LaunchAs(const TensorView& acc, const TensorView& xs, const TensorView& ws, const TensorView* bias,
              const TensorView& out, cudaStream_t stream) {
  const int64_t total = acc.numel(), n = acc.shape()[acc.ndim() - 1];
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 * 8 ? wanted : 65535 * 8);
  Dequantize<Out><<<blocks, kThreads, 0, stream>>>(
      static_cast<const int32_t*>(DataPtr(acc)), static_cast<const float*>(DataPtr(xs)),
      static_cast<const float*>(DataPtr(ws)), bias ? static_cast<const Out*>(DataPtr(*bias)) : nullptr,
      static_cast<Out*>(DataPtr(out)), total, n);
}

void DequantizeLaunch(const TensorView& acc, const TensorView& xs, const TensorView& ws, const TensorView* bias,
                      const TensorView& out) {
  CheckOperands(acc, xs, ws, bias, out);
  if (acc.numel() == 0) return;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, acc.device().device_id));
  if (IsHalf(out)) {
    LaunchAs<__half>(acc, xs, ws, bias, out, stream);
  } else {
    LaunchAs<__nv_bfloat16>(acc, xs, ws, bias, out, stream);
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) TVM_FFI_THROW(RuntimeError) << kName << ": launch failed: " << cudaGetErrorString(status);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("fxopt.int8.dequantize",
           [](TensorView acc, TensorView xs, TensorView ws, TensorView out) {
             DequantizeLaunch(acc, xs, ws, nullptr, out);
           })
      .def("fxopt.int8.dequantize_bias", [](TensorView acc, TensorView xs, TensorView ws, TensorView bias,
                                            TensorView out) { DequantizeLaunch(acc, xs, ws, &bias, out); });
}

}  // namespace fxopt_int8_dequantize
