// KvCache: the storage engine behind the service. It owns the model registry, the host tier and
// the prefix index, and implements the verbs of DESIGN.md on domain types (no gRPC here).
//
// Prefix blocks are addressed by chained SHA-256 hashes (cache/hash.h). Lookup walks the chain of
// a prompt's full blocks and stops at the first miss: the longest cached prefix. Blocks are
// evicted least-recently-used first; a use touches a chain from its last block to its first, so
// leaves go before the prefixes they hang off. Pinned blocks and blocks being read are never
// evicted. Evicting a block also evicts the blocks chained after it (they would be unreachable).
//
// Writes are atomic per Put: bytes go into freshly allocated slots, and the blocks become
// visible only when the whole Put is complete (PutWriter::Finish); a failed or abandoned Put frees
// its slots and leaves the index as it was.
//
// Thread safety: every method is thread-safe. Lock order: KvCache::mu_, then HostTier's.
#ifndef ROPEKV_CACHE_KV_CACHE_H_
#define ROPEKV_CACHE_KV_CACHE_H_

#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "cache/hash.h"
#include "cache/host_tier.h"
#include "cache/model.h"
#include "cache/model_registry.h"

namespace ropekv {

enum class TierKind : uint8_t { kGpu = 1, kHost = 2, kDisk = 3 };

// What the cache knows of a stored block.
struct BlockInfo {
  BlockHash hash;
  TierKind tier = TierKind::kHost;
  int64_t position = 0;    // logical position of its first token in its prefix
  int64_t rotated_at = 0;  // position its first token's key was rotated at
  RopeTableId rope_table = 0;
  bool pre_rope = false;
  bool pinned = false;
};

struct TierCounters {
  TierKind tier = TierKind::kHost;
  uint64_t bytes_used = 0;
  uint64_t capacity_bytes = 0;
  uint64_t blocks = 0;
  uint64_t pinned_blocks = 0;
  uint64_t hits = 0;       // blocks found by lookups and reads
  uint64_t misses = 0;     // lookups and reads that stopped at a missing block
  uint64_t evictions = 0;  // blocks evicted
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
};

class KvCache;

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
  uint32_t tokens_ = 0;
};

class KvCache {
 public:
  struct Options {
    uint64_t host_capacity_bytes = 2ull << 30;  // host tier capacity
    uint64_t max_block_bytes = 64ull << 20;     // a model whose block is larger is refused
    std::unique_ptr<Allocator> host_allocator;  // default: aligned memory
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
  // that are not a positive multiple of block_tokens.
  absl::StatusOr<std::unique_ptr<PutWriter>> BeginPut(PutOptions options);

  // The longest cached prefix of `tokens`. NOT_FOUND for an unknown model.
  absl::StatusOr<LookupResult> Lookup(absl::string_view model, absl::string_view tenant,
                                      absl::Span<const int32_t> tokens);

  // Holds the longest cached prefix of `tokens` (at most max_blocks blocks; 0 = all) for reading.
  absl::StatusOr<ReadHandle> AcquirePrefix(absl::string_view model, absl::string_view tenant,
                                           absl::Span<const int32_t> tokens, uint32_t max_blocks);

  // Holds the segment of exactly `tokens` for reading; NOT_FOUND when it is not (fully) cached.
  absl::StatusOr<ReadHandle> AcquireSegment(absl::string_view model, absl::string_view tenant,
                                            absl::Span<const int32_t> tokens);
  // Whether the segment of exactly `tokens` is cached: matched_tokens is its length or 0.
  absl::StatusOr<LookupResult> LookupSegment(absl::string_view model, absl::string_view tenant,
                                             absl::Span<const int32_t> tokens);

  // Evicts the cached prefix blocks of `tokens` (and what is chained after them); with no tokens
  // every block of the model. Pinned blocks and blocks being read stay. Returns the count.
  absl::StatusOr<uint32_t> Evict(absl::string_view model, absl::string_view tenant,
                                 absl::Span<const int32_t> tokens);

  // Pins (or unpins) the cached prefix blocks of `tokens`. Returns how many blocks were set.
  absl::StatusOr<uint32_t> Pin(absl::string_view model, absl::string_view tenant,
                               absl::Span<const int32_t> tokens, bool pin);

  CacheStats Stats() const;

 private:
  friend class PutWriter;
  friend class ReadHandle;

  struct Entry {
    BlockInfo info;
    ModelId model;
    uint64_t bytes = 0;
    void* data = nullptr;
    int readers = 0;
    std::optional<BlockHash> parent;
    std::vector<BlockHash> children;
    std::list<BlockHash>::iterator lru;  // position in lru_ (front = most recent)
  };

  KvCache(Options options, std::unique_ptr<HostTier> host);

  // Chain hashes of the blocks of `tokens`: the full blocks, and with `partial_tail` a last
  // partial block too.
  static std::vector<BlockHash> ChainHashes(const RegisteredModel& m, absl::string_view tenant,
                                            const BlockHash* parent,
                                            absl::Span<const int32_t> tokens,
                                            bool partial_tail = false);
  // The block hashes of a segment: chained from its SegmentHash.
  static std::vector<BlockHash> SegmentHashes(const RegisteredModel& m, absl::string_view tenant,
                                              absl::Span<const int32_t> tokens);
  // Number of leading hashes present in the index.
  size_t MatchLocked(absl::Span<const BlockHash> hashes) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Marks blocks used, last first, so that leaves are older than their prefixes.
  void TouchLocked(absl::Span<const BlockHash> hashes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Allocates a host slot, evicting LRU blocks as needed.
  absl::StatusOr<void*> AllocateSlot(uint64_t bytes);
  // Evicts `hash` and its descendants that are neither pinned nor read; returns how many.
  uint32_t EvictTreeLocked(const BlockHash& hash) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Commits a finished Put.
  absl::StatusOr<PutResult> CommitPut(PutWriter& writer);
  void ReleaseRead(absl::Span<const BlockHash> hashes);

  const Options options_;
  std::unique_ptr<HostTier> host_;
  ModelRegistry models_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<BlockHash, Entry> index_ ABSL_GUARDED_BY(mu_);
  std::list<BlockHash> lru_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<ModelId, uint64_t> blocks_per_model_ ABSL_GUARDED_BY(mu_);
  CacheStats stats_ ABSL_GUARDED_BY(mu_);
  TierCounters host_counters_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_KV_CACHE_H_
