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
// One block of 4 warps takes 64 queries of one (batch, head); each warp owns 16 query rows. Keys
// and values stream through shared memory in tiles of 64; Q K^T and P V run on tensor cores (WMMA
// 16x16x16, fp32 accumulation) and the softmax is the online (flash) form, so S is unbounded.
// A fully masked row gives zeros (torch's SDPA math does the same).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <mma.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <cmath>
#include <cstdint>

namespace fxopt_attention {

using namespace nvcuda;
using tvm::ffi::TensorView;

constexpr int kRows = 64;  // queries per block
constexpr int kKeys = 64;  // keys per tile
constexpr int kWarps = 4;
constexpr int kPad = 8;  // halves of padding per shared row, against bank conflicts

struct Params {
  const half* q;
  const half* k;
  const half* v;
  const void* bias;
  half* out;
  int bias_is_half;
  int64_t batch, heads, len_q, len_k, dim, dim_v;
  int64_t bias_stride[4];  // elements, 0 for broadcast dims
  float scale;
  int causal;
};

__device__ int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ float BiasAt(const Params& p, int64_t b, int64_t n, int64_t i, int64_t j) {
  int64_t at = b * p.bias_stride[0] + n * p.bias_stride[1] + i * p.bias_stride[2] + j * p.bias_stride[3];
  return p.bias_is_half ? __half2float(static_cast<const half*>(p.bias)[at]) : static_cast<const float*>(p.bias)[at];
}

__device__ bool Masked(const Params& p, int64_t i, int64_t j) {
  if (j >= p.len_k) return true;
  if (p.causal == 1) return j > i;
  if (p.causal == 2) return j > i + p.len_k - p.len_q;
  return false;
}

// rows x cols halves from a BSNH tensor (row stride heads * cols) into shared memory; zeros past `valid`.
__device__ void LoadTile(half* dst, int ld, const half* src, int64_t row_stride, int rows, int valid, int cols) {
  for (int idx = threadIdx.x; idx < rows * cols / 8; idx += blockDim.x) {
    int r = idx / (cols / 8), c = (idx % (cols / 8)) * 8;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r < valid) value = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
    *reinterpret_cast<uint4*>(dst + r * ld + c) = value;
  }
}

__global__ void AttentionKernel(Params p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = p.dim, Dv = p.dim_v, ldq = D + kPad, ldv = Dv + kPad, lds = kKeys + 4, ldo = Dv + 4;
  half* qs = reinterpret_cast<half*>(smem);
  half* ks = qs + kRows * ldq;
  half* vs = ks + kKeys * ldq;
  float* scores = reinterpret_cast<float*>(vs + kKeys * ldv);  // per warp: 16 x lds
  half* probs = reinterpret_cast<half*>(scores + kWarps * 16 * lds);  // per warp: 16 x (kKeys + kPad)
  float* acc = reinterpret_cast<float*>(probs + kWarps * 16 * (kKeys + kPad));  // per warp: 16 x ldo

  const int64_t bh = blockIdx.y, b = bh / p.heads, n = bh % p.heads;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t q_stride = p.heads * D, v_stride = p.heads * Dv;
  float* my_scores = scores + warp * 16 * lds;
  half* my_probs = probs + warp * 16 * (kKeys + kPad);
  float* my_acc = acc + warp * 16 * ldo;

  LoadTile(qs, ldq, p.q + ((b * p.len_q + q0) * p.heads + n) * D, q_stride, kRows,
           static_cast<int>(Min(kRows, p.len_q - q0)), D);
  for (int idx = lane; idx < 16 * Dv; idx += 32) my_acc[(idx / Dv) * ldo + idx % Dv] = 0.f;
  float row_max[16], row_sum[16];  // every lane holds every row's running max and sum
#pragma unroll
  for (int r = 0; r < 16; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.f;

  // the last key any query of this block may see
  int64_t key_end = p.len_k;
  if (p.causal == 1) key_end = Min(key_end, q0 + kRows);
  if (p.causal == 2) key_end = Min(key_end, q0 + kRows + p.len_k - p.len_q);

  for (int64_t k0 = 0; k0 < key_end; k0 += kKeys) {
    __syncthreads();  // the previous tile is no longer read
    int valid = static_cast<int>(Min(kKeys, p.len_k - k0));
    LoadTile(ks, ldq, p.k + ((b * p.len_k + k0) * p.heads + n) * D, q_stride, kKeys, valid, D);
    LoadTile(vs, ldv, p.v + ((b * p.len_k + k0) * p.heads + n) * Dv, v_stride, kKeys, valid, Dv);
    __syncthreads();

    // scores = Q K^T for this warp's 16 rows and the tile's 64 keys
    for (int j = 0; j < kKeys / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> s;
      wmma::fill_fragment(s, 0.f);
      for (int d = 0; d < D; d += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> bk;
        wmma::load_matrix_sync(a, qs + warp * 16 * ldq + d, ldq);
        wmma::load_matrix_sync(bk, ks + j * 16 * ldq + d, ldq);
        wmma::mma_sync(s, a, bk, s);
      }
      wmma::store_matrix_sync(my_scores + j * 16, s, lds, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax for the warp's 16 rows at once (independent chains, so their latencies overlap):
    // lane owns keys lane and lane + 32 of every row, so the bias loads coalesce
    float scaled[16][2], tile_max[16], tile_sum[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int64_t qi = q0 + warp * 16 + r;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h;
        float v = -INFINITY;
        if (!Masked(p, qi, k0 + c)) {
          v = my_scores[r * lds + c] * p.scale;
          if (p.bias != nullptr && qi < p.len_q) v += BiasAt(p, b, n, qi, k0 + c);
        }
        scaled[r][h] = v;
      }
      tile_max[r] = fmaxf(scaled[r][0], scaled[r][1]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
      for (int r = 0; r < 16; ++r) tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], offset));
    }
    float factor[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const float new_max = fmaxf(row_max[r], tile_max[r]);
      factor[r] = new_max == -INFINITY ? 1.f : __expf(row_max[r] - new_max);
      row_max[r] = new_max;
      tile_sum[r] = 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float e = scaled[r][h] == -INFINITY ? 0.f : __expf(scaled[r][h] - new_max);
        tile_sum[r] += e;
        my_probs[r * (kKeys + kPad) + lane + 32 * h] = __float2half(e);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
      for (int r = 0; r < 16; ++r) tile_sum[r] += __shfl_xor_sync(0xffffffff, tile_sum[r], offset);
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      row_sum[r] = row_sum[r] * factor[r] + tile_sum[r];
      for (int c = lane; c < Dv; c += 32) my_acc[r * ldo + c] *= factor[r];
    }
    __syncwarp();

    // acc += P V
    for (int dv = 0; dv < Dv; dv += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      wmma::load_matrix_sync(o, my_acc + dv, ldo, wmma::mem_row_major);
      for (int c = 0; c < kKeys; c += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> bv;
        wmma::load_matrix_sync(a, my_probs + c, kKeys + kPad);
        wmma::load_matrix_sync(bv, vs + c * ldv + dv, ldv);
        wmma::mma_sync(o, a, bv, o);
      }
      wmma::store_matrix_sync(my_acc + dv, o, ldo, wmma::mem_row_major);
    }
    __syncwarp();
  }

#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int64_t qi = q0 + warp * 16 + r;
    if (qi >= p.len_q) continue;
    const float inverse = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;
    half* row = p.out + ((b * p.len_q + qi) * p.heads + n) * Dv;
    for (int c = lane; c < Dv; c += 32) row[c] = __float2half(my_acc[r * ldo + c] * inverse);
  }
}

