// KvCache: the storage engine behind the service. It owns the model registry, the prefix index
// and the tiers — GPU (optional), host, disk (optional, RocksDB) — and implements the verbs of
// DESIGN.md on domain types (no gRPC here). docs/tiers.md describes the tiers and their policy.
//
// Prefix blocks are addressed by chained SHA-256 hashes (cache/hash.h). Lookup walks the chain of
// a prompt's full blocks and stops at the first miss: the longest cached prefix. Blocks are
// evicted least-recently-used first; a use touches a chain from its last block to its first, so
// leaves go before the prefixes they hang off. Pinned blocks and blocks being read are never
// evicted. Evicting a block also evicts the blocks chained after it (they would be unreachable).
//
// Tiers: a block has a copy in one or more tiers. Puts land in the write tier (TierPolicy) and,
// with write-through, on disk before they are acknowledged. Reads need a host copy: a block only
// on disk (or only on the GPU) is copied to the host, verified, and kept there (promotion) or
// dropped after the read. Past a tier's high watermark a background pass frees its least recently
// used copies down to the low watermark: a host copy without a disk copy is written to disk first
// (demotion), GPU copies always have a host or disk copy behind them. A full tier also frees on
// demand. Memory never exceeds the capacities: slots are accounted before they are filled.
// Disk I/O and GPU waits never run under the cache's mutex.
//
// Writes are atomic per Put: bytes go into freshly allocated slots, and the blocks become
// visible only when the whole Put is complete (PutWriter::Finish); a failed or abandoned Put frees
// its slots and leaves the index as it was. On disk a Put's blocks are one atomic batch.
//
// A restart with the same disk tier registers its models again and finds its blocks (on disk
// only, in the order they were written) — Lookup sees them at once, reads bring them back.
//
// Thread safety: every method is thread-safe. Lock order: mu_, then the tiers' own mutexes;
// maintenance_mu_ is never held with mu_.
#ifndef ROPEKV_CACHE_KV_CACHE_H_
#define ROPEKV_CACHE_KV_CACHE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "cache/disk_tier.h"
#include "cache/gpu_tier.h"
#include "cache/hash.h"
#include "cache/host_tier.h"
#include "cache/model.h"
#include "cache/model_registry.h"
#include "cache/tier_policy.h"

