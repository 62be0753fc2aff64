// The GPU tier: one device arena (a single cudaMalloc, sized by configuration) holding block
// slots of any size, and the CUDA streams that move blocks between the arena and pinned host
// memory. Moves are batched and asynchronous: CopyIn / CopyOut enqueue one cudaMemcpyAsync per
// block on the tier's own stream (one stream per direction, so uploads and downloads overlap)
// and record one event per batch; Wait / Poll complete a batch.
//
// Like HostTier it only stores and accounts; which blocks live here is the cache's choice. A
// block must fit one chunk (SlotAllocator); larger blocks are not placed on the GPU.
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

// A slot: its byte offset in the arena.
using GpuSlot = uint64_t;

// Slots of several sizes in one arena. The arena is cut into chunks of `chunk_bytes`; a chunk
// first used for a size serves slots of that size (a block's bytes rounded up to 256) until all of
// them are free again, then any size. So models of different block sizes share the tier, each
// slot the size of its block, where slots of one fixed size would leave most of each slot unused
// for small blocks and refuse blocks larger than it. Pure bookkeeping (no CUDA), unit-tested on
// any machine. Thread-safe.
class SlotAllocator {
 public:
  SlotAllocator(uint64_t chunks, uint64_t chunk_bytes);

  // The slot size that holds `bytes`: rounded up to 256.
  static uint64_t SlotSize(uint64_t bytes) { return (bytes + 255) / 256 * 256; }

  // A free slot of SlotSize(bytes): in a chunk of that size with room (the lowest), else in a
  // free chunk. INVALID_ARGUMENT for 0 bytes or more than a chunk; RESOURCE_EXHAUSTED when no
  // chunk of that size has room and no chunk is free.
  absl::StatusOr<GpuSlot> Allocate(uint64_t bytes);
  // Returns a slot. INVALID_ARGUMENT when `slot` is not the offset of a slot; FAILED_PRECONDITION
  // when it is free already (a double free never corrupts the lists).
  absl::Status Free(GpuSlot slot);
  // The size of the slot at `slot` while it is allocated; 0 otherwise.
  uint64_t SlotBytes(GpuSlot slot) const;

  uint64_t chunks() const { return chunks_.size(); }
  uint64_t chunk_bytes() const { return chunk_bytes_; }
  uint64_t chunks_used() const;
  uint64_t slots_used() const;
  uint64_t used_bytes() const;  // bytes of the slots in use

 private:
  struct Chunk {
    uint64_t slot_bytes = 0;     // 0: free
    uint32_t used = 0;           // slots taken
    std::vector<uint32_t> free;  // a stack of slot indices; top = lowest
    std::vector<bool> taken;
  };
  // The chunk and slot index of `slot` when it is the offset of a slot of a chunk in use.
  bool Locate(GpuSlot slot, uint64_t* chunk, uint32_t* index) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const uint64_t chunk_bytes_;
  mutable absl::Mutex mu_;
  std::vector<Chunk> chunks_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> free_chunks_ ABSL_GUARDED_BY(mu_);  // a stack; top = lowest
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t slots_used_ ABSL_GUARDED_BY(mu_) = 0;
};

// One block's move between a slot and host memory.
struct GpuMove {
  GpuSlot slot = 0;
  void* host = nullptr;  // [bytes] pinned host memory (pageable memory works, synchronously)
  uint64_t bytes = 0;    // <= the slot's size
};

// Counters since creation (the arena's use: GpuTier's used / reserved / capacity bytes).
struct GpuCounters {
  uint64_t batches = 0;
  uint64_t bytes_in = 0;   // host -> GPU
  uint64_t bytes_out = 0;  // GPU -> host
};

class GpuTier {
 public:
  struct Options {
    // Arena size; rounded down to whole chunks (at least one is required).
    uint64_t capacity_bytes = 4ull << 30;
    // Bytes per chunk (SlotAllocator): the largest block the tier holds. 64 MiB holds 32 blocks
    // of 16 tokens of a Llama-3-8B-shaped model in bf16 (2 MiB) or 12 of a Llama-3-70B (5 MiB).
    uint64_t chunk_bytes = 64ull << 20;
    // CUDA device ordinal.
    int device = 0;
  };

  // A ticket for one enqueued batch.
  using Ticket = uint64_t;

  // Allocates the arena and the streams. UNAVAILABLE when built without CUDA or no GPU is
  // present; INVALID_ARGUMENT when the capacity holds no chunk or chunk_bytes is 0 or not a
  // multiple of 256; RESOURCE_EXHAUSTED when the device cannot give the arena.
  static absl::StatusOr<std::unique_ptr<GpuTier>> Create(const Options& options);
  ~GpuTier();
  GpuTier(const GpuTier&) = delete;
  GpuTier& operator=(const GpuTier&) = delete;

  // A free slot of at least `bytes` (SlotAllocator::Allocate).
  absl::StatusOr<GpuSlot> AllocateSlot(uint64_t bytes) { return slots_.Allocate(bytes); }
  // See SlotAllocator::Free. The caller must have waited for the slot's moves.
  absl::Status FreeSlot(GpuSlot slot) { return slots_.Free(slot); }
  // The size of an allocated slot; 0 otherwise.
  uint64_t SlotBytes(GpuSlot slot) const { return slots_.SlotBytes(slot); }
  // Device address of an allocated slot: SlotBytes(slot) bytes; a block lives at its start laid
  // out [layer][k|v][kv_head][token][head_dim]. nullptr when `slot` is not allocated.
  void* SlotPointer(GpuSlot slot) const;

  // Enqueues host -> slot copies, one cudaMemcpyAsync each, on the upload stream, and returns the
  // batch's ticket. Host memory must stay valid (and unchanged) until the ticket completes.
  // INVALID_ARGUMENT for a slot not allocated, a null host pointer or more bytes than its slot;
  // INTERNAL for CUDA errors (nothing of the batch may be relied on then).
  absl::StatusOr<Ticket> CopyIn(absl::Span<const GpuMove> moves);
  // Enqueues slot -> host copies on the download stream. As CopyIn.
  absl::StatusOr<Ticket> CopyOut(absl::Span<const GpuMove> moves);
  // Blocks until the batch is complete; returns its CUDA error, if any. NOT_FOUND for an unknown
  // (or already waited) ticket.
  absl::Status Wait(Ticket ticket);
  // Whether the batch is complete (then Wait returns at once). NOT_FOUND for an unknown ticket.
  absl::StatusOr<bool> Poll(Ticket ticket);

  uint64_t chunk_bytes() const { return options_.chunk_bytes; }  // the largest block it holds
  uint64_t capacity_bytes() const { return options_.chunk_bytes * slots_.chunks(); }
  uint64_t used_bytes() const { return slots_.used_bytes(); }
  // Bytes of the chunks in use (SlotAllocator): used_bytes() plus their free slots and tails.
  uint64_t reserved_bytes() const { return slots_.chunks_used() * options_.chunk_bytes; }
  int device() const { return options_.device; }
  GpuCounters Counters() const;

 private:
  struct Impl;  // CUDA state (gpu_tier.cu)
  GpuTier(const Options& options, uint64_t chunks, std::unique_ptr<Impl> impl);
  // INVALID_ARGUMENT for options that give no chunk; the chunk count otherwise.
  static absl::StatusOr<uint64_t> CheckOptions(const Options& options);
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
