// The disk tier: blocks and the metadata that makes them findable again, under the data folder,
// so that the cache survives a restart.
//
// Block bytes live in append-only segment files, <path>/segments/<id>.seg (ids in hex, each new
// one above every file there); RocksDB, in <path>, keeps only what finds them, in its "meta"
// column family:
//   "m" + model id -> the model's spec and names;
//   "b" + hash     -> the block's metadata (model, parent, position, rotated_at, rope table,
//                     pre_rope, pinned, size, write sequence) and its place (segment, offset).
// Every metadata value ends with its own XXH3 checksum. A block's record in its segment is a
// 64-byte header (magic, format, payload size, XXH3 of the payload, the block's hash, XXH3 of the
// header) and the payload, padded to 64 bytes. Each byte of a block is written once, by one
// pwritev, where RocksDB values passed through its write-ahead log and then its blob files.
//
// A write reserves its records' places at the end of the segment being filled (writers append
// side by side), writes them, syncs the segment (Durability::kSync), then commits the metadata of
// all its blocks in one RocksDB batch; its records may also be written earlier, while the rest of
// the write arrives (Staging). After a crash each block of the write is found whole or not at
// all: bytes appended without their metadata are dead space, never read. Every read verifies
// the header, size and checksum; a block that does not verify is deleted and reported as
// DATA_LOSS, never returned.
//
// Deleting or rewriting a block only changes its metadata; its old record is dead space. A full
// segment whose live records fall below half of its bytes is compacted by a background thread:
// its live blocks are read (verified), appended again, their metadata moved, and the file
// removed. The segment files therefore hold at most about twice the live bytes, plus the segment
// being filled (Counters().file_bytes).
//
// Data folders of the format before segments (block bytes as values of a RocksDB "blocks" column
// family) are migrated by Load: each block is verified, appended to a segment and its metadata
// rewritten; the column family is dropped at the end.
//
// Durability ("acknowledged"): with Durability::kSync a write returns after its segment bytes
// and RocksDB's write-ahead log are fsync'ed (it survives a power loss); with kMemory both are
// written to the OS but not synced (they survive the daemon's crash or kill -9, not a power loss
// or kernel crash).
//
// Like HostTier, the disk tier stores and accounts; which blocks live here is the cache's choice.
// Capacity counts live block bytes (payloads).
//
// Thread safety: every method is thread-safe.
#ifndef ROPEKV_CACHE_DISK_TIER_H_
#define ROPEKV_CACHE_DISK_TIER_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
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
struct WriteOptions;
}  // namespace rocksdb

namespace ropekv {

// Column family names (tests open the database directly). kDiskBlocksFamily is the format before
// segments, kept for its migration.
inline constexpr char kDiskBlocksFamily[] = "blocks";
inline constexpr char kDiskMetaFamily[] = "meta";
// Bytes before a block's payload in its segment record.
inline constexpr size_t kDiskRecordHeaderBytes = 64;
// Bytes before a block's payload in a "blocks" value of the format before segments.
inline constexpr size_t kDiskLegacyHeaderBytes = 56;

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

// Where a block's record lies: its segment and the offset of its header in that file.
struct DiskPlace {
  uint32_t segment = 0;
  uint64_t offset = 0;
  bool operator==(const DiskPlace& o) const { return segment == o.segment && offset == o.offset; }
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
  // Blocks moved from the format before segments into segments.
  uint64_t migrated_blocks = 0;
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
  uint64_t segments = 0;       // segment files
  uint64_t file_bytes = 0;     // bytes in segment files: live records, dead space, padding
  uint64_t relocated = 0;      // blocks moved by compaction
  uint64_t segment_syncs = 0;  // fdatasync calls on segments before metadata pointed into them
};

class DiskTier {
 private:
  struct Segment;
  struct SegmentState;
  struct Entry;
  struct Append;

 public:
  class Staging;

