#include "clients/llama/kv_cache.h"

#include <cstring>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace llama {
namespace {

constexpr int kLayers = 3, kHeads = 2, kDim = 8, kBlock = 4;

class KvCacheTest : public ::testing::TestWithParam<DType> {
 protected:
  std::unique_ptr<KvCache> NewCache() {
    KvCacheOptions o;
    o.num_layers = kLayers;
    o.num_kv_heads = kHeads;
    o.head_dim = kDim;
    o.dtype = GetParam();
    o.block_tokens = kBlock;
    absl::StatusOr<std::unique_ptr<KvCache>> c = KvCache::Create(o);
    EXPECT_TRUE(c.ok()) << c.status();
    return std::move(*c);
  }

  // Random K/V for n tokens of every layer: kv[layer][0|1] = [n][heads][dim].
  std::vector<std::vector<std::vector<float>>> RandomKv(int64_t n) {
    std::normal_distribution<float> normal;
    std::vector<std::vector<std::vector<float>>> kv(kLayers);
    for (auto& layer : kv) {
      layer.resize(2);
      for (auto& t : layer) {
        t.resize(static_cast<size_t>(n * kHeads * kDim));
        for (float& x : t) x = normal(rng_);
      }
    }
    return kv;
  }

  // Appends n tokens (ids 100 + i, positions 1000 + 3i) with the given K/V.
  void Fill(KvCache* c, const std::vector<std::vector<std::vector<float>>>& kv, int64_t n) {
    std::vector<int32_t> ids(n);
    std::vector<int64_t> pos(n);
    for (int64_t i = 0; i < n; ++i) {
      ids[i] = static_cast<int32_t>(100 + c->tokens() + i);
      pos[i] = 1000 + 3 * (c->tokens() + i);
    }
    absl::StatusOr<int64_t> first = c->Reserve(ids, pos);
    ASSERT_TRUE(first.ok());
    for (int l = 0; l < kLayers; ++l) {
      ASSERT_TRUE(c->WriteLayer(l, *first, kv[l][0], kv[l][1]).ok());
    }
  }

  std::mt19937 rng_{42};
};

TEST_P(KvCacheTest, StoresRoundedValuesInBlockLayout) {
  const DType dt = GetParam();
  std::unique_ptr<KvCache> c = NewCache();
  const int64_t n = 10;  // two full blocks and a partial one
  auto kv = RandomKv(n);
  Fill(c.get(), kv, n);
  EXPECT_EQ(c->tokens(), n);
  EXPECT_EQ(c->num_blocks(), 3);
  EXPECT_EQ(c->TokensInBlock(0), 4);
  EXPECT_EQ(c->TokensInBlock(2), 2);
  EXPECT_EQ(c->positions()[9], 1027);
  EXPECT_EQ(c->token_ids()[9], 109);
  const size_t es = DTypeSize(dt);
  EXPECT_EQ(c->BlockBytes(), static_cast<size_t>(kLayers * 2 * kHeads * kBlock * kDim) * es);

  // Every element sits where [layer][k|v][kv_head][token][head_dim] says, rounded once.
  for (int64_t b = 0; b < c->num_blocks(); ++b) {
    absl::Span<const uint8_t> block = c->BlockData(b);
    ASSERT_EQ(block.size(), c->BlockBytes());
    for (int l = 0; l < kLayers; ++l) {
      for (int kvi = 0; kvi < 2; ++kvi) {
        for (int h = 0; h < kHeads; ++h) {
          for (int s = 0; s < kBlock; ++s) {
            for (int d = 0; d < kDim; ++d) {
              const size_t idx =
                  (((static_cast<size_t>(l) * 2 + kvi) * kHeads + h) * kBlock + s) * kDim + d;
              const float got = LoadAsFloat(block.data(), idx, dt);
              const int64_t t = b * kBlock + s;
              const float want = t < n ? RoundTo(dt, kv[l][kvi][(t * kHeads + h) * kDim + d])
                                       : 0.0f;  // unused slots of the last block are zero
              ASSERT_EQ(got, want)
                  << "b" << b << " l" << l << " kv" << kvi << " h" << h << " s" << s << " d" << d;
            }
          }
        }
      }
    }
  }

  // ReadHead returns the same rounded values as fp32.
  std::vector<float> k(static_cast<size_t>(7 * kDim), NAN), v(k.size(), NAN);
  ASSERT_TRUE(c->ReadHead(2, 1, 3, 10, absl::MakeSpan(k), absl::MakeSpan(v)).ok());
  for (int64_t t = 3; t < 10; ++t) {
    for (int d = 0; d < kDim; ++d) {
      EXPECT_EQ(k[(t - 3) * kDim + d], RoundTo(dt, kv[2][0][(t * kHeads + 1) * kDim + d]));
      EXPECT_EQ(v[(t - 3) * kDim + d], RoundTo(dt, kv[2][1][(t * kHeads + 1) * kDim + d]));
    }
  }
}

TEST_P(KvCacheTest, ExportAndAppendBytesRoundTrip) {
  std::unique_ptr<KvCache> a = NewCache();
  auto kv = RandomKv(11);
  Fill(a.get(), kv, 11);

  // A block-aligned full block exports exactly its BlockData.
  std::vector<uint8_t> blk(a->BytesFor(kBlock), 0xFF);
  ASSERT_TRUE(a->ExportTokens(4, 8, absl::MakeSpan(blk)).ok());
  absl::Span<const uint8_t> b1 = a->BlockData(1);
  EXPECT_EQ(std::vector<uint8_t>(b1.begin(), b1.end()), blk);

  // Any range, exported into poisoned memory, then appended to another cache in two parts.
  std::unique_ptr<KvCache> b = NewCache();
  for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, 3}, {3, 11}}) {
    std::vector<uint8_t> bytes(a->BytesFor(end - begin), 0xFF);
    ASSERT_TRUE(a->ExportTokens(begin, end, absl::MakeSpan(bytes)).ok());
    // Element (l, kv, h, t, d) of the export holds token begin + t.
    const DType dt = GetParam();
    for (int l = 0; l < kLayers; ++l) {
      for (int h = 0; h < kHeads; ++h) {
        for (int64_t t = 0; t < end - begin; ++t) {
          const size_t idx =
              (((static_cast<size_t>(l) * 2 + 1) * kHeads + h) * (end - begin) + t) * kDim;
          ASSERT_EQ(LoadAsFloat(bytes.data(), idx, dt),
                    RoundTo(dt, kv[l][1][((begin + t) * kHeads + h) * kDim]));
        }
      }
    }
    std::vector<int32_t> ids(a->token_ids().begin() + begin, a->token_ids().begin() + end);
    std::vector<int64_t> pos(a->positions().begin() + begin, a->positions().begin() + end);
    ASSERT_TRUE(b->AppendBytes(ids, pos, bytes).ok());
  }
  ASSERT_EQ(b->tokens(), 11);
  EXPECT_EQ(std::vector<int64_t>(b->positions().begin(), b->positions().end()),
            std::vector<int64_t>(a->positions().begin(), a->positions().end()));
  EXPECT_EQ(std::vector<int32_t>(b->token_ids().begin(), b->token_ids().end()),
            std::vector<int32_t>(a->token_ids().begin(), a->token_ids().end()));
  for (int64_t blk_i = 0; blk_i < a->num_blocks(); ++blk_i) {
    absl::Span<const uint8_t> x = a->BlockData(blk_i), y = b->BlockData(blk_i);
    ASSERT_EQ(std::memcmp(x.data(), y.data(), x.size()), 0) << blk_i;
  }
}

