// Retrieval: query-aware top-k selection over the daemon's caches (Quest, TidalDecode). Given the
// post-RoPE queries of one layer at a decode step, RetrievalStore::Select picks per KV head (or per
// query head) the cached tokens that matter most, through kernels/topk (SelectCpu; or SelectCuda
// when Options::device names a GPU, see cache/retrieval_gpu.h), over either the
// longest cached prefix of a prompt (KvCache blocks, read in place; named by its tokens or by its
// last block's hash) or an editor session
// (SessionStore: its keys re-rotated to their current positions). A selection can be kept for a
// short idle TTL and gathered at other layers of the same step (position-persistent selection).
// Gather always runs on the CPU (GatherCpu over the host views).
//
// Page metadata (the Quest bound's per-16-token-page element-wise max M and min m of the keys) is
// kept in this store's own bounded LRU, keyed by block. With Options::build_metadata_on_put (the
// default) the store observes the KvCache (BlockObserver): when a Put stores a fresh prefix block
// whose keys sit at their own position, the metadata of all its layers is built in bulk from the
// Put's bytes and kept (host memory, so it stays valid through the block's tier moves); when the
// block leaves the cache its entries go. Anything else (sessions, pages that straddle blocks,
// blocks stored at another position and re-rotated for the selection, entries evicted from the
// LRU, blocks reloaded from disk after a restart) is built in bulk the first time it is selected
// over in a page mode, i.e. lazily on first use.
// - Prefix blocks whose block_tokens is a multiple of 16: one entry per (block hash, layer), shared
//   by every prompt that has the block; a block re-rotated to its place: per (hash, position,
//   layer), always checked against the block's serial (min/max do not commute with rotation).
// - Sessions: one entry per (session, layer, 64 pages), with the name of every page's keys
//   (SessionReader::PageNames: the immutable chunks, offsets, positions and tables they are read
//   from). A Select rebuilds only the pages whose name changed (an edit re-rotates the pages after
//   it, a Fill or an append makes new ones), copying only their entries, and reads no key when no
//   page was renamed.
// - Blocks whose pages straddle blocks: one entry per (last block hash, layer) over the sequence.
// Every block entry carries the serial of the stored block it was built from (BlockInfo::serial:
// new each time a block enters the cache, kept through tier moves), checked on use when
// Options::verify_metadata is on (default): a block evicted and re-Put with other bytes is
// detected and the metadata re-derived from the keys as they are now. The check reads no key
// (until 2026-11-27 it was an XXH3 of the keys: 64 MB read per Select at 32K tokens).
//
// Prefix blocks whose keys were stored at another position than their place in the prompt
// (Put with rotated_at) are re-rotated to their positions first (one rotation, as Get does).
//
// Thread safety: thread-safe. Two mutexes, never nested: meta_mu_ (metadata entries) and
// selections_mu_ (kept selections); neither is held while calling into the KvCache or the
// SessionStore, nor while a kernel runs (the RetrievalGpu's own mutex is taken with neither held:
// GPU selections run one at a time). The KvCache calls the store's observer under its own
// lock for dropped blocks, which then takes meta_mu_ (order: the cache's mutex, then meta_mu_).
#ifndef ROPEKV_CACHE_RETRIEVAL_H_
#define ROPEKV_CACHE_RETRIEVAL_H_

#include <cstdint>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "cache/hash.h"
#include "cache/kv_cache.h"
#include "cache/model.h"
#include "cache/session.h"
#include "kernels/topk/topk.h"

