// KvCache over its tiers: the disk tier under restarts, write-through, promotion, demotion,
// watermarks, capacities (global and per model), corruption, and reads racing evictions.
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <thread>

#include "cache/kv_cache.h"
#include "gtest/gtest.h"
#include "tests/unit/cache/block_serials.h"
#include "tests/unit/cache/disk_damage.h"

namespace ropekv {
namespace {

// Counts live and peak bytes so the test sees what the host tier really holds.
class CountingAllocator final : public Allocator {
 public:
  CountingAllocator(std::atomic<int64_t>* live, std::atomic<int64_t>* peak)
      : live_(live), peak_(peak) {}
  void* Allocate(size_t bytes) override {
    const int64_t now = *live_ += bytes;
    int64_t p = peak_->load();
    while (now > p && !peak_->compare_exchange_weak(p, now)) {
    }
    return ::operator new(bytes);
  }
  void Free(void* p, size_t bytes) override {
    *live_ -= bytes;
    ::operator delete(p);
  }

 private:
  std::atomic<int64_t>* live_;
  std::atomic<int64_t>* peak_;
};

const TierCounters& TierOf(const CacheStats& s, TierKind kind) {
  for (const TierCounters& t : s.tiers) {
    if (t.tier == kind) return t;
  }
  static const TierCounters none;
  ADD_FAILURE() << "no tier " << static_cast<int>(kind);
  return none;
}

class TierTest : public ::testing::Test {
 protected:
  struct Config {
    uint64_t host_blocks = 64;
    uint64_t disk_blocks = 1024;
    TierPolicy policy;
    Durability durability = Durability::kMemory;
  };

  void SetUp() override {
    const char* tmp = std::getenv("TEST_TMPDIR");
    dir_ = (std::filesystem::path(tmp ? tmp : "/tmp") /
            ("ropekv-tier-" +
             std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) + "-" +
             std::to_string(getpid())))
               .string();
    std::filesystem::remove_all(dir_);
    bb_ = BlockBytes(DemoModelSpec());
  }
  void TearDown() override {
    cache_.reset();
    std::filesystem::remove_all(dir_);
  }

  void Make(const Config& c) {
    config_ = c;
    DiskTier::Options d;
    d.path = dir_;
    d.capacity_bytes = c.disk_blocks * bb_;
    d.durability = c.durability;
    auto disk = DiskTier::Open(d);
    ASSERT_TRUE(disk.ok()) << disk.status();
    KvCache::Options o;
    o.host_capacity_bytes = c.host_blocks * bb_;
    o.host_allocator = std::make_unique<CountingAllocator>(&live_, &peak_);
    o.disk = *std::move(disk);
    o.policy = c.policy;
    o.background_maintenance = false;
    auto cache = KvCache::Create(std::move(o));
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
  }
  void Register() { ASSERT_TRUE(cache_->RegisterModel(DemoModelSpec(), "demo").ok()); }
  // A restart: the cache goes, a new one opens the same disk.
  void Restart() {
    cache_.reset();
    Make(config_);
  }

  static std::vector<int32_t> Tokens(uint64_t seed, size_t n) {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng() % 32000);
    return t;
  }
  static std::string Bytes(uint64_t seed, size_t n) {
    std::mt19937_64 rng(seed * 7919 + 1);
    std::string b(n, '\0');
    for (size_t i = 0; i < n; i += 8) {
      const uint64_t v = rng();
      std::memcpy(b.data() + i, &v, std::min<size_t>(8, n - i));
    }
    return b;
  }

  absl::StatusOr<PutResult> Put(const std::vector<int32_t>& tokens, const std::string& bytes,
                                bool pin = false, std::string model = "demo",
                                bool segment = false) {
    PutOptions o;
    o.model = std::move(model);
    o.tokens = tokens;
    o.pin = pin;
    o.segment = segment;
    auto w = cache_->BeginPut(std::move(o));
    if (!w.ok()) return w.status();
    if (auto s = (*w)->Write(bytes); !s.ok()) return s;
    return (*w)->Finish();
  }

