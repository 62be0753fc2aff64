#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/ape/ape.h"

namespace ropekv {
namespace {

using ::testing::HasSubstr;

// Random values stored in dtype t; at(i) is the value the kernels read (already rounded).
class Tensor {
 public:
  Tensor(DType t, size_t n, std::mt19937& rng, float stddev = 1.0f)
      : t_(t), bytes_(n * DTypeSize(t)), vals_(n) {
    std::normal_distribution<float> dist(0.0f, stddev);
    for (size_t i = 0; i < n; ++i) {
      StoreFromFloat(bytes_.data(), i, t, dist(rng));
      vals_[i] = LoadAsFloat(bytes_.data(), i, t);
    }
  }
  const void* data() const { return bytes_.data(); }
  void* mutable_data() { return bytes_.data(); }
  double at(size_t i) const { return vals_[i]; }
  void Set(size_t i, float v) {
    StoreFromFloat(bytes_.data(), i, t_, v);
    vals_[i] = LoadAsFloat(bytes_.data(), i, t_);
  }

 private:
  DType t_;
  std::vector<uint8_t> bytes_;
  std::vector<double> vals_;
};

// Keys and values of `tokens` tokens for every KV head, packed [kv_heads][tokens][head_dim] or,
// with token_major, [tokens][kv_heads][head_dim] (vLLM's layout, passed with explicit strides).
class Segment {
 public:
  Segment(DType t, int kv_heads, int64_t tokens, int head_dim, std::mt19937& rng,
          bool token_major = false)
      : k_(t, kv_heads * tokens * head_dim, rng),
        v_(t, kv_heads * tokens * head_dim, rng),
        tokens_(tokens),
        head_dim_(head_dim),
        head_stride_(token_major ? head_dim : tokens * head_dim),
        token_stride_(token_major ? kv_heads * head_dim : head_dim),
        token_major_(token_major) {}

  KvSegment View() const {
    KvSegment s;
    s.k = k_.data();
    s.v = v_.data();
    s.tokens = tokens_;
    // Packed segments use the 0 = packed default; token-major ones pass explicit strides.
    s.head_stride = token_major_ ? head_stride_ : 0;
    s.token_stride = token_major_ ? token_stride_ : 0;
    return s;
  }
  size_t Index(int h, int64_t t, int e) const {
    return static_cast<size_t>(h * head_stride_ + t * token_stride_ + e);
  }
  double K(int h, int64_t t, int e) const { return k_.at(Index(h, t, e)); }
  double V(int h, int64_t t, int e) const { return v_.at(Index(h, t, e)); }
  Tensor& k() { return k_; }
  Tensor& v() { return v_; }
  int64_t tokens() const { return tokens_; }

 private:
  Tensor k_, v_;
  int64_t tokens_;
  int head_dim_;
  int64_t head_stride_, token_stride_;
  bool token_major_;
};

struct Problem {
  AttentionShape shape;
  std::unique_ptr<Tensor> q;  // [num_queries][q_heads][head_dim] packed
  std::vector<std::unique_ptr<Segment>> context, other;
  std::vector<KvSegment> context_views, other_views;

