// The GPU tier on a real device: moves through slots keep every byte, slots are independent,
// batches complete, bad moves are refused; pinned memory from the pinned allocator; and the
// cache over a GPU tier (write tier gpu, reads served from GPU copies, GPU capacity, promotion).
// Each test skips itself without a GPU.
#include "cache/gpu_tier.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <set>

#include "cache/kv_cache.h"
#include "cache/pinned_allocator.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!GpuAvailable()) GTEST_SKIP() << "no GPU"

// Pinned buffers for a test, freed at the end.
class PinnedBuffers {
 public:
  explicit PinnedBuffers(uint64_t limit) : alloc_(*NewPinnedAllocator(limit)) {}
  ~PinnedBuffers() {
    for (auto& [p, n] : held_) alloc_->Free(p, n);
  }
  char* Get(size_t n) {
    void* p = alloc_->Allocate(n);
    if (p != nullptr) held_.push_back({p, n});
    return static_cast<char*>(p);
  }

 private:
  std::unique_ptr<Allocator> alloc_;
  std::vector<std::pair<void*, size_t>> held_;
};

void FillRandom(std::mt19937_64& rng, char* p, size_t n) {
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(p + i, &v, std::min<size_t>(8, n - i));
  }
}

constexpr uint64_t kSlot = 1 << 20;

