#include "cache/disk_tier.h"

#include <algorithm>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "rocksdb/cache.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"

namespace ropekv {
namespace {

constexpr uint32_t kBlockMagic = 0x42564b52;  // "RKVB" little-endian
constexpr uint32_t kBlockFormat = 1;
constexpr uint8_t kBlockMetaFormat = 1;
constexpr uint8_t kModelMetaFormat = 1;
constexpr char kBlockMetaPrefix = 'b';
constexpr char kModelMetaPrefix = 'm';

// The one place where RocksDB statuses become absl::Status.
absl::Status FromRocks(const rocksdb::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  const std::string msg = absl::StrCat("disk tier: ", what, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(msg);
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(msg);
  if (s.IsIOError() || s.IsBusy() || s.IsTimedOut() || s.IsTryAgain()) {
    return absl::UnavailableError(msg);
  }
  if (s.IsNoSpace() || s.IsMemoryLimit()) return absl::ResourceExhaustedError(msg);
  return absl::InternalError(msg);
}

rocksdb::Slice ToSlice(absl::string_view s) { return rocksdb::Slice(s.data(), s.size()); }

std::string BlockKey(const BlockHash& h) { return h.Raw(); }
std::string BlockMetaKey(const BlockHash& h) {
  return absl::StrCat(std::string(1, kBlockMetaPrefix), h.Raw());
}
std::string ModelMetaKey(const ModelId& id) {
  return absl::StrCat(std::string(1, kModelMetaPrefix), id);
}

// Little-endian fixed-width encoding with length-prefixed strings.
class Writer {
 public:
  void U8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void U32(uint32_t v) { Fixed(v, 4); }
  void U64(uint64_t v) { Fixed(v, 8); }
  void I64(int64_t v) { Fixed(static_cast<uint64_t>(v), 8); }
  void F64(double v) {
    uint64_t bits;
    std::memcpy(&bits, &v, 8);
    Fixed(bits, 8);
  }
  void Str(absl::string_view s) {
    U32(static_cast<uint32_t>(s.size()));
    out_.append(s.data(), s.size());
  }
  // Appends the XXH3 of everything so far and returns the record.
  std::string Seal() {
    U64(BlockChecksum(out_.data(), out_.size()));
    return std::move(out_);
  }

 private:
  void Fixed(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out_.push_back(static_cast<char>(v >> (8 * i)));
  }
  std::string out_;
};

class Reader {
 public:
  // Verifies and strips the trailing checksum; ok() is false when it does not match.
  explicit Reader(absl::string_view data) {
    if (data.size() < 8) {
      ok_ = false;
      return;
    }
    data_ = data.substr(0, data.size() - 8);
    uint64_t stored = 0;
    for (int i = 0; i < 8; ++i) {
      stored |= uint64_t{static_cast<uint8_t>(data[data.size() - 8 + i])} << (8 * i);
    }
    ok_ = stored == BlockChecksum(data_.data(), data_.size());
  }
  uint8_t U8() { return static_cast<uint8_t>(Fixed(1)); }
  uint32_t U32() { return static_cast<uint32_t>(Fixed(4)); }
  uint64_t U64() { return Fixed(8); }
  int64_t I64() { return static_cast<int64_t>(Fixed(8)); }
  double F64() {
    const uint64_t bits = Fixed(8);
    double v;
    std::memcpy(&v, &bits, 8);
    return v;
  }
  std::string Str() {
    const uint32_t n = U32();
    if (!ok_ || n > data_.size()) {
      ok_ = false;
      return "";
    }
    std::string s(data_.substr(0, n));
    data_.remove_prefix(n);
    return s;
  }
  bool ok() const { return ok_; }
  bool done() const { return ok_ && data_.empty(); }

 private:
  uint64_t Fixed(int n) {
    if (!ok_ || data_.size() < static_cast<size_t>(n)) {
      ok_ = false;
      return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t{static_cast<uint8_t>(data_[i])} << (8 * i);
    data_.remove_prefix(n);
    return v;
  }
  absl::string_view data_;
  bool ok_ = true;
};

// The header of a "blocks" value: magic, format, payload size, payload checksum, and the block's
// own hash, so that a value found under another key is detected.
void PutHeader(char* out, const BlockHash& hash, uint64_t size, uint64_t checksum) {
  auto put = [out](int at, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) out[at + i] = static_cast<char>(v >> (8 * i));
  };
  put(0, kBlockMagic, 4);
  put(4, kBlockFormat, 4);
  put(8, size, 8);
  put(16, checksum, 8);
  std::memcpy(out + 24, hash.bytes.data(), hash.bytes.size());
}

}  // namespace

absl::StatusOr<Durability> ParseDurability(absl::string_view text) {
  if (text == "sync") return Durability::kSync;
  if (text == "memory") return Durability::kMemory;
  return absl::InvalidArgumentError(
      absl::StrCat("durability must be \"sync\" or \"memory\", got \"", text, "\""));
}

const char* DurabilityName(Durability d) { return d == Durability::kSync ? "sync" : "memory"; }

std::string EncodeDiskBlockMeta(const DiskBlockMeta& m) {
  Writer w;
  w.U8(kBlockMetaFormat);
  w.Str(m.hash.Raw());
  w.Str(m.model);
  w.U8(m.parent.has_value() ? 1 : 0);
  w.Str(m.parent.has_value() ? m.parent->Raw() : std::string());
  w.I64(m.position);
  w.I64(m.rotated_at);
  w.I64(m.rope_table);
  w.U8(m.pre_rope ? 1 : 0);
  w.U8(m.pinned ? 1 : 0);
  w.U64(m.bytes);
  w.U64(m.sequence);
  return w.Seal();
}

absl::StatusOr<DiskBlockMeta> DecodeDiskBlockMeta(absl::string_view data) {
  Reader r(data);
  DiskBlockMeta m;
  const uint8_t format = r.U8();
  if (r.ok() && format != kBlockMetaFormat) {
    return absl::DataLossError(
        absl::StrCat("block metadata has format ", format, ", expected ", kBlockMetaFormat));
  }
  auto hash = BlockHash::FromRaw(r.Str());
  m.model = r.Str();
  const bool has_parent = r.U8() != 0;
  const std::string parent = r.Str();
  m.position = r.I64();
  m.rotated_at = r.I64();
  m.rope_table = r.I64();
  m.pre_rope = r.U8() != 0;
  m.pinned = r.U8() != 0;
  m.bytes = r.U64();
  m.sequence = r.U64();
  if (!r.done() || !hash.ok()) {
    return absl::DataLossError(absl::StrCat("block metadata of ", data.size(),
                                            " bytes does not parse or fails its checksum"));
  }
  m.hash = *hash;
  if (has_parent) {
    auto p = BlockHash::FromRaw(parent);
    if (!p.ok()) return absl::DataLossError("block metadata has a malformed parent hash");
    m.parent = *p;
  }
  return m;
}

std::string EncodeDiskModelMeta(const DiskModelMeta& model) {
  const ModelSpec& s = model.spec;
  const RopeSpec& r = s.rope;
  Writer w;
  w.U8(kModelMetaFormat);
  w.Str(model.id);
  w.U32(static_cast<uint32_t>(s.layers));
  w.U32(static_cast<uint32_t>(s.kv_heads));
  w.U32(static_cast<uint32_t>(s.head_dim));
  w.U8(static_cast<uint8_t>(s.dtype));
  w.U32(static_cast<uint32_t>(s.block_tokens));
  w.U8(static_cast<uint8_t>(r.type));
  w.F64(r.theta);
  w.U32(static_cast<uint32_t>(r.head_dim));
  w.U32(static_cast<uint32_t>(r.rotary_dim));
  w.U8(static_cast<uint8_t>(r.layout));
  w.F64(r.factor);
  w.I64(r.max_position_embeddings);
  w.I64(r.original_max_position_embeddings);
  w.F64(r.low_freq_factor);
  w.F64(r.high_freq_factor);
  w.F64(r.beta_fast);
  w.F64(r.beta_slow);
  w.F64(r.mscale);
  w.F64(r.mscale_all_dim);
  w.U8(r.truncate ? 1 : 0);
  w.F64(r.attention_factor);
  w.U32(static_cast<uint32_t>(r.short_factor.size()));
  for (double f : r.short_factor) w.F64(f);
  w.U32(static_cast<uint32_t>(r.long_factor.size()));
  for (double f : r.long_factor) w.F64(f);
  w.U32(static_cast<uint32_t>(model.names.size()));
  for (const std::string& n : model.names) w.Str(n);
  return w.Seal();
}

absl::StatusOr<DiskModelMeta> DecodeDiskModelMeta(absl::string_view data) {
  Reader r(data);
  const uint8_t format = r.U8();
  if (r.ok() && format != kModelMetaFormat) {
    return absl::DataLossError(
        absl::StrCat("model metadata has format ", format, ", expected ", kModelMetaFormat));
  }
  DiskModelMeta m;
  ModelSpec& s = m.spec;
  RopeSpec& rope = s.rope;
  m.id = r.Str();
  s.layers = static_cast<int>(r.U32());
  s.kv_heads = static_cast<int>(r.U32());
  s.head_dim = static_cast<int>(r.U32());
  const uint8_t dtype = r.U8();
  s.block_tokens = static_cast<int>(r.U32());
  const uint8_t type = r.U8();
  rope.theta = r.F64();
  rope.head_dim = static_cast<int>(r.U32());
  rope.rotary_dim = static_cast<int>(r.U32());
  const uint8_t layout = r.U8();
  rope.factor = r.F64();
  rope.max_position_embeddings = r.I64();
  rope.original_max_position_embeddings = r.I64();
  rope.low_freq_factor = r.F64();
  rope.high_freq_factor = r.F64();
  rope.beta_fast = r.F64();
  rope.beta_slow = r.F64();
  rope.mscale = r.F64();
  rope.mscale_all_dim = r.F64();
  rope.truncate = r.U8() != 0;
  rope.attention_factor = r.F64();
  // Counts are bounded by what is left, so garbage cannot make us allocate without limit.
  const uint32_t n_short = r.U32();
  for (uint32_t i = 0; i < n_short && r.ok(); ++i) rope.short_factor.push_back(r.F64());
  const uint32_t n_long = r.U32();
  for (uint32_t i = 0; i < n_long && r.ok(); ++i) rope.long_factor.push_back(r.F64());
  const uint32_t n_names = r.U32();
  for (uint32_t i = 0; i < n_names && r.ok(); ++i) m.names.push_back(r.Str());
  if (!r.done() || dtype > static_cast<uint8_t>(DType::kBF16) ||
      type > static_cast<uint8_t>(RopeType::kLongRope) ||
      layout > static_cast<uint8_t>(PairLayout::kGptj)) {
    return absl::DataLossError(absl::StrCat("model metadata of ", data.size(),
                                            " bytes does not parse or fails its checksum"));
  }
  s.dtype = static_cast<DType>(dtype);
  rope.type = static_cast<RopeType>(type);
  rope.layout = static_cast<PairLayout>(layout);
  if (auto st = ValidateModelSpec(s); !st.ok()) {
    return absl::DataLossError(absl::StrCat("stored model ", m.id, " is invalid: ", st.message()));
  }
  if (ModelIdOf(s) != m.id) {
    return absl::DataLossError(
        absl::StrCat("stored model ", m.id, " has a spec whose id is ", ModelIdOf(s)));
  }
  return m;
}

// ---------------------------------------------------------------------------------------------
// DiskTier

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(Options options) {
  if (options.path.empty()) {
    return absl::InvalidArgumentError("disk tier: a path is required, got an empty one");
  }
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("disk tier capacity must be positive, got 0");
  }
  std::error_code ec;
  std::filesystem::create_directories(options.path, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("disk tier: cannot create ", options.path, ": ", ec.message()));
  }

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.max_background_jobs = 2;
  // Bound the WAL: large values pass through it before they reach blob files.
  db_options.max_total_wal_size = 512ull << 20;

