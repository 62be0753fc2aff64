#include "cache/retrieval.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cache/retrieval_gpu.h"
#include "kernels/common/device.h"

namespace ropekv {

using topk::MatrixView;
using topk::MutableMatrixView;

// A source held for one call: the prefix blocks (read handle, re-rotated copies where needed) or a
// session's document.
struct RetrievalStore::SourceData {
  ModelId model;
  ModelSpec spec;
  int64_t num_tokens = 0;
  // Prefix.
  std::optional<ReadHandle> handle;
  std::vector<std::string> rerotated;  // per block: empty = read as stored
  // Session.
  std::string session_id;
  std::shared_ptr<const SessionReader> reader;

  bool session() const { return reader != nullptr; }
  // A prefix all of whose blocks are read as stored (none re-rotated to its place).
  bool prefix_as_stored() const {
    return !session() && std::all_of(rerotated.begin(), rerotated.end(),
                                     [](const std::string& r) { return r.empty(); });
  }
  const void* block(size_t b) const {
    return rerotated[b].empty() ? static_cast<const void*>(handle->bytes(b).data())
                                : static_cast<const void*>(rerotated[b].data());
  }
};

// The views of one layer. Views point into the vectors and strings here: never moved once set.
struct RetrievalStore::LayerViews {
  MatrixView keys;
  MatrixView values;
  MatrixView page_meta;
  std::vector<const void*> key_blocks;
  std::vector<const void*> value_blocks;
  std::vector<const void*> meta_blocks;
  bool keys_ready = false;  // keys (and a prefix's values) set
  // Host session: the layer's keys as re-rotated now, page by page (SessionReader::LayerKeyPages).
  std::optional<SessionReader::KeyPages> key_pages;
  // GPU session (or blocks of a size pages do not divide): the same keys downloaded,
  // [kv_heads][N][head_dim]. Not zero-filled: the reader writes every byte.
  std::unique_ptr<char[]> layer;
  // Or, for a GPU session selected over on its own device, the same keys in device memory
  // (SessionReader::LayerOnDevice): `keys` then points there and only SelectCuda may read it.
  std::shared_ptr<void> device_keys;
  std::vector<std::shared_ptr<const std::string>> meta_hold;
  std::shared_ptr<const PrefixMetaView> meta_view;  // a prefix's block entries, when from a view
  bool metadata_cached = true;
  // The metadata's name for a device copy (RetrievalGpu::MetaName): per unit of
  // meta_pages_per_unit pages, an entry's serial (prefix) or a page name (session); empty when an
  // entry was not kept.
  std::string meta_key;
  std::vector<uint64_t> meta_names;
  int64_t meta_pages_per_unit = 1;
};

namespace {

std::string LayerKey(char kind, absl::string_view id, int layer) {
  std::string key(1, kind);
  key.append(id.data(), id.size());
  char l[sizeof(int)];
  std::memcpy(l, &layer, sizeof(int));
  key.append(l, sizeof(int));
  return key;
}

// Blocks all prefix views may reference together (~40 bytes of bookkeeping each: 10 MiB); past it
// the views are dropped and made again by the next Selects.
constexpr uint64_t kMaxPrefixViewBlocks = 1 << 18;

// What a prefix view of `blocks` blocks under `key` costs, as counted against the metadata
// capacity: its vectors (a serial, a held entry, a pointer and a name a block), the object and
// its map slot.
uint64_t ViewBytes(absl::string_view key, size_t blocks) {
  return blocks * (sizeof(uint64_t) + sizeof(std::shared_ptr<const std::string>) +
                   sizeof(const void*) + sizeof(uint64_t)) +
         key.size() + 128;
}

// A session's layer is kept in metadata entries of this many pages ([kv_heads][kMetaChunkPages]
// [2 * head_dim] each, the last one padded), so that an append or a local edit copies and rebuilds
// one entry rather than the layer's (8 MB at 32K tokens of Llama-3-8B).
constexpr int64_t kMetaChunkPages = 64;

// The key of chunk `chunk` of a session layer's metadata.
std::string SessionChunkKey(absl::string_view session_id, int layer, int64_t chunk) {
  std::string key = LayerKey('S', session_id, layer);
  const int32_t c = static_cast<int32_t>(chunk);
  char b[sizeof(int32_t)];
  std::memcpy(b, &c, sizeof(int32_t));
  key.append(b, sizeof(int32_t));
  return key;
}

// Bytes of one [kv_heads][tokens][head_dim] plane of keys (or values).
uint64_t PlaneBytes(const ModelSpec& spec, int64_t tokens) {
  return static_cast<uint64_t>(spec.kv_heads) * tokens * spec.head_dim * DTypeSize(spec.dtype);
}

// Where `layer`'s keys (kv 0) or values (kv 1) start in a block laid out
// [layer][k|v][kv_head][token][head_dim].
const char* BlockPlane(const void* block, const ModelSpec& spec, int layer, int kv) {
  return static_cast<const char*>(block) +
         (2 * static_cast<uint64_t>(layer) + kv) * PlaneBytes(spec, spec.block_tokens);
}

// The device addresses of `layer`'s key (kv 0) or value (kv 1) plane in the GPU-tier copies of
// every block `h` holds (ReadHandle::device_bytes), into *out; false when a block has no GPU copy.
bool GpuTierBlocks(const ReadHandle& h, const ModelSpec& spec, int layer, int kv,
                   std::vector<const void*>* out) {
  out->clear();
  for (size_t b = 0; b < h.blocks().size(); ++b) {
    if (h.device_bytes(b) == nullptr) return false;
    out->push_back(BlockPlane(h.device_bytes(b), spec, layer, kv));
  }
  return true;
}

// INVALID_ARGUMENT unless 0 <= layer < the model's layers.
absl::Status LayerInRange(const ModelSpec& spec, const ModelId& model, int layer) {
  if (layer < 0 || layer >= spec.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer must be in [0, ", spec.layers, ") for model ", model, ", got ", layer));
  }
  return absl::OkStatus();
}

bool ValidQueryDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

// Gathers a selection (`rows` lists of `capacity` entries, counts[r] valid) from the keys and
// values of one layer (n tokens) into dst_keys / dst_values: [rows][capacity][head_dim], zeros
// after a list's count.
absl::Status GatherFromViews(const ModelSpec& spec, int64_t n, const topk::MatrixView& keys,
                             const topk::MatrixView& values, int64_t rows, int64_t capacity,
                             const int32_t* indices, const int32_t* counts, void* dst_keys,
                             void* dst_values) {
  topk::GatherRequest g;
  g.kv_heads = spec.kv_heads;
  g.head_dim = spec.head_dim;
  g.num_tokens = n;
  g.rows = rows;
  g.capacity = capacity;
  g.keys = keys;
  g.values = values;
  g.indices = indices;
  g.counts = counts;
  g.dst_keys = dst_keys;
  g.dst_values = dst_values;
  return topk::GatherCpu(g);
}

// GatherFromViews for one layer of a session, with only the selected tokens materialised
// (SessionReader::WriteLayerTokens; each list's tokens mapped to their place among them), not the
// layer: a kept selection's Gather at 32K tokens took ~70 ms for the layer's 128 MB, now ~4.6.
absl::Status GatherFromSession(const SessionReader& reader, const ModelSpec& spec, int layer,
                               int64_t rows, int64_t capacity, const std::vector<int32_t>& indices,
                               const std::vector<int32_t>& counts, void* dst_keys,
                               void* dst_values) {
  std::vector<int32_t> tokens;
  for (int64_t r = 0; r < rows; ++r) {
    tokens.insert(tokens.end(), indices.begin() + r * capacity,
                  indices.begin() + r * capacity + counts[r]);
  }
  std::sort(tokens.begin(), tokens.end());
  tokens.erase(std::unique(tokens.begin(), tokens.end()), tokens.end());
  if (tokens.empty()) {
    const size_t half =
        static_cast<size_t>(rows * capacity) * spec.head_dim * DTypeSize(spec.dtype);
    std::memset(dst_keys, 0, half);
    std::memset(dst_values, 0, half);
    return absl::OkStatus();
  }
  const int64_t m = static_cast<int64_t>(tokens.size());
  const uint64_t plane = PlaneBytes(spec, m);
  std::unique_ptr<char[]> packed(new char[2 * plane]);
  if (absl::Status s = reader.WriteLayerTokens(layer, tokens, packed.get()); !s.ok()) return s;
  std::vector<int32_t> local(indices.size(), -1);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < counts[r]; ++j) {
      const int32_t t = indices[r * capacity + j];
      local[r * capacity + j] =
          static_cast<int32_t>(std::lower_bound(tokens.begin(), tokens.end(), t) - tokens.begin());
    }
  }
  return GatherFromViews(
      spec, m, topk::DenseMatrix<const void*>(packed.get(), spec.dtype, m, spec.head_dim),
      topk::DenseMatrix<const void*>(packed.get() + plane, spec.dtype, m, spec.head_dim), rows,
      capacity, local.data(), counts.data(), dst_keys, dst_values);
}

}  // namespace

