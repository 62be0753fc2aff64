#include "cache/gpu_tier.h"

#include "absl/strings/str_cat.h"

namespace ropekv {

SlotAllocator::SlotAllocator(uint32_t slots) : slots_(slots), taken_(slots, false) {
  free_.reserve(slots);
  for (uint32_t i = slots; i-- > 0;) free_.push_back(i);
}

absl::StatusOr<GpuSlot> SlotAllocator::Allocate() {
  absl::MutexLock lock(&mu_);
  if (free_.empty()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("GPU tier full: all ", slots_, " slots are taken"));
  }
  const GpuSlot s = free_.back();
  free_.pop_back();
  taken_[s] = true;
  return s;
}

absl::Status SlotAllocator::Free(GpuSlot slot) {
  if (slot >= slots_) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU slot ", slot, " out of range [0, ", slots_, ")"));
  }
  absl::MutexLock lock(&mu_);
  if (!taken_[slot]) {
    return absl::FailedPreconditionError(absl::StrCat("GPU slot ", slot, " is already free"));
  }
  taken_[slot] = false;
  free_.push_back(slot);
  return absl::OkStatus();
}

uint32_t SlotAllocator::used() const {
  absl::MutexLock lock(&mu_);
  return slots_ - static_cast<uint32_t>(free_.size());
}

absl::StatusOr<uint32_t> GpuTier::CheckOptions(const Options& options) {
  if (options.slot_bytes == 0 || options.slot_bytes % 256 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GPU tier slot size must be a positive multiple of 256 bytes, got ", options.slot_bytes));
  }
  const uint64_t slots = options.capacity_bytes / options.slot_bytes;
  if (slots == 0 || slots > 0xffffffffull) {
    return absl::InvalidArgumentError(absl::StrCat("GPU tier capacity ", options.capacity_bytes,
                                                   " must hold between 1 and 2^32-1 slots of ",
                                                   options.slot_bytes, " bytes"));
  }
  if (options.device < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU tier device must be >= 0, got ", options.device));
  }
  return static_cast<uint32_t>(slots);
}

absl::Status GpuTier::CheckMoves(absl::Span<const GpuMove> moves) const {
  for (size_t i = 0; i < moves.size(); ++i) {
    const GpuMove& m = moves[i];
    if (m.slot >= slots_.slots()) {
      return absl::InvalidArgumentError(absl::StrCat("move ", i, ": GPU slot ", m.slot,
                                                     " out of range [0, ", slots_.slots(), ")"));
    }
    if (m.host == nullptr && m.bytes > 0) {
      return absl::InvalidArgumentError(absl::StrCat("move ", i, ": null host pointer"));
    }
    if (m.bytes > options_.slot_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "move ", i, ": ", m.bytes, " bytes do not fit a GPU slot of ", options_.slot_bytes));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<GpuTier::Ticket> GpuTier::CopyIn(absl::Span<const GpuMove> moves) {
  return Enqueue(moves, /*to_device=*/true);
}

absl::StatusOr<GpuTier::Ticket> GpuTier::CopyOut(absl::Span<const GpuMove> moves) {
  return Enqueue(moves, /*to_device=*/false);
}

GpuCounters GpuTier::Counters() const {
  absl::MutexLock lock(&mu_);
  GpuCounters c = counters_;
  c.slots_used = slots_.used();
  return c;
}

}  // namespace ropekv
