// Query-aware top-k retrieval over a cached sequence (Quest, TidalDecode, A^2ATS): page metadata,
// exact scoring, the Quest page bound, radix top-k, merge with sink and local tokens, gather.
//
// Keys are post-RoPE and stored per KV head contiguous over tokens. A key source is a
// `MatrixView`: one buffer, or a list of fixed-size blocks (the daemon's block layout
// [layer][k|v][kv_head][token][head_dim]: pass one pointer per block, already offset to the layer
// and to K or V, with head_stride = block_tokens * head_dim and row_stride = head_dim).
//
// Every operation has a CPU version (plain loops, fp64 accumulation; the daemon's CPU path) and a
// CUDA version (launched on an explicit stream, no host synchronisation inside: `SelectCuda` can be
// captured into a CUDA graph). The CUDA functions exist in every build; without CUDA they return
// UNIMPLEMENTED. See docs/retrieval.md for the algorithms and measured figures.
//
// Semantics shared by both paths:
// - Scores are q.k with fp32 inputs and fp32 (GPU) or fp64 (CPU) accumulation, no 1/sqrt(d).
// - Query head h reads KV head h / G, G = query_heads / kv_heads. A row of the selection is a KV
//   head (reductions kMax / kSum over the G query heads) or a query head (kPerQueryHead).
// - Order: larger score first; equal scores are broken by the lower token (or page) index, so the
//   selection is a function of the scores alone. -0 and +0 are equal; -inf is a valid score.
// - NaN: the CPU path returns INVALID_ARGUMENT for NaN in queries, keys, scores (inf - inf) or
//   page metadata. The GPU path does not look: a NaN score of one query head counts as -inf (and a
//   NaN after the reduction too); a NaN page bound counts as +inf (the page stays a candidate).
// - Output: per row ascending token indices, sink tokens [0, n_sink) and local tokens
//   [N - n_local, N) always included, no duplicates; unused slots hold -1.
#ifndef ROPEKV_KERNELS_TOPK_TOPK_H_
#define ROPEKV_KERNELS_TOPK_TOPK_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/common/dtype.h"

// The CUDA runtime's stream type, declared here so that this header needs no CUDA include (the
// same declaration as in driver_types.h, so both may be seen by one translation unit).
typedef struct CUstream_st* cudaStream_t;