namespace ropekv {

class RetrievalGpu;

// The device of RetrievalStore::Options from a --retrieval_device value: "cpu" -> -1; "gpu" ->
// gpu_device (the store's Create then fails where there is no usable GPU); "auto" -> gpu_device
// when this build has CUDA and a GPU is present, else -1. INVALID_ARGUMENT for another value.
absl::StatusOr<int> ResolveRetrievalDevice(absl::string_view mode, int gpu_device);

// What to select over: a cached prefix (session_id empty) or a session.
struct RetrievalSource {
  // The longest cached prefix of `tokens` (full blocks) of `model` (id or name) and `tenant`.
  std::string model;
  std::string tenant;
  std::vector<int32_t> tokens;
  // Or, instead of tokens and tenant: the prefix that ends at this block (KvCache::AcquireChain),
  // whose chained hash a Put or Lookup returned; all of it must be cached.
  std::optional<BlockHash> last_block;
  // When not empty: the whole document of this session (no tokens awaiting Fill).
  std::string session_id;
};

struct SelectArgs {
  RetrievalSource source;
  int layer = 0;        // 0 <= layer < the model's layers
  int query_heads = 0;  // a positive multiple of the model's kv_heads
  // [query_heads][head_dim] post-RoPE queries in query_dtype (borrowed for the call).
  absl::string_view queries;
  DType query_dtype = DType::kF32;  // f32, f16 or bf16 (typically f32 or the model's dtype)
  int64_t k = 0;                    // >= 1 (see topk::SelectRequest::k)
  topk::Mode mode = topk::Mode::kExact;
  topk::GqaReduction reduction = topk::GqaReduction::kMax;
  int64_t n_sink = 0;            // >= 0
  int64_t n_local = 0;           // >= 0
  int64_t candidate_tokens = 0;  // kBoundThenExact: 0 = 4 * k, else >= k
  float softmax_scale = 0.0f;    // of the captured mass; 0 = 1 / sqrt(head_dim)
  bool want_scores = false;      // exact reduced scores of the selected tokens
  bool want_mass = false;        // captured softmax mass per row
  bool gather = false;           // the selected tokens' K/V at `layer`
  bool keep = false;             // keep the selection for Gather (selection_id)
};

struct SelectOutput {
  ModelId model;
  int64_t num_tokens = 0;  // N: tokens selected over
  int kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kBF16;    // of the model (and of `gathered`)
  int64_t rows = 0;              // kv_heads, or query_heads for kPerQueryHead
  int64_t capacity = 0;          // slots per row (topk::SelectCapacity)
  std::vector<int32_t> counts;   // [rows]
  std::vector<int32_t> indices;  // [rows][capacity] ascending, -1 after counts[r]
  std::vector<float> scores;     // [rows][capacity] with want_scores (NaN after counts[r])
  std::vector<float> mass;       // [rows] with want_mass
  std::string selection_id;      // with keep
  // With gather: [k|v][rows][capacity][head_dim] in `dtype`; zeros after counts[r].
  std::string gathered;
  // Page modes: every piece of page metadata came from the store (none was built).
  bool metadata_cached = false;
};

// A kept selection: the token indices of one Select, to gather at other layers. Immutable.
class KeptSelection {
 public:
  const ModelSpec& spec() const { return spec_; }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t rows() const { return rows_; }
  int64_t capacity() const { return capacity_; }
  const std::vector<int32_t>& counts() const { return counts_; }
  const std::vector<int32_t>& indices() const { return indices_; }  // [rows][capacity]
  // Bytes of one layer's gathered K/V: 2 * rows * capacity * head_dim * dtype size.
  uint64_t layer_bytes() const;

