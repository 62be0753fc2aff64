#include "cache/disk_tier.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "rocksdb/cache.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/slice.h"
#include "rocksdb/table.h"
#include "rocksdb/write_batch.h"

namespace ropekv {
namespace {

constexpr uint32_t kBlockMagic = 0x42564b52;  // "RKVB" little-endian
constexpr uint32_t kLegacyFormat = 1;         // a "blocks" value of the format before segments
constexpr uint32_t kRecordFormat = 2;         // a segment record
constexpr uint64_t kRecordAlign = 64;         // records start at multiples of this
constexpr uint8_t kBlockMetaLegacy = 1;       // block metadata without a place
constexpr uint8_t kBlockMetaFormat = 2;       // block metadata with its place
// Payload bytes moved per batch (compaction, migration).
constexpr uint64_t kMoveBatchBytes = 64ull << 20;
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

std::string BlockMetaKey(const BlockHash& h) {
  return absl::StrCat(std::string(1, kBlockMetaPrefix), h.Raw());
}
std::string ModelMetaKey(const ModelId& id) {
  return absl::StrCat(std::string(1, kModelMetaPrefix), id);
}

// Little-endian fixed-width integers.
void PutLe(char* out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<char>(v >> (8 * i));
}

uint64_t GetLe(const void* p, int n) {
  const auto* b = static_cast<const uint8_t*>(p);
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t{b[i]} << (8 * i);
  return v;
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
    char b[8];
    PutLe(b, v, n);
    out_.append(b, n);
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
    ok_ = GetLe(data.data() + data_.size(), 8) == BlockChecksum(data_.data(), data_.size());
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
    const uint64_t v = GetLe(data_.data(), n);
    data_.remove_prefix(n);
    return v;
  }
  absl::string_view data_;
  bool ok_ = true;
};

// Bytes a record of `payload` bytes takes in its segment.
uint64_t RecordBytes(uint64_t payload) {
  return (kDiskRecordHeaderBytes + payload + kRecordAlign - 1) / kRecordAlign * kRecordAlign;
}

// The header of a segment record: magic, format, payload size, payload checksum, the block's own
// hash (so that a record found at another block's place is detected) and the header's checksum.
void PutRecordHeader(char* out, const BlockHash& hash, uint64_t size, uint64_t checksum) {
  PutLe(out, kBlockMagic, 4);
  PutLe(out + 4, kRecordFormat, 4);
  PutLe(out + 8, size, 8);
  PutLe(out + 16, checksum, 8);
  std::memcpy(out + 24, hash.bytes.data(), hash.bytes.size());
  PutLe(out + 56, BlockChecksum(out, 56), 8);
}

// Checks the header `p` of block `hash` with a payload of `payload` bytes: a segment record's
// (kRecordFormat) or a "blocks" value's of the format before segments (kLegacyFormat, which has
// no header checksum). Returns the payload's checksum, or DATA_LOSS.
absl::StatusOr<uint64_t> CheckHeader(const uint8_t* p, uint32_t format, const BlockHash& hash,
                                     uint64_t payload) {
  const uint64_t magic = GetLe(p, 4);
  const uint64_t stored_format = GetLe(p + 4, 4);
  const uint64_t size = GetLe(p + 8, 8);
  const bool same_block = std::memcmp(p + 24, hash.bytes.data(), hash.bytes.size()) == 0;
  const bool header_ok = format == kLegacyFormat || GetLe(p + 56, 8) == BlockChecksum(p, 56);
  if (magic != kBlockMagic || stored_format != format || size != payload || !same_block ||
      !header_ok) {
    return absl::DataLossError(absl::StrCat(
        "block ", hash.Hex(), " on disk has a bad header: magic ", magic, " (expected ",
        kBlockMagic, "), format ", stored_format, " (expected ", format, "), size ", size,
        " (expected ", payload, ")", same_block ? "" : ", it names another block",
        header_ok ? "" : ", its checksum does not match"));
  }
  return GetLe(p + 16, 8);
}

// errno of a failed file operation as a status: a full file system is RESOURCE_EXHAUSTED.
absl::Status FromErrno(int err, absl::string_view what) {
  const std::string msg = absl::StrCat("disk tier: ", what, ": ", std::strerror(err));
  if (err == ENOSPC || err == EDQUOT) return absl::ResourceExhaustedError(msg);
  return absl::UnavailableError(msg);
}

// pwritev / preadv of all of `iov` at `offset`, resuming after short transfers. A read that
// meets the end of the file is DATA_LOSS (a truncated record).
absl::Status TransferAll(bool write, int fd, std::vector<iovec> iov, uint64_t offset,
                         absl::string_view what) {
  size_t first = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    const int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    const ssize_t n = write ? ::pwritev(fd, iov.data() + first, count, static_cast<off_t>(offset))
                            : ::preadv(fd, iov.data() + first, count, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return FromErrno(errno, what);
    if (n == 0) {
      return write ? absl::UnavailableError(absl::StrCat("disk tier: ", what, ": wrote nothing"))
                   : absl::DataLossError(
                         absl::StrCat("disk tier: ", what, ": the record ends past its segment"));
    }
    offset += static_cast<uint64_t>(n);
    for (size_t left = static_cast<size_t>(n); left > 0;) {
      const size_t take = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      left -= take;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return absl::OkStatus();
}

// Segment file names: 8 hex digits and ".seg".
std::optional<uint32_t> SegmentIdOf(const std::string& name) {
  if (name.size() != 12 || name.substr(8) != ".seg") return std::nullopt;
  uint32_t id = 0;
  if (!absl::SimpleHexAtoi(name.substr(0, 8), &id) || id == 0) return std::nullopt;
  return id;
}

}  // namespace

absl::StatusOr<Durability> ParseDurability(absl::string_view text) {
  if (text == "sync") return Durability::kSync;
  if (text == "memory") return Durability::kMemory;
  return absl::InvalidArgumentError(
      absl::StrCat("durability must be \"sync\" or \"memory\", got \"", text, "\""));
}

const char* DurabilityName(Durability d) { return d == Durability::kSync ? "sync" : "memory"; }

std::string EncodeDiskBlockMeta(const DiskBlockMeta& m, std::optional<DiskPlace> place) {
  Writer w;
  w.U8(place.has_value() ? kBlockMetaFormat : kBlockMetaLegacy);
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
  if (place.has_value()) {
    w.U32(place->segment);
    w.U64(place->offset);
  }
  return w.Seal();
}

absl::StatusOr<DiskBlockMeta> DecodeDiskBlockMeta(absl::string_view data,
                                                  std::optional<DiskPlace>* place) {
  Reader r(data);
  DiskBlockMeta m;
  const uint8_t format = r.U8();
  if (r.ok() && format != kBlockMetaFormat && format != kBlockMetaLegacy) {
    return absl::DataLossError(absl::StrCat("block metadata has format ", format, ", expected ",
                                            kBlockMetaLegacy, " or ", kBlockMetaFormat));
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
  DiskPlace at;
  if (format == kBlockMetaFormat) {
    at.segment = r.U32();
    at.offset = r.U64();
  }
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
  if (place != nullptr) {
    *place = format == kBlockMetaFormat ? std::optional<DiskPlace>(at) : std::nullopt;
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

struct DiskTier::Segment {
  Segment(uint32_t id, int fd) : id(id), fd(fd) {}
  ~Segment() { ::close(fd); }
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  const uint32_t id;
  const int fd;  // open until the last reader lets go, also after the file is removed
};

struct DiskTier::SegmentState {
  std::shared_ptr<Segment> file;
  uint64_t end = 0;   // bytes appended or reserved
  uint64_t live = 0;  // bytes of the records that blocks point at
  int writers = 0;    // reserved places not yet released
};

struct DiskTier::Entry {
  uint64_t bytes = 0;
  DiskPlace place;
  uint64_t sequence = 0;
};

struct DiskTier::Append {
  std::shared_ptr<Segment> file;
  DiskPlace place;
  uint64_t payload = 0;
};

absl::StatusOr<std::unique_ptr<DiskTier>> DiskTier::Open(Options options) {
  if (options.path.empty()) {
    return absl::InvalidArgumentError("disk tier: a path is required, got an empty one");
  }
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("disk tier capacity must be positive, got 0");
  }
  if (options.segment_bytes == 0) {
    options.segment_bytes =
        std::clamp<uint64_t>(options.capacity_bytes / 256, 64ull << 20, 4ull << 30);
  }
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(options.path) / "segments", ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("disk tier: cannot create ", options.path, "/segments: ", ec.message()));
  }

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = true;
  db_options.create_missing_column_families = true;
  db_options.max_background_jobs = 2;

  rocksdb::BlockBasedTableOptions table;
  table.block_cache = rocksdb::NewLRUCache(options.block_cache_bytes);
  rocksdb::ColumnFamilyOptions meta_options;
  meta_options.table_factory.reset(rocksdb::NewBlockBasedTableFactory(table));

  std::vector<rocksdb::ColumnFamilyDescriptor> families = {
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
      {kDiskMetaFamily, meta_options}};
  // A folder of the format before segments has its block bytes in a "blocks" family (values in
  // blob files); it is opened to be migrated by Load.
  std::vector<std::string> existing;
  const bool legacy =
      rocksdb::DB::ListColumnFamilies(db_options, options.path, &existing).ok() &&
      std::find(existing.begin(), existing.end(), kDiskBlocksFamily) != existing.end();
  if (legacy) {
    rocksdb::ColumnFamilyOptions blocks_options;
    blocks_options.enable_blob_files = true;
    blocks_options.compression = rocksdb::kNoCompression;
    families.push_back({kDiskBlocksFamily, blocks_options});
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, options.path, families, &handles, &raw);
  if (!s.ok()) {
    absl::Status st = FromRocks(s, absl::StrCat("open ", options.path));
    if (absl::IsInternal(st)) return absl::UnavailableError(st.message());
    return st;
  }
  return std::unique_ptr<DiskTier>(new DiskTier(
      std::move(options), std::unique_ptr<rocksdb::DB>(raw), std::move(handles), legacy));
}

DiskTier::DiskTier(Options options, std::unique_ptr<rocksdb::DB> db,
                   std::vector<rocksdb::ColumnFamilyHandle*> handles, bool legacy)
    : options_(std::move(options)),
      segment_dir_((std::filesystem::path(options_.path) / "segments").string()),
      db_(std::move(db)) {
  // handles[0] is the default family, which we do not use.
  db_->DestroyColumnFamilyHandle(handles[0]);
  meta_cf_ = handles[1];
  if (legacy) legacy_cf_ = handles[2];
  counters_.capacity_bytes = options_.capacity_bytes;
}

DiskTier::~DiskTier() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (compactor_.joinable()) compactor_.join();
  std::vector<std::thread> stagers;
  {
    absl::MutexLock lock(&stage_mu_);
    stage_stopping_ = true;  // every staging has drained: the queue is empty
    stagers.swap(stagers_);
  }
  for (std::thread& t : stagers) t.join();
  db_->DestroyColumnFamilyHandle(meta_cf_);
  if (legacy_cf_ != nullptr) db_->DestroyColumnFamilyHandle(legacy_cf_);
  db_->Close().PermitUncheckedError();
}

std::string DiskTier::SegmentPath(uint32_t id) const {
  return absl::StrFormat("%s/%08x.seg", segment_dir_, id);
}

rocksdb::WriteOptions DiskTier::WriteOpts() const {
  rocksdb::WriteOptions wo;
  wo.sync = options_.durability == Durability::kSync;
  return wo;
}

absl::StatusOr<DiskContents> DiskTier::Load() {
  DiskContents out;
  std::vector<std::string> bad_keys;
  std::vector<std::pair<DiskBlockMeta, DiskPlace>> placed;
  std::vector<DiskBlockMeta> legacy;
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
        std::optional<DiskPlace> place;
        auto m = DecodeDiskBlockMeta(value, &place);
        if (m.ok() && m->hash.Raw() == key.ToString().substr(1) &&
            (place.has_value() || legacy_cf_ != nullptr)) {
          if (place.has_value()) {
            placed.emplace_back(*std::move(m), *place);
          } else {
            legacy.push_back(*std::move(m));
          }
        } else {
          bad_keys.push_back(key.ToString());
        }
      } else {
        bad_keys.push_back(key.ToString());
      }
    }
    if (auto st = FromRocks(it->status(), "scan metadata"); !st.ok()) return st;
  }

  // The segment files, and which blocks they can hold. A record's bytes are verified by its
  // first read (reading every block here would read the whole tier); a record past the end of
  // its file, or in a file that is gone, is dropped now.
  std::map<uint32_t, SegmentState> segments;
  std::error_code ec;
  for (const auto& f : std::filesystem::directory_iterator(segment_dir_, ec)) {
    const std::optional<uint32_t> id = SegmentIdOf(f.path().filename().string());
    if (!id.has_value()) continue;  // not ours
    const int fd = ::open(f.path().c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return FromErrno(errno, absl::StrCat("open ", f.path().string()));
    struct stat st;
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      return FromErrno(err, absl::StrCat("stat ", f.path().string()));
    }
    SegmentState& state = segments[*id];
    state.file = std::make_shared<Segment>(*id, fd);
    state.end = static_cast<uint64_t>(st.st_size);
  }
  if (ec) return FromErrno(ec.value(), absl::StrCat("list ", segment_dir_));

  absl::flat_hash_map<BlockHash, Entry> blocks;
  uint64_t used = 0;
  uint64_t max_seq = 0;
  for (auto& [m, place] : placed) {
    auto seg = segments.find(place.segment);
    if (seg == segments.end() || place.offset % kRecordAlign != 0 ||
        place.offset + RecordBytes(m.bytes) > seg->second.end) {
      bad_keys.push_back(BlockMetaKey(m.hash));
      continue;
    }
    seg->second.live += RecordBytes(m.bytes);
    blocks[m.hash] = Entry{m.bytes, place, m.sequence};
    used += m.bytes;
    max_seq = std::max(max_seq, m.sequence);
    out.blocks.push_back(std::move(m));
  }
  for (const DiskBlockMeta& m : legacy) max_seq = std::max(max_seq, m.sequence);

  rocksdb::WriteBatch drop;
  for (const std::string& k : bad_keys) {
    drop.Delete(meta_cf_, k).PermitUncheckedError();
    ++out.dropped_records;
  }
  if (drop.Count() > 0) {
    if (auto st = FromRocks(db_->Write(WriteOpts(), &drop), "drop bad records"); !st.ok()) {
      return st;
    }
  }
  {
    absl::MutexLock lock(&mu_);
    blocks_ = std::move(blocks);
    segments_ = std::move(segments);
    used_bytes_ = used;
    next_segment_ = segments_.empty() ? 1 : segments_.rbegin()->first + 1;
    filling_ = 0;  // new records go to a new segment: an old one may end in a torn write
    std::vector<uint32_t> ids;
    for (const auto& [id, state] : segments_) ids.push_back(id);
    for (uint32_t id : ids) RetireOrScheduleLocked(id);
  }
  next_sequence_ = max_seq + 1;

  if (legacy_cf_ != nullptr) {
    if (auto st = Migrate(&legacy, &out); !st.ok()) return st;
  }
  std::sort(out.blocks.begin(), out.blocks.end(),
            [](const DiskBlockMeta& a, const DiskBlockMeta& b) { return a.sequence < b.sequence; });
  if (options_.background_compaction && !compactor_.joinable()) {
    compactor_ = std::thread([this] { CompactionLoop(); });
  }
  return out;
}