  void RefreshViews() {
    context_views.clear();
    other_views.clear();
    for (auto& s : context) context_views.push_back(s->View());
    for (auto& s : other) other_views.push_back(s->View());
  }
  double Q(int i, int h, int e) const {
    return q->at(static_cast<size_t>((i * shape.q_heads + h) * shape.head_dim + e));
  }
  int64_t OtherTokens() const {
    int64_t n = 0;
    for (auto& s : other) n += s->tokens();
    return n;
  }
};

// Context segments of the given lengths; other = a prefix of prefix_len tokens, then the
// queries' own keys (num_queries tokens, token-major layout to exercise strides).
Problem MakeProblem(DType kv_dtype, DType q_dtype, int head_dim, int q_heads, int kv_heads,
                    int num_queries, std::vector<int64_t> context_lens, int64_t prefix_len,
                    uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p;
  p.shape.num_queries = num_queries;
  p.shape.q_heads = q_heads;
  p.shape.kv_heads = kv_heads;
  p.shape.head_dim = head_dim;
  p.shape.q_dtype = q_dtype;
  p.shape.kv_dtype = kv_dtype;
  p.shape.out_dtype = DType::kF32;
  p.q = std::make_unique<Tensor>(q_dtype, num_queries * q_heads * head_dim, rng);
  bool token_major = false;
  for (int64_t len : context_lens) {
    p.context.push_back(
        std::make_unique<Segment>(kv_dtype, kv_heads, len, head_dim, rng, token_major));
    token_major = !token_major;
  }
  if (prefix_len > 0) {
    p.other.push_back(std::make_unique<Segment>(kv_dtype, kv_heads, prefix_len, head_dim, rng));
  }
  p.other.push_back(std::make_unique<Segment>(kv_dtype, kv_heads, num_queries, head_dim, rng,
                                              /*token_major=*/true));
  p.RefreshViews();
  return p;
}

ApeArgs MakeApeArgs(const Problem& p, float t, float s, void* out, float* lse) {
  ApeArgs a;
  a.shape = p.shape;
  a.temperature = t;
  a.scale = s;
  a.q = p.q->data();
  a.context = p.context_views;
  a.other = p.other_views;
  a.out = out;
  a.lse = lse;
  return a;
}

// One softmax group evaluated directly: scores s_j = scale * q.k_j over the visible keys; returns
// lse and fills o = sum_j softmax(s)_j v_j.
struct GroupResult {
  long double lse = -std::numeric_limits<long double>::infinity();
  std::vector<long double> o;
};

GroupResult EvalGroup(const Problem& p, const std::vector<std::unique_ptr<Segment>>& segs, int i,
                      int h, int64_t visible, long double scale) {
  const int d = p.shape.head_dim;
  const int hk = h / (p.shape.q_heads / p.shape.kv_heads);
  std::vector<long double> scores;
  std::vector<std::pair<const Segment*, int64_t>> keys;
  for (auto& s : segs) {
    for (int64_t t = 0; t < s->tokens(); ++t) {
      if (static_cast<int64_t>(keys.size()) >= visible) break;
      long double dot = 0;
      for (int e = 0; e < d; ++e) dot += static_cast<long double>(p.Q(i, h, e)) * s->K(hk, t, e);
      scores.push_back(dot * scale);
      keys.push_back({s.get(), t});
    }
  }
  GroupResult r;
  r.o.assign(d, 0.0L);
  if (scores.empty()) return r;
  long double sum = 0;
  for (long double sc : scores) sum += std::exp(sc);  // scores are O(1): no overflow
  r.lse = std::log(sum);
  for (size_t j = 0; j < scores.size(); ++j) {
    const long double w = std::exp(scores[j]) / sum;
    for (int e = 0; e < d; ++e) r.o[e] += w * keys[j].first->V(hk, keys[j].second, e);
  }
  return r;
}

// Max |x| over a vector, for tolerances relative to the output's magnitude.
double MaxAbs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

// ---------------------------------------------------------------------------------------------

using GridParam = std::tuple<DType, int /*head_dim*/, int /*num_queries*/>;

class ApeRefGridTest : public ::testing::TestWithParam<GridParam> {};

// With T = S = 1, APE is full softmax attention over the context keys and the other keys.
TEST_P(ApeRefGridTest, UnitTemperatureAndScaleEqualFullAttention) {
  const auto [dtype, head_dim, n] = GetParam();
  Problem p = MakeProblem(dtype, dtype, head_dim, 8, 2, n, {7, 19, 33}, 13, 1234 + head_dim + n);
  const size_t out_elems = static_cast<size_t>(n) * 8 * head_dim;
  std::vector<float> ape(out_elems, std::nanf("")), full(out_elems, std::nanf(""));
  std::vector<float> ape_lse(n * 8, std::nanf("")), full_lse(n * 8, std::nanf(""));
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 1.0f, 1.0f, ape.data(), ape_lse.data())).ok());

  std::vector<KvSegment> all = p.context_views;
  all.insert(all.end(), p.other_views.begin(), p.other_views.end());
  AttentionArgs a;
  a.shape = p.shape;
  a.q = p.q->data();
  a.keys = all;
  a.out = full.data();
  a.lse = full_lse.data();
  ASSERT_TRUE(AttentionCpu(a).ok());

  const double scale = MaxAbs(full);
  ASSERT_GT(scale, 0.0);
  for (size_t i = 0; i < out_elems; ++i) {
    ASSERT_NEAR(ape[i], full[i], 4 * UlpOf(DType::kF32, scale)) << "element " << i;
  }
  for (int i = 0; i < n * 8; ++i) {
    ASSERT_NEAR(ape_lse[i], full_lse[i], 4 * UlpOf(DType::kF32, full_lse[i])) << "row " << i;
  }
}