absl::StatusOr<int> ResolveRetrievalDevice(absl::string_view mode, int gpu_device) {
  if (mode == "cpu") return -1;
  if (mode == "gpu") return gpu_device;
  if (mode == "auto") return RetrievalGpuBuilt() && GpuAvailable() ? gpu_device : -1;
  return absl::InvalidArgumentError(
      absl::StrCat("the retrieval device must be auto, cpu or gpu, got '", mode, "'"));
}

uint64_t KeptSelection::layer_bytes() const {
  return 2ull * rows_ * capacity_ * spec_.head_dim * DTypeSize(spec_.dtype);
}

absl::StatusOr<std::unique_ptr<RetrievalStore>> RetrievalStore::Create(KvCache* cache,
                                                                       SessionStore* sessions,
                                                                       Options options) {
  if (cache == nullptr) return absl::InvalidArgumentError("retrieval needs a KvCache, got null");
  if (options.max_selections == 0) {
    return absl::InvalidArgumentError("max_selections must be >= 1, got 0");
  }
  if (options.selection_ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat("selection_ttl must be positive, got ",
                                                   absl::FormatDuration(options.selection_ttl)));
  }
  std::unique_ptr<RetrievalGpu> gpu;
  if (options.device >= 0) {
    auto made = RetrievalGpu::Create(options.device, options.gpu_metadata_capacity_bytes);
    if (!made.ok()) {
      return absl::Status(
          made.status().code(),
          absl::StrCat("Select on CUDA device ", options.device, ": ", made.status().message()));
    }
    gpu = *std::move(made);
  }
  auto store =
      std::unique_ptr<RetrievalStore>(new RetrievalStore(cache, sessions, std::move(options)));
  store->gpu_ = std::move(gpu);
  return store;
}

// The store's view of the KvCache's Put and evict paths (metadata on write).
class RetrievalStore::PutHook : public BlockObserver {
 public:
  explicit PutHook(RetrievalStore* store) : store_(store) {}
  void OnBlockWritten(const RegisteredModel& model, const BlockInfo& block,
                      const void* bytes) override {
    store_->OnBlockWritten(model, block, bytes);
  }
  void OnPutDone(absl::Span<const BlockHash> written,
                 absl::Span<const BlockHash> committed) override {
    store_->OnPutDone(written, committed);
  }
  void OnBlockDropped(const BlockHash& block) override { store_->OnBlockDropped(block); }

 private:
  RetrievalStore* store_;
};

RetrievalStore::RetrievalStore(KvCache* cache, SessionStore* sessions, Options options)
    : cache_(cache), sessions_(sessions), options_(std::move(options)) {
  std::random_device rd;
  selection_salt_ = (static_cast<uint64_t>(rd()) << 32) ^ rd();
  if (options_.build_metadata_on_put) {
    hook_ = std::make_unique<PutHook>(this);
    cache_->AddBlockObserver(hook_.get());
  }
}

RetrievalStore::~RetrievalStore() {
  if (hook_ != nullptr) cache_->RemoveBlockObserver(hook_.get());
}

absl::Time RetrievalStore::Now() const { return options_.now ? options_.now() : absl::Now(); }

int RetrievalStore::device() const { return gpu_ != nullptr ? gpu_->device() : -1; }

// ---------------------------------------------------------------------------------------------
// Sources

