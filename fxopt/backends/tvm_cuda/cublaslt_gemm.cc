// fxopt's vendor GEMM for the TVM CUDA backend: cuBLASLt behind TVM-FFI global functions.
//
// Relax calls these through R.call_dps_packed (see cublaslt.py, which compiles this file):
//   fxopt.cublaslt.matmul(a, b, out)             out = a @ b
//   fxopt.cublaslt.matmul_bias(a, b, bias, out)  out = a @ b + bias   (the bias added in the fp32 epilogue)
//   fxopt.cublaslt.matmul_fp8(x, w, x_scale, w_scale, out)            out = (x_scale * x) @ (w_scale * w)^T
//   fxopt.cublaslt.matmul_fp8_bias(x, w, x_scale, w_scale, bias, out)   ... + bias
//   fxopt.cublaslt.matmul_int8(x, w, out)        out = x @ w^T, int8 x int8 -> exact int32 (tensor cores, IMMA)
// Row-major shapes: a [..., M, K], b [K, N] (a weight: a's leading dimensions fold into M) or
// b [batch, K, N] with a [batch, M, K] (a strided-batched GEMM, e.g. attention); out [..., M, N];
// bias [N]. a, b, out and bias share one dtype, float16 or bfloat16; products accumulate in fp32.
// fp8: x [..., M, K] and w [N, K] (a linear's weight, not transposed: cuBLASLt's fp8 GEMM wants the "TN" form)
// in float8_e4m3fn, K a multiple of 16; scales float32, both per tensor (x_scale [1], w_scale [1]) or both
// vectors (x_scale [M] per token, w_scale [N] per output channel: cuBLASLt's outer-vector mode, which scales
// both operands or neither), applied by cuBLASLt's scale pointers; out and bias float16 or bfloat16.
// int8: x [..., M, K] and w [N, K] in int8 ("TN" as for fp8), K and N multiples of 4 (cuBLASLt's IMMA kernels
// need them), out int32 [..., M, N]: the exact sums, which fxopt.int8.dequantize (int8_dequantize.cu) scales.
//
// The GEMM runs on the stream TVM says is current (TVMFFIEnvGetStream), so calls are captured
// when the VM records a CUDA graph. A plan (descriptors, layouts, algorithm) is made once per
// shape: the first call times cuBLASLt's best candidates and keeps the fastest. TVM runs each
// captured region once before capturing it, so planning and the workspace allocation never
// happen during a capture.
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "tensor_view.h"

namespace fxopt_cublaslt {

using fxopt_tensor::DataPtr;

using tvm::ffi::TensorView;

constexpr size_t kWorkspaceBytes = 32u << 20;
constexpr int kCandidates = 8;
constexpr int kTimingReps = 5;

void CheckBlas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    TVM_FFI_THROW(RuntimeError) << "fxopt.cublaslt: " << what << " failed with cuBLAS status "
                                << static_cast<int>(status);
  }
}

void CheckCuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "fxopt.cublaslt: " << what << " failed: " << cudaGetErrorString(status);
  }
}

// The GEMM in row-major terms, plus what the algorithm choice depends on.
struct Problem {
  int64_t batch, m, n, k;
  cudaDataType_t dtype;  // of out and bias (and of a and b, but for fp8)
  bool bias;
  int alignment;  // bytes, the smallest alignment of any pointer
  bool fp8 = false, vector_scales = false, int8 = false;
  auto Key() const {
    return std::make_tuple(batch, m, n, k, static_cast<int>(dtype), bias, alignment, fp8, vector_scales, int8);
  }
};

struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t layout_a = nullptr, layout_b = nullptr, layout_c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool integer = false;  // int32 compute: alpha and beta are int32
};

struct Operands {
  const void* a;
  const void* b;
  const void* bias;
  void* out;
  const void* a_scale = nullptr;  // fp8: the scales of a (x) and b (w)
  const void* b_scale = nullptr;
};

struct DeviceState {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::map<decltype(std::declval<Problem>().Key()), Plan> plans;
};

std::mutex state_mutex;
std::map<int, DeviceState> states;

