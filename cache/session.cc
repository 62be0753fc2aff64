#include "cache/session.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <random>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cache/hash.h"

namespace ropekv {
namespace {

// A serial for a new chunk: never reused in the process (KvChunk::serial).
uint64_t NextChunkSerial() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

// A read plan's job for all layers, moved to read layer `layer` of its source (es: element size).
RerotateCopy AtLayer(RerotateCopy job, int layer, size_t es) {
  job.src = static_cast<const char*>(job.src) +
            static_cast<size_t>(layer) * static_cast<size_t>(job.src_strides.layer) * es;
  return job;
}

const char* KindName(EditOp::Kind kind) {
  switch (kind) {
    case EditOp::Kind::kInsert:
      return "insert";
    case EditOp::Kind::kDelete:
      return "delete";
    case EditOp::Kind::kReplace:
      return "replace";
  }
  return "unknown";
}

// Whether b continues a in storage and in rotation, so that the two can be one piece.
bool Continues(const Piece& a, const Piece& b) {
  if (a.hole() || b.hole()) return a.hole() && b.hole();
  return a.chunk == b.chunk && b.offset == a.offset + a.tokens &&
         b.rotated_at == a.rotated_at + a.tokens && a.table == b.table;
}

// Sorts and merges touching or overlapping ranges; drops empty ones.
std::vector<TokenRange> Merged(std::vector<TokenRange> ranges) {
  std::sort(ranges.begin(), ranges.end(), [](const TokenRange& a, const TokenRange& b) {
    return a.start < b.start || (a.start == b.start && a.end < b.end);
  });
  std::vector<TokenRange> out;
  for (const TokenRange& r : ranges) {
    if (r.size() <= 0) continue;
    if (!out.empty() && r.start <= out.back().end) {
      out.back().end = std::max(out.back().end, r.end);
    } else {
      out.push_back(r);
    }
  }
  return out;
}

absl::Status CheckRange(TokenRange range, int64_t length, absl::string_view what) {
  if (range.start < 0 || range.start > range.end || range.end > length) {
    return absl::InvalidArgumentError(absl::StrCat(what, " [", range.start, ", ", range.end,
                                                   ") must lie within [0, ", length, ")"));
  }
  return absl::OkStatus();
}

// Bytes a GPU writer stages before uploading (rounded to whole units, at least one).
constexpr uint64_t kGpuStageBytes = 64ull << 20;

// Whether a and b are the same piece (same chunk, place, rotation).
bool SamePiece(const Piece& a, const Piece& b) {
  return a.chunk == b.chunk && a.offset == b.offset && a.tokens == b.tokens &&
         a.rotated_at == b.rotated_at && a.table == b.table;
}

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// PieceList

PieceList::PieceList(std::vector<Piece> pieces) {
  for (Piece& p : pieces) {
    if (p.tokens <= 0) continue;
    length_ += p.tokens;
    pieces_.push_back(std::move(p));
  }
  if (!pieces_.empty()) MergeAround(0, pieces_.size() - 1);
}

absl::Status PieceList::ValidateEdit(int64_t length, absl::Span<const EditOp> ops,
                                     int64_t* new_length) {
  int64_t prev_end = 0;
  int64_t delta = 0;
  for (size_t k = 0; k < ops.size(); ++k) {
    const EditOp& op = ops[k];
    const char* name = KindName(op.kind);
    switch (op.kind) {
      case EditOp::Kind::kInsert:
        if (op.end != op.start) {
          return absl::InvalidArgumentError(absl::StrCat(
              "op ", k, " (insert) must have end == start ", op.start, ", got ", op.end));
        }
        break;
      case EditOp::Kind::kDelete:
        if (!op.tokens.empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat("op ", k, " (delete) carries no tokens, got ", op.tokens.size()));
        }
        break;
      case EditOp::Kind::kReplace:
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("op ", k, " has unknown kind ", static_cast<int>(op.kind)));
    }
    if (op.start < 0 || op.start > op.end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "op ", k, " (", name, ") needs 0 <= start <= end, got [", op.start, ", ", op.end, ")"));
    }
    if (op.end > length) {
      return absl::InvalidArgumentError(
          absl::StrCat("op ", k, " (", name, ") ends at ", op.end, ", past the length ", length));
    }
    if (op.start < prev_end) {
      return absl::InvalidArgumentError(
          absl::StrCat("ops must be sorted and must not overlap: op ", k, " (", name,
                       ") starts at ", op.start, ", before the end ", prev_end, " of op ", k - 1));
    }
    prev_end = op.end;
    delta += static_cast<int64_t>(op.tokens.size()) - (op.end - op.start);
  }
  if (new_length != nullptr) *new_length = length + delta;
  return absl::OkStatus();
}

size_t PieceList::SplitAt(int64_t pos) {
  int64_t start = 0;
  for (size_t i = 0; i < pieces_.size(); ++i) {
    const int64_t n = pieces_[i].tokens;
    if (pos == start) return i;
    if (pos < start + n) {
      const int64_t k = pos - start;
      Piece right = pieces_[i];
      right.tokens = n - k;
      if (!right.hole()) {
        right.offset += k;
        right.rotated_at += k;
      }
      pieces_[i].tokens = k;
      pieces_.insert(pieces_.begin() + static_cast<ptrdiff_t>(i) + 1, std::move(right));
      return i + 1;
    }
    start += n;
  }
  return pieces_.size();
}

void PieceList::MergeAround(size_t first, size_t last) {
  if (pieces_.empty()) return;
  last = std::min(last, pieces_.size() - 1);
  size_t i = first;
  while (i < last && i + 1 < pieces_.size()) {
    if (Continues(pieces_[i], pieces_[i + 1])) {
      pieces_[i].tokens += pieces_[i + 1].tokens;
      pieces_.erase(pieces_.begin() + static_cast<ptrdiff_t>(i) + 1);
      --last;
    } else {
      ++i;
    }
  }
}

void PieceList::Splice(TokenRange range, std::vector<Piece> replacement) {
  const size_t i = SplitAt(range.start);
  const size_t j = SplitAt(range.end);
  pieces_.erase(pieces_.begin() + static_cast<ptrdiff_t>(i),
                pieces_.begin() + static_cast<ptrdiff_t>(j));
  length_ -= range.size();
  size_t at = i;
  for (Piece& p : replacement) {
    if (p.tokens <= 0) continue;
    length_ += p.tokens;
    pieces_.insert(pieces_.begin() + static_cast<ptrdiff_t>(at++), std::move(p));
  }
  MergeAround(i == 0 ? 0 : i - 1, at);
}

std::vector<TokenRange> PieceList::ApplyEdit(absl::Span<const EditOp> ops,
                                             std::vector<int64_t>* edit_ends) {
  std::vector<TokenRange> inserted;
  int64_t delta = 0;
  for (const EditOp& op : ops) {
    const int64_t start = op.start + delta;
    const int64_t end = op.end + delta;
    const int64_t n = static_cast<int64_t>(op.tokens.size());
    std::vector<Piece> hole;
    if (n > 0) hole.push_back(Piece{nullptr, 0, n, 0, kBaseTable});
    Splice(TokenRange{start, end}, std::move(hole));
    if (n > 0) inserted.push_back(TokenRange{start, start + n});
    if (edit_ends != nullptr) edit_ends->push_back(start + n);
    delta += n - (op.end - op.start);
  }
  return inserted;
}

