#include "cache/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace ropekv {

// ---------------------------------------------------------------------------------------------
// PutWriter

PutWriter::PutWriter(KvCache* cache, RegisteredModel model, PutOptions options,
                     std::vector<BlockHash> hashes, std::vector<bool> present,
                     int64_t first_position)
    : cache_(cache),
      model_(std::move(model)),
      options_(std::move(options)),
      block_bytes_(BlockBytes(model_.spec)),
      hashes_(std::move(hashes)),
      present_(std::move(present)),
      slots_(hashes_.size(), nullptr),
      first_position_(first_position) {}

PutWriter::~PutWriter() {
  for (void* slot : slots_) {
    if (slot != nullptr) cache_->host_->FreeSlot(slot, block_bytes_);
  }
}

absl::Status PutWriter::Write(absl::string_view bytes) {
  if (!status_.ok()) return status_;
  if (finished_) return status_ = absl::FailedPreconditionError("Put already finished");
  if (bytes.size() > expected_bytes() - received_) {
    return status_ = absl::InvalidArgumentError(
               absl::StrCat("Put of ", hashes_.size(), " blocks of model ", model_.id, " expects ",
                            expected_bytes(), " bytes (", block_bytes_,
                            " per block), got more: ", received_ + bytes.size()));
  }
  while (!bytes.empty()) {
    const size_t block = received_ / block_bytes_;
    const uint64_t offset = received_ % block_bytes_;
    const size_t n = std::min<uint64_t>(bytes.size(), block_bytes_ - offset);
    if (!present_[block]) {
      if (slots_[block] == nullptr) {
        auto slot = cache_->AllocateSlot(block_bytes_);
        if (!slot.ok()) return status_ = slot.status();
        slots_[block] = *slot;
      }
      std::memcpy(static_cast<char*>(slots_[block]) + offset, bytes.data(), n);
    }
    received_ += n;
    bytes.remove_prefix(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<PutResult> PutWriter::Finish() {
  if (!status_.ok()) return status_;
  if (finished_) return absl::FailedPreconditionError("Put already finished");
  if (received_ != expected_bytes()) {
    status_ = absl::InvalidArgumentError(
        absl::StrCat("Put of ", hashes_.size(), " blocks of model ", model_.id, " expects ",
                     expected_bytes(), " bytes (", block_bytes_, " per block), got ", received_));
    return status_;
  }
  finished_ = true;
  return cache_->CommitPut(*this);
}

// ---------------------------------------------------------------------------------------------
// ReadHandle

ReadHandle::~ReadHandle() { Release(); }

ReadHandle& ReadHandle::operator=(ReadHandle&& o) noexcept {
  if (this != &o) {
    Release();
    cache_ = std::exchange(o.cache_, nullptr);
    model_ = std::move(o.model_);
    block_bytes_ = o.block_bytes_;
    blocks_ = std::move(o.blocks_);
    data_ = std::move(o.data_);
    tokens_ = o.tokens_;
  }
  return *this;
}

void ReadHandle::Release() {
  if (cache_ != nullptr && !blocks_.empty()) {
    std::vector<BlockHash> hashes;
    hashes.reserve(blocks_.size());
    for (const BlockInfo& b : blocks_) hashes.push_back(b.hash);
    cache_->ReleaseRead(hashes);
  }
  cache_ = nullptr;
  blocks_.clear();
  data_.clear();
}

absl::string_view ReadHandle::bytes(size_t i) const {
  return absl::string_view(static_cast<const char*>(data_[i]), block_bytes_);
}

absl::Status ReadHandle::CopyBlock(size_t i, void* dst,
                                   std::optional<int64_t> target_position) const {
  if (i >= blocks_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("block index ", i, " out of range [0, ", blocks_.size(), ")"));
  }
  const BlockInfo& b = blocks_[i];
  if (!target_position.has_value() || b.pre_rope || (*target_position == b.rotated_at)) {
    std::memcpy(dst, data_[i], block_bytes_);
    return absl::OkStatus();
  }
  const ModelSpec& spec = model_.spec;
  const KvStrides strides = BlockStrides(spec);
  RerotateCopy job{
      data_[i],     strides,          0,           dst, strides, 0, spec.block_tokens, b.rotated_at,
      b.rope_table, *target_position, b.rope_table};
  return RerotateCopyCpu(spec.rope, BlockGeometry(spec), absl::MakeConstSpan(&job, 1));
}

// ---------------------------------------------------------------------------------------------
// KvCache

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(Options options) {
  HostTier::Options host_options;
  host_options.capacity_bytes = options.host_capacity_bytes;
  host_options.allocator = std::move(options.host_allocator);
  auto host = HostTier::Create(std::move(host_options));
  if (!host.ok()) return host.status();
  return std::unique_ptr<KvCache>(new KvCache(std::move(options), *std::move(host)));
}

KvCache::KvCache(Options options, std::unique_ptr<HostTier> host)
    : options_(std::move(options)), host_(std::move(host)) {
  host_counters_.tier = TierKind::kHost;
}

KvCache::~KvCache() {
  absl::MutexLock lock(&mu_);
  for (auto& [hash, e] : index_) host_->FreeSlot(e.data, e.bytes);
  index_.clear();
}

absl::StatusOr<ModelRegistry::Registration> KvCache::RegisterModel(const ModelSpec& spec,
                                                                   const std::string& name) {
  if (auto s = ValidateModelSpec(spec); !s.ok()) return s;
  const uint64_t bytes = BlockBytes(spec);
  const uint64_t limit = std::min(options_.max_block_bytes, host_->capacity_bytes());
  if (bytes > limit) {
    return absl::InvalidArgumentError(absl::StrCat("a block of this model has ", bytes,
                                                   " bytes; the limit is ", limit,
                                                   " (max block size or host capacity)"));
  }
  return models_.Register(spec, name);
}

absl::StatusOr<RegisteredModel> KvCache::ResolveModel(absl::string_view id_or_name) const {
  return models_.Resolve(id_or_name);
}

std::vector<RegisteredModel> KvCache::ListModels() const { return models_.List(); }

uint64_t KvCache::BlockCount(absl::string_view model_id) const {
  absl::MutexLock lock(&mu_);
  auto it = blocks_per_model_.find(model_id);
  return it == blocks_per_model_.end() ? 0 : it->second;
}

std::vector<BlockHash> KvCache::ChainHashes(const RegisteredModel& m, absl::string_view tenant,
                                            const BlockHash* parent,
                                            absl::Span<const int32_t> tokens, bool partial_tail) {
  const size_t bt = m.spec.block_tokens;
  std::vector<BlockHash> hashes;
  hashes.reserve(tokens.size() / bt + 1);
  for (size_t i = 0; i < tokens.size() && (partial_tail || i + bt <= tokens.size()); i += bt) {
    const BlockHash* prev = hashes.empty() ? parent : &hashes.back();
    hashes.push_back(PrefixBlockHash(m.id, tenant, prev, tokens.subspan(i, bt)));
  }
  return hashes;
}

std::vector<BlockHash> KvCache::SegmentHashes(const RegisteredModel& m, absl::string_view tenant,
                                              absl::Span<const int32_t> tokens) {
  const BlockHash key = SegmentHash(m.id, tenant, tokens);
  return ChainHashes(m, tenant, &key, tokens, /*partial_tail=*/true);
}

size_t KvCache::MatchLocked(absl::Span<const BlockHash> hashes) const {
  size_t n = 0;
  while (n < hashes.size() && index_.contains(hashes[n])) ++n;
  return n;
}

void KvCache::TouchLocked(absl::Span<const BlockHash> hashes) {
  for (auto it = hashes.rbegin(); it != hashes.rend(); ++it) {
    Entry& e = index_.at(*it);
    lru_.splice(lru_.begin(), lru_, e.lru);
  }
}

absl::StatusOr<std::unique_ptr<PutWriter>> KvCache::BeginPut(PutOptions options) {
  auto model = models_.Resolve(options.model);
  if (!model.ok()) return model.status();
  const int bt = model->spec.block_tokens;
  if (options.segment) {
    if (options.tokens.empty()) {
      return absl::InvalidArgumentError("a segment needs at least one token");
    }
    if (options.parent) return absl::InvalidArgumentError("a segment has no parent");
  } else if (options.tokens.empty() || options.tokens.size() % bt != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Put needs a positive multiple of block_tokens = ", bt, " tokens for model ",
                     model->id, ", got ", options.tokens.size()));
  }
  const BlockHash* parent = options.parent ? &*options.parent : nullptr;
  std::vector<BlockHash> hashes = options.segment
                                      ? SegmentHashes(*model, options.tenant, options.tokens)
                                      : ChainHashes(*model, options.tenant, parent, options.tokens);
  std::vector<bool> present(hashes.size(), false);
  int64_t first_position = 0;
  {
    absl::MutexLock lock(&mu_);
    if (parent != nullptr) {
      auto it = index_.find(*parent);
      if (it == index_.end()) {
        return absl::NotFoundError(absl::StrCat("parent block ", parent->Hex(), " is not cached"));
      }
      if (it->second.model != model->id) {
        return absl::InvalidArgumentError(absl::StrCat("parent block ", parent->Hex(),
                                                       " belongs to model ", it->second.model,
                                                       ", not ", model->id));
      }
      first_position = it->second.info.position + bt;
    }
    for (size_t i = 0; i < hashes.size(); ++i) present[i] = index_.contains(hashes[i]);
  }
  return std::unique_ptr<PutWriter>(new PutWriter(this, *std::move(model), std::move(options),
                                                  std::move(hashes), std::move(present),
                                                  first_position));
}