int64_t Numel(const TensorView& t, int first, int last) {
  int64_t n = 1;
  for (int i = first; i < last; ++i) n *= t.shape()[i];
  return n;
}

cudaDataType_t BlasType(const TensorView& t) {
  DLDataType dt = t.dtype();
  if (dt.code == kDLFloat && dt.bits == 16 && dt.lanes == 1) return CUDA_R_16F;
  if (dt.code == kDLBfloat && dt.bits == 16 && dt.lanes == 1) return CUDA_R_16BF;
  TVM_FFI_THROW(TypeError) << "fxopt.cublaslt: only float16 and bfloat16 tensors are supported";
}

int Alignment(const std::vector<const void*>& ptrs) {
  int alignment = 256;
  for (const void* p : ptrs) {
    if (p == nullptr) continue;
    while (alignment > 2 && reinterpret_cast<uintptr_t>(p) % alignment != 0) alignment /= 2;
  }
  return alignment;
}

// The bias (nullable) of either GEMM: [N] in the dtype of out (the 16-bit GEMM's a, b and out share it).
void DescribeBias(Problem& p, const TensorView* bias) {
  p.bias = bias != nullptr;
  if (p.bias) {
    TVM_FFI_CHECK(BlasType(*bias) == p.dtype && Numel(*bias, 0, bias->ndim()) == p.n, ValueError)
        << "fxopt.cublaslt: bias must be [N] in the dtype of out";
  }
}

Problem Describe(const TensorView& a, const TensorView& b, const TensorView* bias, const TensorView& out) {
  int ra = a.ndim(), rb = b.ndim();
  TVM_FFI_CHECK(ra >= 2 && (rb == 2 || (rb == 3 && ra == 3)), ValueError)
      << "fxopt.cublaslt: a must be [..., M, K] and b [K, N] or [batch, K, N] with a [batch, M, K]";
  Problem p;
  p.k = a.shape()[ra - 1];
  p.n = b.shape()[rb - 1];
  TVM_FFI_CHECK(b.shape()[rb - 2] == p.k, ValueError) << "fxopt.cublaslt: inner dimensions differ";
  p.batch = rb == 3 ? b.shape()[0] : 1;
  p.m = rb == 3 ? a.shape()[1] : Numel(a, 0, ra - 1);
  TVM_FFI_CHECK(rb == 2 || a.shape()[0] == p.batch, ValueError) << "fxopt.cublaslt: batch sizes differ";
  TVM_FFI_CHECK(Numel(out, 0, out.ndim()) == p.batch * p.m * p.n, ValueError)
      << "fxopt.cublaslt: out has the wrong number of elements";
  p.dtype = BlasType(a);
  TVM_FFI_CHECK(BlasType(b) == p.dtype && BlasType(out) == p.dtype, TypeError)
      << "fxopt.cublaslt: a, b and out must share a dtype";
  TVM_FFI_CHECK(a.IsContiguous() && b.IsContiguous() && out.IsContiguous() && (!bias || bias->IsContiguous()),
                ValueError)
      << "fxopt.cublaslt: a, b, out and bias must be contiguous (strides are not read); pass .contiguous() copies";
  DescribeBias(p, bias);
  p.alignment = Alignment({DataPtr(a), DataPtr(b), DataPtr(out), p.bias ? DataPtr(*bias) : nullptr});
  return p;
}

bool IsFp8(const TensorView& t) {
  return t.dtype().code == kDLFloat8_e4m3fn && t.dtype().bits == 8 && t.dtype().lanes == 1;
}

bool IsFloat32(const TensorView& t) { return t.dtype().code == kDLFloat && t.dtype().bits == 32; }

// The "TN" GEMMs (fp8, int8: ``kind``): x [..., M, K] and w [N, K], a linear's weight, not transposed.
Problem DescribeTN(const TensorView& x, const TensorView& w, const char* kind) {
  TVM_FFI_CHECK(x.ndim() >= 2 && w.ndim() == 2, ValueError)
      << "fxopt.cublaslt: " << kind << " x must be [..., M, K], w [N, K]";
  Problem p;
  p.batch = 1;
  p.k = x.shape()[x.ndim() - 1];
  p.m = Numel(x, 0, x.ndim() - 1);
  p.n = w.shape()[0];
  TVM_FFI_CHECK(w.shape()[1] == p.k, ValueError)
      << "fxopt.cublaslt: " << kind << " inner dimensions differ (x [..., K], w [N, K])";
  return p;
}