std::vector<Piece> PieceList::Cover(TokenRange range) const {
  std::vector<Piece> out;
  int64_t start = 0;
  for (const Piece& p : pieces_) {
    const int64_t end = start + p.tokens;
    const int64_t a = std::max(start, range.start);
    const int64_t b = std::min(end, range.end);
    if (a < b) {
      Piece clipped = p;
      clipped.tokens = b - a;
      if (!clipped.hole()) {
        clipped.offset += a - start;
        clipped.rotated_at += a - start;
      }
      out.push_back(std::move(clipped));
    }
    if (end >= range.end) break;
    start = end;
  }
  return out;
}

std::vector<TokenRange> PieceList::Holes() const {
  std::vector<TokenRange> holes;
  int64_t start = 0;
  for (const Piece& p : pieces_) {
    if (p.hole()) {
      if (!holes.empty() && holes.back().end == start) {
        holes.back().end += p.tokens;
      } else {
        holes.push_back(TokenRange{start, start + p.tokens});
      }
    }
    start += p.tokens;
  }
  return holes;
}

absl::StatusOr<std::vector<RerotateCopy>> PlanRead(const PieceList& pieces, TokenRange range,
                                                   int64_t base_position, RopeTableId to_table,
                                                   void* dst, const KvStrides& dst_strides,
                                                   int64_t dst_token0) {
  if (auto s = CheckRange(range, pieces.length(), "read range"); !s.ok()) return s;
  std::vector<RerotateCopy> jobs;
  int64_t logical = range.start;
  for (const Piece& p : pieces.Cover(range)) {
    if (p.hole()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "tokens [", logical, ", ", logical + p.tokens, ") of the read range await Fill"));
    }
    RerotateCopy job;
    job.src = p.chunk->data;
    job.src_strides = p.chunk->strides;
    job.src_token = p.offset;
    job.dst = dst;
    job.dst_strides = dst_strides;
    job.dst_token = dst_token0 + (logical - range.start);
    job.n_tokens = p.tokens;
    job.from_pos = p.rotated_at;
    job.from_table = p.table;
    job.to_pos = base_position + logical;
    job.to_table = to_table;
    jobs.push_back(job);
    logical += p.tokens;
  }
  return jobs;
}

KvStrides RangeStrides(const ModelSpec& spec, int64_t n) {
  const int64_t token = spec.head_dim;
  const int64_t head = token * n;
  const int64_t kv = head * spec.kv_heads;
  return KvStrides{2 * kv, kv, head, token};
}

uint64_t RangeBytes(const ModelSpec& spec, int64_t n) {
  return static_cast<uint64_t>(spec.layers) * 2 * spec.kv_heads * static_cast<uint64_t>(n) *
         spec.head_dim * DTypeSize(spec.dtype);
}

absl::StatusOr<SessionDevice> ParseSessionDevice(absl::string_view text) {
  if (text == "auto") return SessionDevice::kAuto;
  if (text == "cpu") return SessionDevice::kCpu;
  if (text == "gpu") return SessionDevice::kGpu;
  return absl::InvalidArgumentError(
      absl::StrCat("session device must be auto, cpu or gpu, got '", text, "'"));
}

