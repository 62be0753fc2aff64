// GPU tier pieces that run on any machine: the slot free list, option checks, and the tier's
// absence without a GPU. The device half is tests/gpu/gpu_tier_test.cc.
#include <set>
#include <thread>

#include "cache/gpu_tier.h"
#include "cache/pinned_allocator.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

TEST(SlotAllocatorTest, HandsOutEverySlotOnceThenIsFull) {
  SlotAllocator a(5);
  std::set<GpuSlot> got;
  for (int i = 0; i < 5; ++i) {
    auto s = a.Allocate();
    ASSERT_TRUE(s.ok());
    EXPECT_TRUE(got.insert(*s).second) << "slot " << *s << " handed out twice";
  }
  EXPECT_EQ(got, (std::set<GpuSlot>{0, 1, 2, 3, 4}));
  EXPECT_EQ(a.used(), 5u);
  EXPECT_EQ(a.Allocate().status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(a.Free(3).ok());
  EXPECT_EQ(a.used(), 4u);
  auto again = a.Allocate();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 3u);
}

TEST(SlotAllocatorTest, BadFreesAreErrorsAndChangeNothing) {
  SlotAllocator a(3);
  auto s = a.Allocate();
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(a.Free(3).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.Free(*s == 0 ? 1 : 0).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(a.Free(*s).ok());
  EXPECT_EQ(a.Free(*s).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(a.used(), 0u);
  // Still exactly three distinct slots.
  std::set<GpuSlot> got;
  for (int i = 0; i < 3; ++i) got.insert(*a.Allocate());
  EXPECT_EQ(got.size(), 3u);
  EXPECT_FALSE(a.Allocate().ok());
}

TEST(SlotAllocatorTest, ConcurrentUseNeverSharesASlot) {
  SlotAllocator a(64);
  std::vector<std::vector<GpuSlot>> held(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 200; ++round) {
        for (int i = 0; i < 8; ++i) {
          auto s = a.Allocate();
          if (s.ok()) held[t].push_back(*s);
        }
        for (GpuSlot s : held[t]) ASSERT_TRUE(a.Free(s).ok());
        held[t].clear();
      }
      for (int i = 0; i < 8; ++i) held[t].push_back(*a.Allocate());
    });
  }
  for (auto& th : threads) th.join();
  std::set<GpuSlot> all;
  for (auto& h : held) all.insert(h.begin(), h.end());
  EXPECT_EQ(all.size(), 64u);
  EXPECT_EQ(a.used(), 64u);
}

TEST(GpuTierOptionsTest, BadSizesAreInvalidArgument) {
  GpuTier::Options o;
  o.slot_bytes = 0;
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.slot_bytes = 1000;  // not a multiple of 256
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.slot_bytes = 2 << 20;
  o.capacity_bytes = (2 << 20) - 1;  // no whole slot
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.capacity_bytes = 4 << 20;
  o.device = -1;
  EXPECT_EQ(GpuTier::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(GpuTierOptionsTest, AbsentWithoutAGpu) {
  if (GpuAvailable()) GTEST_SKIP() << "a GPU is present; tests/gpu covers the tier";
  GpuTier::Options o;
  o.capacity_bytes = 8 << 20;
  const auto tier = GpuTier::Create(o);
  EXPECT_EQ(tier.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_FALSE(PinnedMemoryAvailable());
  EXPECT_EQ(NewPinnedAllocator(1 << 20).status().code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace ropekv
