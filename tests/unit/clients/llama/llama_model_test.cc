// LlamaModel with random weights: the forward pass against a naive fp64 re-implementation, and
// the cache properties (chunked == one call, bytes plugged in from elsewhere, rounding to the
// cache dtype, RoPE's relative invariance).
#include "clients/llama/llama_model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace ropekv {
namespace llama {
namespace {

LlamaConfig SmallConfig(int layers) {
  LlamaConfig c;
  c.vocab_size = 40;
  c.hidden_size = 48;
  c.intermediate_size = 80;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;  // GQA, 2 query heads per KV head
  c.head_dim = 16;            // heads * head_dim = 64 != hidden
  c.rms_norm_eps = 1e-6;
  c.max_position_embeddings = 4096;
  c.rope.theta = 10000.0;
  return c;
}

std::vector<int32_t> RandomTokens(std::mt19937& rng, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int32_t> u(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t& x : t) x = u(rng);
  return t;
}

std::vector<int64_t> Iota(int64_t n, int64_t start) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = start + i;
  return p;
}

double MaxAbs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return m;
}

// The whole forward pass in fp64, written from the definitions (HF LlamaModel): RMSNorm,
// q/k/v projections, RoPE (NeoX rotate_half over the first rotary_dim dims, closed-form fp64
// frequencies theta^(-2i/r) / linear factor), causal GQA softmax attention, o_proj, SwiGLU MLP,
// final norm, lm_head.
struct Fp64Forward {
  std::vector<double> logits;     // [n][vocab]
  std::vector<double> attention;  // [layers][n][heads][head_dim] (before o_proj)
};

Fp64Forward ReferenceForward(const LlamaConfig& c, const LlamaWeights& w,
                             const std::vector<int32_t>& tokens,
                             const std::vector<int64_t>& positions) {
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, d = c.head_dim;
  const int64_t H = c.num_attention_heads, K = c.num_key_value_heads;
  const int64_t r = static_cast<int64_t>(static_cast<double>(d) * c.rope.partial_rotary_factor);
  const double linear = c.rope.rope_type == "linear" ? c.rope.factor : 1.0;
  auto rms = [&](const std::vector<double>& x, const std::vector<float>& g) {
    std::vector<double> out(x.size());
    for (int64_t i = 0; i < n; ++i) {
      double ss = 0;
      for (int64_t j = 0; j < D; ++j) ss += x[i * D + j] * x[i * D + j];
      const double inv = 1.0 / std::sqrt(ss / D + c.rms_norm_eps);
      for (int64_t j = 0; j < D; ++j) out[i * D + j] = g[j] * x[i * D + j] * inv;
    }
    return out;
  };
  // y[i][o] = sum_j W[o][j] x[i][j] for W [out][in].
  auto linear_map = [&](const std::vector<double>& x, const std::vector<float>& W, int64_t in,
                        int64_t out) {
    std::vector<double> y(static_cast<size_t>(n * out), 0.0);
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t o = 0; o < out; ++o) {
        double s = 0;
        for (int64_t j = 0; j < in; ++j) s += static_cast<double>(W[o * in + j]) * x[i * in + j];
        y[i * out + o] = s;
      }
    }
    return y;
  };
  auto rope = [&](std::vector<double>& x, int64_t heads) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        double* v = x.data() + (i * heads + h) * d;
        for (int64_t j = 0; j < r / 2; ++j) {
          const double inv_freq = std::pow(c.rope.theta, -2.0 * j / r) / linear;
          const double a = static_cast<double>(positions[i]) * inv_freq;
          const double x1 = v[j], x2 = v[j + r / 2];
          v[j] = x1 * std::cos(a) - x2 * std::sin(a);
          v[j + r / 2] = x2 * std::cos(a) + x1 * std::sin(a);
        }
      }
    }
  };
  Fp64Forward out;
  std::vector<double> x(static_cast<size_t>(n * D));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < D; ++j) x[i * D + j] = w.embed_tokens[tokens[i] * D + j];
  }
  for (const LlamaWeights::Layer& L : w.layers) {
    std::vector<double> xn = rms(x, L.input_norm);
    std::vector<double> q = linear_map(xn, L.q_proj, D, H * d);
    std::vector<double> k = linear_map(xn, L.k_proj, D, K * d);
    std::vector<double> v = linear_map(xn, L.v_proj, D, K * d);
    rope(q, H);
    rope(k, K);
    std::vector<double> attn(static_cast<size_t>(n * H * d), 0.0);
    for (int64_t h = 0; h < H; ++h) {
      const int64_t g = h / (H / K);
      for (int64_t i = 0; i < n; ++i) {
        std::vector<double> s(static_cast<size_t>(i + 1));
        double m = -1e300;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += q[(i * H + h) * d + e] * k[(j * K + g) * d + e];
          s[j] = dot / std::sqrt(static_cast<double>(d));
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (double& e : s) sum += (e = std::exp(e - m));
        for (int64_t j = 0; j <= i; ++j) {
          for (int64_t e = 0; e < d; ++e) {
            attn[(i * H + h) * d + e] += s[j] / sum * v[(j * K + g) * d + e];
          }
        }
      }
    }
    out.attention.insert(out.attention.end(), attn.begin(), attn.end());
    std::vector<double> o = linear_map(attn, L.o_proj, H * d, D);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    xn = rms(x, L.post_attn_norm);
    std::vector<double> gate = linear_map(xn, L.gate_proj, D, I);
    std::vector<double> up = linear_map(xn, L.up_proj, D, I);
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
    std::vector<double> down = linear_map(gate, L.down_proj, I, D);
    for (size_t i = 0; i < x.size(); ++i) x[i] += down[i];
  }
  out.logits = linear_map(rms(x, w.final_norm), w.lm_head, D, V);
  return out;
}