  struct Options {
    // RocksDB folder; created (with its parents) if missing. Required.
    std::string path;
    // When PutBlocks counts as acknowledged (see the header comment).
    Durability durability = Durability::kSync;
    // Hard limit on live payload bytes; PutBlocks past it is RESOURCE_EXHAUSTED.
    uint64_t capacity_bytes = 64ull << 30;
    // RocksDB block cache for the metadata.
    uint64_t block_cache_bytes = 32ull << 20;
    // A segment file is filled up to this size (a larger record gets a segment of its own).
    // 0: capacity / 256 within [64 MiB, 4 GiB], so that the tier keeps a few hundred files open
    // (each segment holds a descriptor).
    uint64_t segment_bytes = 0;
    // Compact full segments in a background thread (tests turn it off and call Compact).
    bool background_compaction = true;
    // Threads of one ReadBlocks (the caller's among them).
    int read_threads = 4;
    // Threads that write staged records, for every staging at once (started at first use).
    int stage_threads = 4;
  };

  // Opens (or creates) the database. INVALID_ARGUMENT for an empty path or zero capacity;
  // UNAVAILABLE when RocksDB cannot open it (e.g. another process holds its lock); DATA_LOSS
  // when RocksDB reports corruption.
  static absl::StatusOr<std::unique_ptr<DiskTier>> Open(Options options);
  ~DiskTier();
  DiskTier(const DiskTier&) = delete;
  DiskTier& operator=(const DiskTier&) = delete;

  // Scans the metadata: every model, and every block whose record verifies and whose segment
  // holds its place. Records that do not verify are deleted (counted in dropped_records); segment
  // files no block lives in are removed. Migrates blocks of the format before segments. Rebuilds
  // the accounting from what it found and starts the background compaction. Call once, after
  // Open and before other methods.
  absl::StatusOr<DiskContents> Load();

  struct BlockWrite {
    DiskBlockMeta meta;  // meta.bytes = size of data; meta.sequence is assigned here
    const void* data;    // [meta.bytes] the block's bytes
  };
  // Writes blocks (bytes and metadata) atomically: after a crash all of them are there or none.
  // Returns after the write is acknowledged (Options::durability). Rewriting a stored block
  // replaces it. RESOURCE_EXHAUSTED when the new bytes would pass the capacity (nothing is
  // written) or the file system is full; INTERNAL / UNAVAILABLE for I/O and RocksDB errors.
  //
  // With `staged` (from BeginStaging), the records it has written already are used, and only
  // the rest are written here: the bytes of a Put go to disk while the rest of it arrives.
  absl::Status PutBlocks(absl::Span<const BlockWrite> blocks, Staging* staged = nullptr);

  // Records of a write to come, written by the tier's staging threads (Options::stage_threads,
  // shared by every staging) as they are handed over. They are not findable until a PutBlocks
  // given this staging commits them; destroying it without that leaves them as dead space.
  // Under kSync each record's write-back starts at once (sync_file_range), so that the commit's
  // fdatasync has little left to wait for.
  class Staging {
   public:
    ~Staging();
    Staging(const Staging&) = delete;
    Staging& operator=(const Staging&) = delete;
    // Queues the record of block `hash`; `data` ([bytes]) must stay valid and unchanged until
    // the staging is committed or destroyed.
    void Append(const BlockHash& hash, const void* data, uint64_t bytes);

   private:
    friend class DiskTier;
    struct Item {
      BlockHash hash;
      const void* data;
      uint64_t bytes;
    };
    explicit Staging(DiskTier* tier);
    // Writes one record (on a staging thread).
    void Write(const Item& item);
    // Waits until every queued record is written; the first error of any.
    absl::Status Drain();

    DiskTier* const tier_;
    // Under the tier's stage_mu_ (which outlives every staging, so that a staging thread never
    // unlocks a mutex that its staging's owner may already be destroying):
    int pending_ = 0;  // records queued or being written
    absl::Status status_;
    std::vector<DiskTier::Append> written_;  // read by PutBlocks after Drain
    std::vector<BlockHash> written_hashes_;
  };
  std::unique_ptr<Staging> BeginStaging();

