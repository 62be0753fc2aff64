// The GPU tier and pinned memory in a build without CUDA: absent, and saying so.
#include "absl/strings/str_cat.h"
#include "cache/gpu_tier.h"
#include "cache/pinned_allocator.h"

namespace ropekv {

struct GpuTier::Impl {};

absl::StatusOr<std::unique_ptr<GpuTier>> GpuTier::Create(const Options& options) {
  if (auto chunks = CheckOptions(options); !chunks.ok()) return chunks.status();
  return absl::UnavailableError("GPU tier absent: ropekv was built without CUDA");
}

GpuTier::GpuTier(const Options& options, uint64_t chunks, std::unique_ptr<Impl> impl)
    : options_(options), slots_(chunks, options.chunk_bytes), impl_(std::move(impl)) {}

GpuTier::~GpuTier() = default;

void* GpuTier::SlotPointer(GpuSlot slot) const { return nullptr; }

absl::StatusOr<GpuTier::Ticket> GpuTier::Enqueue(absl::Span<const GpuMove> moves, bool to_device) {
  return absl::UnavailableError("GPU tier absent: ropekv was built without CUDA");
}

absl::Status GpuTier::Wait(Ticket ticket) {
  return absl::NotFoundError(absl::StrCat("GPU tier: no pending batch with ticket ", ticket));
}

absl::StatusOr<bool> GpuTier::Poll(Ticket ticket) {
  return absl::NotFoundError(absl::StrCat("GPU tier: no pending batch with ticket ", ticket));
}

bool PinnedMemoryAvailable() { return false; }

absl::StatusOr<std::unique_ptr<Allocator>> NewPinnedAllocator(uint64_t, uint64_t) {
  return absl::UnavailableError("pinned memory needs CUDA; ropekv was built without it");
}

}  // namespace ropekv
