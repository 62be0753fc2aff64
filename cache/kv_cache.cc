#include "cache/kv_cache.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <iostream>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "cache/parallel.h"

namespace ropekv {
namespace {

// BlockInfo::serial of a block entering the cache.
uint64_t NextBlockSerial() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace

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
  staging_.reset();  // its thread may still read the slots
  absl::MutexLock lock(&cache_->mu_);
  for (void* slot : slots_) {
    if (slot != nullptr) cache_->FreeHostSlot(slot, block_bytes_, model_.id);
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
        auto slot = cache_->AllocateSlot(block_bytes_, model_.id);
        if (!slot.ok()) return status_ = slot.status();
        slots_[block] = *slot;
      }
      std::memcpy(static_cast<char*>(slots_[block]) + offset, bytes.data(), n);
      if (staging_ != nullptr && offset + n == block_bytes_) {
        staging_->Append(hashes_[block], slots_[block], block_bytes_);
      }
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
    device_ = std::move(o.device_);
    tokens_ = o.tokens_;
    temp_ = std::move(o.temp_);
  }
  return *this;
}

void ReadHandle::Release() {
  if (cache_ != nullptr && (!blocks_.empty() || !temp_.empty())) {
    std::vector<BlockHash> hashes;
    hashes.reserve(blocks_.size());
    for (const BlockInfo& b : blocks_) hashes.push_back(b.hash);
    cache_->ReleaseRead(hashes, temp_, block_bytes_, model_.id);
  }
  cache_ = nullptr;
  blocks_.clear();
  data_.clear();
  device_.clear();
  temp_.clear();
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
// KvCache: construction, models, restart

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(Options options) {
  if (auto s = ValidateTierPolicy(options.policy); !s.ok()) return s;
  if (options.policy.write_tier == WriteTier::kDisk && options.disk == nullptr) {
    return absl::FailedPreconditionError("write tier \"disk\" needs a disk tier; none is given");
  }
  if (options.policy.write_tier == WriteTier::kGpu && options.gpu == nullptr) {
    options.policy.write_tier = WriteTier::kHost;  // documented: no GPU tier, Puts stay on host
  }
  HostTier::Options host_options;
  host_options.capacity_bytes = options.host_capacity_bytes;
  host_options.allocator = std::move(options.host_allocator);
  auto host = HostTier::Create(std::move(host_options));
  if (!host.ok()) return host.status();
  std::unique_ptr<DiskTier> disk = std::move(options.disk);
  std::unique_ptr<GpuTier> gpu = std::move(options.gpu);
  std::unique_ptr<KvCache> cache(new KvCache(std::move(options), *std::move(host)));
  cache->disk_ = std::move(disk);
  cache->gpu_ = std::move(gpu);
  if (cache->disk_ != nullptr) {
    if (auto s = cache->LoadDisk(); !s.ok()) return s;
  }
  if (cache->options_.background_maintenance) {
    KvCache* c = cache.get();
    cache->maintenance_ = std::thread([c] { c->MaintenanceLoop(); });
  }
  return cache;
}

KvCache::KvCache(Options options, std::unique_ptr<HostTier> host)
    : options_(std::move(options)), host_(std::move(host)), prompt_hashes_(options_.prompt_memo) {
  host_counters_.tier = TierKind::kHost;
  gpu_counters_.tier = TierKind::kGpu;
  disk_counters_.tier = TierKind::kDisk;
}

void KvCache::AddBlockObserver(BlockObserver* observer) {
  absl::MutexLock lock(&observers_mu_);
  observers_.push_back(observer);
}

void KvCache::RemoveBlockObserver(BlockObserver* observer) {
  absl::MutexLock lock(&observers_mu_);
  observers_.erase(std::remove(observers_.begin(), observers_.end(), observer), observers_.end());
}

KvCache::~KvCache() {
  {
    absl::MutexLock lock(&maintenance_mu_);
    stop_ = true;
  }
  if (maintenance_.joinable()) maintenance_.join();
  CollectGarbage();  // evicted blocks must not come back after a restart
  absl::MutexLock lock(&mu_);
  for (auto& [hash, e] : index_) {
    if (e.data != nullptr) host_->FreeSlot(e.data, e.bytes);
    if (e.gpu && gpu_ != nullptr) gpu_->FreeSlot(*e.gpu).IgnoreError();
  }
  index_.clear();
}

absl::Status KvCache::LoadDisk() {
  auto contents = disk_->Load();
  if (!contents.ok()) return contents.status();
  for (const DiskModelMeta& m : contents->models) {
    std::vector<std::string> names = m.names;
    if (names.empty()) names.push_back("");
    for (const std::string& name : names) {
      // A name now naming another model loses to it; the model stays registered by id.
      auto reg = models_.Register(m.spec, name);
      if (!reg.ok() && !absl::IsAlreadyExists(reg.status())) return reg.status();
      if (!reg.ok()) models_.Register(m.spec, "").IgnoreError();
    }
  }
  {
    absl::MutexLock lock(&mu_);
    for (const RegisteredModel& m : models_.List()) ApplyModelLimitsLocked(m);
    absl::flat_hash_map<ModelId, uint64_t> block_bytes;
    for (const RegisteredModel& m : models_.List()) block_bytes[m.id] = BlockBytes(m.spec);
    // Blocks come in write order: the last written ends up most recent.
    for (const DiskBlockMeta& d : contents->blocks) {
      auto bb = block_bytes.find(d.model);
      if (bb == block_bytes.end() || bb->second != d.bytes || index_.contains(d.hash)) {
        disk_garbage_.push_back(d.hash);  // unknown model or wrong size: unusable
        continue;
      }
      Entry e;
      e.model = d.model;
      e.bytes = d.bytes;
      e.on_disk = true;
      e.parent = d.parent;
      e.info.hash = d.hash;
      e.info.tier = TierKind::kDisk;
      e.info.position = d.position;
      e.info.rotated_at = d.rotated_at;
      e.info.rope_table = d.rope_table;
      e.info.pre_rope = d.pre_rope;
      e.info.pinned = d.pinned;
      e.info.serial = NextBlockSerial();
      lru_.push_front(d.hash);
      e.lru = lru_.begin();
      index_.emplace(d.hash, std::move(e));
    }
    // Link children to parents, then keep what is reachable from a chain's first block: a block
    // whose parent is gone can never be matched.
    std::deque<BlockHash> reachable;
    for (auto& [h, e] : index_) {
      if (!e.parent) {
        reachable.push_back(h);
      } else if (auto p = index_.find(*e.parent); p != index_.end()) {
        p->second.children.push_back(h);
      }
    }
    absl::flat_hash_set<BlockHash> keep;
    while (!reachable.empty()) {
      const BlockHash h = reachable.front();
      reachable.pop_front();
      if (!keep.insert(h).second) continue;
      for (const BlockHash& c : index_.at(h).children) reachable.push_back(c);
    }
    std::vector<BlockHash> orphans;
    for (const auto& [h, e] : index_) {
      if (!keep.contains(h)) orphans.push_back(h);
    }
    for (const BlockHash& h : orphans) {
      Entry& e = index_.at(h);
      lru_.erase(e.lru);
      disk_garbage_.push_back(h);
      index_.erase(h);
    }
    for (const auto& [h, e] : index_) {
      ++blocks_per_model_[e.model];
      disk_bytes_per_model_[e.model] += e.bytes;
    }
    disk_load_.blocks = index_.size();
    disk_load_.dropped = contents->dropped_records + disk_garbage_.size();
    disk_load_.migrated_blocks = contents->migrated_blocks;
  }
  CollectGarbage();
  return absl::OkStatus();
}

void KvCache::ApplyModelLimitsLocked(const RegisteredModel& m) {
  for (const ModelLimit& l : options_.policy.model_limits) {
    if (l.model == m.id || std::find(m.names.begin(), m.names.end(), l.model) != m.names.end()) {
      limits_[m.id] = l;
    }
  }
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
  auto reg = models_.Register(spec, name);
  if (!reg.ok()) return reg;
  auto m = models_.Resolve(reg->id);
  if (!m.ok()) return m.status();
  {
    absl::MutexLock lock(&mu_);
    ApplyModelLimitsLocked(*m);
  }
  if (disk_ != nullptr) {
    // Stored so that a restart registers it again (and keeps its blocks).
    if (auto s = disk_->PutModel({m->id, m->spec, m->names}); !s.ok()) return s;
  }
  return reg;
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

// ---------------------------------------------------------------------------------------------
// Index helpers

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

std::vector<KvCache::Entry*> KvCache::MatchLocked(absl::Span<const BlockHash> hashes) {
  std::vector<Entry*> found;
  found.reserve(hashes.size());
  for (const BlockHash& h : hashes) {
    auto it = index_.find(h);
    // An entry without a copy (its disk copy just failed verification) is a miss.
    if (it == index_.end() || !HasCopy(it->second)) break;
    found.push_back(&it->second);
  }
  return found;
}

void KvCache::TouchLocked(absl::Span<Entry* const> entries) {
  for (auto it = entries.rbegin(); it != entries.rend(); ++it) {
    lru_.splice(lru_.begin(), lru_, (*it)->lru);
  }
}

TierKind KvCache::FastestTier(const Entry& e) const {
  if (e.gpu) return TierKind::kGpu;
  if (e.data != nullptr) return TierKind::kHost;
  return TierKind::kDisk;
}

void KvCache::CountRequestsLocked(absl::Span<Entry* const> found, bool missed) {
  for (const Entry* e : found) {
    const TierKind fastest = FastestTier(*e);
    (fastest == TierKind::kHost ? host_counters_.hits : host_counters_.misses) += 1;
    if (gpu_ != nullptr) (fastest == TierKind::kGpu ? gpu_counters_.hits : gpu_counters_.misses)++;
    if (disk_ != nullptr) {
      (fastest == TierKind::kDisk ? disk_counters_.hits : disk_counters_.misses)++;
    }
  }
  if (missed) {
    ++host_counters_.misses;
    if (gpu_ != nullptr) ++gpu_counters_.misses;
    if (disk_ != nullptr) ++disk_counters_.misses;
  }
}

DiskBlockMeta KvCache::DiskMetaOf(const Entry& e) const {
  DiskBlockMeta d;
  d.hash = e.info.hash;
  d.model = e.model;
  d.parent = e.parent;
  d.position = e.info.position;
  d.rotated_at = e.info.rotated_at;
  d.rope_table = e.info.rope_table;
  d.pre_rope = e.info.pre_rope;
  d.pinned = e.info.pinned;
  d.bytes = e.bytes;
  return d;
}

// ---------------------------------------------------------------------------------------------
// Copies of one tier

void KvCache::DropHostCopyLocked(Entry& e) {
  if (e.data == nullptr) return;
  FreeHostSlot(e.data, e.bytes, e.model);
  e.data = nullptr;
  ++host_counters_.evictions;
  e.info.tier = FastestTier(e);
}

void KvCache::DropGpuCopyLocked(Entry& e) {
  if (!e.gpu) return;
  gpu_->FreeSlot(*e.gpu).IgnoreError();  // ours, allocated once: cannot fail
  e.gpu.reset();
  ++gpu_counters_.evictions;
  e.info.tier = FastestTier(e);
}

void KvCache::DropDiskCopyLocked(Entry& e) {
  if (!e.on_disk) return;
  e.on_disk = false;
  disk_garbage_.push_back(e.info.hash);
  auto it = disk_bytes_per_model_.find(e.model);
  if (it != disk_bytes_per_model_.end()) it->second -= std::min(it->second, e.bytes);
  ++disk_counters_.evictions;
}

void KvCache::FreeHostSlot(void* slot, uint64_t bytes, const ModelId& model) {
  host_->FreeSlot(slot, bytes);
  auto it = host_bytes_per_model_.find(model);
  if (it != host_bytes_per_model_.end()) it->second -= std::min(it->second, bytes);
}

uint32_t KvCache::EvictTreeLocked(const BlockHash& hash, bool ignore_pins) {
  auto it = index_.find(hash);
  if (it == index_.end()) return 0;
  uint32_t n = 0;
  // Children first: they are unreachable once their parent is gone.
  const std::vector<BlockHash> children = it->second.children;
  for (const BlockHash& c : children) n += EvictTreeLocked(c, ignore_pins);
  it = index_.find(hash);
  Entry& e = it->second;
  if ((e.info.pinned && !ignore_pins) || e.readers > 0) return n;
  if (e.parent) {
    if (auto p = index_.find(*e.parent); p != index_.end()) {
      auto& siblings = p->second.children;
      siblings.erase(std::remove(siblings.begin(), siblings.end(), hash), siblings.end());
    }
  }
  lru_.erase(e.lru);
  DropHostCopyLocked(e);
  if (gpu_ != nullptr) DropGpuCopyLocked(e);
  DropDiskCopyLocked(e);
  if (--blocks_per_model_[e.model] == 0) blocks_per_model_.erase(e.model);
  {
    absl::ReaderMutexLock observers(&observers_mu_);
    for (BlockObserver* o : observers_) o->OnBlockDropped(hash);
  }
  index_.erase(it);
  return n + 1;
}

namespace {
struct HashesArg {
  const absl::flat_hash_map<BlockHash, int>* deleting;
  absl::Span<const BlockHash> hashes;
};
bool NoneBeingDeleted(HashesArg* a) {
  for (const BlockHash& h : a->hashes) {
    if (a->deleting->contains(h)) return false;
  }
  return true;
}
}  // namespace

void KvCache::BeginDiskWritesLocked(absl::Span<const BlockHash> hashes) {
  HashesArg arg{&disk_deleting_, hashes};
  mu_.Await(absl::Condition(&NoneBeingDeleted, &arg));
  for (const BlockHash& h : hashes) ++disk_writing_[h];
}

void KvCache::EndDiskWritesLocked(absl::Span<const BlockHash> hashes) {
  for (const BlockHash& h : hashes) {
    auto it = disk_writing_.find(h);
    if (it != disk_writing_.end() && --it->second == 0) disk_writing_.erase(it);
  }
}

void KvCache::CollectGarbage() {
  if (disk_ == nullptr) return;
  std::vector<BlockHash> doomed;
  {
    absl::MutexLock lock(&mu_);
    if (disk_garbage_.empty()) return;
    for (const BlockHash& h : disk_garbage_) {
      auto it = index_.find(h);
      // Written again since it was queued (or being written): the new copy stays.
      if ((it != index_.end() && it->second.on_disk) || disk_writing_.contains(h)) continue;
      doomed.push_back(h);
      ++disk_deleting_[h];
    }
    disk_garbage_.clear();
  }
  if (doomed.empty()) return;
  // A failed delete leaves blocks on disk that are in no index: a restart loads them again,
  // which is harmless (they are valid blocks).
  disk_->DeleteBlocks(doomed).IgnoreError();
  absl::MutexLock lock(&mu_);
  for (const BlockHash& h : doomed) {
    auto it = disk_deleting_.find(h);
    if (--it->second == 0) disk_deleting_.erase(it);
  }
}

// ---------------------------------------------------------------------------------------------
// Room in the tiers

void KvCache::WakeMaintenance() {
  absl::MutexLock lock(&maintenance_mu_);
  wake_ = true;
}

absl::StatusOr<void*> KvCache::AllocateSlot(uint64_t bytes, const ModelId& model) {
  for (int attempt = 0;; ++attempt) {
    uint64_t over_limit = 0;
    uint64_t model_limit = 0;
    {
      absl::MutexLock lock(&mu_);
      auto limit = limits_.find(model);
      if (limit != limits_.end()) model_limit = limit->second.host_bytes;
      const uint64_t used = host_bytes_per_model_[model];
      if (limit != limits_.end() && limit->second.host_bytes > 0 &&
          used + bytes > limit->second.host_bytes) {
        if (bytes > limit->second.host_bytes) {
          return absl::ResourceExhaustedError(absl::StrCat("model ", model, " may hold ",
                                                           limit->second.host_bytes,
                                                           " host bytes; a block needs ", bytes));
        }
        over_limit = used + bytes - limit->second.host_bytes;
      } else {
        host_bytes_per_model_[model] += bytes;  // reserved; the slot itself comes unlocked
      }
    }
    if (over_limit == 0) {
      auto slot = host_->AllocateSlot(bytes);
      if (slot.ok()) {
        const double fill = static_cast<double>(host_->used_bytes()) / host_->capacity_bytes();
        if (fill > options_.policy.high_watermark) WakeMaintenance();
        return slot;
      }
      absl::MutexLock lock(&mu_);
      host_bytes_per_model_[model] -= bytes;
      if (!absl::IsResourceExhausted(slot.status())) return slot.status();
    }
    const uint64_t freed =
        FreeHost(over_limit > 0 ? over_limit : bytes, over_limit > 0 ? model : ModelId());
    if (freed == 0 && attempt > 0) {
      if (over_limit > 0) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "model ", model, " is at its host limit of ", model_limit,
            " bytes with blocks that are pinned, being read or being written; a block needs ",
            bytes));
      }
      return absl::ResourceExhaustedError(absl::StrCat(
          "host tier full: ", host_->used_bytes(), " of ", host_->capacity_bytes(),
          " bytes hold blocks that are pinned, being read or being written; a block needs ",
          bytes));
    }
  }
}

