// The host tier's memory: a fixed byte capacity handed out as block slots. It only allocates and
// accounts; which blocks live in it, and which to evict, is decided by the cache (KvCache).
//
// Memory comes from an injected Allocator (aligned memory by default; pinned memory when the GPU
// tier is present), so tests and the GPU build share the accounting.
#ifndef ROPEKV_CACHE_HOST_TIER_H_
#define ROPEKV_CACHE_HOST_TIER_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace ropekv {

// Raw memory for slots. Implementations are thread-safe.
class Allocator {
 public:
  virtual ~Allocator() = default;
  // Returns `bytes` bytes aligned to at least 64, or nullptr when the system refuses.
  virtual void* Allocate(size_t bytes) = 0;
  virtual void Free(void* p, size_t bytes) = 0;
  // Whether every buffer is page-locked memory that each CUDA device of the process reads at the
  // same address (cudaHostAlloc with cudaHostAllocPortable, unified addressing).
  virtual bool device_readable() const { return false; }
};

// 4 KiB-aligned memory from the C library, returned to it on Free.
std::unique_ptr<Allocator> NewAlignedAllocator();

// Wraps `raw`: freed buffers are kept by size and handed out again, so that a slot's pages stay
// mapped and touched. A fresh mapping faults on first touch, page by page: writing into kept
// memory runs at copy speed, writing into fresh memory several times slower (bench/RESULTS.md,
// run 23). Live plus kept bytes never pass `limit_bytes` (give the host tier's capacity): when a
// new buffer would pass it, kept buffers of other sizes go back to `raw` first, and Allocate
// returns nullptr if that is not enough. Sizes are matched exactly (a model's blocks share one).
// Kept buffers go back to `raw` when the allocator is destroyed. Thread-safe.
std::unique_ptr<Allocator> NewKeepingAllocator(std::unique_ptr<Allocator> raw,
                                               uint64_t limit_bytes);

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