  rocksdb::BlockBasedTableOptions table;
  table.block_cache = rocksdb::NewLRUCache(options.block_cache_bytes);

  rocksdb::ColumnFamilyOptions meta_options;
  meta_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));

  // Block bytes: values in blob files (written once at flush, not rewritten by compaction),
  // uncompressed (KV caches do not compress), garbage collected as blocks are deleted.
  rocksdb::ColumnFamilyOptions blocks_options;
  blocks_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));
  blocks_options.write_buffer_size = 64ull << 20;
  blocks_options.compression = rocksdb::kNoCompression;
  blocks_options.enable_blob_files = true;
  blocks_options.min_blob_size = 4096;
  blocks_options.blob_file_size = 256ull << 20;
  blocks_options.blob_compression_type = rocksdb::kNoCompression;
  blocks_options.enable_blob_garbage_collection = true;
  blocks_options.blob_garbage_collection_age_cutoff = 0.5;

  std::vector<rocksdb::ColumnFamilyDescriptor> families = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {kDiskBlocksFamily, blocks_options},
      {kDiskMetaFamily, meta_options}};
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, options.path, families, &handles, &raw);
  if (!s.ok()) {
    absl::Status st = FromRocks(s, absl::StrCat("open ", options.path));
    if (absl::IsInternal(st)) return absl::UnavailableError(st.message());
    return st;
  }
  return std::unique_ptr<DiskTier>(
      new DiskTier(std::move(options), std::unique_ptr<rocksdb::DB>(raw), std::move(handles)));
}