uint64_t KvCache::FreeHost(uint64_t bytes, const ModelId& model) {
  uint64_t freed = 0;
  std::vector<BlockHash> demote;
  std::vector<DiskTier::BlockWrite> writes;
  absl::flat_hash_map<ModelId, uint64_t> demote_bytes;
  {
    absl::MutexLock lock(&mu_);
    std::vector<BlockHash> victims;
    uint64_t planned = 0;
    for (auto it = lru_.rbegin(); it != lru_.rend() && planned < bytes; ++it) {
      const Entry& e = index_.at(*it);
      if (e.data == nullptr || e.info.pinned || e.readers > 0 || e.demoting) continue;
      if (!model.empty() && e.model != model) continue;
      victims.push_back(*it);
      planned += e.bytes;
    }
    for (const BlockHash& h : victims) {
      auto it = index_.find(h);
      if (it == index_.end()) continue;  // went with an evicted ancestor
      Entry& e = it->second;
      if (e.data == nullptr || e.readers > 0 || e.info.pinned) continue;
      if (e.on_disk) {
        freed += e.bytes;
        DropHostCopyLocked(e);  // the disk keeps it (and the GPU copy, if any, stays backed)
      } else if (disk_ != nullptr) {
        e.demoting = true;
        ++e.readers;  // holds the host copy while it is written
        demote.push_back(h);
        writes.push_back({DiskMetaOf(e), e.data});
        demote_bytes[e.model] += e.bytes;
      } else {
        const uint64_t before = host_->used_bytes();
        EvictTreeLocked(h);
        freed += before - std::min(before, host_->used_bytes());
      }
    }
  }
  if (!demote.empty()) {
    // Demotion: write the host copies to disk (outside the mutex), then drop them.
    absl::Status s = absl::OkStatus();
    std::vector<std::pair<ModelId, uint64_t>> reserved;
    for (const auto& [m, b] : demote_bytes) {
      s = ReserveDisk(b, m);
      if (!s.ok()) break;
      reserved.push_back({m, b});
    }
    {
      absl::MutexLock lock(&mu_);
      BeginDiskWritesLocked(demote);
    }
    if (s.ok()) s = disk_->PutBlocks(writes);
    absl::MutexLock lock(&mu_);
    EndDiskWritesLocked(demote);
    for (const auto& [m, b] : reserved) {
      disk_reserved_ -= std::min(disk_reserved_, b);
      if (!s.ok()) UnreserveDiskLocked(b, m);
    }
    for (const BlockHash& h : demote) {
      Entry& e = index_.at(h);  // held: still there
      --e.readers;
      e.demoting = false;
      if (s.ok()) {
        e.on_disk = true;
        ++host_counters_.demotions;
        host_counters_.bytes_moved += e.bytes;
        disk_counters_.bytes_moved += e.bytes;
        if (!e.info.pinned && e.readers == 0) {
          freed += e.bytes;
          DropHostCopyLocked(e);
        }
      } else if (!e.info.pinned && e.readers == 0) {
        // No room on disk either: the block goes.
        const uint64_t before = host_->used_bytes();
        EvictTreeLocked(h);
        freed += before - std::min(before, host_->used_bytes());
      }
    }
  }
  CollectGarbage();
  return freed;
}