  // The bytes of the cached prefix of `tokens` (whole blocks).
  std::string Read(const std::vector<int32_t>& tokens, const std::string& model = "demo") {
    auto h = cache_->AcquirePrefix(model, "", tokens, 0);
    EXPECT_TRUE(h.ok()) << h.status();
    if (!h.ok()) return "";
    std::string out;
    for (size_t i = 0; i < h->blocks().size(); ++i) out += std::string(h->bytes(i));
    return out;
  }

  uint32_t Matched(const std::vector<int32_t>& tokens) {
    auto l = cache_->Lookup("demo", "", tokens);
    EXPECT_TRUE(l.ok());
    return l.ok() ? l->matched_tokens : 0;
  }

  // Rewrites the record of block `hash` in its segment file, or (change null) deletes the block
  // behind the cache's back (the cache must be closed).
  void RewriteValue(const BlockHash& hash, const std::function<void(std::string*)>& change) {
    testing::DamageDiskRecord(dir_, hash, change);
  }

  std::string dir_;
  Config config_;
  std::unique_ptr<KvCache> cache_;
  uint64_t bb_ = 0;
  std::atomic<int64_t> live_{0};
  std::atomic<int64_t> peak_{0};
};

TEST(TierPolicyTest, ParsesAndValidates) {
  EXPECT_EQ(*ParseWriteTier("gpu"), WriteTier::kGpu);
  EXPECT_EQ(*ParseWriteTier(" Disk "), WriteTier::kDisk);
  EXPECT_EQ(ParseWriteTier("ssd").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_STREQ(WriteTierName(WriteTier::kHost), "host");

  auto limits = ParseModelLimits("llama=host:1GiB,disk:2GiB; abc=disk:64k");
  ASSERT_TRUE(limits.ok()) << limits.status();
  ASSERT_EQ(limits->size(), 2u);
  EXPECT_EQ((*limits)[0].model, "llama");
  EXPECT_EQ((*limits)[0].host_bytes, 1ull << 30);
  EXPECT_EQ((*limits)[0].disk_bytes, 2ull << 30);
  EXPECT_EQ((*limits)[1].host_bytes, 0u);
  EXPECT_EQ((*limits)[1].disk_bytes, 64u << 10);
  EXPECT_EQ(ParseModelLimits(FormatModelLimits(*limits))->size(), 2u);
  EXPECT_TRUE(ParseModelLimits("")->empty());
  EXPECT_EQ(ParseModelLimits("llama").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseModelLimits("llama=gpu:1G").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseModelLimits("llama=host:lots").status().code(),
            absl::StatusCode::kInvalidArgument);

  TierPolicy p;
  EXPECT_TRUE(ValidateTierPolicy(p).ok());
  p.low_watermark = 0.96;
  EXPECT_EQ(ValidateTierPolicy(p).code(), absl::StatusCode::kInvalidArgument);
  p = TierPolicy();
  p.high_watermark = 1.5;
  EXPECT_EQ(ValidateTierPolicy(p).code(), absl::StatusCode::kInvalidArgument);
  p = TierPolicy();
  p.model_limits = {{"a", 1, 1}, {"a", 2, 2}};
  EXPECT_EQ(ValidateTierPolicy(p).code(), absl::StatusCode::kInvalidArgument);
}

TEST(TierPolicyTest, WriteTierDiskNeedsADisk) {
  KvCache::Options o;
  o.policy.write_tier = WriteTier::kDisk;
  EXPECT_EQ(KvCache::Create(std::move(o)).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(TierTest, RestartFindsEveryBlockAndModel) {
  Make({});
  Register();
  ModelSpec other = DemoModelSpec();
  other.head_dim = 32;
  other.rope.head_dim = 32;
  other.block_tokens = 8;
  auto other_reg = cache_->RegisterModel(other, "small");
  ASSERT_TRUE(other_reg.ok());
  const auto a = Tokens(1, 5 * 16);
  const auto b = Tokens(2, 3 * 16);
  const auto seg = Tokens(3, 21);  // a segment: 2 blocks, the last padded
  const std::string a_bytes = Bytes(1, 5 * bb_);
  const std::string b_bytes = Bytes(2, 3 * bb_);
  const std::string seg_bytes = Bytes(3, 2 * bb_);
  const std::string small_bytes = Bytes(4, 2 * BlockBytes(other));
  ASSERT_TRUE(Put(a, a_bytes).ok());
  ASSERT_TRUE(Put(b, b_bytes, /*pin=*/true).ok());
  ASSERT_TRUE(Put(seg, seg_bytes, false, "demo", /*segment=*/true).ok());
  ASSERT_TRUE(Put(Tokens(5, 16), small_bytes, false, "small").ok());
  // Continue a from its last block: a chain across Puts.
  PutOptions cont;
  cont.model = "demo";
  cont.tokens = Tokens(6, 16);
  cont.parent = cache_->Lookup("demo", "", a)->blocks.back().hash;
  auto w = cache_->BeginPut(cont);
  ASSERT_TRUE(w.ok());
  const std::string cont_bytes = Bytes(6, bb_);
  ASSERT_TRUE((*w)->Write(cont_bytes).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  w->reset();

  const CacheStats before = cache_->Stats();
  EXPECT_EQ(TierOf(before, TierKind::kDisk).blocks, 13u);  // write-through: all on disk
  Restart();
  EXPECT_EQ(cache_->disk_load().blocks, 13u);
  EXPECT_EQ(cache_->disk_load().dropped, 0u);

  // Models are back, with their names.
  auto models = cache_->ListModels();
  ASSERT_EQ(models.size(), 2u);
  auto demo = cache_->ResolveModel("demo");
  ASSERT_TRUE(demo.ok()) << demo.status();
  EXPECT_EQ(demo->id, ModelIdOf(DemoModelSpec()));
  ASSERT_TRUE(cache_->ResolveModel("small").ok());
  EXPECT_EQ(cache_->ResolveModel("small")->id, other_reg->id);

  // Lookup sees everything at once, on disk; nothing is in memory yet.
  auto l = cache_->Lookup("demo", "", a);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->matched_tokens, 80u);
  for (const BlockInfo& bi : l->blocks) EXPECT_EQ(bi.tier, TierKind::kDisk);
  EXPECT_EQ(cache_->Stats().tiers[0].bytes_used, 0u);
  auto lb = cache_->Lookup("demo", "", b);
  ASSERT_EQ(lb->blocks.size(), 3u);
  for (const BlockInfo& bi : lb->blocks) EXPECT_TRUE(bi.pinned);  // pins survive
  EXPECT_EQ(cache_->LookupSegment("demo", "", seg)->matched_tokens, 21u);

  // Reads bring the exact bytes back (promotion to host).
  EXPECT_EQ(Read(a), a_bytes);
  auto longer = a;
  longer.insert(longer.end(), cont.tokens.begin(), cont.tokens.end());
  EXPECT_EQ(Read(longer), a_bytes + cont_bytes);
  EXPECT_EQ(Read(b), b_bytes);
  auto sh = cache_->AcquireSegment("demo", "", seg);
  ASSERT_TRUE(sh.ok()) << sh.status();
  EXPECT_EQ(std::string(sh->bytes(0)) + std::string(sh->bytes(1)), seg_bytes);
  EXPECT_EQ(Read(Tokens(5, 16), "small"), small_bytes);

  const CacheStats after = cache_->Stats();
  const TierCounters& host = TierOf(after, TierKind::kHost);
  const TierCounters& disk = TierOf(after, TierKind::kDisk);
  // 5 (a) + 1 (cont; `longer` found a on host) + 3 (b) + 2 (segment) + 2 ("small": 8-token blocks)
  EXPECT_EQ(host.promotions, 13u);
  EXPECT_EQ(host.blocks, 13u);
  EXPECT_EQ(disk.hits, 13u + 10u);  // 13 reads + 10 blocks the lookups above found on disk
  EXPECT_EQ(disk.bytes_moved, 11 * bb_ + 2 * BlockBytes(other));
  EXPECT_EQ(Read(a), a_bytes);  // now from host
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).hits, host.hits + 5);
}

TEST_F(TierTest, WriteThroughOffDemotesUnderPressureAndStillFindsEverything) {
  Config c;
  c.host_blocks = 8;
  c.policy.write_through = false;
  Make(c);
  Register();
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> bytes;
  std::vector<std::vector<uint64_t>> serials;
  auto serials_of = [&](const std::vector<int32_t>& tokens) {
    return testing::BlockSerials(*cache_, "demo", tokens);
  };
  for (int i = 0; i < 6; ++i) {
    prompts.push_back(Tokens(100 + i, 4 * 16));
    bytes.push_back(Bytes(100 + i, 4 * bb_));
    ASSERT_TRUE(Put(prompts[i], bytes[i]).ok()) << i;
    serials.push_back(serials_of(prompts[i]));
    const CacheStats s = cache_->Stats();
    EXPECT_LE(TierOf(s, TierKind::kHost).bytes_used, 8 * bb_);
  }
  EXPECT_LE(peak_.load(), static_cast<int64_t>(8 * bb_));
  const CacheStats s = cache_->Stats();
  const TierCounters& host = TierOf(s, TierKind::kHost);
  const TierCounters& disk = TierOf(s, TierKind::kDisk);
  EXPECT_GE(host.demotions, 16u);  // 24 blocks, 8 fit on host
  EXPECT_EQ(disk.blocks, host.demotions);
  EXPECT_EQ(host.blocks + disk.blocks, 24u);  // every block lives exactly once
  for (int i = 0; i < 6; ++i) EXPECT_EQ(Read(prompts[i]), bytes[i]) << i;
  // Moved to disk and read back: the same stores of the same blocks.
  for (int i = 0; i < 6; ++i) EXPECT_EQ(serials_of(prompts[i]), serials[i]) << i;
}

TEST_F(TierTest, CapacitiesHoldUnderTwiceTheLoad) {
  Config c;
  c.host_blocks = 8;
  c.disk_blocks = 16;
  Make(c);
  Register();
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> bytes;
  for (int i = 0; i < 16; ++i) {  // 32 blocks: twice the disk, four times the host
    prompts.push_back(Tokens(200 + i, 2 * 16));
    bytes.push_back(Bytes(200 + i, 2 * bb_));
    ASSERT_TRUE(Put(prompts[i], bytes[i]).ok()) << i;
    const CacheStats s = cache_->Stats();
    ASSERT_LE(TierOf(s, TierKind::kHost).bytes_used, 8 * bb_);
    ASSERT_LE(TierOf(s, TierKind::kDisk).bytes_used, 16 * bb_);
  }
  EXPECT_LE(peak_.load(), static_cast<int64_t>(8 * bb_));
  // Every prompt reads back whole and right, or as a shorter prefix that is right, or not at
  // all; the most recent ones are all there.
  int whole = 0;
  for (int i = 0; i < 16; ++i) {
    const std::string got = Read(prompts[i]);
    ASSERT_EQ(got, bytes[i].substr(0, got.size())) << i;
    whole += got.size() == bytes[i].size();
    const CacheStats s = cache_->Stats();
    ASSERT_LE(TierOf(s, TierKind::kHost).bytes_used, 8 * bb_);
    ASSERT_LE(TierOf(s, TierKind::kDisk).bytes_used, 16 * bb_);
  }
  EXPECT_GE(whole, 6);
  for (int i = 13; i < 16; ++i) EXPECT_EQ(Matched(prompts[i]), 32u) << i;
  EXPECT_GT(TierOf(cache_->Stats(), TierKind::kDisk).evictions, 0u);
}

TEST_F(TierTest, CorruptDiskValueIsDataLossAndNeverReturned) {
  Make({});
  Register();
  const auto tokens = Tokens(7, 4 * 16);
  const std::string bytes = Bytes(7, 4 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  const auto seg = Tokens(8, 40);
  const std::string seg_bytes = Bytes(8, 3 * bb_);
  ASSERT_TRUE(Put(seg, seg_bytes, false, "demo", true).ok());
  const std::vector<BlockInfo> blocks = cache_->Lookup("demo", "", tokens)->blocks;
  const BlockHash seg_block = cache_->LookupSegment("demo", "", seg)->blocks[1].hash;
  cache_.reset();
  std::mt19937_64 rng(9);
  RewriteValue(blocks[2].hash, [&](std::string* v) {
    for (char& ch : *v) ch = static_cast<char>(rng());
  });
  RewriteValue(seg_block, [](std::string* v) { (*v)[v->size() / 2] ^= 1; });
  Make(config_);

  EXPECT_EQ(Matched(tokens), 64u);  // Lookup reads no bytes
  auto h = cache_->AcquirePrefix("demo", "", tokens, 0);
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(h->blocks().size(), 2u);  // stops before the corrupt block
  EXPECT_EQ(std::string(h->bytes(0)) + std::string(h->bytes(1)), bytes.substr(0, 2 * bb_));
  h = absl::InternalError("released");
  EXPECT_EQ(Matched(tokens), 32u);  // the corrupt block and what hangs off it are gone
  const TierCounters disk = TierOf(cache_->Stats(), TierKind::kDisk);
  EXPECT_EQ(disk.corrupt_blocks, 1u);

  EXPECT_EQ(cache_->AcquireSegment("demo", "", seg).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(cache_->AcquireSegment("demo", "", seg).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(cache_->LookupSegment("demo", "", seg)->matched_tokens, 0u);

  // Gone for good: after another restart the disk holds the good blocks only.
  Restart();
  EXPECT_EQ(Matched(tokens), 32u);
  EXPECT_EQ(Read(tokens), bytes.substr(0, 2 * bb_));
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kDisk).blocks, 3u);  // + the segment's first
}

TEST_F(TierTest, OrphansAreDroppedAtRestart) {
  Make({});
  Register();
  const auto tokens = Tokens(10, 3 * 16);
  ASSERT_TRUE(Put(tokens, Bytes(10, 3 * bb_)).ok());
  const BlockHash first = cache_->Lookup("demo", "", tokens)->blocks[0].hash;
  cache_.reset();
  RewriteValue(first, nullptr);  // the chain's first block vanishes
  Make(config_);
  EXPECT_EQ(Matched(tokens), 0u);
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kDisk).blocks, 0u);
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kDisk).bytes_used, 0u);
  // What the daemon reports at start: the two blocks left were dropped, none found.
  EXPECT_EQ(cache_->disk_load().blocks, 0u);
  EXPECT_EQ(cache_->disk_load().dropped, 2u);
  EXPECT_EQ(cache_->disk_load().migrated_blocks, 0u);
}

