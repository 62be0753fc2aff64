#include "cache/compose.h"

#include <cmath>
#include <cstring>
#include <random>

#include "gtest/gtest.h"

namespace ropekv {
namespace {

// An fp32 model with 2 layers, 2 KV heads, head_dim 32, 8-token blocks.
ModelSpec SmallSpec() {
  ModelSpec s;
  s.layers = 2;
  s.kv_heads = 2;
  s.head_dim = 32;
  s.dtype = DType::kF32;
  s.block_tokens = 8;
  s.rope.head_dim = 32;
  s.rope.theta = 10000;
  return s;
}

class ComposeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KvCache::Options o;
    o.host_capacity_bytes = 1 << 24;
    cache_ = *KvCache::Create(std::move(o));
    ASSERT_TRUE(cache_->RegisterModel(SmallSpec(), "m").ok());
  }

  // Pre-RoPE keys and values for n tokens: [layer][k|v][head][token][dim] over n tokens.
  static std::vector<float> RawKv(uint64_t seed, int n) {
    const ModelSpec s = SmallSpec();
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    std::vector<float> kv(size_t{2} * s.layers * s.kv_heads * n * s.head_dim);
    for (auto& x : kv) x = nd(rng);
    return kv;
  }

  // The keys of raw freshly rotated at positions start.. (ApplyRopeCpu), values untouched.
  static std::vector<float> Rotated(std::vector<float> kv, int n, int64_t start) {
    const ModelSpec s = SmallSpec();
    std::vector<int64_t> pos(n);
    for (int t = 0; t < n; ++t) pos[t] = start + t;
    for (int l = 0; l < s.layers; ++l) {
      for (int h = 0; h < s.kv_heads; ++h) {
        float* k = kv.data() + ((size_t(l) * 2 * s.kv_heads + h) * n) * s.head_dim;
        EXPECT_TRUE(ApplyRopeCpu(s.rope, 0, DType::kF32, n, 1, k, pos.data()).ok());
      }
    }
    return kv;
  }