// Other T and S: the merge equals the formula evaluated here directly in long double.
TEST_P(ApeRefGridTest, MatchesDirectEvaluationOfTheFormula) {
  const auto [dtype, head_dim, n] = GetParam();
  for (const auto& [t, s] : std::vector<std::pair<float, float>>{
           {0.5f, 0.9f}, {2.0f, 1.3f}, {1.0f, 1.5f}, {0.7f, 1.0f}}) {
    SCOPED_TRACE(testing::Message() << "T " << t << " S " << s);
    Problem p = MakeProblem(dtype, dtype, head_dim, 8, 2, n, {11, 5, 40}, 9, 99 + head_dim + n);
    const int hq = 8;
    std::vector<float> out(static_cast<size_t>(n) * hq * head_dim, std::nanf(""));
    std::vector<float> lse(n * hq, std::nanf(""));
    ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, t, s, out.data(), lse.data())).ok());

    const long double inv_sqrt_d = 1.0L / std::sqrt(static_cast<long double>(head_dim));
    const int64_t lo = p.OtherTokens();
    for (int i = 0; i < n; ++i) {
      for (int h = 0; h < hq; ++h) {
        const GroupResult c = EvalGroup(p, p.context, i, h, 1 << 30, inv_sqrt_d / t);
        const GroupResult o = EvalGroup(p, p.other, i, h, lo - n + i + 1, inv_sqrt_d);
        const long double ec = std::exp(static_cast<long double>(s) * t * c.lse);
        const long double eo = std::exp(o.lse);
        const long double wc = ec / (ec + eo);
        const long double wo = eo / (ec + eo);
        for (int e = 0; e < head_dim; ++e) {
          const double want = static_cast<double>(wc * c.o[e] + wo * o.o[e]);
          ASSERT_NEAR(out[(i * hq + h) * head_dim + e], want, 2e-6 * (1 + std::fabs(want)))
              << "query " << i << " head " << h << " dim " << e;
        }
        const double want_lse = static_cast<double>(std::log(ec + eo));
        ASSERT_NEAR(lse[i * hq + h], want_lse, 2e-6 * (1 + std::fabs(want_lse)));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    DTypesDimsQueries, ApeRefGridTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(64, 128, 80), ::testing::Values(1, 5)),
    [](const ::testing::TestParamInfo<GridParam>& info) {
      return std::string(DTypeName(std::get<0>(info.param))) + "_d" +
             std::to_string(std::get<1>(info.param)) + "_n" +
             std::to_string(std::get<2>(info.param));
    });

// q head h reads KV head h / (q_heads / kv_heads): equal to the same call with every KV head
// repeated group times (q_heads == kv_heads).
TEST(ApeRefTest, GqaMapsConsecutiveQueryHeadsToOneKvHead) {
  const int hq = 6, hkv = 2, d = 64, n = 3, group = hq / hkv;
  Problem p = MakeProblem(DType::kBF16, DType::kBF16, d, hq, hkv, n, {10, 21}, 6, 7);
  std::vector<float> out(n * hq * d, std::nanf(""));
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 0.6f, 1.2f, out.data(), nullptr)).ok());

  // Expand every segment to hq KV heads by copying head h / group into head h.
  std::vector<std::vector<uint16_t>> storage;
  auto expand = [&](const std::vector<std::unique_ptr<Segment>>& segs) {
    std::vector<KvSegment> views;
    for (auto& s : segs) {
      std::vector<uint16_t> k(hq * s->tokens() * d), v(hq * s->tokens() * d);
      for (int h = 0; h < hq; ++h) {
        for (int64_t t = 0; t < s->tokens(); ++t) {
          for (int e = 0; e < d; ++e) {
            const size_t dst = (h * s->tokens() + t) * d + e;
            k[dst] = FloatToBFloat16(static_cast<float>(s->K(h / group, t, e)));
            v[dst] = FloatToBFloat16(static_cast<float>(s->V(h / group, t, e)));
          }
        }
      }
      storage.push_back(std::move(k));
      storage.push_back(std::move(v));
      KvSegment view;
      view.k = storage[storage.size() - 2].data();
      view.v = storage.back().data();
      view.tokens = s->tokens();
      views.push_back(view);
    }
    return views;
  };
  storage.reserve(16);
  const std::vector<KvSegment> context = expand(p.context);
  const std::vector<KvSegment> other = expand(p.other);
  ApeArgs mha = MakeApeArgs(p, 0.6f, 1.2f, nullptr, nullptr);
  mha.shape.kv_heads = hq;
  mha.context = context;
  mha.other = other;
  std::vector<float> want(n * hq * d, std::nanf(""));
  mha.out = want.data();
  ASSERT_TRUE(ApeAttentionCpu(mha).ok());
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], want[i]) << "element " << i;
}

