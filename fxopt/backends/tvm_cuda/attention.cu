// fxopt's fused attention, host side: argument checks, the launch and the TVM-FFI global functions. The kernel
// itself, and what the functions compute, are in attention_kernel.cuh.
#include "attention_kernel.cuh"
#include "tensor_view.h"

namespace fxopt_attention {

using fxopt_tensor::DataPtr;
using fxopt_tensor::Aligned16;

// ------------------------------------------------------------------------------------------ host
void Check(bool ok, const char* message) {
  if (!ok) TVM_FFI_THROW(ValueError) << "fxopt.attention: " << message;
}

void CheckCuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) TVM_FFI_THROW(RuntimeError) << "fxopt.attention: " << what << ": " << cudaGetErrorString(status);
}

template <int kDim, int kKeys, int kWarps, int kBias>
void Launch(Params p, int device_id, cudaStream_t stream) {
  constexpr int kRows = kWarps * 16;
  constexpr size_t kShared = static_cast<size_t>(kRows + 4 * kKeys) * (kDim + kPad) * sizeof(half);
  auto kernel = FlashKernel<kDim, kKeys, kWarps, kBias>;
  if constexpr (kShared > 48 * 1024) {  // raise the dynamic shared memory limit once per device
    static std::atomic<uint64_t> allowed{0};
    const uint64_t bit = device_id < 64 ? uint64_t{1} << device_id : 0;
    if (bit == 0 || !(allowed.load() & bit)) {
      CheckCuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kShared)),
                "cudaFuncSetAttribute");
      allowed.fetch_or(bit);
    }
  }
  p.q_blocks = (p.len_q + kRows - 1) / kRows;
  const int64_t blocks = static_cast<int64_t>(p.q_blocks) * p.batch * p.heads;
  Check(blocks < (int64_t{1} << 31), "too many (batch, head, query block) triples");
  kernel<<<static_cast<unsigned>(blocks), kWarps * 32, kShared, stream>>>(p);
  CheckCuda(cudaGetLastError(), "launch failed");
}

#ifndef FXOPT_ATTENTION_WARPS
#define FXOPT_ATTENTION_WARPS 4  // warps (16 query rows each) per block
#endif

template <int kBias>
void Dispatch(const Params& p, int device_id, cudaStream_t stream) {
  const int dim = p.dim > p.dim_v ? p.dim : p.dim_v;
  constexpr int kWarps = FXOPT_ATTENTION_WARPS;
  if (dim <= 32) return Launch<32, 64, kWarps, kBias>(p, device_id, stream);
  if (dim <= 64) return Launch<64, 64, kWarps, kBias>(p, device_id, stream);
  if (dim <= 128) return Launch<128, 64, kWarps, kBias>(p, device_id, stream);
  return Launch<256, 32, kWarps, kBias>(p, device_id, stream);
}

bool IsHalf(const TensorView& t) { return t.dtype().code == kDLFloat && t.dtype().bits == 16; }

void SetBias(Params& p, const TensorView& bias) {
  Check(IsHalf(bias) || (bias.dtype().code == kDLFloat && bias.dtype().bits == 32),
        "bias must be float16 or float32");
  Check(bias.ndim() == 4, "bias must be 4-D [B|1, N|1, L|1, S]");
  const int64_t full[4] = {p.batch, p.heads, p.len_q, p.len_k};
  int64_t stride = 1;
  for (int d = 3; d >= 0; --d) {
    int64_t size = bias.shape()[d];
    Check(size == full[d] || size == 1, "bias does not broadcast to [B, N, L, S]");
    p.bias_stride[d] = size == 1 ? 0 : stride;
    stride *= size;
  }
  p.bias = DataPtr(bias);
  const size_t element = IsHalf(bias) ? 2 : 4;
  p.bias_same_rows = p.bias_stride[2] == 0;
  p.bias_pairs = p.bias_stride[3] == 1 && p.len_k % 2 == 0 && p.bias_stride[0] % 2 == 0 && p.bias_stride[1] % 2 == 0 &&
                 p.bias_stride[2] % 2 == 0 && reinterpret_cast<uintptr_t>(p.bias) % (2 * element) == 0;
}

void Attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* bias, double scale,
               int64_t causal, const TensorView& out) {
  Check(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && out.ndim() == 4, "q, k, v and out must be 4-D BSNH");
  Check(IsHalf(q) && IsHalf(k) && IsHalf(v) && IsHalf(out), "q, k, v and out must be float16");
  Check(q.IsContiguous() && k.IsContiguous() && v.IsContiguous() && out.IsContiguous(),
        "q, k, v and out must be contiguous BSNH (strides are not read); pass .contiguous() copies");
  const int64_t batch = q.shape()[0], len_q = q.shape()[1], heads = q.shape()[2], dim = q.shape()[3];
  const int64_t len_k = k.shape()[1], dim_v = v.shape()[3];
  Check(k.shape()[0] == batch && k.shape()[2] == heads && k.shape()[3] == dim, "k does not match q");
  Check(v.shape()[0] == batch && v.shape()[1] == len_k && v.shape()[2] == heads, "v does not match k");
  Check(dim % 16 == 0 && dim_v % 16 == 0 && dim <= 256 && dim_v <= 256,
        "head sizes must be multiples of 16 up to 256");
  Check(causal >= 0 && causal <= 2, "causal must be 0, 1 or 2");
  Check(batch * len_q * heads * dim < (int64_t{1} << 40) && len_q < (int64_t{1} << 30) && len_k < (int64_t{1} << 30) &&
            heads < (int64_t{1} << 30) && batch < (int64_t{1} << 30),
        "tensor too large");
  Params p{};
  p.batch = static_cast<int>(batch), p.len_q = static_cast<int>(len_q), p.heads = static_cast<int>(heads);
  p.dim = static_cast<int>(dim), p.len_k = static_cast<int>(len_k), p.dim_v = static_cast<int>(dim_v);
  p.q = static_cast<const half*>(DataPtr(q));
  p.k = static_cast<const half*>(DataPtr(k));
  p.v = static_cast<const half*>(DataPtr(v));
  p.out = static_cast<half*>(DataPtr(out));
  Check(Aligned16(p.q) && Aligned16(p.k) && Aligned16(p.v) && Aligned16(p.out),
        "q, k, v and out must be 16-byte aligned");
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.causal = static_cast<int>(causal);
  if (bias != nullptr) SetBias(p, *bias);
  if (len_q == 0 || batch * heads == 0) return;
  const int device_id = q.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
  if (bias == nullptr) return Dispatch<0>(p, device_id, stream);
  if (IsHalf(*bias)) return Dispatch<1>(p, device_id, stream);
  return Dispatch<2>(p, device_id, stream);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("fxopt.attention",
           [](TensorView q, TensorView k, TensorView v, double scale, int64_t causal, TensorView out) {
             Attention(q, k, v, nullptr, scale, causal, out);
           })
      .def("fxopt.attention_bias", [](TensorView q, TensorView k, TensorView v, TensorView bias, double scale,
                                      int64_t causal, TensorView out) { Attention(q, k, v, &bias, scale, causal, out); });
}

}  // namespace fxopt_attention
