#include "cache/modules.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cache/hash.h"
#include "cache/modules_cuda.h"
#include "kernels/ape/ape.h"
#include "kernels/common/device.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace {

// Length-prefixed field, so that no two different field lists share an encoding.
void AppendField(std::string* out, absl::string_view field) {
  absl::StrAppend(out, field.size(), ":", field, ";");
}

std::string SchemaLabel(const Schema& s, absl::string_view id) {
  return s.name.empty() ? absl::StrCat("schema ", id) : absl::StrCat("schema '", s.name, "'");
}

bool FinitePositive(float x) { return std::isfinite(x) && x > 0.0f; }

bool CudaHeadDim(int d) { return d == 64 || d == 96 || d == 128 || d == 256; }

}  // namespace

std::vector<ModuleRun> ModuleRuns(const SchemaModule& module) {
  std::vector<ModuleRun> runs;
  for (const SchemaItem& item : module.items) {
    if (item.kind != SchemaItem::Kind::kTokens || item.token_end <= item.token_begin) continue;
    runs.push_back(ModuleRun{item.token_begin, item.token_end, item.start});
  }
  return runs;
}

std::string SchemaIdOf(absl::string_view model_id, absl::string_view schema_text) {
  std::string encoded;
  AppendField(&encoded, "ropekv.schema.v1");
  AppendField(&encoded, model_id);
  AppendField(&encoded, schema_text);
  return Sha256Hex(encoded).substr(0, 32);
}

std::string ModuleRunTenant(absl::string_view tenant, absl::string_view schema_id,
                            absl::string_view module, int run) {
  std::string salt;
  AppendField(&salt, "ropekv.module.v1");
  AppendField(&salt, tenant);
  AppendField(&salt, schema_id);
  AppendField(&salt, module);
  AppendField(&salt, absl::StrCat(run));
  return salt;
}

std::string ContextTenant(absl::string_view tenant) {
  std::string salt;
  AppendField(&salt, "ropekv.context.v1");
  AppendField(&salt, tenant);
  return salt;
}

uint64_t RangeLayoutBytes(const ModelSpec& spec, int64_t n) {
  return uint64_t{2} * spec.layers * spec.kv_heads * static_cast<uint64_t>(n) * spec.head_dim *
         DTypeSize(spec.dtype);
}

// ---------------------------------------------------------------------------------------------
// AssembledKv

uint64_t AssembledKv::layer_bytes() const {
  return uint64_t{2} * spec_.kv_heads * static_cast<uint64_t>(total_tokens_) * spec_.head_dim *
         DTypeSize(spec_.dtype);
}

HitKind AssembledKv::Append(ReadHandle handle, int64_t n_tokens, int64_t position) {
  const int64_t bt = spec_.block_tokens;
  HitKind hit = HitKind::kExact;
  for (size_t b = 0; b < handle.blocks().size(); ++b) {
    const int64_t offset = static_cast<int64_t>(b) * bt;
    if (offset >= n_tokens) break;
    const BlockInfo& block = handle.blocks()[b];
    const int64_t to = position + offset;
    // Position-free (pre-RoPE) keys are copied as they are.
    const int64_t from = block.pre_rope ? to : block.rotated_at;
    if (from != to) hit = HitKind::kRerotated;
    copies_.push_back(Copy{handle.bytes(b).data(), total_tokens_ + offset,
                           std::min<int64_t>(bt, n_tokens - offset), from, to, block.rope_table});
  }
  handles_.push_back(std::move(handle));
  total_tokens_ += n_tokens;
  return hit;
}

absl::Status AssembledKv::WriteLayer(int layer, void* dst) const {
  if (layer < 0 || layer >= spec_.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", spec_.layers, ")"));
  }
  if (copies_.empty()) return absl::OkStatus();
  const KvStrides src = BlockStrides(spec_);
  const int64_t hd = spec_.head_dim;
  // dst: [k|v][kv_head][total_tokens][head_dim]
  const KvStrides out{0, int64_t{spec_.kv_heads} * total_tokens_ * hd, total_tokens_ * hd, hd};
  const size_t layer_offset = static_cast<size_t>(layer) * src.layer * DTypeSize(spec_.dtype);
  std::vector<RerotateCopy> jobs;
  jobs.reserve(copies_.size());
  for (const Copy& c : copies_) {
    jobs.push_back(RerotateCopy{static_cast<const char*>(c.block) + layer_offset, src, 0, dst, out,
                                c.dst_token, c.n_tokens, c.from_pos, c.table, c.to_pos, c.table});
  }
  KvGeometry one_layer = BlockGeometry(spec_);
  one_layer.layers = 1;
  return RerotateCopyCpu(spec_.rope, one_layer, jobs);
}

