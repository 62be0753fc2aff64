// Tests of ApplyRopeCpu and RerotateCopyCpu, each against a reference computed another way:
// fp64 rotations of the engine's fp32 angles, fresh rotations of the pre-RoPE key, exact dot
// products. A TEST_P grid over dtype x layout x head_dim x rotary_dim x rope_type (with tables)
// and positions {0, 1, 255, 256, 257, 8191, 8192, 32767, 131071, 1048575} in every order
// (negative deltas included). Outputs are poisoned (0xFF bytes: NaN) before every call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace {

constexpr int64_t kPositions[] = {0, 1, 255, 256, 257, 8191, 8192, 32767, 131071, 1048575};

// A KV region [layers][2][heads][tokens][head_dim] of one dtype.
class KvBuffer {
 public:
  KvBuffer(int layers, int heads, int tokens, int head_dim, DType dtype)
      : layers_(layers),
        heads_(heads),
        tokens_(tokens),
        head_dim_(head_dim),
        dtype_(dtype),
        bytes_(static_cast<size_t>(layers) * 2 * heads * tokens * head_dim * DTypeSize(dtype)) {}

  KvStrides strides() const {
    return {int64_t{2} * heads_ * tokens_ * head_dim_, int64_t{heads_} * tokens_ * head_dim_,
            int64_t{tokens_} * head_dim_, head_dim_};
  }
  size_t Index(int layer, int kv, int head, int token, int dim) const {
    const KvStrides s = strides();
    return layer * s.layer + kv * s.kv + head * s.head + token * s.token + dim;
  }
  float Get(int layer, int kv, int head, int token, int dim) const {
    return LoadAsFloat(bytes_.data(), Index(layer, kv, head, token, dim), dtype_);
  }
  void Set(int layer, int kv, int head, int token, int dim, float v) {
    StoreFromFloat(bytes_.data(), Index(layer, kv, head, token, dim), dtype_, v);
  }
  // Random values in +-[0.05, 2] (never zero), rounded to the dtype.
  void FillRandom(std::mt19937_64& rng) {
    std::uniform_real_distribution<float> mag(0.05f, 2.0f);
    std::bernoulli_distribution sign(0.5);
    for (size_t i = 0; i < bytes_.size() / DTypeSize(dtype_); ++i) {
      const float v = mag(rng) * (sign(rng) ? -1.0f : 1.0f);
      StoreFromFloat(bytes_.data(), i, dtype_, v);
    }
  }
  void Poison() { std::fill(bytes_.begin(), bytes_.end(), 0xFF); }
  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }
  const std::vector<uint8_t>& bytes() const { return bytes_; }
  int layers() const { return layers_; }
  int heads() const { return heads_; }
  int tokens() const { return tokens_; }
  int head_dim() const { return head_dim_; }
  DType dtype() const { return dtype_; }
  KvGeometry geometry() const { return {layers_, heads_, head_dim_, dtype_}; }

 private:
  int layers_, heads_, tokens_, head_dim_;
  DType dtype_;
  std::vector<uint8_t> bytes_;
};

// Rotates every key of `buf` freshly (ApplyRopeCpu) at positions pos0 + token, in buf's dtype.
void RotateKeysFresh(const RopeSpec& spec, RopeTableId table, int64_t pos0, KvBuffer* buf) {
  std::vector<float> row(buf->head_dim());
  for (int l = 0; l < buf->layers(); ++l) {
    for (int h = 0; h < buf->heads(); ++h) {
      for (int t = 0; t < buf->tokens(); ++t) {
        for (int d = 0; d < buf->head_dim(); ++d) row[d] = buf->Get(l, 0, h, t, d);
        const int64_t pos = pos0 + t;
        // fp32 math (ApplyRopeCpu on an fp32 row), then one rounding by Set.
        ASSERT_TRUE(ApplyRopeCpu(spec, table, DType::kF32, 1, 1, row.data(), &pos).ok());
        for (int d = 0; d < buf->head_dim(); ++d) buf->Set(l, 0, h, t, d, row[d]);
      }
    }
  }
}

// The fresh fp32 rotation of row `x` (fp32 values) at `pos`.
std::vector<float> FreshRow(const RopeSpec& spec, RopeTableId table, int64_t pos,
                            std::vector<float> x) {
  EXPECT_TRUE(ApplyRopeCpu(spec, table, DType::kF32, 1, 1, x.data(), &pos).ok());
  return x;
}

