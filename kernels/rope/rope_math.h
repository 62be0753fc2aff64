// The arithmetic of one re-rotation, shared by the CPU reference (rope_ref.cc) and the CUDA kernel
// (rerotate.cu) so both round identically: the combined rotation (C, S) of a pair moving from
// (pos, inv_freq of one table) to (pos', inv_freq of another), and its application to a stored
// pair with fp32 arithmetic. Internal to kernels/rope; not part of the public API.
//
// Every product and sum here is written with explicit rounding (fma / separate multiply) so that
// neither the host compiler nor nvcc can contract it differently: CPU and GPU results are bit-equal
// whenever the double-precision sin/cos of the two libraries round to the same float (all but
// ~1 in 10^8 coefficients; docs/rope.md).
#ifndef ROPEKV_KERNELS_ROPE_ROPE_MATH_H_
#define ROPEKV_KERNELS_ROPE_ROPE_MATH_H_

#include <cstdint>

#if defined(__CUDACC__)
#define ROPEKV_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define ROPEKV_HD inline
#endif

namespace ropekv {
namespace rope_internal {

// fp32 product a*b, rounded once (never contracted into a later add).
ROPEKV_HD float MulF(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// fp32 a*b + c with one rounding.
ROPEKV_HD float FmaF(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// fp64 a*b + c with one rounding.
ROPEKV_HD double FmaD(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

ROPEKV_HD double MulD(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// The angle HF gives position `pos` with inverse frequency `inv_freq`: position_ids.float() times
// the fp32 inv_freq, an fp32 product (int64 -> float rounds to nearest even on both sides).
ROPEKV_HD float EngineAngle(int64_t pos, float inv_freq) {
  return MulF(static_cast<float>(pos), inv_freq);
}

ROPEKV_HD float AddF(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// A rotation's cos and sin, each as an unevaluated fp32 sum hi + lo of its fp64 value (so the
// rotation itself adds ~0.5 ulp, not the ~1.5 ulp of rounded coefficients and products).
struct RotCoeff {
  float c_hi, c_lo, s_hi, s_lo;
};

// The angle of the combined rotation of one pair from (from_pos, inv_from) to (to_pos, inv_to):
//   engine: delta = fl32(to_pos*inv_to) - fl32(from_pos*inv_from), the difference of the two fp32
//           angles (exact in fp64), i.e. T(p')·T(p)^T of the engine's own tables;
//   exact:  delta = to_pos*inv_to - from_pos*inv_from in fp64 ((to-from)*inv when same_table).
ROPEKV_HD double RotationDelta(bool exact, bool same_table, int64_t from_pos, float inv_from,
                               int64_t to_pos, float inv_to) {
  if (!exact) {
    return static_cast<double>(EngineAngle(to_pos, inv_to)) -
           static_cast<double>(EngineAngle(from_pos, inv_from));
  }
  if (same_table) {
    return MulD(static_cast<double>(to_pos - from_pos), static_cast<double>(inv_to));
  }
  return FmaD(static_cast<double>(to_pos), static_cast<double>(inv_to),
              -MulD(static_cast<double>(from_pos), static_cast<double>(inv_from)));
}

// The coefficients of a rotation by `delta`: sin/cos of the fp64 delta reduce it mod 2π exactly
// (libm / CUDA's Payne-Hanek path). Equal deltas, equal coefficients.
ROPEKV_HD RotCoeff DeltaCoeffs(double delta) {
  double sd, cd;
#if defined(__CUDA_ARCH__)
  sincos(delta, &sd, &cd);
#else
  sd = std::sin(delta);
  cd = std::cos(delta);
#endif
  RotCoeff k;
  k.c_hi = static_cast<float>(cd);
  k.c_lo = static_cast<float>(cd - static_cast<double>(k.c_hi));
  k.s_hi = static_cast<float>(sd);
  k.s_lo = static_cast<float>(sd - static_cast<double>(k.s_hi));
  return k;
}

// The combined rotation of one pair from (from_pos, inv_from) to (to_pos, inv_to).
ROPEKV_HD RotCoeff RotationCoeffs(bool exact, bool same_table, int64_t from_pos, float inv_from,
                                  int64_t to_pos, float inv_to) {
  return DeltaCoeffs(RotationDelta(exact, same_table, from_pos, inv_from, to_pos, inv_to));
}

// Applies the rotation to a stored pair (x1, x2) in fp32:
//   y1 = c*x1 - s*x2,  y2 = s*x1 + c*x2.
// The product that is subtracted/added is split exactly (p + e, e by fma), the lo parts of the
// coefficients enter as a correction: the result is within ~0.5 ulp (plus the rounding of one
// fma) of the fp64 rotation.
ROPEKV_HD void RotatePair(const RotCoeff& k, float x1, float x2, float* y1, float* y2) {
  const float p = MulF(k.s_hi, x2);
  const float ep = FmaF(k.s_hi, x2, -p);  // s_hi*x2 - p, exactly
  const float t = FmaF(k.c_hi, x1, -p);
  const float corr1 = FmaF(k.c_lo, x1, -FmaF(k.s_lo, x2, ep));
  *y1 = AddF(t, corr1);
  const float q = MulF(k.c_hi, x2);
  const float eq = FmaF(k.c_hi, x2, -q);  // c_hi*x2 - q, exactly
  const float u = FmaF(k.s_hi, x1, q);
  const float corr2 = FmaF(k.s_lo, x1, FmaF(k.c_lo, x2, eq));
  *y2 = AddF(u, corr2);
}

}  // namespace rope_internal
}  // namespace ropekv

#endif  // ROPEKV_KERNELS_ROPE_ROPE_MATH_H_
