// fxopt's 2:4 sparse GEMM: cuSPARSELt (NVIDIA's sparse tensor-core library) behind TVM-FFI global functions.
//
//   fxopt.cusparselt.load(path) -> version          open the library (dlopen; "" = $FXOPT_CUSPARSELT_LIBRARY or
//                                                   libcusparseLt.so.0), e.g. 801 for 0.8.1; needs no GPU
//   fxopt.cusparselt.prune(w, out)                  out = w with the 2 smaller magnitudes of every 4 along K zeroed
//   fxopt.cusparselt.is_pruned(w) -> bool           whether every group of 4 along K has at most 2 nonzeros
//   fxopt.cusparselt.compressed_bytes(w) -> int     the size of compress's output for a weight like w
//   fxopt.cusparselt.compress(w, out)               w [N, K] (2:4 along K) -> out uint8 [compressed_bytes(w)]
//   fxopt.cusparselt.matmul(x, wc, out)             out [..., N] = x [..., K] @ W^T, W 2:4 sparse, compressed as wc
//   fxopt.cusparselt.matmul_bias(x, wc, bias, out)  ... + bias [N], added in cuSPARSELt's epilogue
//   fxopt.cusparselt.search_log() -> str            one line per planned shape: the algorithm chosen, or why not
//   fxopt.cusparselt.form() -> str                  how the GEMM is put to cuSPARSELt ($FXOPT_CUSPARSELT_FORM)
// x, w, out and bias share one dtype, float16 or bfloat16; products accumulate in fp32. W is a linear's weight
// [N, K] (not transposed); N comes from out, K from x.
//
// In cuSPARSELt's terms the GEMM is D [N x M] = op(A) [N x K] * op(B) [K x M], A the structured (2:4) weight and
// D column-major with leading dimension N, which is the row-major out [M, N]; WeightDescriptor lists the forms.
// The compressed weight depends on A's descriptor alone, so one compression serves every M.
//
// A plan is made once per (shape, dtype, bias pointer). By default it runs cuSPARSELt's default algorithm; with
// $FXOPT_CUSPARSELT_SEARCH=1 the first plan of a shape runs cusparseLtMatmulSearch on the real operands
// (cuSPARSELt times its kernels and split-K choices and keeps the fastest) and later plans of the shape (another
// bias) reuse that choice; a search that fails without a CUDA fault falls back to the default algorithm, and
// search_log says which. Planning never happens inside a CUDA graph
// capture. Calls run on TVM's current stream. $FXOPT_CUSPARSELT_SYNC=1 synchronizes after every cuSPARSELt call.
#include <dlfcn.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/reflection/registry.h>
#include <tvm/ffi/string.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

#include "cusparselt_api.h"
#include "tensor_view.h"