// Pair k's dims.
std::pair<int, int> PairDims(const RopeSpec& spec, int k) {
  const int r = RotaryDim(spec);
  if (spec.layout == PairLayout::kNeox) return {k, k + r / 2};
  return {2 * k, 2 * k + 1};
}

RerotateCopy Job(const KvBuffer& src, KvBuffer* dst, int64_t n, int64_t from, RopeTableId ft,
                 int64_t to, RopeTableId tt) {
  RerotateCopy j;
  j.src = src.data();
  j.src_strides = src.strides();
  j.dst = dst->data();
  j.dst_strides = dst->strides();
  j.n_tokens = n;
  j.from_pos = from;
  j.from_table = ft;
  j.to_pos = to;
  j.to_table = tt;
  return j;
}

// rope_type cases of the grid; tables (from, to) of a re-rotation.
enum class Case {
  kDefault,
  kLinear,
  kDynamicBelow,  // both tables the base table
  kDynamicAbove,  // grown tables, across two of them
  kLlama3,
  kYarn,
  kYarnMscale,
  kLongRopeShort,
  kLongRopeLong,  // short -> long: across two tables
};

const char* CaseName(Case c) {
  switch (c) {
    case Case::kDefault:
      return "default";
    case Case::kLinear:
      return "linear";
    case Case::kDynamicBelow:
      return "dynamic_below";
    case Case::kDynamicAbove:
      return "dynamic_above";
    case Case::kLlama3:
      return "llama3";
    case Case::kYarn:
      return "yarn";
    case Case::kYarnMscale:
      return "yarn_mscale";
    case Case::kLongRopeShort:
      return "longrope_short";
    case Case::kLongRopeLong:
      return "longrope_long";
  }
  return "?";
}

RopeSpec SpecFor(Case c, int head_dim, int rotary_dim, PairLayout layout) {
  RopeSpec s;
  s.head_dim = head_dim;
  s.rotary_dim = rotary_dim;
  s.layout = layout;
  switch (c) {
    case Case::kDefault:
      s.theta = 10000.0;
      break;
    case Case::kLinear:
      s.type = RopeType::kLinear;
      s.factor = 4.0;
      break;
    case Case::kDynamicBelow:
    case Case::kDynamicAbove:
      s.type = RopeType::kDynamic;
      s.factor = 2.0;
      s.max_position_embeddings = 4096;
      break;
    case Case::kLlama3:
      s.type = RopeType::kLlama3;
      s.theta = 500000.0;
      s.factor = 8.0;
      s.original_max_position_embeddings = 8192;
      break;
    case Case::kYarn:
      s.type = RopeType::kYarn;
      s.theta = 1000000.0;
      s.factor = 4.0;
      s.original_max_position_embeddings = 32768;
      break;
    case Case::kYarnMscale:
      s.type = RopeType::kYarn;
      s.theta = 10000.0;
      s.factor = 40.0;
      s.original_max_position_embeddings = 4096;
      s.mscale = 1.0;
      s.mscale_all_dim = 0.5;  // attention_factor ~1.15, != 1 on purpose
      s.beta_fast = 32;
      s.beta_slow = 1;
      break;
    case Case::kLongRopeShort:
    case Case::kLongRopeLong:
      s.type = RopeType::kLongRope;
      s.max_position_embeddings = 131072;
      s.original_max_position_embeddings = 4096;
      s.factor = 0.0;  // derived: 32
      for (int i = 0; i < RotaryDim(s) / 2; ++i) {
        s.short_factor.push_back(1.0 + 0.03 * i);
        s.long_factor.push_back(1.0 + 1.7 * i);
      }
      break;
  }
  return s;
}

std::pair<RopeTableId, RopeTableId> TablesFor(Case c) {
  if (c == Case::kDynamicAbove) return {20000, 40000};
  if (c == Case::kLongRopeLong) return {kLongRopeShortTable, kLongRopeLongTable};
  return {0, 0};
}

using Param = std::tuple<DType, PairLayout, int /*head_dim*/, int /*rotary divisor*/, Case>;

class RerotateGridTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    const auto [dtype, layout, head_dim, div, c] = GetParam();
    dtype_ = dtype;
    case_ = c;
    spec_ = SpecFor(c, head_dim, head_dim / div, layout);
    ASSERT_TRUE(ValidateRopeSpec(spec_).ok()) << ValidateRopeSpec(spec_);
    std::tie(from_table_, to_table_) = TablesFor(c);
    rng_.seed(0x5eed0000u + static_cast<uint32_t>(std::hash<std::string>()(
                                ::testing::UnitTest::GetInstance()->current_test_info()->name())));
  }

  // Tolerance in ulps of the storage type (of the pair's larger element).
  double UlpTol() const { return dtype_ == DType::kF32 ? 4.0 : 2.0; }

  DType dtype_;
  Case case_;
  RopeSpec spec_;
  RopeTableId from_table_ = 0, to_table_ = 0;
  std::mt19937_64 rng_;
  static constexpr int kLayers = 2, kHeads = 2, kTokens = 2;
};

// rerotate(k, p, p) is a bit-exact copy (K and V), for every p and table.
TEST_P(RerotateGridTest, SamePositionIsBitExactCopy) {
  KvBuffer src(kLayers, kHeads, kTokens, spec_.head_dim, dtype_);
  src.FillRandom(rng_);
  for (RopeTableId table : {from_table_, to_table_}) {
    for (int64_t p : kPositions) {
      KvBuffer dst(kLayers, kHeads, kTokens, spec_.head_dim, dtype_);
      dst.Poison();
      const RerotateCopy job = Job(src, &dst, kTokens, p, table, p, table);
      for (RerotateMode mode : {RerotateMode::kEngine, RerotateMode::kExact}) {
        ASSERT_TRUE(RerotateCopyCpu(spec_, src.geometry(), {&job, 1}, mode).ok());
        EXPECT_EQ(dst.bytes(), src.bytes()) << "p " << p << " table " << table;
      }
    }
  }
}

// Re-rotated key == fresh rotation of the pre-RoPE key at the target (tolerance: fp32 4 ulp,
// fp16/bf16 2 ulp of the pair's larger element); values and pass-through dims bit-exact; pair
// norms preserved (the attention_factor inside stored keys is not applied again); the engine-mode
// result is within 1 ulp (+ fp32 noise) of the fp64 rotation by the difference of fp32 angles.
TEST_P(RerotateGridTest, EqualsFreshRotationAtTarget) {
  const int head_dim = spec_.head_dim;
  const int rotary_dim = RotaryDim(spec_);
  const std::vector<float> inv_from = InvFreq(spec_, from_table_);
  const std::vector<float> inv_to = InvFreq(spec_, to_table_);
  const float af = AttentionFactor(spec_);
  KvBuffer pre(kLayers, kHeads, kTokens, head_dim, dtype_);
  pre.FillRandom(rng_);
  double worst_fresh = 0, worst_ref = 0;
  for (int64_t from : kPositions) {
    KvBuffer stored = pre;
    RotateKeysFresh(spec_, from_table_, from, &stored);
    for (int64_t to : kPositions) {
      KvBuffer dst(kLayers, kHeads, kTokens, head_dim, dtype_);
      dst.Poison();
      const RerotateCopy job = Job(stored, &dst, kTokens, from, from_table_, to, to_table_);
      ASSERT_TRUE(RerotateCopyCpu(spec_, stored.geometry(), {&job, 1}).ok());
      for (int l = 0; l < kLayers; ++l) {
        for (int h = 0; h < kHeads; ++h) {
          for (int t = 0; t < kTokens; ++t) {
            std::vector<float> x(head_dim);
            for (int d = 0; d < head_dim; ++d) x[d] = pre.Get(l, 0, h, t, d);
            const std::vector<float> fresh = FreshRow(spec_, to_table_, to + t, x);
            for (int d = rotary_dim; d < head_dim; ++d) {
              ASSERT_EQ(dst.Get(l, 0, h, t, d), stored.Get(l, 0, h, t, d)) << "pass dim " << d;
            }
            for (int d = 0; d < head_dim; ++d) {
              ASSERT_EQ(dst.Get(l, 1, h, t, d), stored.Get(l, 1, h, t, d)) << "value dim " << d;
            }
            for (int k = 0; k < rotary_dim / 2; ++k) {
              const auto [d1, d2] = PairDims(spec_, k);
              const double y1 = dst.Get(l, 0, h, t, d1), y2 = dst.Get(l, 0, h, t, d2);
              const double s1 = stored.Get(l, 0, h, t, d1), s2 = stored.Get(l, 0, h, t, d2);
              // fp64 reference: rotation by the difference of the engine's fp32 angles.
              const double delta = static_cast<double>(static_cast<float>(to + t) * inv_to[k]) -
                                   static_cast<double>(static_cast<float>(from + t) * inv_from[k]);
              const double r1 = std::cos(delta) * s1 - std::sin(delta) * s2;
              const double r2 = std::sin(delta) * s1 + std::cos(delta) * s2;
              const double ulp_ref = UlpOf(dtype_, std::max(std::fabs(r1), std::fabs(r2)));
              const double err_ref = std::max(std::fabs(y1 - r1), std::fabs(y2 - r2)) / ulp_ref;
              worst_ref = std::max(worst_ref, err_ref);
              // Fresh rotation in fp32 math. The unit is the ulp of the pair's larger element
              // before or after the move: the stored key's own rounding error (relative to its
              // magnitude) moves with it.
              const double f1 = fresh[d1], f2 = fresh[d2];
              const double ulp = UlpOf(
                  dtype_, std::max({std::fabs(f1), std::fabs(f2), std::fabs(s1), std::fabs(s2)}));
              const double err = std::max(std::fabs(y1 - f1), std::fabs(y2 - f2)) / ulp;
              worst_fresh = std::max(worst_fresh, err);
              ASSERT_LE(err, UlpTol()) << "from " << from << " to " << to << " l" << l << " h" << h
                                       << " t" << t << " pair " << k << ": got (" << y1 << ", "
                                       << y2 << ") fresh (" << f1 << ", " << f2 << ")";
              // Norm preserved: |y| == |stored| up to rounding (an extra attention_factor would
              // scale it by af).
              const double n_y = std::hypot(y1, y2), n_s = std::hypot(s1, s2);
              ASSERT_LE(std::fabs(n_y - n_s), 2 * ulp)
                  << "norm " << n_s << " -> " << n_y << " (attention_factor " << af << ")";
            }
          }
        }
      }
    }
  }
  // One rounding to the storage type (0.5 ulp); fp32 keys: the rounding of one fma before the
  // final add (bound 1.5 ulp, measured <= 1).
  EXPECT_LE(worst_ref, dtype_ == DType::kF32 ? 1.5 : 0.51) << "vs fp64 rotation";
  RecordProperty("worst_ulp_vs_fresh", absl::StrCat(worst_fresh));
  RecordProperty("worst_ulp_vs_fp64", absl::StrCat(worst_ref));
}