TEST_F(TierTest, WatermarksFreeDownToTheLowMark) {
  Config c;
  c.host_blocks = 20;
  c.policy.high_watermark = 0.5;
  c.policy.low_watermark = 0.25;
  Make(c);
  Register();
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 9; ++i) {
    prompts.push_back(Tokens(300 + i, 16));
    ASSERT_TRUE(Put(prompts.back(), Bytes(300 + i, bb_)).ok());
  }
  cache_->RunMaintenance();
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).bytes_used, 9 * bb_);  // under 10
  for (int i = 9; i < 12; ++i) {
    prompts.push_back(Tokens(300 + i, 16));
    ASSERT_TRUE(Put(prompts.back(), Bytes(300 + i, bb_)).ok());
  }
  cache_->RunMaintenance();
  const CacheStats s = cache_->Stats();
  EXPECT_EQ(TierOf(s, TierKind::kHost).bytes_used, 5 * bb_);  // the low mark
  EXPECT_EQ(TierOf(s, TierKind::kHost).evictions, 7u);
  // The newest stayed on host, the oldest moved down and still read right.
  EXPECT_EQ(cache_->Lookup("demo", "", prompts[11])->blocks[0].tier, TierKind::kHost);
  EXPECT_EQ(cache_->Lookup("demo", "", prompts[0])->blocks[0].tier, TierKind::kDisk);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(Read(prompts[i]), Bytes(300 + i, bb_)) << i;
}