namespace ropekv {

enum class TierKind : uint8_t { kGpu = 1, kHost = 2, kDisk = 3 };

// What the cache knows of a stored block.
struct BlockInfo {
  BlockHash hash;
  TierKind tier = TierKind::kHost;  // the fastest tier holding a copy
  int64_t position = 0;             // logical position of its first token in its prefix
  int64_t rotated_at = 0;           // position its first token's key was rotated at
  RopeTableId rope_table = 0;
  bool pre_rope = false;
  bool pinned = false;
  // Unique in the process for every time a block enters the cache (a Put that stores it, or its
  // load from disk at start), kept through tier moves: equal serials, equal bytes. What is derived
  // from a block's bytes (its page metadata) can be checked against it.
  uint64_t serial = 0;
};

// Counters of one tier. A "request" is one block a lookup or read asked for.
struct TierCounters {
  TierKind tier = TierKind::kHost;
  uint64_t bytes_used = 0;
  uint64_t capacity_bytes = 0;
  uint64_t blocks = 0;          // blocks with a copy in this tier
  uint64_t pinned_blocks = 0;   // of which pinned
  uint64_t hits = 0;            // requests served from this tier (its fastest copy)
  uint64_t misses = 0;          // requests for a block this tier did not hold
  uint64_t promotions = 0;      // copies made here from a lower tier (disk -> host, host -> GPU)
  uint64_t demotions = 0;       // copies written from here to a lower tier under pressure
  uint64_t evictions = 0;       // copies dropped from this tier (a lower tier may keep the block)
  uint64_t bytes_moved = 0;     // bytes copied into or out of this tier from or to another tier
  uint64_t corrupt_blocks = 0;  // disk: blocks that failed verification (dropped, never returned)
  // GPU: bytes of the chunks in use; disk: bytes of the segment files; host: bytes_used plus the
  // freed slots kept for reuse
  uint64_t reserved_bytes = 0;
};

// What the cache found on disk when it started.
struct DiskLoad {
  uint64_t blocks = 0;           // disk-resident blocks in the index
  uint64_t dropped = 0;          // records dropped: damaged, orphaned, or of an unknown model
  uint64_t migrated_blocks = 0;  // moved from the format before segments (docs/tiers.md)
};

struct CacheStats {
  std::vector<TierCounters> tiers;
  uint64_t lookups = 0;
  uint64_t lookup_hit_tokens = 0;
  uint64_t lookup_miss_tokens = 0;
  uint64_t puts = 0;
  uint64_t gets = 0;
  uint64_t bytes_in = 0;
  uint64_t bytes_out = 0;
  uint32_t models = 0;
  uint64_t prompt_blocks_reused = 0;  // block hashes taken from the prompt memo, not computed
};

struct PutOptions {
  std::string model;                  // id or name
  std::string tenant;                 // hash salt
  std::vector<int32_t> tokens;        // a positive multiple of the model's block_tokens
  std::optional<BlockHash> parent;    // block before the first one; none = start of a prompt
  std::optional<int64_t> rotated_at;  // default: the first token's position in the prefix
  RopeTableId rope_table = 0;
  bool pre_rope = false;
  bool pin = false;
  // A position-independent segment keyed by SegmentHash(tokens): any positive token count, the
  // last block padded; no parent; rotated_at defaults to 0.
  bool segment = false;
};

struct PutResult {
  uint32_t blocks_stored = 0;
  uint32_t blocks_existing = 0;
  std::vector<BlockHash> hashes;
};

struct LookupResult {
  uint32_t matched_tokens = 0;
  std::vector<BlockInfo> blocks;
  uint64_t block_bytes = 0;  // of one block of the model
};

class KvCache;

// Observes blocks entering and leaving a KvCache, e.g. to keep derived data (retrieval page
// metadata) with each block: built in bulk when the block is stored, dropped when it goes.
// Registered with KvCache::AddBlockObserver; must outlive its registration.
class BlockObserver {
 public:
  virtual ~BlockObserver() = default;
  // A Put is about to store `block` (a fresh block: not cached when the Put began) with `bytes`
  // ([layer][k|v][kv_head][token][head_dim], valid during the call). Called outside the cache's
  // lock, before the block becomes visible to readers; for the blocks of one Put possibly on
  // several threads at once (one call a block), all returned before the Put goes on.
  virtual void OnBlockWritten(const RegisteredModel& model, const BlockInfo& block,
                              const void* bytes) = 0;
  // The Put ended: of the blocks announced by OnBlockWritten, those in `committed` are now
  // stored with the announced bytes; the others are not (the Put failed, or another Put stored
  // the block first and its bytes were kept). Outside the cache's lock.
  virtual void OnPutDone(absl::Span<const BlockHash> written,
                         absl::Span<const BlockHash> committed) = 0;
  // `block` left the cache (no tier holds it any more). Called under the cache's lock: must be
  // quick and must not call into the KvCache.
  virtual void OnBlockDropped(const BlockHash& block) = 0;
};

// Receives the bytes of one Put, in order, in pieces of any size. Not thread-safe; one writer
// per Put. Destroying it before Finish abandons the Put.
class PutWriter {
 public:
  ~PutWriter();
  PutWriter(const PutWriter&) = delete;
  PutWriter& operator=(const PutWriter&) = delete;

  // Appends bytes. INVALID_ARGUMENT past the expected size; RESOURCE_EXHAUSTED when no slot can
  // be made free. After an error the Put is dead: Finish returns that error.
  absl::Status Write(absl::string_view bytes);
  // Commits the Put. INVALID_ARGUMENT when fewer bytes came than the blocks need.
  absl::StatusOr<PutResult> Finish();

  uint64_t expected_bytes() const { return block_bytes_ * hashes_.size(); }
  uint64_t received_bytes() const { return received_; }

 private:
  friend class KvCache;
  PutWriter(KvCache* cache, RegisteredModel model, PutOptions options,
            std::vector<BlockHash> hashes, std::vector<bool> present, int64_t first_position);