// p -> q -> p returns within 2 ulp; composition R(a)R(b) = R(a+b): p->q->r (fp32 keys) matches the
// fp64 rotation by the total angle, and so does p->r directly.
TEST_P(RerotateGridTest, RoundTripAndComposition) {
  const int head_dim = spec_.head_dim;
  const int rotary_dim = RotaryDim(spec_);
  KvBuffer k0(kLayers, kHeads, kTokens, head_dim, dtype_);
  k0.FillRandom(rng_);
  const std::vector<float> inv_from = InvFreq(spec_, from_table_);
  const std::vector<float> inv_to = InvFreq(spec_, to_table_);
  double worst_round_trip = 0;
  for (int64_t p : kPositions) {
    for (int64_t q : kPositions) {
      KvBuffer k1(kLayers, kHeads, kTokens, head_dim, dtype_), k2 = k1;
      k1.Poison();
      k2.Poison();
      RerotateCopy there = Job(k0, &k1, kTokens, p, from_table_, q, to_table_);
      RerotateCopy back = Job(k1, &k2, kTokens, q, to_table_, p, from_table_);
      ASSERT_TRUE(RerotateCopyCpu(spec_, k0.geometry(), {&there, 1}).ok());
      ASSERT_TRUE(RerotateCopyCpu(spec_, k0.geometry(), {&back, 1}).ok());
      for (int l = 0; l < kLayers; ++l) {
        for (int h = 0; h < kHeads; ++h) {
          for (int t = 0; t < kTokens; ++t) {
            for (int k = 0; k < rotary_dim / 2; ++k) {
              const auto [d1, d2] = PairDims(spec_, k);
              const double a1 = k0.Get(l, 0, h, t, d1), a2 = k0.Get(l, 0, h, t, d2);
              const double b1 = k2.Get(l, 0, h, t, d1), b2 = k2.Get(l, 0, h, t, d2);
              const double ulp = UlpOf(dtype_, std::max(std::fabs(a1), std::fabs(a2)));
              const double err = std::max(std::fabs(a1 - b1), std::fabs(a2 - b2));
              worst_round_trip = std::max(worst_round_trip, err / ulp);
              ASSERT_LE(err, 2 * ulp) << p << " -> " << q << " -> " << p << " pair " << k;
            }
          }
        }
      }
    }
  }
  RecordProperty("worst_ulp_round_trip", absl::StrCat(worst_round_trip));
  if (dtype_ != DType::kF32) return;
  // Composition in fp32, same table, three positions.
  const std::vector<float> inv = InvFreq(spec_, from_table_);
  const int64_t p = 257, q = 131071, r = 8191;
  KvBuffer a(kLayers, kHeads, kTokens, head_dim, dtype_), b = a, direct = a;
  a.Poison();
  b.Poison();
  direct.Poison();
  RerotateCopy j1 = Job(k0, &a, kTokens, p, from_table_, q, from_table_);
  RerotateCopy j2 = Job(a, &b, kTokens, q, from_table_, r, from_table_);
  RerotateCopy j3 = Job(k0, &direct, kTokens, p, from_table_, r, from_table_);
  for (RerotateMode mode : {RerotateMode::kEngine, RerotateMode::kExact}) {
    ASSERT_TRUE(RerotateCopyCpu(spec_, k0.geometry(), {&j1, 1}, mode).ok());
    ASSERT_TRUE(RerotateCopyCpu(spec_, k0.geometry(), {&j2, 1}, mode).ok());
    ASSERT_TRUE(RerotateCopyCpu(spec_, k0.geometry(), {&j3, 1}, mode).ok());
    for (int t = 0; t < kTokens; ++t) {
      for (int k = 0; k < rotary_dim / 2; ++k) {
        const auto [d1, d2] = PairDims(spec_, k);
        double total;
        if (mode == RerotateMode::kEngine) {
          total = static_cast<double>(static_cast<float>(r + t) * inv[k]) -
                  static_cast<double>(static_cast<float>(p + t) * inv[k]);
        } else {
          total = static_cast<double>(r - p) * inv[k];
        }
        const double x1 = k0.Get(0, 0, 1, t, d1), x2 = k0.Get(0, 0, 1, t, d2);
        const double r1 = std::cos(total) * x1 - std::sin(total) * x2;
        const double r2 = std::sin(total) * x1 + std::cos(total) * x2;
        const double ulp = UlpOf(dtype_, std::max(std::fabs(r1), std::fabs(r2)));
        EXPECT_LE(std::fabs(b.Get(0, 0, 1, t, d1) - r1), 4 * ulp) << "chained pair " << k;
        EXPECT_LE(std::fabs(b.Get(0, 0, 1, t, d2) - r2), 4 * ulp) << "chained pair " << k;
        EXPECT_LE(std::fabs(direct.Get(0, 0, 1, t, d1) - r1), 2 * ulp) << "direct pair " << k;
        EXPECT_LE(std::fabs(direct.Get(0, 0, 1, t, d2) - r2), 2 * ulp) << "direct pair " << k;
      }
    }
  }
}

