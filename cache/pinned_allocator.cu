// cudaHostAlloc-backed Allocator; the keeping of freed buffers is NewKeepingAllocator's.
#include <cuda_runtime_api.h>

#include "cache/pinned_allocator.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

class PinnedAllocator final : public Allocator {
 public:
  bool device_readable() const override { return true; }

  void* Allocate(size_t bytes) override {
    void* p = nullptr;
    if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
      cudaGetLastError();  // allocation failures are not sticky; clear them
      return nullptr;
    }
    return p;
  }

  void Free(void* p, size_t) override { cudaFreeHost(p); }
};

}  // namespace

bool PinnedMemoryAvailable() { return GpuAvailable(); }

absl::StatusOr<std::unique_ptr<Allocator>> NewPinnedAllocator(uint64_t limit_bytes,
                                                              uint64_t keep_limit_bytes) {
  if (limit_bytes == 0) {
    return absl::InvalidArgumentError("pinned allocator limit must be positive, got 0");
  }
  if (!PinnedMemoryAvailable()) {
    return absl::UnavailableError("pinned memory needs a CUDA device; none is available");
  }
  return NewKeepingAllocator(std::make_unique<PinnedAllocator>(), limit_bytes, keep_limit_bytes);
}

}  // namespace ropekv
