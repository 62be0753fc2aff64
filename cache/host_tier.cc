#include "cache/host_tier.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace ropekv {

absl::StatusOr<std::unique_ptr<HostTier>> HostTier::Create(Options options) {
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("host tier capacity must be positive, got 0");
  }
  if (!options.allocator) {
    options.allocator = NewKeepingAllocator(NewAlignedAllocator(), options.capacity_bytes);
  }
  return std::unique_ptr<HostTier>(
      new HostTier(options.capacity_bytes, std::move(options.allocator)));
}

HostTier::~HostTier() = default;

absl::StatusOr<void*> HostTier::AllocateSlot(uint64_t bytes) {
  {
    absl::MutexLock lock(&mu_);
    if (used_bytes_ + bytes > capacity_bytes_) {
      return absl::ResourceExhaustedError(absl::StrCat("host tier full: ", used_bytes_, " of ",
                                                       capacity_bytes_,
                                                       " bytes used, a block needs ", bytes));
    }
    used_bytes_ += bytes;
  }
  void* p = allocator_->Allocate(bytes);
  if (p == nullptr) {
    absl::MutexLock lock(&mu_);
    used_bytes_ -= bytes;
    return absl::ResourceExhaustedError(absl::StrCat("allocation of ", bytes, " bytes failed"));
  }
  return p;
}

void HostTier::FreeSlot(void* slot, uint64_t bytes) {
  allocator_->Free(slot, bytes);
  absl::MutexLock lock(&mu_);
  used_bytes_ -= bytes;
}

uint64_t HostTier::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_bytes_;
}

bool HostTier::Fits(uint64_t bytes) const {
  absl::MutexLock lock(&mu_);
  return used_bytes_ + bytes <= capacity_bytes_;
}

}  // namespace ropekv