namespace fxopt_cusparselt {

using fxopt_tensor::Aligned16;
using fxopt_tensor::DataPtr;
using tvm::ffi::TensorView;

constexpr const char* kSoname = "libcusparseLt.so.0";

std::mutex mutex;  // guards everything below: the library, the handles, the plans
Api api{};
void* library = nullptr;
std::string library_name;
std::string search_log;

template <typename F>
void Find(F*& slot, const char* name) {
  slot = reinterpret_cast<F*>(dlsym(library, name));
  TVM_FFI_CHECK(slot != nullptr, RuntimeError)
      << "fxopt.cusparselt: " << library_name << " has no " << name << "; it is not a cuSPARSELt >= 0.8 library";
}

// Opens cuSPARSELt once per process (the caller holds the mutex); the first library opened stays.
void Open(std::string path) {
  if (path.empty()) {
    const char* env = std::getenv("FXOPT_CUSPARSELT_LIBRARY");
    path = env != nullptr && *env ? env : kSoname;
  }
  if (library != nullptr) return;
  library = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    const char* why = dlerror();
    TVM_FFI_THROW(RuntimeError) << "fxopt.cusparselt: cannot open cuSPARSELt (" << path << "): "
                                << (why ? why : "unknown error")
                                << "; pip install nvidia-cusparselt-cu13 (PyTorch's CUDA 13 builds install it) or "
                                   "set FXOPT_CUSPARSELT_LIBRARY to its libcusparseLt.so.0";
  }
  library_name = path;
  Find(api.Init, "cusparseLtInit");
  Find(api.GetProperty, "cusparseLtGetProperty");
  Find(api.GetErrorName, "cusparseLtGetErrorName");
  Find(api.DenseDescriptorInit, "cusparseLtDenseDescriptorInit");
  Find(api.StructuredDescriptorInit, "cusparseLtStructuredDescriptorInit");
  Find(api.MatmulDescriptorInit, "cusparseLtMatmulDescriptorInit");
  Find(api.MatmulDescSetAttribute, "cusparseLtMatmulDescSetAttribute");
  Find(api.MatmulAlgSelectionInit, "cusparseLtMatmulAlgSelectionInit");
  Find(api.MatmulAlgSetAttribute, "cusparseLtMatmulAlgSetAttribute");
  Find(api.MatmulAlgGetAttribute, "cusparseLtMatmulAlgGetAttribute");
  Find(api.MatmulPlanInit, "cusparseLtMatmulPlanInit");
  Find(api.MatmulGetWorkspace, "cusparseLtMatmulGetWorkspace");
  Find(api.Matmul, "cusparseLtMatmul");
  Find(api.MatmulSearch, "cusparseLtMatmulSearch");
  Find(api.SpMMAPrune2, "cusparseLtSpMMAPrune2");
  Find(api.SpMMAPruneCheck2, "cusparseLtSpMMAPruneCheck2");
  Find(api.SpMMACompressedSize2, "cusparseLtSpMMACompressedSize2");
  Find(api.SpMMACompress2, "cusparseLtSpMMACompress2");
}

int64_t Version() {
  int major = 0, minor = 0, patch = 0;
  api.GetProperty(MAJOR_VERSION, &major);
  api.GetProperty(MINOR_VERSION, &minor);
  api.GetProperty(PATCH_LEVEL, &patch);
  return major * 1000 + minor * 100 + patch;
}

std::string StatusName(Status status) {
  const char* name = api.GetErrorName ? api.GetErrorName(status) : nullptr;
  return (name ? std::string(name) : std::string("status")) + " (" + std::to_string(status) + ")";
}

bool EnvFlag(const char* name, bool otherwise) {
  const char* value = std::getenv(name);
  return value == nullptr || *value == 0 ? otherwise : std::string(value) != "0";
}

// $FXOPT_CUSPARSELT_SYNC=1: synchronize after every cuSPARSELt call and report a CUDA error there (debugging: an
// asynchronous fault is then blamed on the call that caused it, not on a later one).
const bool kDebugSync = EnvFlag("FXOPT_CUSPARSELT_SYNC", false);
// $FXOPT_CUSPARSELT_SEARCH=1: plan each shape with cusparseLtMatmulSearch. Off by default: with cuSPARSELt 0.8.0
// (PyTorch 2.11's) on the H100 the search ends in "an illegal instruction was encountered", which loses the CUDA
// context (benchmarks/results/gpu_sparse24.md; torch's own _cslt_sparse_mm_search fails the same way).
const bool kSearch = EnvFlag("FXOPT_CUSPARSELT_SEARCH", false);

void CheckCuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << "fxopt.cusparselt: " << what << " failed: " << cudaGetErrorString(status);
  }
}

void Check(Status status, const char* what) {
  if (status != kSuccess) {
    cudaError_t cuda = cudaGetLastError();
    TVM_FFI_THROW(RuntimeError) << "fxopt.cusparselt: " << what << " failed: " << StatusName(status)
                                << (cuda != cudaSuccess ? std::string(" (CUDA: ") + cudaGetErrorString(cuda) + ")" : "");
  }
  if (kDebugSync) {
    cudaError_t cuda = cudaDeviceSynchronize();
    if (cuda != cudaSuccess) {
      TVM_FFI_THROW(RuntimeError) << "fxopt.cusparselt: CUDA error after " << what << ": " << cudaGetErrorString(cuda);
    }
  }
}