  // Lays n tokens out as padded blocks and stores them.
  void PutKv(const std::vector<int32_t>& tokens, const std::vector<float>& kv, bool segment,
             std::optional<int64_t> rotated_at = std::nullopt) {
    const ModelSpec s = SmallSpec();
    const int n = static_cast<int>(tokens.size()), bt = s.block_tokens;
    const int blocks = (n + bt - 1) / bt;
    std::vector<float> out(size_t(blocks) * BlockBytes(s) / 4, 0.0f);
    const KvStrides bs = BlockStrides(s);
    for (int l = 0; l < s.layers; ++l)
      for (int kvi = 0; kvi < 2; ++kvi)
        for (int h = 0; h < s.kv_heads; ++h)
          for (int t = 0; t < n; ++t)
            for (int d = 0; d < s.head_dim; ++d) {
              const size_t src =
                  (((size_t(l) * 2 + kvi) * s.kv_heads + h) * n + t) * s.head_dim + d;
              const size_t dst = size_t(t / bt) * BlockBytes(s) / 4 + l * bs.layer + kvi * bs.kv +
                                 h * bs.head + (t % bt) * bs.token + d;
              out[dst] = kv[src];
            }
    PutOptions o;
    o.model = "m";
    o.tokens = tokens;
    o.segment = segment;
    o.rotated_at = rotated_at;
    auto w = cache_->BeginPut(std::move(o));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE(
        (*w)->Write(absl::string_view(reinterpret_cast<const char*>(out.data()), out.size() * 4))
            .ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }

  std::unique_ptr<KvCache> cache_;
};

TEST_F(ComposeTest, PartsAtNewPositionsEqualFreshRotation) {
  const ModelSpec s = SmallSpec();
  std::vector<int32_t> prefix(16), seg(13);
  for (int i = 0; i < 16; ++i) prefix[i] = 100 + i;
  for (int i = 0; i < 13; ++i) seg[i] = 500 + i;
  const auto raw_p = RawKv(1, 16), raw_s = RawKv(2, 13);
  PutKv(prefix, Rotated(raw_p, 16, 0), /*segment=*/false);
  PutKv(seg, Rotated(raw_s, 13, 0), /*segment=*/true);  // a module encoded at 0

  // prefix at 0 (as stored), the segment right after it (16), and again at 1000.
  std::vector<ComposePart> parts(3);
  parts[0].tokens = prefix;
  parts[1].tokens = seg;
  parts[1].segment = true;
  parts[2].tokens = seg;
  parts[2].segment = true;
  parts[2].target_position = 1000;
  auto prompt = Compose(*cache_, "m", "", parts);
  ASSERT_TRUE(prompt.ok()) << prompt.status();
  ASSERT_EQ(prompt->total_tokens(), 42u);
  EXPECT_EQ(prompt->parts()[0].hit, HitKind::kExact);
  EXPECT_EQ(prompt->parts()[1].hit, HitKind::kRerotated);
  EXPECT_EQ(prompt->parts()[1].position, 16);
  EXPECT_EQ(prompt->parts()[2].position, 1000);

  // Expected: each part freshly rotated at its position, laid out over the prompt's 42 tokens.
  const auto e0 = Rotated(raw_p, 16, 0), e1 = Rotated(raw_s, 13, 16), e2 = Rotated(raw_s, 13, 1000);
  const int total = 42;
  for (int l = 0; l < s.layers; ++l) {
    std::vector<float> layer(prompt->layer_bytes() / 4, std::nanf(""));
    ASSERT_TRUE(prompt->WriteLayer(l, layer.data()).ok());
    for (int kvi = 0; kvi < 2; ++kvi)
      for (int h = 0; h < s.kv_heads; ++h)
        for (int t = 0; t < total; ++t)
          for (int d = 0; d < s.head_dim; ++d) {
            const auto& src = t < 16 ? e0 : (t < 29 ? e1 : e2);
            const int n = t < 16 ? 16 : 13, tt = t < 16 ? t : (t < 29 ? t - 16 : t - 29);
            const float want =
                src[(((size_t(l) * 2 + kvi) * s.kv_heads + h) * n + tt) * s.head_dim + d];
            const float got = layer[((size_t(kvi) * s.kv_heads + h) * total + t) * s.head_dim + d];
            if (kvi == 1 || t < 16) {
              ASSERT_EQ(got, want) << "bit-exact where nothing moves: l" << l << " t" << t;
            } else {
              ASSERT_NEAR(got, want, 4 * UlpOf(DType::kF32, std::fabs(want)) + 1e-6)
                  << "l" << l << " h" << h << " t" << t << " d" << d;
            }
          }
  }
}

TEST_F(ComposeTest, MissesAndBadPartsNameThePart) {
  std::vector<ComposePart> parts(1);
  parts[0].tokens = {1, 2, 3};
  parts[0].segment = true;
  auto r = Compose(*cache_, "m", "", parts);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(r.status().message().find("part 0"), std::string::npos) << r.status();
  parts[0].segment = false;  // 3 tokens are not a whole block
  EXPECT_EQ(Compose(*cache_, "m", "", parts).status().code(), absl::StatusCode::kInvalidArgument);
  parts[0].tokens.assign(8, 7);
  parts[0].target_position = -5;
  EXPECT_EQ(Compose(*cache_, "m", "", parts).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Compose(*cache_, "m", "", {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Compose(*cache_, "nope", "", parts).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ComposeTest, SegmentsAreAllOrNothing) {
  std::vector<int32_t> seg(20);
  for (int i = 0; i < 20; ++i) seg[i] = i;
  PutKv(seg, Rotated(RawKv(3, 20), 20, 0), /*segment=*/true);
  EXPECT_EQ(cache_->LookupSegment("m", "", seg)->matched_tokens, 20u);
  // A prefix of the segment's tokens is another segment; the tokens are no prefix either.
  EXPECT_EQ(cache_->LookupSegment("m", "", absl::MakeSpan(seg).subspan(0, 16))->matched_tokens, 0u);
  EXPECT_EQ(cache_->Lookup("m", "", seg)->matched_tokens, 0u);
  EXPECT_EQ(cache_->LookupSegment("m", "t2", seg)->matched_tokens, 0u);
}

}  // namespace
}  // namespace ropekv