namespace {

// Holds the prefix `h` acquired (KvCache::AcquirePrefix or AcquireChain), with blocks whose keys
// sit at another position than their place re-rotated to it.
absl::Status HoldPrefix(absl::StatusOr<ReadHandle> h, std::optional<ReadHandle>* handle,
                        std::vector<std::string>* rerotated) {
  if (!h.ok()) return h.status();
  const std::vector<BlockInfo>& blocks = h->blocks();
  rerotated->assign(blocks.size(), std::string());
  for (size_t b = 0; b < blocks.size(); ++b) {
    if (blocks[b].pre_rope) {
      return absl::FailedPreconditionError(
          absl::StrCat("block ", b,
                       " of the prompt holds pre-RoPE keys; selection needs keys "
                       "rotated to their positions (post-RoPE)"));
    }
    if (blocks[b].rotated_at != blocks[b].position) {
      (*rerotated)[b].resize(h->block_bytes());
      absl::Status s = h->CopyBlock(b, (*rerotated)[b].data(), blocks[b].position);
      if (!s.ok()) return s;
    }
  }
  handle->emplace(*std::move(h));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<RetrievalStore::SourceData> RetrievalStore::Resolve(const RetrievalSource& source) {
  SourceData src;
  if (!source.session_id.empty()) {
    if (sessions_ == nullptr) {
      return absl::FailedPreconditionError("this retrieval store has no session store");
    }
    auto reader = sessions_->Read(source.session_id, std::nullopt);
    if (!reader.ok()) return reader.status();
    if (reader->range().size() == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("session '", source.session_id, "' is empty: no token to select"));
    }
    src.spec = reader->spec();
    src.model = ModelIdOf(src.spec);
    src.num_tokens = reader->range().size();
    src.session_id = source.session_id;
    src.reader = std::make_shared<const SessionReader>(*std::move(reader));
    return src;
  }
  auto model = cache_->ResolveModel(source.model);
  if (!model.ok()) return model.status();
  src.model = model->id;
  src.spec = model->spec;
  absl::Status s =
      HoldPrefix(source.last_block.has_value()
                     ? cache_->AcquireChain(model->id, *source.last_block)
                     : cache_->AcquirePrefix(model->id, source.tenant, source.tokens, 0),
                 &src.handle, &src.rerotated);
  if (!s.ok()) return s;
  src.num_tokens = src.handle->matched_tokens();
  if (src.num_tokens == 0) {
    return absl::NotFoundError(absl::StrCat("no block of the prompt (", source.tokens.size(),
                                            " tokens) is cached for model ", source.model,
                                            ", tenant '", source.tenant, "' (blocks of ",
                                            src.spec.block_tokens, " tokens)"));
  }
  return src;
}

absl::Status RetrievalStore::ViewsOf(const SourceData& src, int layer, bool device_keys,
                                     LayerViews* out) const {
  if (out->keys_ready) return absl::OkStatus();
  out->keys_ready = true;
  const ModelSpec& spec = src.spec;
  if (src.session()) {
    // The keys alone (a session's gathers materialise only the selected tokens' K and V).
    const int64_t n = src.num_tokens;
    if (device_keys) {
      auto keys = src.reader->LayerOnDevice(layer, /*keys_only=*/true);
      if (!keys.ok()) return keys.status();
      out->device_keys = *std::move(keys);
      out->keys =
          topk::DenseMatrix<const void*>(out->device_keys.get(), spec.dtype, n, spec.head_dim);
      return absl::OkStatus();
    }
    if (!src.reader->on_gpu() && spec.block_tokens % topk::kPageTokens == 0) {
      auto pages = src.reader->LayerKeyPages(layer, topk::kPageTokens);
      if (!pages.ok()) return pages.status();
      out->key_pages = *std::move(pages);
      out->keys = topk::BlockedMatrix(out->key_pages->pages.data(), spec.dtype, topk::kPageTokens,
                                      spec.head_dim);
      out->keys.head_stride = out->key_pages->head_stride;
      return absl::OkStatus();
    }
    out->layer.reset(new char[PlaneBytes(spec, n)]);
    absl::Status s = src.reader->WriteLayer(layer, out->layer.get(), /*keys_only=*/true);
    if (!s.ok()) return s;
    out->keys = topk::DenseMatrix<const void*>(out->layer.get(), spec.dtype, n, spec.head_dim);
    return absl::OkStatus();
  }
  const size_t blocks = src.handle->blocks().size();
  out->key_blocks.resize(blocks);
  out->value_blocks.resize(blocks);
  for (size_t b = 0; b < blocks; ++b) {
    out->key_blocks[b] = BlockPlane(src.block(b), spec, layer, 0);
    out->value_blocks[b] = BlockPlane(src.block(b), spec, layer, 1);
  }
  out->keys =
      topk::BlockedMatrix(out->key_blocks.data(), spec.dtype, spec.block_tokens, spec.head_dim);
  out->values =
      topk::BlockedMatrix(out->value_blocks.data(), spec.dtype, spec.block_tokens, spec.head_dim);
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Page metadata

absl::StatusOr<std::shared_ptr<const std::string>> RetrievalStore::Metadata(
    const std::string& key, uint64_t fingerprint, uint64_t bytes,
    const std::function<absl::Status(void*)>& build, bool* cached, uint64_t* serial) {
  {
    absl::MutexLock lock(&meta_mu_);
    if (auto found = FindLocked(key, fingerprint, bytes, serial); found != nullptr) {
      *cached = true;
      return found;
    }
  }
  *cached = false;
  auto built = std::make_shared<std::string>(bytes, '\0');
  if (absl::Status s = build(built->data()); !s.ok()) return s;
  std::shared_ptr<const std::string> result = std::move(built);
  absl::MutexLock lock(&meta_mu_);
  ++counters_.metadata_builds;
  *serial = InsertLocked(key, result, fingerprint);
  return result;
}

std::shared_ptr<const std::string> RetrievalStore::FindLocked(absl::string_view key,
                                                              uint64_t fingerprint, uint64_t bytes,
                                                              uint64_t* serial) {
  auto it = meta_.find(key);
  if (it == meta_.end()) return nullptr;
  if (it->second.fingerprint == fingerprint && it->second.bytes->size() == bytes) {
    ++counters_.metadata_hits;
    meta_lru_.splice(meta_lru_.begin(), meta_lru_, it->second.lru);
    *serial = it->second.serial;
    return it->second.bytes;
  }
  // The keys changed under this entry (a re-Put after eviction): drop it.
  ++counters_.metadata_stale;
  ForgetLocked(key);
  meta_bytes_ -= it->second.bytes->size();
  meta_lru_.erase(it->second.lru);
  meta_.erase(it);
  return nullptr;
}

void RetrievalStore::EraseLocked(const std::string& key) {
  auto it = meta_.find(key);
  if (it == meta_.end()) return;
  ForgetLocked(key);
  meta_bytes_ -= it->second.bytes->size();
  meta_lru_.erase(it->second.lru);
  meta_.erase(it);
}

void RetrievalStore::ForgetLocked(absl::string_view key) {
  if (key.empty() || (key[0] != 'B' && key[0] != 'R')) return;
  ++block_meta_generation_;
  ClearViewsLocked();
}

void RetrievalStore::ClearViewsLocked() {
  for (const auto& [key, view] : meta_views_) meta_bytes_ -= ViewBytes(key, view->serials.size());
  meta_views_.clear();
  meta_view_blocks_ = 0;
}

uint64_t RetrievalStore::InsertLocked(const std::string& key,
                                      std::shared_ptr<const std::string> bytes,
                                      uint64_t fingerprint,
                                      std::shared_ptr<const std::vector<uint64_t>> page_names) {
  const uint64_t size = bytes->size();
  if (size > options_.metadata_capacity_bytes) return 0;  // too large to keep
  EraseLocked(key);  // a concurrent call built it too, or a Put replaced it
  while (meta_bytes_ + size > options_.metadata_capacity_bytes && !meta_lru_.empty()) {
    auto victim = meta_.find(meta_lru_.back());
    ForgetLocked(victim->first);
    meta_bytes_ -= victim->second.bytes->size();
    meta_.erase(victim);
    meta_lru_.pop_back();
    ++counters_.metadata_evictions;
  }
  meta_lru_.push_front(key);
  const uint64_t serial = ++next_meta_serial_;
  meta_.emplace(key, MetaEntry{std::move(bytes), fingerprint, std::move(page_names), serial,
                               meta_lru_.begin()});
  meta_bytes_ += size;
  return serial;
}

// Metadata on write: the Put's bytes of a fresh block -> all its layers' entries, staged until the
// Put commits. Blocks whose keys are not at their own position (Select re-rotates them first),
// pre-RoPE blocks and pages that straddle blocks are left to the lazy path.
void RetrievalStore::OnBlockWritten(const RegisteredModel& model, const BlockInfo& block,
                                    const void* bytes) {
  const ModelSpec& spec = model.spec;
  if (block.pre_rope || block.rotated_at != block.position ||
      spec.block_tokens % topk::kPageTokens != 0 || !topk::IsSupportedHeadDim(spec.head_dim)) {
    return;
  }
  const int64_t ppb = spec.block_tokens / topk::kPageTokens;
  const int64_t width = 2 * static_cast<int64_t>(spec.head_dim);
  const uint64_t entry_bytes =
      static_cast<uint64_t>(spec.kv_heads) * ppb * width * DTypeSize(spec.dtype);
  std::vector<PendingMeta> pieces;
  pieces.reserve(spec.layers);
  for (int layer = 0; layer < spec.layers; ++layer) {
    const char* keys = BlockPlane(bytes, spec, layer, 0);
    auto built = std::make_shared<std::string>(entry_bytes, '\0');
    const absl::Status s = topk::BuildPageMetaCpu(
        topk::DenseMatrix<const void*>(keys, spec.dtype, spec.block_tokens, spec.head_dim),
        topk::PageMetaShape{spec.kv_heads, spec.head_dim, spec.block_tokens},
        topk::DenseMatrix<void*>(built->data(), spec.dtype, ppb, width));
    if (!s.ok()) return;  // e.g. a NaN key: Select reports it (lazy path)
    pieces.push_back(PendingMeta{LayerKey('B', block.hash.Raw(), layer), std::move(built),
                                 options_.verify_metadata ? block.serial : 0});
  }
  absl::MutexLock lock(&meta_mu_);
  pending_[block.hash] = std::move(pieces);
}

void RetrievalStore::OnPutDone(absl::Span<const BlockHash> written,
                               absl::Span<const BlockHash> committed) {
  absl::MutexLock lock(&meta_mu_);
  for (const BlockHash& h : committed) {
    auto it = pending_.find(h);
    if (it == pending_.end()) continue;
    for (PendingMeta& m : it->second) {
      InsertLocked(m.key, std::move(m.bytes), m.fingerprint);
      ++counters_.metadata_put_builds;
    }
    put_blocks_[h] = static_cast<int>(it->second.size());
  }
  for (const BlockHash& h : written) pending_.erase(h);
}

void RetrievalStore::OnBlockDropped(const BlockHash& block) {
  absl::MutexLock lock(&meta_mu_);
  auto it = put_blocks_.find(block);
  if (it == put_blocks_.end()) return;
  for (int layer = 0; layer < it->second; ++layer) EraseLocked(LayerKey('B', block.Raw(), layer));
  put_blocks_.erase(it);
}

std::shared_ptr<const std::string> RetrievalStore::CachedPageMeta(const BlockHash& block,
                                                                  int layer) const {
  absl::MutexLock lock(&meta_mu_);
  auto it = meta_.find(LayerKey('B', block.Raw(), layer));
  return it == meta_.end() ? nullptr : it->second.bytes;
}

std::optional<std::string> RetrievalStore::CachedSessionPageMeta(absl::string_view session_id,
                                                                 int layer, int64_t pages,
                                                                 int kv_heads) const {
  absl::MutexLock lock(&meta_mu_);
  std::vector<std::shared_ptr<const std::string>> chunks;
  for (int64_t c = 0; c * kMetaChunkPages < pages; ++c) {
    auto it = meta_.find(SessionChunkKey(session_id, layer, c));
    if (it == meta_.end()) return std::nullopt;
    chunks.push_back(it->second.bytes);
  }
  if (chunks.empty() || kv_heads < 1) return std::nullopt;
  // [kv_heads][kMetaChunkPages][row] a chunk -> [kv_heads][pages][row].
  const uint64_t row = chunks[0]->size() / (static_cast<uint64_t>(kv_heads) * kMetaChunkPages);
  std::string out(static_cast<uint64_t>(kv_heads) * pages * row, '\0');
  for (int h = 0; h < kv_heads; ++h) {
    for (int64_t p = 0; p < pages; ++p) {
      std::memcpy(
          out.data() + (h * pages + p) * row,
          chunks[p / kMetaChunkPages]->data() + (h * kMetaChunkPages + p % kMetaChunkPages) * row,
          row);
    }
  }
  return out;
}

absl::Status RetrievalStore::PageMetaOf(const SourceData& src, int layer, LayerViews* views) {
  if (src.session()) return SessionPageMetaOf(src, layer, views);
  const ModelSpec& spec = src.spec;
  const int64_t width = 2 * static_cast<int64_t>(spec.head_dim);
  const size_t es = DTypeSize(spec.dtype);
  const bool verify = options_.verify_metadata;

  if (!src.session() && spec.block_tokens % topk::kPageTokens == 0) {
    // One entry per (block, layer): pages never straddle blocks.
    const int64_t ppb = spec.block_tokens / topk::kPageTokens;
    const uint64_t entry_bytes = static_cast<uint64_t>(spec.kv_heads) * ppb * width * es;
    const std::vector<BlockInfo>& blocks = src.handle->blocks();
    views->meta_blocks.resize(blocks.size());
    views->meta_hold.resize(blocks.size());
    views->meta_names.resize(blocks.size());
    // A block re-rotated to its place has its own entry, always checked: its keys are not the
    // stored ones. The block's serial names its stored bytes, and with the entry's key (the
    // position a moved block is re-rotated to) the keys read here.
    auto key_of = [&](size_t b) {
      std::string key = LayerKey('B', blocks[b].hash.Raw(), layer);
      if (!src.rerotated[b].empty()) {
        key[0] = 'R';
        char pos[sizeof(int64_t)];
        std::memcpy(pos, &blocks[b].position, sizeof(int64_t));
        key.append(pos, sizeof(int64_t));
      }
      return key;
    };
    auto fingerprint_of = [&](size_t b) {
      return verify || !src.rerotated[b].empty() ? blocks[b].serial : 0;
    };
    auto use_view = [&](std::shared_ptr<const PrefixMetaView> view) {
      views->page_meta = topk::BlockedMatrix(view->blocks.data(), spec.dtype, ppb, width);
      views->meta_names = view->names;
      views->meta_view = std::move(view);
    };
    views->meta_key = LayerKey('P', blocks.back().hash.Raw(), layer);
    views->meta_pages_per_unit = ppb;
    // The prefix's view, when no block changed since it was made: one lookup for the layer (the
    // last block's chained hash names the prefix).
    const std::string view_key = LayerKey('V', blocks.back().hash.Raw(), layer);
    uint64_t generation = 0;
    // The entries there, under one lock; then the others, built and kept one by one.
    std::vector<size_t> missing;
    {
      absl::MutexLock lock(&meta_mu_);
      generation = block_meta_generation_;
      if (auto it = meta_views_.find(view_key); it != meta_views_.end()) {
        const PrefixMetaView& v = *it->second;
        bool same = v.serials.size() == blocks.size();
        for (size_t b = 0; same && b < blocks.size(); ++b) same = v.serials[b] == blocks[b].serial;
        if (same) {
          counters_.metadata_hits += blocks.size();
          ++counters_.metadata_prefix_view_hits;
          use_view(it->second);
          return absl::OkStatus();
        }
      }
      for (size_t b = 0; b < blocks.size(); ++b) {
        auto meta = FindLocked(key_of(b), fingerprint_of(b), entry_bytes, &views->meta_names[b]);
        if (meta == nullptr) {
          missing.push_back(b);
          continue;
        }
        views->meta_blocks[b] = meta->data();
        views->meta_hold[b] = std::move(meta);
      }
    }
    for (size_t b : missing) {
      const void* keys = views->key_blocks[b];
      const std::string key = key_of(b);
      const uint64_t fingerprint = fingerprint_of(b);
      bool cached = false;
      auto meta = Metadata(
          key, fingerprint, entry_bytes,
          [&](void* dst) {
            return topk::BuildPageMetaCpu(
                topk::DenseMatrix<const void*>(keys, spec.dtype, spec.block_tokens, spec.head_dim),
                topk::PageMetaShape{spec.kv_heads, spec.head_dim, spec.block_tokens},
                topk::DenseMatrix<void*>(dst, spec.dtype, ppb, width));
          },
          &cached, &views->meta_names[b]);
      if (!meta.ok()) return meta.status();
      views->metadata_cached = views->metadata_cached && cached;
      views->meta_blocks[b] = (*meta)->data();
      views->meta_hold[b] = *std::move(meta);
    }
    views->page_meta = topk::BlockedMatrix(views->meta_blocks.data(), spec.dtype, ppb, width);
    if (std::count(views->meta_names.begin(), views->meta_names.end(), 0u) > 0) {
      views->meta_names.clear();
      return absl::OkStatus();  // an entry was not kept: no view
    }
    // Every entry is kept: the next Select over this prefix and layer looks them up once.
    auto view = std::make_shared<PrefixMetaView>();
    view->serials.reserve(blocks.size());
    for (const BlockInfo& b : blocks) view->serials.push_back(b.serial);
    view->holds = std::move(views->meta_hold);
    view->blocks = std::move(views->meta_blocks);
    view->names = views->meta_names;
    use_view(view);
    absl::MutexLock lock(&meta_mu_);
    // Entries that left meta_ since the lookup may be among the holds: such a view is not kept.
    if (generation != block_meta_generation_) return absl::OkStatus();
    if (meta_view_blocks_ + blocks.size() > kMaxPrefixViewBlocks) ClearViewsLocked();
    // A view's own bytes count against the metadata capacity: kept only where they fit without
    // evicting an entry (which would drop every view).
    const uint64_t bytes = ViewBytes(view_key, blocks.size());
    auto old = meta_views_.find(view_key);
    const uint64_t replaced =
        old != meta_views_.end() ? ViewBytes(view_key, old->second->serials.size()) : 0;
    if (blocks.size() > kMaxPrefixViewBlocks ||
        meta_bytes_ - replaced + bytes > options_.metadata_capacity_bytes) {
      return absl::OkStatus();
    }
    if (old != meta_views_.end()) meta_view_blocks_ -= old->second->serials.size();
    meta_view_blocks_ += blocks.size();
    meta_bytes_ = meta_bytes_ - replaced + bytes;
    meta_views_[view_key] = std::move(view);
    return absl::OkStatus();
  }

  // One entry over the whole prefix whose pages straddle blocks (keyed by its last block, whose
  // chained hash names the prefix).
  const int64_t n = src.num_tokens;
  const int64_t pages = topk::NumPages(n);
  const uint64_t entry_bytes = static_cast<uint64_t>(spec.kv_heads) * pages * width * es;
  uint64_t fingerprint = 0;
  if (verify) {
    std::vector<uint64_t> serials;
    for (const BlockInfo& b : src.handle->blocks()) serials.push_back(b.serial);
    fingerprint = BlockChecksum(serials.data(), serials.size() * sizeof(uint64_t));
  }
  const std::string key = LayerKey('P', src.handle->blocks().back().hash.Raw(), layer);
  bool cached = false;
  uint64_t serial = 0;
  auto meta = Metadata(
      key, fingerprint, entry_bytes,
      [&](void* dst) {
        return topk::BuildPageMetaCpu(views->keys,
                                      topk::PageMetaShape{spec.kv_heads, spec.head_dim, n},
                                      topk::DenseMatrix<void*>(dst, spec.dtype, pages, width));
      },
      &cached, &serial);
  if (!meta.ok()) return meta.status();
  views->metadata_cached = cached;
  views->page_meta = topk::DenseMatrix<const void*>((*meta)->data(), spec.dtype, pages, width);
  views->meta_hold.push_back(*std::move(meta));
  views->meta_key = key;
  views->meta_pages_per_unit = pages;
  if (serial != 0) views->meta_names.assign(1, serial);
  return absl::OkStatus();
}

namespace {

// Pages of a GPU session's metadata to build from which the whole layer's is built on the GPU
// instead (the layer rotated on the device, its metadata built there and downloaded: 1/8 of its
// key bytes) rather than from those pages' keys read through the host. Between a decode step's
// one page and an edit's hundreds; not tuned. Measured at 32K on an H100 host (bench/RESULTS.md
// run 14): a Select after an edit that renames half the pages 4.3-5.1 ms this way, after a
// one-page append 1.9-2.4 ms the other.
constexpr int64_t kGpuMetaPages = 64;

// The first key row of page `page` of `keys` (dense, or blocks of a multiple of kPageTokens rows).
const void* PageRows(const topk::MatrixView& keys, int64_t page) {
  const int64_t row = page * topk::kPageTokens;
  const uint64_t es = DTypeSize(keys.dtype);
  if (keys.blocks == nullptr) {
    return static_cast<const char*>(keys.base) + row * keys.row_stride * es;
  }
  return static_cast<const char*>(keys.blocks[row / keys.rows_per_block]) +
         (row % keys.rows_per_block) * keys.row_stride * es;
}

}  // namespace

absl::Status RetrievalStore::SessionPageMetaOf(const SourceData& src, int layer,
                                               LayerViews* views) {
  const ModelSpec& spec = src.spec;
  const int64_t width = 2 * static_cast<int64_t>(spec.head_dim);
  const uint64_t row_bytes = width * DTypeSize(spec.dtype);
  const int64_t n = src.num_tokens;
  const int64_t pages = topk::NumPages(n);
  const int64_t chunks = (pages + kMetaChunkPages - 1) / kMetaChunkPages;
  const uint64_t chunk_bytes = static_cast<uint64_t>(spec.kv_heads) * kMetaChunkPages * row_bytes;
  views->meta_key = LayerKey('S', src.session_id, layer);
  views->meta_names = src.reader->PageNames(topk::kPageTokens);
  views->meta_pages_per_unit = 1;
  const std::vector<uint64_t>& names = views->meta_names;

  // Per chunk: its entry when no page of it was renamed; else the entry as it was (if any), whose
  // copy gets the renamed pages built below.
  std::vector<std::shared_ptr<const std::string>> kept(chunks), old(chunks);
  std::vector<std::shared_ptr<const std::vector<uint64_t>>> old_names(chunks);
  {
    absl::MutexLock lock(&meta_mu_);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t p0 = c * kMetaChunkPages, p1 = std::min(pages, p0 + kMetaChunkPages);
      auto it = meta_.find(SessionChunkKey(src.session_id, layer, c));
      if (it == meta_.end()) continue;
      const MetaEntry& e = it->second;
      if (e.page_names != nullptr && e.bytes->size() == chunk_bytes) {
        if (e.page_names->size() == static_cast<size_t>(p1 - p0) &&
            std::equal(e.page_names->begin(), e.page_names->end(), names.begin() + p0)) {
          ++counters_.metadata_hits;
          meta_lru_.splice(meta_lru_.begin(), meta_lru_, e.lru);
          kept[c] = e.bytes;
          continue;
        }
        old[c] = e.bytes;
        old_names[c] = e.page_names;
      }
      ++counters_.metadata_stale;
    }
  }
  std::vector<std::shared_ptr<std::string>> fresh(chunks);
  std::vector<int64_t> build;  // pages to build, ascending
  for (int64_t c = 0; c < chunks; ++c) {
    if (kept[c] != nullptr) continue;
    fresh[c] = old[c] != nullptr ? std::make_shared<std::string>(*old[c])
                                 : std::make_shared<std::string>(chunk_bytes, '\0');
    const int64_t p0 = c * kMetaChunkPages, p1 = std::min(pages, p0 + kMetaChunkPages);
    const int64_t had = old_names[c] != nullptr ? static_cast<int64_t>(old_names[c]->size()) : 0;
    for (int64_t p = p0; p < p1; ++p) {
      if (p - p0 >= had || (*old_names[c])[p - p0] != names[p]) build.push_back(p);
    }
  }
  // Page p's row of KV head 0 in its chunk (KV head h: kMetaChunkPages * width elements on).
  auto meta_row = [&](int64_t p) {
    return fresh[p / kMetaChunkPages]->data() + (p % kMetaChunkPages) * row_bytes;
  };

  uint64_t pages_built = build.size();
  // A GPU session with many pages to build (after an edit near its start) on the store's device:
  // the whole layer's metadata is built there from its keys in device memory (the same bits), and
  // only the metadata crosses the bus.
  if (gpu_ != nullptr && src.reader->on_gpu() && gpu_->device() == src.reader->gpu_device() &&
      static_cast<int64_t>(build.size()) >= kGpuMetaPages &&
      (!views->keys_ready || views->device_keys != nullptr)) {
    if (absl::Status s = ViewsOf(src, layer, /*device_keys=*/true, views); !s.ok()) return s;
    std::unique_ptr<char[]> dense(
        new char[static_cast<uint64_t>(spec.kv_heads) * pages * row_bytes]);
    absl::Status s = gpu_->BuildPageMeta(
        views->keys, topk::PageMetaShape{spec.kv_heads, spec.head_dim, n}, dense.get());
    if (!s.ok()) return s;
    for (int64_t p : build) {
      for (int h = 0; h < spec.kv_heads; ++h) {
        std::memcpy(meta_row(p) + h * kMetaChunkPages * row_bytes,
                    dense.get() + (h * pages + p) * row_bytes, row_bytes);
      }
    }
    pages_built = pages;
  } else if (!build.empty()) {
    // The keys of the pages to build: from the views when the selection reads them anyway, else
    // those pages alone (a decode step's append re-reads one page, not the moved rest).
    std::vector<const void*> key_rows(build.size());
    int64_t head_stride = 0;
    std::optional<SessionReader::KeyPages> some_pages;
    std::unique_ptr<char[]> packed;
    if (views->keys_ready && views->device_keys == nullptr) {
      for (size_t i = 0; i < build.size(); ++i) key_rows[i] = PageRows(views->keys, build[i]);
      head_stride = views->keys.head_stride;
    } else if (!src.reader->on_gpu() && spec.block_tokens % topk::kPageTokens == 0) {
      auto got = src.reader->LayerKeyPages(layer, topk::kPageTokens, &build);
      if (!got.ok()) return got.status();
      some_pages = *std::move(got);
      for (size_t i = 0; i < build.size(); ++i) key_rows[i] = some_pages->pages[build[i]];
      head_stride = some_pages->head_stride;
    } else {
      std::vector<int32_t> tokens;
      for (int64_t p : build) {
        for (int64_t t = p * topk::kPageTokens; t < std::min(n, (p + 1) * topk::kPageTokens); ++t) {
          tokens.push_back(static_cast<int32_t>(t));
        }
      }
      const int64_t m = static_cast<int64_t>(tokens.size());
      packed.reset(new char[2 * PlaneBytes(spec, m)]);
      if (absl::Status s = src.reader->WriteLayerTokens(layer, tokens, packed.get()); !s.ok()) {
        return s;
      }
      const topk::MatrixView dense =
          topk::DenseMatrix<const void*>(packed.get(), spec.dtype, m, spec.head_dim);
      for (size_t i = 0; i < build.size(); ++i) key_rows[i] = PageRows(dense, i);
      head_stride = dense.head_stride;
    }
    std::vector<void*> meta_rows(build.size());
    for (size_t i = 0; i < build.size(); ++i) meta_rows[i] = meta_row(build[i]);
    topk::MatrixView keys =
        topk::BlockedMatrix(key_rows.data(), spec.dtype, topk::kPageTokens, spec.head_dim);
    keys.head_stride = head_stride;
    topk::MutableMatrixView meta = topk::BlockedMatrix(meta_rows.data(), spec.dtype, 1, width);
    meta.head_stride = kMetaChunkPages * width;
    // Every built page holds kPageTokens tokens but the document's last one.
    const int64_t tokens = static_cast<int64_t>(build.size()) * topk::kPageTokens -
                           (build.back() == pages - 1 ? pages * topk::kPageTokens - n : 0);
    absl::Status s = topk::BuildPageMetaCpu(
        keys, topk::PageMetaShape{spec.kv_heads, spec.head_dim, tokens}, meta);
    if (!s.ok()) return s;
  }

  views->meta_blocks.resize(chunks);
  for (int64_t c = 0; c < chunks; ++c) {
    std::shared_ptr<const std::string> bytes = kept[c] != nullptr ? kept[c] : fresh[c];
    views->meta_blocks[c] = bytes->data();
    views->meta_hold.push_back(std::move(bytes));
  }
  views->page_meta =
      topk::BlockedMatrix(views->meta_blocks.data(), spec.dtype, kMetaChunkPages, width);
  views->metadata_cached = build.empty();
  absl::MutexLock lock(&meta_mu_);
  counters_.metadata_session_pages_built += pages_built;
  for (int64_t c = 0; c < chunks; ++c) {
    if (fresh[c] == nullptr) continue;
    const int64_t p0 = c * kMetaChunkPages, p1 = std::min(pages, p0 + kMetaChunkPages);
    ++counters_.metadata_builds;
    InsertLocked(
        SessionChunkKey(src.session_id, layer, c), std::move(fresh[c]), 0,
        std::make_shared<const std::vector<uint64_t>>(names.begin() + p0, names.begin() + p1));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Select

// A Select between Prepare and Run. Views point into `views` and `out`: never moved once set.
struct RetrievalStore::PreparedSelect {
  const SelectArgs* args = nullptr;
  SourceData src;
  LayerViews views;
  topk::SelectRequest req;  // host views (SelectCpu's)
  SelectOutput out;
  topk::SelectResult result;  // into `out`
  // The GPU's request: keys in the GPU tier where every block has a copy there.
  RetrievalGpu::BatchItem gpu;
  RetrievalGpu::MetaName meta_name;
  std::vector<const void*> device_key_blocks;
  bool ran = false;  // by Run (once)
};

absl::StatusOr<SelectOutput> RetrievalStore::Select(const SelectArgs& args) {
  auto prepared = Prepare(args);
  if (!prepared.ok()) return prepared.status();
  std::vector<std::shared_ptr<PreparedSelect>> one;
  one.push_back(*std::move(prepared));
  return std::move(Run(std::move(one))[0]);
}

absl::StatusOr<std::shared_ptr<RetrievalStore::PreparedSelect>> RetrievalStore::Prepare(
    const SelectArgs& args) {
  // What the request alone can get wrong, before anything is held.
  if (args.k < 1) return absl::InvalidArgumentError(absl::StrCat("k must be >= 1, got ", args.k));
  if (args.n_sink < 0 || args.n_local < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("n_sink and n_local must be >= 0, got ", args.n_sink, " and ", args.n_local));
  }
  if (args.query_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_heads must be >= 1, got ", args.query_heads));
  }
  if (!ValidQueryDType(args.query_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("query dtype must be f32, f16 or bf16, got ",
                                                   static_cast<int>(args.query_dtype)));
  }

  auto resolved = Resolve(args.source);
  if (!resolved.ok()) return resolved.status();
  auto p = std::make_shared<PreparedSelect>();
  p->args = &args;
  p->src = *std::move(resolved);
  const SourceData* src = &p->src;
  LayerViews& views = p->views;
  const ModelSpec& spec = src->spec;
  if (absl::Status s = LayerInRange(spec, src->model, args.layer); !s.ok()) return s;
  if (!topk::IsSupportedHeadDim(spec.head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat("model ", src->model, " has head_dim ",
                                                   spec.head_dim,
                                                   "; selection supports 64, 128 or 256"));
  }
  if (args.query_heads % spec.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_heads must be a multiple of the model's kv_heads (", spec.kv_heads,
                     "), got ", args.query_heads));
  }
  const uint64_t q_elems = static_cast<uint64_t>(args.query_heads) * spec.head_dim;
  const uint64_t q_bytes = q_elems * DTypeSize(args.query_dtype);
  if (args.queries.size() != q_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries must be ", args.query_heads, " heads x ", spec.head_dim, " x ",
        DTypeName(args.query_dtype), " = ", q_bytes, " bytes, got ", args.queries.size()));
  }
  for (uint64_t i = 0; i < q_elems; ++i) {
    if (std::isnan(LoadAsFloat(args.queries.data(), i, args.query_dtype))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "queries: NaN at query head ", i / spec.head_dim, ", element ", i % spec.head_dim));
    }
  }

  // A GPU session selected over on its own device keeps its keys there (its page metadata comes
  // from the store, or is built from the pages it lacks, read alone).
  const bool device_keys = src->session() && src->reader->on_gpu() && gpu_ != nullptr &&
                           gpu_->device() == src->reader->gpu_device();
  // A session's keys are read only where the selection reads them (not by BOUND without scores
  // or mass) or where its metadata must be built.
  const bool page_mode = args.mode != topk::Mode::kExact;
  const bool reads_keys = topk::SelectReadsKeys(args.mode, args.want_scores, args.want_mass);
  if (!src->session() || reads_keys) {
    if (absl::Status s = ViewsOf(*src, args.layer, device_keys, &views); !s.ok()) return s;
  }
  if (page_mode) {
    if (absl::Status s = PageMetaOf(*src, args.layer, &views); !s.ok()) return s;
  }

  topk::SelectRequest& req = p->req;
  req.kv_heads = spec.kv_heads;
  req.query_heads = args.query_heads;
  req.head_dim = spec.head_dim;
  req.num_tokens = src->num_tokens;
  req.queries = args.queries.data();
  req.query_dtype = args.query_dtype;
  req.keys = views.keys;
  if (page_mode) req.page_meta = views.page_meta;
  req.mode = args.mode;
  req.reduction = args.reduction;
  req.k = args.k;
  req.candidate_tokens = args.candidate_tokens;
  req.n_sink = args.n_sink;
  req.n_local = args.n_local;
  req.softmax_scale = args.softmax_scale;

  const uint64_t gather_bytes = 2ull * topk::SelectRows(req) * topk::SelectCapacity(req) *
                                spec.head_dim * DTypeSize(spec.dtype);
  if ((args.gather || args.keep) && gather_bytes > options_.max_gather_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the selection's K/V would take ", gather_bytes, " bytes per layer, over the limit of ",
        options_.max_gather_bytes, "; lower k, or select per KV head instead of per query head"));
  }

  SelectOutput& out = p->out;
  out.model = src->model;
  out.num_tokens = src->num_tokens;
  out.kv_heads = spec.kv_heads;
  out.head_dim = spec.head_dim;
  out.dtype = spec.dtype;
  out.rows = topk::SelectRows(req);
  out.capacity = topk::SelectCapacity(req);
  out.counts.assign(out.rows, 0);
  out.indices.assign(out.rows * out.capacity, -1);
  topk::SelectResult& result = p->result;
  result.indices = out.indices.data();
  result.counts = out.counts.data();
  if (args.want_scores) {
    out.scores.assign(out.rows * out.capacity, 0.0f);
    result.scores = out.scores.data();
  }
  if (args.want_mass) {
    out.mass.assign(out.rows, 0.0f);
    result.mass = out.mass.data();
  }
  out.metadata_cached = page_mode && views.metadata_cached;
  if (gpu_ != nullptr) {
    p->meta_name.key = views.meta_key;
    p->meta_name.names = views.meta_names;
    p->meta_name.pages_per_unit = views.meta_pages_per_unit;
    // A prefix's keys as stored (none re-rotated) come from one pool: the GPU tier on this
    // device when every block has a copy there (read in HBM), else the host tier, which the driver
    // need not be asked about block by block when it is pinned.
    p->gpu.req = req;
    p->gpu.result = result;
    p->gpu.meta_name = page_mode && !views.meta_names.empty() ? &p->meta_name : nullptr;
    if (src->prefix_as_stored()) {
      p->gpu.keys_from_one_pool = cache_->host_device_readable();
      if (reads_keys && cache_->gpu_device() == gpu_->device() &&
          GpuTierBlocks(*src->handle, spec, args.layer, 0, &p->device_key_blocks)) {
        p->gpu.req.keys = topk::BlockedMatrix(p->device_key_blocks.data(), spec.dtype,
                                              spec.block_tokens, spec.head_dim);
        p->gpu.keys_from_one_pool = true;
      }
    }
  }
  return p;
}

