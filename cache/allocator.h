// Raw memory for the host tier's slots: the Allocator interface, aligned memory from the C
// library, and the keeping of freed buffers for reuse (around it, or around pinned memory:
// cache/pinned_allocator.h). A library of its own (ropekv_allocator) below both the cache and the
// GPU tier.
#ifndef ROPEKV_CACHE_ALLOCATOR_H_
#define ROPEKV_CACHE_ALLOCATOR_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

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
  // Bytes of freed buffers held for reuse (NewKeepingAllocator), not handed back to the system.
  virtual uint64_t kept_bytes() const { return 0; }
  // Hands the kept buffers back to the system when nothing was allocated or freed for `idle`
  // before `now`; returns their bytes (0 for allocators that keep nothing).
  virtual uint64_t ReleaseKeptIfIdle(std::chrono::steady_clock::duration /*idle*/,
                                     std::chrono::steady_clock::time_point /*now*/) {
    return 0;
  }
};

// 4 KiB-aligned memory from the C library, returned to it on Free.
std::unique_ptr<Allocator> NewAlignedAllocator();

// Wraps `raw`: freed buffers are kept by size and handed out again, so that a slot's pages stay
// mapped and touched. A fresh mapping faults on first touch, page by page: writing into kept
// memory runs at copy speed, writing into fresh memory several times slower (bench/RESULTS.md,
// run 23). Live plus kept bytes never pass `limit_bytes` (give the host tier's capacity): when a
// new buffer would pass it, kept buffers of other sizes go back to `raw` first, and Allocate
// returns nullptr if that is not enough. Sizes are matched exactly (a model's blocks share one).
// At most `keep_limit_bytes` are kept: a freed buffer that would pass it goes back to `raw` at
// once (0: nothing is kept; a daemon that shares its host caps what it holds while idle). Kept
// buffers go back to `raw` when the allocator is destroyed. Thread-safe.
inline constexpr uint64_t kKeepAll = ~uint64_t{0};
std::unique_ptr<Allocator> NewKeepingAllocator(std::unique_ptr<Allocator> raw, uint64_t limit_bytes,
                                               uint64_t keep_limit_bytes = kKeepAll);

// A thread that calls `allocator`'s ReleaseKeptIfIdle(idle) up to once a second (four times an
// `idle` period), so that kept buffers go back to the system once it has been idle that long.
// Nothing for a null allocator or a non-positive `idle`. Destroy it before the allocator.
class KeptReleaser {
 public:
  KeptReleaser(Allocator* allocator, absl::Duration idle);
  ~KeptReleaser();
  KeptReleaser(const KeptReleaser&) = delete;
  KeptReleaser& operator=(const KeptReleaser&) = delete;

 private:
  absl::Mutex mu_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_ALLOCATOR_H_