TEST_P(KvCacheTest, TruncateZeroesFreedSlots) {
  std::unique_ptr<KvCache> c = NewCache();
  auto kv = RandomKv(8);
  Fill(c.get(), kv, 8);
  ASSERT_TRUE(c->Truncate(5).ok());
  EXPECT_EQ(c->tokens(), 5);
  EXPECT_EQ(c->num_blocks(), 2);
  EXPECT_EQ(c->positions().size(), 5u);
  // Block 1 now holds one token; its other slots are zero again.
  absl::Span<const uint8_t> blk = c->BlockData(1);
  const DType dt = GetParam();
  for (int l = 0; l < kLayers; ++l) {
    for (int kvi = 0; kvi < 2; ++kvi) {
      for (int h = 0; h < kHeads; ++h) {
        for (int s = 0; s < kBlock; ++s) {
          const size_t idx =
              (((static_cast<size_t>(l) * 2 + kvi) * kHeads + h) * kBlock + s) * kDim + 3;
          const float want = s == 0 ? RoundTo(dt, kv[l][kvi][(4 * kHeads + h) * kDim + 3]) : 0.0f;
          EXPECT_EQ(LoadAsFloat(blk.data(), idx, dt), want);
        }
      }
    }
  }
  EXPECT_EQ(c->Truncate(6).code(), absl::StatusCode::kInvalidArgument);
  c->Clear();
  EXPECT_EQ(c->tokens(), 0);
  EXPECT_EQ(c->num_blocks(), 0);
}

TEST_P(KvCacheTest, BadArgumentsAreInvalidArgument) {
  std::unique_ptr<KvCache> c = NewCache();
  auto kv = RandomKv(2);
  Fill(c.get(), kv, 2);
  std::vector<float> k(kHeads * kDim), v(kHeads * kDim);
  EXPECT_EQ(c->WriteLayer(kLayers, 0, k, v).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->WriteLayer(0, 2, k, v).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->WriteLayer(0, 0, k, absl::MakeConstSpan(v).subspan(1)).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<uint8_t> out(c->BytesFor(2));
  EXPECT_EQ(c->ExportTokens(1, 3, absl::MakeSpan(out)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->ExportTokens(0, 1, absl::MakeSpan(out)).code(), absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> ids = {1};
  std::vector<int64_t> pos = {1, 2};
  EXPECT_EQ(c->AppendBytes(ids, pos, out).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->Reserve(ids, pos).status().code(), absl::StatusCode::kInvalidArgument);
  pos.pop_back();
  EXPECT_EQ(c->AppendBytes(ids, pos, out).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->tokens(), 2);  // failed calls change nothing
  std::vector<float> r(kDim);
  EXPECT_EQ(c->ReadHead(0, kHeads, 0, 1, absl::MakeSpan(r), {}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(c->ReadHead(0, 0, 0, 2, absl::MakeSpan(r), {}).code(),
            absl::StatusCode::kInvalidArgument);
  KvCacheOptions o;
  EXPECT_EQ(KvCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, KvCacheTest,
                         ::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                         [](const ::testing::TestParamInfo<DType>& i) {
                           return std::string(DTypeName(i.param));
                         });

}  // namespace
}  // namespace llama
}  // namespace ropekv