void KvCache::UnreserveDiskLocked(uint64_t bytes, const ModelId& model) {
  auto it = disk_bytes_per_model_.find(model);
  if (it != disk_bytes_per_model_.end()) it->second -= std::min(it->second, bytes);
}

uint64_t KvCache::FreeDiskLocked(uint64_t bytes, const ModelId& model) {
  std::vector<BlockHash> victims;
  uint64_t planned = 0;
  for (auto it = lru_.rbegin(); it != lru_.rend() && planned < bytes; ++it) {
    const Entry& e = index_.at(*it);
    if (!e.on_disk || e.info.pinned || e.readers > 0 || e.demoting) continue;
    if (!model.empty() && e.model != model) continue;
    victims.push_back(*it);
    planned += e.bytes;
  }
  uint64_t freed = 0;
  for (const BlockHash& h : victims) {
    auto it = index_.find(h);
    if (it == index_.end() || !it->second.on_disk) continue;
    Entry& e = it->second;
    const uint64_t b = e.bytes;
    if (e.data != nullptr) {
      DropDiskCopyLocked(e);  // the host keeps it
      freed += b;
    } else if (EvictTreeLocked(h) > 0) {
      // Only on disk (or on the GPU backed by the disk): the block goes whole, with its
      // descendants (counted as they are found later, or not at all: `freed` is a lower bound).
      freed += b;
    }
  }
  return freed;
}

