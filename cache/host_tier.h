// The host tier's memory: a fixed byte capacity handed out as block slots. It only allocates and
// accounts; which blocks live in it, and which to evict, is decided by the cache (KvCache).
//
// Memory comes from an injected Allocator (cache/allocator.h: aligned memory, freed slots kept for
// reuse, by default; pinned memory when the GPU tier is present), so tests and the GPU build
// share the accounting.
#ifndef ROPEKV_CACHE_HOST_TIER_H_
#define ROPEKV_CACHE_HOST_TIER_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cache/allocator.h"

namespace ropekv {

class HostTier {
 public:
  struct Options {
    uint64_t capacity_bytes = 2ull << 30;  // hard limit on slot bytes held at once
    // Default: NewKeepingAllocator(NewAlignedAllocator(), capacity_bytes).
    std::unique_ptr<Allocator> allocator;
  };

  // INVALID_ARGUMENT for a zero capacity.
  static absl::StatusOr<std::unique_ptr<HostTier>> Create(Options options);
  ~HostTier();

  // A slot of `bytes` bytes, or RESOURCE_EXHAUSTED when it would pass the capacity (the caller
  // evicts and retries) or the allocator refuses. Thread-safe.
  absl::StatusOr<void*> AllocateSlot(uint64_t bytes);
  // Returns a slot from AllocateSlot. Thread-safe.
  void FreeSlot(void* slot, uint64_t bytes);

  uint64_t capacity_bytes() const { return capacity_bytes_; }
  // Whether every slot is memory CUDA devices read in place (Allocator::device_readable).
  bool device_readable() const { return allocator_->device_readable(); }
  uint64_t used_bytes() const;
  // used_bytes() plus the freed slots the allocator keeps for reuse: what the tier holds.
  uint64_t reserved_bytes() const { return used_bytes() + allocator_->kept_bytes(); }
  // Whether `bytes` more would fit now.
  bool Fits(uint64_t bytes) const;

 private:
  HostTier(uint64_t capacity, std::unique_ptr<Allocator> allocator)
      : capacity_bytes_(capacity), allocator_(std::move(allocator)) {}

  const uint64_t capacity_bytes_;
  std::unique_ptr<Allocator> allocator_;
  mutable absl::Mutex mu_;
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_HOST_TIER_H_