  // Reads block `hash` into `dst` ([bytes]), verifying the header, size and checksum.
  // NOT_FOUND when absent; INVALID_ARGUMENT when the stored size is not `bytes`; DATA_LOSS when
  // it does not verify: the block (bytes and metadata) is then deleted, and `dst` may hold
  // garbage that the caller must not use.
  absl::Status ReadBlock(const BlockHash& hash, void* dst, uint64_t bytes);

  struct BlockRead {
    BlockHash hash;
    void* dst;  // [bytes]
    uint64_t bytes;
  };
  // ReadBlock of each of `reads` into statuses[i], on up to Options::read_threads threads at once
  // (a disk serves several reads at a time, and the checksums spread over cores). Once a read
  // fails, the reads after it that have not started are skipped: CANCELLED.
  void ReadBlocks(absl::Span<const BlockRead> reads, absl::Span<absl::Status> statuses);

  // Deletes blocks in one batch; absent ones are ignored. The delete is not synced on its own:
  // the next synced write makes it durable (a block deleted just before a power loss may come
  // back, whole and verified).
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

  // Syncs the segments and flushes RocksDB's memtables (tests and clean shutdown; a crash loses
  // nothing acknowledged anyway).
  absl::Status Flush();

  // Compacts every full segment whose live records are below half of it, now (the background
  // thread does the same on its own). OK when there is nothing to do.
  absl::Status Compact();

  // Where block `hash` is stored (tests damage it there). NOT_FOUND when it is not stored.
  absl::StatusOr<DiskPlace> PlaceOf(const BlockHash& hash) const;
  // The file of segment `id`.
  std::string SegmentPath(uint32_t id) const;

 private:
  DiskTier(Options options, std::unique_ptr<rocksdb::DB> db,
           std::vector<rocksdb::ColumnFamilyHandle*> handles, bool legacy);

  // A block being moved (compaction, migration): its metadata, where it was, its bytes.
  struct Moving {
    DiskBlockMeta meta;
    DiskPlace from;
    std::string payload;
  };