absl::StatusOr<std::vector<DiskTier::Append>> DiskTier::Reserve(
    absl::Span<const uint64_t> payloads) {
  absl::MutexLock lock(&mu_);
  std::vector<Append> out;
  out.reserve(payloads.size());
  for (uint64_t payload : payloads) {
    const uint64_t bytes = RecordBytes(payload);
    auto it = segments_.find(filling_);
    if (it == segments_.end() ||
        (it->second.end > 0 && it->second.end + bytes > options_.segment_bytes)) {
      const uint32_t id = next_segment_;
      const std::string path = SegmentPath(id);
      const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
      absl::Status st = fd < 0 ? FromErrno(errno, absl::StrCat("create ", path)) : absl::OkStatus();
      if (st.ok() && options_.durability == Durability::kSync) {
        // The new file's name must survive a power loss before any metadata points into it.
        const int dir = ::open(segment_dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dir < 0 || ::fsync(dir) != 0) {
          st = FromErrno(errno, absl::StrCat("sync ", segment_dir_));
        }
        if (dir >= 0) ::close(dir);
      }
      if (!st.ok()) {
        if (fd >= 0) {
          ::close(fd);
          ::unlink(path.c_str());
        }
        for (const Append& a : out) ReleaseLocked(a);
        return st;
      }
      ++next_segment_;
      const uint32_t full = filling_;
      SegmentState& fresh = segments_[id];
      fresh.file = std::make_shared<Segment>(id, fd);
      filling_ = id;
      RetireOrScheduleLocked(full);
      it = segments_.find(id);
    }
    SegmentState& state = it->second;
    out.push_back(Append{state.file, DiskPlace{it->first, state.end}, payload});
    state.end += bytes;
    ++state.writers;
  }
  return out;
}