struct RopeCase {
  const char* name;
  const char* rope_type;
  double factor;
  double partial_rotary_factor;
};

void PrintTo(const RopeCase& c, std::ostream* os) { *os << c.name; }

class LlamaModelFp64Test : public ::testing::TestWithParam<RopeCase> {};

// One layer, GQA: the attention output of every head and the logits equal the fp64 forward, with
// the sequence given in two calls (the second attends over the cache) at non-contiguous
// positions.
TEST_P(LlamaModelFp64Test, OneLayerMatchesFp64Reference) {
  LlamaConfig c = SmallConfig(1);
  c.rope.rope_type = GetParam().rope_type;
  c.rope.factor = GetParam().factor;
  c.rope.partial_rotary_factor = GetParam().partial_rotary_factor;
  absl::StatusOr<std::unique_ptr<LlamaModel>> model = LlamaModel::Random(c, 11);
  ASSERT_TRUE(model.ok()) << model.status();
  std::mt19937 rng(5);
  const int64_t n = 37;
  std::vector<int32_t> tokens = RandomTokens(rng, n, c.vocab_size);
  std::vector<int64_t> positions(n);
  for (int64_t i = 0; i < n; ++i) positions[i] = 3 + 2 * i + (i > 20 ? 5 : 0);
  const Fp64Forward ref = ReferenceForward(c, (*model)->weights(), tokens, positions);

  absl::StatusOr<std::unique_ptr<KvCache>> cache = (*model)->NewCache(DType::kF32);
  ASSERT_TRUE(cache.ok());
  const int64_t split = 16;
  std::vector<float> logits, attention;
  for (auto [b, e] : {std::pair<int64_t, int64_t>{0, split}, {split, n}}) {
    ForwardTrace trace;
    absl::StatusOr<std::vector<float>> l =
        (*model)->Prefill(absl::MakeConstSpan(tokens).subspan(b, e - b),
                          absl::MakeConstSpan(positions).subspan(b, e - b), cache->get(), &trace);
    ASSERT_TRUE(l.ok()) << l.status();
    ASSERT_EQ(l->size(), static_cast<size_t>((e - b) * c.vocab_size));
    logits.insert(logits.end(), l->begin(), l->end());
    ASSERT_EQ(trace.attention.size(), 1u);
    attention.insert(attention.end(), trace.attention[0].begin(), trace.attention[0].end());
  }
  ASSERT_EQ(attention.size(), ref.attention.size());
  double max_attn = 0, max_logit = 0;
  for (size_t i = 0; i < attention.size(); ++i) {
    max_attn = std::max(max_attn, std::fabs(attention[i] - ref.attention[i]));
  }
  for (size_t i = 0; i < logits.size(); ++i) {
    max_logit = std::max(max_logit, std::fabs(logits[i] - ref.logits[i]));
  }
  double scale = 0;
  for (double v : ref.logits) scale = std::max(scale, std::fabs(v));
  EXPECT_LT(max_attn, 2e-6) << GetParam().name;
  std::printf("%s: max attention diff %.3g, max logit diff %.3g (scale %.3g)\n", GetParam().name,
              max_attn, max_logit, scale);
  EXPECT_LT(max_logit, 2e-6 * std::max(1.0, scale)) << GetParam().name << " logit scale " << scale;
}