DiskTier::DiskTier(Options options, std::unique_ptr<rocksdb::DB> db,
                   std::vector<rocksdb::ColumnFamilyHandle*> handles)
    : options_(std::move(options)), db_(std::move(db)) {
  // handles[0] is the default family, which we do not use.
  db_->DestroyColumnFamilyHandle(handles[0]);
  blocks_cf_ = handles[1];
  meta_cf_ = handles[2];
  counters_.capacity_bytes = options_.capacity_bytes;
}

DiskTier::~DiskTier() {
  db_->DestroyColumnFamilyHandle(blocks_cf_);
  db_->DestroyColumnFamilyHandle(meta_cf_);
  db_->Close().PermitUncheckedError();
}

absl::StatusOr<DiskContents> DiskTier::Load() {
  DiskContents out;
  std::vector<std::string> bad_keys;
  {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions(), meta_cf_));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      const rocksdb::Slice key = it->key();
      const absl::string_view value(it->value().data(), it->value().size());
      if (key.size() > 0 && key[0] == kModelMetaPrefix) {
        auto m = DecodeDiskModelMeta(value);
        if (m.ok() && key.ToString().substr(1) == m->id) {
          out.models.push_back(*std::move(m));
        } else {
          bad_keys.push_back(key.ToString());
        }
      } else if (key.size() == 33 && key[0] == kBlockMetaPrefix) {
        auto m = DecodeDiskBlockMeta(value);
        if (m.ok() && m->hash.Raw() == key.ToString().substr(1)) {
          out.blocks.push_back(*std::move(m));
        } else {
          bad_keys.push_back(key.ToString());
        }
      } else {
        bad_keys.push_back(key.ToString());
      }
    }
    if (auto st = FromRocks(it->status(), "scan metadata"); !st.ok()) return st;
  }
  // Values are not read here (that would read every block): a missing or damaged value is
  // found by its first ReadBlock, which verifies it and drops the block. Atomic batches mean
  // that only a damaged database can have a record without its value.
  rocksdb::WriteBatch drop;
  for (const std::string& k : bad_keys) {
    drop.Delete(meta_cf_, k).PermitUncheckedError();
    ++out.dropped_records;
  }
  if (drop.Count() > 0) {
    rocksdb::WriteOptions wo;
    wo.sync = options_.durability == Durability::kSync;
    if (auto st = FromRocks(db_->Write(wo, &drop), "drop bad records"); !st.ok()) return st;
  }
  std::sort(out.blocks.begin(), out.blocks.end(),
            [](const DiskBlockMeta& a, const DiskBlockMeta& b) { return a.sequence < b.sequence; });
  uint64_t max_seq = 0;
  absl::MutexLock lock(&mu_);
  sizes_.clear();
  used_bytes_ = 0;
  for (const DiskBlockMeta& m : out.blocks) {
    sizes_[m.hash] = m.bytes;
    used_bytes_ += m.bytes;
    max_seq = std::max(max_seq, m.sequence);
  }
  next_sequence_ = max_seq + 1;
  return out;
}