  KvCache* cache_;
  RegisteredModel model_;
  PutOptions options_;
  uint64_t block_bytes_;
  std::vector<BlockHash> hashes_;
  std::vector<bool> present_;  // already cached when the Put began: bytes skipped
  std::vector<void*> slots_;   // one per block; nullptr until allocated (or when present)
  int64_t first_position_;
  // Write-through: each block goes to disk as soon as its bytes are in (CommitPut makes them
  // findable). Holds pointers into slots_: destroyed before they are freed.
  std::unique_ptr<DiskTier::Staging> staging_;
  uint64_t received_ = 0;
  absl::Status status_;
  bool finished_ = false;
};

// The blocks of one read, held so that they cannot be evicted until the reader is destroyed.
// Not thread-safe; thread-compatible.
class ReadHandle {
 public:
  ~ReadHandle();
  ReadHandle(ReadHandle&& o) noexcept { *this = std::move(o); }
  ReadHandle& operator=(ReadHandle&& o) noexcept;

  const RegisteredModel& model() const { return model_; }
  const std::vector<BlockInfo>& blocks() const { return blocks_; }
  uint64_t block_bytes() const { return block_bytes_; }
  // Tokens covered: full blocks of a prefix, or a segment's exact length.
  uint32_t matched_tokens() const { return tokens_; }

  // The stored bytes of block i, [layer][k|v][kv_head][token][head_dim].
  absl::string_view bytes(size_t i) const;
  // Block i's copy in the GPU tier (device memory of KvCache::gpu_device(), the same layout), kept
  // while the handle holds the block; nullptr when the block had none when it was acquired.
  const void* device_bytes(size_t i) const { return device_[i]; }
  // Writes block i into dst (block_bytes() bytes) with its keys at positions starting from
  // `target_position` (nullopt: as stored), re-rotated from the stored copy in one rotation.
  absl::Status CopyBlock(size_t i, void* dst, std::optional<int64_t> target_position) const;

 private:
  friend class KvCache;
  ReadHandle(KvCache* cache, RegisteredModel model, uint64_t block_bytes)
      : cache_(cache), model_(std::move(model)), block_bytes_(block_bytes) {}
  void Release();

  KvCache* cache_;
  RegisteredModel model_;
  uint64_t block_bytes_;
  std::vector<BlockInfo> blocks_;
  std::vector<const void*> data_;
  std::vector<const void*> device_;  // GPU-tier copies, or nullptr
  uint32_t tokens_ = 0;
  // Host copies made for this read only (promote_on_read off), freed on release.
  std::vector<void*> temp_;
};

class KvCache {
 public:
  struct Options {
    uint64_t host_capacity_bytes = 2ull << 30;  // host tier capacity
    uint64_t max_block_bytes = 64ull << 20;     // a model whose block is larger is refused
    std::unique_ptr<Allocator> host_allocator;  // default: aligned memory
    // The disk tier, opened and not yet loaded (Create loads it: models and blocks come back).
    // None: no disk tier (blocks live in memory only).
    std::unique_ptr<DiskTier> disk;
    // The GPU tier. None: no GPU tier.
    std::unique_ptr<GpuTier> gpu;
    TierPolicy policy;
    // The chains of the last prompts, so that a prompt sent again (or grown) hashes only its new
    // blocks.
    PrefixHashMemo::Options prompt_memo;
    // Run the watermark pass on a background thread (every `maintenance_interval_ms` and when a
    // tier passes its high watermark). Off: only RunMaintenance() runs it (tests).
    bool background_maintenance = true;
    int maintenance_interval_ms = 200;
  };

  static absl::StatusOr<std::unique_ptr<KvCache>> Create(Options options);
  ~KvCache();

  // Registers a model (ModelRegistry::Register), refusing blocks over max_block_bytes with
  // INVALID_ARGUMENT.
  absl::StatusOr<ModelRegistry::Registration> RegisterModel(const ModelSpec& spec,
                                                            const std::string& name);
  absl::StatusOr<RegisteredModel> ResolveModel(absl::string_view id_or_name) const;
  std::vector<RegisteredModel> ListModels() const;
  // Blocks stored per model id.
  uint64_t BlockCount(absl::string_view model_id) const;

  // Starts a Put. NOT_FOUND for an unknown model or parent; INVALID_ARGUMENT for token counts
  // that are not a positive multiple of block_tokens. With write-through, Finish returns after
  // the disk acknowledged the blocks, or an error (RESOURCE_EXHAUSTED when the disk has no room,
  // UNAVAILABLE for I/O errors) and then nothing of the Put is visible.
  absl::StatusOr<std::unique_ptr<PutWriter>> BeginPut(PutOptions options);