INSTANTIATE_TEST_SUITE_P(RopeTypes, LlamaModelFp64Test,
                         ::testing::Values(RopeCase{"default", "default", 1.0, 1.0},
                                           RopeCase{"linear2", "linear", 2.0, 1.0},
                                           RopeCase{"partial_half", "default", 1.0, 0.5}),
                         [](const ::testing::TestParamInfo<RopeCase>& i) {
                           return std::string(i.param.name);
                         });

class LlamaModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<LlamaModel>> m = LlamaModel::Random(SmallConfig(2), 3);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
  }
  std::unique_ptr<KvCache> Cache(DType dt, int block_tokens = 16) {
    absl::StatusOr<std::unique_ptr<KvCache>> c = model_->NewCache(dt, block_tokens);
    EXPECT_TRUE(c.ok());
    return std::move(*c);
  }
  std::vector<float> Run(const std::vector<int32_t>& t, const std::vector<int64_t>& p,
                         KvCache* cache, ForwardTrace* trace = nullptr) {
    absl::StatusOr<std::vector<float>> l = model_->Prefill(t, p, cache, trace);
    EXPECT_TRUE(l.ok()) << l.status();
    return l.ok() ? *l : std::vector<float>();
  }
  std::unique_ptr<LlamaModel> model_;
  std::mt19937 rng_{77};
};

TEST_F(LlamaModelTest, ChunkedPrefillEqualsOneCall) {
  const int64_t n = 70;
  std::vector<int32_t> tokens = RandomTokens(rng_, n, 40);
  std::vector<int64_t> positions = Iota(n, 0);
  for (DType dt : {DType::kF32, DType::kBF16}) {
    std::unique_ptr<KvCache> one = Cache(dt);
    const std::vector<float> full = Run(tokens, positions, one.get());
    std::unique_ptr<KvCache> chunked = Cache(dt);
    std::vector<float> pieces;
    // Chunks of 1, 16, 5, 48 tokens: single-token decode, block-aligned and ragged ones.
    int64_t b = 0;
    for (int64_t len : {1, 16, 5, 48}) {
      std::vector<int32_t> t(tokens.begin() + b, tokens.begin() + b + len);
      std::vector<int64_t> p(positions.begin() + b, positions.begin() + b + len);
      std::vector<float> l = Run(t, p, chunked.get());
      pieces.insert(pieces.end(), l.begin(), l.end());
      b += len;
    }
    ASSERT_EQ(b, n);
    EXPECT_LT(MaxAbsDiff(full, pieces), 1e-5 * std::max(1.0, MaxAbs(full))) << DTypeName(dt);
    // The caches hold the same K/V (attention reads only stored values, so even bf16 agrees).
    ASSERT_EQ(one->tokens(), chunked->tokens());
    for (int64_t blk = 0; blk < one->num_blocks(); ++blk) {
      absl::Span<const uint8_t> x = one->BlockData(blk), y = chunked->BlockData(blk);
      if (dt == DType::kBF16) {
        for (size_t i = 0; i < x.size(); i += 2) {
          const float a = LoadAsFloat(x.data(), i / 2, dt), c = LoadAsFloat(y.data(), i / 2, dt);
          ASSERT_LE(std::fabs(a - c), 2 * UlpOf(dt, a) + 1e-6) << "block " << blk;
        }
      } else {
        for (size_t i = 0; i < x.size(); i += 4) {
          const float a = LoadAsFloat(x.data(), i / 4, dt), c = LoadAsFloat(y.data(), i / 4, dt);
          ASSERT_NEAR(a, c, 1e-5 * (1 + std::fabs(a))) << "block " << blk;
        }
      }
    }
  }
}