absl::Status DiskTier::WriteRecords(absl::Span<const Append> appends,
                                    absl::Span<const BlockHash> hashes,
                                    absl::Span<const void* const> data) {
  static const char kZeros[kRecordAlign] = {};
  std::vector<char> headers(appends.size() * kDiskRecordHeaderBytes);
  // One pwritev for each run of records that lie back to back in one segment.
  std::vector<iovec> iov;
  for (size_t i = 0; i < appends.size();) {
    const Append& first = appends[i];
    uint64_t next = first.place.offset;
    iov.clear();
    size_t j = i;
    for (; j < appends.size() && appends[j].file == first.file && appends[j].place.offset == next;
         ++j) {
      const Append& a = appends[j];
      char* header = headers.data() + j * kDiskRecordHeaderBytes;
      PutRecordHeader(header, hashes[j], a.payload, BlockChecksum(data[j], a.payload));
      const uint64_t pad = RecordBytes(a.payload) - kDiskRecordHeaderBytes - a.payload;
      iov.push_back({header, kDiskRecordHeaderBytes});
      iov.push_back({const_cast<void*>(data[j]), a.payload});
      iov.push_back({const_cast<char*>(kZeros), pad});
      next += RecordBytes(a.payload);
    }
    if (auto st = TransferAll(/*write=*/true, first.file->fd, iov, first.place.offset,
                              absl::StrCat("write ", SegmentPath(first.place.segment)));
        !st.ok()) {
      return st;
    }
    i = j;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<DiskTier::Append>> DiskTier::AppendRecords(
    absl::Span<const uint64_t> payloads, absl::Span<const BlockHash> hashes,
    absl::Span<const void* const> data) {
  auto appends = Reserve(payloads);
  if (!appends.ok()) return appends.status();
  if (auto st = WriteRecords(*appends, hashes, data); !st.ok()) {
    Abandon(*appends);
    return st;
  }
  return appends;
}

absl::Status DiskTier::SyncSegments(absl::Span<const Append> appends) {
  if (options_.durability != Durability::kSync) return absl::OkStatus();
  std::set<Segment*> files;
  for (const Append& a : appends) files.insert(a.file.get());
  for (Segment* f : files) {
    if (::fdatasync(f->fd) != 0) return FromErrno(errno, absl::StrCat("sync ", SegmentPath(f->id)));
  }
  absl::MutexLock lock(&mu_);
  counters_.segment_syncs += files.size();
  return absl::OkStatus();
}

void DiskTier::PlaceLocked(const BlockHash& hash, const Append& a, uint64_t sequence) {
  auto [it, inserted] = blocks_.try_emplace(hash);
  if (!inserted) ForgetLocked(it->second);
  it->second = Entry{a.payload, a.place, sequence};
  segments_[a.place.segment].live += RecordBytes(a.payload);
  used_bytes_ += a.payload;
}

void DiskTier::ForgetLocked(const Entry& e) {
  segments_[e.place.segment].live -= RecordBytes(e.bytes);
  used_bytes_ -= e.bytes;
  RetireOrScheduleLocked(e.place.segment);
}

void DiskTier::ReleaseLocked(const Append& a) {
  --segments_[a.place.segment].writers;
  RetireOrScheduleLocked(a.place.segment);
}

void DiskTier::Abandon(absl::Span<const Append> appends) {
  absl::MutexLock lock(&mu_);
  for (const Append& a : appends) ReleaseLocked(a);
}

void DiskTier::RetireOrScheduleLocked(uint32_t id) {
  auto it = segments_.find(id);
  if (it == segments_.end() || id == filling_ || it->second.writers > 0) return;
  if (it->second.live == 0) {
    // Readers that hold the segment keep reading from its open descriptor.
    ::unlink(SegmentPath(id).c_str());
    segments_.erase(it);
  } else if (it->second.live * 2 < it->second.end) {
    compaction_wanted_ = true;
  }
}

absl::Status DiskTier::PutBlocks(absl::Span<const BlockWrite> blocks, Staging* staged) {
  // Records the staging wrote (they are released with the others, below).
  absl::flat_hash_map<BlockHash, Append> ready;
  std::vector<Append> unused;
  if (staged != nullptr) {
    // After a failed record every block is written here (the error shows again if it lasts).
    const absl::Status drained = staged->Drain();
    std::vector<Append> records;
    std::vector<BlockHash> hashes;
    TakeStaged(staged, &records, &hashes);
    if (drained.ok()) {
      for (size_t i = 0; i < records.size(); ++i) {
        auto [it, inserted] = ready.try_emplace(hashes[i], records[i]);
        if (!inserted) unused.push_back(records[i]);  // a block staged twice
      }
    } else {
      unused = std::move(records);
    }
  }
  std::vector<Append> appends(blocks.size());
  std::vector<size_t> missing;  // blocks whose records are written here
  for (size_t i = 0; i < blocks.size(); ++i) {
    auto it = ready.find(blocks[i].meta.hash);
    if (it != ready.end() && it->second.payload == blocks[i].meta.bytes) {
      appends[i] = std::move(it->second);
      ready.erase(it);
    } else {
      missing.push_back(i);
    }
  }
  for (auto& [hash, a] : ready) unused.push_back(std::move(a));
  Abandon(unused);
  if (blocks.empty()) return absl::OkStatus();

  uint64_t fresh = 0;  // bytes of blocks not stored yet (rewrites do not grow usage)
  absl::Status st;
  {
    absl::MutexLock lock(&mu_);
    for (const BlockWrite& b : blocks) {
      if (!blocks_.contains(b.meta.hash)) fresh += b.meta.bytes;
    }
    if (used_bytes_ + reserved_bytes_ + fresh > options_.capacity_bytes) {
      st = absl::ResourceExhaustedError(
          absl::StrCat("disk tier full: ", used_bytes_ + reserved_bytes_, " of ",
                       options_.capacity_bytes, " bytes used, the write needs ", fresh));
      fresh = 0;
    }
    reserved_bytes_ += fresh;
  }
  // Releases every place that is reserved (staged or written here) and the capacity.
  auto give_up = [&](absl::Status why) {
    std::vector<Append> held;
    for (Append& a : appends) {
      if (a.file != nullptr) held.push_back(std::move(a));
    }
    Abandon(held);
    absl::MutexLock lock(&mu_);
    reserved_bytes_ -= fresh;
    return why;
  };
  if (!st.ok()) return give_up(st);
  if (!missing.empty()) {
    std::vector<uint64_t> sizes;
    std::vector<BlockHash> hashes;
    std::vector<const void*> data;
    for (size_t i : missing) {
      sizes.push_back(blocks[i].meta.bytes);
      hashes.push_back(blocks[i].meta.hash);
      data.push_back(blocks[i].data);
    }
    auto placed = AppendRecords(sizes, hashes, data);
    if (!placed.ok()) return give_up(placed.status());
    for (size_t k = 0; k < missing.size(); ++k) appends[missing[k]] = (*placed)[k];
  }
  if (st = SyncSegments(appends); !st.ok()) return give_up(st);

  absl::MutexLock index(&index_mu_);
  rocksdb::WriteBatch batch;
  std::vector<uint64_t> sequences;
  for (size_t i = 0; i < blocks.size(); ++i) {
    DiskBlockMeta meta = blocks[i].meta;
    meta.sequence = next_sequence_.fetch_add(1);
    sequences.push_back(meta.sequence);
    if (st = FromRocks(batch.Put(meta_cf_, BlockMetaKey(meta.hash),
                                 EncodeDiskBlockMeta(meta, appends[i].place)),
                       "build write batch");
        !st.ok()) {
      return give_up(st);
    }
  }
  const rocksdb::Status s = db_->Write(WriteOpts(), &batch);
  absl::MutexLock lock(&mu_);
  reserved_bytes_ -= fresh;
  if (s.ok()) {
    for (size_t i = 0; i < blocks.size(); ++i) {
      PlaceLocked(blocks[i].meta.hash, appends[i], sequences[i]);
      ++counters_.writes;
      counters_.bytes_written += blocks[i].meta.bytes;
    }
  }
  for (const Append& a : appends) ReleaseLocked(a);
  return FromRocks(s, absl::StrCat("write ", blocks.size(), " blocks"));
}

// ---------------------------------------------------------------------------------------------
// Staging

std::unique_ptr<DiskTier::Staging> DiskTier::BeginStaging() {
  return std::unique_ptr<Staging>(new Staging(this));
}

DiskTier::Staging::Staging(DiskTier* tier) : tier_(tier) {}

DiskTier::Staging::~Staging() {
  Drain().IgnoreError();
  std::vector<DiskTier::Append> records;
  std::vector<BlockHash> hashes;
  tier_->TakeStaged(this, &records, &hashes);
  tier_->Abandon(records);
}

void DiskTier::Staging::Append(const BlockHash& hash, const void* data, uint64_t bytes) {
  absl::MutexLock lock(&tier_->stage_mu_);
  ++pending_;
  tier_->stage_queue_.emplace_back(this, Item{hash, data, bytes});
  if (tier_->stagers_.empty()) {
    for (int t = 0; t < std::max(1, tier_->options_.stage_threads); ++t) {
      tier_->stagers_.emplace_back([tier = tier_] { tier->StageLoop(); });
    }
  }
}

void DiskTier::Staging::Write(const Item& item) ABSL_NO_THREAD_SAFETY_ANALYSIS {
  bool failed;
  {
    absl::MutexLock lock(&tier_->stage_mu_);
    failed = !status_.ok();  // after an error the rest are left for PutBlocks
  }
  absl::Status st;
  std::optional<DiskTier::Append> done;
  if (!failed) {
    auto placed = tier_->AppendRecords(absl::MakeConstSpan(&item.bytes, 1),
                                       absl::MakeConstSpan(&item.hash, 1),
                                       absl::MakeConstSpan(&item.data, 1));
    st = placed.status();
    if (st.ok()) {
      done = (*placed)[0];
      if (tier_->options_.durability == Durability::kSync) {
        // Start the write-back now; the commit's fdatasync waits for what is left.
        ::sync_file_range(done->file->fd, static_cast<off_t>(done->place.offset),
                          static_cast<off_t>(RecordBytes(item.bytes)), SYNC_FILE_RANGE_WRITE);
      }
    }
  }
  absl::MutexLock lock(&tier_->stage_mu_);
  if (done.has_value()) {
    written_.push_back(*std::move(done));
    written_hashes_.push_back(item.hash);
  }
  if (!st.ok() && status_.ok()) status_ = st;
  --pending_;
}

absl::Status DiskTier::Staging::Drain() ABSL_NO_THREAD_SAFETY_ANALYSIS {
  absl::MutexLock lock(&tier_->stage_mu_);
  tier_->stage_mu_.Await(absl::Condition(
      +[](Staging* s) ABSL_NO_THREAD_SAFETY_ANALYSIS { return s->pending_ == 0; }, this));
  return status_;
}

void DiskTier::TakeStaged(Staging* staging, std::vector<Append>* records,
                          std::vector<BlockHash>* hashes) {
  absl::MutexLock lock(&stage_mu_);
  records->swap(staging->written_);
  hashes->swap(staging->written_hashes_);
}

void DiskTier::StageLoop() {
  while (true) {
    std::pair<Staging*, Staging::Item> job;
    {
      absl::MutexLock lock(&stage_mu_);
      stage_mu_.Await(absl::Condition(
          +[](DiskTier* t) ABSL_NO_THREAD_SAFETY_ANALYSIS {
            return t->stage_next_ < t->stage_queue_.size() || t->stage_stopping_;
          },
          this));
      if (stage_next_ == stage_queue_.size()) return;  // stopping, nothing left
      job = stage_queue_[stage_next_++];
      if (stage_next_ == stage_queue_.size()) {
        stage_queue_.clear();
        stage_next_ = 0;
      }
    }
    job.first->Write(job.second);
  }
}

absl::Status DiskTier::ReadRecord(const Segment& segment, uint64_t offset, const BlockHash& hash,
                                  void* dst, uint64_t bytes) const {
  uint8_t header[kDiskRecordHeaderBytes];
  std::vector<iovec> iov = {{header, kDiskRecordHeaderBytes}, {dst, bytes}};
  if (auto st =
          TransferAll(/*write=*/false, segment.fd, iov, offset,
                      absl::StrCat("read block ", hash.Hex(), " from ", SegmentPath(segment.id)));
      !st.ok()) {
    return st;
  }
  auto checksum = CheckHeader(header, kRecordFormat, hash, bytes);
  if (!checksum.ok()) return checksum.status();
  // Verify what the caller will use (the copy).
  const uint64_t actual = BlockChecksum(dst, bytes);
  if (actual != *checksum) {
    return absl::DataLossError(absl::StrCat("block ", hash.Hex(), " on disk fails its checksum: ",
                                            "stored ", *checksum, ", computed ", actual));
  }
  return absl::OkStatus();
}

absl::Status DiskTier::ReadBlock(const BlockHash& hash, void* dst, uint64_t bytes) {
  Entry entry;
  std::shared_ptr<Segment> file;
  {
    absl::MutexLock lock(&mu_);
    auto it = blocks_.find(hash);
    if (it == blocks_.end()) {
      return absl::NotFoundError(absl::StrCat("block ", hash.Hex(), " is not on disk"));
    }
    entry = it->second;
    auto seg = segments_.find(entry.place.segment);
    if (seg == segments_.end()) {  // cannot happen: a segment goes when no block lives in it
      return absl::InternalError(absl::StrCat("block ", hash.Hex(), " names segment ",
                                              entry.place.segment, ", which is gone"));
    }
    file = seg->second.file;
    ++counters_.reads;
  }
  if (entry.bytes != bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", hash.Hex(), " on disk has ", entry.bytes, " bytes, the reader expects ", bytes));
  }
  absl::Status st = ReadRecord(*file, entry.place.offset, hash, dst, bytes);
  if (absl::IsDataLoss(st)) DropCorrupt(hash, entry.place);
  if (!st.ok()) return st;
  absl::MutexLock lock(&mu_);
  counters_.bytes_read += bytes;
  return absl::OkStatus();
}

void DiskTier::ReadBlocks(absl::Span<const BlockRead> reads, absl::Span<absl::Status> statuses) {
  std::atomic<size_t> next{0};
  std::atomic<size_t> first_failed{reads.size()};
  auto work = [&] {
    for (size_t i = next.fetch_add(1); i < reads.size(); i = next.fetch_add(1)) {
      if (i > first_failed.load()) {
        statuses[i] = absl::CancelledError("an earlier block failed");
        continue;
      }
      statuses[i] = ReadBlock(reads[i].hash, reads[i].dst, reads[i].bytes);
      if (statuses[i].ok()) continue;
      for (size_t f = first_failed.load(); i < f && !first_failed.compare_exchange_weak(f, i);) {
      }
    }
  };
  // Extra threads only where there is enough to share (a thread costs ~50 us to start).
  const size_t threads =
      std::min<size_t>(std::max(1, options_.read_threads), std::max<size_t>(1, reads.size() / 4));
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (std::thread& h : helpers) h.join();
}

void DiskTier::DropCorrupt(const BlockHash& hash, DiskPlace place) {
  absl::MutexLock index(&index_mu_);
  {
    absl::MutexLock lock(&mu_);
    ++counters_.corrupt;
    auto it = blocks_.find(hash);
    if (it == blocks_.end() || !(it->second.place == place)) {
      return;  // rewritten or deleted since
    }
  }
  // Best effort: if the delete fails, the next read finds the block corrupt again.
  DeleteIndexed(absl::MakeConstSpan(&hash, 1)).IgnoreError();
}

absl::Status DiskTier::DeleteBlocks(absl::Span<const BlockHash> hashes) {
  if (hashes.empty()) return absl::OkStatus();
  absl::MutexLock index(&index_mu_);
  return DeleteIndexed(hashes);
}

absl::Status DiskTier::DeleteIndexed(absl::Span<const BlockHash> hashes) {
  rocksdb::WriteBatch batch;
  for (const BlockHash& h : hashes) {
    if (auto st = FromRocks(batch.Delete(meta_cf_, BlockMetaKey(h)), "build delete batch");
        !st.ok()) {
      return st;
    }
  }
  // Not synced: a full cache deletes on every Put, and a WAL sync each time would cost as much
  // as the Put's own. The next synced write (WAL order) makes the delete durable; a block deleted
  // just before a power loss may come back whole (its record is never overwritten), or be dropped
  // at Load if its segment has gone.
  if (auto st = FromRocks(db_->Write(rocksdb::WriteOptions(), &batch), "delete blocks"); !st.ok()) {
    return st;
  }
  absl::MutexLock lock(&mu_);
  for (const BlockHash& h : hashes) {
    auto it = blocks_.find(h);
    if (it == blocks_.end()) continue;
    const Entry e = it->second;
    blocks_.erase(it);
    ForgetLocked(e);
  }
  return absl::OkStatus();
}

absl::Status DiskTier::UpdateMeta(const DiskBlockMeta& meta) {
  absl::MutexLock index(&index_mu_);
  Entry entry;
  {
    absl::MutexLock lock(&mu_);
    auto it = blocks_.find(meta.hash);
    if (it == blocks_.end()) {
      return absl::NotFoundError(absl::StrCat("block ", meta.hash.Hex(), " is not on disk"));
    }
    entry = it->second;
  }
  // Keep the stored size, place and write sequence: LRU order after a restart follows writes,
  // not updates.
  DiskBlockMeta updated = meta;
  updated.bytes = entry.bytes;
  updated.sequence = entry.sequence;
  return FromRocks(db_->Put(WriteOpts(), meta_cf_, BlockMetaKey(meta.hash),
                            EncodeDiskBlockMeta(updated, entry.place)),
                   absl::StrCat("update metadata of block ", meta.hash.Hex()));
}

absl::Status DiskTier::PutModel(const DiskModelMeta& model) {
  return FromRocks(
      db_->Put(WriteOpts(), meta_cf_, ModelMetaKey(model.id), EncodeDiskModelMeta(model)),
      absl::StrCat("store model ", model.id));
}

// ---------------------------------------------------------------------------------------------
// Moving blocks: compaction and the migration of the format before segments.

absl::Status DiskTier::MoveBlocks(std::vector<Moving>* batch, bool legacy) {
  if (batch->empty()) return absl::OkStatus();
  std::vector<uint64_t> sizes;
  std::vector<BlockHash> hashes;
  std::vector<const void*> data;
  for (const Moving& m : *batch) {
    sizes.push_back(m.meta.bytes);
    hashes.push_back(m.meta.hash);
    data.push_back(m.payload.data());
  }
  auto appends = AppendRecords(sizes, hashes, data);
  if (!appends.ok()) return appends.status();
  // Synced before the metadata points at them: compaction then removes the old copies.
  if (auto st = SyncSegments(*appends); !st.ok()) {
    Abandon(*appends);
    return st;
  }
  absl::MutexLock index(&index_mu_);
  // A block that a Put, delete or UpdateMeta changed since it was read stays where that left it.
  std::vector<bool> still(batch->size(), true);
  if (!legacy) {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < batch->size(); ++i) {
      auto it = blocks_.find(hashes[i]);
      still[i] = it != blocks_.end() && it->second.place == (*batch)[i].from;
    }
  }
  rocksdb::WriteBatch write;
  for (size_t i = 0; i < batch->size(); ++i) {
    if (!still[i]) continue;
    DiskBlockMeta meta = (*batch)[i].meta;
    if (!legacy) {
      // The stored record is the truth for every field (UpdateMeta may have changed the pin).
      std::string stored;
      auto st =
          FromRocks(db_->Get(rocksdb::ReadOptions(), meta_cf_, BlockMetaKey(meta.hash), &stored),
                    absl::StrCat("read metadata of block ", meta.hash.Hex()));
      auto decoded = st.ok() ? DecodeDiskBlockMeta(stored) : absl::StatusOr<DiskBlockMeta>(st);
      if (!decoded.ok()) {
        Abandon(*appends);
        return decoded.status();
      }
      meta = *std::move(decoded);
    }
    write.Put(meta_cf_, BlockMetaKey(meta.hash), EncodeDiskBlockMeta(meta, (*appends)[i].place))
        .PermitUncheckedError();
    if (legacy) write.Delete(legacy_cf_, meta.hash.Raw()).PermitUncheckedError();
    (*batch)[i].meta = meta;
  }
  const absl::Status st = FromRocks(db_->Write(WriteOpts(), &write), "move blocks");
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < batch->size(); ++i) {
    if (st.ok() && still[i]) {
      PlaceLocked(hashes[i], (*appends)[i], (*batch)[i].meta.sequence);
      if (!legacy) ++counters_.relocated;
    }
    ReleaseLocked((*appends)[i]);
  }
  return st;
}