uint64_t RetrievalStore::OutputBytes(const PreparedSelect& p) {
  return p.out.indices.size() * sizeof(int32_t) + p.out.counts.size() * sizeof(int32_t) +
         p.out.scores.size() * sizeof(float) + p.out.mass.size() * sizeof(float);
}

std::vector<absl::StatusOr<SelectOutput>> RetrievalStore::Run(
    std::vector<std::shared_ptr<PreparedSelect>> items) {
  const size_t n = items.size();
  std::vector<absl::Status> failed(n);  // OK: not failed
  // A prepared selection runs once: its outputs leave with its answer.
  std::vector<size_t> runnable;
  for (size_t i = 0; i < n; ++i) {
    if (items[i] == nullptr) {
      failed[i] = absl::InvalidArgumentError("Run: a null prepared selection");
    } else if (items[i]->ran) {
      failed[i] = absl::FailedPreconditionError(
          "Run: this prepared selection was run already (prepare it again)");
    } else {
      items[i]->ran = true;
      runnable.push_back(i);
    }
  }
  // The GPU when there is one; the CPU for what it cannot take (no room on the device, a shape
  // SelectCuda lacks), with outputs reset from what the GPU may have written.
  std::vector<bool> on_gpu(n, false);
  uint64_t selects = 0, gpu_selects = 0, gpu_fallbacks = 0;
  if (gpu_ != nullptr && !runnable.empty()) {
    std::vector<RetrievalGpu::BatchItem> batch;
    for (size_t i : runnable) batch.push_back(items[i]->gpu);
    const std::vector<absl::Status> statuses = gpu_->SelectBatch(batch);
    for (size_t j = 0; j < runnable.size(); ++j) {
      const size_t i = runnable[j];
      const absl::Status& s = statuses[j];
      SelectOutput& out = items[i]->out;
      if (s.ok()) {
        on_gpu[i] = true;
      } else if (s.code() == absl::StatusCode::kUnavailable ||
                 s.code() == absl::StatusCode::kResourceExhausted) {
        ++gpu_fallbacks;
        std::fill(out.counts.begin(), out.counts.end(), 0);
        std::fill(out.indices.begin(), out.indices.end(), -1);
        std::fill(out.scores.begin(), out.scores.end(), 0.0f);
        std::fill(out.mass.begin(), out.mass.end(), 0.0f);
      } else {
        failed[i] = s;
      }
    }
  }
  std::vector<absl::StatusOr<SelectOutput>> outs;
  outs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (failed[i].ok() && !on_gpu[i]) failed[i] = SelectOnCpu(*items[i]);
    outs.push_back(failed[i].ok() ? Finish(*items[i]) : absl::StatusOr<SelectOutput>(failed[i]));
    if (outs[i].ok()) {
      ++selects;
      if (on_gpu[i]) ++gpu_selects;
    }
    if (items[i] != nullptr) items[i]->src = SourceData();  // let go, whoever holds the item
  }
  absl::MutexLock lock(&meta_mu_);
  counters_.selects += selects;
  counters_.gpu_selects += gpu_selects;
  counters_.gpu_fallbacks += gpu_fallbacks;
  return outs;
}