// Exact mode: q·k unchanged (fp64 dot products) when q and k move by the same delta.
TEST_P(RerotateGridTest, ExactModePreservesDotProducts) {
  if (from_table_ != to_table_) GTEST_SKIP() << "q.k changes across tables by design";
  const int head_dim = spec_.head_dim;
  KvBuffer q0(1, kHeads, kTokens, head_dim, dtype_), k0 = q0;
  q0.FillRandom(rng_);
  k0.FillRandom(rng_);
  for (int64_t pq : {int64_t{3}, int64_t{8191}, int64_t{1048575}}) {
    for (int64_t pk : {int64_t{0}, int64_t{257}, int64_t{131071}}) {
      for (int64_t delta : {int64_t{-3}, int64_t{1}, int64_t{4096}, int64_t{100003}}) {
        if (pq + delta < 0 || pk + delta < 0) continue;
        KvBuffer q1 = q0, k1 = k0;
        q1.Poison();
        k1.Poison();
        RerotateCopy jq = Job(q0, &q1, kTokens, pq, from_table_, pq + delta, from_table_);
        RerotateCopy jk = Job(k0, &k1, kTokens, pk, from_table_, pk + delta, from_table_);
        ASSERT_TRUE(RerotateCopyCpu(spec_, q0.geometry(), {&jq, 1}, RerotateMode::kExact).ok());
        ASSERT_TRUE(RerotateCopyCpu(spec_, q0.geometry(), {&jk, 1}, RerotateMode::kExact).ok());
        for (int h = 0; h < kHeads; ++h) {
          for (int t = 0; t < kTokens; ++t) {
            double before = 0, after = 0, bound = 0;
            for (int d = 0; d < head_dim; ++d) {
              const double a = q0.Get(0, 0, h, t, d), b = k0.Get(0, 0, h, t, d);
              const double a1 = q1.Get(0, 0, h, t, d), b1 = k1.Get(0, 0, h, t, d);
              before += a * b;
              after += a1 * b1;
              // Each moved element is within ~0.5 ulp (+ fp32 noise) of its exact value.
              bound += std::fabs(a1) * UlpOf(dtype_, b1) + std::fabs(b1) * UlpOf(dtype_, a1);
            }
            ASSERT_NEAR(after, before, bound + 1e-12)
                << "pq " << pq << " pk " << pk << " delta " << delta;
          }
        }
      }
    }
  }
}

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  const auto [dtype, layout, head_dim, div, c] = info.param;
  return absl::StrCat(DTypeName(dtype), "_", layout == PairLayout::kNeox ? "neox" : "gptj", "_d",
                      head_dim, "_r", head_dim / div, "_", CaseName(c));
}

