// CPU reference of fresh rotation and re-rotate-and-copy; also the daemon's CPU path. Plain loops;
// the per-pair arithmetic is rope_math.h's, shared with the CUDA kernel. Must not be compiled with
// floating-point contraction (see CMakeLists.txt).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/rope/rope.h"
#include "kernels/rope/rope_internal.h"
#include "kernels/rope/rope_math.h"

namespace ropekv {
namespace {

using rope_internal::DeltaCoeffs;
using rope_internal::RotatePair;
using rope_internal::RotationDelta;

// The coefficients of the last few distinct deltas of one pair. Across the tokens of a job a
// pair's delta takes very few values (kEngine: the two fp32 angles' rounding leaves 1-4 distinct
// deltas a pair over 16K moved tokens at Llama-3 frequencies; kExact on one table: one), and
// each libm sin/cos pair costs more than rotating a row: equal deltas (bit for bit) reuse the
// coefficients, which are then the same bits as computing them again.
class CoeffMemo {
 public:
  rope_internal::RotCoeff Get(double delta) {
    uint64_t bits;
    std::memcpy(&bits, &delta, sizeof(bits));
    for (int i = 0; i < kWays; ++i) {
      if (used_[i] && bits_[i] == bits) return coeff_[i];
    }
    const int i = next_;
    next_ = (next_ + 1) % kWays;
    used_[i] = true;
    bits_[i] = bits;
    coeff_[i] = DeltaCoeffs(delta);
    return coeff_[i];
  }

