// Request validation and the plan of a selection, shared by the CPU and CUDA paths.
#include "kernels/topk/topk.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kernels/topk/topk_internal.h"

namespace ropekv {
namespace topk {

bool IsSupportedHeadDim(int head_dim) {
  return head_dim == 64 || head_dim == 128 || head_dim == 256;
}

int64_t SelectRows(const SelectRequest& req) {
  return req.reduction == GqaReduction::kPerQueryHead ? req.query_heads : req.kv_heads;
}

int64_t SelectCapacity(const SelectRequest& req) {
  const int64_t k_tokens = req.mode == Mode::kBound
                               ? NumPages(std::max<int64_t>(req.k, 0)) * kPageTokens
                               : std::max<int64_t>(req.k, 0);
  const int64_t want =
      std::max<int64_t>(req.n_sink, 0) + std::max<int64_t>(req.n_local, 0) + k_tokens;
  return std::min<int64_t>(req.num_tokens, want);
}

namespace internal {
namespace {

bool ValidDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

size_t AlignUp(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

// Appends `bytes` to a layout being built and returns the piece's offset.
size_t Take(size_t* cursor, size_t bytes) {
  const size_t at = *cursor;
  *cursor = AlignUp(at + bytes);
  return at;
}

// The split and floor selections' per-block words of a selection over [rows][len].
void TakeBlocks(size_t* cursor, size_t rows, int64_t len, SelectionLayout* l) {
  l->block_stride = SelBlocksBound(len);
  l->blocks = Take(cursor, rows * static_cast<size_t>(l->block_stride) * 4);
}

std::atomic<bool> g_tensor_core_scoring{true};
std::atomic<bool> g_small_row_selection{true};
std::atomic<bool> g_chunk_selection{true};
std::atomic<bool> g_split_selection{true};
std::atomic<bool> g_floor_selection{true};
std::atomic<uint64_t> g_path_counts[static_cast<int>(SelectionPath::kFilter) + 1];

}  // namespace

void SetTensorCoreScoring(bool on) { g_tensor_core_scoring.store(on, std::memory_order_relaxed); }
bool TensorCoreScoring() { return g_tensor_core_scoring.load(std::memory_order_relaxed); }
void SetSmallRowSelection(bool on) { g_small_row_selection.store(on, std::memory_order_relaxed); }
bool SmallRowSelection() { return g_small_row_selection.load(std::memory_order_relaxed); }
void SetChunkSelection(bool on) { g_chunk_selection.store(on, std::memory_order_relaxed); }
bool ChunkSelection() { return g_chunk_selection.load(std::memory_order_relaxed); }
void SetSplitSelection(bool on) { g_split_selection.store(on, std::memory_order_relaxed); }
bool SplitSelection() { return g_split_selection.load(std::memory_order_relaxed); }
void SetFloorSelection(bool on) { g_floor_selection.store(on, std::memory_order_relaxed); }
bool FloorSelection() { return g_floor_selection.load(std::memory_order_relaxed); }
void CountSelection(SelectionPath path) {
  g_path_counts[static_cast<int>(path)].fetch_add(1, std::memory_order_relaxed);
}
SelectionPathCounts SelectionPaths() {
  auto get = [](SelectionPath p) {
    return g_path_counts[static_cast<int>(p)].load(std::memory_order_relaxed);
  };
  SelectionPathCounts c;
  c.small = get(SelectionPath::kSmall);
  c.chunk = get(SelectionPath::kChunk);
  c.rounds = get(SelectionPath::kRounds);
  c.floor = get(SelectionPath::kFloor);
  c.split = get(SelectionPath::kSplit);
  c.filter = get(SelectionPath::kFilter);
  return c;
}

ChunkPlan PlanChunkSelect(int64_t len, int64_t k_sel, int64_t rows, int64_t group) {
  // Keys a thread (a power of two, at least lo) for n keys over one block.
  const auto per_thread = [](int64_t n, int lo) {
    int p = lo;
    while (p * int64_t{kOneBlockThreads} < n) p *= 2;
    return p;
  };
  const int64_t tiles = (len + kScoreTileTokens - 1) / kScoreTileTokens;
  ChunkPlan best;
  for (int pool = 1; pool <= 32; pool *= 2) {
    const int64_t chunks = (tiles + pool - 1) / pool;
    const int64_t slots = k_sel * kScoreTileTokens * pool;
    if (chunks > kOneBlockMaxKeys || slots > kOneBlockMaxKeys) continue;
    ChunkPlan c;
    c.pool = pool;
    c.per1 = per_thread(chunks, 2);
    c.per2 = per_thread(slots, 4);
    if (best.pool == 0 || c.per1 + c.per2 < best.per1 + best.per2) best = c;
  }
  if (best.pool > 0 || k_sel > kRoundsMaxK) return best;
  // Rounds: the smallest pool whose chunk keys fit one block (larger ones only stream more).
  int pool = 1;
  while (pool <= 32 && (tiles + pool - 1) / pool > kOneBlockMaxKeys) pool *= 2;
  const int64_t chunks = (tiles + pool - 1) / pool;
  const bool half = rows >= kRoundsHalf || group >= kRoundsHalf;
  if (pool > 32 || (half ? 2 : 4) * k_sel > chunks) return best;
  best.pool = pool;
  best.per1 = per_thread(chunks, 2);
  best.rounds = true;
  return best;
}

absl::Status ValidateShape(const SelectRequest& req) {
  if (req.kv_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv_heads must be >= 1, got ", req.kv_heads));
  }
  if (req.query_heads < 1 || req.query_heads % req.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_heads must be a positive multiple of kv_heads (", req.kv_heads,
                     "), got ", req.query_heads));
  }
  if (!IsSupportedHeadDim(req.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim must be 64, 128 or 256, got ", req.head_dim));
  }
  if (req.num_tokens < 1 || req.num_tokens > std::numeric_limits<int32_t>::max() - 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens must be in [1, 2^31 - 33], got ", req.num_tokens));
  }
  if (!ValidDType(req.query_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("query_dtype must be f32, f16 or bf16, got ",
                                                   static_cast<int>(req.query_dtype)));
  }
  if (req.mode != Mode::kExact && req.mode != Mode::kBound && req.mode != Mode::kBoundThenExact) {
    return absl::InvalidArgumentError(absl::StrCat(
        "mode must be kExact, kBound or kBoundThenExact, got ", static_cast<int>(req.mode)));
  }
  if (req.reduction != GqaReduction::kMax && req.reduction != GqaReduction::kSum &&
      req.reduction != GqaReduction::kPerQueryHead) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reduction must be kMax, kSum or kPerQueryHead, got ", static_cast<int>(req.reduction)));
  }
  if (req.k < 1) return absl::InvalidArgumentError(absl::StrCat("k must be >= 1, got ", req.k));
  if (req.n_sink < 0 || req.n_local < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_sink and n_local must be >= 0, got ", req.n_sink, " and ", req.n_local));
  }
  if (req.candidate_tokens < 0 || (req.candidate_tokens != 0 && req.candidate_tokens < req.k)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "candidate_tokens must be 0 (4 * k) or >= k = ", req.k, ", got ", req.candidate_tokens));
  }
  if (!std::isfinite(req.softmax_scale)) {
    return absl::InvalidArgumentError("softmax_scale must be finite (0 means 1/sqrt(head_dim))");
  }
  return absl::OkStatus();
}

absl::Status ValidateView(const MatrixView& v, const char* name, int64_t width, int64_t rows,
                          int heads) {
  if (!ValidDType(v.dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".dtype must be f32, f16 or bf16, got ", static_cast<int>(v.dtype)));
  }
  if (v.blocks == nullptr && v.base == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": base or blocks must be set"));
  }
  if (v.blocks != nullptr && v.rows_per_block < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".rows_per_block must be >= 1 with blocks, got ", v.rows_per_block));
  }
  if (v.row_stride < width && rows > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".row_stride must be >= the row width ", width, ", got ", v.row_stride));
  }
  if (heads > 1 && v.head_stride < width) {
    return absl::InvalidArgumentError(absl::StrCat(name, ".head_stride must be >= the row width ",
                                                   width, ", got ", v.head_stride));
  }
  if (v.row_stride < 0 || v.head_stride < 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": strides must be >= 0"));
  }
  const size_t esize = DTypeSize(v.dtype);
  if (v.blocks == nullptr && reinterpret_cast<uintptr_t>(v.base) % esize != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, ".base must be aligned to the element size ", esize));
  }
  return absl::OkStatus();
}