const char* SessionDeviceName(SessionDevice device) {
  switch (device) {
    case SessionDevice::kAuto:
      return "auto";
    case SessionDevice::kCpu:
      return "cpu";
    case SessionDevice::kGpu:
      return "gpu";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------------
// SessionReader

uint64_t SessionReader::layer_bytes() const {
  return RangeBytes(spec_, range_.size()) / static_cast<uint64_t>(spec_.layers);
}

absl::StatusOr<std::vector<RerotateCopy>> SessionReader::PlanLayer(int layer, void* dst,
                                                                   bool keys_only) const {
  if (layer < 0 || layer >= spec_.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", spec_.layers, ")"));
  }
  const int64_t n = range_.size();
  auto jobs = PlanRead(pieces_, TokenRange{0, n}, base_position_, to_table_, dst,
                       RangeStrides(spec_, n), 0);
  if (!jobs.ok()) return jobs.status();
  const size_t es = DTypeSize(spec_.dtype);
  for (RerotateCopy& job : *jobs) {
    job = AtLayer(job, layer, es);
    job.keys_only = keys_only;
  }
  return jobs;
}

absl::Status SessionReader::WriteLayer(int layer, void* dst, bool keys_only) const {
  if (gpu_ != nullptr) {
    // GPU session: rotated into device memory (the pool reuses it across layers), copied back.
    auto on_device = LayerOnDevice(layer, keys_only);
    if (!on_device.ok()) return on_device.status();
    if (range_.size() == 0) return absl::OkStatus();
    return gpu_->Download(dst, on_device->get(), keys_only ? layer_bytes() / 2 : layer_bytes());
  }
  auto jobs = PlanLayer(layer, dst, keys_only);
  if (!jobs.ok()) return jobs.status();
  KvGeometry one_layer = BlockGeometry(spec_);
  one_layer.layers = 1;
  return RerotateCopyCpu(spec_.rope, one_layer, *jobs);
}

absl::StatusOr<std::shared_ptr<void>> SessionReader::LayerOnDevice(int layer,
                                                                   bool keys_only) const {
  if (gpu_ == nullptr) {
    return absl::FailedPreconditionError("LayerOnDevice: the session is in host memory");
  }
  auto device = gpu_->Alloc(std::max<uint64_t>(1, keys_only ? layer_bytes() / 2 : layer_bytes()));
  if (!device.ok()) return device.status();
  auto jobs = PlanLayer(layer, device->get(), keys_only);
  if (!jobs.ok()) return jobs.status();
  if (range_.size() == 0) return device;
  KvGeometry one_layer = BlockGeometry(spec_);
  one_layer.layers = 1;
  if (auto s = gpu_->Rerotate(gpu_key_, spec_.rope, one_layer, *jobs); !s.ok()) return s;
  return device;
}

absl::Status SessionReader::WriteLayerTokens(int layer, absl::Span<const int32_t> tokens,
                                             void* dst) const {
  if (layer < 0 || layer >= spec_.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", spec_.layers, ")"));
  }
  const int64_t n = range_.size();
  const int64_t m = static_cast<int64_t>(tokens.size());
  for (int64_t i = 0; i < m; ++i) {
    if (tokens[i] < 0 || tokens[i] >= n || (i > 0 && tokens[i] <= tokens[i - 1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokens must be ascending and distinct in [0, ", n, "), got ", tokens[i], " at ", i));
    }
  }
  if (m == 0) return absl::OkStatus();
  // One read plan per run of consecutive tokens, each placed after the runs before it.
  const KvStrides out = RangeStrides(spec_, m);
  const size_t es = DTypeSize(spec_.dtype);
  std::vector<RerotateCopy> jobs;
  for (int64_t i = 0; i < m;) {
    int64_t j = i + 1;
    while (j < m && tokens[j] == tokens[j - 1] + 1) ++j;
    auto run = PlanRead(pieces_, TokenRange{tokens[i], tokens[j - 1] + 1}, base_position_,
                        to_table_, dst, out, i);
    if (!run.ok()) return run.status();
    for (const RerotateCopy& job : *run) jobs.push_back(AtLayer(job, layer, es));
    i = j;
  }
  KvGeometry one_layer = BlockGeometry(spec_);
  one_layer.layers = 1;
  if (gpu_ == nullptr) return RerotateCopyCpu(spec_.rope, one_layer, jobs);
  const uint64_t bytes = RangeBytes(spec_, m) / static_cast<uint64_t>(spec_.layers);
  auto scratch = gpu_->Alloc(bytes);
  if (!scratch.ok()) return scratch.status();
  for (RerotateCopy& job : jobs) job.dst = scratch->get();
  if (auto s = gpu_->Rerotate(gpu_key_, spec_.rope, one_layer, jobs); !s.ok()) return s;
  return gpu_->Download(dst, scratch->get(), bytes);
}

namespace {

// A piece of a list with the index of its first token.
struct PlacedPiece {
  const Piece* piece;
  int64_t start;
  int64_t end() const { return start + piece->tokens; }
};

std::vector<PlacedPiece> PlacePieces(const PieceList& list) {
  std::vector<PlacedPiece> placed;
  placed.reserve(list.pieces().size());
  int64_t start = 0;
  for (const Piece& p : list.pieces()) {
    placed.push_back(PlacedPiece{&p, start});
    start += p.tokens;
  }
  return placed;
}

}  // namespace

std::vector<uint64_t> SessionReader::PageNames(int64_t page_tokens) const {
  const int64_t n = range_.size();
  const std::vector<PlacedPiece> placed = PlacePieces(pieces_);
  std::vector<uint64_t> names((n + page_tokens - 1) / page_tokens);
  std::vector<int64_t> fields;
  size_t i = 0;
  for (size_t page = 0; page < names.size(); ++page) {
    const int64_t s = static_cast<int64_t>(page) * page_tokens;
    const int64_t e = std::min(n, s + page_tokens);
    while (placed[i].end() <= s) ++i;
    // Per piece the page reads: chunk, offset, tokens, position and table read from; then the
    // position and table read at.
    fields.clear();
    for (size_t j = i; j < placed.size() && placed[j].start < e; ++j) {
      const Piece& p = *placed[j].piece;
      const int64_t from = std::max(s, placed[j].start) - placed[j].start;
      const int64_t to = std::min(e, placed[j].end()) - placed[j].start;
      fields.insert(fields.end(),
                    {p.hole() ? -1 : static_cast<int64_t>(p.chunk->serial), p.offset + from,
                     to - from, p.rotated_at + from, static_cast<int64_t>(p.table)});
    }
    fields.insert(fields.end(), {base_position_ + s, static_cast<int64_t>(to_table_)});
    names[page] = BlockChecksum(fields.data(), fields.size() * sizeof(int64_t));
  }
  return names;
}

absl::StatusOr<SessionReader::KeyPages> SessionReader::LayerKeyPages(
    int layer, int64_t page_tokens, const std::vector<int64_t>* only) const {
  if (gpu_ != nullptr) {
    return absl::FailedPreconditionError("LayerKeyPages: the session is in GPU memory");
  }
  if (layer < 0 || layer >= spec_.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", spec_.layers, ")"));
  }
  if (page_tokens < 1 || spec_.block_tokens % page_tokens != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pages of ", page_tokens, " tokens do not divide blocks of ", spec_.block_tokens));
  }
  const int64_t n = range_.size();
  const size_t es = DTypeSize(spec_.dtype);
  const KvStrides block = BlockStrides(spec_);
  const std::vector<PlacedPiece> placed = PlacePieces(pieces_);
  KeyPages out;
  out.head_stride = block.head;
  out.pages.resize((n + page_tokens - 1) / page_tokens);
  std::vector<int64_t> copied;
  size_t i = 0;
  size_t wanted = 0;  // next entry of *only
  for (size_t page = 0; page < out.pages.size(); ++page) {
    if (only != nullptr) {
      if (wanted == only->size() || (*only)[wanted] != static_cast<int64_t>(page)) continue;
      ++wanted;
    }
    const int64_t s = static_cast<int64_t>(page) * page_tokens;
    const int64_t e = std::min(n, s + page_tokens);
    while (placed[i].end() <= s) ++i;
    const Piece& p = *placed[i].piece;
    const bool in_place =
        !p.hole() && placed[i].end() >= e && p.chunk->device < 0 && p.table == to_table_ &&
        p.rotated_at - placed[i].start == base_position_ && p.chunk->strides.head == block.head &&
        p.chunk->strides.token == block.token;
    if (!in_place) {
      copied.push_back(static_cast<int64_t>(page));
      continue;
    }
    out.pages[page] =
        static_cast<const char*>(p.chunk->data) +
        (layer * p.chunk->strides.layer + (p.offset + s - placed[i].start) * block.token) * es;
  }
  for (const PlacedPiece& p : placed) {
    if (!p.piece->hole()) out.hold.push_back(p.piece->chunk);
  }
  // The other pages are read as WriteLayer reads them, page_tokens rows of a block-sized buffer
  // each.
  const int64_t per_buffer = spec_.block_tokens / page_tokens;
  const uint64_t buffer_bytes = static_cast<uint64_t>(spec_.kv_heads) * block.head * es;
  std::vector<RerotateCopy> jobs;
  char* buffer = nullptr;
  for (size_t c = 0; c < copied.size(); ++c) {
    const int64_t slot = static_cast<int64_t>(c) % per_buffer;
    if (slot == 0) {
      std::shared_ptr<char> owned(new char[buffer_bytes], std::default_delete<char[]>());
      buffer = owned.get();
      out.hold.push_back(std::move(owned));
    }
    const int64_t s = copied[c] * page_tokens;
    auto run = PlanRead(pieces_, TokenRange{s, std::min(n, s + page_tokens)}, base_position_,
                        to_table_, buffer, block, slot * page_tokens);
    if (!run.ok()) return run.status();
    for (const RerotateCopy& job : *run) {
      jobs.push_back(AtLayer(job, layer, es));
      jobs.back().keys_only = true;
    }
    out.pages[copied[c]] = buffer + slot * page_tokens * block.token * es;
  }
  out.copied_pages = static_cast<int64_t>(copied.size());
  if (jobs.empty()) return out;
  KvGeometry one_layer = BlockGeometry(spec_);
  one_layer.layers = 1;
  if (absl::Status s = RerotateCopyCpu(spec_.rope, one_layer, jobs); !s.ok()) return s;
  return out;
}

absl::Status SessionReader::WriteAll(void* dst) const {
  return WriteAllToHost(dst, RangeStrides(spec_, range_.size()), 0);
}

absl::Status SessionReader::WriteAllToHost(void* dst, const KvStrides& dst_strides,
                                           int64_t dst_token0) const {
  const int64_t n = range_.size();
  if (n == 0) return absl::OkStatus();
  if (gpu_ == nullptr) {
    auto jobs = PlanRead(pieces_, TokenRange{0, n}, base_position_, to_table_, dst, dst_strides,
                         dst_token0);
    if (!jobs.ok()) return jobs.status();
    return RerotateCopyCpu(spec_.rope, BlockGeometry(spec_), *jobs);
  }
  // GPU session: each layer is rotated into device scratch in range layout, then its 2 * kv_heads
  // rows go to their places in dst by one 2-D copy (the bytes between rows stay untouched).
  if (dst_strides.token != spec_.head_dim || dst_strides.kv != spec_.kv_heads * dst_strides.head) {
    return absl::InvalidArgumentError(
        absl::StrCat("a GPU session writes host layouts with dense tokens and heads; got strides "
                     "token ",
                     dst_strides.token, ", head ", dst_strides.head, ", kv ", dst_strides.kv));
  }
  const uint64_t es = DTypeSize(spec_.dtype);
  const uint64_t row_bytes = static_cast<uint64_t>(n) * spec_.head_dim * es;
  for (int l = 0; l < spec_.layers; ++l) {
    char* layer_dst =
        static_cast<char*>(dst) + (static_cast<uint64_t>(l) * dst_strides.layer +
                                   static_cast<uint64_t>(dst_token0) * dst_strides.token) *
                                      es;
    auto scratch = gpu_->Alloc(layer_bytes());
    if (!scratch.ok()) return scratch.status();
    auto jobs = PlanRead(pieces_, TokenRange{0, n}, base_position_, to_table_, scratch->get(),
                         RangeStrides(spec_, n), 0);
    if (!jobs.ok()) return jobs.status();
    for (RerotateCopy& job : *jobs) job = AtLayer(job, l, es);
    KvGeometry one_layer = BlockGeometry(spec_);
    one_layer.layers = 1;
    if (auto s = gpu_->Rerotate(gpu_key_, spec_.rope, one_layer, *jobs); !s.ok()) return s;
    if (auto s = gpu_->Download2D(layer_dst, static_cast<uint64_t>(dst_strides.head) * es,
                                  scratch->get(), row_bytes, row_bytes, 2ull * spec_.kv_heads);
        !s.ok()) {
      return s;
    }
  }
  return absl::OkStatus();
}

absl::Status SessionReader::WriteToDevice(void* dst, const KvStrides& dst_strides,
                                          int64_t dst_token0) const {
  if (gpu_ == nullptr) {
    return absl::FailedPreconditionError(
        "the session's KV is in host memory; a device write needs a GPU session");
  }
  const int64_t n = range_.size();
  if (n == 0) return absl::OkStatus();
  auto jobs =
      PlanRead(pieces_, TokenRange{0, n}, base_position_, to_table_, dst, dst_strides, dst_token0);
  if (!jobs.ok()) return jobs.status();
  return gpu_->Rerotate(gpu_key_, spec_.rope, BlockGeometry(spec_), *jobs);
}

// ---------------------------------------------------------------------------------------------
// SessionWriter

SessionWriter::SessionWriter(SessionStore* store, Mode mode, ModelSpec spec, int64_t n_tokens)
    : store_(store), mode_(mode), spec_(std::move(spec)), n_tokens_(n_tokens) {
  const int64_t blocks = (n_tokens + spec_.block_tokens - 1) / spec_.block_tokens;
  expected_ = mode == Mode::kOpen ? BlockBytes(spec_) * static_cast<uint64_t>(blocks)
                                  : RangeBytes(spec_, n_tokens);
  unit_bytes_ = mode == Mode::kOpen
                    ? BlockBytes(spec_)
                    : RangeBytes(spec_, n_tokens) / static_cast<uint64_t>(spec_.layers);
}

SessionWriter::~SessionWriter() = default;

absl::Status SessionWriter::Write(absl::string_view bytes) {
  if (!status_.ok()) return status_;
  if (finished_) return status_ = absl::FailedPreconditionError("Write after Finish");
  if (received_ + bytes.size() > expected_) {
    status_ =
        absl::InvalidArgumentError(absl::StrCat("KV of ", n_tokens_, " tokens is ", expected_,
                                                " bytes, got at least ", received_ + bytes.size()));
    return status_;
  }
  if (gpu_ != nullptr) return status_ = StageForGpu(bytes);
  const uint64_t bb = BlockBytes(spec_);
  const uint64_t es = DTypeSize(spec_.dtype);
  const uint64_t bt = static_cast<uint64_t>(spec_.block_tokens);
  const uint64_t token_bytes = static_cast<uint64_t>(spec_.head_dim) * es;
  const char* src = bytes.data();
  uint64_t left = bytes.size();
  while (left > 0) {
    const uint64_t o = received_;
    uint64_t n = 0;
    char* dst = nullptr;
    if (mode_ == Mode::kOpen) {
      // Block layout: block after block.
      const uint64_t block = o / bb;
      const uint64_t within = o % bb;
      n = std::min(left, bb - within);
      dst = static_cast<char*>(const_cast<void*>(chunks_[block]->data)) + within;
    } else {
      // Range layout: row r = (layer, k|v, head) holds n_tokens_ tokens; its tokens of block b sit
      // in block b's row r.
      const uint64_t row_bytes = static_cast<uint64_t>(n_tokens_) * token_bytes;
      const uint64_t row = o / row_bytes;
      const uint64_t in_row = o % row_bytes;
      const uint64_t block = in_row / (bt * token_bytes);
      const uint64_t in_block_row = in_row % (bt * token_bytes);
      const uint64_t block_row_bytes =
          std::min<uint64_t>(bt, static_cast<uint64_t>(n_tokens_) - block * bt) * token_bytes;
      n = std::min(left, block_row_bytes - in_block_row);
      dst = static_cast<char*>(const_cast<void*>(chunks_[block]->data)) + row * bt * token_bytes +
            in_block_row;
    }
    std::memcpy(dst, src, n);
    src += n;
    left -= n;
    received_ += n;
  }
  return absl::OkStatus();
}

absl::Status SessionWriter::StageForGpu(absl::string_view bytes) {
  if (stage_.empty() && expected_ > 0) {
    const uint64_t units = expected_ / unit_bytes_;
    const uint64_t batch = std::max<uint64_t>(1, std::min(units, kGpuStageBytes / unit_bytes_));
    stage_.resize(batch * unit_bytes_);
  }
  while (!bytes.empty()) {
    const uint64_t n = std::min<uint64_t>(bytes.size(), stage_.size() - staged_);
    std::memcpy(stage_.data() + staged_, bytes.data(), n);
    staged_ += n;
    received_ += n;
    bytes.remove_prefix(n);
    if (staged_ == stage_.size() || received_ == expected_) {
      if (auto s = FlushToGpu(); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

absl::Status SessionWriter::FlushToGpu() {
  // Only whole units arrive here: the stage holds whole units, and the last flush comes when
  // every expected byte (a whole number of units) is in.
  const uint64_t units = staged_ / unit_bytes_;
  if (units == 0) return absl::OkStatus();
  if (mode_ == Mode::kOpen) {
    // Block layout: unit u is block flushed_units_ + u, uploaded into its own chunk.
    for (uint64_t u = 0; u < units; ++u) {
      const KvChunk& chunk = *chunks_[flushed_units_ + u];
      if (auto s = gpu_->Upload(const_cast<void*>(chunk.data), stage_.data() + u * unit_bytes_,
                                unit_bytes_);
          !s.ok()) {
        return s;
      }
    }
  } else {
    // Range layout: `units` layers of the range, uploaded whole into scratch, then spread over the
    // blocks by one bit-exact copy launch.
    auto scratch = gpu_->Alloc(units * unit_bytes_);
    if (!scratch.ok()) return scratch.status();
    if (auto s = gpu_->Upload(scratch->get(), stage_.data(), units * unit_bytes_); !s.ok()) {
      return s;
    }
    const int64_t bt = spec_.block_tokens;
    const size_t es = DTypeSize(spec_.dtype);
    std::vector<RerotateCopy> jobs;
    for (size_t b = 0; b < chunks_.size(); ++b) {
      RerotateCopy job;
      job.src = scratch->get();
      job.src_strides = RangeStrides(spec_, n_tokens_);
      job.src_token = static_cast<int64_t>(b) * bt;
      job.dst = static_cast<char*>(const_cast<void*>(chunks_[b]->data)) +
                flushed_units_ * static_cast<uint64_t>(chunks_[b]->strides.layer) * es;
      job.dst_strides = chunks_[b]->strides;
      job.n_tokens = std::min(bt, n_tokens_ - job.src_token);
      jobs.push_back(job);  // from == to: bit for bit
    }
    KvGeometry geometry = BlockGeometry(spec_);
    geometry.layers = static_cast<int>(units);
    if (auto s = gpu_->Rerotate(gpu_key_, spec_.rope, geometry, jobs); !s.ok()) return s;
  }
  flushed_units_ += units;
  staged_ = 0;
  return absl::OkStatus();
}

absl::StatusOr<SessionResult> SessionWriter::Finish() {
  if (!status_.ok()) return status_;
  if (finished_) return absl::FailedPreconditionError("Finish called twice");
  finished_ = true;
  if (received_ < expected_) {
    status_ = absl::InvalidArgumentError(
        absl::StrCat("KV of ", n_tokens_, " tokens is ", expected_, " bytes, got ", received_));
    return status_;
  }
  auto result = store_->Commit(*this);
  if (!result.ok()) status_ = result.status();
  return result;
}

// ---------------------------------------------------------------------------------------------
// SessionStore

absl::StatusOr<std::unique_ptr<SessionStore>> SessionStore::Create(KvCache* cache,
                                                                   Options options) {
  if (cache == nullptr) return absl::InvalidArgumentError("SessionStore needs a KvCache");
  if (options.max_sessions == 0) {
    return absl::InvalidArgumentError("max_sessions must be > 0, got 0");
  }
  if (options.capacity_bytes == 0) {
    return absl::InvalidArgumentError("capacity_bytes must be > 0, got 0");
  }
  if (options.idle_ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        absl::StrCat("idle_ttl must be > 0, got ", absl::FormatDuration(options.idle_ttl)));
  }
  std::shared_ptr<SessionGpu> gpu;
  if (options.device != SessionDevice::kCpu) {
    SessionGpu::Options g;
    g.device = options.gpu_device;
    g.max_cached_bytes = options.capacity_bytes;
    auto made = SessionGpu::Create(g);
    if (made.ok()) {
      gpu = *std::move(made);
    } else if (options.device == SessionDevice::kGpu) {
      return absl::Status(
          made.status().code(),
          absl::StrCat("sessions on the GPU (--session_device=gpu): ", made.status().message()));
    }
  }
  auto store = std::unique_ptr<SessionStore>(new SessionStore(cache, std::move(options)));
  store->gpu_ = std::move(gpu);
  return store;
}

SessionStore::SessionStore(KvCache* cache, Options options)
    : cache_(cache), options_(std::move(options)), budget_(std::make_shared<Budget>()) {
  budget_->capacity = options_.capacity_bytes;
  std::random_device rd;
  id_salt_ = (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

SessionStore::~SessionStore() = default;

absl::Time SessionStore::Now() const { return options_.now ? options_.now() : absl::Now(); }

bool SessionStore::OnGpu(const ModelSpec& spec) const {
  return gpu_ != nullptr && SessionGpuSupportsHeadDim(spec.head_dim);
}

absl::StatusOr<std::shared_ptr<KvChunk>> SessionStore::NewChunk(const ModelSpec& spec) {
  const uint64_t bytes = BlockBytes(spec);
  uint64_t used = budget_->used.load();
  do {
    if (used + bytes > budget_->capacity) {
      return absl::ResourceExhaustedError(absl::StrCat("session store holds ", used, " of ",
                                                       budget_->capacity, " bytes; a block of ",
                                                       bytes, " bytes does not fit"));
    }
  } while (!budget_->used.compare_exchange_weak(used, used + bytes));
  std::shared_ptr<Budget> budget = budget_;
  if (OnGpu(spec)) {
    auto mem = gpu_->Alloc(bytes);
    if (!mem.ok()) {
      budget->used.fetch_sub(bytes);
      return mem.status();
    }
    auto chunk = std::make_shared<KvChunk>();
    chunk->serial = NextChunkSerial();
    void* const p = mem->get();  // before the deleter takes `mem` (argument order is unspecified)
    chunk->data = p;
    chunk->owner =
        std::shared_ptr<const void>(p, [mem = *std::move(mem), budget, bytes](const void*) mutable {
          mem.reset();  // back to the device pool
          budget->used.fetch_sub(bytes);
        });
    chunk->strides = BlockStrides(spec);
    chunk->tokens = spec.block_tokens;
    chunk->device = gpu_->device();
    return chunk;
  }
  char* data = new (std::nothrow) char[bytes];
  if (data == nullptr) {
    budget_->used.fetch_sub(bytes);
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " bytes"));
  }
  auto chunk = std::make_shared<KvChunk>();
  chunk->serial = NextChunkSerial();
  chunk->owner = std::shared_ptr<const void>(data, [budget, bytes](const void* p) {
    delete[] static_cast<const char*>(p);
    budget->used.fetch_sub(bytes);
  });
  chunk->data = data;
  chunk->strides = BlockStrides(spec);
  chunk->tokens = spec.block_tokens;
  return chunk;
}

int SessionStore::SweepLocked() {
  const absl::Time now = Now();
  int closed = 0;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if (now - it->second->last_used > options_.idle_ttl) {
      sessions_.erase(it++);
      ++closed;
    } else {
      ++it;
    }
  }
  return closed;
}

int SessionStore::SweepExpired() {
  absl::MutexLock lock(&mu_);
  return SweepLocked();
}

uint32_t SessionStore::sessions() const {
  absl::MutexLock lock(&mu_);
  return static_cast<uint32_t>(sessions_.size());
}

absl::Status SessionStore::CheckCountLocked() {
  if (sessions_.size() >= options_.max_sessions) SweepLocked();
  if (sessions_.size() >= options_.max_sessions) {
    return absl::ResourceExhaustedError(absl::StrCat("session capacity reached: ", sessions_.size(),
                                                     " of ", options_.max_sessions, " open"));
  }
  return absl::OkStatus();
}

std::string SessionStore::NewId() {
  return absl::StrFormat("s-%016x", SplitMix64(id_salt_ + ++next_id_));
}

absl::StatusOr<SessionStore::Session*> SessionStore::FindLocked(absl::string_view id) {
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session '", id, "'"));
  const absl::Time now = Now();
  if (now - it->second->last_used > options_.idle_ttl) {
    sessions_.erase(it);
    return absl::NotFoundError(absl::StrCat("session '", id, "' expired (idle longer than ",
                                            absl::FormatDuration(options_.idle_ttl), ")"));
  }
  it->second->last_used = now;
  return it->second.get();
}

absl::StatusOr<std::unique_ptr<SessionWriter>> SessionStore::BeginOpen(OpenSessionArgs args) {
  auto model = cache_->ResolveModel(args.model);
  if (!model.ok()) return model.status();
  if (args.base_position < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("base_position must be >= 0, got ", args.base_position));
  }
  if (args.rotated_at.has_value() && *args.rotated_at < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rotated_at must be >= 0, got ", *args.rotated_at));
  }
  if (auto s = ValidateRopeTable(model->spec.rope, args.rope_table); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (auto s = CheckCountLocked(); !s.ok()) return s;
  }
  const int64_t n = static_cast<int64_t>(args.tokens.size());
  std::unique_ptr<SessionWriter> writer(
      new SessionWriter(this, SessionWriter::Mode::kOpen, model->spec, n));
  const int64_t blocks = (n + model->spec.block_tokens - 1) / model->spec.block_tokens;
  for (int64_t b = 0; b < blocks; ++b) {
    auto chunk = NewChunk(model->spec);
    if (!chunk.ok()) return chunk.status();
    writer->chunks_.push_back(*std::move(chunk));
  }
  writer->model_id_ = model->id;
  writer->open_ = std::move(args);
  if (OnGpu(model->spec)) {
    writer->gpu_ = gpu_;
    writer->gpu_key_ = model->id;
  }
  return writer;
}

absl::StatusOr<SessionResult> SessionStore::Open(OpenSessionArgs args,
                                                 absl::string_view block_bytes) {
  auto writer = BeginOpen(std::move(args));
  if (!writer.ok()) return writer.status();
  if (auto s = (*writer)->Write(block_bytes); !s.ok()) return s;
  return (*writer)->Finish();
}

absl::StatusOr<SessionResult> SessionStore::OpenFromCache(OpenSessionArgs args) {
  auto model = cache_->ResolveModel(args.model);
  if (!model.ok()) return model.status();
  if (args.rotated_at.has_value()) {
    return absl::InvalidArgumentError(
        "OpenFromCache takes rotated_at from the cached blocks; leave it unset");
  }
  if (args.base_position < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("base_position must be >= 0, got ", args.base_position));
  }
  if (auto s = ValidateRopeTable(model->spec.rope, args.rope_table); !s.ok()) return s;
  {
    absl::MutexLock lock(&mu_);
    if (auto s = CheckCountLocked(); !s.ok()) return s;
  }
  std::vector<Piece> pieces;
  const int64_t n = static_cast<int64_t>(args.tokens.size());
  int64_t matched = 0;
  if (n > 0) {
    auto handle = cache_->AcquirePrefix(model->id, args.tenant, args.tokens, 0);
    if (!handle.ok()) return handle.status();
    const uint64_t bb = handle->block_bytes();
    for (size_t b = 0; b < handle->blocks().size(); ++b) {
      const BlockInfo& info = handle->blocks()[b];
      if (info.pre_rope) {
        return absl::FailedPreconditionError(
            absl::StrCat("cached block ", b, " holds pre-RoPE keys; sessions need post-RoPE keys"));
      }
      auto chunk = NewChunk(model->spec);
      if (!chunk.ok()) return chunk.status();
      if ((*chunk)->device >= 0) {
        if (auto s = gpu_->Upload(const_cast<void*>((*chunk)->data), handle->bytes(b).data(), bb);
            !s.ok()) {
          return s;
        }
      } else {
        std::memcpy(const_cast<void*>((*chunk)->data), handle->bytes(b).data(), bb);
      }
      pieces.push_back(
          Piece{*std::move(chunk), 0, model->spec.block_tokens, info.rotated_at, info.rope_table});
    }
    matched = handle->matched_tokens();
  }
  if (matched < n) pieces.push_back(Piece{nullptr, 0, n - matched, 0, kBaseTable});

  absl::MutexLock lock(&mu_);
  if (auto s = CheckCountLocked(); !s.ok()) return s;
  auto session = std::make_unique<Session>();
  session->model = *std::move(model);
  session->tokens = std::move(args.tokens);
  session->pieces = PieceList(std::move(pieces));
  session->base_position = args.base_position;
  session->rope_table = args.rope_table;
  session->last_used = Now();
  session->on_gpu = OnGpu(session->model.spec);
  SessionResult result;
  result.id = NewId();
  result.length = session->pieces.length();
  result.fill = session->pieces.Holes();
  sessions_.emplace(result.id, std::move(session));
  return result;
}

absl::StatusOr<SessionResult> SessionStore::Commit(SessionWriter& w) {
  const int64_t bt = w.spec_.block_tokens;
  // Resolved before taking mu_: the store never holds its lock while calling into the cache.
  absl::StatusOr<RegisteredModel> model = absl::NotFoundError("unused");
  if (w.mode_ == SessionWriter::Mode::kOpen) model = cache_->ResolveModel(w.model_id_);
  absl::MutexLock lock(&mu_);
  if (w.mode_ == SessionWriter::Mode::kOpen) {
    if (auto s = CheckCountLocked(); !s.ok()) return s;
    if (!model.ok()) return model.status();
    const int64_t rotated_at = w.open_.rotated_at.value_or(w.open_.base_position);
    std::vector<Piece> pieces;
    for (size_t b = 0; b < w.chunks_.size(); ++b) {
      const int64_t first = static_cast<int64_t>(b) * bt;
      pieces.push_back(Piece{std::move(w.chunks_[b]), 0, std::min(bt, w.n_tokens_ - first),
                             rotated_at + first, w.open_.rope_table});
    }
    w.chunks_.clear();
    auto session = std::make_unique<Session>();
    session->model = *std::move(model);
    session->tokens = std::move(w.open_.tokens);
    session->pieces = PieceList(std::move(pieces));
    session->base_position = w.open_.base_position;
    session->rope_table = w.open_.rope_table;
    session->last_used = Now();
    session->on_gpu = w.gpu_ != nullptr;
    SessionResult result;
    result.id = NewId();
    result.length = session->pieces.length();
    sessions_.emplace(result.id, std::move(session));
    return result;
  }

  auto found = FindLocked(w.session_id_);
  if (!found.ok()) return found.status();
  Session& s = **found;
  if (s.version != *w.fill_.version) {
    return absl::FailedPreconditionError(
        absl::StrCat("session '", w.session_id_, "' is at version ", s.version,
                     "; the Fill was for version ", *w.fill_.version, " (edited meanwhile)"));
  }
  const TokenRange range = w.fill_.range;
  const int64_t rotated_at = w.fill_.rotated_at.value_or(s.base_position + range.start);
  const RopeTableId table = w.fill_.rope_table.value_or(s.rope_table);
  std::vector<Piece> pieces;
  for (size_t b = 0; b < w.chunks_.size(); ++b) {
    const int64_t first = static_cast<int64_t>(b) * bt;
    pieces.push_back(Piece{std::move(w.chunks_[b]), 0, std::min(bt, range.size() - first),
                           rotated_at + first, table});
  }
  w.chunks_.clear();
  s.pieces.Splice(range, std::move(pieces));
  SessionResult result;
  result.id = w.session_id_;
  result.length = s.pieces.length();
  result.version = s.version;
  result.fill = s.pieces.Holes();
  return result;
}

absl::StatusOr<EditResult> SessionStore::Edit(absl::string_view id, absl::Span<const EditOp> ops,
                                              const EditOptions& options) {
  EditResult result;
  {
    absl::MutexLock lock(&mu_);
    auto found = FindLocked(id);
    if (!found.ok()) return found.status();
    Session& s = **found;
    int64_t new_length = 0;
    if (auto st = PieceList::ValidateEdit(s.pieces.length(), ops, &new_length); !st.ok()) {
      return st;
    }
    for (size_t i = 0; i < options.stale.size(); ++i) {
      if (auto st = CheckRange(options.stale[i], new_length, absl::StrCat("stale range ", i));
          !st.ok()) {
        return st;
      }
    }
    if (options.repair_tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("repair_tokens must be >= 0, got ", options.repair_tokens));
    }

    // Valid: from here on nothing fails.
    bool changed = false;
    std::vector<int64_t> ends;
    result.inserted = s.pieces.ApplyEdit(ops, &ends);
    int64_t delta = 0;
    std::vector<int64_t> new_starts;
    for (const EditOp& op : ops) {
      const int64_t start = op.start + delta;
      new_starts.push_back(start);
      s.tokens.erase(s.tokens.begin() + start, s.tokens.begin() + op.end + delta);
      s.tokens.insert(s.tokens.begin() + start, op.tokens.begin(), op.tokens.end());
      delta += static_cast<int64_t>(op.tokens.size()) - (op.end - op.start);
      changed = changed || op.end > op.start || !op.tokens.empty();
    }
    std::vector<TokenRange> stale = options.stale;
    if (options.repair_tokens > 0) {
      for (size_t k = 0; k < ops.size(); ++k) {
        if (ops[k].end == ops[k].start && ops[k].tokens.empty()) continue;
        const int64_t limit = k + 1 < ops.size() ? new_starts[k + 1] : new_length;
        const TokenRange r{ends[k], std::min(ends[k] + options.repair_tokens, limit)};
        if (r.size() > 0) result.repair.push_back(r);
      }
      result.repair = Merged(std::move(result.repair));
      stale.insert(stale.end(), result.repair.begin(), result.repair.end());
    }
    for (const TokenRange& r : Merged(std::move(stale))) {
      s.pieces.Splice(r, {Piece{nullptr, 0, r.size(), 0, kBaseTable}});
      changed = true;
    }
    if (changed) ++s.version;
    result.length = s.pieces.length();
    result.version = s.version;
    result.fill = s.pieces.Holes();
  }
  MaybeCompact(id);
  return result;
}