absl::Status RetrievalStore::SelectOnCpu(PreparedSelect& p) {
  topk::SelectRequest req = p.req;
  LayerViews host_views;
  if (p.views.device_keys != nullptr) {
    // The CPU reads host keys.
    if (absl::Status s = ViewsOf(p.src, p.args->layer, false, &host_views); !s.ok()) return s;
    req.keys = host_views.keys;
  }
  return topk::SelectCpu(req, p.result);
}

absl::StatusOr<SelectOutput> RetrievalStore::Finish(PreparedSelect& p) {
  const SelectArgs& args = *p.args;
  const SourceData& src = p.src;
  const ModelSpec& spec = src.spec;
  SelectOutput& out = p.out;
  if (args.gather) {
    const uint64_t half =
        static_cast<uint64_t>(out.rows) * out.capacity * spec.head_dim * DTypeSize(spec.dtype);
    out.gathered.assign(2 * half, '\0');
    absl::Status s;
    if (src.session()) {
      s = GatherFromSession(*src.reader, spec, args.layer, out.rows, out.capacity, out.indices,
                            out.counts, out.gathered.data(), out.gathered.data() + half);
    } else {
      s = GatherFromViews(spec, src.num_tokens, p.views.keys, p.views.values, out.rows,
                          out.capacity, out.indices.data(), out.counts.data(), out.gathered.data(),
                          out.gathered.data() + half);
    }
    if (!s.ok()) return s;
  }

  if (args.keep) {
    auto kept = std::make_shared<KeptSelection>();
    kept->spec_ = spec;
    kept->model_ = src.model;
    kept->num_tokens_ = src.num_tokens;
    kept->rows_ = out.rows;
    kept->capacity_ = out.capacity;
    kept->counts_ = out.counts;
    kept->indices_ = out.indices;
    if (src.session()) {
      kept->session_ = src.reader;
    } else {
      kept->last_block_ = src.handle->blocks().back().hash;
    }
    auto id = Keep(std::move(kept));
    if (!id.ok()) return id.status();
    out.selection_id = *std::move(id);
  }
  return std::move(out);
}