absl::Status ValidatePageMetaArgs(const MatrixView& keys, const PageMetaShape& shape,
                                  const MutableMatrixView& meta) {
  if (shape.kv_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv_heads must be >= 1, got ", shape.kv_heads));
  }
  if (!IsSupportedHeadDim(shape.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim must be 64, 128 or 256, got ", shape.head_dim));
  }
  if (shape.num_tokens < 1 || shape.num_tokens > std::numeric_limits<int32_t>::max() - 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens must be in [1, 2^31 - 33], got ", shape.num_tokens));
  }
  absl::Status s = ValidateView(keys, "keys", shape.head_dim, shape.num_tokens, shape.kv_heads);
  if (!s.ok()) return s;
  MatrixView m;
  m.dtype = meta.dtype;
  m.base = meta.base;
  m.blocks = reinterpret_cast<const void* const*>(meta.blocks);
  m.rows_per_block = meta.rows_per_block;
  m.head_stride = meta.head_stride;
  m.row_stride = meta.row_stride;
  return ValidateView(m, "page_meta", 2 * shape.head_dim, NumPages(shape.num_tokens),
                      shape.kv_heads);
}

absl::Status ValidateGather(const GatherRequest& req) {
  if (req.kv_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv_heads must be >= 1, got ", req.kv_heads));
  }
  if (!IsSupportedHeadDim(req.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat("head_dim must be 64, 128 or 256, got ", req.head_dim));
  }
  if (req.num_tokens < 1 || req.num_tokens > std::numeric_limits<int32_t>::max() - 32) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens must be in [1, 2^31 - 33], got ", req.num_tokens));
  }
  if (req.rows < 1 || req.rows % req.kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("rows must be a positive multiple of kv_heads (",
                                                   req.kv_heads, "), got ", req.rows));
  }
  if (req.capacity < 0) {
    return absl::InvalidArgumentError(absl::StrCat("capacity must be >= 0, got ", req.capacity));
  }
  if (req.capacity > 0 && req.indices == nullptr) {
    return absl::InvalidArgumentError("indices must be set");
  }
  if (req.dst_keys != nullptr) {
    absl::Status s = ValidateView(req.keys, "keys", req.head_dim, req.num_tokens, req.kv_heads);
    if (!s.ok()) return s;
  }
  if (req.dst_values != nullptr) {
    absl::Status s = ValidateView(req.values, "values", req.head_dim, req.num_tokens, req.kv_heads);
    if (!s.ok()) return s;
  }
  if (req.dst_keys != nullptr && req.dst_values != nullptr && req.keys.dtype != req.values.dtype) {
    return absl::InvalidArgumentError(absl::StrCat("values must have the dtype of keys (",
                                                   DTypeName(req.keys.dtype), "), got ",
                                                   DTypeName(req.values.dtype)));
  }
  return absl::OkStatus();
}