absl::StatusOr<std::unique_ptr<SessionWriter>> SessionStore::BeginFill(absl::string_view id,
                                                                       FillArgs args) {
  ModelSpec spec;
  ModelId model_id;
  {
    absl::MutexLock lock(&mu_);
    auto found = FindLocked(id);
    if (!found.ok()) return found.status();
    Session& s = **found;
    if (args.version.has_value() && *args.version != s.version) {
      return absl::FailedPreconditionError(absl::StrCat("session '", id, "' is at version ",
                                                        s.version, ", the Fill is for version ",
                                                        *args.version));
    }
    args.version = s.version;
    if (auto st = CheckRange(args.range, s.pieces.length(), "fill range"); !st.ok()) return st;
    if (args.rotated_at.has_value() && *args.rotated_at < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("rotated_at must be >= 0, got ", *args.rotated_at));
    }
    if (args.rope_table.has_value()) {
      if (auto st = ValidateRopeTable(s.model.spec.rope, *args.rope_table); !st.ok()) return st;
    }
    spec = s.model.spec;
    model_id = s.model.id;
  }
  const int64_t n = args.range.size();
  std::unique_ptr<SessionWriter> writer(
      new SessionWriter(this, SessionWriter::Mode::kFill, spec, n));
  const int64_t blocks = (n + spec.block_tokens - 1) / spec.block_tokens;
  for (int64_t b = 0; b < blocks; ++b) {
    auto chunk = NewChunk(spec);
    if (!chunk.ok()) return chunk.status();
    writer->chunks_.push_back(*std::move(chunk));
  }
  writer->session_id_ = std::string(id);
  writer->fill_ = std::move(args);
  if (OnGpu(spec)) {
    writer->gpu_ = gpu_;
    writer->gpu_key_ = model_id;
  }
  return writer;
}