// Prefill is causal among the queries: query i's output depends on the other keys up to its own
// and not on later queries' keys.
TEST(ApeRefTest, PrefillIsCausalAmongQueries) {
  const int hq = 4, hkv = 2, d = 64, n = 6;
  Problem p = MakeProblem(DType::kF32, DType::kF32, d, hq, hkv, n, {12, 8}, 10, 21);
  std::vector<float> before(n * hq * d), after(n * hq * d);
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 0.8f, 1.1f, before.data(), nullptr)).ok());
  // Change key and value of query 3's own token (last segment of other, token 3), every head.
  Segment& own = *p.other.back();
  for (int h = 0; h < hkv; ++h) {
    for (int e = 0; e < d; ++e) {
      own.k().Set(own.Index(h, 3, e), static_cast<float>(own.K(h, 3, e) + 0.75));
      own.v().Set(own.Index(h, 3, e), static_cast<float>(own.V(h, 3, e) - 1.5));
    }
  }
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 0.8f, 1.1f, after.data(), nullptr)).ok());
  for (int i = 0; i < n; ++i) {
    double diff = 0;
    for (int j = 0; j < hq * d; ++j) {
      diff = std::max(
          diff, std::fabs(static_cast<double>(before[i * hq * d + j]) - after[i * hq * d + j]));
    }
    if (i < 3) {
      EXPECT_EQ(diff, 0.0) << "query " << i << " must not see query 3's key";
    } else {
      EXPECT_GT(diff, 1e-3) << "query " << i << " must see query 3's key";
    }
  }
}

// The decode query sees every other key, including its own (the last one).
TEST(ApeRefTest, DecodeSeesEveryOtherKey) {
  Problem p = MakeProblem(DType::kBF16, DType::kBF16, 128, 4, 1, 1, {16, 16}, 20, 5);
  std::vector<float> before(4 * 128), after(4 * 128);
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 0.5f, 1.0f, before.data(), nullptr)).ok());
  Segment& own = *p.other.back();
  for (int e = 0; e < 128; ++e) own.v().Set(own.Index(0, 0, e), 8.0f);
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 0.5f, 1.0f, after.data(), nullptr)).ok());
  for (int j = 0; j < 4 * 128; ++j) ASSERT_NE(before[j], after[j]) << "element " << j;
}

// An empty context group leaves plain attention over the other keys, for any T and S.
TEST(ApeRefTest, EmptyContextGroupIsPlainAttention) {
  Problem p = MakeProblem(DType::kF16, DType::kF16, 64, 4, 2, 3, {}, 17, 8);
  std::vector<float> ape(3 * 4 * 64), full(3 * 4 * 64);
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 0.3f, 2.0f, ape.data(), nullptr)).ok());
  AttentionArgs a;
  a.shape = p.shape;
  a.q = p.q->data();
  a.keys = p.other_views;
  a.out = full.data();
  ASSERT_TRUE(AttentionCpu(a).ok());
  for (size_t i = 0; i < ape.size(); ++i) ASSERT_EQ(ape[i], full[i]) << "element " << i;
}