INSTANTIATE_TEST_SUITE_P(
    Grid, RerotateGridTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(PairLayout::kNeox, PairLayout::kGptj),
                       ::testing::Values(64, 96), ::testing::Values(4, 2, 1),
                       ::testing::Values(Case::kDefault, Case::kLinear, Case::kDynamicBelow,
                                         Case::kDynamicAbove, Case::kLlama3, Case::kYarn,
                                         Case::kYarnMscale, Case::kLongRopeShort,
                                         Case::kLongRopeLong)),
    ParamName);

RopeSpec Llama3_128() {
  RopeSpec s = SpecFor(Case::kLlama3, 128, 0, PairLayout::kNeox);
  return s;
}

// 64 reads at moving positions, each from the stored copy: the error against a fresh rotation
// stays within 2 ulp every time. Chaining the same moves (each read re-rotating the previous
// result) accumulates error.
TEST(RerotateDriftTest, ReadsFromStoredCopyDoNotDriftChainingDoes) {
  const RopeSpec spec = Llama3_128();
  constexpr int kL = 2, kH = 4, kT = 8;
  std::mt19937_64 rng(42);
  KvBuffer pre(kL, kH, kT, 128, DType::kBF16);
  pre.FillRandom(rng);
  const int64_t p0 = 1000;
  KvBuffer stored = pre;
  RotateKeysFresh(spec, 0, p0, &stored);
  KvBuffer chained = stored;
  int64_t prev = p0;
  std::uniform_int_distribution<int64_t> step(-700, 900);
  double worst_read = 0, worst_chain = 0, sum_read = 0, sum_chain = 0;
  int64_t count = 0;
  for (int edit = 0; edit < 64; ++edit) {
    const int64_t pos = std::max<int64_t>(0, prev + step(rng));
    KvBuffer read(kL, kH, kT, 128, DType::kBF16), next = read;
    read.Poison();
    next.Poison();
    RerotateCopy from_stored = Job(stored, &read, kT, p0, 0, pos, 0);
    RerotateCopy from_chain = Job(chained, &next, kT, prev, 0, pos, 0);
    ASSERT_TRUE(RerotateCopyCpu(spec, stored.geometry(), {&from_stored, 1}).ok());
    ASSERT_TRUE(RerotateCopyCpu(spec, stored.geometry(), {&from_chain, 1}).ok());
    for (int l = 0; l < kL; ++l) {
      for (int h = 0; h < kH; ++h) {
        for (int t = 0; t < kT; ++t) {
          std::vector<float> x(128);
          for (int d = 0; d < 128; ++d) x[d] = pre.Get(l, 0, h, t, d);
          const std::vector<float> fresh = FreshRow(spec, 0, pos + t, x);
          for (int k = 0; k < 64; ++k) {
            const double ulp =
                UlpOf(DType::kBF16, std::max(std::fabs(fresh[k]), std::fabs(fresh[k + 64])));
            const double er = std::max(std::fabs(read.Get(l, 0, h, t, k) - fresh[k]),
                                       std::fabs(read.Get(l, 0, h, t, k + 64) - fresh[k + 64])) /
                              ulp;
            const double ec = std::max(std::fabs(next.Get(l, 0, h, t, k) - fresh[k]),
                                       std::fabs(next.Get(l, 0, h, t, k + 64) - fresh[k + 64])) /
                              ulp;
            ASSERT_LE(er, 2.0) << "read " << edit << " at " << pos;
            worst_read = std::max(worst_read, er);
            worst_chain = std::max(worst_chain, ec);
            if (edit == 63) {
              sum_read += er;
              sum_chain += ec;
              ++count;
            }
          }
        }
      }
    }
    chained = next;
    prev = pos;
  }
  EXPECT_GT(worst_chain, 2.0);
  EXPECT_GT(sum_chain, 3 * sum_read) << "mean ulp after 64 moves: chained " << sum_chain / count
                                     << ", from stored " << sum_read / count;
  RecordProperty("mean_ulp_read", absl::StrCat(sum_read / count));
  RecordProperty("mean_ulp_chained", absl::StrCat(sum_chain / count));
}