absl::StatusOr<SessionResult> SessionStore::Fill(absl::string_view id, FillArgs args,
                                                 absl::string_view range_bytes) {
  auto writer = BeginFill(id, std::move(args));
  if (!writer.ok()) return writer.status();
  if (auto s = (*writer)->Write(range_bytes); !s.ok()) return s;
  return (*writer)->Finish();
}

absl::StatusOr<SessionReader> SessionStore::Read(absl::string_view id,
                                                 std::optional<TokenRange> range,
                                                 std::optional<RopeTableId> to_table) {
  absl::MutexLock lock(&mu_);
  auto found = FindLocked(id);
  if (!found.ok()) return found.status();
  Session& s = **found;
  const TokenRange r = range.value_or(TokenRange{0, s.pieces.length()});
  if (auto st = CheckRange(r, s.pieces.length(), "read range"); !st.ok()) return st;
  const RopeTableId table = to_table.value_or(s.rope_table);
  if (auto st = ValidateRopeTable(s.model.spec.rope, table); !st.ok()) return st;
  std::vector<Piece> cover = s.pieces.Cover(r);
  int64_t logical = r.start;
  for (const Piece& p : cover) {
    if (p.hole()) {
      return absl::FailedPreconditionError(absl::StrCat("session '", id, "': tokens [", logical,
                                                        ", ", logical + p.tokens, ") await Fill"));
    }
    logical += p.tokens;
  }
  SessionReader reader;
  if (s.on_gpu) {
    reader.gpu_ = gpu_;
    reader.gpu_key_ = s.model.id;
  }
  reader.spec_ = s.model.spec;
  reader.range_ = r;
  reader.pieces_ = PieceList(std::move(cover));
  reader.base_position_ = s.base_position + r.start;
  reader.to_table_ = table;
  reader.version_ = s.version;
  reader.length_ = s.pieces.length();
  return reader;
}