// Outputs in f16/bf16 are the f32 result rounded once to nearest even; strided q equals packed q.
TEST(ApeRefTest, OutputDtypesAndStridedQuery) {
  const int hq = 4, hkv = 2, d = 64, n = 2;
  Problem p = MakeProblem(DType::kBF16, DType::kBF16, d, hq, hkv, n, {9, 30}, 7, 31);
  std::vector<float> f32(n * hq * d);
  ASSERT_TRUE(ApeAttentionCpu(MakeApeArgs(p, 0.9f, 1.1f, f32.data(), nullptr)).ok());
  for (DType t : {DType::kF16, DType::kBF16}) {
    std::vector<uint16_t> half(n * hq * d, 0xffff);
    ApeArgs a = MakeApeArgs(p, 0.9f, 1.1f, half.data(), nullptr);
    a.shape.out_dtype = t;
    ASSERT_TRUE(ApeAttentionCpu(a).ok());
    for (size_t i = 0; i < half.size(); ++i) {
      const uint16_t want = t == DType::kF16 ? FloatToHalf(f32[i]) : FloatToBFloat16(f32[i]);
      ASSERT_EQ(half[i], want) << DTypeName(t) << " element " << i;
    }
  }
  // q as [q_heads][num_queries][head_dim + 16]: token stride head_dim + 16, head stride n * that.
  const int64_t ts = d + 16, hs = n * ts;
  std::vector<uint16_t> q_strided(hq * hs, 0xffff);
  for (int i = 0; i < n; ++i) {
    for (int h = 0; h < hq; ++h) {
      for (int e = 0; e < d; ++e) {
        q_strided[h * hs + i * ts + e] = FloatToBFloat16(static_cast<float>(p.Q(i, h, e)));
      }
    }
  }
  std::vector<float> strided(n * hq * d);
  ApeArgs a = MakeApeArgs(p, 0.9f, 1.1f, strided.data(), nullptr);
  a.q = q_strided.data();
  a.q_token_stride = ts;
  a.q_head_stride = hs;
  ASSERT_TRUE(ApeAttentionCpu(a).ok());
  for (size_t i = 0; i < f32.size(); ++i) ASSERT_EQ(strided[i], f32[i]) << "element " << i;
}

// ---------------------------------------------------------------------------------------------
// Bad arguments: INVALID_ARGUMENT naming the field, nothing written.

class ApeRefErrorTest : public ::testing::Test {
 protected:
  ApeRefErrorTest()
      : p_(MakeProblem(DType::kBF16, DType::kBF16, 64, 4, 2, 2, {8}, 4, 3)),
        out_(2 * 4 * 64, -7.0f) {}

  ApeArgs Good() { return MakeApeArgs(p_, 0.8f, 1.0f, out_.data(), nullptr); }

  void ExpectInvalid(const ApeArgs& a, const std::string& needle) {
    const absl::Status st = ApeAttentionCpu(a);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr(needle));
    for (float x : out_) ASSERT_EQ(x, -7.0f) << "output written on error";
  }

  Problem p_;
  std::vector<float> out_;
};

TEST_F(ApeRefErrorTest, GoodArgumentsPass) {
  EXPECT_TRUE(ApeAttentionCpu(Good()).ok());
  EXPECT_TRUE(ValidateApeArgs(Good()).ok());
}

TEST_F(ApeRefErrorTest, Shapes) {
  ApeArgs a = Good();
  a.shape.num_queries = 0;
  ExpectInvalid(a, "num_queries must be >= 1, got 0");
  a = Good();
  a.shape.q_heads = 6;
  a.shape.kv_heads = 4;
  ExpectInvalid(a, "q_heads must be a multiple of kv_heads, got q_heads 6 and kv_heads 4");
  a = Good();
  a.shape.kv_heads = 0;
  ExpectInvalid(a, "q_heads and kv_heads must be >= 1");
  a = Good();
  a.shape.head_dim = 0;
  ExpectInvalid(a, "head_dim must be in 1..1024, got 0");
  a = Good();
  a.shape.head_dim = 2048;
  ExpectInvalid(a, "head_dim must be in 1..1024, got 2048");
  a = Good();
  a.shape.kv_dtype = static_cast<DType>(9);
  ExpectInvalid(a, "dtypes must be f32, f16 or bf16");
}

TEST_F(ApeRefErrorTest, TemperatureAndScale) {
  ApeArgs a = Good();
  a.temperature = 0.0f;
  ExpectInvalid(a, "temperature and scale must be finite and > 0, got T 0");
  a = Good();
  a.scale = -1.0f;
  ExpectInvalid(a, "S -1");
  a = Good();
  a.scale = std::nanf("");
  ExpectInvalid(a, "temperature and scale must be finite");
  a = Good();
  a.temperature = std::numeric_limits<float>::infinity();
  ExpectInvalid(a, "temperature and scale must be finite");
}

