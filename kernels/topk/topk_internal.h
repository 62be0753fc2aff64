// Internals shared by the CPU reference (topk_ref.cc), the validation (topk.cc) and the CUDA
// version (topk.cu): request checks, the plan of a selection (lengths, k per stage, workspace
// layout) and the launch constants the plan depends on. Not part of the public API.
#ifndef ROPEKV_KERNELS_TOPK_TOPK_INTERNAL_H_
#define ROPEKV_KERNELS_TOPK_TOPK_INTERNAL_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/topk/topk.h"
#include "kernels/topk/topk_math.h"

namespace ropekv {
namespace topk {
namespace internal {

// Launch constants of the tiled scoring kernel (topk.cu). A tile stages kScoreThreads row
// segments of at most kSegBytes bytes; a row of row_bytes is split into row_bytes / kSegBytes
// segments (one thread each), so a tile holds kScoreThreads / segments rows. LSE partials are
// kept per (tile, warp).
inline constexpr int kScoreThreads = 128;
inline constexpr int kSegBytes = 256;
inline constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int64_t ScoreTileRows(DType dtype, int64_t width) {
  const int64_t row_bytes = width * static_cast<int64_t>(DTypeSize(dtype));
  const int64_t segments = row_bytes > kSegBytes ? row_bytes / kSegBytes : 1;
  return kScoreThreads / segments;
}

// Whether the CUDA path scores bf16 rows on tensor cores (TcScoreKernel; default on). Off: the
// CUDA-core ScoreTilesKernel scores everything. For tests and benchmarks that compare the two;
// process-wide, thread-safe.
void SetTensorCoreScoring(bool on);
bool TensorCoreScoring();
// Whether a selection over rows of at most 16384 elements (exact or bound, not bound-then-exact)
// runs in one block per row in shared memory (SmallSelectKernel; default on) instead of the
// multi-block threshold filter. Same contract as above.
void SetSmallRowSelection(bool on);
bool SmallRowSelection();
// Whether an exact selection over rows of more than 16384 tokens scored on tensor cores
// (k * 16 <= 16384, no captured mass) starts from the scorer's per-tile maxima in one block per
// row (ChunkSelectKernel; default on) instead of the multi-block threshold filter. Same contract.
void SetChunkSelection(bool on);
bool ChunkSelection();
// Whether the multi-block threshold filter's exact token rows (and TopKCuda's rows) are selected
// in three grids (SplitFilterKernel, SplitResolveKernel, SplitWriteKernel; default on) instead
// of FilterKernel, whose last block of a row resolves the candidates and writes the row alone.
// Same contract as above.
void SetSplitSelection(bool on);
bool SplitSelection();
// Whether an exact selection over rows of 16K-256K tokens scored on tensor cores that the chunk
// selection does not take (k <= 4096 and at most half the row's tiles) starts from the k-th largest
// tile maximum, a floor below which no chosen token lies (FloorKernel, FloorFilterKernel,
// FloorSelectKernel; default on), instead of the threshold filter. Same contract.
void SetFloorSelection(bool on);
bool FloorSelection();
inline constexpr int64_t kFloorMaxTiles = 16384;

// How many selections each CUDA path has enqueued in this process: for tests that must know which
// path ran. Relaxed atomics, one increment per enqueued selection.
enum class SelectionPath { kSmall, kChunk, kRounds, kFloor, kSplit, kFilter };  // kFilter last
void CountSelection(SelectionPath path);
struct SelectionPathCounts {
  uint64_t small = 0, chunk = 0, rounds = 0, floor = 0, split = 0, filter = 0;
};
SelectionPathCounts SelectionPaths();

// The one-block selections of topk.cu (SmallSelectKernel, ChunkSelectKernel): kOneBlockThreads
// threads hold at most kOneBlockMaxKeys keys; the tensor-core scorer's tiles are kScoreTileTokens
// rows.
inline constexpr int kOneBlockThreads = 1024;
inline constexpr int kOneBlockMaxKeys = 16384;
inline constexpr int kScoreTileTokens = 16;

// How ChunkSelectKernel splits a row of `len` tokens for k_sel: chunks of `pool` tiles; its first
// selection takes per1 chunk keys a thread, its second per2 tokens a thread (the tokens of up to
// k_sel chosen chunks; per2 divides the chunk's tokens, so a thread's run lies in one chunk).
// `rounds`: the chosen chunks' tokens exceed one block, and ChunkRoundsKernel streams them instead
// (per2 0): k_sel <= kRoundsMaxK, and the k_sel chunks are at most a quarter of the row's, or half
// of it where there are kRoundsHalf rows or more, or query heads per KV head (one block a row
// streams half of each row; the filter path spreads a row over many blocks, but its histogram
// fused into the scorer costs more the larger the group. On the H100 at 128K, k 4096: 8 rows of 1
// or 4 heads, filter 129.9 / 132.7 µs against rounds 132.9 / 134.5; of 64 heads, 247.6 against
// 229.8; 32 rows, 169.9 against 136.2).
struct ChunkPlan {
  int pool = 0;  // tiles a chunk (1..32, a power of two); 0: neither kernel takes the row
  int per1 = 0;  // 2, 4, 8 or 16
  int per2 = 0;  // 4, 8 or 16; 0 with rounds
  bool rounds = false;
};
inline constexpr int64_t kRoundsMaxK = 4096;
inline constexpr int64_t kRoundsHalf = 16;
// The pool (1, 2, 4, .. 32) that keeps both selections within one block with the fewest keys a
// thread (per1 + per2; ties to the smaller pool); else, where k_sel, `rows` and `group` (query
// heads per KV head) allow, the smallest pool whose chunk keys fit one block, with rounds.
ChunkPlan PlanChunkSelect(int64_t len, int64_t k_sel, int64_t rows, int64_t group);

// Radix select: 11 + 11 + 10 bits of the score key, then 11 + 11 + 10 bits of the inverted
// index (ties by lower index).
inline constexpr int kRadixBins = 2048;

// The per-row counters of a selection: candidates, finished blocks, appended pages, and the
// largest key and largest ~key (the smallest key) of a long page row (see RangeKernel).
inline constexpr int kCounterCandidates = 0;
inline constexpr int kCounterFinished = 1;
inline constexpr int kCounterAppended = 2;
inline constexpr int kCounterMaxKey = 3;
inline constexpr int kCounterMaxNotKey = 4;
// The split selection: the first digit's threshold bin (bits 0-15) and whether the bin is taken
// whole (bit 16); the number of chosen elements of the row (neither sink nor local); the number
// of elements above the threshold bin.
inline constexpr int kCounterThreshold = 5;
inline constexpr int kCounterChosen = 6;
inline constexpr int kCounterAbove = 7;
// The floor selection's floor: no chosen token's key is below it (slot 5 too: the two selections
// never run on one row).
inline constexpr int kCounterFloor = 5;
inline constexpr int kCountersPerRow = 8;

// Elements a block of the multi-block selection takes (or a multiple of it: topk.cu, SelChunk).
inline constexpr int64_t kSelChunkElems = 4096;
inline constexpr int64_t SelBlocksBound(int64_t len) {
  return (len + kSelChunkElems - 1) / kSelChunkElems;
}

// Offsets (bytes from the workspace start) of one radix selection over [rows][len].
struct SelectionLayout {
  size_t hist0 = 0;     // uint32 [rows][kRadixBins], zeroed
  size_t hist1 = 0;     // uint32 [rows][kRadixBins], zeroed
  size_t counters = 0;  // uint32 [rows][kCountersPerRow]: see kCounterCandidates..; zeroed
  size_t cand = 0;      // uint32 [rows][len]: candidate element indices
  // uint32 [rows][block_stride]: the split and floor selections' per-block counts (the split
  // selection's then become output offsets; block_stride = SelBlocksBound(len), at least the
  // blocks of a row).
  size_t blocks = 0;
  int64_t block_stride = 0;
};

// Everything SelectCuda derives from a request before launching.
struct SelectPlan {
  int64_t rows = 0;      // output rows
  int64_t group = 0;     // query heads per KV head
  int64_t pages = 0;     // NumPages(N)
  int64_t capacity = 0;  // output slots per row
  // Main selection: over tokens (kExact) or pages (kBound, kBoundThenExact).
  int64_t len = 0;
  int64_t k_sel = 0;
  // kBoundThenExact second stage over cand_pages * 16 candidate slots.
  int64_t cand_pages = 0;
  int64_t len2 = 0;
  int64_t k_sel2 = 0;
  // Exact-score tiles over the tokens and LSE partials per query head (mass only).
  int64_t lse_parts = 0;
  bool want_mass = false;