 private:
  friend class RetrievalStore;
  ModelSpec spec_;
  ModelId model_;
  int64_t num_tokens_ = 0;
  int64_t rows_ = 0;
  int64_t capacity_ = 0;
  std::vector<int32_t> counts_;
  std::vector<int32_t> indices_;
  // Prefix: re-acquired on Gather and checked to be the same blocks (the cache stays free to
  // evict them meanwhile).
  BlockHash last_block_;  // a prefix's: Gather holds the chain that ends there
  // Session: the document as it was selected over (chunks are immutable and shared).
  std::shared_ptr<const SessionReader> session_;
};

class RetrievalStore {
 public:
  struct Options {
    // Bytes of page metadata kept (least recently used entries go first). 0: none is kept (built
    // for every call).
    uint64_t metadata_capacity_bytes = 256ull << 20;
    // Check every prefix metadata entry against its block's serial before use (see the top).
    bool verify_metadata = true;
    // Build the page metadata of every fresh prefix block when a Put stores it (all layers; the
    // Put's thread pays one pass over the block's keys). Off: built on first use only.
    bool build_metadata_on_put = true;
    // Kept selections: at most this many (the least recently used is dropped for a new one), each
    // dropped after this long unused.
    uint32_t max_selections = 1024;
    absl::Duration selection_ttl = absl::Seconds(10);
    // Most bytes of one layer's gathered K/V (Select with gather or keep): a request past it is
    // INVALID_ARGUMENT instead of an allocation the size of several layers.
    uint64_t max_gather_bytes = 1ull << 30;
    // The clock (tests inject one); default absl::Now.
    std::function<absl::Time()> now;
    // CUDA device on which Select runs topk::SelectCuda (the source's keys are copied there for
    // each call, except keys in pinned host blocks, read in place, and a GPU session's keys, read
    // on its device); -1: SelectCpu only. A call the GPU cannot take (no room on the
    // device, a shape the CUDA path lacks) runs SelectCpu instead (Stats::gpu_fallbacks).
    int device = -1;
    // Bytes of page metadata the GPU path keeps on the device across Selects (per source and
    // layer; then a Select uploads only the pages or blocks whose metadata changed); 0: copied for
    // every call.
    uint64_t gpu_metadata_capacity_bytes = 1ull << 30;
  };

  struct Stats {
    uint64_t selects = 0;
    uint64_t gathers = 0;  // layers gathered from kept selections
    uint64_t metadata_entries = 0;
    uint64_t metadata_bytes = 0;  // entries and prefix views (their bookkeeping)
    uint64_t metadata_capacity_bytes = 0;
    uint64_t metadata_hits = 0;    // entries found with matching keys
    uint64_t metadata_builds = 0;  // entries built by Select (first use, keys changed, not kept)
    uint64_t metadata_put_builds = 0;  // (block, layer) entries built when a Put stored the block
    uint64_t metadata_stale = 0;       // entries found whose keys had changed (rebuilt)
    uint64_t metadata_evictions = 0;
    // Pages built for session entries: all of them at first use, then only those whose keys an
    // edit, a Fill or an append changed (SessionReader::PageNames).
    uint64_t metadata_session_pages_built = 0;
    // Page-mode Selects over a prefix that found the whole layer's block entries in one lookup
    // (a prefix layer view: the blocks' serials unchanged since the last Select over it).
    uint64_t metadata_prefix_view_hits = 0;
    uint64_t selections = 0;          // kept selections alive
    uint64_t gpu_selects = 0;         // selects run by SelectCuda (Options::device >= 0)
    uint64_t gpu_fallbacks = 0;       // selects meant for the GPU that ran SelectCpu instead
    uint64_t gpu_metadata_bytes = 0;  // page metadata kept on the device
    uint64_t gpu_metadata_pages_uploaded = 0;  // pages of it copied there so far
    // GPU selects that read the keys where they are: pinned host blocks over the bus, blocks of the
    // GPU tier or a GPU session's layer in device memory (not copied through staging).
    uint64_t gpu_keys_in_place = 0;
  };

  // `cache` (borrowed, must outlive the store) holds prefixes; `sessions` (borrowed, may be null:
  // then session sources are FAILED_PRECONDITION) holds sessions. INVALID_ARGUMENT for a null
  // cache, zero max_selections or a non-positive TTL; with device >= 0, the error of
  // RetrievalGpu::Create (UNAVAILABLE without CUDA or a GPU, INVALID_ARGUMENT for a device out of
  // range).
  static absl::StatusOr<std::unique_ptr<RetrievalStore>> Create(KvCache* cache,
                                                                SessionStore* sessions,
                                                                Options options);
  ~RetrievalStore();
  RetrievalStore(const RetrievalStore&) = delete;
  RetrievalStore& operator=(const RetrievalStore&) = delete;