TEST_F(TierTest, BackgroundMaintenanceRuns) {
  DiskTier::Options d;
  d.path = dir_;
  auto disk = DiskTier::Open(d);
  ASSERT_TRUE(disk.ok());
  KvCache::Options o;
  o.host_capacity_bytes = 20 * bb_;
  o.disk = *std::move(disk);
  o.policy.high_watermark = 0.5;
  o.policy.low_watermark = 0.25;
  o.maintenance_interval_ms = 10;
  cache_ = *KvCache::Create(std::move(o));
  Register();
  // 11 blocks pass the high mark (10); the background pass brings the host down to 5.
  for (int i = 0; i < 11; ++i) ASSERT_TRUE(Put(Tokens(400 + i, 16), Bytes(400 + i, bb_)).ok());
  for (int i = 0; i < 500 && TierOf(cache_->Stats(), TierKind::kHost).bytes_used > 5 * bb_; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).bytes_used, 5 * bb_);
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).evictions, 6u);
}

TEST_F(TierTest, PerModelLimitsHold) {
  Config c;
  c.host_blocks = 100;
  c.policy.model_limits = {{"demo", 3 * bb_, 5 * bb_}};
  Make(c);
  Register();
  ModelSpec other = DemoModelSpec();
  other.layers = 2;
  ASSERT_TRUE(cache_->RegisterModel(other, "free").ok());
  const uint64_t ob = BlockBytes(other);
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(Put(Tokens(500 + i, 16), Bytes(500 + i, bb_)).ok()) << i;
    ASSERT_TRUE(Put(Tokens(600 + i, 16), Bytes(600 + i, ob), false, "free").ok()) << i;
    const CacheStats s = cache_->Stats();
    // demo holds at most 3 host blocks; "free" keeps all of its own.
    ASSERT_LE(TierOf(s, TierKind::kHost).bytes_used, 3 * bb_ + (i + 1) * ob);
    ASSERT_LE(TierOf(s, TierKind::kDisk).bytes_used, 5 * bb_ + (i + 1) * ob);
  }
  EXPECT_EQ(cache_->BlockCount(ModelIdOf(other)), 10u);
  EXPECT_EQ(cache_->BlockCount(ModelIdOf(DemoModelSpec())), 5u);
  for (int i = 5; i < 10; ++i) EXPECT_EQ(Read(Tokens(500 + i, 16)), Bytes(500 + i, bb_));
  for (int i = 0; i < 10; ++i) EXPECT_EQ(Read(Tokens(600 + i, 16), "free"), Bytes(600 + i, ob));
  // A model limit smaller than one block refuses the Put.
  Config tiny;
  tiny.policy.model_limits = {{"demo", bb_ / 2, 0}};
  cache_.reset();
  std::filesystem::remove_all(dir_);
  Make(tiny);
  Register();
  EXPECT_EQ(Put(Tokens(1, 16), Bytes(1, bb_)).status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_F(TierTest, WriteTierDiskKeepsNothingOnHost) {
  Config c;
  c.policy.write_tier = WriteTier::kDisk;
  Make(c);
  Register();
  const auto tokens = Tokens(11, 3 * 16);
  const std::string bytes = Bytes(11, 3 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).bytes_used, 0u);
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kDisk).blocks, 3u);
  EXPECT_EQ(cache_->Lookup("demo", "", tokens)->blocks[0].tier, TierKind::kDisk);
  EXPECT_EQ(Read(tokens), bytes);
}