// ------------------------------------------------------------------------------------------------ operands
cudaDataType DataType(const TensorView& t, const char* name) {
  DLDataType dt = t.dtype();
  if (dt.code == kDLFloat && dt.bits == 16 && dt.lanes == 1) return CUDA_R_16F;
  if (dt.code == kDLBfloat && dt.bits == 16 && dt.lanes == 1) return CUDA_R_16BF;
  TVM_FFI_THROW(TypeError) << "fxopt.cusparselt: " << name << " must be float16 or bfloat16";
}

void CheckOnGpu(const TensorView& t, const char* name) {
  TVM_FFI_CHECK(t.device().device_type == kDLCUDA, ValueError) << "fxopt.cusparselt: " << name
                                                               << " must be on the GPU";
  TVM_FFI_CHECK(t.IsContiguous(), ValueError)
      << "fxopt.cusparselt: " << name << " must be contiguous (strides are not read); pass a .contiguous() copy";
  TVM_FFI_CHECK(Aligned16(DataPtr(t)), ValueError) << "fxopt.cusparselt: " << name << " must be 16-byte aligned";
}

int64_t Numel(const TensorView& t, int first, int last) {
  int64_t n = 1;
  for (int i = first; i < last; ++i) n *= t.shape()[i];
  return n;
}

// A weight w [N, K]: its dtype, after the shape checks every weight function makes (CheckOnGpu comes after the
// other operands' checks, so that a bad call is refused for what is wrong with it, host tensors or not).
cudaDataType DescribeWeight(const TensorView& w, int64_t* n, int64_t* k) {
  TVM_FFI_CHECK(w.ndim() == 2, ValueError) << "fxopt.cusparselt: w must be [N, K]";
  cudaDataType dtype = DataType(w, "w");
  *n = w.shape()[0];
  *k = w.shape()[1];
  TVM_FFI_CHECK(*k % 16 == 0 && *n % 16 == 0, ValueError)
      << "fxopt.cusparselt: w [N, K] needs N and K multiples of 16, got N=" << *n << ", K=" << *k;
  return dtype;
}

// ------------------------------------------------------------------------------------------------ device state
struct Plan {
  Opaque a, b, c, matmul, alg, plan;  // never moved once made: cuSPARSELt may keep pointers between them
  size_t workspace = 0;
  int64_t weight_bytes = 0;  // what compress writes for this weight shape
};

struct Choice {
  bool searched = false;
  int id = 0, split_k = 1, split_k_mode = 0, split_k_buffers = 0;
};

using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int, bool>;  // M, N, K, dtype, bias

struct DeviceState {
  Opaque handle;
  bool ready = false;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int* valid = nullptr;  // is_pruned's answer, on the device
  std::map<ShapeKey, Choice> choices;
  std::map<std::tuple<ShapeKey, const void*>, std::unique_ptr<Plan>> plans;  // by shape and bias pointer
};

std::map<int, DeviceState> states;

bool Capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  CheckCuda(cudaStreamIsCapturing(stream, &status), "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

cudaStream_t Stream(int device_id) {
  CheckCuda(cudaSetDevice(device_id), "cudaSetDevice");
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(kDLCUDA, device_id));
}

DeviceState& Device(int device_id, cudaStream_t stream) {
  Open("");
  DeviceState& dev = states[device_id];
  if (!dev.ready) {
    TVM_FFI_CHECK(!Capturing(stream), RuntimeError) << "fxopt.cusparselt: first call inside a CUDA graph capture";
    Check(api.Init(&dev.handle), "cusparseLtInit");
    CheckCuda(cudaMalloc(reinterpret_cast<void**>(&dev.valid), sizeof(int)), "cudaMalloc");
    dev.ready = true;
  }
  return dev;
}