absl::StatusOr<void*> KvCache::AllocateSlot(uint64_t bytes) {
  while (true) {
    auto slot = host_->AllocateSlot(bytes);
    if (slot.ok() || !absl::IsResourceExhausted(slot.status())) return slot;
    absl::MutexLock lock(&mu_);
    // Evict from the cold end; skip what is pinned or being read.
    bool evicted = false;
    for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
      const Entry& e = index_.at(*it);
      if (e.info.pinned || e.readers > 0) continue;
      if (EvictTreeLocked(*it) > 0) {
        evicted = true;
        break;
      }
    }
    if (!evicted) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "host tier full: ", host_->used_bytes(), " of ", host_->capacity_bytes(),
          " bytes hold blocks that are pinned, being read or being written; a block needs ",
          bytes));
    }
  }
}

uint32_t KvCache::EvictTreeLocked(const BlockHash& hash) {
  auto it = index_.find(hash);
  if (it == index_.end()) return 0;
  uint32_t n = 0;
  // Children first: they are unreachable once their parent is gone.
  const std::vector<BlockHash> children = it->second.children;
  for (const BlockHash& c : children) n += EvictTreeLocked(c);
  it = index_.find(hash);
  Entry& e = it->second;
  if (e.info.pinned || e.readers > 0) return n;
  if (e.parent) {
    if (auto p = index_.find(*e.parent); p != index_.end()) {
      auto& siblings = p->second.children;
      siblings.erase(std::remove(siblings.begin(), siblings.end(), hash), siblings.end());
    }
  }
  lru_.erase(e.lru);
  host_->FreeSlot(e.data, e.bytes);
  if (--blocks_per_model_[e.model] == 0) blocks_per_model_.erase(e.model);
  ++host_counters_.evictions;
  index_.erase(it);
  return n + 1;
}