  // Selects over args.source (see SelectArgs). Errors:
  // - INVALID_ARGUMENT: k < 1, negative n_sink / n_local, bad query_heads, layer out of range,
  //   queries not query_heads * head_dim elements of query_dtype, NaN in the queries (or in the
  //   stored keys or scores the mode reads), a head_dim without kernels (64, 128, 256 only),
  //   gathered K/V of one layer (gather or keep) over max_gather_bytes;
  // - NOT_FOUND: unknown model or session, or no full block of the prompt is cached;
  // - FAILED_PRECONDITION: pre-RoPE blocks, a session with tokens awaiting Fill, no session store.
  // On the GPU (Options::device) the semantics are SelectCuda's: fp32 accumulation (ties at the
  // k-th score may go the other way than the CPU's fp64), and NaN in the stored keys is not
  // checked (a NaN score counts as -inf); NaN in the queries is INVALID_ARGUMENT on both paths.
  absl::StatusOr<SelectOutput> Select(const SelectArgs& args);

  // Select in two halves, for a batch of selections (a decode step's sequences): Prepare does
  // everything before the scoring (checks the request, holds the source, reads or builds its page
  // metadata, allocates the outputs) and may run on several threads at once; Run scores a batch of
  // prepared selections, on the GPU all in one RetrievalGpu::SelectBatch (one upload, kernels back
  // to back, one download, one synchronisation) and the rest (and what the GPU cannot take) by
  // SelectCpu one after another, then gathers and keeps each as Select does. Run's answers[i] is
  // what Select would answer items[i]'s args. A prepared selection holds its source (a prefix's
  // blocks cannot be evicted) until it is run or dropped, and borrows `args` (queries included):
  // they must outlive it. It runs once: a second Run of it (or the same one twice in a batch) is
  // FAILED_PRECONDITION; a null item INVALID_ARGUMENT. Run is not to be called concurrently for one
  // prepared selection.
  struct PreparedSelect;
  absl::StatusOr<std::shared_ptr<PreparedSelect>> Prepare(const SelectArgs& args);
  std::vector<absl::StatusOr<SelectOutput>> Run(std::vector<std::shared_ptr<PreparedSelect>> items);
  // Bytes of the outputs a prepared selection holds (indices, counts, scores, mass).
  static uint64_t OutputBytes(const PreparedSelect& p);

  // The kept selection `id`, its idle time reset. NOT_FOUND when unknown, expired or dropped.
  absl::StatusOr<std::shared_ptr<const KeptSelection>> FindSelection(absl::string_view id);

  // Writes the K/V of `selection`'s tokens at `layer` into dst (selection.layer_bytes() bytes):
  // [k|v][rows][capacity][head_dim], zeros after counts[r]. INVALID_ARGUMENT for a layer out of
  // range; NOT_FOUND when the prefix blocks it was made over are no longer all cached.
  absl::Status GatherLayer(const KeptSelection& selection, int layer, void* dst);

  // A kept selection's source, held for GatherLayer at several layers: a prefix's blocks are
  // acquired once for all of them (and cannot be evicted while it lives) instead of at every
  // layer. Calls from several threads may share it. NOT_FOUND as GatherLayer.
  class HeldSource;
  absl::StatusOr<std::shared_ptr<const HeldSource>> HoldSource(const KeptSelection& selection);
  absl::Status GatherLayer(const KeptSelection& selection, const HeldSource& held, int layer,
                           void* dst);
  // GatherLayer's work as a request for topk::GatherCuda on `device`, where a kept prefix
  // selection's blocks all have their GPU-tier copy there (KvCache::gpu_device()) at their own
  // position: true, with the device addresses of the layer's key and value planes of each block
  // in *key_blocks / *value_blocks (req's views point at them: the caller copies both to the
  // device and repoints), and the selection's indices and counts in host memory; dst left unset.
  // False (req untouched) for a session's selection, a block without a GPU copy or stored at
  // another position, or another device. INVALID_ARGUMENT for a layer out of range.
  absl::StatusOr<bool> DeviceGatherRequest(const KeptSelection& selection, const HeldSource& held,
                                           int layer, int device,
                                           std::vector<const void*>* key_blocks,
                                           std::vector<const void*>* value_blocks,
                                           topk::GatherRequest* req) const;
  // Counts `layers` layers gathered by the caller from DeviceGatherRequest's requests (Stats).
  void CountDeviceGathers(uint64_t layers);