absl::Status DiskTier::PutBlocks(absl::Span<const BlockWrite> blocks) {
  if (blocks.empty()) return absl::OkStatus();
  uint64_t total = 0;
  for (const BlockWrite& b : blocks) total += b.meta.bytes;
  {
    absl::MutexLock lock(&mu_);
    uint64_t fresh = 0;  // bytes of blocks not stored yet (rewrites do not grow usage)
    for (const BlockWrite& b : blocks) {
      if (!sizes_.contains(b.meta.hash)) fresh += b.meta.bytes;
    }
    if (used_bytes_ + reserved_bytes_ + fresh > options_.capacity_bytes) {
      return absl::ResourceExhaustedError(
          absl::StrCat("disk tier full: ", used_bytes_ + reserved_bytes_, " of ",
                       options_.capacity_bytes, " bytes used, the write needs ", fresh));
    }
    reserved_bytes_ += fresh;
    total = fresh;
  }
  rocksdb::WriteBatch batch;
  std::string value;
  std::vector<uint64_t> sequences;
  for (const BlockWrite& b : blocks) {
    value.resize(kDiskBlockHeaderBytes + b.meta.bytes);
    std::memcpy(value.data() + kDiskBlockHeaderBytes, b.data, b.meta.bytes);
    PutHeader(value.data(), b.meta.hash, b.meta.bytes, BlockChecksum(b.data, b.meta.bytes));
    DiskBlockMeta meta = b.meta;
    meta.sequence = next_sequence_.fetch_add(1);
    rocksdb::Status s = batch.Put(blocks_cf_, BlockKey(meta.hash), ToSlice(value));
    if (s.ok()) s = batch.Put(meta_cf_, BlockMetaKey(meta.hash), EncodeDiskBlockMeta(meta));
    if (!s.ok()) {
      absl::MutexLock lock(&mu_);
      reserved_bytes_ -= total;
      return FromRocks(s, "build write batch");
    }
  }
  rocksdb::WriteOptions wo;
  wo.sync = options_.durability == Durability::kSync;
  rocksdb::Status s = db_->Write(wo, &batch);
  absl::MutexLock lock(&mu_);
  reserved_bytes_ -= total;
  if (!s.ok()) return FromRocks(s, absl::StrCat("write ", blocks.size(), " blocks"));
  for (const BlockWrite& b : blocks) {
    auto [it, inserted] = sizes_.try_emplace(b.meta.hash, b.meta.bytes);
    if (inserted) {
      used_bytes_ += b.meta.bytes;
    } else if (it->second != b.meta.bytes) {
      used_bytes_ = used_bytes_ - it->second + b.meta.bytes;
      it->second = b.meta.bytes;
    }
    ++counters_.writes;
    counters_.bytes_written += b.meta.bytes;
  }
  return absl::OkStatus();
}

