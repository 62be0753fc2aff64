// Sessions (PIE): the KV cache of a live document — an open file in an editor — that is edited in
// place. PIE ("Let the Code LLM Edit Itself When You Edit the Code") keeps the prefix, encodes only
// the new tokens and moves every suffix key by R(Δ) with values unchanged.
//
// Representation (docs/sessions.md): a session is an ordered list of pieces over immutable stored
// chunks. A chunk is one block of the model's layout [layer][k|v][kv_head][block_tokens][head_dim]
// that is never written after it is made; a piece is a run of tokens of one chunk with the
// position its first key was rotated at (`rotated_at`) and the table it was rotated with, or a
// hole (tokens whose KV the frontend must still compute). The logical position of a token is its
// index in the document plus the session's base position: an edit only splits and splices pieces
// (no KV byte moves), so positions change without any rotation. Keys are re-rotated when they are
// read, from the stored copy in ONE rotation (rotated_at -> logical position), never chained.
// Blocks may end up partly referenced after edits; a session compacts itself (bit-exact copy,
// rotated_at kept per piece) when more than half of its stored bytes are unreferenced.
//
// Residency (Options::device): chunks live in host memory or in GPU memory (cache/session_gpu.h:
// pooled cudaMalloc, counted against the same capacity). A GPU session takes host bytes through
// pinned staging, rotates on the GPU for every read (host readers get the rotated bytes copied
// back), and writes into a device destination — a frontend's KV buffer at any token offset — in
// ONE fused shift + re-rotate launch (SessionReader::WriteToDevice). Builds without CUDA, and
// models whose head_dim the rope kernel does not handle, keep the host path.
//
// Thread safety: SessionStore is thread-safe. Its lock guards metadata only; KV bytes are copied
// outside it (chunks are immutable and shared, so a reader or a writer never sees a half-done
// edit), and it is never held while calling into the KvCache (no lock nesting). SessionWriter and
// SessionReader are thread-compatible (one user each).
#ifndef ROPEKV_CACHE_SESSION_H_
#define ROPEKV_CACHE_SESSION_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "cache/kv_cache.h"
#include "cache/model.h"
#include "cache/session_gpu.h"
#include "kernels/rope/rope.h"

namespace ropekv {

// Half-open token range [start, end) of a document.
struct TokenRange {
  int64_t start = 0;
  int64_t end = 0;
  int64_t size() const { return end - start; }
  bool operator==(const TokenRange& o) const { return start == o.start && end == o.end; }
};

// One edit of a document. Coordinates are those of the document BEFORE the Edit call: ops are
// sorted left to right and do not overlap (op k starts at or after the end of op k-1); the session
// applies op k at its start + the cumulative Δ of ops 0..k-1.
struct EditOp {
  enum class Kind : uint8_t { kInsert = 0, kDelete = 1, kReplace = 2 };
  Kind kind = Kind::kInsert;
  int64_t start = 0;            // insert: tokens go before this index; else first token removed
  int64_t end = 0;              // delete/replace: one past the last removed; insert: == start
  std::vector<int32_t> tokens;  // insert/replace: the new tokens (may be empty: a no-op insert)