Problem DescribeFp8(const TensorView& x, const TensorView& w, const TensorView& x_scale, const TensorView& w_scale,
                    const TensorView* bias, const TensorView& out) {
  TVM_FFI_CHECK(IsFp8(x) && IsFp8(w), TypeError) << "fxopt.cublaslt: fp8 x and w must be float8_e4m3fn";
  Problem p = DescribeTN(x, w, "fp8");
  p.fp8 = true;
  TVM_FFI_CHECK(p.k % 16 == 0, ValueError) << "fxopt.cublaslt: fp8 needs K a multiple of 16, got " << p.k;
  TVM_FFI_CHECK(Numel(out, 0, out.ndim()) == p.m * p.n, ValueError)
      << "fxopt.cublaslt: out has the wrong number of elements";
  p.dtype = BlasType(out);
  TVM_FFI_CHECK(IsFloat32(x_scale) && IsFloat32(w_scale), TypeError) << "fxopt.cublaslt: fp8 scales must be float32";
  int64_t xs = Numel(x_scale, 0, x_scale.ndim()), ws = Numel(w_scale, 0, w_scale.ndim());
  TVM_FFI_CHECK((xs == 1 || xs == p.m) && (ws == 1 || ws == p.n), ValueError)
      << "fxopt.cublaslt: fp8 x_scale must have 1 or M elements and w_scale 1 or N";
  // cuBLASLt's outer-vector mode scales both operands or neither: a lone vector is refused, not broadcast here.
  p.vector_scales = xs > 1 || ws > 1;
  TVM_FFI_CHECK(!p.vector_scales || (xs == p.m && ws == p.n), ValueError)
      << "fxopt.cublaslt: fp8 x_scale and w_scale must both be per-tensor ([1]) or both vectors (x_scale [M], "
      << "w_scale [N]), got " << xs << " and " << ws << " elements for M=" << p.m << ", N=" << p.n
      << "; expand the per-tensor one to a vector";
  TVM_FFI_CHECK(x.IsContiguous() && w.IsContiguous() && out.IsContiguous() && x_scale.IsContiguous() &&
                    w_scale.IsContiguous() && (!bias || bias->IsContiguous()),
                ValueError)
      << "fxopt.cublaslt: fp8 operands must be contiguous (strides are not read); pass .contiguous() copies";
  DescribeBias(p, bias);
  p.alignment = Alignment({DataPtr(x), DataPtr(w), DataPtr(out), p.bias ? DataPtr(*bias) : nullptr});
  TVM_FFI_CHECK(p.alignment >= 16, ValueError) << "fxopt.cublaslt: fp8 operands must be 16-byte aligned";
  TVM_FFI_CHECK(x.device().device_type == kDLCUDA, ValueError) << "fxopt.cublaslt: fp8 tensors must be on the GPU";
  return p;
}

bool IsInt8(const TensorView& t) { return t.dtype().code == kDLInt && t.dtype().bits == 8 && t.dtype().lanes == 1; }

bool IsInt32(const TensorView& t) { return t.dtype().code == kDLInt && t.dtype().bits == 32 && t.dtype().lanes == 1; }

Problem DescribeInt8(const TensorView& x, const TensorView& w, const TensorView& out) {
  TVM_FFI_CHECK(IsInt8(x) && IsInt8(w), TypeError) << "fxopt.cublaslt: int8 x and w must be int8";
  TVM_FFI_CHECK(IsInt32(out), TypeError) << "fxopt.cublaslt: int8 out must be int32";
  Problem p = DescribeTN(x, w, "int8");
  p.int8 = true;
  p.dtype = CUDA_R_32I;
  TVM_FFI_CHECK(p.k % 4 == 0 && p.n % 4 == 0, ValueError)
      << "fxopt.cublaslt: int8 needs K and N multiples of 4 (cuBLASLt's IMMA kernels), got K=" << p.k << ", N=" << p.n;
  TVM_FFI_CHECK(Numel(out, 0, out.ndim()) == p.m * p.n, ValueError)
      << "fxopt.cublaslt: out has the wrong number of elements";
  TVM_FFI_CHECK(x.IsContiguous() && w.IsContiguous() && out.IsContiguous(), ValueError)
      << "fxopt.cublaslt: int8 operands must be contiguous (strides are not read); pass .contiguous() copies";
  p.bias = false;
  p.alignment = Alignment({DataPtr(x), DataPtr(w), DataPtr(out)});
  TVM_FFI_CHECK(p.alignment >= 4, ValueError) << "fxopt.cublaslt: int8 operands must be 4-byte aligned";
  TVM_FFI_CHECK(x.device().device_type == kDLCUDA, ValueError) << "fxopt.cublaslt: int8 tensors must be on the GPU";
  return p;
}