// A tier of `chunks` chunks of kSlot bytes (one slot of kSlot each).
std::unique_ptr<GpuTier> MakeTier(uint32_t chunks) {
  GpuTier::Options o;
  o.capacity_bytes = kSlot * chunks;
  o.chunk_bytes = kSlot;
  auto t = GpuTier::Create(o);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

// Slots of 16 sizes, each in a chunk of its own: every byte of each comes back.
TEST(GpuTierTest, RoundTripKeepsEveryByteOfEverySlot) {
  SKIP_WITHOUT_GPU();
  constexpr uint32_t kSlots = 16;
  auto tier = MakeTier(kSlots);
  ASSERT_NE(tier, nullptr);
  EXPECT_EQ(tier->capacity_bytes(), kSlots * kSlot);
  uint64_t used = 0;
  PinnedBuffers buffers(64 << 20);
  std::mt19937_64 rng(7);
  std::vector<GpuSlot> slots;
  std::vector<char*> in, out;
  std::vector<GpuMove> up, down;
  for (uint32_t i = 0; i < kSlots; ++i) {
    // Sizes vary, and the last one fills its chunk exactly.
    const uint64_t n = i + 1 == kSlots ? kSlot : kSlot - 4096 * i - 8 * i;
    slots.push_back(*tier->AllocateSlot(n));
    EXPECT_EQ(tier->SlotBytes(slots.back()), SlotAllocator::SlotSize(n));
    used += SlotAllocator::SlotSize(n);
    in.push_back(buffers.Get(n));
    out.push_back(buffers.Get(n));
    ASSERT_NE(in.back(), nullptr);
    ASSERT_NE(out.back(), nullptr);
    FillRandom(rng, in.back(), n);
    std::memset(out.back(), 0xff, n);  // poison: an unwritten byte fails
    up.push_back({slots.back(), in.back(), n});
    down.push_back({slots.back(), out.back(), n});
  }
  EXPECT_EQ(tier->used_bytes(), used);
  EXPECT_EQ(tier->AllocateSlot(256).status().code(), absl::StatusCode::kResourceExhausted);
  auto t_up = tier->CopyIn(up);
  ASSERT_TRUE(t_up.ok()) << t_up.status();
  ASSERT_TRUE(tier->Wait(*t_up).ok());
  // The download stream is not ordered after the upload stream: the wait above orders them.
  auto t_down = tier->CopyOut(down);
  ASSERT_TRUE(t_down.ok()) << t_down.status();
  ASSERT_TRUE(tier->Wait(*t_down).ok());
  for (uint32_t i = 0; i < kSlots; ++i) {
    EXPECT_EQ(std::memcmp(in[i], out[i], up[i].bytes), 0) << "slot " << slots[i];
  }
  const GpuCounters c = tier->Counters();
  EXPECT_EQ(c.batches, 2u);
  uint64_t total = 0;
  for (const GpuMove& m : up) total += m.bytes;
  EXPECT_EQ(c.bytes_in, total);
  EXPECT_EQ(c.bytes_out, total);
  // A waited ticket is gone.
  EXPECT_EQ(tier->Wait(*t_up).code(), absl::StatusCode::kNotFound);
}

TEST(GpuTierTest, SlotsAreIndependentAndReuseKeepsNewBytes) {
  SKIP_WITHOUT_GPU();
  auto tier = MakeTier(4);
  ASSERT_NE(tier, nullptr);
  PinnedBuffers buffers(16 << 20);
  std::mt19937_64 rng(8);
  char* a = buffers.Get(kSlot);
  char* b = buffers.Get(kSlot);
  char* out = buffers.Get(kSlot);
  FillRandom(rng, a, kSlot);
  FillRandom(rng, b, kSlot);
  const GpuSlot sa = *tier->AllocateSlot(kSlot);
  const GpuSlot sb = *tier->AllocateSlot(kSlot);
  ASSERT_NE(sa, sb);
  EXPECT_NE(tier->SlotPointer(sa), tier->SlotPointer(sb));
  ASSERT_TRUE(tier->Wait(*tier->CopyIn({{sa, a, kSlot}, {sb, b, kSlot}})).ok());
  std::memset(out, 0xff, kSlot);
  ASSERT_TRUE(tier->Wait(*tier->CopyOut({{sa, out, kSlot}})).ok());
  EXPECT_EQ(std::memcmp(out, a, kSlot), 0);
  // Free a, reuse its slot for new bytes: b is untouched, the slot holds the new bytes.
  ASSERT_TRUE(tier->FreeSlot(sa).ok());
  const GpuSlot sc = *tier->AllocateSlot(kSlot);
  FillRandom(rng, a, kSlot);
  ASSERT_TRUE(tier->Wait(*tier->CopyIn({{sc, a, kSlot}})).ok());
  std::memset(out, 0xff, kSlot);
  ASSERT_TRUE(tier->Wait(*tier->CopyOut({{sb, out, kSlot}})).ok());
  EXPECT_EQ(std::memcmp(out, b, kSlot), 0);
  std::memset(out, 0xff, kSlot);
  ASSERT_TRUE(tier->Wait(*tier->CopyOut({{sc, out, kSlot}})).ok());
  EXPECT_EQ(std::memcmp(out, a, kSlot), 0);
}

TEST(GpuTierTest, FullTierAndBadMovesAreRefused) {
  SKIP_WITHOUT_GPU();
  auto tier = MakeTier(2);
  ASSERT_NE(tier, nullptr);
  PinnedBuffers buffers(8 << 20);
  char* host = buffers.Get(2 * kSlot);
  ASSERT_TRUE(tier->AllocateSlot(kSlot).ok());
  ASSERT_TRUE(tier->AllocateSlot(kSlot).ok());
  EXPECT_EQ(tier->AllocateSlot(kSlot).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(tier->AllocateSlot(kSlot + 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tier->CopyIn({{2 * kSlot, host, 16}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tier->CopyIn({{2, host, 16}}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tier->CopyIn({{0, host, kSlot + 1}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tier->CopyOut({{0, nullptr, 16}}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tier->SlotPointer(2), nullptr);
  EXPECT_EQ(tier->Wait(12345).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tier->Counters().batches, 0u);
}

TEST(GpuTierTest, PollReportsCompletion) {
  SKIP_WITHOUT_GPU();
  auto tier = MakeTier(8);
  ASSERT_NE(tier, nullptr);
  PinnedBuffers buffers(16 << 20);
  std::vector<GpuMove> moves;
  for (uint32_t i = 0; i < 8; ++i) {
    char* p = buffers.Get(kSlot);
    std::memset(p, static_cast<int>(i), kSlot);
    moves.push_back({*tier->AllocateSlot(kSlot), p, kSlot});
  }
  auto t = tier->CopyIn(moves);
  ASSERT_TRUE(t.ok());
  bool done = false;
  for (int i = 0; i < 100000 && !done; ++i) {
    auto p = tier->Poll(*t);
    ASSERT_TRUE(p.ok()) << p.status();
    done = *p;
  }
  ASSERT_TRUE(tier->Wait(*t).ok());
  // Device bytes checked directly against the pattern.
  std::vector<char> out(kSlot);
  for (uint32_t i = 0; i < 8; ++i) {
    ASSERT_EQ(
        cudaMemcpy(out.data(), tier->SlotPointer(moves[i].slot), kSlot, cudaMemcpyDeviceToHost),
        cudaSuccess);
    EXPECT_EQ(out[0], static_cast<char>(i));
    EXPECT_EQ(out[kSlot - 1], static_cast<char>(i));
  }
}

TEST(PinnedAllocatorTest, MemoryIsPinnedReusedAndWithinTheLimit) {
  SKIP_WITHOUT_GPU();
  auto alloc = NewPinnedAllocator(3 * kSlot);
  ASSERT_TRUE(alloc.ok()) << alloc.status();
  void* a = (*alloc)->Allocate(kSlot);
  void* b = (*alloc)->Allocate(kSlot);
  void* c = (*alloc)->Allocate(kSlot);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ((*alloc)->Allocate(1), nullptr);  // the limit holds
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, a), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);
  (*alloc)->Free(b, kSlot);
  EXPECT_EQ((*alloc)->Allocate(kSlot), b);  // a kept buffer comes back
  (*alloc)->Free(c, kSlot);
  // A different size: the kept buffer is released to make room.
  void* d = (*alloc)->Allocate(kSlot / 2);
  ASSERT_NE(d, nullptr);
  (*alloc)->Free(a, kSlot);
  (*alloc)->Free(b, kSlot);
  (*alloc)->Free(d, kSlot / 2);
}

// ---------------------------------------------------------------------------------------------
// KvCache over a GPU tier.

class KvCacheGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no GPU";
    bb_ = BlockBytes(DemoModelSpec());
    dir_ = "/tmp/ropekv-gpu-cache-" + std::to_string(getpid());
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override {
    cache_.reset();
    std::filesystem::remove_all(dir_);
  }

  // A GPU tier of gpu_slots demo blocks, in chunks of chunk_blocks of them.
  void Make(uint32_t gpu_slots, uint64_t host_blocks, TierPolicy policy, bool disk,
            uint32_t chunk_blocks = 1) {
    GpuTier::Options g;
    g.chunk_bytes = chunk_blocks * bb_;
    g.capacity_bytes = gpu_slots * bb_;
    auto gpu = GpuTier::Create(g);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = gpu->get();
    KvCache::Options o;
    o.host_capacity_bytes = host_blocks * bb_;
    o.host_allocator = *NewPinnedAllocator(o.host_capacity_bytes);
    o.gpu = *std::move(gpu);
    if (disk) {
      DiskTier::Options d;
      d.path = dir_;
      d.durability = Durability::kMemory;
      o.disk = *DiskTier::Open(d);
    }
    o.policy = policy;
    o.background_maintenance = false;
    auto c = KvCache::Create(std::move(o));
    ASSERT_TRUE(c.ok()) << c.status();
    cache_ = *std::move(c);
    ASSERT_TRUE(cache_->RegisterModel(DemoModelSpec(), "demo").ok());
  }

  static std::vector<int32_t> Tokens(uint64_t seed, size_t n) {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng() % 32000);
    return t;
  }
  std::string Bytes(uint64_t seed, size_t n) {
    std::mt19937_64 rng(seed * 31 + 5);
    std::string b(n, '\0');
    FillRandom(rng, b.data(), n);
    return b;
  }
  void Put(uint64_t seed, int blocks, const std::string& model = "demo", uint64_t bb = 0) {
    PutOptions o;
    o.model = model;
    o.tokens = Tokens(seed, blocks * 16);
    auto w = cache_->BeginPut(o);
    ASSERT_TRUE(w.ok());
    ASSERT_TRUE((*w)->Write(Bytes(seed, blocks * (bb == 0 ? bb_ : bb))).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  // The blocks of prompt `seed` with GPU copies whose device bytes are the bytes put.
  int OnGpuAndExact(uint64_t seed, int blocks, const std::string& model, uint64_t bb) {
    auto h = cache_->AcquirePrefix(model, "", Tokens(seed, blocks * 16), 0);
    EXPECT_TRUE(h.ok());
    const std::string want = Bytes(seed, blocks * bb);
    std::string buf(bb, '\0');
    int n = 0;
    for (size_t i = 0; h.ok() && i < h->blocks().size(); ++i) {
      if (h->device_bytes(i) == nullptr) continue;
      EXPECT_EQ(cudaMemcpy(buf.data(), h->device_bytes(i), bb, cudaMemcpyDeviceToHost),
                cudaSuccess);
      EXPECT_EQ(buf, want.substr(i * bb, bb)) << model << " block " << i;
      ++n;
    }
    return n;
  }
  std::string Read(uint64_t seed, int blocks) {
    auto h = cache_->AcquirePrefix("demo", "", Tokens(seed, blocks * 16), 0);
    EXPECT_TRUE(h.ok());
    std::string out;
    for (size_t i = 0; h.ok() && i < h->blocks().size(); ++i) out += std::string(h->bytes(i));
    return out;
  }
  // Every block's bytes held in GPU slots, read back from the device.
  std::set<std::string> DeviceBlocks() {
    std::set<std::string> out;
    std::string buf(bb_, '\0');
    for (GpuSlot s = 0; s < gpu_->capacity_bytes(); s += bb_) {
      if (gpu_->SlotPointer(s) == nullptr) continue;  // a free chunk
      EXPECT_EQ(cudaMemcpy(buf.data(), gpu_->SlotPointer(s), bb_, cudaMemcpyDeviceToHost),
                cudaSuccess);
      out.insert(buf);
    }
    return out;
  }
  TierCounters Tier(TierKind kind) {
    for (const TierCounters& t : cache_->Stats().tiers) {
      if (t.tier == kind) return t;
    }
    ADD_FAILURE() << "no tier";
    return {};
  }

  uint64_t bb_ = 0;
  std::string dir_;
  GpuTier* gpu_ = nullptr;  // owned by cache_
  std::unique_ptr<KvCache> cache_;
};

TEST_F(KvCacheGpuTest, WriteTierGpuPutsBlocksOnTheGpu) {
  TierPolicy p;
  p.write_tier = WriteTier::kGpu;
  Make(8, 64, p, /*disk=*/false);
  Put(1, 4);
  const TierCounters gpu = Tier(TierKind::kGpu);
  EXPECT_EQ(gpu.blocks, 4u);
  EXPECT_EQ(gpu.bytes_used, 4 * bb_);
  EXPECT_EQ(gpu.bytes_moved, 4 * bb_);
  auto l = cache_->Lookup("demo", "", Tokens(1, 64));
  ASSERT_EQ(l->blocks.size(), 4u);
  for (const BlockInfo& b : l->blocks) EXPECT_EQ(b.tier, TierKind::kGpu);
  const std::set<std::string> device = DeviceBlocks();
  const std::string bytes = Bytes(1, 4 * bb_);
  for (int b = 0; b < 4; ++b) EXPECT_TRUE(device.count(bytes.substr(b * bb_, bb_))) << b;
}

TEST_F(KvCacheGpuTest, ReadsOfGpuCopiesComeBackExact) {
  TierPolicy p;
  p.write_tier = WriteTier::kGpu;
  p.high_watermark = 0.5;
  p.low_watermark = 0.05;  // below one block: every host copy goes
  Make(16, 10, p, /*disk=*/true);
  Put(2, 8);                 // 8 of 10 host blocks: over the high mark
  cache_->RunMaintenance();  // host copies dropped: blocks live on the GPU and on disk
  EXPECT_EQ(Tier(TierKind::kHost).bytes_used, 0u);
  EXPECT_EQ(Tier(TierKind::kGpu).blocks, 8u);
  const uint64_t disk_moved = Tier(TierKind::kDisk).bytes_moved;
  const uint64_t gpu_moved = Tier(TierKind::kGpu).bytes_moved;
  EXPECT_EQ(Read(2, 8), Bytes(2, 8 * bb_));
  EXPECT_EQ(Tier(TierKind::kGpu).bytes_moved, gpu_moved + 8 * bb_);  // from the GPU ...
  EXPECT_EQ(Tier(TierKind::kDisk).bytes_moved, disk_moved);          // ... not from disk
  EXPECT_EQ(Tier(TierKind::kGpu).hits, 8u);
}

TEST_F(KvCacheGpuTest, GpuCapacityHoldsAndEveryReadIsRight) {
  TierPolicy p;
  p.write_tier = WriteTier::kGpu;
  Make(4, 64, p, /*disk=*/false);
  for (uint64_t seed = 10; seed < 14; ++seed) {
    Put(seed, 2);  // 8 blocks through 4 GPU slots
    EXPECT_LE(Tier(TierKind::kGpu).bytes_used, 4 * bb_);
  }
  EXPECT_EQ(Tier(TierKind::kGpu).blocks, 4u);
  EXPECT_GE(Tier(TierKind::kGpu).evictions, 4u);
  for (uint64_t seed = 10; seed < 14; ++seed) EXPECT_EQ(Read(seed, 2), Bytes(seed, 2 * bb_));
}

// Models of two block sizes share the tier by chunks: a block three times the demo's goes on the
// GPU beside demo blocks (slots of one fixed size would have refused it). With the tier full, the
// least recently used GPU block makes room: one of the same size gives its slot, one of another
// size its whole chunk.
TEST_F(KvCacheGpuTest, TwoBlockSizesShareTheTierByChunks) {
  TierPolicy p;
  p.write_tier = WriteTier::kGpu;
  Make(12, 64, p, /*disk=*/false, /*chunk_blocks=*/4);  // 3 chunks of 4 demo blocks
  ModelSpec wide = DemoModelSpec();
  wide.layers *= 3;
  ASSERT_TRUE(cache_->RegisterModel(wide, "wide").ok());
  const uint64_t wide_bb = 3 * bb_;
  auto gpu = [&](uint64_t seed, int blocks, const std::string& model = "demo") {
    return OnGpuAndExact(seed, blocks, model, model == "demo" ? bb_ : wide_bb);
  };
  Put(20, 6);  // chunks 0 (blocks 0-3) and 1 (4-5)
  EXPECT_EQ(Tier(TierKind::kGpu).blocks, 6u);
  EXPECT_EQ(Tier(TierKind::kGpu).reserved_bytes, 8 * bb_);  // two chunks, one with room
  Put(21, 1, "wide", wide_bb);                              // chunk 2
  EXPECT_EQ(Tier(TierKind::kGpu).blocks, 7u);
  EXPECT_EQ(Tier(TierKind::kGpu).evictions, 0u);
  // Full. The least recently used GPU block is prompt 20's last (a prompt is touched from its
  // end): its chunk, 1, is emptied (blocks 4 and 5) for the second wide block.
  Put(22, 1, "wide", wide_bb);
  EXPECT_EQ(Tier(TierKind::kGpu).blocks, 6u);
  EXPECT_EQ(Tier(TierKind::kGpu).evictions, 2u);
  EXPECT_EQ(Tier(TierKind::kGpu).bytes_used, 4 * bb_ + 2 * wide_bb);
  EXPECT_EQ(Tier(TierKind::kGpu).reserved_bytes, 12 * bb_);  // all three chunks
  EXPECT_EQ(gpu(20, 6), 4);
  EXPECT_EQ(gpu(21, 1, "wide"), 1);
  EXPECT_EQ(gpu(22, 1, "wide"), 1);
  EXPECT_EQ(Read(20, 6), Bytes(20, 6 * bb_));  // every block reads back right (4 and 5 from host)
  // Prompt 20 was just read: wide 21 is the least recently used, and its chunk serves demo blocks.
  Put(23, 1);
  EXPECT_EQ(Tier(TierKind::kGpu).evictions, 3u);
  EXPECT_EQ(gpu(23, 1), 1);
  EXPECT_EQ(gpu(21, 1, "wide"), 0);
  EXPECT_EQ(gpu(22, 1, "wide"), 1);
  Put(24, 3);  // the rest of that chunk: no eviction
  EXPECT_EQ(Tier(TierKind::kGpu).evictions, 3u);
  EXPECT_EQ(gpu(24, 3), 3);
  // Wide 22 read last: the least recently used GPU block is a demo block of prompt 20, which
  // gives its slot to the next demo block (one eviction, no chunk emptied).
  EXPECT_EQ(gpu(22, 1, "wide"), 1);
  Put(25, 1);
  EXPECT_EQ(Tier(TierKind::kGpu).evictions, 4u);
  EXPECT_EQ(gpu(25, 1), 1);
  EXPECT_EQ(gpu(20, 6), 3);
  EXPECT_EQ(gpu(22, 1, "wide"), 1);
  EXPECT_EQ(Read(20, 6), Bytes(20, 6 * bb_));
}

TEST_F(KvCacheGpuTest, GpuPromotionOnRead) {
  TierPolicy p;
  p.gpu_promote_on_read = true;
  Make(8, 64, p, /*disk=*/false);
  Put(3, 3);
  EXPECT_EQ(Tier(TierKind::kGpu).blocks, 0u);  // write tier host
  EXPECT_EQ(Read(3, 3), Bytes(3, 3 * bb_));
  EXPECT_EQ(Tier(TierKind::kGpu).blocks, 3u);
  EXPECT_EQ(Tier(TierKind::kGpu).promotions, 3u);
  const std::set<std::string> device = DeviceBlocks();
  const std::string bytes = Bytes(3, 3 * bb_);
  for (int b = 0; b < 3; ++b) EXPECT_TRUE(device.count(bytes.substr(b * bb_, bb_))) << b;
}

}  // namespace
}  // namespace ropekv