absl::Status DiskTier::ReadBlock(const BlockHash& hash, void* dst, uint64_t bytes) {
  rocksdb::PinnableSlice value;
  rocksdb::ReadOptions ro;
  // Our XXH3 over the payload is the end-to-end check; RocksDB's CRC32c of the same bytes would
  // only add a slower pass (Debian's librocksdb computes CRC32c in software).
  ro.verify_checksums = false;
  ro.fill_cache = false;
  rocksdb::Status s = db_->Get(ro, blocks_cf_, BlockKey(hash), &value);
  if (s.IsNotFound()) {
    return absl::NotFoundError(absl::StrCat("block ", hash.Hex(), " is not on disk"));
  }
  if (s.IsCorruption()) {
    DropCorrupt(hash);
    return FromRocks(s, absl::StrCat("read block ", hash.Hex()));
  }
  if (!s.ok()) return FromRocks(s, absl::StrCat("read block ", hash.Hex()));
  {
    absl::MutexLock lock(&mu_);
    ++counters_.reads;
  }
  if (value.size() < kDiskBlockHeaderBytes) {
    DropCorrupt(hash);
    return absl::DataLossError(absl::StrCat("block ", hash.Hex(), " on disk has ", value.size(),
                                            " bytes, less than its ", kDiskBlockHeaderBytes,
                                            "-byte header"));
  }
  const auto* p = reinterpret_cast<const uint8_t*>(value.data());
  auto le = [p](int at, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v |= uint64_t{p[at + i]} << (8 * i);
    return v;
  };
  const uint64_t magic = le(0, 4);
  const uint64_t format = le(4, 4);
  const uint64_t size = le(8, 8);
  const uint64_t checksum = le(16, 8);
  const uint64_t payload = value.size() - kDiskBlockHeaderBytes;
  const bool same_block = std::memcmp(p + 24, hash.bytes.data(), hash.bytes.size()) == 0;
  if (magic != kBlockMagic || format != kBlockFormat || size != payload || !same_block) {
    DropCorrupt(hash);
    return absl::DataLossError(absl::StrCat(
        "block ", hash.Hex(), " on disk has a bad header: magic ", magic, " (expected ",
        kBlockMagic, "), format ", format, " (expected ", kBlockFormat, "), size ", size,
        " with a payload of ", payload, same_block ? "" : ", and it names another block"));
  }
  if (payload != bytes) {
    return absl::InvalidArgumentError(absl::StrCat("block ", hash.Hex(), " on disk has ", payload,
                                                   " bytes, the reader expects ", bytes));
  }
  std::memcpy(dst, value.data() + kDiskBlockHeaderBytes, bytes);
  // Verify what the caller will use (the copy), not only the source.
  const uint64_t actual = BlockChecksum(dst, bytes);
  if (actual != checksum) {
    DropCorrupt(hash);
    return absl::DataLossError(absl::StrCat("block ", hash.Hex(), " on disk fails its checksum: ",
                                            "stored ", checksum, ", computed ", actual));
  }
  absl::MutexLock lock(&mu_);
  counters_.bytes_read += bytes;
  return absl::OkStatus();
}