TEST(RerotateCopyCpuTest, StridedLayoutsInPlaceAndUntouchedBytes) {
  const RopeSpec spec = Llama3_128();
  constexpr int kL = 3, kH = 2, kT = 16;
  std::mt19937_64 rng(7);
  KvBuffer block(kL, kH, kT, 128, DType::kBF16);
  block.FillRandom(rng);
  // Destination: a paged frontend layout [layer][kv][token][head][dim] of 40 tokens.
  const int dst_tokens = 40;
  std::vector<uint16_t> dst(static_cast<size_t>(kL) * 2 * dst_tokens * kH * 128, 0xFFFF);
  const std::vector<uint16_t> poison = dst;
  RerotateCopy job;
  job.src = block.data();
  job.src_strides = block.strides();
  job.src_token = 3;
  job.dst = dst.data();
  job.dst_strides = {int64_t{2} * dst_tokens * kH * 128, int64_t{dst_tokens} * kH * 128, 128,
                     int64_t{kH} * 128};
  job.dst_token = 20;
  job.n_tokens = 10;
  job.from_pos = 500;
  job.to_pos = 77;
  ASSERT_TRUE(RerotateCopyCpu(spec, block.geometry(), {&job, 1}).ok());
  // Reference: the same job on the block layout.
  KvBuffer ref(kL, kH, kT, 128, DType::kBF16);
  ref.Poison();
  RerotateCopy rj = Job(block, &ref, 10, 500, 0, 77, 0);
  rj.src_token = 3;
  rj.dst_token = 3;
  ASSERT_TRUE(RerotateCopyCpu(spec, block.geometry(), {&rj, 1}).ok());
  for (int l = 0; l < kL; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int t = 0; t < dst_tokens; ++t) {
        for (int h = 0; h < kH; ++h) {
          for (int d = 0; d < 128; ++d) {
            const size_t i = job.dst_strides.layer * l + job.dst_strides.kv * kv +
                             job.dst_strides.token * t + job.dst_strides.head * h + d;
            if (t < 20 || t >= 30) {
              ASSERT_EQ(dst[i], poison[i]) << "untouched byte written at token " << t;
            } else {
              ASSERT_EQ(BFloat16ToFloat(dst[i]), ref.Get(l, kv, h, t - 20 + 3, d));
            }
          }
        }
      }
    }
  }
  // In place (src == dst, identical region) equals out of place.
  KvBuffer inplace = block;
  RerotateCopy ij = Job(inplace, &inplace, 10, 500, 0, 77, 0);
  ij.src_token = 3;
  ij.dst_token = 3;
  ASSERT_TRUE(RerotateCopyCpu(spec, block.geometry(), {&ij, 1}).ok());
  for (int l = 0; l < kL; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int h = 0; h < kH; ++h) {
        for (int t = 3; t < 13; ++t) {
          for (int d = 0; d < 128; ++d) {
            ASSERT_EQ(inplace.Get(l, kv, h, t, d), ref.Get(l, kv, h, t, d));
          }
        }
      }
    }
  }
}

TEST(RerotateCopyCpuTest, KeysOnlyLeavesValuesUntouched) {
  const RopeSpec spec = Llama3_128();
  std::mt19937_64 rng(9);
  KvBuffer src(2, 2, 4, 128, DType::kF16);
  src.FillRandom(rng);
  KvBuffer dst(2, 2, 4, 128, DType::kF16);
  dst.Poison();
  RerotateCopy job = Job(src, &dst, 4, 10, 0, 20, 0);
  job.keys_only = true;
  ASSERT_TRUE(RerotateCopyCpu(spec, src.geometry(), {&job, 1}).ok());
  for (int l = 0; l < 2; ++l) {
    for (int h = 0; h < 2; ++h) {
      for (int t = 0; t < 4; ++t) {
        for (int d = 0; d < 128; ++d) {
          EXPECT_TRUE(std::isnan(dst.Get(l, 1, h, t, d)));
          EXPECT_FALSE(std::isnan(dst.Get(l, 0, h, t, d)));
        }
      }
    }
  }
}