absl::StatusOr<PutResult> KvCache::CommitPut(PutWriter& w) {
  PutResult result;
  result.hashes = w.hashes_;
  const int bt = w.model_.spec.block_tokens;
  // A segment's blocks chain to each other (evicting one takes the rest) but to no parent.
  const int64_t rotated_base = w.options_.rotated_at.value_or(w.first_position_);
  absl::MutexLock lock(&mu_);
  std::optional<BlockHash> parent = w.options_.parent;
  if (parent && !index_.contains(*parent)) {
    return absl::NotFoundError(
        absl::StrCat("parent block ", parent->Hex(), " was evicted during the Put"));
  }
  for (size_t i = 0; i < w.hashes_.size(); ++i) {
    const BlockHash& h = w.hashes_[i];
    auto it = index_.find(h);
    if (it != index_.end()) {
      // Present already (before or by a concurrent Put): keep the stored copy.
      ++result.blocks_existing;
      if (w.options_.pin) it->second.info.pinned = true;
    } else if (w.slots_[i] == nullptr) {
      // Present when the Put began but evicted since: its bytes were not kept.
      return absl::UnavailableError(
          absl::StrCat("block ", i, " was evicted while the Put was in flight; retry the Put"));
    } else {
      Entry e;
      e.model = w.model_.id;
      e.bytes = w.block_bytes_;
      e.data = std::exchange(w.slots_[i], nullptr);
      e.parent = parent;
      e.info.hash = h;
      e.info.tier = TierKind::kHost;
      e.info.position = w.first_position_ + static_cast<int64_t>(i) * bt;
      e.info.rotated_at = rotated_base + static_cast<int64_t>(i) * bt;
      e.info.rope_table = w.options_.rope_table;
      e.info.pre_rope = w.options_.pre_rope;
      e.info.pinned = w.options_.pin;
      lru_.push_front(h);
      e.lru = lru_.begin();
      if (parent) index_.at(*parent).children.push_back(h);
      index_.emplace(h, std::move(e));
      ++blocks_per_model_[w.model_.id];
      ++result.blocks_stored;
    }
    parent = h;
  }
  TouchLocked(w.hashes_);
  ++stats_.puts;
  stats_.bytes_in += w.received_;
  return result;
}