TEST_F(LlamaModelTest, ShiftedPositionsGiveTheSameLogits) {
  const int64_t n = 50;
  std::vector<int32_t> tokens = RandomTokens(rng_, n, 40);
  std::unique_ptr<KvCache> a = Cache(DType::kF32), b = Cache(DType::kF32);
  const std::vector<float> base = Run(tokens, Iota(n, 0), a.get());
  const std::vector<float> shifted = Run(tokens, Iota(n, 1000), b.get());
  // RoPE is relative: only fp32 rounding of the angles (~1000 * 2^-24 rad) differs.
  EXPECT_LT(MaxAbsDiff(base, shifted), 1e-3 * std::max(1.0, MaxAbs(base)));
  // Keys, however, are rotated differently: positions are really applied.
  EXPECT_GT(std::fabs(LoadAsFloat(a->BlockData(1).data(), 0, DType::kF32) -
                      LoadAsFloat(b->BlockData(1).data(), 0, DType::kF32)),
            1e-3);
}

TEST_F(LlamaModelTest, CacheFilledFromBytesContinuesTheSame) {
  const int64_t n = 45, split = 29;
  std::vector<int32_t> tokens = RandomTokens(rng_, n, 40);
  std::vector<int64_t> positions = Iota(n, 7);
  std::vector<int32_t> t1(tokens.begin(), tokens.begin() + split),
      t2(tokens.begin() + split, tokens.end());
  std::vector<int64_t> p1(positions.begin(), positions.begin() + split),
      p2(positions.begin() + split, positions.end());
  for (DType dt : {DType::kF32, DType::kBF16}) {
    std::unique_ptr<KvCache> own = Cache(dt);
    Run(t1, p1, own.get());
    // Another cache receives the first part as block-layout bytes (as from the daemon).
    std::vector<uint8_t> bytes(own->BytesFor(split));
    ASSERT_TRUE(own->ExportTokens(0, split, absl::MakeSpan(bytes)).ok());
    std::unique_ptr<KvCache> plugged = Cache(dt);
    ASSERT_TRUE(plugged->AppendBytes(t1, p1, bytes).ok());
    const std::vector<float> x = Run(t2, p2, own.get());
    const std::vector<float> y = Run(t2, p2, plugged.get());
    EXPECT_EQ(x, y) << DTypeName(dt);
  }
}

TEST_F(LlamaModelTest, Bf16CacheStoresRoundedKeysAndAttendsOverThem) {
  const int64_t n = 30;
  std::vector<int32_t> tokens = RandomTokens(rng_, n, 40);
  std::vector<int64_t> positions = Iota(n, 0);
  std::unique_ptr<KvCache> bf = Cache(DType::kBF16), f32 = Cache(DType::kF32);
  ForwardTrace trace;
  const std::vector<float> lb = Run(tokens, positions, bf.get(), &trace);
  const std::vector<float> lf = Run(tokens, positions, f32.get());
  const int d = 16, K = 2;
  for (int layer = 0; layer < 2; ++layer) {
    for (int g = 0; g < K; ++g) {
      std::vector<float> k(n * d), v(n * d);
      ASSERT_TRUE(bf->ReadHead(layer, g, 0, n, absl::MakeSpan(k), absl::MakeSpan(v)).ok());
      for (int64_t t = 0; t < n; ++t) {
        for (int e = 0; e < d; ++e) {
          const size_t src = (t * K + g) * d + e;
          ASSERT_EQ(k[t * d + e], RoundTo(DType::kBF16, trace.keys[layer][src]));
          ASSERT_EQ(v[t * d + e], RoundTo(DType::kBF16, trace.values[layer][src]));
        }
      }
    }
  }
  // bf16 K/V perturb the logits a little, not a lot.
  const double diff = MaxAbsDiff(lb, lf);
  EXPECT_GT(diff, 0.0);
  EXPECT_LT(diff, 0.05 * std::max(1.0, MaxAbs(lf)));
}

