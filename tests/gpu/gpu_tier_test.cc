// The GPU tier on a real device: moves through slots keep every byte, slots are independent,
// batches complete, bad moves are refused; pinned memory from the pinned allocator.
// Each test skips itself without a GPU.
#include "cache/gpu_tier.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <random>

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

std::unique_ptr<GpuTier> MakeTier(uint32_t slots) {
  GpuTier::Options o;
  o.capacity_bytes = kSlot * slots;
  o.slot_bytes = kSlot;
  auto t = GpuTier::Create(o);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *std::move(t) : nullptr;
}

TEST(GpuTierTest, RoundTripKeepsEveryByteOfEverySlot) {
  SKIP_WITHOUT_GPU();
  constexpr uint32_t kSlots = 16;
  auto tier = MakeTier(kSlots);
  ASSERT_NE(tier, nullptr);
  EXPECT_EQ(tier->slot_count(), kSlots);
  PinnedBuffers buffers(64 << 20);
  std::mt19937_64 rng(7);
  std::vector<GpuSlot> slots;
  std::vector<char*> in, out;
  std::vector<GpuMove> up, down;
  for (uint32_t i = 0; i < kSlots; ++i) {
    slots.push_back(*tier->AllocateSlot());
    // Sizes vary, and the last one fills the slot exactly.
    const uint64_t n = i + 1 == kSlots ? kSlot : kSlot - 4096 * i - 8 * i;
    in.push_back(buffers.Get(n));
    out.push_back(buffers.Get(n));
    ASSERT_NE(in.back(), nullptr);
    ASSERT_NE(out.back(), nullptr);
    FillRandom(rng, in.back(), n);
    std::memset(out.back(), 0xff, n);  // poison: an unwritten byte fails
    up.push_back({slots.back(), in.back(), n});
    down.push_back({slots.back(), out.back(), n});
  }
  EXPECT_EQ(tier->used_bytes(), kSlots * kSlot);
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
  const GpuSlot sa = *tier->AllocateSlot();
  const GpuSlot sb = *tier->AllocateSlot();
  ASSERT_NE(sa, sb);
  EXPECT_NE(tier->SlotPointer(sa), tier->SlotPointer(sb));
  ASSERT_TRUE(tier->Wait(*tier->CopyIn({{sa, a, kSlot}, {sb, b, kSlot}})).ok());
  std::memset(out, 0xff, kSlot);
  ASSERT_TRUE(tier->Wait(*tier->CopyOut({{sa, out, kSlot}})).ok());
  EXPECT_EQ(std::memcmp(out, a, kSlot), 0);
  // Free a, reuse its slot for new bytes: b is untouched, the slot holds the new bytes.
  ASSERT_TRUE(tier->FreeSlot(sa).ok());
  const GpuSlot sc = *tier->AllocateSlot();
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
  ASSERT_TRUE(tier->AllocateSlot().ok());
  ASSERT_TRUE(tier->AllocateSlot().ok());
  EXPECT_EQ(tier->AllocateSlot().status().code(), absl::StatusCode::kResourceExhausted);
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
    moves.push_back({*tier->AllocateSlot(), p, kSlot});
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

}  // namespace
}  // namespace ropekv
