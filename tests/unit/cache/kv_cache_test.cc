#include "cache/kv_cache.h"

#include <cstring>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "gtest/gtest.h"
#include "tests/unit/cache/block_serials.h"

namespace ropekv {
namespace {

class KvCacheTest : public ::testing::Test {
 protected:
  void SetUp() override { Make(64 * BlockBytes(DemoModelSpec())); }

  void Make(uint64_t capacity) {
    KvCache::Options o;
    o.host_capacity_bytes = capacity;
    auto c = KvCache::Create(std::move(o));
    ASSERT_TRUE(c.ok()) << c.status();
    cache_ = *std::move(c);
    auto reg = cache_->RegisterModel(DemoModelSpec(), "demo");
    ASSERT_TRUE(reg.ok()) << reg.status();
    model_ = reg->id;
    bb_ = BlockBytes(DemoModelSpec());
  }

  static std::vector<int32_t> Tokens(uint64_t seed, size_t n) {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng() % 32000);
    return t;
  }
  static std::string Bytes(uint64_t seed, size_t n) {
    std::mt19937_64 rng(seed);
    std::string b(n, '\0');
    for (auto& c : b) c = static_cast<char>(rng());
    return b;
  }

  absl::StatusOr<PutResult> Put(const std::vector<int32_t>& tokens, absl::string_view bytes,
                                bool pin = false, size_t piece = 777,
                                std::optional<BlockHash> parent = std::nullopt) {
    PutOptions o;
    o.model = "demo";
    o.tokens = tokens;
    o.pin = pin;
    o.parent = parent;
    auto w = cache_->BeginPut(std::move(o));
    if (!w.ok()) return w.status();
    for (size_t off = 0; off < bytes.size(); off += piece) {
      if (auto s = (*w)->Write(bytes.substr(off, piece)); !s.ok()) return s;
    }
    return (*w)->Finish();
  }

  // Puts `tokens` after block `parent` (a continuation of its prompt).
  absl::StatusOr<PutResult> PutAfter(const BlockHash& parent, const std::vector<int32_t>& tokens,
                                     absl::string_view bytes) {
    return Put(tokens, bytes, /*pin=*/false, /*piece=*/777, parent);
  }

  std::string Read(const std::vector<int32_t>& tokens) {
    auto h = cache_->AcquirePrefix("demo", "", tokens, 0);
    EXPECT_TRUE(h.ok());
    std::string out;
    for (size_t i = 0; i < h->blocks().size(); ++i) out += std::string(h->bytes(i));
    return out;
  }

  std::unique_ptr<KvCache> cache_;
  ModelId model_;
  uint64_t bb_ = 0;
};

TEST_F(KvCacheTest, PutLookupGetIsByteExact) {
  const auto tokens = Tokens(1, 5 * 16);
  const std::string bytes = Bytes(2, 5 * bb_);
  auto r = Put(tokens, bytes);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->blocks_stored, 5u);
  EXPECT_EQ(r->blocks_existing, 0u);
  // A longer prompt with a partial tail matches the 80 cached tokens.
  auto longer = tokens;
  longer.insert(longer.end(), {7, 8, 9});
  auto l = cache_->Lookup("demo", "", longer);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->matched_tokens, 80u);
  ASSERT_EQ(l->blocks.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(l->blocks[i].position, 16 * i);
    EXPECT_EQ(l->blocks[i].rotated_at, 16 * i);
    EXPECT_EQ(l->blocks[i].hash, r->hashes[i]);
  }
  EXPECT_EQ(Read(longer), bytes);
  // By id as well as by name.
  EXPECT_EQ(cache_->Lookup(model_, "", tokens)->matched_tokens, 80u);
  // Another tenant sees nothing.
  EXPECT_EQ(cache_->Lookup("demo", "other", tokens)->matched_tokens, 0u);
}

TEST_F(KvCacheTest, SharedSystemPromptIsFound) {
  const auto system = Tokens(3, 3 * 16);
  auto a = system, b = system;
  const auto ta = Tokens(4, 32), tb = Tokens(5, 32);
  a.insert(a.end(), ta.begin(), ta.end());
  b.insert(b.end(), tb.begin(), tb.end());
  const std::string ba = Bytes(6, 5 * bb_);
  ASSERT_TRUE(Put(a, ba).ok());
  auto l = cache_->Lookup("demo", "", b);
  EXPECT_EQ(l->matched_tokens, 48u);
  // Storing b stores only its 2 new blocks; the shared 3 are kept (not overwritten).
  auto r = Put(b, Bytes(7, 5 * bb_));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->blocks_stored, 2u);
  EXPECT_EQ(r->blocks_existing, 3u);
  EXPECT_EQ(Read(system), ba.substr(0, 3 * bb_));
}