  static EditOp Insert(int64_t at, std::vector<int32_t> tokens) {
    return EditOp{Kind::kInsert, at, at, std::move(tokens)};
  }
  static EditOp Delete(int64_t start, int64_t end) { return EditOp{Kind::kDelete, start, end, {}}; }
  static EditOp Replace(int64_t start, int64_t end, std::vector<int32_t> tokens) {
    return EditOp{Kind::kReplace, start, end, std::move(tokens)};
  }
};

// Immutable KV of up to `tokens` consecutive tokens. `data` may be host or device memory; `owner`
// keeps it alive (and gives its bytes back to the store's budget when the last piece lets go).
struct KvChunk {
  std::shared_ptr<const void> owner;
  const void* data = nullptr;  // [layer][k|v][kv_head][tokens][head_dim] addressed with strides
  KvStrides strides;
  int64_t tokens = 0;   // capacity in tokens
  int device = -1;      // CUDA device holding data; -1: host memory
  uint64_t serial = 0;  // unique in the process: names the chunk's bytes (they never change)
};

// KV of a run of tokens in memory the caller owns, laid out [layer][k|v][kv_head][token][head_dim]
// with `strides` (elements) and read from token `token0` on: e.g. a frontend's cache buffer of
// capacity C tokens has RangeStrides(spec, C). Used by SessionStore::OpenFrom / FillFrom.
struct KvSource {
  const void* data = nullptr;
  KvStrides strides;
  int64_t token0 = 0;
  int device = -1;  // CUDA device holding data; -1: host memory
};

// Where a SessionStore keeps session KV: kAuto = on the GPU when the build has CUDA and a device is
// present, else in host memory; kCpu = host memory; kGpu = GPU memory (the store fails to start
// without a GPU).
enum class SessionDevice : uint8_t { kAuto = 0, kCpu = 1, kGpu = 2 };
// "auto" | "cpu" | "gpu" -> SessionDevice; INVALID_ARGUMENT otherwise.
absl::StatusOr<SessionDevice> ParseSessionDevice(absl::string_view text);
const char* SessionDeviceName(SessionDevice device);

// A run of a document's tokens: `tokens` tokens of `chunk` from `offset`, whose first key was
// rotated at `rotated_at` with `table` (token t at rotated_at + t); or a hole when chunk is null.
struct Piece {
  std::shared_ptr<const KvChunk> chunk;  // null: a hole, KV not computed yet
  int64_t offset = 0;
  int64_t tokens = 0;
  int64_t rotated_at = 0;
  RopeTableId table = kBaseTable;

  bool hole() const { return chunk == nullptr; }
};

// The piece list of a document: pure bookkeeping, no KV bytes (so that a GPU tier or a benchmark
// can reuse it with device chunks). Thread-compatible.
class PieceList {
 public:
  PieceList() = default;
  explicit PieceList(std::vector<Piece> pieces);

  int64_t length() const { return length_; }
  const std::vector<Piece>& pieces() const { return pieces_; }

  // OK if `ops` is a valid edit of a document of `length` tokens, else INVALID_ARGUMENT naming the
  // op and what was expected ("op 1 (delete) ends at 12, past the length 10"). On success
  // *new_length (if not null) is the length after the edit.
  static absl::Status ValidateEdit(int64_t length, absl::Span<const EditOp> ops,
                                   int64_t* new_length = nullptr);

  // Applies a validated edit: deleted tokens' pieces are dropped, inserted tokens become holes,
  // the suffix pieces keep their rotated_at (their logical positions move by Δ). Returns the
  // inserted ranges in the new coordinates, one per op that inserted tokens (empty ranges left
  // out), and in *edit_ends the end of every op's new region (start + Δ + inserted), in op order.
  std::vector<TokenRange> ApplyEdit(absl::Span<const EditOp> ops,
                                    std::vector<int64_t>* edit_ends = nullptr);

  // Replaces [range.start, range.end) (0 <= start <= end <= length(), checked by the caller) with
  // `replacement` (any total length). Adjacent pieces that continue each other are merged.
  void Splice(TokenRange range, std::vector<Piece> replacement);

  // The pieces covering `range` (within [0, length())), clipped to it, in order.
  std::vector<Piece> Cover(TokenRange range) const;

  // Holes of the document, sorted and merged.
  std::vector<TokenRange> Holes() const;

 private:
  // Splits the piece containing `pos` so that a piece starts at `pos`; returns its index
  // (pieces_.size() when pos == length()).
  size_t SplitAt(int64_t pos);
  void MergeAround(size_t first, size_t last);