// Row-major C[M, N] = A[M, K] B[K, N] is column-major C^T[N, M] = B^T[N, K] A^T[K, M]:
// cuBLASLt's "A" is our b (N x K, ld N) and its "B" is our a (K x M, ld K).
cublasLtMatrixLayout_t Layout(cudaDataType_t dtype, int64_t rows, int64_t cols, int64_t batch) {
  cublasLtMatrixLayout_t layout;
  CheckBlas(cublasLtMatrixLayoutCreate(&layout, dtype, rows, cols, rows), "cublasLtMatrixLayoutCreate");
  if (batch > 1) {
    int32_t count = static_cast<int32_t>(batch);
    int64_t stride = rows * cols;
    CheckBlas(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)),
              "set batch count");
    CheckBlas(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                               sizeof(stride)),
              "set batch stride");
  }
  return layout;
}

void SetAttribute(const Plan& plan, cublasLtMatmulDescAttributes_t attribute, const void* value, size_t size,
                  const char* what) {
  CheckBlas(cublasLtMatmulDescSetAttribute(plan.desc, attribute, value, size), what);
}

// fp8 and int8 in cuBLASLt's "TN" form: its A is w ([N, K] row-major = K x N column-major, transposed), its B
// is x (K x M column-major), its C the row-major out [M, N] (N x M column-major).
void SetTransposedW(Plan& plan, const Problem& p, cudaDataType_t operands) {
  cublasOperation_t transpose = CUBLAS_OP_T;
  SetAttribute(plan, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose), "set transa");
  plan.layout_a = Layout(operands, p.k, p.n, 1);
  plan.layout_b = Layout(operands, p.k, p.m, 1);
  plan.layout_c = Layout(p.dtype, p.n, p.m, 1);
}

// fp8: A's outer-vector scale has N entries (per channel) and B's has M (per token).
void SetFp8(Plan& plan, const Problem& p) {
  SetTransposedW(plan, p, CUDA_R_8F_E4M3);
  int32_t mode = static_cast<int32_t>(p.vector_scales ? CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
                                                      : CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F);
  SetAttribute(plan, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode), "set fp8 w scale mode");
  SetAttribute(plan, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode), "set fp8 x scale mode");
}

Plan MakePlan(const Problem& p) {
  Plan plan;
  plan.integer = p.int8;
  CheckBlas(cublasLtMatmulDescCreate(&plan.desc, p.int8 ? CUBLAS_COMPUTE_32I : CUBLAS_COMPUTE_32F,
                                     p.int8 ? CUDA_R_32I : CUDA_R_32F),
            "cublasLtMatmulDescCreate");
  if (p.bias) {
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    CheckBlas(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
              "set epilogue");
    cudaDataType_t bias_type = p.dtype;
    CheckBlas(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                             sizeof(bias_type)),
              "set bias dtype");
  }
  if (p.fp8 || p.int8) {
    if (p.fp8) SetFp8(plan, p);
    if (p.int8) SetTransposedW(plan, p, CUDA_R_8I);
    return plan;
  }
  plan.layout_a = Layout(p.dtype, p.n, p.k, p.batch);
  plan.layout_b = Layout(p.dtype, p.k, p.m, p.batch);
  plan.layout_c = Layout(p.dtype, p.n, p.m, p.batch);
  return plan;
}

