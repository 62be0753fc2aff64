// Scalar helpers shared bit for bit by the CPU reference and the CUDA kernels of kernels/topk:
// outward rounding of page metadata and the order-preserving key of a score. Host and device.
#ifndef ROPEKV_KERNELS_TOPK_TOPK_MATH_H_
#define ROPEKV_KERNELS_TOPK_TOPK_MATH_H_

#include <cstdint>
#include <cstring>

#include "kernels/common/dtype.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ROPEKV_TOPK_HD __host__ __device__ __forceinline__
#else
#define ROPEKV_TOPK_HD inline
#endif

namespace ropekv {
namespace topk {
namespace internal {

ROPEKV_TOPK_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

ROPEKV_TOPK_HD float BitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// Round to nearest even into a 16-bit type (kF16 or kBF16), as bits.
ROPEKV_TOPK_HD uint16_t Rne16(DType t, float v) {
  if (t == DType::kBF16) {
    uint32_t u = FloatBits(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(v));
#else
  return FloatToHalf(v);
#endif
}

ROPEKV_TOPK_HD float Widen16(DType t, uint16_t b) {
  if (t == DType::kBF16) return BitsFloat(static_cast<uint32_t>(b) << 16);
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(b));
#else
  return HalfToFloat(b);
#endif
}

// The value of type t nearest to v in the direction `up` (the smallest value >= v, or the
// largest <= v), returned as a float that t represents exactly. Zeros come out as +0 when
// rounding up and -0 when rounding down, so that max/min over rounded values does not depend on
// the order of the operands. v must not be NaN.
ROPEKV_TOPK_HD float RoundOutward(DType t, float v, bool up) {
  float r = v;
  if (t != DType::kF32) {
    uint16_t b = Rne16(t, v);
    const float w = Widen16(t, b);
    if (up && w < v) {
      // Next value up: +0 and positives grow in magnitude, negatives shrink; -0 -> +min.
      b = (b == 0x8000u) ? 1u : ((b & 0x8000u) ? b - 1u : b + 1u);
    } else if (!up && w > v) {
      b = (b == 0x0000u) ? 0x8001u : ((b & 0x8000u) ? b + 1u : b - 1u);
    }
    r = Widen16(t, b);
  }
  if (r == 0.0f) r = up ? 0.0f : -0.0f;
  return r;
}

// Key whose unsigned order is the order of scores: NaN counts as -inf, -0 as +0. Every score
// gets a key >= 0x007fffff (-inf); key 0 is free to mean "excluded".
ROPEKV_TOPK_HD uint32_t OrderKey(float f) {
  if (f != f) f = BitsFloat(0xff800000u);
  if (f == 0.0f) f = 0.0f;
  const uint32_t u = FloatBits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of OrderKey for keys it produced.
ROPEKV_TOPK_HD float KeyToFloat(uint32_t key) {
  return BitsFloat((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

}  // namespace internal
}  // namespace topk
}  // namespace ropekv

#endif  // ROPEKV_KERNELS_TOPK_TOPK_MATH_H_