  std::vector<Piece> pieces_;
  int64_t length_ = 0;
};

// The copy jobs that write document range `range` of `pieces` into `dst`, token range.start at
// dst token `dst_token0`, every key moved from its stored position to base_position + its index
// with `to_table`: one RerotateCopy per piece, for RerotateCopyCpu or RerotateEngine. The jobs
// address all layers (strides of chunks and dst). FAILED_PRECONDITION when the range has a hole
// ("tokens [3, 7) await Fill"); INVALID_ARGUMENT when the range is not within [0, length()).
absl::StatusOr<std::vector<RerotateCopy>> PlanRead(const PieceList& pieces, TokenRange range,
                                                   int64_t base_position, RopeTableId to_table,
                                                   void* dst, const KvStrides& dst_strides,
                                                   int64_t dst_token0);

// Strides of KV of n tokens laid out [layer][k|v][kv_head][n][head_dim] (Read's and Fill's
// layout; with n = a frontend's token capacity C, the layout of its cache buffer).
KvStrides RangeStrides(const ModelSpec& spec, int64_t n);
// Bytes of n tokens in that layout.
uint64_t RangeBytes(const ModelSpec& spec, int64_t n);

struct OpenSessionArgs {
  std::string model;            // id or name of a registered model
  std::vector<int32_t> tokens;  // the document (may be empty)
  int64_t base_position = 0;    // position of token 0 (>= 0), e.g. after a cached system prompt
  // Position token 0's key was rotated at; nullopt: base_position. Token t: rotated_at + t.
  std::optional<int64_t> rotated_at;
  RopeTableId rope_table = kBaseTable;  // table the keys were rotated with; also Read's default
  // OpenFromCache only: the tenant of the cached prefix blocks.
  std::string tenant;
};

struct SessionResult {
  std::string id;
  int64_t length = 0;
  uint64_t version = 0;
  // Every range whose KV the frontend must compute (holes), sorted and merged.
  std::vector<TokenRange> fill;
};

struct EditOptions {
  // Ranges (in the coordinates AFTER the edit) the caller marks stale: their KV is dropped and
  // they are listed to compute again.
  std::vector<TokenRange> stale;
  // Budgeted repair (issue 9, "beyond PIE"): after each op that changed tokens, up to this many
  // following tokens (stopping at the next op) are marked stale so that the frontend re-encodes
  // the suffix nearest the edit, whose KV PIE's shift makes most approximate.
  int64_t repair_tokens = 0;
};

struct EditResult {
  int64_t length = 0;
  uint64_t version = 0;
  std::vector<TokenRange> inserted;  // new tokens, new coordinates
  std::vector<TokenRange> repair;    // ranges marked by repair_tokens (merged)
  // Every range whose KV the frontend must compute now (inserted, stale, repair, and holes still
  // pending from before), sorted and merged.
  std::vector<TokenRange> fill;
};

struct FillArgs {
  TokenRange range;  // tokens whose KV is given; within [0, length)
  // Position range.start's key was rotated at; nullopt: its logical position (base + start).
  std::optional<int64_t> rotated_at;
  std::optional<RopeTableId> rope_table;  // nullopt: the session's table
  // The session version the range refers to; nullopt: the version at BeginFill. Finish fails
  // with FAILED_PRECONDITION when the session changed in between.
  std::optional<uint64_t> version;
};

struct SessionInfo {
  std::string id;
  ModelId model;
  std::vector<int32_t> tokens;
  int64_t length = 0;
  int64_t base_position = 0;
  RopeTableId rope_table = kBaseTable;
  uint64_t version = 0;
  std::vector<TokenRange> fill;  // holes
  uint64_t pieces = 0;
  uint64_t stored_bytes = 0;  // bytes of the chunks it references (shared ones counted fully)
  int device = -1;            // CUDA device holding its KV; -1: host memory
};

class SessionStore;

// Receives the KV bytes of an Open (block layout: ceil(n / block_tokens) blocks, the last padded)
// or of a Fill (range layout [layer][k|v][kv_head][n][head_dim]) in order, in pieces of any size,
// straight into new chunks. Destroying it before Finish abandons it (nothing changes).
class SessionWriter {
 public:
  ~SessionWriter();
  SessionWriter(const SessionWriter&) = delete;
  SessionWriter& operator=(const SessionWriter&) = delete;