absl::Status KvCache::ReserveDisk(uint64_t bytes, const ModelId& model) {
  for (int attempt = 0; attempt < 64; ++attempt) {
    uint64_t freed = 0;
    {
      absl::MutexLock lock(&mu_);
      auto limit = limits_.find(model);
      const uint64_t mine = disk_bytes_per_model_[model];
      const bool over_model = limit != limits_.end() && limit->second.disk_bytes > 0 &&
                              mine + bytes > limit->second.disk_bytes;
      if (over_model && bytes > limit->second.disk_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat("model ", model, " may hold ",
                                                         limit->second.disk_bytes,
                                                         " disk bytes; it needs ", bytes));
      }
      const uint64_t used = disk_->used_bytes() + disk_reserved_;
      const bool over_global = used + bytes > disk_->capacity_bytes();
      if (!over_model && !over_global) {
        disk_reserved_ += bytes;
        disk_bytes_per_model_[model] += bytes;
        return absl::OkStatus();
      }
      if (over_model) freed += FreeDiskLocked(mine + bytes - limit->second.disk_bytes, model);
      if (over_global) freed += FreeDiskLocked(used + bytes - disk_->capacity_bytes(), "");
      if (freed == 0 && disk_garbage_.empty() && disk_deleting_.empty()) {
        return absl::ResourceExhaustedError(
            absl::StrCat("disk tier full: ", used, " of ", disk_->capacity_bytes(),
                         " bytes hold blocks that are pinned or being read",
                         over_model ? " (model limit)" : "", "; ", bytes, " more are needed"));
      }
    }
    CollectGarbage();
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("disk tier: no room for ", bytes, " bytes after repeated eviction"));
}

uint64_t KvCache::FreeGpuBytesLocked(uint64_t bytes) {
  uint64_t freed = 0;
  for (auto it = lru_.rbegin(); it != lru_.rend() && freed < bytes; ++it) {
    Entry& e = index_.at(*it);
    if (!e.gpu || !GpuCopyMayGo(e)) continue;
    freed += gpu_->SlotBytes(*e.gpu);
    DropGpuCopyLocked(e);  // backed by its host or disk copy
  }
  return freed;
}

absl::StatusOr<GpuSlot> KvCache::AllocateGpuSlotLocked(uint64_t bytes) {
  auto slot = gpu_->AllocateSlot(bytes);
  if (slot.ok() || !absl::IsResourceExhausted(slot.status())) return slot;
  // The GPU blocks of each chunk, and the chunks with a block that may not go; made on first need.
  absl::flat_hash_map<uint64_t, std::vector<Entry*>> by_chunk;
  absl::flat_hash_set<uint64_t> stuck;
  bool mapped = false;
  const uint64_t size = SlotAllocator::SlotSize(bytes);
  for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
    Entry& e = index_.at(*it);
    if (!e.gpu || !GpuCopyMayGo(e)) continue;
    if (gpu_->SlotBytes(*e.gpu) == size) {  // the least recently used block gives its slot
      DropGpuCopyLocked(e);
      return gpu_->AllocateSlot(bytes);
    }
    // It has a slot of another size: its whole chunk goes, so that the chunk serves this size.
    if (!mapped) {
      for (auto& [hash, other] : index_) {
        if (!other.gpu) continue;
        const uint64_t chunk = *other.gpu / gpu_->chunk_bytes();
        by_chunk[chunk].push_back(&other);
        if (!GpuCopyMayGo(other)) stuck.insert(chunk);
      }
      mapped = true;
    }
    const uint64_t chunk = *e.gpu / gpu_->chunk_bytes();
    if (stuck.contains(chunk)) continue;
    for (Entry* other : by_chunk[chunk]) DropGpuCopyLocked(*other);
    stuck.insert(chunk);  // emptied: its entries are gone from the GPU
    slot = gpu_->AllocateSlot(bytes);
    if (slot.ok() || !absl::IsResourceExhausted(slot.status())) return slot;
  }
  return slot;
}

void KvCache::UploadToGpu(absl::Span<const BlockHash> hashes) {
  if (gpu_ == nullptr) return;
  std::vector<GpuMove> moves;
  std::vector<BlockHash> held;
  {
    absl::MutexLock lock(&mu_);
    for (const BlockHash& h : hashes) {
      auto it = index_.find(h);
      if (it == index_.end()) continue;
      Entry& e = it->second;
      if (e.data == nullptr || e.gpu || e.gpu_pending || e.bytes > gpu_->chunk_bytes()) continue;
      auto slot = AllocateGpuSlotLocked(e.bytes);
      if (!slot.ok()) break;
      e.gpu_pending = true;
      ++e.readers;  // holds the host copy until the upload is done
      moves.push_back({*slot, e.data, e.bytes});
      held.push_back(h);
    }
  }
  if (moves.empty()) return;
  auto ticket = gpu_->CopyIn(moves);
  const absl::Status s = ticket.ok() ? gpu_->Wait(*ticket) : ticket.status();
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < held.size(); ++i) {
    Entry& e = index_.at(held[i]);
    --e.readers;
    e.gpu_pending = false;
    if (s.ok()) {
      e.gpu = moves[i].slot;
      e.info.tier = TierKind::kGpu;
      ++gpu_counters_.promotions;
      gpu_counters_.bytes_moved += e.bytes;
      host_counters_.bytes_moved += e.bytes;
    } else {
      gpu_->FreeSlot(moves[i].slot).IgnoreError();
    }
  }
  if (!s.ok()) std::cerr << "ropekv: GPU upload failed: " << s << "\n";
}