size_t SharedBytes(int64_t dim, int64_t dim_v) {
  size_t halves = kRows * (dim + kPad) + kKeys * (dim + kPad) + kKeys * (dim_v + kPad);
  size_t floats = kWarps * 16 * (kKeys + 4) + kWarps * 16 * (dim_v + 4);
  return halves * 2 + floats * 4 + kWarps * 16 * (kKeys + kPad) * 2;
}

// Raises the kernel's dynamic shared memory limit only when a larger head size needs it, not on every call.
void AllowSharedBytes(size_t shared) {
  static size_t allowed = 0;
  if (shared <= allowed) return;
  cudaError_t status = cudaFuncSetAttribute(AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared));
  if (status != cudaSuccess) TVM_FFI_THROW(RuntimeError) << "fxopt.attention: " << cudaGetErrorString(status);
  allowed = shared;
}

void* DataPtr(const TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

bool IsHalf(const TensorView& t) { return t.dtype().code == kDLFloat && t.dtype().bits == 16; }

void Check(bool ok, const char* message) {
  if (!ok) TVM_FFI_THROW(ValueError) << "fxopt.attention: " << message;
}

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
  p.bias_is_half = IsHalf(bias);
}

void Attention(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* bias, double scale,
               int64_t causal, const TensorView& out) {
  Check(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4 && out.ndim() == 4, "q, k, v and out must be 4-D BSNH");
  Check(IsHalf(q) && IsHalf(k) && IsHalf(v) && IsHalf(out), "q, k, v and out must be float16");
  Params p{};
  p.batch = q.shape()[0], p.len_q = q.shape()[1], p.heads = q.shape()[2], p.dim = q.shape()[3];
  p.len_k = k.shape()[1], p.dim_v = v.shape()[3];
  Check(k.shape()[0] == p.batch && k.shape()[2] == p.heads && k.shape()[3] == p.dim, "k does not match q");
  Check(v.shape()[0] == p.batch && v.shape()[1] == p.len_k && v.shape()[2] == p.heads, "v does not match k");
  Check(p.dim % 16 == 0 && p.dim_v % 16 == 0 && p.dim <= 256 && p.dim_v <= 256,
        "head sizes must be multiples of 16 up to 256");
  Check(causal >= 0 && causal <= 2, "causal must be 0, 1 or 2");
  p.q = static_cast<const half*>(DataPtr(q));
  p.k = static_cast<const half*>(DataPtr(k));
  p.v = static_cast<const half*>(DataPtr(v));
  p.out = static_cast<half*>(DataPtr(out));
  p.scale = static_cast<float>(scale);
  p.causal = static_cast<int>(causal);
  if (bias != nullptr) SetBias(p, *bias);
  if (p.len_q == 0 || p.batch * p.heads == 0) return;
  size_t shared = SharedBytes(p.dim, p.dim_v);
  AllowSharedBytes(shared);
  int device_id = q.device().device_id;
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
  dim3 grid(static_cast<unsigned>((p.len_q + kRows - 1) / kRows), static_cast<unsigned>(p.batch * p.heads));
  AttentionKernel<<<grid, kWarps * 32, shared, stream>>>(p);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) TVM_FFI_THROW(RuntimeError) << "fxopt.attention: launch failed: " << cudaGetErrorString(status);
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