  // Appends bytes. INVALID_ARGUMENT past the expected size; the writer is then dead.
  absl::Status Write(absl::string_view bytes);
  // Commits. INVALID_ARGUMENT when fewer bytes came than expected; NOT_FOUND when the session was
  // closed or expired meanwhile; FAILED_PRECONDITION when it was edited meanwhile (Fill);
  // RESOURCE_EXHAUSTED when the session capacity was reached meanwhile (Open).
  absl::StatusOr<SessionResult> Finish();

  uint64_t expected_bytes() const { return expected_; }
  uint64_t received_bytes() const { return received_; }

 private:
  friend class SessionStore;
  enum class Mode : uint8_t { kOpen, kFill };
  SessionWriter(SessionStore* store, Mode mode, ModelSpec spec, int64_t n_tokens);
  // GPU chunks: stages whole units (Open: blocks; Fill: layers of the range) in host memory and
  // uploads them when complete.
  absl::Status StageForGpu(absl::string_view bytes);
  absl::Status FlushToGpu();

  SessionStore* store_;
  Mode mode_;
  ModelSpec spec_;
  int64_t n_tokens_;
  uint64_t expected_ = 0;
  uint64_t received_ = 0;
  std::vector<std::shared_ptr<KvChunk>> chunks_;  // ceil(n / block_tokens) blocks
  // GPU chunks only: the store's device, the model's engine key, the staged units.
  std::shared_ptr<SessionGpu> gpu_;
  ModelId gpu_key_;
  uint64_t unit_bytes_ = 0;  // a block (Open) or a layer of the range (Fill)
  uint64_t flushed_units_ = 0;
  std::vector<char> stage_;  // whole units, up to ~64 MiB
  uint64_t staged_ = 0;
  absl::Status status_;
  bool finished_ = false;
  // Open: the session to create.
  OpenSessionArgs open_;
  ModelId model_id_;
  // Fill: the target.
  std::string session_id_;
  FillArgs fill_;
};

// The KV of a document range, held (the chunks stay alive even if the session is edited or
// closed) and produced one layer at a time. Thread-compatible.
class SessionReader {
 public:
  TokenRange range() const { return range_; }
  int layers() const { return spec_.layers; }
  const ModelSpec& spec() const { return spec_; }
  uint64_t version() const { return version_; }
  // Length of the document when the reader was made.
  int64_t document_length() const { return length_; }
  // Bytes of one layer: [k|v][kv_head][range.size()][head_dim].
  uint64_t layer_bytes() const;
  uint64_t bytes() const { return layer_bytes() * spec_.layers; }
  // Writes one layer (layer_bytes() bytes) into dst, keys re-rotated in one rotation; with
  // keys_only, only its key plane (the first layer_bytes() / 2 bytes: what a selection scores).
  // INVALID_ARGUMENT for a layer out of range.
  absl::Status WriteLayer(int layer, void* dst, bool keys_only = false) const;
  // GPU sessions: the same layer (or its key plane) written into device memory of gpu_device(),
  // [k|v][kv_head][range.size()][head_dim], held by the returned pointer (the memory returns to
  // the session's pool with it). FAILED_PRECONDITION for a session in host memory.
  absl::StatusOr<std::shared_ptr<void>> LayerOnDevice(int layer, bool keys_only) const;
  // Writes the K and V of `tokens` (range-relative, ascending, distinct) of one layer, keys
  // re-rotated as WriteLayer does, packed: [k|v][kv_head][tokens.size()][head_dim] (entry i is
  // token tokens[i]). What a gather of a few hundred selected tokens needs, without the layer.
  // INVALID_ARGUMENT for a layer out of range or tokens not ascending within the range.
  absl::Status WriteLayerTokens(int layer, absl::Span<const int32_t> tokens, void* dst) const;
  // One layer's keys as pages of `page_tokens` tokens, for selections (cache/retrieval.cc): a page
  // whose keys lie in one host chunk at the position they are read at is read where it is; the
  // others (keys an edit moved, pages that span pieces) are re-rotated into block-sized buffers
  // held by the result. Page p's keys: pages[p] + h * head_stride + t * head_dim elements (KV head
  // h, page row t). With `only` (ascending page indices), just those pages; the others are null.
  // FAILED_PRECONDITION for a GPU session; INVALID_ARGUMENT for a bad layer or block_tokens not a
  // multiple of page_tokens.
  struct KeyPages {
    std::vector<const void*> pages;
    int64_t head_stride = 0;
    int64_t copied_pages = 0;                       // pages written into buffers
    std::vector<std::shared_ptr<const void>> hold;  // the chunks and buffers read
  };
  absl::StatusOr<KeyPages> LayerKeyPages(int layer, int64_t page_tokens,
                                         const std::vector<int64_t>* only = nullptr) const;
  // Per page of `page_tokens` tokens, a 64-bit name of its keys at every layer: the chunks, the
  // offsets in them and the positions and tables read from and at. Equal names, equal keys: what
  // is derived from a page's keys (its metadata) can be kept under its name across edits, Fills
  // and appends that leave the page alone. Any session, GPU ones included.
  std::vector<uint64_t> PageNames(int64_t page_tokens) const;
  // Writes every layer: [layer][k|v][kv_head][range.size()][head_dim].
  absl::Status WriteAll(void* dst) const;
  // Writes every layer into HOST memory laid out with `dst_strides` (elements), range token 0 at
  // dst token `dst_token0`; only the range's elements are written (e.g. tokens [o, o + n) of a
  // frontend's cache of capacity C: RangeStrides(spec, C), o). A GPU session needs dst_strides
  // with token == head_dim and kv == kv_heads * head (INVALID_ARGUMENT otherwise).
  absl::Status WriteAllToHost(void* dst, const KvStrides& dst_strides, int64_t dst_token0) const;
  // GPU sessions: writes every layer into DEVICE memory of gpu_device() with `dst_strides`, range
  // token 0 at dst token `dst_token0`, as ONE launch of the rope kernel (the shift and the
  // re-rotation fused with the copy), and waits for it. Only the range's elements are written.
  // FAILED_PRECONDITION for a session in host memory; the kernel's errors otherwise.
  absl::Status WriteToDevice(void* dst, const KvStrides& dst_strides, int64_t dst_token0) const;
  // Whether the KV is in GPU memory (then WriteToDevice works), and on which device.
  bool on_gpu() const { return gpu_ != nullptr; }
  int gpu_device() const { return gpu_ != nullptr ? gpu_->device() : -1; }