  // Reserves places for records of the given payload sizes at the end of the segment being
  // filled (opening a new one when it is full). Each place stays reserved until ReleaseLocked.
  absl::StatusOr<std::vector<Append>> Reserve(absl::Span<const uint64_t> payloads)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Writes the records of `appends` (payload i at data[i]).
  absl::Status WriteRecords(absl::Span<const Append> appends, absl::Span<const BlockHash> hashes,
                            absl::Span<const void* const> data);
  // Reserve, then WriteRecords; a failed write gives its places up.
  absl::StatusOr<std::vector<Append>> AppendRecords(absl::Span<const uint64_t> payloads,
                                                    absl::Span<const BlockHash> hashes,
                                                    absl::Span<const void* const> data);
  // Under kSync, syncs the segments of `appends`.
  absl::Status SyncSegments(absl::Span<const Append> appends);
  // Points `hash` at the record of `a` (its metadata is written); its old record, if any,
  // becomes dead space.
  void PlaceLocked(const BlockHash& hash, const Append& a, uint64_t sequence)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the accounting of a block's record off (the block leaves it or moves).
  void ForgetLocked(const Entry& e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Ends the reservation of `a`; a record no block points at is dead space.
  void ReleaseLocked(const Append& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Abandon(absl::Span<const Append> appends) ABSL_LOCKS_EXCLUDED(mu_);
  // Removes segment `id` when it is not being filled or written and holds no live record; asks
  // for compaction when its live records are below half of it.
  void RetireOrScheduleLocked(uint32_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Reads the record of `hash` at `offset` of `segment` into dst ([bytes]) and verifies it.
  absl::Status ReadRecord(const Segment& segment, uint64_t offset, const BlockHash& hash, void* dst,
                          uint64_t bytes) const;
  // Deletes a block found corrupt at `place`, unless it was rewritten or deleted since.
  void DropCorrupt(const BlockHash& hash, DiskPlace place) ABSL_LOCKS_EXCLUDED(index_mu_);
  absl::Status DeleteIndexed(absl::Span<const BlockHash> hashes)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(index_mu_);
  // Appends `batch` to the segment being filled and points the blocks there, but for those a
  // Put, delete or UpdateMeta changed since they were read (compaction); `legacy` moves blocks
  // out of the "blocks" family of the format before segments.
  absl::Status MoveBlocks(std::vector<Moving>* batch, bool legacy);
  // Moves the live blocks of segment `id` to the segment being filled.
  absl::Status CompactSegment(uint32_t id);
  // Moves the blocks of the format before segments into segments, then drops their family.
  absl::Status Migrate(std::vector<DiskBlockMeta>* legacy, DiskContents* out);
  void CompactionLoop();
  void StageLoop();
  // Takes a drained staging's written records.
  void TakeStaged(Staging* staging, std::vector<Append>* records, std::vector<BlockHash>* hashes)
      ABSL_LOCKS_EXCLUDED(stage_mu_);
  rocksdb::WriteOptions WriteOpts() const;

  const Options options_;
  const std::string segment_dir_;
  std::unique_ptr<rocksdb::DB> db_;
  rocksdb::ColumnFamilyHandle* meta_cf_ = nullptr;    // owned, destroyed before db_
  rocksdb::ColumnFamilyHandle* legacy_cf_ = nullptr;  // "blocks" of an unmigrated folder
  std::atomic<uint64_t> next_sequence_{1};

  // Serialises metadata writes with the accounting that follows them, so that compaction never
  // moves a block that a Put, delete or UpdateMeta changed meanwhile. Taken before mu_.
  absl::Mutex index_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // One compaction at a time.
  absl::Mutex compact_mu_ ABSL_ACQUIRED_BEFORE(index_mu_);

  mutable absl::Mutex mu_;
  absl::flat_hash_map<BlockHash, Entry> blocks_ ABSL_GUARDED_BY(mu_);
  std::map<uint32_t, SegmentState> segments_ ABSL_GUARDED_BY(mu_);
  uint32_t filling_ ABSL_GUARDED_BY(mu_) = 0;  // segment being filled; 0: none yet
  uint32_t next_segment_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // writes in flight
  DiskCounters counters_ ABSL_GUARDED_BY(mu_);
  bool compaction_wanted_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread compactor_;

  absl::Mutex stage_mu_;
  std::vector<std::pair<Staging*, Staging::Item>> stage_queue_ ABSL_GUARDED_BY(stage_mu_);
  size_t stage_next_ ABSL_GUARDED_BY(stage_mu_) = 0;  // first queued item not taken yet
  bool stage_stopping_ ABSL_GUARDED_BY(stage_mu_) = false;
  std::vector<std::thread> stagers_ ABSL_GUARDED_BY(stage_mu_);
};

// Binary encodings of the metadata records (exposed for tests). A block's record with a place
// has format 2; without one, format 1 (before segments: tests write such folders to check their
// migration). Decode returns DATA_LOSS for anything that does not parse or whose trailing
// checksum does not match, and the place for format 2.
std::string EncodeDiskBlockMeta(const DiskBlockMeta& meta,
                                std::optional<DiskPlace> place = std::nullopt);
absl::StatusOr<DiskBlockMeta> DecodeDiskBlockMeta(absl::string_view data,
                                                  std::optional<DiskPlace>* place = nullptr);
std::string EncodeDiskModelMeta(const DiskModelMeta& model);
absl::StatusOr<DiskModelMeta> DecodeDiskModelMeta(absl::string_view data);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_DISK_TIER_H_