  // FindSelection + GatherLayer into a new string.
  absl::StatusOr<std::string> Gather(absl::string_view id, int layer);

  // Drops a kept selection. NOT_FOUND when unknown.
  absl::Status Release(absl::string_view id);

  Stats stats() const;

  // The CUDA device Select runs on, or -1 (SelectCpu).
  int device() const;

  // The kept page metadata of prefix block `block` at `layer` ([kv_heads][pages][2 * head_dim] in
  // the model's dtype), or null when none is kept. For tests and tools.
  std::shared_ptr<const std::string> CachedPageMeta(const BlockHash& block, int layer) const;
  // The same for the first `pages` pages of session `session_id` at `layer` (a model of kv_heads
  // KV heads), as its last Selects in a page mode left them; nullopt when a part is not kept.
  std::optional<std::string> CachedSessionPageMeta(absl::string_view session_id, int layer,
                                                   int64_t pages, int kv_heads) const;

 private:
  class PutHook;
  struct SourceData;
  struct LayerViews;
  struct MetaEntry {
    std::shared_ptr<const std::string> bytes;
    uint64_t fingerprint = 0;
    std::shared_ptr<const std::vector<uint64_t>> page_names;  // session entries: per page
    uint64_t serial = 0;  // unique in the store: names these bytes (a device copy's unit name)
    std::list<std::string>::iterator lru;
  };
  // One layer's block entries of a prefix, as a page-mode Select found or built them, so that the
  // next Select over the same prefix and layer looks them up once instead of once per block. Valid
  // while every block has the serial it had then; dropped (all of them) whenever a prefix block's
  // entry leaves meta_, so that views never hold bytes meta_ no longer accounts for. A view's own
  // bytes (~40 a block) count in meta_bytes_ against the metadata capacity. A hit does not move
  // the entries in meta_'s LRU order (they may go first; the view goes with them).
  struct PrefixMetaView {
    std::vector<uint64_t> serials;  // per block: BlockInfo::serial
    std::vector<std::shared_ptr<const std::string>> holds;
    std::vector<const void*> blocks;  // holds[b]->data()
    std::vector<uint64_t> names;      // per block: its entry's serial
  };
  struct SelectionEntry {
    std::shared_ptr<const KeptSelection> selection;
    absl::Time last_used;
  };

  RetrievalStore(KvCache* cache, SessionStore* sessions, Options options);
  absl::Time Now() const;

  // Resolves and holds the source; checks layer and the request's shapes against the model.
  absl::StatusOr<SourceData> Resolve(const RetrievalSource& source);
  // Views of one layer of a resolved source: a prefix's keys and values in place; a session's
  // keys alone (its gathers go through GatherFromSession): a host session's in place where they
  // sit at their own positions (SessionReader::LayerKeyPages), a GPU session's downloaded, or in
  // its device memory with `device_keys`. Does nothing when the keys are there already.
  absl::Status ViewsOf(const SourceData& src, int layer, bool device_keys, LayerViews* out) const;
  // The page metadata of one layer (built or from the store), as a view for SelectRequest. Reads
  // a session's keys (ViewsOf) only for the pages it must build.
  absl::Status PageMetaOf(const SourceData& src, int layer, LayerViews* views);
  absl::Status SessionPageMetaOf(const SourceData& src, int layer, LayerViews* views);
  // The entry `key` if its fingerprint matches, else one built by `build` and kept; *serial is
  // the entry's (0 when it was not kept).
  absl::StatusOr<std::shared_ptr<const std::string>> Metadata(
      const std::string& key, uint64_t fingerprint, uint64_t bytes,
      const std::function<absl::Status(void*)>& build, bool* cached, uint64_t* serial);