 private:
  friend class SessionStore;
  // The copy jobs of one layer (or its key plane) into dst, laid out as WriteLayer writes it.
  absl::StatusOr<std::vector<RerotateCopy>> PlanLayer(int layer, void* dst, bool keys_only) const;
  // GPU sessions: the read's copy jobs into dst run as one launch.
  absl::Status RunOnGpu(absl::Span<const RerotateCopy> jobs, int layers) const;

  std::shared_ptr<SessionGpu> gpu_;  // null: host session
  ModelId gpu_key_;
  ModelSpec spec_;
  TokenRange range_;
  PieceList pieces_;  // the session's pieces covering range_, rebased to start at 0
  int64_t base_position_ = 0;
  RopeTableId to_table_ = kBaseTable;
  uint64_t version_ = 0;
  int64_t length_ = 0;
};

class SessionStore {
 public:
  struct Options {
    // Most open sessions; Open and Snapshot past it -> RESOURCE_EXHAUSTED.
    uint32_t max_sessions = 256;
    // Bytes of KV all sessions may hold; a write past it -> RESOURCE_EXHAUSTED.
    uint64_t capacity_bytes = 4ull << 30;
    // A session not used for this long is closed (checked on every call).
    absl::Duration idle_ttl = absl::Minutes(30);
    // The clock (tests inject one); default absl::Now.
    std::function<absl::Time()> now;
    // Where session KV lives (SessionDevice); kGpu without a usable GPU -> Create fails.
    SessionDevice device = SessionDevice::kAuto;
    // CUDA device of GPU sessions.
    int gpu_device = 0;
  };