absl::StatusOr<SessionResult> SessionStore::Snapshot(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  auto found = FindLocked(id);
  if (!found.ok()) return found.status();
  const Session& s = **found;
  if (auto st = CheckCountLocked(); !st.ok()) return st;
  auto copy = std::make_unique<Session>(s);
  copy->last_used = Now();
  SessionResult result;
  result.id = NewId();
  result.length = copy->pieces.length();
  result.version = copy->version;
  result.fill = copy->pieces.Holes();
  sessions_.emplace(result.id, std::move(copy));
  return result;
}

absl::StatusOr<SessionInfo> SessionStore::Info(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  auto found = FindLocked(id);
  if (!found.ok()) return found.status();
  const Session& s = **found;
  SessionInfo info;
  info.id = std::string(id);
  info.model = s.model.id;
  info.tokens = s.tokens;
  info.length = s.pieces.length();
  info.base_position = s.base_position;
  info.rope_table = s.rope_table;
  info.version = s.version;
  info.fill = s.pieces.Holes();
  info.pieces = s.pieces.pieces().size();
  absl::flat_hash_set<const KvChunk*> chunks;
  for (const Piece& p : s.pieces.pieces()) {
    if (!p.hole()) chunks.insert(p.chunk.get());
  }
  info.stored_bytes = chunks.size() * BlockBytes(s.model.spec);
  info.device = s.on_gpu ? gpu_->device() : -1;
  return info;
}

