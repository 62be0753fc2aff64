#include "cache/host_tier.h"

#include <atomic>

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

TEST(HostTierTest, ZeroCapacityIsRefused) {
  HostTier::Options o;
  o.capacity_bytes = 0;
  EXPECT_EQ(HostTier::Create(std::move(o)).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ropekv
