// Element types of cached keys and values, and exact host-side conversions between them.
//
// Stored K/V are fp16, bf16 or fp32. CPU references compute in fp32 (or fp64) and round once to
// the storage type with round-to-nearest-even, exactly as the CUDA intrinsics __float2half_rn and
// __float2bfloat16_rn do, so a CPU result and a GPU result can be compared bit for bit.
#ifndef ROPEKV_KERNELS_COMMON_DTYPE_H_
#define ROPEKV_KERNELS_COMMON_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include "absl/strings/string_view.h"

#include "absl/status/statusor.h"

namespace ropekv {

enum class DType : uint8_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
};

// Bytes per element.
constexpr size_t DTypeSize(DType t) { return t == DType::kF32 ? 4 : 2; }

// "f32", "f16", "bf16".
absl::string_view DTypeName(DType t);

// Parses "f32"/"fp32"/"float32", "f16"/"fp16"/"float16"/"half", "bf16"/"bfloat16";
// anything else -> INVALID_ARGUMENT naming the accepted spellings.
absl::StatusOr<DType> ParseDType(absl::string_view name);

// IEEE binary16 <-> float. Round to nearest even; NaN stays NaN, overflow goes to infinity.
uint16_t FloatToHalf(float f);
float HalfToFloat(uint16_t h);

// bfloat16 <-> float. Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t FloatToBFloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float BFloat16ToFloat(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reads element i of a buffer of type t as float.
inline float LoadAsFloat(const void* p, size_t i, DType t) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kF16:
      return HalfToFloat(static_cast<const uint16_t*>(p)[i]);
    case DType::kBF16:
      return BFloat16ToFloat(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0f;
}

// Writes v, rounded once to type t, into element i.
inline void StoreFromFloat(void* p, size_t i, DType t, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      return;
    case DType::kF16:
      static_cast<uint16_t*>(p)[i] = FloatToHalf(v);
      return;
    case DType::kBF16:
      static_cast<uint16_t*>(p)[i] = FloatToBFloat16(v);
      return;
  }
}

// Rounds v to type t and back: the value a stored element of type t would hold.
inline float RoundTo(DType t, float v) {
  switch (t) {
    case DType::kF16:
      return HalfToFloat(FloatToHalf(v));
    case DType::kBF16:
      return BFloat16ToFloat(FloatToBFloat16(v));
    case DType::kF32:
      break;
  }
  return v;
}

// One unit in the last place of type t at magnitude |v| (for tolerances in tests).
double UlpOf(DType t, double v);

}  // namespace ropekv

#endif  // ROPEKV_KERNELS_COMMON_DTYPE_H_
