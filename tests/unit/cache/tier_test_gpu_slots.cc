// GPU tier pieces that run on any machine: the slot allocator (chunks of block sizes), option
// checks, and the tier's absence without a GPU. The device half is tests/gpu/gpu_tier_test.cc.
#include <set>
#include <thread>

#include "cache/gpu_tier.h"
#include "cache/pinned_allocator.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

// Slots of one size fill chunk after chunk, each offset once, none overlapping; a freed slot is
// handed out again.
TEST(SlotAllocatorTest, HandsOutEverySlotOnceThenIsFull) {
  SlotAllocator a(/*chunks=*/2, /*chunk_bytes=*/4096);
  std::set<GpuSlot> got;
  for (int i = 0; i < 6; ++i) {  // 1000 bytes -> slots of 1024, 4 a chunk
    auto s = a.Allocate(1000);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(*s % 1024, 0u);
    EXPECT_EQ(a.SlotBytes(*s), 1024u);
    EXPECT_TRUE(got.insert(*s).second) << "slot " << *s << " handed out twice";
  }
  EXPECT_EQ(got, (std::set<GpuSlot>{0, 1024, 2048, 3072, 4096, 5120}));
  EXPECT_EQ(a.slots_used(), 6u);
  EXPECT_EQ(a.used_bytes(), 6u * 1024);
  EXPECT_EQ(a.chunks_used(), 2u);
  ASSERT_TRUE(a.Allocate(1024).ok());
  ASSERT_TRUE(a.Allocate(777).ok());  // the same size
  EXPECT_EQ(a.Allocate(1024).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(a.Free(2048).ok());
  EXPECT_EQ(a.SlotBytes(2048), 0u);
  auto again = a.Allocate(1024);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 2048u);
}

// Blocks of different sizes take chunks of their own; a chunk whose slots are all free serves
// any size again.
TEST(SlotAllocatorTest, SizesShareTheArenaByChunks) {
  SlotAllocator a(/*chunks=*/3, /*chunk_bytes=*/10240);
  auto big = a.Allocate(5000);   // slots of 5120, 2 a chunk
  auto small = a.Allocate(256);  // slots of 256, 40 a chunk
  auto big2 = a.Allocate(5120);
  ASSERT_TRUE(big.ok() && small.ok() && big2.ok());
  EXPECT_EQ(*big, 0u);
  EXPECT_EQ(*small, 10240u);
  EXPECT_EQ(*big2, 5120u);
  EXPECT_EQ(a.SlotBytes(*big), 5120u);
  EXPECT_EQ(a.SlotBytes(*small), 256u);
  auto odd = a.Allocate(3000);  // a third size: the last chunk
  ASSERT_TRUE(odd.ok());
  EXPECT_EQ(*odd, 20480u);
  EXPECT_EQ(a.Allocate(4000).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(a.Allocate(5000).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(a.Allocate(200).ok());  // room beside `small`
  // The big chunk empties: it serves the fourth size now.
  ASSERT_TRUE(a.Free(*big).ok());
  EXPECT_EQ(a.Allocate(4000).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(a.Free(*big2).ok());
  EXPECT_EQ(a.chunks_used(), 2u);
  auto four = a.Allocate(4000);
  ASSERT_TRUE(four.ok());
  EXPECT_EQ(*four, 0u);
  EXPECT_EQ(a.SlotBytes(0), 4096u);
  EXPECT_EQ(a.used_bytes(), 4096u + 256 + 256 + 3072);
  // A block must fit a chunk.
  EXPECT_EQ(a.Allocate(10241).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.Allocate(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(a.Allocate(10240).status().code() == absl::StatusCode::kResourceExhausted);
}

TEST(SlotAllocatorTest, BadFreesAreErrorsAndChangeNothing) {
  SlotAllocator a(/*chunks=*/2, /*chunk_bytes=*/3072);
  auto s = a.Allocate(1024);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, 0u);
  EXPECT_EQ(a.Free(6144).code(), absl::StatusCode::kInvalidArgument);  // past the arena
  EXPECT_EQ(a.Free(3072).code(), absl::StatusCode::kInvalidArgument);  // a free chunk
  EXPECT_EQ(a.Free(512).code(), absl::StatusCode::kInvalidArgument);   // inside a slot
  EXPECT_EQ(a.Free(1024).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(a.Free(*s).ok());
  EXPECT_EQ(a.Free(*s).code(), absl::StatusCode::kInvalidArgument);  // its chunk is free now
  EXPECT_EQ(a.slots_used(), 0u);
  EXPECT_EQ(a.used_bytes(), 0u);
  // Still exactly six distinct slots.
  std::set<GpuSlot> got;
  for (int i = 0; i < 6; ++i) got.insert(*a.Allocate(1024));
  EXPECT_EQ(got.size(), 6u);
  EXPECT_FALSE(a.Allocate(1024).ok());
}

TEST(SlotAllocatorTest, ConcurrentUseNeverSharesASlot) {
  SlotAllocator a(/*chunks=*/16, /*chunk_bytes=*/4 * 2048);
  std::vector<std::vector<GpuSlot>> held(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      const uint64_t bytes = t % 2 == 0 ? 2048 : 1024;  // two sizes racing for chunks
      for (int round = 0; round < 200; ++round) {
        for (int i = 0; i < 8; ++i) {
          auto s = a.Allocate(bytes);
          if (s.ok()) held[t].push_back(*s);
        }
        for (GpuSlot s : held[t]) ASSERT_TRUE(a.Free(s).ok());
        held[t].clear();
      }
      for (int i = 0; i < 4; ++i) held[t].push_back(*a.Allocate(2048));
    });
  }
  for (auto& th : threads) th.join();
  std::set<GpuSlot> all;
  for (auto& h : held) all.insert(h.begin(), h.end());
  EXPECT_EQ(all.size(), 32u);
  EXPECT_EQ(a.slots_used(), 32u);
  EXPECT_EQ(a.used_bytes(), 32u * 2048);
  EXPECT_GE(a.chunks_used(), 8u);  // 4 a chunk, where the threads' last frees left holes
  for (GpuSlot s : all) EXPECT_EQ(a.SlotBytes(s), 2048u);
}

TEST(GpuTierOptionsTest, BadSizesAreInvalidArgument) {
  GpuTier::Options o;
  o.chunk_bytes = 0;
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.chunk_bytes = 1000;  // not a multiple of 256
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.chunk_bytes = 2 << 20;
  o.capacity_bytes = (2 << 20) - 1;  // no whole chunk
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.capacity_bytes = 4 << 20;
  o.device = -1;
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GpuTierOptionsTest, AbsentWithoutAGpu) {
  if (GpuAvailable()) GTEST_SKIP() << "a GPU is present; tests/gpu covers the tier";
  GpuTier::Options o;
  o.capacity_bytes = 2 * o.chunk_bytes;
  const auto tier = GpuTier::Create(o);
  EXPECT_EQ(tier.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(PinnedMemoryAvailable());
  EXPECT_EQ(NewPinnedAllocator(1 << 20).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace ropekv