namespace ropekv {
namespace topk {

// Tokens per page of metadata.
inline constexpr int64_t kPageTokens = 16;

// Number of pages covering `num_tokens` tokens (the last one may be partial).
constexpr int64_t NumPages(int64_t num_tokens) {
  return (num_tokens + kPageTokens - 1) / kPageTokens;
}

// Head dimensions with kernels: 64, 128, 256. Others -> INVALID_ARGUMENT everywhere.
bool IsSupportedHeadDim(int head_dim);

// A per-KV-head matrix of rows: for keys and values a row is one token (head_dim elements), for
// page metadata a row is one page, [M; m] (2 * head_dim elements: the element-wise max, then the
// element-wise min). Element (head h, row r, column c), in elements of `dtype`:
//   one buffer (blocks == nullptr):  base[h * head_stride + r * row_stride + c]
//   blocks:  blocks[r / rows_per_block][h * head_stride + (r % rows_per_block) * row_stride + c]
// Pointers are host memory for the CPU functions and device memory for the CUDA ones (including
// the `blocks` array itself). Every address must be aligned to the element size; the CUDA path is
// fastest when rows start on 16-byte boundaries.
// \tparam Ptr `const void*` (read) or `void*` (written: page metadata).
template <typename Ptr>
struct BasicMatrixView {
  DType dtype = DType::kBF16;
  Ptr base = nullptr;           // [heads][rows][row_stride] when blocks == nullptr
  const Ptr* blocks = nullptr;  // [num_blocks] -> [heads][rows_per_block][row_stride]
  int64_t rows_per_block = 0;   // rows per block (blocks != nullptr only)
  int64_t head_stride = 0;      // elements from one head to the next
  int64_t row_stride = 0;       // elements from one row to the next, >= row width
};
using MatrixView = BasicMatrixView<const void*>;
using MutableMatrixView = BasicMatrixView<void*>;

// A densely packed [heads][rows][width] buffer.
template <typename Ptr>
BasicMatrixView<Ptr> DenseMatrix(Ptr base, DType dtype, int64_t rows, int64_t width) {
  BasicMatrixView<Ptr> v;
  v.dtype = dtype;
  v.base = base;
  v.head_stride = rows * width;
  v.row_stride = width;
  return v;
}

// The view a daemon block list gives for one layer's K (or V): block b holds tokens
// [b * block_tokens, (b + 1) * block_tokens) as [kv_heads][block_tokens][head_dim].
template <typename Ptr>
BasicMatrixView<Ptr> BlockedMatrix(const Ptr* blocks, DType dtype, int64_t block_tokens,
                                   int64_t width) {
  BasicMatrixView<Ptr> v;
  v.dtype = dtype;
  v.blocks = blocks;
  v.rows_per_block = block_tokens;
  v.head_stride = block_tokens * width;
  v.row_stride = width;
  return v;
}

// ---------------------------------------------------------------------------------------------
// Page metadata. For every (KV head, page of 16 tokens) the element-wise max M and min m of the
// keys, stored in meta.dtype and rounded outward (M up, m down; zeros stored as +0 in M and -0 in
// m) so that M >= k >= m holds for every stored key exactly. A partial last page covers the
// tokens that exist. `meta` rows are pages of width 2 * head_dim: [M (head_dim); m (head_dim)].

struct PageMetaShape {
  int kv_heads = 0;        // >= 1
  int head_dim = 0;        // 64, 128 or 256
  int64_t num_tokens = 0;  // tokens that exist after the call, >= 1
};

// Builds the metadata of all NumPages(shape.num_tokens) pages from `keys` (rows = tokens).
// INVALID_ARGUMENT on a bad shape or view, or a NaN key (naming head, token and column; pages
// before that key may have been written).
// Thread-compatible: concurrent calls must write different metadata.
absl::Status BuildPageMetaCpu(const MatrixView& keys, const PageMetaShape& shape,
                              const MutableMatrixView& meta);

// Adds tokens [first_token, shape.num_tokens) to metadata that covers tokens [0, first_token):
// a page that starts at or after first_token is initialised from its new tokens, a page that
// already has tokens is widened. Appending token by token gives the same bits as one
// BuildPageMetaCpu. Errors as BuildPageMetaCpu (checked before anything is written);
// first_token outside [0, num_tokens) ->
// INVALID_ARGUMENT.
absl::Status AppendPageMetaCpu(const MatrixView& keys, const PageMetaShape& shape,
                               int64_t first_token, const MutableMatrixView& meta);

// CUDA versions: same results, bit for bit. NaN keys are not rejected (a NaN is skipped by the
// max/min of its page unless every key of the page has NaN in that column); with `nan_seen` (an
// int in device memory, zeroed by the caller) BuildPageMetaCuda sets it nonzero when a key read
// holds NaN, for callers that reject such keys as BuildPageMetaCpu does.
absl::Status BuildPageMetaCuda(const MatrixView& keys, const PageMetaShape& shape,
                               const MutableMatrixView& meta, cudaStream_t stream,
                               int* nan_seen = nullptr);
absl::Status AppendPageMetaCuda(const MatrixView& keys, const PageMetaShape& shape,
                                int64_t first_token, const MutableMatrixView& meta,
                                cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Selection.

enum class Mode : uint8_t {
  kExact = 0,           // q.k over every key, top k tokens
  kBound = 1,           // Quest: pages ranked by their bound, top ceil(k / 16) pages' tokens
  kBoundThenExact = 2,  // bound picks candidate pages, exact scores on them pick k tokens
};

enum class GqaReduction : uint8_t {
  kMax = 0,           // a row per KV head; score = max over its query heads
  kSum = 1,           // a row per KV head; score = sum over its query heads
  kPerQueryHead = 2,  // a row per query head
};

struct SelectRequest {
  int kv_heads = 0;        // >= 1
  int query_heads = 0;     // a multiple of kv_heads
  int head_dim = 0;        // 64, 128 or 256
  int64_t num_tokens = 0;  // N, 1 <= N < 2^31

  // [query_heads][head_dim], post-RoPE, in query_dtype.
  const void* queries = nullptr;
  DType query_dtype = DType::kF32;
  // Rows = tokens, width head_dim. Read by kExact, kBoundThenExact, scores and mass.
  MatrixView keys;
  // Rows = pages, width 2 * head_dim (see BuildPageMetaCpu). Read by kBound and kBoundThenExact.
  MatrixView page_meta;

  Mode mode = Mode::kExact;
  GqaReduction reduction = GqaReduction::kMax;
  // Tokens to select besides sink and local tokens, >= 1. kExact and kBoundThenExact choose k
  // tokens among those that are neither sink nor local; kBound chooses ceil(k / 16) pages among
  // the pages that hold a token that is neither (their tokens may overlap sink/local ones).
  int64_t k = 0;
  // kBoundThenExact: tokens' worth of candidate pages picked by the bound (rounded up to whole
  // pages); 0 means 4 * k; otherwise >= k.
  int64_t candidate_tokens = 0;
  int64_t n_sink = 0;   // first tokens always included, >= 0
  int64_t n_local = 0;  // last tokens always included, >= 0
  // Softmax scale of the captured mass; 0 means 1 / sqrt(head_dim).
  float softmax_scale = 0.0f;
};

// Caller-allocated outputs (host memory for SelectCpu, device memory for SelectCuda).
struct SelectResult {
  int32_t* indices = nullptr;  // [SelectRows][SelectCapacity], ascending, -1 after counts[row]
  int32_t* counts = nullptr;   // [SelectRows]; may be null
  // [SelectRows][SelectCapacity] exact scores of the selected tokens (reduced as the row is:
  // max or sum over the group, or the query head's own), NaN after counts[row]; may be null.
  float* scores = nullptr;
  // [SelectRows] captured softmax mass: per query head sum over the selected tokens of
  // exp(s * scale) / sum over all N tokens, averaged over the row's query heads; may be null.
  float* mass = nullptr;
};

// kv_heads, or query_heads for kPerQueryHead.
int64_t SelectRows(const SelectRequest& req);
// Whether a selection reads the keys: kExact and kBoundThenExact do, kBound only for scores or
// mass (`want_scores`, `want_mass`). Page modes read the metadata.
bool SelectReadsKeys(Mode mode, bool want_scores, bool want_mass);
// Slots per output row: min(N, n_sink + n_local + k') with k' = k (exact modes) or
// 16 * ceil(k / 16) (kBound). counts[row] <= capacity.
int64_t SelectCapacity(const SelectRequest& req);

// OK, or INVALID_ARGUMENT naming the first bad field (expected vs got). Checks shapes, strides,
// null pointers of what the mode reads; not the contents of device memory.
absl::Status ValidateSelectRequest(const SelectRequest& req, const SelectResult& result);

// The daemon's CPU path. Errors: those of ValidateSelectRequest; INVALID_ARGUMENT for NaN (see
// the top of this file). Thread-compatible.
absl::Status SelectCpu(const SelectRequest& req, const SelectResult& result);

// Device workspace bytes SelectCuda needs for this request (depends on shapes, k, mode and
// whether mass is wanted; the pointers in `req` are not read).
absl::StatusOr<size_t> SelectWorkspaceBytes(const SelectRequest& req, bool want_mass);

// The CUDA path: enqueues the selection on `stream` and returns without waiting. `workspace`
// is device memory of at least SelectWorkspaceBytes(req, result.mass != nullptr) bytes, 256-byte
// aligned, used by one call at a time (it needs no initialisation). Errors: those of
// ValidateSelectRequest; INVALID_ARGUMENT also for shapes the CUDA path does not take (more than
// 65535 rows; with kMax / kSum, more query heads per KV head than one block's shared memory holds:
// 186 at head_dim 128 in bf16, 93 for the bound); FAILED_PRECONDITION for a small or misaligned
// workspace; INTERNAL for a failed launch. Device contents are not checked (see NaN above).
absl::Status SelectCuda(const SelectRequest& req, const SelectResult& result, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// The pieces of Select, for callers that build their own pipeline.

// Exact scores of every token: out[row][t] for row < SelectRows(req), t < N (fp32). Uses
// queries, keys, reduction.
absl::Status ScoreCpu(const SelectRequest& req, float* out);
absl::Status ScoreCuda(const SelectRequest& req, float* out, cudaStream_t stream);

// Quest bound of every page: out[row][p] for p < NumPages(N) = sum_i max(q_i M_i, q_i m_i),
// reduced as the row is (max or sum over the group). Uses queries, page_meta, reduction.
absl::Status PageBoundCpu(const SelectRequest& req, float* out);
absl::Status PageBoundCuda(const SelectRequest& req, float* out, cudaStream_t stream);

// Top k of each row of scores [rows][len]: indices [rows][min(k, len)] in ascending order
// (order: larger first, ties by lower index). CPU: NaN -> INVALID_ARGUMENT.
absl::Status TopKCpu(const float* scores, int64_t rows, int64_t len, int64_t k, int32_t* indices);
// Workspace of TopKCuda.
absl::StatusOr<size_t> TopKWorkspaceBytes(int64_t rows, int64_t len, int64_t k);
// GPU: NaN counts as -inf. No host synchronisation.
absl::Status TopKCuda(const float* scores, int64_t rows, int64_t len, int64_t k, int32_t* indices,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Gather: copies the selected tokens' keys and values into packed destinations, e.g. to reuse a
// selection made at one layer at other layers (TidalDecode). List r reads KV head r / group.
struct GatherRequest {
  int kv_heads = 0;
  int head_dim = 0;        // 64, 128 or 256
  int64_t num_tokens = 0;  // N; indices must lie in [0, N)
  int64_t rows = 0;        // lists: kv_heads (group 1) or query_heads (group = rows / kv_heads)
  int64_t capacity = 0;    // entries per list
  MatrixView keys;         // rows = tokens
  MatrixView values;       // rows = tokens, same dtype as keys
  const int32_t* indices = nullptr;  // [rows][capacity]
  const int32_t* counts = nullptr;   // [rows]; null means every entry is valid
  void* dst_keys = nullptr;          // [rows][capacity][head_dim]; may be null
  void* dst_values = nullptr;        // [rows][capacity][head_dim]; may be null
};

// Entries at or after counts[r] are written as zeros. CPU: an index outside [0, N) ->
// INVALID_ARGUMENT (nothing is written). GPU: such an entry is written as zeros.
absl::Status GatherCpu(const GatherRequest& req);
absl::Status GatherCuda(const GatherRequest& req, cudaStream_t stream);

}  // namespace topk
}  // namespace ropekv

#endif  // ROPEKV_KERNELS_TOPK_TOPK_H_