absl::StatusOr<ModelSpec> SessionStore::ModelSpecOf(absl::string_view model) {
  auto m = cache_->ResolveModel(model);
  if (!m.ok()) return m.status();
  return m->spec;
}

absl::StatusOr<ModelSpec> SessionStore::SessionSpec(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  auto found = FindLocked(id);
  if (!found.ok()) return found.status();
  return (*found)->model.spec;
}

absl::Status SessionStore::Close(absl::string_view id) {
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return absl::NotFoundError(absl::StrCat("unknown session '", id, "'"));
  sessions_.erase(it);
  return absl::OkStatus();
}

void SessionStore::MaybeCompact(absl::string_view id) {
  // Partly referenced blocks waste memory after many scattered deletions. When more than half of
  // the stored tokens are unreferenced, the live pieces are copied bit for bit into dense blocks;
  // every piece keeps its rotated_at (no rotation happens, so nothing is ever rotated twice).
  PieceList before;
  ModelSpec spec;
  ModelId model_id;
  bool on_gpu = false;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(id);
    if (it == sessions_.end()) return;
    const Session& s = *it->second;
    int64_t live = 0;
    absl::flat_hash_set<const KvChunk*> chunks;
    for (const Piece& p : s.pieces.pieces()) {
      if (p.hole()) continue;
      live += p.tokens;
      chunks.insert(p.chunk.get());
    }
    const int64_t bt = s.model.spec.block_tokens;
    const int64_t stored = static_cast<int64_t>(chunks.size()) * bt;
    if (stored <= 2 * live + 2 * bt) return;
    before = s.pieces;
    spec = s.model.spec;
    model_id = s.model.id;
    on_gpu = s.on_gpu;
  }
  const int64_t bt = spec.block_tokens;
  std::vector<Piece> after;
  std::vector<RerotateCopy> jobs;
  std::shared_ptr<KvChunk> block;
  int64_t used = bt;  // tokens used in `block`
  for (const Piece& p : before.pieces()) {
    if (p.hole()) {
      after.push_back(p);
      continue;
    }
    int64_t done = 0;
    while (done < p.tokens) {
      if (used == bt) {
        auto chunk = NewChunk(spec);
        if (!chunk.ok()) return;  // no room to compact: stay as is
        block = *std::move(chunk);
        used = 0;
      }
      const int64_t n = std::min(p.tokens - done, bt - used);
      RerotateCopy job;
      job.src = p.chunk->data;
      job.src_strides = p.chunk->strides;
      job.src_token = p.offset + done;
      job.dst = const_cast<void*>(block->data);
      job.dst_strides = block->strides;
      job.dst_token = used;
      job.n_tokens = n;
      job.from_pos = job.to_pos = p.rotated_at + done;  // bit-exact copy
      job.from_table = job.to_table = p.table;
      jobs.push_back(job);
      after.push_back(Piece{block, used, n, p.rotated_at + done, p.table});
      used += n;
      done += n;
    }
  }
  if (!RunJobs(on_gpu, model_id, spec, jobs).ok()) return;
  absl::MutexLock lock(&mu_);
  auto it = sessions_.find(id);
  if (it == sessions_.end()) return;
  Session& s = *it->second;
  // Commit only if no Edit or Fill changed the pieces meanwhile (pieces are compared by value).
  const auto& now = s.pieces.pieces();
  if (now.size() != before.pieces().size()) return;
  for (size_t i = 0; i < now.size(); ++i) {
    if (!SamePiece(now[i], before.pieces()[i])) return;
  }
  s.pieces = PieceList(std::move(after));
}

}  // namespace ropekv