absl::Status AssembledKv::WriteAll(void* dst) const {
  for (int l = 0; l < spec_.layers; ++l) {
    if (absl::Status st = WriteLayer(l, static_cast<char*>(dst) + l * layer_bytes()); !st.ok()) {
      return st;
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// KvWriter

KvWriter::KvWriter(KvCache* cache, RegisteredModel model, std::vector<Segment> segments,
                   int64_t n_tokens, RopeTableId rope_table, bool pin)
    : cache_(cache),
      model_(std::move(model)),
      segments_(std::move(segments)),
      n_tokens_(n_tokens),
      rope_table_(rope_table),
      pin_(pin),
      expected_(RangeLayoutBytes(model_.spec, n_tokens)) {}

absl::Status KvWriter::Write(absl::string_view bytes) {
  if (!status_.ok()) return status_;
  if (finished_) return status_ = absl::FailedPreconditionError("Write after Finish");
  if (buffer_.size() + bytes.size() > expected_) {
    return status_ = absl::InvalidArgumentError(absl::StrCat(
               "KV of ", n_tokens_, " tokens is ", expected_, " bytes ([layer][k|v][kv_head][",
               n_tokens_, "][head_dim] of the model's dtype), got at least ",
               buffer_.size() + bytes.size()));
  }
  buffer_.append(bytes.data(), bytes.size());
  return absl::OkStatus();
}

absl::StatusOr<PutKvResult> KvWriter::Finish() {
  if (finished_) return absl::FailedPreconditionError("Finish called twice");
  finished_ = true;
  if (!status_.ok()) return status_;
  if (buffer_.size() != expected_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV of ", n_tokens_, " tokens is ", expected_, " bytes ([layer][k|v][kv_head][", n_tokens_,
        "][head_dim] of the model's dtype), got ", buffer_.size()));
  }
  const ModelSpec& spec = model_.spec;
  const int64_t bt = spec.block_tokens;
  const size_t row = static_cast<size_t>(spec.head_dim) * DTypeSize(spec.dtype);
  const int64_t rows = int64_t{spec.layers} * 2 * spec.kv_heads;
  PutKvResult result;
  result.tokens = n_tokens_;
  std::string block(BlockBytes(spec), '\0');
  for (const Segment& seg : segments_) {
    PutOptions options;
    options.model = model_.id;
    options.tenant = seg.tenant;
    options.tokens = seg.tokens;
    options.rotated_at = seg.rotated_at;
    options.rope_table = rope_table_;
    options.pin = pin_;
    options.segment = true;
    absl::StatusOr<std::unique_ptr<PutWriter>> writer = cache_->BeginPut(std::move(options));
    if (!writer.ok()) return writer.status();
    const int64_t n = static_cast<int64_t>(seg.tokens.size());
    // Range layout [rows][n_tokens_][head_dim] -> blocks [rows][block_tokens][head_dim], the last
    // one padded with zeros.
    for (int64_t b0 = 0; b0 < n; b0 += bt) {
      const int64_t count = std::min(bt, n - b0);
      std::memset(block.data(), 0, block.size());
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(&block[static_cast<size_t>(r * bt) * row],
                    &buffer_[static_cast<size_t>(r * n_tokens_ + seg.token_begin + b0) * row],
                    static_cast<size_t>(count) * row);
      }
      if (absl::Status st = (*writer)->Write(block); !st.ok()) return st;
    }
    absl::StatusOr<PutResult> put = (*writer)->Finish();
    if (!put.ok()) return put.status();
    ++result.segments;
    result.blocks_stored += put->blocks_stored;
    result.blocks_existing += put->blocks_existing;
  }
  std::string().swap(buffer_);
  return result;
}

// ---------------------------------------------------------------------------------------------
// ModuleStore

absl::StatusOr<std::unique_ptr<ModuleStore>> ModuleStore::Create(KvCache* cache, Options options) {
  if (cache == nullptr) return absl::InvalidArgumentError("ModuleStore needs a KvCache");
  if (options.max_schemas == 0 || options.max_put_bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ModuleStore limits must be positive, got max_schemas ", options.max_schemas,
                     " and max_put_bytes ", options.max_put_bytes));
  }
  return std::unique_ptr<ModuleStore>(new ModuleStore(cache, options));
}