TEST_F(TierTest, PromoteOnReadOffReadsWithoutKeeping) {
  Config c;
  c.policy.promote_on_read = false;
  Make(c);
  Register();
  const auto tokens = Tokens(12, 2 * 16);
  const std::string bytes = Bytes(12, 2 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  Restart();
  {
    auto h = cache_->AcquirePrefix("demo", "", tokens, 0);
    ASSERT_TRUE(h.ok());
    ASSERT_EQ(h->blocks().size(), 2u);
    EXPECT_EQ(std::string(h->bytes(0)) + std::string(h->bytes(1)), bytes);
    EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).bytes_used, 2 * bb_);  // held
  }
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).bytes_used, 0u);  // freed with the read
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kHost).promotions, 0u);
  EXPECT_EQ(live_.load(), 0);
}

TEST_F(TierTest, EvictRemovesFromDiskToo) {
  Make({});
  Register();
  const auto tokens = Tokens(13, 2 * 16);
  ASSERT_TRUE(Put(tokens, Bytes(13, 2 * bb_)).ok());
  EXPECT_EQ(*cache_->Evict("demo", "", tokens), 2u);
  EXPECT_EQ(TierOf(cache_->Stats(), TierKind::kDisk).blocks, 0u);
  Restart();
  EXPECT_EQ(Matched(tokens), 0u);
}

