#include "cache/gpu_tier.h"

#include <algorithm>
#include <functional>

#include "absl/strings/str_cat.h"

namespace ropekv {

SlotAllocator::SlotAllocator(uint64_t chunks, uint64_t chunk_bytes)
    : chunk_bytes_(chunk_bytes), chunks_(chunks) {
  free_chunks_.reserve(chunks);
  for (uint64_t c = chunks; c-- > 0;) free_chunks_.push_back(c);
}

absl::StatusOr<GpuSlot> SlotAllocator::Allocate(uint64_t bytes) {
  if (bytes == 0 || bytes > chunk_bytes_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GPU slot of ", bytes, " bytes: a slot holds 1 to ", chunk_bytes_, " bytes (a chunk)"));
  }
  const uint64_t size = SlotSize(bytes);
  absl::MutexLock lock(&mu_);
  uint64_t c = 0;
  while (c < chunks_.size() && (chunks_[c].slot_bytes != size || chunks_[c].free.empty())) ++c;
  if (c == chunks_.size()) {
    if (free_chunks_.empty()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("GPU tier full: no room for a slot of ", size, " bytes in any of ",
                       chunks_.size(), " chunks of ", chunk_bytes_, " bytes (", slots_used_,
                       " slots, ", used_bytes_, " bytes in use)"));
    }
    c = free_chunks_.back();
    free_chunks_.pop_back();
    Chunk& fresh = chunks_[c];
    const uint32_t n = static_cast<uint32_t>(std::min<uint64_t>(chunk_bytes_ / size, UINT32_MAX));
    fresh.slot_bytes = size;
    fresh.taken.assign(n, false);
    fresh.free.clear();
    for (uint32_t i = n; i-- > 0;) fresh.free.push_back(i);
  }
  Chunk& chunk = chunks_[c];
  const uint32_t i = chunk.free.back();
  chunk.free.pop_back();
  chunk.taken[i] = true;
  ++chunk.used;
  ++slots_used_;
  used_bytes_ += size;
  return c * chunk_bytes_ + uint64_t{i} * size;
}

bool SlotAllocator::Locate(GpuSlot slot, uint64_t* chunk, uint32_t* index) const {
  const uint64_t c = slot / chunk_bytes_;
  if (c >= chunks_.size() || chunks_[c].slot_bytes == 0) return false;
  const uint64_t at = slot % chunk_bytes_;
  if (at % chunks_[c].slot_bytes != 0 || at / chunks_[c].slot_bytes >= chunks_[c].taken.size()) {
    return false;
  }
  *chunk = c;
  *index = static_cast<uint32_t>(at / chunks_[c].slot_bytes);
  return true;
}

absl::Status SlotAllocator::Free(GpuSlot slot) {
  absl::MutexLock lock(&mu_);
  uint64_t c = 0;
  uint32_t i = 0;
  if (!Locate(slot, &c, &i)) {
    return absl::InvalidArgumentError(absl::StrCat("GPU slot ", slot, " is not a slot"));
  }
  Chunk& chunk = chunks_[c];
  if (!chunk.taken[i]) {
    return absl::FailedPreconditionError(absl::StrCat("GPU slot ", slot, " is already free"));
  }
  chunk.taken[i] = false;
  chunk.free.push_back(i);
  --slots_used_;
  used_bytes_ -= chunk.slot_bytes;
  if (--chunk.used == 0) {  // the chunk serves any size again
    chunk = Chunk();
    free_chunks_.push_back(c);
    std::sort(free_chunks_.begin(), free_chunks_.end(), std::greater<>());
  }
  return absl::OkStatus();
}

uint64_t SlotAllocator::SlotBytes(GpuSlot slot) const {
  absl::MutexLock lock(&mu_);
  uint64_t c = 0;
  uint32_t i = 0;
  return Locate(slot, &c, &i) && chunks_[c].taken[i] ? chunks_[c].slot_bytes : 0;
}

uint64_t SlotAllocator::chunks_used() const {
  absl::MutexLock lock(&mu_);
  return chunks_.size() - free_chunks_.size();
}

uint64_t SlotAllocator::slots_used() const {
  absl::MutexLock lock(&mu_);
  return slots_used_;
}

uint64_t SlotAllocator::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_bytes_;
}

absl::StatusOr<uint64_t> GpuTier::CheckOptions(const Options& options) {
  if (options.chunk_bytes == 0 || options.chunk_bytes % 256 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GPU tier chunk size must be a positive multiple of 256 bytes, got ", options.chunk_bytes));
  }
  const uint64_t chunks = options.capacity_bytes / options.chunk_bytes;
  if (chunks == 0) {
    return absl::InvalidArgumentError(absl::StrCat("GPU tier capacity ", options.capacity_bytes,
                                                   " must hold at least one chunk of ",
                                                   options.chunk_bytes, " bytes"));
  }
  if (options.device < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU tier device must be >= 0, got ", options.device));
  }
  return chunks;
}

absl::Status GpuTier::CheckMoves(absl::Span<const GpuMove> moves) const {
  for (size_t i = 0; i < moves.size(); ++i) {
    const GpuMove& m = moves[i];
    const uint64_t slot_bytes = slots_.SlotBytes(m.slot);
    if (slot_bytes == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("move ", i, ": GPU slot ", m.slot, " is not an allocated slot"));
    }
    if (m.host == nullptr && m.bytes > 0) {
      return absl::InvalidArgumentError(absl::StrCat("move ", i, ": null host pointer"));
    }
    if (m.bytes > slot_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "move ", i, ": ", m.bytes, " bytes do not fit its GPU slot of ", slot_bytes));
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
  return counters_;
}

}  // namespace ropekv