TEST(RerotateCopyCpuTest, InvalidJobsAreRejectedAndNothingIsWritten) {
  const RopeSpec spec = Llama3_128();
  std::mt19937_64 rng(11);
  KvBuffer src(1, 1, 4, 128, DType::kBF16);
  src.FillRandom(rng);
  KvBuffer dst(1, 1, 4, 128, DType::kBF16);
  dst.Poison();
  const std::vector<uint8_t> poisoned = dst.bytes();
  const RerotateCopy good = Job(src, &dst, 4, 0, 0, 5, 0);
  struct Bad {
    std::string what;
    RerotateCopy job;
    KvGeometry geometry;
  };
  std::vector<Bad> bad;
  RerotateCopy j = good;
  j.n_tokens = -1;
  bad.push_back({"n_tokens", j, src.geometry()});
  j = good;
  j.src = nullptr;
  bad.push_back({"src", j, src.geometry()});
  j = good;
  j.from_pos = -5;
  bad.push_back({"from_pos", j, src.geometry()});
  j = good;
  j.to_table = 3;
  bad.push_back({"to_table", j, src.geometry()});
  j = good;
  j.dst_strides.token = -128;
  bad.push_back({"strides", j, src.geometry()});
  KvGeometry g = src.geometry();
  g.head_dim = 64;
  bad.push_back({"head_dim", good, g});
  g = src.geometry();
  g.layers = 0;
  bad.push_back({"layers", good, g});
  for (const Bad& b : bad) {
    // The valid job first: nothing may be written when a later one is invalid.
    const RerotateCopy jobs[2] = {good, b.job};
    const absl::Status st = RerotateCopyCpu(spec, b.geometry, jobs);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << b.what;
    EXPECT_NE(std::string(st.message()).find(b.what), std::string::npos) << st;
    EXPECT_EQ(dst.bytes(), poisoned) << b.what;
  }
  RopeSpec bad_spec = spec;
  bad_spec.rotary_dim = 3;
  EXPECT_EQ(RerotateCopyCpu(bad_spec, src.geometry(), {&good, 1}).code(),
            absl::StatusCode::kInvalidArgument);
  int64_t pos = -1;
  std::vector<float> row(128, 1.0f);
  EXPECT_EQ(ApplyRopeCpu(spec, 0, DType::kF32, 1, 1, row.data(), &pos).code(),
            absl::StatusCode::kInvalidArgument);
}

// ApplyRopeCpu against a hand-worked case: default rope, pair 0 at position 1 rotates by exactly
// 1 radian (inv_freq[0] = 1), GPT-J and NeoX pick different pairs.
TEST(ApplyRopeCpuTest, HandWorkedCase) {
  RopeSpec spec;
  spec.head_dim = 4;
  std::vector<float> x = {1.0f, 2.0f, 3.0f, 4.0f};
  int64_t pos = 1;
  ASSERT_TRUE(ApplyRopeCpu(spec, 0, DType::kF32, 1, 1, x.data(), &pos).ok());
  const float c = static_cast<float>(std::cos(1.0)), s = static_cast<float>(std::sin(1.0));
  EXPECT_EQ(x[0], 1.0f * c - 3.0f * s);  // NeoX pair (0, 2)
  EXPECT_EQ(x[2], 3.0f * c + 1.0f * s);
  const float inv1 = 1.0f / static_cast<float>(std::pow(10000.0, 0.5));  // 0.01
  const float c1 = static_cast<float>(std::cos(static_cast<double>(inv1)));
  const float s1 = static_cast<float>(std::sin(static_cast<double>(inv1)));
  EXPECT_EQ(x[1], 2.0f * c1 - 4.0f * s1);
  spec.layout = PairLayout::kGptj;
  x = {1.0f, 2.0f, 3.0f, 4.0f};
  ASSERT_TRUE(ApplyRopeCpu(spec, 0, DType::kF32, 1, 1, x.data(), &pos).ok());
  EXPECT_EQ(x[0], 1.0f * c - 2.0f * s);  // GPT-J pair (0, 1)
  EXPECT_EQ(x[1], 2.0f * c + 1.0f * s);
  EXPECT_EQ(x[2], 3.0f * c1 - 4.0f * s1);
}

}  // namespace
}  // namespace ropekv