TEST_F(TierTest, PinnedBlocksStayUnderPressure) {
  Config c;
  c.host_blocks = 4;
  c.disk_blocks = 6;
  Make(c);
  Register();
  const auto pinned = Tokens(14, 2 * 16);
  const std::string pinned_bytes = Bytes(14, 2 * bb_);
  ASSERT_TRUE(Put(pinned, pinned_bytes, /*pin=*/true).ok());
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(Put(Tokens(700 + i, 16), Bytes(700 + i, bb_)).ok()) << i;
  }
  auto l = cache_->Lookup("demo", "", pinned);
  ASSERT_EQ(l->matched_tokens, 32u);
  EXPECT_EQ(l->blocks[0].tier, TierKind::kHost);  // never demoted either
  EXPECT_EQ(Read(pinned), pinned_bytes);
  // Host full of pins: a Put that needs room it cannot make is refused, nothing is lost.
  Config full;
  full.host_blocks = 2;
  cache_.reset();
  std::filesystem::remove_all(dir_);
  Make(full);
  Register();
  ASSERT_TRUE(Put(pinned, pinned_bytes, true).ok());
  EXPECT_EQ(Put(Tokens(15, 16), Bytes(15, bb_)).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(Read(pinned), pinned_bytes);
}

TEST_F(TierTest, ReadsRacingEvictionGetTheRightBytesOrAMiss) {
  Config c;
  c.host_blocks = 6;
  c.disk_blocks = 24;
  Make(c);
  Register();
  constexpr int kPrompts = 24;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> bytes;
  for (int i = 0; i < kPrompts; ++i) {
    prompts.push_back(Tokens(800 + i, 2 * 16));
    bytes.push_back(Bytes(800 + i, 2 * bb_));
  }
  std::atomic<int> wrong{0};
  std::atomic<int> hits{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int w = 0; w < 2; ++w) {
    threads.emplace_back([&, w] {
      for (int round = 0; round < 3; ++round) {
        for (int i = w; i < kPrompts; i += 2) {
          auto r = Put(prompts[i], bytes[i]);
          if (!r.ok() && !absl::IsResourceExhausted(r.status()) &&
              !absl::IsUnavailable(r.status()) && !absl::IsNotFound(r.status())) {
            ADD_FAILURE() << r.status();
          }
        }
      }
    });
  }
  for (int rd = 0; rd < 3; ++rd) {
    threads.emplace_back([&, rd] {
      std::mt19937_64 rng(rd);
      while (!stop) {
        const int i = static_cast<int>(rng() % kPrompts);
        auto h = cache_->AcquirePrefix("demo", "", prompts[i], 0);
        if (!h.ok()) continue;
        for (size_t b = 0; b < h->blocks().size(); ++b) {
          if (h->bytes(b) != absl::string_view(bytes[i]).substr(b * bb_, bb_)) ++wrong;
        }
        hits += h->blocks().empty() ? 0 : 1;
      }
    });
  }
  threads[0].join();
  threads[1].join();
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // reads after the writes, too
  stop = true;
  for (size_t t = 2; t < threads.size(); ++t) threads[t].join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_GT(hits.load(), 0);
  EXPECT_LE(peak_.load(), static_cast<int64_t>(6 * bb_));
  const CacheStats s = cache_->Stats();
  EXPECT_LE(TierOf(s, TierKind::kDisk).bytes_used, 24 * bb_);
}

}  // namespace
}  // namespace ropekv