 private:
  static constexpr int kWays = 4;
  bool used_[kWays] = {false, false, false, false};
  uint64_t bits_[kWays] = {};
  rope_internal::RotCoeff coeff_[kWays] = {};
  int next_ = 0;
};

// Element index of pair k's two members within a head row.
inline void PairDims(PairLayout layout, int rotary_dim, int k, int* d1, int* d2) {
  if (layout == PairLayout::kNeox) {
    *d1 = k;
    *d2 = k + rotary_dim / 2;
  } else {
    *d1 = 2 * k;
    *d2 = 2 * k + 1;
  }
}

}  // namespace

namespace rope_internal {

absl::Status ValidateJobs(const RopeSpec& spec, const KvGeometry& geometry,
                          absl::Span<const RerotateCopy> jobs) {
  if (absl::Status s = ValidateRopeSpec(spec); !s.ok()) return s;
  if (geometry.layers <= 0 || geometry.kv_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("kv geometry must have layers > 0 and ",
                                                   "kv_heads > 0, got layers ", geometry.layers,
                                                   ", kv_heads ", geometry.kv_heads));
  }
  if (geometry.head_dim != spec.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("kv geometry has head_dim ", geometry.head_dim,
                                                   ", the rope spec has head_dim ", spec.head_dim));
  }
  if (static_cast<int>(geometry.dtype) > static_cast<int>(DType::kBF16)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv geometry dtype must be f32, f16 or bf16, got code ", static_cast<int>(geometry.dtype)));
  }
  for (size_t j = 0; j < jobs.size(); ++j) {
    const RerotateCopy& job = jobs[j];
    auto bad = [&](absl::string_view what, int64_t got) {
      return absl::InvalidArgumentError(
          absl::StrCat("rerotate job ", j, ": ", what, ", got ", got));
    };
    if (job.n_tokens < 0) return bad("n_tokens must be >= 0", job.n_tokens);
    if (job.n_tokens == 0) continue;
    if (job.src == nullptr) return bad("src must not be null", 0);
    if (job.dst == nullptr) return bad("dst must not be null", 0);
    if (job.src_token < 0) return bad("src_token must be >= 0", job.src_token);
    if (job.dst_token < 0) return bad("dst_token must be >= 0", job.dst_token);
    if (job.from_pos < 0) return bad("from_pos must be >= 0", job.from_pos);
    if (job.to_pos < 0) return bad("to_pos must be >= 0", job.to_pos);
    constexpr int64_t kMaxPos = int64_t{1} << 52;  // positions stay exact in fp64
    if (job.from_pos > kMaxPos - job.n_tokens)
      return bad("from_pos + n_tokens must be <= 2^52", job.from_pos);
    if (job.to_pos > kMaxPos - job.n_tokens)
      return bad("to_pos + n_tokens must be <= 2^52", job.to_pos);
    for (const KvStrides* st : {&job.src_strides, &job.dst_strides}) {
      if (st->layer < 0 || st->kv < 0 || st->head < 0 || st->token < 0) {
        return bad(absl::StrCat(st == &job.src_strides ? "src" : "dst",
                                " strides must be >= 0 (layer, kv, head, token)"),
                   std::min(std::min(st->layer, st->kv), std::min(st->head, st->token)));
      }
    }
    if (absl::Status s = ValidateRopeTable(spec, job.from_table); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("rerotate job ", j, " from_table: ", s.message()));
    }
    if (absl::Status s = ValidateRopeTable(spec, job.to_table); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("rerotate job ", j, " to_table: ", s.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace rope_internal

absl::Status ApplyRopeCpu(const RopeSpec& spec, RopeTableId table, DType dtype, int64_t n,
                          int heads, void* x, const int64_t* positions) {
  if (absl::Status s = ValidateRopeSpec(spec); !s.ok()) return s;
  if (absl::Status s = ValidateRopeTable(spec, table); !s.ok()) return s;
  if (n < 0 || heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ApplyRopeCpu needs n >= 0 and heads > 0, got n ", n, ", heads ", heads));
  }
  if (n == 0) return absl::OkStatus();
  if (x == nullptr || positions == nullptr) {
    return absl::InvalidArgumentError("ApplyRopeCpu: x and positions must not be null");
  }
  for (int64_t i = 0; i < n; ++i) {
    if (positions[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("ApplyRopeCpu: positions[", i, "] must be >= 0, got ", positions[i]));
    }
  }
  const int rotary_dim = RotaryDim(spec);
  const int half = rotary_dim / 2;
  const std::vector<float> inv_freq = InvFreq(spec, table);
  const float attention_factor = AttentionFactor(spec);
  std::vector<float> cos_t(half), sin_t(half);
  for (int64_t i = 0; i < n; ++i) {
    // HF: cos = emb.cos() * attention_scaling in fp32 (the product skipped when it is exactly 1:
    // multiplying by 1.0f is the identity).
    for (int k = 0; k < half; ++k) {
      const double angle = rope_internal::EngineAngle(positions[i], inv_freq[k]);
      cos_t[k] = static_cast<float>(std::cos(angle)) * attention_factor;
      sin_t[k] = static_cast<float>(std::sin(angle)) * attention_factor;
    }
    for (int h = 0; h < heads; ++h) {
      const size_t row = (static_cast<size_t>(i) * heads + h) * spec.head_dim;
      for (int k = 0; k < half; ++k) {
        int d1, d2;
        PairDims(spec.layout, rotary_dim, k, &d1, &d2);
        const float x1 = LoadAsFloat(x, row + d1, dtype);
        const float x2 = LoadAsFloat(x, row + d2, dtype);
        // (x * cos) + (rotate_half(x) * sin), rotate_half = (-x2, x1): fp32 products and sum.
        const float y1 = x1 * cos_t[k] + (-x2) * sin_t[k];
        const float y2 = x2 * cos_t[k] + x1 * sin_t[k];
        StoreFromFloat(x, row + d1, dtype, y1);
        StoreFromFloat(x, row + d2, dtype, y2);
      }
    }
  }
  return absl::OkStatus();
}

// Six fmaf a rotated pair (RotatePair): built for baseline x86-64 they are calls into libm, with
// FMA one instruction each (the same bits: a fused multiply-add is rounded once either way). The
// loader picks the clone the CPU runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROPEKV_FMA_CLONES __attribute__((target_clones("fma", "default")))
#else
#define ROPEKV_FMA_CLONES
#endif

namespace {

// Rows of one head's pairs in four arrays of coefficients and two of each side: RotatePair element
// by element, in a loop the compiler vectorizes (each lane the same operations, fmaf a vfmadd in
// the FMA clone: the same bits as the scalar loop).
inline void RotatePairs(int half, const float* __restrict c_hi, const float* __restrict c_lo,
                        const float* __restrict s_hi, const float* __restrict s_lo,
                        const float* __restrict x1, const float* __restrict x2,
                        float* __restrict y1, float* __restrict y2) {
  for (int k = 0; k < half; ++k) {
    const rope_internal::RotCoeff c{c_hi[k], c_lo[k], s_hi[k], s_lo[k]};
    RotatePair(c, x1[k], x2[k], &y1[k], &y2[k]);
  }
}

// Element d of a head row as float, and back rounded once (bf16 and f32 without the type switch).
inline float LoadElem(const char* row, int d, DType t) {
  if (t == DType::kBF16) return BFloat16ToFloat(reinterpret_cast<const uint16_t*>(row)[d]);
  if (t == DType::kF32) return reinterpret_cast<const float*>(row)[d];
  return LoadAsFloat(row, d, t);
}
inline void StoreElem(char* row, int d, DType t, float v) {
  if (t == DType::kBF16) {
    reinterpret_cast<uint16_t*>(row)[d] = FloatToBFloat16(v);
  } else if (t == DType::kF32) {
    reinterpret_cast<float*>(row)[d] = v;
  } else {
    StoreFromFloat(row, d, t, v);
  }
}

}  // namespace

ROPEKV_FMA_CLONES
absl::Status RerotateCopyCpu(const RopeSpec& spec, const KvGeometry& geometry,
                             absl::Span<const RerotateCopy> jobs, RerotateMode mode) {
  if (absl::Status s = rope_internal::ValidateJobs(spec, geometry, jobs); !s.ok()) return s;
  const int head_dim = geometry.head_dim;
  const int rotary_dim = RotaryDim(spec);
  const int half = rotary_dim / 2;
  const DType dtype = geometry.dtype;
  const size_t es = DTypeSize(dtype);
  const size_t row_bytes = static_cast<size_t>(head_dim) * es;
  const bool exact = mode == RerotateMode::kExact;

  std::vector<CoeffMemo> memo(half);
  // Per pair: its two dims, this token's coefficients (by part), and a row's two sides.
  std::vector<int> d1(half), d2(half);
  for (int k = 0; k < half; ++k) PairDims(spec.layout, rotary_dim, k, &d1[k], &d2[k]);
  std::vector<float> c_hi(half), c_lo(half), s_hi(half), s_lo(half);
  std::vector<float> x1(half), x2(half), y1(half), y2(half);
  const bool bf16_neox = dtype == DType::kBF16 && spec.layout == PairLayout::kNeox;
  for (const RerotateCopy& job : jobs) {
    if (job.n_tokens == 0) continue;
    const std::vector<float> inv_from = InvFreq(spec, job.from_table);
    const std::vector<float> inv_to =
        job.to_table == job.from_table ? inv_from : InvFreq(spec, job.to_table);
    const bool same_table = job.to_table == job.from_table;
    const bool identity = same_table && job.from_pos == job.to_pos;
    const char* src = static_cast<const char*>(job.src);
    char* dst = static_cast<char*>(job.dst);
    auto src_row = [&](int layer, int kv, int head, int64_t t) {
      const KvStrides& st = job.src_strides;
      return src +
             (layer * st.layer + kv * st.kv + head * st.head + (job.src_token + t) * st.token) *
                 static_cast<int64_t>(es);
    };
    auto dst_row = [&](int layer, int kv, int head, int64_t t) {
      const KvStrides& st = job.dst_strides;
      return dst +
             (layer * st.layer + kv * st.kv + head * st.head + (job.dst_token + t) * st.token) *
                 static_cast<int64_t>(es);
    };
    for (int64_t t = 0; t < job.n_tokens; ++t) {
      if (!identity) {
        for (int k = 0; k < half; ++k) {
          const rope_internal::RotCoeff c = memo[k].Get(RotationDelta(
              exact, same_table, job.from_pos + t, inv_from[k], job.to_pos + t, inv_to[k]));
          c_hi[k] = c.c_hi;
          c_lo[k] = c.c_lo;
          s_hi[k] = c.s_hi;
          s_lo[k] = c.s_lo;
        }
      }
      for (int layer = 0; layer < geometry.layers; ++layer) {
        for (int head = 0; head < geometry.kv_heads; ++head) {
          const char* k_src = src_row(layer, 0, head, t);
          char* k_dst = dst_row(layer, 0, head, t);
          if (identity) {
            if (k_dst != k_src) std::memmove(k_dst, k_src, row_bytes);
          } else {
            // Pass-through dims first (memmove handles the in-place case), then the pairs, each
            // read completely before it is written.
            if (rotary_dim < head_dim && k_dst != k_src) {
              std::memmove(k_dst + rotary_dim * es, k_src + rotary_dim * es,
                           (head_dim - rotary_dim) * es);
            }
            if (bf16_neox) {  // the pairs' two sides are the row's two halves: contiguous
              const uint16_t* r = reinterpret_cast<const uint16_t*>(k_src);
              for (int k = 0; k < half; ++k) {
                x1[k] = BFloat16ToFloat(r[k]);
                x2[k] = BFloat16ToFloat(r[half + k]);
              }
            } else {
              for (int k = 0; k < half; ++k) {
                x1[k] = LoadElem(k_src, d1[k], dtype);
                x2[k] = LoadElem(k_src, d2[k], dtype);
              }
            }
            RotatePairs(half, c_hi.data(), c_lo.data(), s_hi.data(), s_lo.data(), x1.data(),
                        x2.data(), y1.data(), y2.data());
            if (bf16_neox) {
              uint16_t* w = reinterpret_cast<uint16_t*>(k_dst);
              for (int k = 0; k < half; ++k) {
                w[k] = FloatToBFloat16(y1[k]);
                w[half + k] = FloatToBFloat16(y2[k]);
              }
            } else {
              for (int k = 0; k < half; ++k) {
                StoreElem(k_dst, d1[k], dtype, y1[k]);
                StoreElem(k_dst, d2[k], dtype, y2[k]);
              }
            }
          }
          if (!job.keys_only) {
            const char* v_src = src_row(layer, 1, head, t);
            char* v_dst = dst_row(layer, 1, head, t);
            if (v_dst != v_src) std::memmove(v_dst, v_src, row_bytes);
          }
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace ropekv
