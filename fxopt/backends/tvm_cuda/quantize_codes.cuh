// The code types of fxopt's row quantizations, shared by the row quantizer (quantize_rows.cu) and the
// LayerNorm kernels that write codes themselves (norm_act.cu): their largest value, how a scaled value becomes
// a code (round to nearest even; e4m3 saturates at +-448, int8 clamps to +-127), and their DLPack dtype. A row's
// scale is absmax / kMax (1 for a row of zeros) and its codes Encode(x / scale), both IEEE fp32 divisions, so
// every kernel that quantizes a row gives the same bits as fxopt.ops.quantize_rows_fp8 / quantize_rows_int8.
#pragma once

#include <cuda_fp8.h>
#include <dlpack/dlpack.h>

#include <cstdint>

namespace fxopt_codes {

struct E4m3 {
  using Code = __nv_fp8_e4m3;
  static constexpr float kMax = 448.0f;
  static constexpr const char* kName = "fxopt.fp8.quantize_rows";
  static constexpr const char* kCodes = "codes must be float8_e4m3fn";
  __device__ static Code Encode(float scaled) { return Code(scaled); }  // round to nearest even, saturating
  static bool Holds(DLDataType t) { return t.code == kDLFloat8_e4m3fn && t.bits == 8 && t.lanes == 1; }
};

struct Int8 {
  using Code = int8_t;
  static constexpr float kMax = 127.0f;
  static constexpr const char* kName = "fxopt.int8.quantize_rows";
  static constexpr const char* kCodes = "codes must be int8";
  __device__ static Code Encode(float scaled) {  // |scaled| <= 127 up to rounding: the clamp is a guard
    return static_cast<Code>(min(max(__float2int_rn(scaled), -127), 127));
  }
  static bool Holds(DLDataType t) { return t.code == kDLInt && t.bits == 8 && t.lanes == 1; }
};

// A row's scale from its absolute maximum.
template <typename Codes>
__device__ __forceinline__ float RowScale(float amax) {
  return amax > 0.f ? amax / Codes::kMax : 1.f;
}

}  // namespace fxopt_codes