absl::StatusOr<SelectPlan> MakeSelectPlan(const SelectRequest& req, bool want_mass) {
  absl::Status s = ValidateShape(req);
  if (!s.ok()) return s;
  if (want_mass && !ValidDType(req.keys.dtype)) {
    return absl::InvalidArgumentError("keys.dtype must be f32, f16 or bf16");
  }
  SelectPlan p;
  const int64_t n = req.num_tokens;
  p.rows = SelectRows(req);
  p.group = req.query_heads / req.kv_heads;
  p.pages = NumPages(n);
  p.capacity = SelectCapacity(req);
  p.want_mass = want_mass;
  switch (req.mode) {
    case Mode::kExact:
      p.len = n;
      p.k_sel = std::min(req.k, n);
      break;
    case Mode::kBound:
      p.len = p.pages;
      p.k_sel = std::min(NumPages(req.k), p.pages);
      break;
    case Mode::kBoundThenExact:
      p.len = p.pages;
      p.cand_pages = std::min(NumPages(CandidateTokens(req)), p.pages);
      p.k_sel = p.cand_pages;
      p.len2 = p.cand_pages * kPageTokens;
      p.k_sel2 = std::min(req.k, p.len2);
      break;
  }
  p.bitmap_words = (n + 31) / 32;
  if (want_mass) {
    const int64_t tile_rows = ScoreTileRows(req.keys.dtype, req.head_dim);
    p.lse_parts = (n + tile_rows - 1) / tile_rows * kScoreWarps;
  }

  const size_t rows = static_cast<size_t>(p.rows);
  const size_t hist_bytes = rows * kRadixBins * 4;
  size_t cur = 0;
  // Zeroed region first, in one piece.
  p.zero_begin = cur;
  p.sel.hist0 = Take(&cur, hist_bytes);
  p.sel.hist1 = Take(&cur, hist_bytes);
  p.sel.counters = Take(&cur, rows * kCountersPerRow * 4);
  if (req.mode == Mode::kBoundThenExact) {
    p.sel2.hist0 = Take(&cur, hist_bytes);
    p.sel2.hist1 = Take(&cur, hist_bytes);
    p.sel2.counters = Take(&cur, rows * kCountersPerRow * 4);
  }
  p.bitmap = Take(&cur, rows * static_cast<size_t>(p.bitmap_words) * 4);
  p.zero_end = cur;
  p.scores = Take(&cur, rows * static_cast<size_t>(p.len) * 4);
  p.sel.cand = Take(&cur, rows * static_cast<size_t>(p.len) * 4);
  TakeBlocks(&cur, rows, p.len, &p.sel);
  if (req.mode == Mode::kBoundThenExact) {
    p.pages_list = Take(&cur, rows * static_cast<size_t>(p.cand_pages) * 4);
    p.scores2 = Take(&cur, rows * static_cast<size_t>(p.len2) * 4);
    p.sel2.cand = Take(&cur, rows * static_cast<size_t>(p.len2) * 4);
  }
  if (want_mass) {
    p.lse = Take(&cur, static_cast<size_t>(req.query_heads) * p.lse_parts * 8);
  }
  p.total = cur;
  return p;
}