TEST_F(KvCacheTest, ContinuesFromAParent) {
  const auto t = Tokens(8, 64);
  const std::string bytes = Bytes(9, 4 * bb_);
  auto first = Put(std::vector<int32_t>(t.begin(), t.begin() + 32), bytes.substr(0, 2 * bb_));
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(PutAfter(first->hashes.back(), std::vector<int32_t>(t.begin() + 32, t.end()),
                       absl::string_view(bytes).substr(2 * bb_))
                  .ok());
  auto l = cache_->Lookup("demo", "", t);
  EXPECT_EQ(l->matched_tokens, 64u);
  EXPECT_EQ(l->blocks[3].position, 48);
  EXPECT_EQ(Read(t), bytes);
}

// A prefix named by its last block's hash: the chain back to the prompt's start, across Puts that
// continue from a parent; all of it cached, or NOT_FOUND.
TEST_F(KvCacheTest, AcquireChainHoldsThePrefixThatEndsAtABlock) {
  const auto t = Tokens(40, 6 * 16);
  const std::string bytes = Bytes(41, 6 * bb_);
  auto first = Put(std::vector<int32_t>(t.begin(), t.begin() + 64), bytes.substr(0, 4 * bb_));
  ASSERT_TRUE(first.ok());
  auto second = PutAfter(first->hashes.back(), std::vector<int32_t>(t.begin() + 64, t.end()),
                         absl::string_view(bytes).substr(4 * bb_));
  ASSERT_TRUE(second.ok());
  auto by_tokens = cache_->AcquirePrefix("demo", "", t, 0);
  ASSERT_TRUE(by_tokens.ok());
  ASSERT_EQ(by_tokens->blocks().size(), 6u);
  for (size_t last = 0; last < 6; ++last) {
    const BlockHash h = by_tokens->blocks()[last].hash;
    auto chain = cache_->AcquireChain(model_, h);
    ASSERT_TRUE(chain.ok()) << chain.status();
    ASSERT_EQ(chain->blocks().size(), last + 1);
    EXPECT_EQ(chain->matched_tokens(), 16 * (last + 1));
    for (size_t b = 0; b <= last; ++b) {
      EXPECT_EQ(chain->blocks()[b].hash, by_tokens->blocks()[b].hash);
      EXPECT_EQ(chain->bytes(b), absl::string_view(bytes).substr(b * bb_, bb_));
    }
  }
  EXPECT_EQ(cache_->AcquireChain("demo", second->hashes.back())->blocks().size(), 6u);
  by_tokens = absl::CancelledError("released");
  // Unknown block, another model: NOT_FOUND. A segment's blocks chain too (whole blocks).
  EXPECT_EQ(cache_->AcquireChain("demo", BlockHash()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache_->AcquireChain("nope", second->hashes.back()).status().code(),
            absl::StatusCode::kNotFound);
  ModelSpec other = DemoModelSpec();
  other.layers += 1;
  ASSERT_TRUE(cache_->RegisterModel(other, "other").ok());
  EXPECT_EQ(cache_->AcquireChain("other", second->hashes.back()).status().code(),
            absl::StatusCode::kNotFound);
  PutOptions seg;
  seg.model = "demo";
  seg.segment = true;
  seg.tokens = Tokens(42, 20);
  auto sw = cache_->BeginPut(std::move(seg));
  ASSERT_TRUE(sw.ok());
  ASSERT_TRUE((*sw)->Write(Bytes(43, 2 * bb_)).ok());
  auto segment = (*sw)->Finish();
  ASSERT_TRUE(segment.ok()) << segment.status();
  EXPECT_EQ(cache_->AcquireChain("demo", segment->hashes.back())->blocks().size(), 2u);
  // Evicted (the first Put's blocks and what is chained after them), no chain is held.
  ASSERT_TRUE(cache_->Evict("demo", "", std::vector<int32_t>(t.begin(), t.begin() + 64)).ok());
  EXPECT_EQ(cache_->AcquireChain("demo", second->hashes.back()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(cache_->AcquireChain("demo", first->hashes[2]).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(KvCacheTest, BadInputChangesNothing) {
  const auto tokens = Tokens(10, 32);
  const std::string bytes = Bytes(11, 2 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  const CacheStats before = cache_->Stats();

  PutOptions o;
  o.model = "nope";
  o.tokens = Tokens(12, 16);
  EXPECT_EQ(cache_->BeginPut(o).status().code(), absl::StatusCode::kNotFound);
  o.model = "demo";
  o.tokens = Tokens(12, 15);  // not a multiple of block_tokens
  auto bad = cache_->BeginPut(o);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("16"), std::string::npos) << bad.status();
  // Too many bytes, too few bytes.
  EXPECT_EQ(Put(Tokens(13, 16), Bytes(14, bb_ + 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Put(Tokens(13, 16), Bytes(14, bb_ - 1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Unknown parent.
  o.tokens = Tokens(15, 16);
  o.parent = PrefixBlockHash("x", "", nullptr, o.tokens);
  EXPECT_EQ(cache_->BeginPut(o).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache_->Lookup("nope", "", tokens).status().code(), absl::StatusCode::kNotFound);

  const CacheStats after = cache_->Stats();
  EXPECT_EQ(after.tiers[0].blocks, before.tiers[0].blocks);
  EXPECT_EQ(after.tiers[0].bytes_used, before.tiers[0].bytes_used);  // abandoned slots freed
  EXPECT_EQ(Read(tokens), bytes);
}

TEST_F(KvCacheTest, BlockLargerThanLimitIsRefused) {
  ModelSpec big = DemoModelSpec();
  big.layers = 1000;  // 8 MB blocks > 64 blocks of the demo model
  auto r = cache_->RegisterModel(big, "big");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(KvCacheTest, EvictionUnderPressureNeverReturnsAWrongBlock) {
  Make(10 * BlockBytes(DemoModelSpec()));
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> payloads;
  for (int i = 0; i < 30; ++i) {  // 3x the capacity
    prompts.push_back(Tokens(100 + i, 32));
    payloads.push_back(Bytes(200 + i, 2 * bb_));
    ASSERT_TRUE(Put(prompts.back(), payloads.back()).ok()) << i;
    EXPECT_LE(cache_->Stats().tiers[0].bytes_used, 10 * bb_);
  }
  int hits = 0;
  for (int i = 0; i < 30; ++i) {
    const std::string got = Read(prompts[i]);
    EXPECT_EQ(got, payloads[i].substr(0, got.size())) << i;  // a prefix of the right bytes
    hits += got.empty() ? 0 : 1;
  }
  EXPECT_GE(hits, 4);  // the most recent ones survive
  EXPECT_EQ(Read(prompts[29]), payloads[29]);
  EXPECT_GT(cache_->Stats().tiers[0].evictions, 0u);
}

TEST_F(KvCacheTest, PinnedAndReadBlocksStay) {
  Make(4 * BlockBytes(DemoModelSpec()));
  const auto pinned = Tokens(20, 32);
  ASSERT_TRUE(Put(pinned, Bytes(21, 2 * bb_), /*pin=*/true).ok());
  const auto held = Tokens(22, 16);
  ASSERT_TRUE(Put(held, Bytes(23, bb_)).ok());
  auto handle = cache_->AcquirePrefix("demo", "", held, 0);
  ASSERT_TRUE(handle.ok());
  // One free slot left: a 1-block put fits, a 2-block one cannot evict anything.
  ASSERT_TRUE(Put(Tokens(24, 16), Bytes(25, bb_)).ok());
  auto full = Put(Tokens(26, 32), Bytes(27, 2 * bb_));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  EXPECT_EQ(cache_->Lookup("demo", "", pinned)->matched_tokens, 32u);
  EXPECT_EQ(std::string(handle->bytes(0)), Bytes(23, bb_));
  // Unpinned and released, everything is evictable again.
  ASSERT_EQ(*cache_->Pin("demo", "", pinned, false), 2u);
  *handle = std::move(*handle);                                 // self-move keeps the hold
  handle = absl::StatusOr<ReadHandle>(absl::CancelledError());  // releases
  EXPECT_TRUE(Put(Tokens(26, 32), Bytes(27, 2 * bb_)).ok());
}

TEST_F(KvCacheTest, EvictByPrefixTakesDescendants) {
  const auto t = Tokens(30, 64);
  ASSERT_TRUE(Put(t, Bytes(31, 4 * bb_)).ok());
  auto n = cache_->Evict("demo", "", std::vector<int32_t>(t.begin(), t.begin() + 32));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 4u);  // the two named blocks and the two chained after them
  EXPECT_EQ(cache_->Lookup("demo", "", t)->matched_tokens, 0u);
  EXPECT_EQ(cache_->Stats().tiers[0].bytes_used, 0u);
}

// BlockInfo::serial names one store of a block: distinct per block, unchanged by a Put that finds
// the block, new after it was evicted and stored again.
TEST_F(KvCacheTest, BlockSerialsNameEachStoreOfABlock) {
  const auto t = Tokens(40, 3 * 16);
  ASSERT_TRUE(Put(t, Bytes(41, 3 * bb_)).ok());
  auto serials = [&] { return testing::BlockSerials(*cache_, "demo", t); };
  const std::vector<uint64_t> first = serials();
  ASSERT_EQ(first.size(), 3u);
  EXPECT_NE(first[0], 0u);
  EXPECT_EQ(std::set<uint64_t>(first.begin(), first.end()).size(), 3u);
  ASSERT_TRUE(Put(t, Bytes(42, 3 * bb_)).ok());  // finds the blocks: keeps them
  EXPECT_EQ(serials(), first);
  ASSERT_TRUE(cache_->Evict("demo", "", t).ok());
  ASSERT_TRUE(Put(t, Bytes(43, 3 * bb_)).ok());  // stored again, other bytes
  const std::vector<uint64_t> again = serials();
  ASSERT_EQ(again.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_NE(again[i], first[i]) << i;
}

TEST_F(KvCacheTest, ConcurrentWritersAndReadersLoseNothing) {
  Make(512 * BlockBytes(DemoModelSpec()));
  constexpr int kThreads = 8, kPuts = 20;
  std::vector<std::thread> threads;
  std::atomic<int> errors{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPuts; ++i) {
        // Half of the prompts share a first block across threads.
        auto tokens = Tokens(1000 + (i % 2 == 0 ? 0 : t * 100 + i), 16);
        auto tail = Tokens(5000 + t * 100 + i, 32);
        tokens.insert(tokens.end(), tail.begin(), tail.end());
        std::string bytes =
            Bytes(1000 + (i % 2 == 0 ? 0 : t * 100 + i), bb_) + Bytes(5000 + t * 100 + i, 2 * bb_);
        if (!Put(tokens, bytes).ok()) ++errors;
        auto h = cache_->AcquirePrefix("demo", "", tokens, 0);
        if (!h.ok() || h->blocks().size() != 3) {
          ++errors;
          continue;
        }
        for (size_t b = 0; b < 3; ++b) {
          if (h->bytes(b) != absl::string_view(bytes).substr(b * bb_, bb_)) ++errors;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(errors.load(), 0);
}

TEST_F(KvCacheTest, CopyBlockReRotatesKeysOnly) {
  // Keys stored rotated at 0; read at 1000: values bit-exact, keys moved by one rotation.
  const auto tokens = Tokens(40, 16);
  std::string bytes(bb_, '\0');
  std::mt19937 rng(41);
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < bb_ / 2; ++i) StoreFromFloat(bytes.data(), i, DType::kBF16, nd(rng));
  ASSERT_TRUE(Put(tokens, bytes).ok());
  auto h = cache_->AcquirePrefix("demo", "", tokens, 0);
  ASSERT_TRUE(h.ok());
  std::string moved(bb_, '\xff'), same(bb_, '\xff');
  ASSERT_TRUE(h->CopyBlock(0, moved.data(), 1000).ok());
  ASSERT_TRUE(h->CopyBlock(0, same.data(), 0).ok());
  EXPECT_EQ(same, bytes);
  const ModelSpec spec = DemoModelSpec();
  const KvStrides s = BlockStrides(spec);
  for (int layer = 0; layer < spec.layers; ++layer) {
    const size_t k = layer * s.layer * 2, v = k + s.kv * 2;
    const size_t n = s.kv * 2;
    EXPECT_EQ(moved.substr(v, n), bytes.substr(v, n)) << "values of layer " << layer;
    EXPECT_NE(moved.substr(k, n), bytes.substr(k, n)) << "keys of layer " << layer;
  }
  // The rotation preserves each pair's norm (NeoX pairs (i, i + 32)).
  for (int t = 0; t < 16; ++t) {
    for (int i = 0; i < 32; ++i) {
      const size_t a = t * 64 + i, b = a + 32;
      const double before = std::hypot(LoadAsFloat(bytes.data(), a, DType::kBF16),
                                       LoadAsFloat(bytes.data(), b, DType::kBF16));
      const double after = std::hypot(LoadAsFloat(moved.data(), a, DType::kBF16),
                                      LoadAsFloat(moved.data(), b, DType::kBF16));
      EXPECT_NEAR(after, before, 2 * UlpOf(DType::kBF16, before) + 1e-6);
    }
  }
}

}  // namespace
}  // namespace ropekv