// ---------------------------------------------------------------------------------------------
// Kept selections and Gather

void RetrievalStore::SweepSelectionsLocked() {
  const absl::Time now = Now();
  for (auto it = selections_.begin(); it != selections_.end();) {
    if (now - it->second.last_used > options_.selection_ttl) {
      selections_.erase(it++);
    } else {
      ++it;
    }
  }
}

absl::StatusOr<std::string> RetrievalStore::Keep(std::shared_ptr<KeptSelection> selection) {
  absl::MutexLock lock(&selections_mu_);
  SweepSelectionsLocked();
  while (selections_.size() >= options_.max_selections) {
    auto oldest = selections_.begin();
    for (auto it = selections_.begin(); it != selections_.end(); ++it) {
      if (it->second.last_used < oldest->second.last_used) oldest = it;
    }
    selections_.erase(oldest);
  }
  std::string id =
      absl::StrCat("sel-", absl::Hex(selection_salt_, absl::kZeroPad16), "-", next_selection_++);
  selections_.emplace(id, SelectionEntry{std::move(selection), Now()});
  return id;
}

absl::StatusOr<std::shared_ptr<const KeptSelection>> RetrievalStore::FindSelection(
    absl::string_view id) {
  absl::MutexLock lock(&selections_mu_);
  SweepSelectionsLocked();
  auto it = selections_.find(id);
  if (it == selections_.end()) {
    return absl::NotFoundError(
        absl::StrCat("selection '", id, "' is unknown, expired or was dropped"));
  }
  it->second.last_used = Now();
  return it->second.selection;
}