absl::StatusOr<SelectPlan> MakeTopKPlan(int64_t rows, int64_t len, int64_t k) {
  if (rows < 1 || len < 1 || len > std::numeric_limits<int32_t>::max() - 32 || k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("top-k needs rows >= 1, 1 <= len < 2^31 - 32 and k >= 1; got rows ", rows,
                     ", len ", len, ", k ", k));
  }
  SelectPlan p;
  p.rows = rows;
  p.len = len;
  p.k_sel = std::min(k, len);
  p.capacity = p.k_sel;
  p.bitmap_words = (len + 31) / 32;
  const size_t r = static_cast<size_t>(rows);
  size_t cur = 0;
  p.zero_begin = cur;
  p.sel.hist0 = Take(&cur, r * kRadixBins * 4);
  p.sel.hist1 = Take(&cur, r * kRadixBins * 4);
  p.sel.counters = Take(&cur, r * kCountersPerRow * 4);
  p.bitmap = Take(&cur, r * static_cast<size_t>(p.bitmap_words) * 4);
  p.zero_end = cur;
  p.sel.cand = Take(&cur, r * static_cast<size_t>(len) * 4);
  TakeBlocks(&cur, r, len, &p.sel);
  p.total = cur;
  return p;
}

}  // namespace internal

bool SelectReadsKeys(Mode mode, bool want_scores, bool want_mass) {
  return mode != Mode::kBound || want_scores || want_mass;
}

absl::Status ValidateSelectRequest(const SelectRequest& req, const SelectResult& result) {
  absl::Status s = internal::ValidateShape(req);
  if (!s.ok()) return s;
  if (req.queries == nullptr) return absl::InvalidArgumentError("queries must be set");
  const bool reads_meta = req.mode != Mode::kExact;
  if (SelectReadsKeys(req.mode, result.scores != nullptr, result.mass != nullptr)) {
    s = internal::ValidateView(req.keys, "keys", req.head_dim, req.num_tokens, req.kv_heads);
    if (!s.ok()) return s;
  }
  if (reads_meta) {
    s = internal::ValidateView(req.page_meta, "page_meta", 2 * req.head_dim,
                               NumPages(req.num_tokens), req.kv_heads);
    if (!s.ok()) return s;
  }
  if (result.indices == nullptr) return absl::InvalidArgumentError("result.indices must be set");
  return absl::OkStatus();
}

absl::StatusOr<size_t> SelectWorkspaceBytes(const SelectRequest& req, bool want_mass) {
  absl::StatusOr<internal::SelectPlan> plan = internal::MakeSelectPlan(req, want_mass);
  if (!plan.ok()) return plan.status();
  return plan->total;
}

absl::StatusOr<size_t> TopKWorkspaceBytes(int64_t rows, int64_t len, int64_t k) {
  absl::StatusOr<internal::SelectPlan> plan = internal::MakeTopKPlan(rows, len, k);
  if (!plan.ok()) return plan.status();
  return plan->total;
}

}  // namespace topk
}  // namespace ropekv