// ---------------------------------------------------------------------------------------------
// Put

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
  std::vector<BlockHash> hashes =
      options.segment     ? SegmentHashes(*model, options.tenant, options.tokens)
      : parent == nullptr ? PromptHashes(*model, options.tenant, options.tokens)
                          : ChainHashes(*model, options.tenant, parent, options.tokens);
  std::vector<bool> present(hashes.size(), false);
  int64_t first_position = 0;
  {
    absl::MutexLock lock(&mu_);
    if (parent != nullptr) {
      auto it = index_.find(*parent);
      if (it == index_.end() || !HasCopy(it->second)) {
        return absl::NotFoundError(absl::StrCat("parent block ", parent->Hex(), " is not cached"));
      }
      if (it->second.model != model->id) {
        return absl::InvalidArgumentError(absl::StrCat("parent block ", parent->Hex(),
                                                       " belongs to model ", it->second.model,
                                                       ", not ", model->id));
      }
      first_position = it->second.info.position + bt;
    }
    for (size_t i = 0; i < hashes.size(); ++i) {
      auto it = index_.find(hashes[i]);
      present[i] = it != index_.end() && HasCopy(it->second);
    }
  }
  auto writer = std::unique_ptr<PutWriter>(new PutWriter(this, *std::move(model),
                                                         std::move(options), std::move(hashes),
                                                         std::move(present), first_position));
  // A Put of one block has nothing to overlap its record with.
  if (WritesThrough() && writer->hashes_.size() > 1) writer->staging_ = disk_->BeginStaging();
  return writer;
}