TEST_F(LlamaModelTest, TraceShapesAndLayer0Keys) {
  const int64_t n = 9;
  std::vector<int32_t> tokens = RandomTokens(rng_, n, 40);
  std::vector<int64_t> positions = {0, 1, 2, 10, 11, 12, 100, 101, 102};
  std::unique_ptr<KvCache> cache = Cache(DType::kF32);
  ForwardTrace trace;
  Run(tokens, positions, cache.get(), &trace);
  ASSERT_EQ(trace.hidden.size(), 3u);
  EXPECT_EQ(trace.hidden[0].size(), static_cast<size_t>(n * 48));
  ASSERT_EQ(trace.queries.size(), 2u);
  EXPECT_EQ(trace.queries[0].size(), static_cast<size_t>(n * 4 * 16));
  EXPECT_EQ(trace.keys[1].size(), static_cast<size_t>(n * 2 * 16));
  EXPECT_EQ(trace.attention[1].size(), static_cast<size_t>(n * 4 * 16));
  // Embeddings are the rows of embed_tokens.
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(trace.hidden[0][i * 48 + 5], model_->weights().embed_tokens[tokens[i] * 48 + 5]);
  }
  absl::StatusOr<std::vector<float>> k0 = model_->Layer0Keys(tokens, positions);
  ASSERT_TRUE(k0.ok()) << k0.status();
  EXPECT_LT(MaxAbsDiff(*k0, trace.keys[0]), 1e-6 * std::max(1.0, MaxAbs(trace.keys[0])));
  // Layer-0 keys do not depend on context: one token alone gives the same key.
  absl::StatusOr<std::vector<float>> one =
      model_->Layer0Keys(absl::MakeConstSpan(tokens).subspan(6, 1), {&positions[6], 1});
  ASSERT_TRUE(one.ok());
  for (int e = 0; e < 2 * 16; ++e) {
    EXPECT_NEAR((*one)[e], (*k0)[6 * 32 + e], 1e-6 * (1 + std::fabs((*one)[e])));
  }
}

TEST_F(LlamaModelTest, BadInputsAreInvalidArgumentAndLeaveTheCache) {
  std::unique_ptr<KvCache> cache = Cache(DType::kF32);
  Run({1, 2, 3}, {0, 1, 2}, cache.get());
  ASSERT_EQ(cache->tokens(), 3);
  const std::vector<int32_t> bad_token = {1, 40};
  const std::vector<int32_t> neg_token = {-1};
  const std::vector<int32_t> ok2 = {1, 2};
  const std::vector<int64_t> p2 = {3, 4}, p1 = {3}, neg = {3, -1};
  EXPECT_EQ(model_->Prefill(bad_token, p2, cache.get()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->Prefill(neg_token, p1, cache.get()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->Prefill(ok2, p1, cache.get()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->Prefill(ok2, neg, cache.get()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(model_->Prefill(ok2, p2, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  KvCacheOptions o;
  o.num_layers = 3;  // the model has 2
  o.num_kv_heads = 2;
  o.head_dim = 16;
  absl::StatusOr<std::unique_ptr<KvCache>> wrong = KvCache::Create(o);
  ASSERT_TRUE(wrong.ok());
  absl::Status s = model_->Prefill(ok2, p2, wrong->get()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(s.message()).find("3 x 2 x 16"), std::string::npos) << s;
  EXPECT_EQ(cache->tokens(), 3);
  EXPECT_EQ((*wrong)->tokens(), 0);
  EXPECT_EQ(model_->Layer0Keys(bad_token, p2).status().code(), absl::StatusCode::kInvalidArgument);
  // No tokens: no logits, nothing appended.
  absl::StatusOr<std::vector<float>> empty = model_->Prefill({}, {}, cache.get());
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
  EXPECT_EQ(cache->tokens(), 3);
}

TEST(LlamaModelRandomTest, DeterministicPerSeedAndValidatesConfig) {
  absl::StatusOr<std::unique_ptr<LlamaModel>> a = LlamaModel::Random(SmallConfig(1), 9);
  absl::StatusOr<std::unique_ptr<LlamaModel>> b = LlamaModel::Random(SmallConfig(1), 9);
  absl::StatusOr<std::unique_ptr<LlamaModel>> c = LlamaModel::Random(SmallConfig(1), 10);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ((*a)->weights().layers[0].k_proj, (*b)->weights().layers[0].k_proj);
  EXPECT_NE((*a)->weights().layers[0].k_proj, (*c)->weights().layers[0].k_proj);
  LlamaConfig bad = SmallConfig(1);
  bad.num_key_value_heads = 3;
  EXPECT_EQ(LlamaModel::Random(bad, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace llama
}  // namespace ropekv