  // `cache` (borrowed, must outlive the store) resolves models and serves OpenFromCache.
  // INVALID_ARGUMENT for a null cache, zero max_sessions or capacity, or a non-positive TTL;
  // UNAVAILABLE for device kGpu without a usable GPU.
  static absl::StatusOr<std::unique_ptr<SessionStore>> Create(KvCache* cache, Options options);
  ~SessionStore();

  // Opens a session from the KV of the prefilled document, sent to the returned writer in block
  // layout. NOT_FOUND for an unknown model; INVALID_ARGUMENT for a negative base or rotated_at,
  // an invalid table; RESOURCE_EXHAUSTED when the session count or the bytes are at capacity.
  absl::StatusOr<std::unique_ptr<SessionWriter>> BeginOpen(OpenSessionArgs args);
  // BeginOpen + Write(bytes) + Finish.
  absl::StatusOr<SessionResult> Open(OpenSessionArgs args, absl::string_view block_bytes);
  // Opens a session over the longest cached prefix of args.tokens in `cache` (blocks copied, so
  // the cache may evict them later); the rest of the document is a hole, listed in `fill`.
  // FAILED_PRECONDITION when the cached blocks hold pre-RoPE keys; otherwise as BeginOpen.
  absl::StatusOr<SessionResult> OpenFromCache(OpenSessionArgs args);

  // Applies `ops` (see EditOp) and marks options.stale / repair ranges. NOT_FOUND for an unknown
  // session; INVALID_ARGUMENT for a bad op or stale range, with the session unchanged.
  absl::StatusOr<EditResult> Edit(absl::string_view id, absl::Span<const EditOp> ops,
                                  const EditOptions& options = {});

  // Stores the KV of args.range, sent to the returned writer in range layout. NOT_FOUND for an
  // unknown session; INVALID_ARGUMENT for a range outside the document or a negative rotated_at;
  // FAILED_PRECONDITION for a stale version; RESOURCE_EXHAUSTED at capacity.
  absl::StatusOr<std::unique_ptr<SessionWriter>> BeginFill(absl::string_view id, FillArgs args);
  // BeginFill + Write(bytes) + Finish.
  absl::StatusOr<SessionResult> Fill(absl::string_view id, FillArgs args,
                                     absl::string_view range_bytes);

  // Open / Fill with the KV taken from memory the caller owns (KvSource: e.g. the frontend's cache
  // buffer at a token offset) instead of bytes: args.tokens.size() (Open) or args.range.size()
  // (Fill) tokens from src.token0 on. Device to device as ONE copy launch when both the source and
  // the session are on the same GPU; host sources go through pinned staging to a GPU session; a
  // device source for a host session is FAILED_PRECONDITION (the caller stages it). Errors as
  // BeginOpen / BeginFill + Finish; INVALID_ARGUMENT for a null source or a negative token0.
  absl::StatusOr<SessionResult> OpenFrom(OpenSessionArgs args, const KvSource& src);
  absl::StatusOr<SessionResult> FillFrom(absl::string_view id, FillArgs args, const KvSource& src);