uint32_t ModuleStore::schemas() const {
  absl::MutexLock lock(&mu_);
  return static_cast<uint32_t>(schemas_.size());
}

absl::StatusOr<RegisteredSchema> ModuleStore::RegisterSchema(absl::string_view model,
                                                             absl::string_view schema_text) {
  absl::StatusOr<RegisteredModel> m = cache_->ResolveModel(model);
  if (!m.ok()) return m.status();
  const std::string id = SchemaIdOf(m->id, schema_text);
  {
    absl::MutexLock lock(&mu_);
    auto it = schemas_.find(id);
    if (it != schemas_.end()) {
      RegisteredSchema reg = it->second->reg;
      reg.created = false;
      return reg;
    }
  }
  absl::StatusOr<Schema> schema = ParseSchema(schema_text);
  if (!schema.ok()) return schema.status();
  auto entry = std::make_shared<Entry>();
  entry->reg.id = id;
  entry->reg.model_id = m->id;
  entry->runs.reserve(schema->modules.size());
  for (const SchemaModule& module : schema->modules) entry->runs.push_back(ModuleRuns(module));
  entry->reg.schema = std::make_shared<const Schema>(*std::move(schema));
  entry->reg.created = true;
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = schemas_.emplace(id, nullptr);
  if (!inserted) {  // registered by another caller meanwhile
    RegisteredSchema reg = it->second->reg;
    reg.created = false;
    return reg;
  }
  if (schemas_.size() > options_.max_schemas) {
    schemas_.erase(it);
    return absl::ResourceExhaustedError(
        absl::StrCat("at most ", options_.max_schemas, " schemas may be registered"));
  }
  it->second = entry;
  return entry->reg;
}

absl::StatusOr<std::shared_ptr<const ModuleStore::Entry>> ModuleStore::Find(
    absl::string_view schema_id) const {
  absl::MutexLock lock(&mu_);
  auto it = schemas_.find(schema_id);
  if (it == schemas_.end()) {
    return absl::NotFoundError(
        absl::StrCat("unknown schema id '", schema_id, "' (RegisterSchema returns it)"));
  }
  return it->second;
}

absl::StatusOr<RegisteredSchema> ModuleStore::GetSchema(absl::string_view schema_id) const {
  absl::StatusOr<std::shared_ptr<const Entry>> entry = Find(schema_id);
  if (!entry.ok()) return entry.status();
  RegisteredSchema reg = (*entry)->reg;
  reg.created = false;
  return reg;
}

absl::StatusOr<std::vector<bool>> ModuleStore::CachedModules(absl::string_view schema_id,
                                                             absl::string_view tenant) {
  absl::StatusOr<std::shared_ptr<const Entry>> entry = Find(schema_id);
  if (!entry.ok()) return entry.status();
  const Entry& e = **entry;
  const Schema& schema = *e.reg.schema;
  std::vector<bool> cached(schema.modules.size(), true);
  for (size_t m = 0; m < schema.modules.size(); ++m) {
    const SchemaModule& module = schema.modules[m];
    for (size_t r = 0; r < e.runs[m].size() && cached[m]; ++r) {
      const ModuleRun& run = e.runs[m][r];
      absl::Span<const int32_t> tokens(module.tokens.data() + run.token_begin, run.size());
      absl::StatusOr<LookupResult> hit = cache_->LookupSegment(
          e.reg.model_id, ModuleRunTenant(tenant, e.reg.id, module.name, static_cast<int>(r)),
          tokens);
      if (!hit.ok()) return hit.status();
      cached[m] = hit->matched_tokens == static_cast<uint32_t>(run.size());
    }
  }
  return cached;
}