void EnsureWorkspace(DeviceState& dev, size_t bytes) {
  if (bytes <= dev.workspace_bytes) return;
  if (dev.workspace != nullptr) {
    CheckCuda(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    CheckCuda(cudaFree(dev.workspace), "cudaFree(workspace)");
  }
  CheckCuda(cudaMalloc(&dev.workspace, bytes), "cudaMalloc(workspace)");
  dev.workspace_bytes = bytes;
}

// How the GEMM is put to cuSPARSELt ($FXOPT_CUSPARSELT_FORM; the weight's compressed layout depends on it, so
// compress and matmul must run under the same form). In every form the structured operand is A = W, stored as
// the row-major [N, K] it is, and x is the row-major [M, K] it is:
//   col (default):  all column-major: A = W as K x N, opA = T; B = x as K x M, opB = N; D = out as N x M (ld N),
//                   which is the row-major out [M, N];
//   colout:         A = W row-major N x K, opA = N; B = x row-major M x K, opB = T; D column-major N x M (ld N):
//                   mixed orders, PyTorch's _cslt_sparse_mm with transpose_result=True;
//   torch:          as colout but D row-major N x M: out's memory holds y^T [N, M] (PyTorch's default F.linear
//                   path, which transposes afterwards); for measurement only.
enum class Form { kCol, kColOut, kTorch };

Form ReadForm() {
  const char* value = std::getenv("FXOPT_CUSPARSELT_FORM");
  std::string form = value ? value : "col";
  if (form == "colout") return Form::kColOut;
  if (form == "torch") return Form::kTorch;
  return Form::kCol;
}

const Form kForm = ReadForm();

const char* FormName() { return kForm == Form::kCol ? "col" : kForm == Form::kColOut ? "colout" : "torch"; }

// The op of the structured operand, as prune and compress take it.
int WeightOp() { return kForm == Form::kCol ? kOpTranspose : kOpNonTranspose; }

// The structured descriptor of w [N, K] (2:4 along K): the one prune, compress and matmul share.
void WeightDescriptor(DeviceState& dev, Opaque* mat, int64_t n, int64_t k, cudaDataType dtype) {
  Status status = kForm == Form::kCol
                      ? api.StructuredDescriptorInit(&dev.handle, mat, k, n, k, 16, dtype, kOrderCol, kSparsity50Percent)
                      : api.StructuredDescriptorInit(&dev.handle, mat, n, k, k, 16, dtype, kOrderRow, kSparsity50Percent);
  Check(status, "cusparseLtStructuredDescriptorInit (the weight)");
}

// ------------------------------------------------------------------------------------------------ weights
void Prune(const TensorView& w, const TensorView& out) {
  int64_t n, k;
  cudaDataType dtype = DescribeWeight(w, &n, &k);
  TVM_FFI_CHECK(out.ndim() == 2 && out.shape()[0] == n && out.shape()[1] == k && DataType(out, "out") == dtype,
                ValueError)
      << "fxopt.cusparselt: prune's out must be like w";
  CheckOnGpu(w, "w");
  CheckOnGpu(out, "out");
  std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t stream = Stream(w.device().device_id);
  DeviceState& dev = Device(w.device().device_id, stream);
  Opaque mat;
  WeightDescriptor(dev, &mat, n, k, dtype);
  Check(api.SpMMAPrune2(&dev.handle, &mat, 1, WeightOp(), DataPtr(w), DataPtr(out), kPruneStrip, stream),
        "cusparseLtSpMMAPrune2");
}

bool IsPrunedLocked(DeviceState& dev, const TensorView& w, int64_t n, int64_t k, cudaDataType dtype,
                    cudaStream_t stream) {
  Opaque mat;
  WeightDescriptor(dev, &mat, n, k, dtype);
  // cuSPARSELt only raises the flag for an invalid group: it must start at 0
  CheckCuda(cudaMemsetAsync(dev.valid, 0, sizeof(int), stream), "cudaMemsetAsync");
  Check(api.SpMMAPruneCheck2(&dev.handle, &mat, 1, WeightOp(), DataPtr(w), dev.valid, stream),
        "cusparseLtSpMMAPruneCheck2");
  int invalid = 1;
  CheckCuda(cudaMemcpyAsync(&invalid, dev.valid, sizeof(int), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
  CheckCuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return invalid == 0;  // cuSPARSELt writes 0 for a valid 2:4 matrix
}

bool IsPruned(const TensorView& w) {
  int64_t n, k;
  cudaDataType dtype = DescribeWeight(w, &n, &k);
  CheckOnGpu(w, "w");
  std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t stream = Stream(w.device().device_id);
  return IsPrunedLocked(Device(w.device().device_id, stream), w, n, k, dtype, stream);
}

int64_t CompressedBytes(const TensorView& w) {
  int64_t n, k;
  cudaDataType dtype = DescribeWeight(w, &n, &k);
  CheckOnGpu(w, "w");
  std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t stream = Stream(w.device().device_id);
  DeviceState& dev = Device(w.device().device_id, stream);
  Opaque mat;
  WeightDescriptor(dev, &mat, n, k, dtype);
  size_t bytes = 0, buffer = 0;
  Check(api.SpMMACompressedSize2(&dev.handle, &mat, &bytes, &buffer), "cusparseLtSpMMACompressedSize2");
  return static_cast<int64_t>(bytes);
}

void Compress(const TensorView& w, const TensorView& out) {
  int64_t n, k;
  cudaDataType dtype = DescribeWeight(w, &n, &k);
  DLDataType ot = out.dtype();
  TVM_FFI_CHECK(ot.code == kDLUInt && ot.bits == 8 && ot.lanes == 1, TypeError)
      << "fxopt.cusparselt: compress's out must be uint8";
  CheckOnGpu(w, "w");
  CheckOnGpu(out, "out");
  std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t stream = Stream(w.device().device_id);
  DeviceState& dev = Device(w.device().device_id, stream);
  TVM_FFI_CHECK(IsPrunedLocked(dev, w, n, k, dtype, stream), ValueError)
      << "fxopt.cusparselt: w is not 2:4 sparse along K (some group of 4 has more than 2 nonzeros); prune it first";
  Opaque mat;
  WeightDescriptor(dev, &mat, n, k, dtype);
  size_t bytes = 0, buffer_bytes = 0;
  Check(api.SpMMACompressedSize2(&dev.handle, &mat, &bytes, &buffer_bytes), "cusparseLtSpMMACompressedSize2");
  TVM_FFI_CHECK(Numel(out, 0, out.ndim()) == static_cast<int64_t>(bytes), ValueError)
      << "fxopt.cusparselt: compress's out must have compressed_bytes(w) = " << bytes << " bytes";
  void* buffer = nullptr;
  if (buffer_bytes > 0) CheckCuda(cudaMalloc(&buffer, buffer_bytes), "cudaMalloc(compress buffer)");
  Status status = api.SpMMACompress2(&dev.handle, &mat, 1, WeightOp(), DataPtr(w), DataPtr(out), buffer, stream);
  cudaError_t done = cudaStreamSynchronize(stream);  // a one-time step: its faults are reported here
  if (buffer != nullptr) cudaFree(buffer);
  Check(status, "cusparseLtSpMMACompress2");
  CheckCuda(done, "cusparseLtSpMMACompress2 (its kernels)");
}

// ------------------------------------------------------------------------------------------------ the GEMM
struct Gemm {
  int64_t m, n, k;
  cudaDataType dtype;
  const void* x;
  const void* wc;
  int64_t wc_bytes;
  const void* bias;
  void* out;
  ShapeKey Key() const { return ShapeKey(m, n, k, static_cast<int>(dtype), bias != nullptr); }
};

Gemm Describe(const TensorView& x, const TensorView& wc, const TensorView* bias, const TensorView& out) {
  TVM_FFI_CHECK(x.ndim() >= 1 && out.ndim() == x.ndim(), ValueError)
      << "fxopt.cusparselt: x must be [..., K] and out [..., N] with the same leading dimensions";
  for (int i = 0; i + 1 < x.ndim(); ++i) {
    TVM_FFI_CHECK(x.shape()[i] == out.shape()[i], ValueError)
        << "fxopt.cusparselt: x and out differ in a leading dimension";
  }
  Gemm g;
  g.k = x.shape()[x.ndim() - 1];
  g.n = out.shape()[out.ndim() - 1];
  g.m = Numel(x, 0, x.ndim() - 1);
  g.dtype = DataType(x, "x");
  TVM_FFI_CHECK(DataType(out, "out") == g.dtype, TypeError) << "fxopt.cusparselt: x and out must share a dtype";
  TVM_FFI_CHECK(g.k % 16 == 0 && g.n % 16 == 0, ValueError)
      << "fxopt.cusparselt: needs N and K multiples of 16, got N=" << g.n << ", K=" << g.k;
  // cuSPARSELt's dense operands need rows, columns and leading dimension multiples of 16 bytes: 8 16-bit values
  TVM_FFI_CHECK(g.m > 0 && g.m % 8 == 0, ValueError)
      << "fxopt.cusparselt: needs the rows of x (M, the leading dimensions together) a multiple of 8, got M=" << g.m
      << " (cuSPARSELt refuses the descriptor otherwise); pad the tokens";
  DLDataType ct = wc.dtype();
  TVM_FFI_CHECK(ct.code == kDLUInt && ct.bits == 8 && ct.lanes == 1, TypeError)
      << "fxopt.cusparselt: the compressed weight must be uint8 (fxopt.cusparselt.compress's output)";
  if (bias != nullptr) {
    TVM_FFI_CHECK(DataType(*bias, "bias") == g.dtype && Numel(*bias, 0, bias->ndim()) == g.n, ValueError)
        << "fxopt.cusparselt: bias must be [N] in the dtype of out";
  }
  CheckOnGpu(x, "x");
  CheckOnGpu(wc, "the compressed weight");
  CheckOnGpu(out, "out");
  if (bias != nullptr) CheckOnGpu(*bias, "bias");
  g.x = DataPtr(x);
  g.wc = DataPtr(wc);
  g.wc_bytes = Numel(wc, 0, wc.ndim());
  g.bias = bias ? DataPtr(*bias) : nullptr;
  g.out = DataPtr(out);
  return g;
}

const float kOne = 1.0f, kZero = 0.0f;

// Descriptors, matmul and algorithm selection of g (the plan itself is initialised by the caller).
void Describe(DeviceState& dev, Plan& p, const Gemm& g) {
  WeightDescriptor(dev, &p.a, g.n, g.k, g.dtype);
  bool col = kForm == Form::kCol;
  Check(col ? api.DenseDescriptorInit(&dev.handle, &p.b, g.k, g.m, g.k, 16, g.dtype, kOrderCol)
            : api.DenseDescriptorInit(&dev.handle, &p.b, g.m, g.k, g.k, 16, g.dtype, kOrderRow),
        "cusparseLtDenseDescriptorInit (x)");
  Check(kForm == Form::kTorch ? api.DenseDescriptorInit(&dev.handle, &p.c, g.n, g.m, g.m, 16, g.dtype, kOrderRow)
                              : api.DenseDescriptorInit(&dev.handle, &p.c, g.n, g.m, g.n, 16, g.dtype, kOrderCol),
        "cusparseLtDenseDescriptorInit (out)");
  Check(api.MatmulDescriptorInit(&dev.handle, &p.matmul, col ? kOpTranspose : kOpNonTranspose,
                                 col ? kOpNonTranspose : kOpTranspose, &p.a, &p.b, &p.c, &p.c, kCompute32F),
        "cusparseLtMatmulDescriptorInit");
  if (g.bias != nullptr) {
    Check(api.MatmulDescSetAttribute(&dev.handle, &p.matmul, kAttributeBiasPointer, &g.bias, sizeof(g.bias)),
          "set the bias pointer");
  }
  Check(api.MatmulAlgSelectionInit(&dev.handle, &p.alg, &p.matmul, kAlgDefault), "cusparseLtMatmulAlgSelectionInit");
  size_t bytes = 0, buffer = 0;
  Check(api.SpMMACompressedSize2(&dev.handle, &p.a, &bytes, &buffer), "cusparseLtSpMMACompressedSize2");
  p.weight_bytes = static_cast<int64_t>(bytes);
}

void SetChoice(DeviceState& dev, Plan& p, const Choice& c) {
  Check(api.MatmulAlgSetAttribute(&dev.handle, &p.alg, kAlgConfigId, &c.id, sizeof(c.id)), "set the algorithm");
  Check(api.MatmulAlgSetAttribute(&dev.handle, &p.alg, kSplitK, &c.split_k, sizeof(c.split_k)), "set split-K");
  if (c.split_k > 1) {
    Check(api.MatmulAlgSetAttribute(&dev.handle, &p.alg, kSplitKMode, &c.split_k_mode, sizeof(c.split_k_mode)),
          "set the split-K mode");
    Check(api.MatmulAlgSetAttribute(&dev.handle, &p.alg, kSplitKBuffers, &c.split_k_buffers,
                                    sizeof(c.split_k_buffers)),
          "set the split-K buffers");
  }
}

Choice ReadChoice(DeviceState& dev, const Plan& p) {
  Choice c;
  c.searched = true;
  api.MatmulAlgGetAttribute(&dev.handle, &p.alg, kAlgConfigId, &c.id, sizeof(c.id));
  api.MatmulAlgGetAttribute(&dev.handle, &p.alg, kSplitK, &c.split_k, sizeof(c.split_k));
  api.MatmulAlgGetAttribute(&dev.handle, &p.alg, kSplitKMode, &c.split_k_mode, sizeof(c.split_k_mode));
  api.MatmulAlgGetAttribute(&dev.handle, &p.alg, kSplitKBuffers, &c.split_k_buffers, sizeof(c.split_k_buffers));
  return c;
}

void InitPlan(DeviceState& dev, Plan& p) {
  Check(api.MatmulPlanInit(&dev.handle, &p.plan, &p.matmul, &p.alg), "cusparseLtMatmulPlanInit");
  Check(api.MatmulGetWorkspace(&dev.handle, &p.plan, &p.workspace), "cusparseLtMatmulGetWorkspace");
  EnsureWorkspace(dev, p.workspace);
}

// The first plan of a shape: cuSPARSELt's search on these operands, or its default algorithm if that fails.
void Search(DeviceState& dev, Plan& p, const Gemm& g, cudaStream_t stream) {
  InitPlan(dev, p);
  cudaStream_t streams[1] = {stream};
  Status status = api.MatmulSearch(&dev.handle, &p.plan, &kOne, g.wc, g.x, &kZero, g.out, g.out, dev.workspace,
                                   streams, 1);
  std::ostringstream line;
  line << "M=" << g.m << " N=" << g.n << " K=" << g.k << (g.bias ? " bias" : "") << ": ";
  Choice choice;
  if (status == kSuccess) {
    choice = ReadChoice(dev, p);
    int max_id = -1;
    api.MatmulAlgGetAttribute(&dev.handle, &p.alg, kAlgConfigMaxId, &max_id, sizeof(max_id));
    line << "searched: algorithm " << choice.id << " of " << max_id << ", split-K " << choice.split_k << " (mode "
         << choice.split_k_mode << ", buffers " << choice.split_k_buffers << ")";
    Check(api.MatmulGetWorkspace(&dev.handle, &p.plan, &p.workspace), "cusparseLtMatmulGetWorkspace");
    EnsureWorkspace(dev, p.workspace);
  } else {
    cudaError_t cuda = cudaDeviceSynchronize();
    if (cuda != cudaSuccess) {  // a kernel fault: the context is lost, nothing more can run in this process
      search_log += line.str() + "search failed: " + StatusName(status) + ", CUDA: " + cudaGetErrorString(cuda) + "\n";
      TVM_FFI_THROW(RuntimeError) << "fxopt.cusparselt: cusparseLtMatmulSearch failed (" << StatusName(status)
                                  << ") and left a CUDA error: " << cudaGetErrorString(cuda)
                                  << "; unset FXOPT_CUSPARSELT_SEARCH to run cuSPARSELt's default algorithm";
    }
    line << "search failed (" << StatusName(status) << "): the default algorithm";
    Describe(dev, p, g);  // a fresh plan: the failed search may have left it half-set
    InitPlan(dev, p);
  }
  dev.choices[g.Key()] = choice;
  search_log += line.str() + "\n";
}

void CheckWeightBytes(const Gemm& g, const Plan& p) {
  TVM_FFI_CHECK(g.wc_bytes == p.weight_bytes, ValueError)
      << "fxopt.cusparselt: the compressed weight has " << g.wc_bytes << " bytes where a [" << g.n << ", " << g.k
      << "] weight compresses to " << p.weight_bytes << "; pass fxopt.cusparselt.compress's output for w [N, K]";
}

void Run(const Gemm& g, int device_id) {
  std::lock_guard<std::mutex> lock(mutex);
  cudaStream_t stream = Stream(device_id);
  DeviceState& dev = Device(device_id, stream);
  auto key = std::make_tuple(g.Key(), g.bias);
  auto found = dev.plans.find(key);
  if (found == dev.plans.end()) {
    TVM_FFI_CHECK(!Capturing(stream), RuntimeError) << "fxopt.cusparselt: a new GEMM shape inside a CUDA graph capture";
    auto plan = std::make_unique<Plan>();
    Describe(dev, *plan, g);
    CheckWeightBytes(g, *plan);
    auto choice = dev.choices.find(g.Key());
    if (choice == dev.choices.end() && !kSearch) {
      InitPlan(dev, *plan);
      dev.choices[g.Key()] = Choice();
      search_log += "M=" + std::to_string(g.m) + " N=" + std::to_string(g.n) + " K=" + std::to_string(g.k) +
                    (g.bias ? " bias" : "") + ": the default algorithm (no search: FXOPT_CUSPARSELT_SEARCH unset)\n";
    } else if (choice == dev.choices.end()) {
      Search(dev, *plan, g, stream);
    } else {
      if (choice->second.searched) SetChoice(dev, *plan, choice->second);
      InitPlan(dev, *plan);
    }
    found = dev.plans.emplace(key, std::move(plan)).first;
  }
  Plan& p = *found->second;
  CheckWeightBytes(g, p);
  cudaStream_t streams[1] = {stream};
  Check(api.Matmul(&dev.handle, &p.plan, &kOne, g.wc, g.x, &kZero, g.out, g.out, dev.workspace, streams, 1),
        "cusparseLtMatmul");
}

TVM_FFI_STATIC_INIT_BLOCK() {
  namespace refl = tvm::ffi::reflection;
  refl::GlobalDef()
      .def("fxopt.cusparselt.load",
           [](tvm::ffi::String path) -> int64_t {
             std::lock_guard<std::mutex> lock(mutex);
             Open(std::string(path));
             return Version();
           })
      .def("fxopt.cusparselt.prune", [](TensorView w, TensorView out) { Prune(w, out); })
      .def("fxopt.cusparselt.is_pruned", [](TensorView w) -> bool { return IsPruned(w); })
      .def("fxopt.cusparselt.compressed_bytes", [](TensorView w) -> int64_t { return CompressedBytes(w); })
      .def("fxopt.cusparselt.compress", [](TensorView w, TensorView out) { Compress(w, out); })
      .def("fxopt.cusparselt.matmul",
           [](TensorView x, TensorView wc, TensorView out) { Run(Describe(x, wc, nullptr, out), x.device().device_id); })
      .def("fxopt.cusparselt.matmul_bias",
           [](TensorView x, TensorView wc, TensorView bias, TensorView out) {
             Run(Describe(x, wc, &bias, out), x.device().device_id);
           })
      .def("fxopt.cusparselt.form", []() -> tvm::ffi::String { return tvm::ffi::String(FormName()); })
      .def("fxopt.cusparselt.search_log", []() -> tvm::ffi::String {
        std::lock_guard<std::mutex> lock(mutex);
        return tvm::ffi::String(search_log);
      });
}

}  // namespace fxopt_cusparselt