  // Workspace (bytes from its start; each piece 256-byte aligned).
  size_t scores = 0;      // float [rows][len]: scores (kExact) or bounds
  SelectionLayout sel;    // main selection
  size_t pages_list = 0;  // int32 [rows][cand_pages] (kBoundThenExact)
  size_t scores2 = 0;     // float [rows][len2]
  SelectionLayout sel2;
  size_t bitmap = 0;  // uint32 [rows][bitmap_words], zeroed
  int64_t bitmap_words = 0;
  size_t lse = 0;         // float2 [query_heads][lse_parts]
  size_t zero_begin = 0;  // [zero_begin, zero_end) is cleared before every call
  size_t zero_end = 0;
  size_t total = 0;
};

// Validates the request and computes the plan. Errors as ValidateSelectRequest.
absl::StatusOr<SelectPlan> MakeSelectPlan(const SelectRequest& req, bool want_mass);

// Plan of a bare TopK over [rows][len] (same layout fields: sel and bitmap).
absl::StatusOr<SelectPlan> MakeTopKPlan(int64_t rows, int64_t len, int64_t k);

// Checks of the pieces.
absl::Status ValidateShape(const SelectRequest& req);
absl::Status ValidateView(const MatrixView& v, const char* name, int64_t width, int64_t rows,
                          int heads);
absl::Status ValidatePageMetaArgs(const MatrixView& keys, const PageMetaShape& shape,
                                  const MutableMatrixView& meta);
absl::Status ValidateGather(const GatherRequest& req);

// The softmax scale in use.
inline float SoftmaxScale(const SelectRequest& req) {
  if (req.softmax_scale != 0.0f) return req.softmax_scale;
  float s = 1.0f;
  // 1/sqrt of a power of two is exact enough in float from double.
  switch (req.head_dim) {
    case 64:
      s = 0.125f;
      break;
    case 128:
      s = 0.08838834764831845f;
      break;
    case 256:
      s = 0.0625f;
      break;
  }
  return s;
}

// The candidate budget of kBoundThenExact, in tokens.
inline int64_t CandidateTokens(const SelectRequest& req) {
  return req.candidate_tokens == 0 ? 4 * req.k : req.candidate_tokens;
}

// Whether token t is a sink or local token.
ROPEKV_TOPK_HD bool IsPinned(int64_t t, int64_t n, int64_t n_sink, int64_t n_local) {
  return t < n_sink || t >= n - n_local;
}

// Whether every token of page p is pinned (such a page is never a candidate).
ROPEKV_TOPK_HD bool PageAllPinned(int64_t p, int64_t n, int64_t n_sink, int64_t n_local) {
  const int64_t lo = p * kPageTokens;
  const int64_t hi = (lo + kPageTokens < n ? lo + kPageTokens : n) - 1;
  // Pinned tokens are a prefix and a suffix: [lo, hi] is all pinned unless some token in it is
  // in [n_sink, n - n_local).
  const int64_t free_lo = n_sink;
  const int64_t free_hi = n - n_local - 1;
  if (free_lo > free_hi) return true;
  return hi < free_lo || lo > free_hi;
}

// Number of tokens that are neither sink nor local.
inline int64_t FreeTokens(int64_t n, int64_t n_sink, int64_t n_local) {
  const int64_t free = n - n_sink - n_local;
  return free > 0 ? free : 0;
}

}  // namespace internal
}  // namespace topk
}  // namespace ropekv

#endif  // ROPEKV_KERNELS_TOPK_TOPK_INTERNAL_H_