absl::Status ModuleStore::CheckPutBytes(const ModelSpec& spec, int64_t n_tokens) const {
  const uint64_t bytes = RangeLayoutBytes(spec, n_tokens);
  if (bytes > options_.max_put_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("KV of ", n_tokens, " tokens is ", bytes,
                                                     " bytes, more than one put may send (",
                                                     options_.max_put_bytes, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<KvWriter>> ModuleStore::BeginPutModule(const PutModuleArgs& args) {
  absl::StatusOr<std::shared_ptr<const Entry>> entry = Find(args.schema_id);
  if (!entry.ok()) return entry.status();
  const Entry& e = **entry;
  const Schema& schema = *e.reg.schema;
  const int m = schema.FindModule(args.module);
  if (m < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown module '", args.module, "' in ", SchemaLabel(schema, e.reg.id)));
  }
  absl::StatusOr<RegisteredModel> model = cache_->ResolveModel(e.reg.model_id);
  if (!model.ok()) return model.status();
  if (absl::Status st = ValidateRopeTable(model->spec.rope, args.rope_table); !st.ok()) return st;
  const SchemaModule& module = schema.modules[m];
  const int64_t n = static_cast<int64_t>(module.tokens.size());
  if (absl::Status st = CheckPutBytes(model->spec, n); !st.ok()) return st;
  std::vector<KvWriter::Segment> segments;
  for (size_t r = 0; r < e.runs[m].size(); ++r) {
    const ModuleRun& run = e.runs[m][r];
    KvWriter::Segment seg;
    seg.tenant = ModuleRunTenant(args.tenant, e.reg.id, module.name, static_cast<int>(r));
    seg.tokens.assign(module.tokens.begin() + run.token_begin,
                      module.tokens.begin() + run.token_end);
    seg.token_begin = run.token_begin;
    seg.rotated_at = run.start;
    segments.push_back(std::move(seg));
  }
  return std::unique_ptr<KvWriter>(
      new KvWriter(cache_, *std::move(model), std::move(segments), n, args.rope_table, args.pin));
}

absl::StatusOr<PutKvResult> ModuleStore::PutModule(const PutModuleArgs& args,
                                                   absl::string_view range_bytes) {
  absl::StatusOr<std::unique_ptr<KvWriter>> writer = BeginPutModule(args);
  if (!writer.ok()) return writer.status();
  if (absl::Status st = (*writer)->Write(range_bytes); !st.ok()) return st;
  return (*writer)->Finish();
}

absl::StatusOr<ModulePrompt> ModuleStore::ComposePrompt(const ComposePromptArgs& args) {
  absl::StatusOr<std::shared_ptr<const Entry>> entry = Find(args.schema_id);
  if (!entry.ok()) return entry.status();
  const Entry& e = **entry;
  const Schema& schema = *e.reg.schema;
  absl::StatusOr<PromptLayout> layout =
      LayoutPrompt(schema, args.modules, args.arguments, args.user_tokens, args.layout);
  if (!layout.ok()) return layout.status();
  absl::StatusOr<RegisteredModel> model = cache_->ResolveModel(e.reg.model_id);
  if (!model.ok()) return model.status();

  ModulePrompt out;
  out.kv.spec_ = model->spec;
  out.tokens = std::move(layout->tokens);
  out.position_ids = std::move(layout->position_ids);
  out.next_position = layout->next_position;
  int64_t offset = 0;
  for (PromptPiece& piece : layout->pieces) {
    ComposedPiece cp;
    cp.prompt_offset = offset;
    const int64_t n = static_cast<int64_t>(piece.tokens.size());
    if (piece.kind == PromptPiece::Kind::kCached) {
      const int m = schema.FindModule(piece.module);
      const std::vector<ModuleRun>& runs = e.runs[m];
      size_t r = 0;
      while (r < runs.size() && runs[r].token_begin != piece.token_begin) ++r;
      if (r == runs.size() || runs[r].token_end != piece.token_end) {
        return absl::InternalError(absl::StrCat("module '", piece.module, "': no run of tokens [",
                                                piece.token_begin, ", ", piece.token_end, ")"));
      }
      absl::StatusOr<ReadHandle> handle = cache_->AcquireSegment(
          e.reg.model_id, ModuleRunTenant(args.tenant, e.reg.id, piece.module, static_cast<int>(r)),
          piece.tokens);
      if (!handle.ok() || handle->matched_tokens() != static_cast<uint32_t>(n)) {
        const std::string where = absl::StrCat(
            "module '", piece.module, "' of ", SchemaLabel(schema, e.reg.id), " (run ", r, " of ",
            runs.size(), ": ", n, " tokens at schema position ", runs[r].start, ")");
        if (handle.ok() || absl::IsNotFound(handle.status())) {
          return absl::NotFoundError(absl::StrCat(where, " is not cached for tenant '", args.tenant,
                                                  "'; PutModule it first"));
        }
        return absl::Status(handle.status().code(),
                            absl::StrCat(where, ": ", handle.status().message()));
      }
      cp.kv_offset = out.kv.total_tokens();
      cp.hit = out.kv.Append(*std::move(handle), n, piece.position);
      for (int64_t i = 0; i < n; ++i) out.kv_positions.push_back(piece.position + i);
    } else {
      out.encode.push_back(EncodeRange{offset, offset + n, piece.position});
    }
    cp.piece = std::move(piece);
    out.pieces.push_back(std::move(cp));
    offset += n;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<KvWriter>> ModuleStore::BeginPutContext(const PutContextArgs& args) {
  absl::StatusOr<RegisteredModel> model = cache_->ResolveModel(args.model);
  if (!model.ok()) return model.status();
  if (args.context.empty()) return absl::InvalidArgumentError("a context needs at least one token");
  if (args.prefix_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prefix length must be >= 0, got ", args.prefix_tokens));
  }
  for (size_t i = 0; i < args.context.size(); ++i) {
    if (args.context[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("context token ", i, " is ", args.context[i], "; token ids are >= 0"));
    }
  }
  if (absl::Status st = ValidateRopeTable(model->spec.rope, args.rope_table); !st.ok()) return st;
  const int64_t n = static_cast<int64_t>(args.context.size());
  if (absl::Status st = CheckPutBytes(model->spec, n); !st.ok()) return st;
  KvWriter::Segment seg;
  seg.tenant = ContextTenant(args.tenant);
  seg.tokens = args.context;
  seg.rotated_at = args.prefix_tokens;
  std::vector<KvWriter::Segment> segments;
  segments.push_back(std::move(seg));
  return std::unique_ptr<KvWriter>(
      new KvWriter(cache_, *std::move(model), std::move(segments), n, args.rope_table, args.pin));
}

absl::StatusOr<PutKvResult> ModuleStore::PutContext(const PutContextArgs& args,
                                                    absl::string_view range_bytes) {
  absl::StatusOr<std::unique_ptr<KvWriter>> writer = BeginPutContext(args);
  if (!writer.ok()) return writer.status();
  if (absl::Status st = (*writer)->Write(range_bytes); !st.ok()) return st;
  return (*writer)->Finish();
}

absl::StatusOr<ParallelPrompt> ModuleStore::ComposeParallel(const ParallelArgs& args) {
  if (!FinitePositive(args.temperature) || !FinitePositive(args.scale)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "APE temperature T and scale S must be finite and > 0, got T = ", args.temperature,
        ", S = ", args.scale));
  }
  if (args.contexts.empty()) {
    return absl::InvalidArgumentError("ComposeParallel needs at least one context, got none");
  }
  for (size_t j = 0; j < args.contexts.size(); ++j) {
    if (args.contexts[j].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("context ", j, " has no tokens"));
    }
  }
  absl::StatusOr<RegisteredModel> model = cache_->ResolveModel(args.model);
  if (!model.ok()) return model.status();
  const ModelSpec& spec = model->spec;

  ParallelPrompt out;
  out.kv.spec_ = spec;
  out.temperature = args.temperature;
  out.scale = args.scale;
  const int64_t p = static_cast<int64_t>(args.prefix.size());
  if (p > 0) {
    // A prefix put by KVCache.Put (full blocks), else a segment of exactly these tokens.
    uint32_t as_prefix = 0;
    std::optional<ReadHandle> handle;
    if (p % spec.block_tokens == 0) {
      absl::StatusOr<ReadHandle> h = cache_->AcquirePrefix(model->id, args.tenant, args.prefix, 0);
      if (!h.ok() && !absl::IsNotFound(h.status())) return h.status();
      if (h.ok()) {
        as_prefix = h->matched_tokens();
        if (as_prefix == static_cast<uint32_t>(p)) handle.emplace(*std::move(h));
      }
    }
    if (!handle.has_value()) {
      absl::StatusOr<ReadHandle> h = cache_->AcquireSegment(model->id, args.tenant, args.prefix);
      if (!h.ok() && !absl::IsNotFound(h.status())) return h.status();
      if (h.ok() && h->matched_tokens() == static_cast<uint32_t>(p)) handle.emplace(*std::move(h));
    }
    if (!handle.has_value()) {
      return absl::NotFoundError(absl::StrCat(
          "the prefix of ", p, " tokens is cached for tenant '", args.tenant,
          "' neither as a prefix (", as_prefix, " tokens of it are, in whole blocks of ",
          spec.block_tokens, ") nor as a segment; Put it first"));
    }
    out.prefix = KvRange{0, p, 0, out.kv.Append(*std::move(handle), p, 0)};
    for (int64_t i = 0; i < p; ++i) out.kv_positions.push_back(i);
  }
  int64_t longest = 0;
  const std::string context_tenant = ContextTenant(args.tenant);
  for (size_t j = 0; j < args.contexts.size(); ++j) {
    const std::vector<int32_t>& c = args.contexts[j];
    const int64_t n = static_cast<int64_t>(c.size());
    absl::StatusOr<ReadHandle> h = cache_->AcquireSegment(model->id, context_tenant, c);
    if (!h.ok() || h->matched_tokens() != static_cast<uint32_t>(n)) {
      if (h.ok() || absl::IsNotFound(h.status())) {
        return absl::NotFoundError(absl::StrCat("context ", j, " (", n,
                                                " tokens) is not cached for tenant '", args.tenant,
                                                "'; PutContext it first"));
      }
      return absl::Status(h.status().code(),
                          absl::StrCat("context ", j, ": ", h.status().message()));
    }
    const int64_t begin = out.kv.total_tokens();
    const HitKind hit = out.kv.Append(*std::move(h), n, p);
    out.contexts.push_back(KvRange{begin, begin + n, p, hit});
    for (int64_t i = 0; i < n; ++i) out.kv_positions.push_back(p + i);
    longest = std::max(longest, n);
  }
  // The contexts follow each other in the KV: one range (kept as a list for other layouts).
  out.context_group.push_back(
      KvRange{out.contexts.front().kv_begin, out.contexts.back().kv_end, p, HitKind::kExact});
  out.query_position = p + longest;
  for (size_t i = 0; i < args.query.size(); ++i) {
    out.query_positions.push_back(out.query_position + static_cast<int64_t>(i));
  }
  return out;
}

absl::StatusOr<AttendResult> ModuleStore::Attend(const ParallelPrompt& prompt,
                                                 const AttendArgs& args) {
  const ModelSpec& spec = prompt.kv.spec();
  if (args.layer < 0 || args.layer >= spec.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attend: layer ", args.layer, " out of range [0, ", spec.layers, ")"));
  }
  if (args.num_queries < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attend: num_queries must be >= 1, got ", args.num_queries));
  }
  if (args.q_heads < 1 || args.q_heads % spec.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("Attend: q_heads must be a positive multiple of the model's kv_heads ",
                     spec.kv_heads, ", got ", args.q_heads));
  }
  if (args.q_dtype != DType::kF32 && args.q_dtype != DType::kF16 && args.q_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat("Attend: q_dtype must be f32, f16 or bf16, got ",
                                                   static_cast<int>(args.q_dtype)));
  }
  const int64_t d = spec.head_dim;
  const size_t es = DTypeSize(spec.dtype);
  const uint64_t q_bytes =
      static_cast<uint64_t>(args.num_queries) * args.q_heads * d * DTypeSize(args.q_dtype);
  if (args.q.size() != q_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("Attend: q must be [", args.num_queries, "][",
                                                   args.q_heads, "][", d, "] = ", q_bytes,
                                                   " bytes, got ", args.q.size()));
  }
  if (args.query_kv_tokens < args.num_queries) {
    return absl::InvalidArgumentError(absl::StrCat("Attend: query_kv needs at least the ",
                                                   args.num_queries, " queries' own keys, got ",
                                                   args.query_kv_tokens, " tokens"));
  }
  const int64_t m = args.query_kv_tokens;
  const uint64_t kv_bytes = uint64_t{2} * spec.kv_heads * static_cast<uint64_t>(m) * d * es;
  if (args.query_kv.size() != kv_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("Attend: query_kv must be [k|v][", spec.kv_heads,
                                                   "][", m, "][", d, "] = ", kv_bytes,
                                                   " bytes, got ", args.query_kv.size()));
  }
  if (prompt.contexts.size() + 2 > static_cast<size_t>(kApeCudaMaxSegments) &&
      args.device == AttendDevice::kCuda) {
    return absl::InvalidArgumentError(absl::StrCat("Attend: the CUDA merge takes at most ",
                                                   kApeCudaMaxSegments - 2, " contexts, got ",
                                                   prompt.contexts.size()));
  }

  // The prompt's KV of this layer: [k|v][kv_head][T][head_dim].
  std::string layer(prompt.kv.layer_bytes(), '\0');
  if (absl::Status st = prompt.kv.WriteLayer(args.layer, layer.data()); !st.ok()) return st;
  const int64_t total = prompt.kv.total_tokens();
  const char* k_base = layer.data();
  const char* v_base = layer.data() + static_cast<size_t>(spec.kv_heads * total * d) * es;
  auto segment = [&](const KvRange& r) {
    return KvSegment{k_base + static_cast<size_t>(r.kv_begin * d) * es,
                     v_base + static_cast<size_t>(r.kv_begin * d) * es, r.size(), total * d, d};
  };
  std::vector<KvSegment> context;
  for (const KvRange& r : prompt.contexts) context.push_back(segment(r));
  std::vector<KvSegment> other;
  if (prompt.prefix.size() > 0) other.push_back(segment(prompt.prefix));
  const char* qk = args.query_kv.data();
  other.push_back(KvSegment{qk, qk + static_cast<size_t>(spec.kv_heads * m * d) * es, m, m * d, d});

  AttendResult result;
  // Poisoned: an element the kernel does not write stays NaN.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  result.out.assign(static_cast<size_t>(args.num_queries) * args.q_heads * d, nan);
  result.lse.assign(static_cast<size_t>(args.num_queries) * args.q_heads, nan);
  ApeArgs ape;
  ape.shape.num_queries = args.num_queries;
  ape.shape.q_heads = args.q_heads;
  ape.shape.kv_heads = spec.kv_heads;
  ape.shape.head_dim = spec.head_dim;
  ape.shape.q_dtype = args.q_dtype;
  ape.shape.kv_dtype = spec.dtype;
  ape.shape.out_dtype = DType::kF32;
  ape.temperature = prompt.temperature;
  ape.scale = prompt.scale;
  ape.q = args.q.data();
  ape.context = context;
  ape.other = other;
  ape.out = result.out.data();
  ape.lse = result.lse.data();

  AttendDevice device = args.device;
  if (device == AttendDevice::kAuto) {
    const bool cuda = ApeCudaBuilt() && GpuAvailable() && CudaHeadDim(spec.head_dim) &&
                      context.size() + other.size() <= static_cast<size_t>(kApeCudaMaxSegments);
    device = cuda ? AttendDevice::kCuda : AttendDevice::kCpu;
  }
  if (device == AttendDevice::kCuda) {
    if (!ApeCudaBuilt()) {
      return absl::UnimplementedError("Attend on CUDA: this ropekv was built without CUDA");
    }
    if (!GpuAvailable()) return absl::UnavailableError("Attend on CUDA: no GPU is present");
    const HostRegion regions[] = {{layer.data(), layer.size()},
                                  {args.query_kv.data(), args.query_kv.size()},
                                  {args.q.data(), args.q.size()}};
    if (absl::Status st = ApeAttentionCudaFromHost(ape, regions); !st.ok()) return st;
  } else {
    if (absl::Status st = ApeAttentionCpu(ape); !st.ok()) return st;
  }
  result.device = device;
  return result;
}

}  // namespace ropekv