namespace ropekv {

absl::Status SessionStore::RunJobs(bool on_gpu, const ModelId& key, const ModelSpec& spec,
                                   absl::Span<const RerotateCopy> jobs) {
  if (on_gpu) return gpu_->Rerotate(key, spec.rope, BlockGeometry(spec), jobs);
  return RerotateCopyCpu(spec.rope, BlockGeometry(spec), jobs);
}

absl::StatusOr<SessionResult> SessionStore::CopyInAndCommit(SessionWriter& w, int64_t n,
                                                            const KvSource& src) {
  const bool gpu_chunks = w.gpu_ != nullptr;
  if (src.device >= 0 && (!gpu_chunks || src.device != gpu_->device())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "KV on CUDA device ", src.device,
        " can be copied only into sessions on that device; "
        "this session is ",
        gpu_chunks ? absl::StrCat("on device ", gpu_->device()) : std::string("in host memory")));
  }
  const ModelSpec& spec = w.spec_;
  if (n > 0 && src.device < 0 && gpu_chunks) {
    // Host source, GPU session: pack the n tokens into the writer's layout (block layout for Open,
    // range layout for Fill) on the host, then the writer's pinned-staging upload.
    std::vector<char> packed(w.expected_);
    const int64_t bt = spec.block_tokens;
    std::vector<RerotateCopy> pack;
    if (w.mode_ == SessionWriter::Mode::kOpen) {
      for (size_t b = 0; b < w.chunks_.size(); ++b) {
        const int64_t first = static_cast<int64_t>(b) * bt;
        pack.push_back(RerotateCopy{src.data, src.strides, src.token0 + first,
                                    packed.data() + b * BlockBytes(spec), BlockStrides(spec), 0,
                                    std::min(bt, n - first)});
      }
    } else {
      pack.push_back(RerotateCopy{src.data, src.strides, src.token0, packed.data(),
                                  RangeStrides(spec, n), 0, n});
    }
    if (auto s = RerotateCopyCpu(spec.rope, BlockGeometry(spec), pack); !s.ok()) return s;
    if (auto s = w.Write(absl::string_view(packed.data(), packed.size())); !s.ok()) return s;
    return w.Finish();
  }
  // Same memory on both sides (host -> host, or device -> device on one GPU): one bit-exact copy
  // pass from the source into the chunks.
  const int64_t bt = spec.block_tokens;
  std::vector<RerotateCopy> jobs;
  for (size_t b = 0; b < w.chunks_.size(); ++b) {
    const int64_t first = static_cast<int64_t>(b) * bt;
    jobs.push_back(RerotateCopy{src.data, src.strides, src.token0 + first,
                                const_cast<void*>(w.chunks_[b]->data), w.chunks_[b]->strides, 0,
                                std::min(bt, n - first)});
  }
  if (!jobs.empty()) {
    if (auto s = RunJobs(gpu_chunks, w.gpu_key_, spec, jobs); !s.ok()) return s;
  }
  w.received_ = w.expected_;
  return w.Finish();
}

absl::StatusOr<SessionResult> SessionStore::OpenFrom(OpenSessionArgs args, const KvSource& src) {
  const int64_t n = static_cast<int64_t>(args.tokens.size());
  if ((src.data == nullptr && n > 0) || src.token0 < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("OpenFrom needs a source and token0 >= 0, got token0 ", src.token0));
  }
  auto writer = BeginOpen(std::move(args));
  if (!writer.ok()) return writer.status();
  return CopyInAndCommit(**writer, n, src);
}

absl::StatusOr<SessionResult> SessionStore::FillFrom(absl::string_view id, FillArgs args,
                                                     const KvSource& src) {
  const int64_t n = args.range.size();
  if ((src.data == nullptr && n > 0) || src.token0 < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("FillFrom needs a source and token0 >= 0, got token0 ", src.token0));
  }
  auto writer = BeginFill(id, std::move(args));
  if (!writer.ok()) return writer.status();
  return CopyInAndCommit(**writer, n, src);
}

}  // namespace ropekv