absl::Status DiskTier::CompactSegment(uint32_t id) {
  std::shared_ptr<Segment> file;
  std::vector<Moving> live;
  {
    absl::MutexLock lock(&mu_);
    auto seg = segments_.find(id);
    if (seg == segments_.end()) return absl::OkStatus();
    file = seg->second.file;
    for (const auto& [hash, e] : blocks_) {
      if (e.place.segment != id) continue;
      Moving m;
      m.meta.hash = hash;
      m.meta.bytes = e.bytes;
      m.meta.sequence = e.sequence;
      m.from = e.place;
      live.push_back(std::move(m));
    }
  }
  std::sort(live.begin(), live.end(),
            [](const Moving& a, const Moving& b) { return a.from.offset < b.from.offset; });
  std::vector<Moving> batch;
  uint64_t batch_bytes = 0;
  for (size_t i = 0; i <= live.size(); ++i) {
    if (i == live.size() || batch_bytes + live[i].meta.bytes > kMoveBatchBytes) {
      if (auto st = MoveBlocks(&batch, /*legacy=*/false); !st.ok()) return st;
      batch.clear();
      batch_bytes = 0;
      absl::MutexLock lock(&mu_);
      if (stopping_) return absl::OkStatus();
    }
    if (i == live.size()) break;
    Moving& m = live[i];
    m.payload.resize(m.meta.bytes);
    absl::Status st = ReadRecord(*file, m.from.offset, m.meta.hash, m.payload.data(), m.meta.bytes);
    if (absl::IsDataLoss(st)) {
      DropCorrupt(m.meta.hash, m.from);
      continue;
    }
    if (!st.ok()) return st;
    batch_bytes += m.meta.bytes;
    batch.push_back(std::move(m));
  }
  return absl::OkStatus();
}