absl::StatusOr<LookupResult> KvCache::Lookup(absl::string_view model, absl::string_view tenant,
                                             absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  const std::vector<BlockHash> hashes = ChainHashes(*m, tenant, nullptr, tokens);
  LookupResult result;
  absl::MutexLock lock(&mu_);
  const size_t n = MatchLocked(hashes);
  TouchLocked(absl::MakeConstSpan(hashes).subspan(0, n));
  for (size_t i = 0; i < n; ++i) result.blocks.push_back(index_.at(hashes[i]).info);
  result.matched_tokens = static_cast<uint32_t>(n) * m->spec.block_tokens;
  ++stats_.lookups;
  stats_.lookup_hit_tokens += result.matched_tokens;
  stats_.lookup_miss_tokens += tokens.size() - result.matched_tokens;
  host_counters_.hits += n;
  if (n < hashes.size()) ++host_counters_.misses;
  return result;
}

absl::StatusOr<ReadHandle> KvCache::AcquirePrefix(absl::string_view model, absl::string_view tenant,
                                                  absl::Span<const int32_t> tokens,
                                                  uint32_t max_blocks) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  std::vector<BlockHash> hashes = ChainHashes(*m, tenant, nullptr, tokens);
  if (max_blocks > 0 && hashes.size() > max_blocks) hashes.resize(max_blocks);
  ReadHandle handle(this, *m, BlockBytes(m->spec));
  absl::MutexLock lock(&mu_);
  const size_t n = MatchLocked(hashes);
  TouchLocked(absl::MakeConstSpan(hashes).subspan(0, n));
  for (size_t i = 0; i < n; ++i) {
    Entry& e = index_.at(hashes[i]);
    ++e.readers;
    handle.blocks_.push_back(e.info);
    handle.data_.push_back(e.data);
  }
  handle.tokens_ = static_cast<uint32_t>(n) * m->spec.block_tokens;
  ++stats_.gets;
  stats_.bytes_out += n * handle.block_bytes_;
  host_counters_.hits += n;
  if (n < hashes.size()) ++host_counters_.misses;
  return handle;
}

