// The part of cuSPARSELt's C API that cusparselt_gemm.cc calls, declared here because the library is opened at
// run time (dlopen): the extension builds without cuSPARSELt's headers and loads where the library is absent.
//
// The declarations follow cuSPARSELt's documented ABI, identical in 0.8.1 (PyTorch 2.11's dependency) and 0.10.0.
// The opaque structures are 512 bytes in those releases; they are declared 4096 bytes here, since cuSPARSELt
// writes into them through a pointer and never copies them, so a release with larger ones stays safe.
// tests/backends/test_tvm_cuda_sparse24.py compares these values with the real cusparseLt.h where one is present.
#pragma once

#include <cuda_runtime_api.h>
#include <library_types.h>

#include <cstddef>
#include <cstdint>

namespace fxopt_cusparselt {

struct alignas(16) Opaque {
  uint8_t data[4096];
};

// cusparseStatus_t, cusparseOperation_t and cusparseOrder_t (cusparse.h), and cuSPARSELt's own enums: int-sized.
using Status = int;
constexpr Status kSuccess = 0;
constexpr Status kNotSupported = 10;
constexpr int kOpNonTranspose = 0, kOpTranspose = 1;
constexpr int kOrderCol = 1, kOrderRow = 2;
constexpr int kSparsity50Percent = 0;
constexpr int kCompute32F = 2;  // CUSPARSE_COMPUTE_32F
constexpr int kAttributeBiasPointer = 8;  // CUSPARSELT_MATMUL_BIAS_POINTER
constexpr int kAlgDefault = 0;  // CUSPARSELT_MATMUL_ALG_DEFAULT
// cusparseLtMatmulAlgAttribute_t
constexpr int kAlgConfigId = 0, kAlgConfigMaxId = 1, kSearchIterations = 2, kSplitK = 3, kSplitKMode = 4,
              kSplitKBuffers = 5;
constexpr int kPruneStrip = 1;  // CUSPARSELT_PRUNE_SPMMA_STRIP: 2 of every 4 along the reduction dimension

// The functions, as pointers found with dlsym (the names are cuSPARSELt's; the types are those of cusparseLt.h,
// enums passed as int, descriptors as Opaque).
struct Api {
  Status (*Init)(Opaque* handle);
  Status (*GetProperty)(libraryPropertyType type, int* value);
  const char* (*GetErrorName)(Status status);
  Status (*DenseDescriptorInit)(const Opaque* handle, Opaque* mat, int64_t rows, int64_t cols, int64_t ld,
                                uint32_t alignment, cudaDataType type, int order);
  Status (*StructuredDescriptorInit)(const Opaque* handle, Opaque* mat, int64_t rows, int64_t cols, int64_t ld,
                                     uint32_t alignment, cudaDataType type, int order, int sparsity);
  Status (*MatmulDescriptorInit)(const Opaque* handle, Opaque* matmul, int op_a, int op_b, const Opaque* a,
                                 const Opaque* b, const Opaque* c, const Opaque* d, int compute);
  Status (*MatmulDescSetAttribute)(const Opaque* handle, Opaque* matmul, int attribute, const void* data,
                                   size_t size);
  Status (*MatmulAlgSelectionInit)(const Opaque* handle, Opaque* alg, const Opaque* matmul, int algorithm);
  Status (*MatmulAlgSetAttribute)(const Opaque* handle, Opaque* alg, int attribute, const void* data, size_t size);
  Status (*MatmulAlgGetAttribute)(const Opaque* handle, const Opaque* alg, int attribute, void* data, size_t size);
  Status (*MatmulPlanInit)(const Opaque* handle, Opaque* plan, const Opaque* matmul, const Opaque* alg);
  Status (*MatmulGetWorkspace)(const Opaque* handle, const Opaque* plan, size_t* size);
  Status (*Matmul)(const Opaque* handle, const Opaque* plan, const void* alpha, const void* a, const void* b,
                   const void* beta, const void* c, void* d, void* workspace, cudaStream_t* streams, int32_t count);
  Status (*MatmulSearch)(const Opaque* handle, Opaque* plan, const void* alpha, const void* a, const void* b,
                         const void* beta, const void* c, void* d, void* workspace, cudaStream_t* streams,
                         int32_t count);
  Status (*SpMMAPrune2)(const Opaque* handle, const Opaque* mat, int is_sparse_a, int op, const void* in, void* out,
                        int algorithm, cudaStream_t stream);
  Status (*SpMMAPruneCheck2)(const Opaque* handle, const Opaque* mat, int is_sparse_a, int op, const void* in,
                             int* d_valid, cudaStream_t stream);
  Status (*SpMMACompressedSize2)(const Opaque* handle, const Opaque* mat, size_t* size, size_t* buffer_size);
  Status (*SpMMACompress2)(const Opaque* handle, const Opaque* mat, int is_sparse_a, int op, const void* dense,
                           void* compressed, void* buffer, cudaStream_t stream);
};

}  // namespace fxopt_cusparselt
