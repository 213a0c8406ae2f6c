// Host helpers every source of fxopt's CUDA extension uses on the tensors it is passed (tvm::ffi::TensorView).
#pragma once

#include <tvm/ffi/container/tensor.h>

#include <cstdint>

namespace fxopt_tensor {

// The first element's address: the data pointer plus the view's byte offset.
inline void* DataPtr(const tvm::ffi::TensorView& t) { return static_cast<char*>(t.data_ptr()) + t.byte_offset(); }

inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace fxopt_tensor
