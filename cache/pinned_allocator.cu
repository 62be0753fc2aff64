// cudaHostAlloc-backed Allocator with a per-size free list.
#include <cuda_runtime_api.h>

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cache/pinned_allocator.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

constexpr size_t kAlign = 4096;
size_t RoundUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

class PinnedAllocator final : public Allocator {
 public:
  explicit PinnedAllocator(uint64_t limit) : limit_(limit) {}

  ~PinnedAllocator() override {
    absl::MutexLock lock(&mu_);
    for (auto& [size, list] : kept_) {
      for (void* p : list) cudaFreeHost(p);
    }
  }

  bool device_readable() const override { return true; }

  void* Allocate(size_t bytes) override {
    const size_t size = RoundUp(bytes);
    std::vector<void*> release;
    {
      absl::MutexLock lock(&mu_);
      auto it = kept_.find(size);
      if (it != kept_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        kept_bytes_ -= size;
        live_bytes_ += size;
        return p;
      }
      // Make room: release kept buffers of other sizes until the new one fits the limit.
      for (auto k = kept_.begin(); k != kept_.end() && live_bytes_ + kept_bytes_ + size > limit_;
           ++k) {
        while (!k->second.empty() && live_bytes_ + kept_bytes_ + size > limit_) {
          release.push_back(k->second.back());
          k->second.pop_back();
          kept_bytes_ -= k->first;
        }
      }
      if (live_bytes_ + kept_bytes_ + size > limit_) return nullptr;
      live_bytes_ += size;  // reserved before the slow driver call, outside the lock
    }
    for (void* p : release) cudaFreeHost(p);
    void* p = nullptr;
    if (cudaHostAlloc(&p, size, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();  // allocation failures are not sticky; clear them
      absl::MutexLock lock(&mu_);
      live_bytes_ -= size;
      return nullptr;
    }
    return p;
  }

  void Free(void* p, size_t bytes) override {
    if (p == nullptr) return;
    const size_t size = RoundUp(bytes);
    absl::MutexLock lock(&mu_);
    live_bytes_ -= size;
    kept_[size].push_back(p);  // live + kept is unchanged, so still within the limit
    kept_bytes_ += size;
  }

 private:
  const uint64_t limit_;
  absl::Mutex mu_;
  absl::flat_hash_map<size_t, std::vector<void*>> kept_ ABSL_GUARDED_BY(mu_);
  uint64_t kept_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t live_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

bool PinnedMemoryAvailable() { return GpuAvailable(); }

absl::StatusOr<std::unique_ptr<Allocator>> NewPinnedAllocator(uint64_t limit_bytes) {
  if (limit_bytes == 0) {
    return absl::InvalidArgumentError("pinned allocator limit must be positive, got 0");
  }
  if (!PinnedMemoryAvailable()) {
    return absl::UnavailableError("pinned memory needs a CUDA device; none is available");
  }
  return std::unique_ptr<Allocator>(new PinnedAllocator(limit_bytes));
}

}  // namespace ropekv