  // Holds the KV of `range` (nullopt: the whole document) for reading, keys at base + index with
  // `to_table` (nullopt: the session's table). NOT_FOUND for an unknown session; INVALID_ARGUMENT
  // for a range outside the document or an invalid table; FAILED_PRECONDITION when the range has
  // tokens awaiting Fill.
  absl::StatusOr<SessionReader> Read(absl::string_view id, std::optional<TokenRange> range,
                                     std::optional<RopeTableId> to_table = std::nullopt);

  // A new session equal to `id` now (tokens, positions, KV shared copy-on-write: nothing is
  // copied). NOT_FOUND for an unknown session; RESOURCE_EXHAUSTED at the session capacity.
  absl::StatusOr<SessionResult> Snapshot(absl::string_view id);

  // What the session holds. NOT_FOUND for an unknown session.
  absl::StatusOr<SessionInfo> Info(absl::string_view id);
  // The model spec of a registered model (id or name) / of a session's model. NOT_FOUND.
  absl::StatusOr<ModelSpec> ModelSpecOf(absl::string_view model);
  absl::StatusOr<ModelSpec> SessionSpec(absl::string_view id);

  // Closes a session (its chunks are freed once no reader holds them). NOT_FOUND when unknown.
  absl::Status Close(absl::string_view id);

  // Closes sessions idle past the TTL; returns how many.
  int SweepExpired();

  uint32_t sessions() const;
  uint64_t bytes_used() const { return budget_->used.load(); }
  uint64_t capacity_bytes() const { return options_.capacity_bytes; }
  // The GPU that sessions of supported models live on; -1 when they live in host memory.
  int gpu_device() const { return gpu_ != nullptr ? gpu_->device() : -1; }
  // Whether sessions of `spec` are kept in GPU memory.
  bool OnGpu(const ModelSpec& spec) const;

 private:
  friend class SessionWriter;

  // Bytes held by chunks; shared with every chunk's deleter so that a chunk may outlive the store.
  struct Budget {
    std::atomic<uint64_t> used{0};
    uint64_t capacity = 0;
  };

  struct Session {
    RegisteredModel model;
    std::vector<int32_t> tokens;
    PieceList pieces;
    int64_t base_position = 0;
    RopeTableId rope_table = kBaseTable;
    uint64_t version = 0;
    absl::Time last_used;
    bool on_gpu = false;  // chunks in gpu_'s memory
  };

  SessionStore(KvCache* cache, Options options);
  absl::Time Now() const;
  // Allocates one block-layout chunk (in GPU memory when OnGpu(spec)), charged to the budget.
  // RESOURCE_EXHAUSTED past capacity.
  absl::StatusOr<std::shared_ptr<KvChunk>> NewChunk(const ModelSpec& spec);
  // Copies n tokens of src into writer w's chunks (bit for bit), then commits.
  absl::StatusOr<SessionResult> CopyInAndCommit(SessionWriter& w, int64_t n, const KvSource& src);
  // Runs bit-exact or re-rotating copy jobs where the chunks live (CPU or one GPU launch).
  absl::Status RunJobs(bool on_gpu, const ModelId& key, const ModelSpec& spec,
                       absl::Span<const RerotateCopy> jobs);
  // The live session `id`, touched; NOT_FOUND otherwise (expired sessions are closed first).
  absl::StatusOr<Session*> FindLocked(absl::string_view id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int SweepLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckCountLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string NewId() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Commits a finished writer.
  absl::StatusOr<SessionResult> Commit(SessionWriter& writer);
  // Compacts `id` if more than half of its stored bytes are unreferenced (bit-exact copies).
  void MaybeCompact(absl::string_view id);

  KvCache* cache_;
  const Options options_;
  std::shared_ptr<Budget> budget_;
  std::shared_ptr<SessionGpu> gpu_;  // null: every session in host memory

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::unique_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t id_salt_ = 0;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_SESSION_H_