void SetScales(const Plan& plan, const Operands& x) {
  if (x.a_scale == nullptr) return;
  SetAttribute(plan, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &x.b_scale, sizeof(x.b_scale), "set w scale pointer");
  SetAttribute(plan, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x.a_scale, sizeof(x.a_scale), "set x scale pointer");
}

void SetBias(const Plan& plan, const void* bias) {
  if (bias == nullptr) return;
  CheckBlas(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)),
            "set bias pointer");
}

// The plan's pointers are this call's operands. Set before the heuristic too: cuBLASLt proposes no algorithm
// for vector scale modes whose scale pointers are unset.
void Bind(const Plan& plan, const Operands& x) {
  SetBias(plan, x.bias);
  SetScales(plan, x);
}

cublasStatus_t TryLaunch(DeviceState& dev, const Plan& plan, const cublasLtMatmulAlgo_t& algo, const Operands& x,
                         cudaStream_t stream) {
  static const float kOne = 1.0f, kZero = 0.0f;
  static const int32_t kIntOne = 1, kIntZero = 0;
  const void* alpha = plan.integer ? static_cast<const void*>(&kIntOne) : &kOne;
  const void* beta = plan.integer ? static_cast<const void*>(&kIntZero) : &kZero;
  Bind(plan, x);
  return cublasLtMatmul(dev.handle, plan.desc, alpha, x.b, plan.layout_a, x.a, plan.layout_b, beta, x.out,
                        plan.layout_c, x.out, plan.layout_c, &algo, dev.workspace, kWorkspaceBytes, stream);
}

void Launch(DeviceState& dev, const Plan& plan, const cublasLtMatmulAlgo_t& algo, const Operands& x,
            cudaStream_t stream) {
  CheckBlas(TryLaunch(dev, plan, algo, x, stream), "cublasLtMatmul");
}

std::vector<cublasLtMatmulHeuristicResult_t> Candidates(DeviceState& dev, const Problem& p, const Plan& plan) {
  cublasLtMatmulPreference_t pref;
  CheckBlas(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  uint64_t workspace = kWorkspaceBytes;
  uint32_t alignment = static_cast<uint32_t>(p.alignment);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    cublasLtMatmulPreferenceSetAttribute(pref, attr, &alignment, sizeof(alignment));
  }
  std::vector<cublasLtMatmulHeuristicResult_t> results(kCandidates);
  int found = 0;
  cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(dev.handle, plan.desc, plan.layout_a, plan.layout_b,
                                                         plan.layout_c, plan.layout_c, pref, kCandidates,
                                                         results.data(), &found);
  cublasLtMatmulPreferenceDestroy(pref);
  CheckBlas(status, "cublasLtMatmulAlgoGetHeuristic");
  TVM_FFI_CHECK(found > 0, RuntimeError) << "fxopt.cublaslt: no algorithm for a " << p.m << "x" << p.n << "x"
                                         << p.k << " GEMM";
  results.resize(found);
  return results;
}