  // The entry `key` if its fingerprint and size match (a hit, *serial set); else null, and a stale
  // entry there is dropped.
  std::shared_ptr<const std::string> FindLocked(absl::string_view key, uint64_t fingerprint,
                                                uint64_t bytes, uint64_t* serial)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(meta_mu_);
  // Keeps `bytes` under `key`, replacing an entry there and evicting least recently used ones;
  // returns its serial (0: too large to keep).
  uint64_t InsertLocked(const std::string& key, std::shared_ptr<const std::string> bytes,
                        uint64_t fingerprint,
                        std::shared_ptr<const std::vector<uint64_t>> page_names = nullptr)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(meta_mu_);
  void EraseLocked(const std::string& key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(meta_mu_);
  // Called for every entry leaving meta_: a prefix block's drops the prefix views.
  void ForgetLocked(absl::string_view key) ABSL_EXCLUSIVE_LOCKS_REQUIRED(meta_mu_);
  // Drops every prefix view and its bytes from meta_bytes_.
  void ClearViewsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(meta_mu_);
  // The PutHook's work (see BlockObserver).
  void OnBlockWritten(const RegisteredModel& model, const BlockInfo& block, const void* bytes);
  void OnPutDone(absl::Span<const BlockHash> written, absl::Span<const BlockHash> committed);
  void OnBlockDropped(const BlockHash& block);

  // Run's pieces: SelectCpu over a prepared selection's host views; its gather and keep.
  absl::Status SelectOnCpu(PreparedSelect& p);
  absl::StatusOr<SelectOutput> Finish(PreparedSelect& p);

  absl::StatusOr<std::string> Keep(std::shared_ptr<KeptSelection> selection);
  void SweepSelectionsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(selections_mu_);

  KvCache* cache_;
  SessionStore* sessions_;
  const Options options_;
  std::unique_ptr<RetrievalGpu> gpu_;  // with Options::device >= 0

  mutable absl::Mutex meta_mu_;
  absl::flat_hash_map<std::string, MetaEntry> meta_ ABSL_GUARDED_BY(meta_mu_);
  std::list<std::string> meta_lru_ ABSL_GUARDED_BY(meta_mu_);  // front = most recent
  uint64_t meta_bytes_ ABSL_GUARDED_BY(meta_mu_) = 0;
  uint64_t next_meta_serial_ ABSL_GUARDED_BY(meta_mu_) = 0;
  // Prefix views by (last block, layer), and the block entries they reference in all; bumped
  // generation = a block entry left meta_ (views made before are not kept).
  absl::flat_hash_map<std::string, std::shared_ptr<const PrefixMetaView>> meta_views_
      ABSL_GUARDED_BY(meta_mu_);
  uint64_t meta_view_blocks_ ABSL_GUARDED_BY(meta_mu_) = 0;
  uint64_t block_meta_generation_ ABSL_GUARDED_BY(meta_mu_) = 0;
  Stats counters_ ABSL_GUARDED_BY(meta_mu_);
  // Metadata built from a Put's bytes, until the Put commits: block -> (key, entry, fingerprint)
  // per layer.
  struct PendingMeta {
    std::string key;
    std::shared_ptr<const std::string> bytes;
    uint64_t fingerprint = 0;
  };
  absl::flat_hash_map<BlockHash, std::vector<PendingMeta>> pending_ ABSL_GUARDED_BY(meta_mu_);
  // Layers of the blocks whose entries were built on Put (dropped with the block).
  absl::flat_hash_map<BlockHash, int> put_blocks_ ABSL_GUARDED_BY(meta_mu_);
  std::unique_ptr<PutHook> hook_;  // registered with cache_ while the store lives

  mutable absl::Mutex selections_mu_;
  absl::flat_hash_map<std::string, SelectionEntry> selections_ ABSL_GUARDED_BY(selections_mu_);
  uint64_t next_selection_ ABSL_GUARDED_BY(selections_mu_) = 0;
  uint64_t selection_salt_ = 0;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_RETRIEVAL_H_