absl::Status RetrievalStore::Release(absl::string_view id) {
  absl::MutexLock lock(&selections_mu_);
  SweepSelectionsLocked();
  auto it = selections_.find(id);
  if (it == selections_.end()) {
    return absl::NotFoundError(absl::StrCat("selection '", id, "' is unknown or expired"));
  }
  selections_.erase(it);
  return absl::OkStatus();
}

class RetrievalStore::HeldSource {
 public:
  SourceData src;
};

absl::StatusOr<std::shared_ptr<const RetrievalStore::HeldSource>> RetrievalStore::HoldSource(
    const KeptSelection& sel) {
  auto held = std::make_shared<HeldSource>();
  SourceData& src = held->src;
  src.model = sel.model_;
  src.spec = sel.spec_;
  src.num_tokens = sel.num_tokens_;
  if (sel.session_ != nullptr) {
    src.reader = sel.session_;
    return held;
  }
  absl::Status s =
      HoldPrefix(cache_->AcquireChain(sel.model_, sel.last_block_), &src.handle, &src.rerotated);
  if (absl::IsNotFound(s)) {
    return absl::NotFoundError(absl::StrCat("the blocks the selection was made over (",
                                            sel.num_tokens_,
                                            " tokens) are no longer all cached: ", s.message()));
  }
  if (!s.ok()) return s;
  return held;
}

