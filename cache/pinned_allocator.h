// Page-locked (pinned) host memory for the host tier, from cudaHostAlloc, so that moves between
// the host and GPU tiers run by DMA at full PCIe speed and cudaMemcpyAsync is truly asynchronous.
//
// cudaHostAlloc and cudaFreeHost are slow (they map pages; cudaFreeHost synchronizes the device),
// so freed buffers are kept by size and handed out again (NewKeepingAllocator). Live plus kept
// bytes never pass `limit_bytes` (give the host tier's capacity): when a new buffer would pass
// it, kept buffers are released first. At most `keep_limit_bytes` are kept (a low cap makes frees
// pay cudaFreeHost). Thread-safe.
#ifndef ROPEKV_CACHE_PINNED_ALLOCATOR_H_
#define ROPEKV_CACHE_PINNED_ALLOCATOR_H_

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "cache/allocator.h"

namespace ropekv {

// Whether pinned memory can be had here: a CUDA build with a usable GPU.
bool PinnedMemoryAvailable();

// A pinned-memory Allocator. UNAVAILABLE when PinnedMemoryAvailable() is false; INVALID_ARGUMENT
// for a zero limit. Allocate returns nullptr when the driver refuses or the limit would be
// passed.
absl::StatusOr<std::unique_ptr<Allocator>> NewPinnedAllocator(uint64_t limit_bytes,
                                                              uint64_t keep_limit_bytes = kKeepAll);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_PINNED_ALLOCATOR_H_