// Times each candidate on the real operands (before any capture) and returns the fastest. The heuristic's
// preferences cover the alignment of A, B, C and D but not of the bias: a candidate that refuses these operands
// (CUBLAS_STATUS_NOT_SUPPORTED, e.g. for a bias pointer aligned to 2 bytes only) is skipped, not fatal.
cublasLtMatmulAlgo_t Fastest(DeviceState& dev, const Plan& plan,
                             const std::vector<cublasLtMatmulHeuristicResult_t>& candidates, const Operands& x,
                             cudaStream_t stream) {
  cudaEvent_t start, stop;
  CheckCuda(cudaEventCreate(&start), "cudaEventCreate");
  CheckCuda(cudaEventCreate(&stop), "cudaEventCreate");
  float best_ms = 1e30f;
  const cublasLtMatmulAlgo_t* best = nullptr;
  cublasStatus_t refused = CUBLAS_STATUS_SUCCESS;
  for (const auto& candidate : candidates) {
    cublasStatus_t status = TryLaunch(dev, plan, candidate.algo, x, stream);  // warm-up, and can it run?
    if (status == CUBLAS_STATUS_NOT_SUPPORTED) {
      refused = status;
      continue;
    }
    CheckBlas(status, "cublasLtMatmul");
    CheckCuda(cudaEventRecord(start, stream), "cudaEventRecord");
    for (int i = 0; i < kTimingReps; ++i) Launch(dev, plan, candidate.algo, x, stream);
    CheckCuda(cudaEventRecord(stop, stream), "cudaEventRecord");
    CheckCuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0;
    CheckCuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    if (ms < best_ms) best_ms = ms, best = &candidate.algo;
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (best == nullptr) CheckBlas(refused, "cublasLtMatmul (every heuristic candidate refused these operands)");
  return *best;
}

bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CheckCuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

DeviceState& Device(int device_id, bool capturing) {
  DeviceState& dev = states[device_id];
  if (dev.handle == nullptr) {
    TVM_FFI_CHECK(!capturing, RuntimeError) << "fxopt.cublaslt: first GEMM call inside a CUDA graph capture";
    CheckBlas(cublasLtCreate(&dev.handle), "cublasLtCreate");
    CheckCuda(cudaMalloc(&dev.workspace, kWorkspaceBytes), "cudaMalloc(workspace)");
  }
  return dev;
}

void Run(const Problem& p, const Operands& x, int device_id) {
  CheckCuda(cudaSetDevice(device_id), "cudaSetDevice");
  auto stream = static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
  std::lock_guard<std::mutex> lock(state_mutex);
  bool capturing = Capturing(stream);
  DeviceState& dev = Device(device_id, capturing);
  auto found = dev.plans.find(p.Key());
  if (found == dev.plans.end()) {
    TVM_FFI_CHECK(!capturing, RuntimeError) << "fxopt.cublaslt: a new GEMM shape inside a CUDA graph capture";
    Plan plan = MakePlan(p);
    Bind(plan, x);
    plan.algo = Fastest(dev, plan, Candidates(dev, p, plan), x, stream);
    found = dev.plans.emplace(p.Key(), plan).first;
  }
  Launch(dev, found->second, found->second.algo, x, stream);
}

void Gemm(const TensorView& a, const TensorView& b, const TensorView* bias, const TensorView& out) {
  Problem p = Describe(a, b, bias, out);
  Run(p, Operands{DataPtr(a), DataPtr(b), bias ? DataPtr(*bias) : nullptr, DataPtr(out)}, a.device().device_id);
}

void GemmFp8(const TensorView& x, const TensorView& w, const TensorView& x_scale, const TensorView& w_scale,
             const TensorView* bias, const TensorView& out) {
  Problem p = DescribeFp8(x, w, x_scale, w_scale, bias, out);
  Operands operands{DataPtr(x), DataPtr(w), bias ? DataPtr(*bias) : nullptr, DataPtr(out), DataPtr(x_scale),
                    DataPtr(w_scale)};
  Run(p, operands, x.device().device_id);
}

void GemmInt8(const TensorView& x, const TensorView& w, const TensorView& out) {
  Problem p = DescribeInt8(x, w, out);
  Run(p, Operands{DataPtr(x), DataPtr(w), nullptr, DataPtr(out)}, x.device().device_id);
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("fxopt.cublaslt.matmul", [](TensorView a, TensorView b, TensorView out) { Gemm(a, b, nullptr, out); })
      .def("fxopt.cublaslt.matmul_bias",
           [](TensorView a, TensorView b, TensorView bias, TensorView out) { Gemm(a, b, &bias, out); })
      .def("fxopt.cublaslt.matmul_fp8",
           [](TensorView x, TensorView w, TensorView xs, TensorView ws, TensorView out) {
             GemmFp8(x, w, xs, ws, nullptr, out);
           })
      .def("fxopt.cublaslt.matmul_fp8_bias",
           [](TensorView x, TensorView w, TensorView xs, TensorView ws, TensorView bias, TensorView out) {
             GemmFp8(x, w, xs, ws, &bias, out);
           })
      .def("fxopt.cublaslt.matmul_int8", [](TensorView x, TensorView w, TensorView out) { GemmInt8(x, w, out); })
      .def("fxopt.cublaslt.version", []() -> int64_t { return static_cast<int64_t>(cublasLtGetVersion()); });
}

}  // namespace fxopt_cublaslt