TEST_F(ApeRefErrorTest, Pointers) {
  ApeArgs a = Good();
  a.q = nullptr;
  ExpectInvalid(a, "q is null");
  a = Good();
  a.out = nullptr;
  ExpectInvalid(a, "out is null");
  std::vector<KvSegment> ctx = p_.context_views;
  ctx[0].v = nullptr;
  a = Good();
  a.context = ctx;
  ExpectInvalid(a, "context[0] has 8 tokens but a null v pointer");
}

TEST_F(ApeRefErrorTest, SegmentsAndStrides) {
  std::vector<KvSegment> other = p_.other_views;
  other[0].tokens = -1;
  ApeArgs a = Good();
  a.other = other;
  ExpectInvalid(a, "other[0].tokens must be >= 0, got -1");

  std::vector<KvSegment> ctx = p_.context_views;
  ctx[0].token_stride = 32;
  a = Good();
  a.context = ctx;
  ExpectInvalid(a,
                "context[0] strides must be 0 (packed) or >= head_dim 64, got head_stride 0 "
                "and token_stride 32");

  a = Good();
  a.q_head_stride = 10;
  ExpectInvalid(a, "q strides must be 0 (packed) or >= head_dim 64");

  // The other group must hold at least the queries' own keys.
  KvSegment one = p_.other_views.back();
  one.tokens = 1;
  a = Good();
  a.other = absl::MakeConstSpan(&one, 1);
  ExpectInvalid(a, "expected at least num_queries = 2 tokens, got 1");
  a.other = {};
  ExpectInvalid(a, "expected at least num_queries = 2 tokens, got 0");
}

TEST(AttentionRefTest, Errors) {
  Problem p = MakeProblem(DType::kF32, DType::kF32, 64, 4, 2, 3, {}, 0, 4);
  std::vector<float> out(3 * 4 * 64);
  AttentionArgs a;
  a.shape = p.shape;
  a.q = p.q->data();
  a.keys = p.other_views;
  a.out = out.data();
  EXPECT_TRUE(AttentionCpu(a).ok());
  a.softmax_scale = -1.0;
  absl::Status st = AttentionCpu(a);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("softmax_scale must be finite and >= 0"));
  a.softmax_scale = 0.0;
  a.shape.num_queries = 4;
  st = AttentionCpu(a);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()),
              HasSubstr("expected at least num_queries = 4 tokens, got 3"));
}

// AttentionCpu with an explicit softmax_scale equals a hand evaluation (1 query, 1 head, 2 keys).
TEST(AttentionRefTest, HandWorkedTwoKeys) {
  const float q[2] = {1.0f, 2.0f};
  const float k[4] = {0.5f, 0.25f, -1.0f, 1.0f};  // k0 = (0.5, 0.25), k1 = (-1, 1)
  const float v[4] = {3.0f, -1.0f, 0.5f, 2.0f};
  KvSegment seg;
  seg.k = k;
  seg.v = v;
  seg.tokens = 2;
  AttentionArgs a;
  a.shape = {1, 1, 1, 2, DType::kF32, DType::kF32, DType::kF32};
  a.softmax_scale = 0.5;
  a.q = q;
  a.keys = absl::MakeConstSpan(&seg, 1);
  float out[2] = {NAN, NAN};
  float lse = NAN;
  a.out = out;
  a.lse = &lse;
  ASSERT_TRUE(AttentionCpu(a).ok());
  // s0 = 0.5 * (0.5 + 0.5) = 0.5, s1 = 0.5 * (-1 + 2) = 0.5: equal weights.
  EXPECT_FLOAT_EQ(out[0], 1.75f);
  EXPECT_FLOAT_EQ(out[1], 0.5f);
  EXPECT_FLOAT_EQ(lse, static_cast<float>(0.5 + std::log(2.0)));
}

#ifndef ROPEKV_WITH_CUDA
TEST(ApeCudaStubTest, UnimplementedWithoutCuda) {
  Problem p = MakeProblem(DType::kBF16, DType::kBF16, 64, 4, 2, 1, {8}, 4, 3);
  std::vector<float> out(4 * 64);
  const absl::Status st =
      ApeAttentionCuda(MakeApeArgs(p, 1.0f, 1.0f, out.data(), nullptr), nullptr, 0, nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
}
#endif

}  // namespace
}  // namespace ropekv
