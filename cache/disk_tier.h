// The disk tier: blocks and the metadata that makes them findable again, in RocksDB under the
// data folder, so that the cache survives a restart.
//
// Two column families:
//   "blocks": key = the block's 32-byte hash; value = a 56-byte header (magic, format version,
//             payload size, XXH3 checksum of the payload, the block's hash again) followed by
//             the block's bytes. Values are large, so they live in RocksDB's blob files (keys
//             stay in the LSM tree).
//   "meta":   "m" + model id -> the model's spec and names; "b" + hash -> the block's metadata
//             (model, parent, position, rotated_at, rope table, pre_rope, pinned, size, write
//             sequence). Every metadata value ends with its own XXH3 checksum.
// A block's value and its metadata are written in one WriteBatch, so after a crash either both
// are there or neither: a partial block is never visible. Every read verifies the block's size
// and checksum; a block that does not verify is deleted and reported as DATA_LOSS, never
// returned.
//
// Durability ("acknowledged"): with Durability::kSync a write returns after RocksDB's write-ahead
// log is fsync'ed (it survives a power loss); with kMemory the WAL is written to the OS but not
// synced (it survives the daemon's crash or kill -9, not a power loss or kernel crash).
//
// Like HostTier, the disk tier stores and accounts; which blocks live here is the cache's choice.
// Capacity counts live block bytes (payloads). RocksDB's files can hold more for a while: deleted
// values are reclaimed by blob garbage collection during compaction.
//
// Thread safety: every method is thread-safe (RocksDB is; accounting is under a mutex).
#ifndef ROPEKV_CACHE_DISK_TIER_H_
#define ROPEKV_CACHE_DISK_TIER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "cache/hash.h"
#include "cache/model.h"

namespace rocksdb {
class ColumnFamilyHandle;
class DB;
}  // namespace rocksdb

namespace ropekv {

// Column family names (tests open the database directly to corrupt values).
inline constexpr char kDiskBlocksFamily[] = "blocks";
inline constexpr char kDiskMetaFamily[] = "meta";
// Bytes before a block's payload in a "blocks" value.
inline constexpr size_t kDiskBlockHeaderBytes = 56;

// When a write counts as acknowledged.
enum class Durability : uint8_t {
  kSync = 0,    // WAL fsync'ed before the write returns
  kMemory = 1,  // WAL written (OS page cache), not fsync'ed
};
// "sync" or "memory"; INVALID_ARGUMENT otherwise.
absl::StatusOr<Durability> ParseDurability(absl::string_view text);
const char* DurabilityName(Durability d);

// What the disk keeps about a block besides its bytes.
struct DiskBlockMeta {
  BlockHash hash;
  ModelId model;
  std::optional<BlockHash> parent;  // previous block of its chain; none for a chain's first
  int64_t position = 0;             // logical position of its first token
  int64_t rotated_at = 0;           // position its first key was rotated at
  RopeTableId rope_table = 0;
  bool pre_rope = false;
  bool pinned = false;
  uint64_t bytes = 0;     // payload size
  uint64_t sequence = 0;  // write order, assigned by PutBlocks (LRU order after a restart)
};

// A model as the disk keeps it, so that it is registered again after a restart.
struct DiskModelMeta {
  ModelId id;
  ModelSpec spec;
  std::vector<std::string> names;
};

// Everything DiskTier::Load found.
struct DiskContents {
  std::vector<DiskModelMeta> models;
  std::vector<DiskBlockMeta> blocks;  // in write order (sequence ascending)
  // Records deleted because they did not parse or verify, or whose block bytes were missing.
  uint64_t dropped_records = 0;
};

// Counters of the disk tier since it was opened.
struct DiskCounters {
  uint64_t blocks = 0;
  uint64_t bytes_used = 0;
  uint64_t capacity_bytes = 0;
  uint64_t reads = 0;          // blocks read (verified or not)
  uint64_t writes = 0;         // blocks written
  uint64_t bytes_read = 0;     // payload bytes read
  uint64_t bytes_written = 0;  // payload bytes written
  uint64_t corrupt = 0;        // blocks that failed verification (and were deleted)
};

class DiskTier {
 public:
  struct Options {
    // RocksDB folder; created (with its parents) if missing. Required.
    std::string path;
    // When PutBlocks counts as acknowledged (see the header comment).
    Durability durability = Durability::kSync;
    // Hard limit on live payload bytes; PutBlocks past it is RESOURCE_EXHAUSTED.
    uint64_t capacity_bytes = 64ull << 30;
    // RocksDB block cache for the metadata and keys (block bytes are not cached by RocksDB: the
    // host tier is their cache).
    uint64_t block_cache_bytes = 32ull << 20;
  };