  // The longest cached prefix of `tokens`. NOT_FOUND for an unknown model.
  absl::StatusOr<LookupResult> Lookup(absl::string_view model, absl::string_view tenant,
                                      absl::Span<const int32_t> tokens);

  // Holds the longest cached prefix of `tokens` (at most max_blocks blocks; 0 = all) for reading.
  // Blocks without a host copy are copied to the host (from the GPU, or from disk verified by
  // checksum); a block that fails verification is dropped and the prefix ends before it, as it
  // does where the host has no room for a copy. With `first_block`, only the prefix's blocks from
  // that one on are held (none when the prefix is shorter): one range of a prefix read in parts.
  absl::StatusOr<ReadHandle> AcquirePrefix(absl::string_view model, absl::string_view tenant,
                                           absl::Span<const int32_t> tokens, uint32_t max_blocks,
                                           uint32_t first_block = 0);

  // Holds the prefix that ends at block `last` (its chained hash, as a Put or Lookup gave it):
  // `last`, its parent, and so on to the first block of the prompt, all of them; no token is
  // hashed. A segment's blocks chain the same way (whole blocks: a padded last block counts
  // whole). NOT_FOUND when `last` is not a cached block of `model`, or a block before it is not
  // cached; otherwise as AcquirePrefix.
  absl::StatusOr<ReadHandle> AcquireChain(absl::string_view model, const BlockHash& last);

  // Holds the segment of exactly `tokens` for reading; NOT_FOUND when it is not (fully) cached;
  // DATA_LOSS when a block of it failed verification on disk (it is dropped); RESOURCE_EXHAUSTED
  // when the host has no room to copy it in.
  absl::StatusOr<ReadHandle> AcquireSegment(absl::string_view model, absl::string_view tenant,
                                            absl::Span<const int32_t> tokens);
  // Whether the segment of exactly `tokens` is cached: matched_tokens is its length or 0.
  absl::StatusOr<LookupResult> LookupSegment(absl::string_view model, absl::string_view tenant,
                                             absl::Span<const int32_t> tokens);

  // Evicts the cached prefix blocks of `tokens` (and what is chained after them) from every tier,
  // disk included; with no tokens every block of the model. Pinned blocks and blocks being read
  // stay. Returns the count.
  absl::StatusOr<uint32_t> Evict(absl::string_view model, absl::string_view tenant,
                                 absl::Span<const int32_t> tokens);

  // Pins (or unpins) the cached prefix blocks of `tokens`. Returns how many blocks were set.
  absl::StatusOr<uint32_t> Pin(absl::string_view model, absl::string_view tenant,
                               absl::Span<const int32_t> tokens, bool pin);

  // Adds (or removes) an observer of stored and dropped blocks (see BlockObserver). Blocks
  // already cached are not announced.
  void AddBlockObserver(BlockObserver* observer) ABSL_LOCKS_EXCLUDED(observers_mu_);
  void RemoveBlockObserver(BlockObserver* observer) ABSL_LOCKS_EXCLUDED(observers_mu_);

  // Counters; tiers in the order host, GPU (if present), disk (if present).
  CacheStats Stats() const;
  // What Create found on disk (zeros without a disk tier).
  const DiskLoad& disk_load() const { return disk_load_; }

  // One watermark pass over every tier (what the background thread runs): frees least recently
  // used copies of each tier fuller than its high watermark down to its low watermark.
  void RunMaintenance();

  const TierPolicy& policy() const { return options_.policy; }
  bool has_gpu_tier() const { return gpu_ != nullptr; }
  // The CUDA device of the GPU tier, or -1 without one.
  int gpu_device() const { return gpu_ != nullptr ? gpu_->device() : -1; }
  bool has_disk_tier() const { return disk_ != nullptr; }
  // Whether every host copy a ReadHandle hands out is page-locked memory that CUDA devices read at
  // the same address (the pinned host tier beside a GPU tier).
  bool host_device_readable() const { return host_->device_readable(); }

 private:
  friend class PutWriter;
  friend class ReadHandle;