void DiskTier::DropCorrupt(const BlockHash& hash) {
  {
    absl::MutexLock lock(&mu_);
    ++counters_.corrupt;
  }
  // Best effort: if the delete fails, the next read finds the block corrupt again.
  DeleteBlocks(absl::MakeConstSpan(&hash, 1)).IgnoreError();
}

absl::Status DiskTier::DeleteBlocks(absl::Span<const BlockHash> hashes) {
  if (hashes.empty()) return absl::OkStatus();
  rocksdb::WriteBatch batch;
  for (const BlockHash& h : hashes) {
    rocksdb::Status s = batch.Delete(blocks_cf_, BlockKey(h));
    if (s.ok()) s = batch.Delete(meta_cf_, BlockMetaKey(h));
    if (!s.ok()) return FromRocks(s, "build delete batch");
  }
  rocksdb::WriteOptions wo;
  wo.sync = options_.durability == Durability::kSync;
  if (auto st = FromRocks(db_->Write(wo, &batch), "delete blocks"); !st.ok()) return st;
  absl::MutexLock lock(&mu_);
  for (const BlockHash& h : hashes) {
    auto it = sizes_.find(h);
    if (it == sizes_.end()) continue;
    used_bytes_ -= it->second;
    sizes_.erase(it);
  }
  return absl::OkStatus();
}

absl::Status DiskTier::UpdateMeta(const DiskBlockMeta& meta) {
  if (!Contains(meta.hash)) {
    return absl::NotFoundError(absl::StrCat("block ", meta.hash.Hex(), " is not on disk"));
  }
  // Keep the stored write sequence: LRU order after a restart follows writes, not updates.
  std::string stored;
  const std::string key = BlockMetaKey(meta.hash);
  if (auto st = FromRocks(db_->Get(rocksdb::ReadOptions(), meta_cf_, key, &stored),
                          absl::StrCat("read metadata of block ", meta.hash.Hex()));
      !st.ok()) {
    return st;
  }
  DiskBlockMeta updated = meta;
  if (auto old = DecodeDiskBlockMeta(stored); old.ok()) updated.sequence = old->sequence;
  rocksdb::WriteOptions wo;
  wo.sync = options_.durability == Durability::kSync;
  return FromRocks(db_->Put(wo, meta_cf_, key, EncodeDiskBlockMeta(updated)),
                   absl::StrCat("update metadata of block ", meta.hash.Hex()));
}

absl::Status DiskTier::PutModel(const DiskModelMeta& model) {
  rocksdb::WriteOptions wo;
  wo.sync = options_.durability == Durability::kSync;
  return FromRocks(db_->Put(wo, meta_cf_, ModelMetaKey(model.id), EncodeDiskModelMeta(model)),
                   absl::StrCat("store model ", model.id));
}

bool DiskTier::Contains(const BlockHash& hash) const {
  absl::MutexLock lock(&mu_);
  return sizes_.contains(hash);
}

bool DiskTier::Fits(uint64_t bytes) const {
  absl::MutexLock lock(&mu_);
  return used_bytes_ + reserved_bytes_ + bytes <= options_.capacity_bytes;
}

uint64_t DiskTier::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_bytes_;
}

DiskCounters DiskTier::Counters() const {
  absl::MutexLock lock(&mu_);
  DiskCounters c = counters_;
  c.blocks = sizes_.size();
  c.bytes_used = used_bytes_;
  return c;
}

absl::Status DiskTier::Flush() {
  rocksdb::FlushOptions fo;
  fo.wait = true;
  return FromRocks(db_->Flush(fo, {blocks_cf_, meta_cf_}), "flush");
}

}  // namespace ropekv