  // Opens (or creates) the database. INVALID_ARGUMENT for an empty path or zero capacity;
  // UNAVAILABLE when RocksDB cannot open it (e.g. another process holds its lock); DATA_LOSS
  // when RocksDB reports corruption.
  static absl::StatusOr<std::unique_ptr<DiskTier>> Open(Options options);
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // Scans the metadata: every model, and every block whose record verifies and whose value
  // exists. Records that do not verify are deleted (counted in dropped_records). Rebuilds the
  // accounting from what it found. Call once, after Open and before other methods.
  absl::StatusOr<DiskContents> Load();

  struct BlockWrite {
    DiskBlockMeta meta;  // meta.bytes = size of data; meta.sequence is assigned here
    const void* data;    // [meta.bytes] the block's bytes
  };
  // Writes blocks (bytes and metadata) atomically: after a crash all of them are there or none.
  // Returns after the write is acknowledged (Options::durability). Rewriting a stored block
  // replaces it. RESOURCE_EXHAUSTED when the new bytes would pass the capacity (nothing is
  // written); INTERNAL / UNAVAILABLE for RocksDB errors.
  absl::Status PutBlocks(absl::Span<const BlockWrite> blocks);

  // Reads block `hash` into `dst` ([bytes]), verifying the header, size and checksum.
  // NOT_FOUND when absent; INVALID_ARGUMENT when the stored size is not `bytes`; DATA_LOSS when
  // it does not verify: the block (bytes and metadata) is then deleted, and `dst` may hold
  // garbage that the caller must not use.
  absl::Status ReadBlock(const BlockHash& hash, void* dst, uint64_t bytes);

  // Deletes blocks (bytes and metadata) in one batch; absent ones are ignored.
  absl::Status DeleteBlocks(absl::Span<const BlockHash> hashes);

  // Rewrites a stored block's metadata (e.g. its pinned flag). NOT_FOUND when it is not stored.
  absl::Status UpdateMeta(const DiskBlockMeta& meta);

  // Stores a model so that it is registered again after a restart (idempotent).
  absl::Status PutModel(const DiskModelMeta& model);

  // Whether the block is stored (and counted).
  bool Contains(const BlockHash& hash) const;
  // Whether `bytes` more payload bytes would fit now.
  bool Fits(uint64_t bytes) const;
  uint64_t used_bytes() const;
  uint64_t capacity_bytes() const { return options_.capacity_bytes; }
  Durability durability() const { return options_.durability; }
  const std::string& path() const { return options_.path; }
  DiskCounters Counters() const;

  // Flushes memtables (tests and clean shutdown; a crash loses nothing acknowledged anyway).
  absl::Status Flush();

 private:
  DiskTier(Options options, std::unique_ptr<rocksdb::DB> db,
           std::vector<rocksdb::ColumnFamilyHandle*> handles);

  // Deletes a block found corrupt and forgets it.
  void DropCorrupt(const BlockHash& hash);

  const Options options_;
  std::unique_ptr<rocksdb::DB> db_;
  rocksdb::ColumnFamilyHandle* blocks_cf_ = nullptr;  // owned, destroyed before db_
  rocksdb::ColumnFamilyHandle* meta_cf_ = nullptr;    // owned, destroyed before db_
  std::atomic<uint64_t> next_sequence_{1};

  mutable absl::Mutex mu_;
  absl::flat_hash_map<BlockHash, uint64_t> sizes_ ABSL_GUARDED_BY(mu_);  // stored blocks
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // writes in flight
  DiskCounters counters_ ABSL_GUARDED_BY(mu_);
};

// Binary encodings of the metadata records (exposed for tests). Decode returns DATA_LOSS for
// anything that does not parse or whose trailing checksum does not match.
std::string EncodeDiskBlockMeta(const DiskBlockMeta& meta);
absl::StatusOr<DiskBlockMeta> DecodeDiskBlockMeta(absl::string_view data);
std::string EncodeDiskModelMeta(const DiskModelMeta& model);
absl::StatusOr<DiskModelMeta> DecodeDiskModelMeta(absl::string_view data);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_DISK_TIER_H_
