#include "cache/host_tier.h"

#include <atomic>
#include <chrono>
#include <cstring>

#include "absl/time/clock.h"
#include "gtest/gtest.h"

namespace ropekv {
namespace {

// Counts live bytes so the test sees what the tier really holds.
class CountingAllocator final : public Allocator {
 public:
  explicit CountingAllocator(std::atomic<int64_t>* live) : live_(live) {}
  void* Allocate(size_t bytes) override {
    *live_ += bytes;
    return ::operator new(bytes);
  }
  void Free(void* p, size_t bytes) override {
    *live_ -= bytes;
    ::operator delete(p);
  }

 private:
  std::atomic<int64_t>* live_;
};

TEST(HostTierTest, NeverPassesCapacity) {
  std::atomic<int64_t> live{0};
  HostTier::Options o;
  o.capacity_bytes = 10000;
  o.allocator = std::make_unique<CountingAllocator>(&live);
  auto tier = HostTier::Create(std::move(o));
  ASSERT_TRUE(tier.ok());
  std::vector<void*> slots;
  for (int i = 0; i < 3; ++i) {
    auto s = (*tier)->AllocateSlot(3000);
    ASSERT_TRUE(s.ok());
    slots.push_back(*s);
  }
  EXPECT_EQ((*tier)->used_bytes(), 9000u);
  auto full = (*tier)->AllocateSlot(3000);
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(live.load(), 9000);
  EXPECT_TRUE((*tier)->Fits(1000));
  EXPECT_FALSE((*tier)->Fits(1001));
  for (void* s : slots) (*tier)->FreeSlot(s, 3000);
  EXPECT_EQ((*tier)->used_bytes(), 0u);
  EXPECT_EQ(live.load(), 0);
}

TEST(KeepingAllocatorTest, ReusesFreedBuffersWithinTheLimit) {
  std::atomic<int64_t> live{0};
  auto alloc = NewKeepingAllocator(std::make_unique<CountingAllocator>(&live), 10000);
  void* a = alloc->Allocate(3000);
  void* b = alloc->Allocate(3000);
  void* c = alloc->Allocate(3000);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(alloc->Allocate(1001), nullptr);  // 9000 live: the limit holds
  EXPECT_EQ(live.load(), 9000);
  alloc->Free(b, 3000);
  EXPECT_EQ(live.load(), 9000);  // kept, not returned
  EXPECT_EQ(alloc->kept_bytes(), 3000u);
  EXPECT_EQ(alloc->Allocate(3000), b);  // the kept buffer comes back
  EXPECT_EQ(live.load(), 9000);
  EXPECT_EQ(alloc->kept_bytes(), 0u);
  alloc->Free(b, 3000);
  alloc->Free(c, 3000);
  // Another size: kept buffers go back to the raw allocator until it fits (3000 + 5000).
  void* d = alloc->Allocate(5000);
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(live.load(), 8000);
  std::memset(d, 0x5a, 5000);
  alloc->Free(a, 3000);
  alloc->Free(d, 5000);
  EXPECT_EQ(live.load(), 8000);
  alloc.reset();  // kept buffers are returned on destruction
  EXPECT_EQ(live.load(), 0);
}

TEST(KeepingAllocatorTest, KeepsAtMostTheKeepLimit) {
  std::atomic<int64_t> live{0};
  auto alloc = NewKeepingAllocator(std::make_unique<CountingAllocator>(&live), 10000, 4000);
  void* a = alloc->Allocate(3000);
  void* b = alloc->Allocate(3000);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  alloc->Free(a, 3000);
  EXPECT_EQ(alloc->kept_bytes(), 3000u);
  alloc->Free(b, 3000);  // 6000 would pass the keep limit: returned at once
  EXPECT_EQ(alloc->kept_bytes(), 3000u);
  EXPECT_EQ(live.load(), 3000);
  EXPECT_EQ(alloc->Allocate(3000), a);
  auto none = NewKeepingAllocator(std::make_unique<CountingAllocator>(&live), 10000, 0);
  void* c = none->Allocate(1000);
  ASSERT_NE(c, nullptr);
  none->Free(c, 1000);
  EXPECT_EQ(none->kept_bytes(), 0u);
  EXPECT_EQ(live.load(), 3000);  // a, still live
  alloc->Free(a, 3000);
  alloc.reset();
  EXPECT_EQ(live.load(), 0);
}

TEST(KeepingAllocatorTest, ReleasesKeptBuffersWhenIdle) {
  std::atomic<int64_t> live{0};
  auto alloc = NewKeepingAllocator(std::make_unique<CountingAllocator>(&live), 10000);
  void* a = alloc->Allocate(3000);
  void* b = alloc->Allocate(2000);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  alloc->Free(a, 3000);
  const auto freed = std::chrono::steady_clock::now();
  const auto idle = std::chrono::seconds(30);
  EXPECT_EQ(alloc->ReleaseKeptIfIdle(idle, freed + std::chrono::seconds(29)), 0u);  // not yet
  EXPECT_EQ(alloc->kept_bytes(), 3000u);
  EXPECT_EQ(alloc->ReleaseKeptIfIdle(idle, freed + std::chrono::seconds(31)), 3000u);
  EXPECT_EQ(alloc->kept_bytes(), 0u);
  EXPECT_EQ(live.load(), 2000);                                                     // b, still live
  EXPECT_EQ(alloc->ReleaseKeptIfIdle(idle, freed + std::chrono::seconds(60)), 0u);  // none left
  alloc->Free(b, 2000);
  EXPECT_EQ(alloc->kept_bytes(), 2000u);  // keeping goes on after a release
  alloc.reset();
  EXPECT_EQ(live.load(), 0);
}

TEST(KeepingAllocatorTest, KeptReleaserReturnsKeptBuffersOfAnIdleAllocator) {
  std::atomic<int64_t> live{0};
  auto alloc = NewKeepingAllocator(std::make_unique<CountingAllocator>(&live), 10000);
  alloc->Free(alloc->Allocate(3000), 3000);
  ASSERT_EQ(alloc->kept_bytes(), 3000u);
  {
    KeptReleaser releaser(alloc.get(), absl::Milliseconds(50));
    for (int i = 0; i < 200 && live.load() != 0; ++i) absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(live.load(), 0);
  EXPECT_EQ(alloc->kept_bytes(), 0u);
  KeptReleaser off(alloc.get(), absl::ZeroDuration());  // no thread
}

TEST(HostTierTest, DefaultAllocatorKeepsFreedSlots) {
  HostTier::Options o;
  o.capacity_bytes = 4 << 20;
  auto tier = HostTier::Create(std::move(o));
  ASSERT_TRUE(tier.ok());
  auto a = (*tier)->AllocateSlot(1 << 20);
  ASSERT_TRUE(a.ok());
  std::memset(*a, 1, 1 << 20);
  (*tier)->FreeSlot(*a, 1 << 20);
  EXPECT_EQ((*tier)->used_bytes(), 0u);
  EXPECT_EQ((*tier)->reserved_bytes(), 1u << 20);  // kept for the next slot
  auto b = (*tier)->AllocateSlot(1 << 20);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, *a);
  // The same touched memory, not a fresh mapping (which would read zero).
  EXPECT_EQ(static_cast<const char*>(*b)[1 << 19], 1);
  // A slot of another size still gets the whole capacity: the kept one makes room.
  (*tier)->FreeSlot(*b, 1 << 20);
  auto c = (*tier)->AllocateSlot(4 << 20);
  ASSERT_TRUE(c.ok()) << c.status();
  (*tier)->FreeSlot(*c, 4 << 20);
}

TEST(HostTierTest, ZeroCapacityIsRefused) {
  HostTier::Options o;
  o.capacity_bytes = 0;
  EXPECT_EQ(HostTier::Create(std::move(o)).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ropekv