absl::StatusOr<ReadHandle> KvCache::AcquireSegment(absl::string_view model,
                                                   absl::string_view tenant,
                                                   absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  const std::vector<BlockHash> hashes = SegmentHashes(*m, tenant, tokens);
  ReadHandle handle(this, *m, BlockBytes(m->spec));
  absl::MutexLock lock(&mu_);
  if (tokens.empty() || MatchLocked(hashes) != hashes.size()) {
    ++host_counters_.misses;
    return absl::NotFoundError(
        absl::StrCat("segment of ", tokens.size(), " tokens is not cached for model ", m->id));
  }
  TouchLocked(hashes);
  for (const BlockHash& h : hashes) {
    Entry& e = index_.at(h);
    ++e.readers;
    handle.blocks_.push_back(e.info);
    handle.data_.push_back(e.data);
  }
  handle.tokens_ = static_cast<uint32_t>(tokens.size());
  host_counters_.hits += hashes.size();
  ++stats_.gets;
  return handle;
}

absl::StatusOr<LookupResult> KvCache::LookupSegment(absl::string_view model,
                                                    absl::string_view tenant,
                                                    absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  const std::vector<BlockHash> hashes = SegmentHashes(*m, tenant, tokens);
  LookupResult result;
  absl::MutexLock lock(&mu_);
  ++stats_.lookups;
  if (tokens.empty() || MatchLocked(hashes) != hashes.size()) {
    ++host_counters_.misses;
    stats_.lookup_miss_tokens += tokens.size();
    return result;
  }
  TouchLocked(hashes);
  for (const BlockHash& h : hashes) result.blocks.push_back(index_.at(h).info);
  result.matched_tokens = static_cast<uint32_t>(tokens.size());
  stats_.lookup_hit_tokens += tokens.size();
  host_counters_.hits += hashes.size();
  return result;
}

void KvCache::ReleaseRead(absl::Span<const BlockHash> hashes) {
  absl::MutexLock lock(&mu_);
  for (const BlockHash& h : hashes) {
    // A block being read is never evicted, so it is still there.
    --index_.at(h).readers;
  }
}

absl::StatusOr<uint32_t> KvCache::Evict(absl::string_view model, absl::string_view tenant,
                                        absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  absl::MutexLock lock(&mu_);
  uint32_t n = 0;
  if (tokens.empty()) {
    std::vector<BlockHash> all;
    for (const auto& [h, e] : index_) {
      if (e.model == m->id) all.push_back(h);
    }
    for (const BlockHash& h : all) n += EvictTreeLocked(h);
    return n;
  }
  const std::vector<BlockHash> hashes = ChainHashes(*m, tenant, nullptr, tokens);
  const size_t matched = MatchLocked(hashes);
  for (size_t i = matched; i-- > 0;) n += EvictTreeLocked(hashes[i]);
  return n;
}

absl::StatusOr<uint32_t> KvCache::Pin(absl::string_view model, absl::string_view tenant,
                                      absl::Span<const int32_t> tokens, bool pin) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  const std::vector<BlockHash> hashes = ChainHashes(*m, tenant, nullptr, tokens);
  absl::MutexLock lock(&mu_);
  const size_t n = MatchLocked(hashes);
  for (size_t i = 0; i < n; ++i) index_.at(hashes[i]).info.pinned = pin;
  return static_cast<uint32_t>(n);
}

CacheStats KvCache::Stats() const {
  absl::MutexLock lock(&mu_);
  CacheStats s = stats_;
  TierCounters host = host_counters_;
  host.bytes_used = host_->used_bytes();
  host.capacity_bytes = host_->capacity_bytes();
  host.blocks = index_.size();
  for (const auto& [h, e] : index_) host.pinned_blocks += e.info.pinned ? 1 : 0;
  s.tiers.push_back(host);
  s.models = static_cast<uint32_t>(models_.size());
  return s;
}

}  // namespace ropekv
