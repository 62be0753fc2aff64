// The GPU tier: one device arena (a single cudaMalloc, sized by configuration) cut into
// fixed-size block slots, and the CUDA streams that move blocks between the arena and pinned host
// memory. Moves are batched and asynchronous: CopyIn / CopyOut enqueue one cudaMemcpyAsync per
// block on the tier's own stream (one stream per direction, so uploads and downloads overlap)
// and record one event per batch; Wait / Poll complete a batch.
//
// Like HostTier it only stores and accounts; which blocks live here is the cache's choice. A
// block must fit one slot; larger blocks are not placed on the GPU.
//
// This header has no CUDA types. Built without CUDA, or run without a GPU, Create returns
// UNAVAILABLE and the daemon runs on the host and disk tiers.
//
// Thread safety: every method is thread-safe. A slot's bytes may be moved by one batch at a
// time; the cache guarantees that (a slot belongs to one block, whose moves it serializes).
#ifndef ROPEKV_CACHE_GPU_TIER_H_
#define ROPEKV_CACHE_GPU_TIER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace ropekv {

// Index of a slot in the arena.
using GpuSlot = uint32_t;

// A free list of slot indices, lowest first. Pure bookkeeping (no CUDA), so it is unit-tested
// on any machine. Thread-safe.
class SlotAllocator {
 public:
  explicit SlotAllocator(uint32_t slots);

  // A free slot, or RESOURCE_EXHAUSTED when every slot is taken.
  absl::StatusOr<GpuSlot> Allocate();
  // Returns a slot. INVALID_ARGUMENT when out of range; FAILED_PRECONDITION when it is free
  // already (a double free never corrupts the list).
  absl::Status Free(GpuSlot slot);

  uint32_t slots() const { return slots_; }
  uint32_t used() const;

 private:
  const uint32_t slots_;
  mutable absl::Mutex mu_;
  std::vector<GpuSlot> free_ ABSL_GUARDED_BY(mu_);  // a stack; top = lowest index
  std::vector<bool> taken_ ABSL_GUARDED_BY(mu_);
};

// One block's move between a slot and host memory.
struct GpuMove {
  GpuSlot slot = 0;
  void* host = nullptr;  // [bytes] pinned host memory (pageable memory works, synchronously)
  uint64_t bytes = 0;    // <= slot_bytes
};

// Counters since creation.
struct GpuCounters {
  uint64_t slots = 0;
  uint64_t slots_used = 0;
  uint64_t slot_bytes = 0;
  uint64_t batches = 0;
  uint64_t bytes_in = 0;   // host -> GPU
  uint64_t bytes_out = 0;  // GPU -> host
};

class GpuTier {
 public:
  struct Options {
    // Arena size; rounded down to whole slots (at least one slot is required).
    uint64_t capacity_bytes = 4ull << 30;
    // Bytes per slot: the largest block the tier holds. 2 MiB is one 16-token block of a
    // Llama-3-8B-shaped model in bf16.
    uint64_t slot_bytes = 2ull << 20;
    // CUDA device ordinal.
    int device = 0;
  };

  // A ticket for one enqueued batch.
  using Ticket = uint64_t;

  // Allocates the arena and the streams. UNAVAILABLE when built without CUDA or no GPU is
  // present; INVALID_ARGUMENT when the capacity holds no slot or slot_bytes is 0 or not a
  // multiple of 256; RESOURCE_EXHAUSTED when the device cannot give the arena.
  static absl::StatusOr<std::unique_ptr<GpuTier>> Create(const Options& options);
  ~GpuTier();
  GpuTier(const GpuTier&) = delete;
  GpuTier& operator=(const GpuTier&) = delete;

  // A free slot, or RESOURCE_EXHAUSTED.
  absl::StatusOr<GpuSlot> AllocateSlot() { return slots_.Allocate(); }
  // See SlotAllocator::Free. The caller must have waited for the slot's moves.
  absl::Status FreeSlot(GpuSlot slot) { return slots_.Free(slot); }
  // Device address of a slot: [slot_bytes] bytes; a block lives at its start laid out
  // [layer][k|v][kv_head][token][head_dim]. nullptr when out of range.
  void* SlotPointer(GpuSlot slot) const;

  // Enqueues host -> slot copies, one cudaMemcpyAsync each, on the upload stream, and returns the
  // batch's ticket. Host memory must stay valid (and unchanged) until the ticket completes.
  // INVALID_ARGUMENT for a slot out of range, a null host pointer or more bytes than a slot;
  // INTERNAL for CUDA errors (nothing of the batch may be relied on then).
  absl::StatusOr<Ticket> CopyIn(absl::Span<const GpuMove> moves);
  // Enqueues slot -> host copies on the download stream. As CopyIn.
  absl::StatusOr<Ticket> CopyOut(absl::Span<const GpuMove> moves);
  // Blocks until the batch is complete; returns its CUDA error, if any. NOT_FOUND for an unknown
  // (or already waited) ticket.
  absl::Status Wait(Ticket ticket);
  // Whether the batch is complete (then Wait returns at once). NOT_FOUND for an unknown ticket.
  absl::StatusOr<bool> Poll(Ticket ticket);

  uint64_t slot_bytes() const { return options_.slot_bytes; }
  uint32_t slot_count() const { return slots_.slots(); }
  uint64_t capacity_bytes() const { return options_.slot_bytes * slots_.slots(); }
  uint64_t used_bytes() const { return options_.slot_bytes * slots_.used(); }
  int device() const { return options_.device; }
  GpuCounters Counters() const;

 private:
  struct Impl;  // CUDA state (gpu_tier.cu)
  GpuTier(const Options& options, uint32_t slots, std::unique_ptr<Impl> impl);
  // INVALID_ARGUMENT for options that give no slot; the slot count otherwise.
  static absl::StatusOr<uint32_t> CheckOptions(const Options& options);
  absl::Status CheckMoves(absl::Span<const GpuMove> moves) const;
  absl::StatusOr<Ticket> Enqueue(absl::Span<const GpuMove> moves, bool to_device);

  const Options options_;
  SlotAllocator slots_;
  std::unique_ptr<Impl> impl_;
  mutable absl::Mutex mu_;
  GpuCounters counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_GPU_TIER_H_