absl::StatusOr<PutResult> KvCache::CommitPut(PutWriter& w) {
  PutResult result;
  result.hashes = w.hashes_;
  const int bt = w.model_.spec.block_tokens;
  // A segment's blocks chain to each other (evicting one takes the rest) but to no parent.
  const int64_t rotated_base = w.options_.rotated_at.value_or(w.first_position_);
  std::vector<uint64_t> serials(w.hashes_.size());
  for (uint64_t& s : serials) s = NextBlockSerial();
  auto info_of = [&](size_t i) {
    BlockInfo info;
    info.hash = w.hashes_[i];
    info.tier = TierKind::kHost;
    info.position = w.first_position_ + static_cast<int64_t>(i) * bt;
    info.rotated_at = rotated_base + static_cast<int64_t>(i) * bt;
    info.rope_table = w.options_.rope_table;
    info.pre_rope = w.options_.pre_rope;
    info.pinned = w.options_.pin;
    info.serial = serials[i];
    return info;
  };
  auto parent_of = [&](size_t i) -> std::optional<BlockHash> {
    return i == 0 ? w.options_.parent : std::optional<BlockHash>(w.hashes_[i - 1]);
  };

  // Observers see the fresh blocks' bytes before they are visible (outside mu_), block by block
  // on several threads: the page metadata built on Put takes about as long as the copy into the
  // slots did (~0.2 ms a 2 MiB block a core), and ran on the Put's thread alone (RESULTS run 23).
  std::vector<BlockHash> announced;
  {
    absl::ReaderMutexLock lock(&observers_mu_);
    if (!observers_.empty()) {
      const std::vector<BlockObserver*> observers = observers_;
      std::vector<size_t> fresh;
      for (size_t i = 0; i < w.hashes_.size(); ++i) {
        if (w.slots_[i] != nullptr) fresh.push_back(i);
      }
      const int threads = fresh.size() >= 8 ? DefaultParallelThreads() : 1;
      ForEachParallel(fresh.size(), threads, [&](uint64_t j) {
        const BlockInfo info = info_of(fresh[j]);
        for (BlockObserver* o : observers) o->OnBlockWritten(w.model_, info, w.slots_[fresh[j]]);
        return absl::OkStatus();
      }).IgnoreError();  // the observers report nothing
      for (size_t i : fresh) announced.push_back(w.hashes_[i]);
    }
  }
  std::vector<BlockHash> committed;  // of `announced`, those this Put stored
  auto put_done = [&] {
    if (announced.empty()) return;
    absl::ReaderMutexLock lock(&observers_mu_);
    for (BlockObserver* o : observers_) o->OnPutDone(announced, committed);
  };

  // Write-through: the new blocks reach the disk before the Put is visible, so that an
  // acknowledged Put survives a crash. Their records were staged as their bytes came in; one
  // atomic batch of metadata makes them findable.
  const bool to_disk = WritesThrough();
  std::vector<BlockHash> written;
  uint64_t written_bytes = 0;
  if (to_disk) {
    std::vector<DiskTier::BlockWrite> writes;
    for (size_t i = 0; i < w.hashes_.size(); ++i) {
      if (w.slots_[i] == nullptr) continue;
      const BlockInfo info = info_of(i);
      DiskBlockMeta d;
      d.hash = info.hash;
      d.model = w.model_.id;
      d.parent = parent_of(i);
      d.position = info.position;
      d.rotated_at = info.rotated_at;
      d.rope_table = info.rope_table;
      d.pre_rope = info.pre_rope;
      d.pinned = info.pinned;
      d.bytes = w.block_bytes_;
      writes.push_back({d, w.slots_[i]});
      written.push_back(info.hash);
      written_bytes += w.block_bytes_;
    }
    if (!writes.empty()) {
      if (auto s = ReserveDisk(written_bytes, w.model_.id); !s.ok()) {
        put_done();
        return s;
      }
      {
        absl::MutexLock lock(&mu_);
        BeginDiskWritesLocked(written);
      }
      const absl::Status s = disk_->PutBlocks(writes, w.staging_.get());
      {
        absl::MutexLock lock(&mu_);
        disk_reserved_ -= std::min(disk_reserved_, written_bytes);
        if (!s.ok()) {
          EndDiskWritesLocked(written);
          UnreserveDiskLocked(written_bytes, w.model_.id);
        } else {
          disk_counters_.bytes_moved += written_bytes;
          host_counters_.bytes_moved += written_bytes;
        }
      }
      if (!s.ok()) {
        put_done();
        return s;
      }
    }
  }

  std::vector<BlockHash> fresh;
  absl::Status commit_status;
  {
    absl::MutexLock lock(&mu_);
    EndDiskWritesLocked(written);
    absl::flat_hash_set<BlockHash> on_disk(written.begin(), written.end());
    std::optional<BlockHash> parent = w.options_.parent;
    absl::Status failed = absl::OkStatus();
    if (parent) {
      auto p = index_.find(*parent);
      if (p == index_.end() || !HasCopy(p->second)) {
        failed = absl::NotFoundError(
            absl::StrCat("parent block ", parent->Hex(), " was evicted during the Put"));
      }
    }
    for (size_t i = 0; failed.ok() && i < w.hashes_.size(); ++i) {
      const BlockHash& h = w.hashes_[i];
      auto it = index_.find(h);
      if (it != index_.end() && HasCopy(it->second)) {
        // Present already (before or by a concurrent Put): keep the stored copy.
        Entry& e = it->second;
        ++result.blocks_existing;
        if (w.options_.pin) e.info.pinned = true;
        if (on_disk.erase(h) > 0) {
          if (e.on_disk) {
            UnreserveDiskLocked(w.block_bytes_, w.model_.id);  // rewritten, counted once
          } else {
            e.on_disk = true;
          }
        }
      } else if (w.slots_[i] == nullptr) {
        // Present when the Put began but evicted since: its bytes were not kept.
        failed = absl::UnavailableError(
            absl::StrCat("block ", i, " was evicted while the Put was in flight; retry the Put"));
      } else {
        if (it != index_.end()) {
          // A dead entry (no copy left) with readers still on it: it goes when they do. Its
          // replacement cannot share the key, so this Put waits for nobody and retries.
          failed = absl::UnavailableError(
              absl::StrCat("block ", i, " is being dropped after a failed read; retry the Put"));
          break;
        }
        Entry e;
        e.model = w.model_.id;
        e.bytes = w.block_bytes_;
        e.data = std::exchange(w.slots_[i], nullptr);
        e.on_disk = on_disk.erase(h) > 0;
        e.parent = parent;
        e.info = info_of(i);
        lru_.push_front(h);
        e.lru = lru_.begin();
        if (parent) index_.at(*parent).children.push_back(h);
        index_.emplace(h, std::move(e));
        ++blocks_per_model_[w.model_.id];
        ++result.blocks_stored;
        fresh.push_back(h);
      }
      parent = h;
    }
    if (!failed.ok()) {
      // Blocks written to disk for this Put but not in the index must not come back.
      for (const BlockHash& h : on_disk) {
        disk_garbage_.push_back(h);
        UnreserveDiskLocked(w.block_bytes_, w.model_.id);
      }
      // Blocks of this Put already committed stay: they are complete and reachable.
    } else {
      TouchLocked(MatchLocked(w.hashes_));
      if (options_.policy.write_tier == WriteTier::kDisk) {
        for (const BlockHash& h : fresh) {
          Entry& e = index_.at(h);
          if (e.on_disk && e.data != nullptr && !e.info.pinned) {
            FreeHostSlot(e.data, e.bytes, e.model);
            e.data = nullptr;
            e.info.tier = TierKind::kDisk;
          }
        }
      }
      ++stats_.puts;
      stats_.bytes_in += w.received_;
    }
    commit_status = failed;
  }
  if (!announced.empty()) committed = fresh;  // fresh blocks are exactly the announced stored ones
  put_done();
  if (!commit_status.ok()) {
    CollectGarbage();  // the writer frees the slots that were not committed
    return commit_status;
  }
  if (options_.policy.write_tier == WriteTier::kGpu) UploadToGpu(fresh);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Reads

absl::StatusOr<LookupResult> KvCache::Lookup(absl::string_view model, absl::string_view tenant,
                                             absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  const std::vector<BlockHash> hashes = PromptHashes(*m, tenant, tokens);
  LookupResult result;
  absl::MutexLock lock(&mu_);
  const std::vector<Entry*> found = MatchLocked(hashes);
  TouchLocked(found);
  for (const Entry* e : found) result.blocks.push_back(e->info);
  result.matched_tokens = static_cast<uint32_t>(found.size()) * m->spec.block_tokens;
  result.block_bytes = BlockBytes(m->spec);
  ++stats_.lookups;
  stats_.lookup_hit_tokens += result.matched_tokens;
  stats_.lookup_miss_tokens += tokens.size() - result.matched_tokens;
  CountRequestsLocked(found, found.size() < hashes.size());
  return result;
}

absl::StatusOr<ReadHandle> KvCache::Acquire(const RegisteredModel& m,
                                            absl::Span<const BlockHash> all_hashes,
                                            bool all_or_none, size_t first) {
  const uint64_t bb = BlockBytes(m.spec);
  ReadHandle handle(this, m, bb);
  std::vector<Load> loads;
  const absl::Span<const BlockHash> hashes = all_hashes.subspan(first);
  {
    absl::MutexLock lock(&mu_);
    std::vector<Entry*> found = MatchLocked(all_hashes);
    const size_t n = found.size() - std::min(first, found.size());
    if (all_or_none && n != hashes.size()) {
      CountRequestsLocked({}, true);
      return absl::NotFoundError(
          absl::StrCat("segment of ", hashes.size(), " blocks is not cached for model ", m.id));
    }
    // The chain to the read's end: a range's blocks before it are touched as its parents (so
    // that they stay more recent than what hangs off them), not held.
    TouchLocked(found);
    found.erase(found.begin(), found.end() - n);
    CountRequestsLocked(found, n < hashes.size());
    handle.blocks_.reserve(n);
    handle.data_.reserve(n);
    handle.device_.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      Entry& e = *found[i];
      ++e.readers;  // a held block keeps its GPU copy too (GPU copies of read blocks stay)
      handle.blocks_.push_back(e.info);
      handle.data_.push_back(e.data);
      handle.device_.push_back(e.gpu && !e.gpu_pending ? gpu_->SlotPointer(*e.gpu) : nullptr);
      if (e.data == nullptr) loads.push_back({i, hashes[i], e.model, e.gpu, nullptr, {}});
    }
    ++stats_.gets;
  }
  if (loads.empty()) return handle;

  // Host copies for blocks only on the GPU or disk, made outside the mutex (the blocks are held).
  size_t ok_until = loads.size();  // loads[0, ok_until) have a slot
  for (size_t k = 0; k < loads.size(); ++k) {
    auto slot = AllocateSlot(bb, m.id);
    if (!slot.ok()) {
      loads[k].status = slot.status();
      ok_until = k;
      break;
    }
    loads[k].slot = *slot;
  }
  std::vector<GpuMove> moves;
  for (size_t k = 0; k < ok_until; ++k) {
    if (loads[k].gpu) moves.push_back({*loads[k].gpu, loads[k].slot, bb});
  }
  if (!moves.empty()) {
    auto ticket = gpu_->CopyOut(moves);
    const absl::Status s = ticket.ok() ? gpu_->Wait(*ticket) : ticket.status();
    for (size_t k = 0; k < ok_until; ++k) {
      if (loads[k].gpu) loads[k].status = s;
    }
  }
  // Disk reads on several threads; a block read past a failed one is still a good host copy.
  std::vector<DiskTier::BlockRead> reads;
  std::vector<size_t> read_of;
  for (size_t k = 0; k < ok_until; ++k) {
    if (loads[k].gpu) continue;
    reads.push_back({loads[k].hash, loads[k].slot, bb});
    read_of.push_back(k);
  }
  if (!reads.empty()) {
    std::vector<absl::Status> statuses(reads.size());
    disk_->ReadBlocks(reads, absl::MakeSpan(statuses));
    for (size_t r = 0; r < reads.size(); ++r) loads[read_of[r]].status = std::move(statuses[r]);
  }

  size_t keep = handle.blocks_.size();
  absl::Status first_error = absl::OkStatus();
  std::vector<BlockHash> dead;
  {
    absl::MutexLock lock(&mu_);
    for (Load& l : loads) {
      Entry& e = index_.at(l.hash);  // held: still there
      if (l.status.ok() && l.slot != nullptr) {
        TierCounters& from = l.gpu ? gpu_counters_ : disk_counters_;
        from.bytes_moved += bb;
        host_counters_.bytes_moved += bb;
        if (e.data != nullptr) {
          FreeHostSlot(l.slot, bb, l.model);  // a concurrent read brought it first
          handle.data_[l.index] = e.data;
        } else if (options_.policy.promote_on_read) {
          e.data = l.slot;
          ++host_counters_.promotions;
          handle.data_[l.index] = e.data;
          if (!e.gpu) e.info.tier = TierKind::kHost;
        } else {
          handle.temp_.push_back(l.slot);
          handle.data_[l.index] = l.slot;
        }
        continue;
      }
      if (l.slot != nullptr) FreeHostSlot(l.slot, bb, l.model);
      keep = std::min(keep, l.index);
      if (first_error.ok() && !absl::IsCancelled(l.status)) first_error = l.status;
      if (!l.gpu && (absl::IsDataLoss(l.status) || absl::IsNotFound(l.status))) {
        // The disk tier deleted it already (or never had it): forget the disk copy.
        if (absl::IsDataLoss(l.status)) ++disk_counters_.corrupt_blocks;
        e.on_disk = false;
        UnreserveDiskLocked(e.bytes, e.model);
        if (!HasCopy(e)) dead.push_back(l.hash);
      }
    }
    if (keep < handle.blocks_.size() && all_or_none) keep = 0;
    // Blocks past the first failure are released; the rest is the (shorter) hit.
    std::vector<void*> temp_kept;
    for (size_t i = keep; i < handle.blocks_.size(); ++i) {
      Entry& e = index_.at(handle.blocks_[i].hash);
      --e.readers;
    }
    for (void* t : handle.temp_) {
      bool used = false;
      for (size_t i = 0; i < keep; ++i) used |= handle.data_[i] == t;
      if (used) {
        temp_kept.push_back(t);
      } else {
        FreeHostSlot(t, bb, m.id);
      }
    }
    handle.temp_ = std::move(temp_kept);
    handle.blocks_.resize(keep);
    handle.data_.resize(keep);
    handle.device_.resize(keep);
    for (const BlockHash& h : dead) {
      auto it = index_.find(h);
      if (it != index_.end() && it->second.readers == 0) EvictTreeLocked(h, /*ignore_pins=*/true);
    }
  }
  CollectGarbage();
  if (!first_error.ok()) {
    std::cerr << "ropekv: read of model " << m.id << " stopped at a block: " << first_error << "\n";
    if (all_or_none) return first_error;
  }
  return handle;
}