  struct Entry {
    BlockInfo info;
    ModelId model;
    uint64_t bytes = 0;
    void* data = nullptr;        // host copy, or nullptr
    std::optional<GpuSlot> gpu;  // GPU copy
    bool on_disk = false;        // disk copy
    bool gpu_pending = false;    // an upload to the GPU is in flight
    bool demoting = false;       // a host -> disk write is in flight
    int readers = 0;             // read handles and moves in flight holding it
    std::optional<BlockHash> parent;
    std::vector<BlockHash> children;
    std::list<BlockHash>::iterator lru;  // position in lru_ (front = most recent)
  };

  // A block to read from the GPU or disk into a host slot, outside the mutex.
  struct Load {
    size_t index;  // in the handle
    BlockHash hash;
    ModelId model;
    std::optional<GpuSlot> gpu;
    void* slot = nullptr;
    absl::Status status;
  };

  KvCache(Options options, std::unique_ptr<HostTier> host);

  // Brings back what the disk tier holds (models, blocks); drops orphans.
  absl::Status LoadDisk();
  // The limits of a model from the policy, by id or any of its names.
  void ApplyModelLimitsLocked(const RegisteredModel& m) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // Chain hashes of the blocks of `tokens`: the full blocks, and with `partial_tail` a last
  // partial block too.
  static std::vector<BlockHash> ChainHashes(const RegisteredModel& m, absl::string_view tenant,
                                            const BlockHash* parent,
                                            absl::Span<const int32_t> tokens,
                                            bool partial_tail = false);
  // ChainHashes of a prompt's full blocks from its start, through the memo of recent prompts.
  std::vector<BlockHash> PromptHashes(const RegisteredModel& m, absl::string_view tenant,
                                      absl::Span<const int32_t> tokens) {
    return prompt_hashes_.Hashes(m.id, tenant, m.spec.block_tokens, tokens);
  }
  // The block hashes of a segment: chained from its SegmentHash.
  static std::vector<BlockHash> SegmentHashes(const RegisteredModel& m, absl::string_view tenant,
                                              absl::Span<const int32_t> tokens);
  // The entries of the leading hashes present in the index, each looked up once (valid until the
  // index changes: under one hold of mu_).
  std::vector<Entry*> MatchLocked(absl::Span<const BlockHash> hashes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Marks blocks used, last first, so that leaves are older than their prefixes.
  void TouchLocked(absl::Span<Entry* const> entries) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Counts hits and misses of `found` blocks (and one missing block when `missed`).
  void CountRequestsLocked(absl::Span<Entry* const> found, bool missed)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  TierKind FastestTier(const Entry& e) const;

  // Allocates a host slot of `bytes` for `model`, freeing least recently used host copies (the
  // model's own first when it is at its limit). RESOURCE_EXHAUSTED when nothing can be freed.
  absl::StatusOr<void*> AllocateSlot(uint64_t bytes, const ModelId& model) ABSL_LOCKS_EXCLUDED(mu_);
  void FreeHostSlot(void* slot, uint64_t bytes, const ModelId& model)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees at least `bytes` of host copies (of `model` only, when not empty), least recently used
  // first: copies backed by disk are dropped, others demoted to disk (or evicted with no disk
  // tier). Returns the bytes freed.
  uint64_t FreeHost(uint64_t bytes, const ModelId& model) ABSL_LOCKS_EXCLUDED(mu_);
  // Makes room on disk for `bytes` more of `model`, and reserves them in the model's account.
  absl::Status ReserveDisk(uint64_t bytes, const ModelId& model) ABSL_LOCKS_EXCLUDED(mu_);
  // Drops least recently used GPU copies (each backed by a host or disk copy) until their slots
  // add up to `bytes`; returns the bytes.
  uint64_t FreeGpuBytesLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A GPU slot for `bytes`. When the tier is full, the least recently used GPU block that may go
  // makes room: one of that slot size gives its slot; one of another size, its whole chunk (when
  // every block in it may go), which then serves this size. RESOURCE_EXHAUSTED when none can.
  absl::StatusOr<GpuSlot> AllocateGpuSlotLocked(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Uploads the host copies of `hashes` to the GPU (batched), where they fit and are missing.
  void UploadToGpu(absl::Span<const BlockHash> hashes) ABSL_LOCKS_EXCLUDED(mu_);

  // Evicts `hash` and its descendants that are neither pinned nor read, from every tier; returns
  // how many. Disk copies are queued in disk_garbage_ (deleted by CollectGarbage).
  uint32_t EvictTreeLocked(const BlockHash& hash, bool ignore_pins = false)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops one tier's copy of an entry (the entry stays).
  void DropHostCopyLocked(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropGpuCopyLocked(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropDiskCopyLocked(Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Deletes queued disk copies (outside mu_).
  void CollectGarbage() ABSL_LOCKS_EXCLUDED(mu_);
  DiskBlockMeta DiskMetaOf(const Entry& e) const;

  // Commits a finished Put.
  absl::StatusOr<PutResult> CommitPut(PutWriter& writer);
  // Holds blocks hashes[first..) for reading: those of the first `n` present ones (all or none
  // when `all_or_none`), copying in those without a host copy.
  absl::StatusOr<ReadHandle> Acquire(const RegisteredModel& m, absl::Span<const BlockHash> hashes,
                                     bool all_or_none, size_t first = 0);
  void ReleaseRead(absl::Span<const BlockHash> hashes, absl::Span<void* const> temp,
                   uint64_t block_bytes, const ModelId& model);
  // Returns a disk reservation that was not written.
  void UnreserveDiskLocked(uint64_t bytes, const ModelId& model) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Queues the least recently used disk copies (of `model` only, when not empty) for deletion
  // until `bytes` are freed; a block with no other copy is evicted whole. Returns the bytes.
  uint64_t FreeDiskLocked(uint64_t bytes, const ModelId& model) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Registers (or unregisters) disk writes of `hashes`, waiting for deletes of them to finish.
  void BeginDiskWritesLocked(absl::Span<const BlockHash> hashes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EndDiskWritesLocked(absl::Span<const BlockHash> hashes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  static bool HasCopy(const Entry& e) { return e.data != nullptr || e.gpu || e.on_disk; }
  // Whether a Put's new blocks reach the disk before it is acknowledged.
  bool WritesThrough() const {
    return disk_ != nullptr &&
           (options_.policy.write_through || options_.policy.write_tier == WriteTier::kDisk);
  }
  // Whether a block's GPU copy may be dropped: not pinned, read or being uploaded.
  static bool GpuCopyMayGo(const Entry& e) {
    return !e.gpu_pending && e.readers == 0 && !e.info.pinned;
  }
  void WakeMaintenance();
  void MaintenanceLoop();

  const Options options_;  // (its tiers moved into the members below)
  std::unique_ptr<HostTier> host_;
  std::unique_ptr<DiskTier> disk_;
  DiskLoad disk_load_;  // set once, by LoadDisk
  std::unique_ptr<GpuTier> gpu_;
  ModelRegistry models_;
  PrefixHashMemo prompt_hashes_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<BlockHash, Entry> index_ ABSL_GUARDED_BY(mu_);
  std::list<BlockHash> lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<ModelId, uint64_t> blocks_per_model_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<ModelId, uint64_t> host_bytes_per_model_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<ModelId, uint64_t> disk_bytes_per_model_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<ModelId, ModelLimit> limits_ ABSL_GUARDED_BY(mu_);  // by model id
  // Disk copies to delete (queued under mu_, deleted outside it by CollectGarbage). A disk write
  // and a delete of the same block never overlap: writes register in disk_writing_, deletes in
  // disk_deleting_, and each waits for or skips the other.
  std::vector<BlockHash> disk_garbage_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<BlockHash, int> disk_writing_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<BlockHash, int> disk_deleting_ ABSL_GUARDED_BY(mu_);
  uint64_t disk_reserved_ ABSL_GUARDED_BY(mu_) = 0;  // reserved by ReserveDisk, not yet written
  CacheStats stats_ ABSL_GUARDED_BY(mu_);
  TierCounters host_counters_ ABSL_GUARDED_BY(mu_);
  TierCounters gpu_counters_ ABSL_GUARDED_BY(mu_);
  TierCounters disk_counters_ ABSL_GUARDED_BY(mu_);

  // Lock order: mu_, then observers_mu_ (OnBlockDropped runs under both).
  mutable absl::Mutex observers_mu_;
  std::vector<BlockObserver*> observers_ ABSL_GUARDED_BY(observers_mu_);

  absl::Mutex maintenance_mu_;
  bool stop_ ABSL_GUARDED_BY(maintenance_mu_) = false;
  bool wake_ ABSL_GUARDED_BY(maintenance_mu_) = false;
  std::thread maintenance_;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_KV_CACHE_H_