absl::Status RetrievalStore::GatherLayer(const KeptSelection& sel, int layer, void* dst) {
  if (absl::Status s = LayerInRange(sel.spec_, sel.model_, layer); !s.ok()) return s;
  auto held = HoldSource(sel);
  if (!held.ok()) return held.status();
  return GatherLayer(sel, **held, layer, dst);
}

absl::Status RetrievalStore::GatherLayer(const KeptSelection& sel, const HeldSource& held,
                                         int layer, void* dst) {
  const ModelSpec& spec = sel.spec_;
  if (absl::Status s = LayerInRange(spec, sel.model_, layer); !s.ok()) return s;
  const SourceData& src = held.src;
  const uint64_t half = sel.layer_bytes() / 2;
  char* dst_values = static_cast<char*>(dst) + half;
  absl::Status s;
  if (src.session()) {
    s = GatherFromSession(*src.reader, spec, layer, sel.rows_, sel.capacity_, sel.indices_,
                          sel.counts_, dst, dst_values);
  } else {
    LayerViews views;
    s = ViewsOf(src, layer, /*device_keys=*/false, &views);
    if (!s.ok()) return s;
    s = GatherFromViews(spec, sel.num_tokens_, views.keys, views.values, sel.rows_, sel.capacity_,
                        sel.indices_.data(), sel.counts_.data(), dst, dst_values);
  }
  if (!s.ok()) return s;
  absl::MutexLock lock(&meta_mu_);
  ++counters_.gathers;
  return absl::OkStatus();
}

absl::StatusOr<bool> RetrievalStore::DeviceGatherRequest(const KeptSelection& sel,
                                                         const HeldSource& held, int layer,
                                                         int device,
                                                         std::vector<const void*>* key_blocks,
                                                         std::vector<const void*>* value_blocks,
                                                         topk::GatherRequest* req) const {
  const ModelSpec& spec = sel.spec_;
  if (absl::Status s = LayerInRange(spec, sel.model_, layer); !s.ok()) return s;
  const SourceData& src = held.src;
  if (!src.prefix_as_stored() || !src.handle.has_value() || device < 0 ||
      cache_->gpu_device() != device || !GpuTierBlocks(*src.handle, spec, layer, 0, key_blocks) ||
      !GpuTierBlocks(*src.handle, spec, layer, 1, value_blocks)) {
    return false;
  }
  req->kv_heads = spec.kv_heads;
  req->head_dim = spec.head_dim;
  req->num_tokens = sel.num_tokens_;
  req->rows = sel.rows_;
  req->capacity = sel.capacity_;
  req->keys = topk::BlockedMatrix(key_blocks->data(), spec.dtype, spec.block_tokens, spec.head_dim);
  req->values =
      topk::BlockedMatrix(value_blocks->data(), spec.dtype, spec.block_tokens, spec.head_dim);
  req->indices = sel.indices_.data();
  req->counts = sel.counts_.data();
  return true;
}

void RetrievalStore::CountDeviceGathers(uint64_t layers) {
  absl::MutexLock lock(&meta_mu_);
  counters_.gathers += layers;
}

absl::StatusOr<std::string> RetrievalStore::Gather(absl::string_view id, int layer) {
  auto sel = FindSelection(id);
  if (!sel.ok()) return sel.status();
  std::string out((*sel)->layer_bytes(), '\0');
  if (absl::Status s = GatherLayer(**sel, layer, out.data()); !s.ok()) return s;
  return out;
}

RetrievalStore::Stats RetrievalStore::stats() const {
  Stats s;
  {
    absl::MutexLock lock(&meta_mu_);
    s = counters_;
    s.metadata_entries = meta_.size();
    s.metadata_bytes = meta_bytes_;
  }
  s.metadata_capacity_bytes = options_.metadata_capacity_bytes;
  if (gpu_ != nullptr) {
    s.gpu_metadata_bytes = gpu_->meta_bytes();
    s.gpu_metadata_pages_uploaded = gpu_->meta_pages_uploaded();
    s.gpu_keys_in_place = gpu_->keys_read_in_place();
  }
  absl::MutexLock lock(&selections_mu_);
  s.selections = selections_.size();
  return s;
}

}  // namespace ropekv