absl::StatusOr<ReadHandle> KvCache::AcquirePrefix(absl::string_view model, absl::string_view tenant,
                                                  absl::Span<const int32_t> tokens,
                                                  uint32_t max_blocks, uint32_t first_block) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  std::vector<BlockHash> hashes = PromptHashes(*m, tenant, tokens);
  const uint64_t end = max_blocks == 0 ? hashes.size() : uint64_t{first_block} + max_blocks;
  if (hashes.size() > end) hashes.resize(end);
  auto handle =
      Acquire(*m, hashes, /*all_or_none=*/false, std::min<size_t>(first_block, hashes.size()));
  if (!handle.ok()) return handle.status();
  handle->tokens_ = static_cast<uint32_t>(handle->blocks_.size()) * m->spec.block_tokens;
  {
    absl::MutexLock lock(&mu_);
    stats_.bytes_out += handle->blocks_.size() * handle->block_bytes_;
  }
  if (options_.policy.gpu_promote_on_read && gpu_ != nullptr) {
    std::vector<BlockHash> held;
    for (const BlockInfo& b : handle->blocks_) held.push_back(b.hash);
    UploadToGpu(held);
  }
  return handle;
}

absl::StatusOr<ReadHandle> KvCache::AcquireChain(absl::string_view model, const BlockHash& last) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  std::vector<BlockHash> hashes;
  {
    absl::MutexLock lock(&mu_);
    // Parents up to a block without one: the start of a prompt (or of a segment).
    std::optional<BlockHash> at = last;
    while (at.has_value()) {
      auto it = index_.find(*at);
      if (it == index_.end() || it->second.model != m->id) {
        return absl::NotFoundError(
            hashes.empty() ? absl::StrCat("block ", last.Hex(), " is not cached for model ", m->id)
                           : absl::StrCat("block ", last.Hex(),
                                          " is cached, but not every block before "
                                          "it back to the start of its prompt"));
      }
      hashes.push_back(*at);
      at = it->second.parent;
    }
  }
  std::reverse(hashes.begin(), hashes.end());
  auto handle = Acquire(*m, hashes, /*all_or_none=*/true);
  if (!handle.ok()) {
    if (absl::IsNotFound(handle.status())) {
      return absl::NotFoundError(absl::StrCat("the chain of block ", last.Hex(),
                                              " is no longer cached whole for model ", m->id));
    }
    return handle.status();
  }
  handle->tokens_ = static_cast<uint32_t>(hashes.size()) * m->spec.block_tokens;
  {
    absl::MutexLock lock(&mu_);
    stats_.bytes_out += handle->blocks_.size() * handle->block_bytes_;
  }
  if (options_.policy.gpu_promote_on_read && gpu_ != nullptr) UploadToGpu(hashes);
  return handle;
}

absl::StatusOr<ReadHandle> KvCache::AcquireSegment(absl::string_view model,
                                                   absl::string_view tenant,
                                                   absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  if (tokens.empty()) {
    return absl::NotFoundError(absl::StrCat("segment of 0 tokens is not cached for model ", m->id));
  }
  const std::vector<BlockHash> hashes = SegmentHashes(*m, tenant, tokens);
  auto handle = Acquire(*m, hashes, /*all_or_none=*/true);
  if (!handle.ok()) {
    if (absl::IsNotFound(handle.status())) {
      return absl::NotFoundError(
          absl::StrCat("segment of ", tokens.size(), " tokens is not cached for model ", m->id));
    }
    return handle.status();
  }
  handle->tokens_ = static_cast<uint32_t>(tokens.size());
  if (options_.policy.gpu_promote_on_read && gpu_ != nullptr) UploadToGpu(hashes);
  return handle;
}