absl::Status DiskTier::Compact() {
  absl::MutexLock one(&compact_mu_);
  std::set<uint32_t> tried;  // each segment once a call, so a busy one cannot hold it forever
  while (true) {
    uint32_t victim = 0;
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return absl::OkStatus();
      double lowest = 0.5;
      for (const auto& [id, s] : segments_) {
        if (id == filling_ || s.writers > 0 || tried.contains(id) || s.end == 0) continue;
        const double ratio = static_cast<double>(s.live) / static_cast<double>(s.end);
        if (ratio < lowest) {
          lowest = ratio;
          victim = id;
        }
      }
    }
    if (victim == 0) return absl::OkStatus();
    tried.insert(victim);
    if (auto st = CompactSegment(victim); !st.ok()) return st;
  }
}

void DiskTier::CompactionLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](DiskTier* t)
               ABSL_NO_THREAD_SAFETY_ANALYSIS { return t->compaction_wanted_ || t->stopping_; },
          this));
      if (stopping_) return;
      compaction_wanted_ = false;
    }
    // A failure (e.g. a full file system) is tried again at the next change that asks for it.
    Compact().IgnoreError();
  }
}

absl::Status DiskTier::Migrate(std::vector<DiskBlockMeta>* legacy, DiskContents* out) {
  std::vector<Moving> batch;
  uint64_t batch_bytes = 0;
  auto flush = [&]() -> absl::Status {
    if (auto st = MoveBlocks(&batch, /*legacy=*/true); !st.ok()) return st;
    for (Moving& m : batch) {
      ++out->migrated_blocks;
      out->blocks.push_back(std::move(m.meta));
    }
    batch.clear();
    batch_bytes = 0;
    return absl::OkStatus();
  };
  rocksdb::ReadOptions ro;
  ro.fill_cache = false;
  for (DiskBlockMeta& meta : *legacy) {
    std::string value;
    const rocksdb::Status s = db_->Get(ro, legacy_cf_, meta.hash.Raw(), &value);
    bool good = s.ok() && value.size() == kDiskLegacyHeaderBytes + meta.bytes;
    if (good) {
      auto checksum = CheckHeader(reinterpret_cast<const uint8_t*>(value.data()), kLegacyFormat,
                                  meta.hash, meta.bytes);
      good = checksum.ok() &&
             *checksum == BlockChecksum(value.data() + kDiskLegacyHeaderBytes, meta.bytes);
    } else if (!s.ok() && !s.IsNotFound() && !s.IsCorruption()) {
      return FromRocks(s, absl::StrCat("read block ", meta.hash.Hex(), " to migrate it"));
    }
    if (!good) {
      rocksdb::WriteBatch drop;
      drop.Delete(meta_cf_, BlockMetaKey(meta.hash)).PermitUncheckedError();
      drop.Delete(legacy_cf_, meta.hash.Raw()).PermitUncheckedError();
      if (auto st = FromRocks(db_->Write(WriteOpts(), &drop), "drop a block"); !st.ok()) return st;
      ++out->dropped_records;
      continue;
    }
    Moving m;
    m.meta = std::move(meta);
    m.payload = value.substr(kDiskLegacyHeaderBytes);
    batch_bytes += m.meta.bytes;
    batch.push_back(std::move(m));
    if (batch_bytes >= kMoveBatchBytes) {
      if (auto st = flush(); !st.ok()) return st;
    }
  }
  if (auto st = flush(); !st.ok()) return st;
  // Every block has moved (or was dropped): the family goes, and with it its blob files.
  if (auto st = FromRocks(db_->DropColumnFamily(legacy_cf_), "drop the blocks family"); !st.ok()) {
    return st;
  }
  db_->DestroyColumnFamilyHandle(legacy_cf_);
  legacy_cf_ = nullptr;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Accounting

bool DiskTier::Contains(const BlockHash& hash) const {
  absl::MutexLock lock(&mu_);
  return blocks_.contains(hash);
}

bool DiskTier::Fits(uint64_t bytes) const {
  absl::MutexLock lock(&mu_);
  return used_bytes_ + reserved_bytes_ + bytes <= options_.capacity_bytes;
}

uint64_t DiskTier::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_bytes_;
}

absl::StatusOr<DiskPlace> DiskTier::PlaceOf(const BlockHash& hash) const {
  absl::MutexLock lock(&mu_);
  auto it = blocks_.find(hash);
  if (it == blocks_.end()) {
    return absl::NotFoundError(absl::StrCat("block ", hash.Hex(), " is not on disk"));
  }
  return it->second.place;
}

DiskCounters DiskTier::Counters() const {
  absl::MutexLock lock(&mu_);
  DiskCounters c = counters_;
  c.blocks = blocks_.size();
  c.bytes_used = used_bytes_;
  c.segments = segments_.size();
  for (const auto& [id, s] : segments_) c.file_bytes += s.end;
  return c;
}

absl::Status DiskTier::Flush() {
  std::vector<std::shared_ptr<Segment>> files;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, s] : segments_) files.push_back(s.file);
  }
  for (const auto& f : files) {
    if (::fdatasync(f->fd) != 0) return FromErrno(errno, absl::StrCat("sync ", SegmentPath(f->id)));
  }
  rocksdb::FlushOptions fo;
  fo.wait = true;
  return FromRocks(db_->Flush(fo, meta_cf_), "flush");
}

}  // namespace ropekv