absl::StatusOr<LookupResult> KvCache::LookupSegment(absl::string_view model,
                                                    absl::string_view tenant,
                                                    absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  const std::vector<BlockHash> hashes = SegmentHashes(*m, tenant, tokens);
  LookupResult result;
  result.block_bytes = BlockBytes(m->spec);
  absl::MutexLock lock(&mu_);
  ++stats_.lookups;
  const std::vector<Entry*> found = MatchLocked(hashes);
  if (tokens.empty() || found.size() != hashes.size()) {
    CountRequestsLocked({}, true);
    stats_.lookup_miss_tokens += tokens.size();
    return result;
  }
  TouchLocked(found);
  for (const Entry* e : found) result.blocks.push_back(e->info);
  result.matched_tokens = static_cast<uint32_t>(tokens.size());
  stats_.lookup_hit_tokens += tokens.size();
  CountRequestsLocked(found, false);
  return result;
}

void KvCache::ReleaseRead(absl::Span<const BlockHash> hashes, absl::Span<void* const> temp,
                          uint64_t block_bytes, const ModelId& model) {
  absl::MutexLock lock(&mu_);
  for (void* t : temp) FreeHostSlot(t, block_bytes, model);
  for (const BlockHash& h : hashes) {
    // A block being read is never evicted, so it is still there.
    Entry& e = index_.at(h);
    --e.readers;
    if (e.readers == 0 && !HasCopy(e)) EvictTreeLocked(h, /*ignore_pins=*/true);
  }
}

// ---------------------------------------------------------------------------------------------
// Admin

absl::StatusOr<uint32_t> KvCache::Evict(absl::string_view model, absl::string_view tenant,
                                        absl::Span<const int32_t> tokens) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  uint32_t n = 0;
  {
    absl::MutexLock lock(&mu_);
    if (tokens.empty()) {
      std::vector<BlockHash> all;
      for (const auto& [h, e] : index_) {
        if (e.model == m->id) all.push_back(h);
      }
      for (const BlockHash& h : all) n += EvictTreeLocked(h);
    } else {
      const std::vector<BlockHash> hashes = PromptHashes(*m, tenant, tokens);
      const size_t matched = MatchLocked(hashes).size();
      for (size_t i = matched; i-- > 0;) n += EvictTreeLocked(hashes[i]);
    }
  }
  CollectGarbage();
  return n;
}

absl::StatusOr<uint32_t> KvCache::Pin(absl::string_view model, absl::string_view tenant,
                                      absl::Span<const int32_t> tokens, bool pin) {
  auto m = models_.Resolve(model);
  if (!m.ok()) return m.status();
  const std::vector<BlockHash> hashes = PromptHashes(*m, tenant, tokens);
  std::vector<DiskBlockMeta> persist;
  size_t n = 0;
  {
    absl::MutexLock lock(&mu_);
    const std::vector<Entry*> found = MatchLocked(hashes);
    n = found.size();
    for (Entry* e : found) {
      e->info.pinned = pin;
      if (e->on_disk) persist.push_back(DiskMetaOf(*e));
    }
  }
  // Pins survive a restart. A block deleted meanwhile is NOT_FOUND: nothing to keep then.
  for (const DiskBlockMeta& d : persist) {
    if (auto s = disk_->UpdateMeta(d); !s.ok() && !absl::IsNotFound(s)) return s;
  }
  return static_cast<uint32_t>(n);
}

CacheStats KvCache::Stats() const {
  absl::MutexLock lock(&mu_);
  CacheStats s = stats_;
  s.prompt_blocks_reused = prompt_hashes_.reused_blocks();
  TierCounters host = host_counters_;
  host.bytes_used = host_->used_bytes();
  host.reserved_bytes = host_->reserved_bytes();
  host.capacity_bytes = host_->capacity_bytes();
  TierCounters gpu = gpu_counters_;
  TierCounters disk = disk_counters_;
  for (const auto& [h, e] : index_) {
    if (e.data != nullptr) {
      ++host.blocks;
      host.pinned_blocks += e.info.pinned ? 1 : 0;
    }
    if (e.gpu) {
      ++gpu.blocks;
      gpu.pinned_blocks += e.info.pinned ? 1 : 0;
    }
    if (e.on_disk) {
      ++disk.blocks;
      disk.pinned_blocks += e.info.pinned ? 1 : 0;
    }
  }
  s.tiers.push_back(host);
  if (gpu_ != nullptr) {
    gpu.bytes_used = gpu_->used_bytes();
    gpu.reserved_bytes = gpu_->reserved_bytes();
    gpu.capacity_bytes = gpu_->capacity_bytes();
    s.tiers.push_back(gpu);
  }
  if (disk_ != nullptr) {
    disk.bytes_used = disk_->used_bytes();
    disk.reserved_bytes = disk_->Counters().file_bytes;
    disk.capacity_bytes = disk_->capacity_bytes();
    s.tiers.push_back(disk);
  }
  s.models = static_cast<uint32_t>(models_.size());
  return s;
}

// ---------------------------------------------------------------------------------------------
// Watermarks

void KvCache::RunMaintenance() {
  const TierPolicy& p = options_.policy;
  const uint64_t host_used = host_->used_bytes();
  const uint64_t host_cap = host_->capacity_bytes();
  if (host_used > p.high_watermark * host_cap) {
    FreeHost(host_used - static_cast<uint64_t>(p.low_watermark * host_cap), ModelId());
  }
  {
    absl::MutexLock lock(&mu_);
    if (gpu_ != nullptr) {
      const uint64_t cap = gpu_->capacity_bytes();
      const uint64_t used = gpu_->used_bytes();
      if (used > p.high_watermark * cap) {
        FreeGpuBytesLocked(used - static_cast<uint64_t>(p.low_watermark * cap));
      }
    }
    if (disk_ != nullptr) {
      const uint64_t cap = disk_->capacity_bytes();
      const uint64_t used = disk_->used_bytes();
      if (used > p.high_watermark * cap) {
        FreeDiskLocked(used - static_cast<uint64_t>(p.low_watermark * cap), ModelId());
      }
    }
  }
  CollectGarbage();
}

void KvCache::MaintenanceLoop() {
  while (true) {
    {
      absl::MutexLock lock(&maintenance_mu_);
      auto woken = [this]()
                       ABSL_EXCLUSIVE_LOCKS_REQUIRED(maintenance_mu_) { return stop_ || wake_; };
      maintenance_mu_.AwaitWithTimeout(absl::Condition(&woken),
                                       absl::Milliseconds(options_.maintenance_interval_ms));
      if (stop_) return;
      wake_ = false;
    }
    RunMaintenance();
  }
}

}  // namespace ropekv
