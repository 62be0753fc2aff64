#include "server/kvcache_service.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "cache/compose.h"
#include "server/convert.h"
#include "server/stream_reactor.h"

namespace ropekv {
namespace {

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

// Client-streaming Put: the first message's header opens a PutWriter, every message's bytes go
// straight into the cache's slots. Each message is taken on `pool` (making room may demote
// blocks to the disk; the commit may write it, synced), the next read started from there.
class PutReactor final : public grpc::ServerReadReactor<v1::PutRequest> {
 public:
  PutReactor(KvCache* cache, WorkPool* pool, v1::PutResponse* resp)
      : cache_(cache), pool_(pool), resp_(resp) {
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    pool_->Submit([this, ok] { Take(ok); });
  }
  void OnDone() override { delete this; }

 private:
  // Its last act is StartRead or Finish (after which `this` may be gone).
  void Take(bool ok) {
    if (!ok) {  // the client closed its side: commit
      if (!writer_) return Finish(ToGrpc(absl::InvalidArgumentError("Put without a header")));
      auto result = writer_->Finish();
      if (!result.ok()) return Finish(ToGrpc(result.status()));
      resp_->set_blocks_stored(result->blocks_stored);
      resp_->set_blocks_existing(result->blocks_existing);
      for (const BlockHash& h : result->hashes) resp_->add_block_hashes(h.Raw());
      return Finish(grpc::Status::OK);
    }
    if (!writer_) {
      if (!req_.has_header()) {
        return Finish(ToGrpc(absl::InvalidArgumentError("the first Put message needs a header")));
      }
      if (absl::Status s = Open(req_.header()); !s.ok()) return Finish(ToGrpc(s));
    } else if (req_.has_header()) {
      return Finish(ToGrpc(absl::InvalidArgumentError("only the first Put message has a header")));
    }
    if (!req_.data().empty()) {
      if (absl::Status s = writer_->Write(req_.data()); !s.ok()) return Finish(ToGrpc(s));
    }
    StartRead(&req_);
  }

  absl::Status Open(const v1::PutHeader& h) {
    PutOptions options;
    options.model = h.model();
    options.tenant = h.tenant();
    options.tokens = FromProto(h.tokens());
    if (!h.parent().empty()) {
      auto parent = BlockHash::FromRaw(h.parent());
      if (!parent.ok()) return parent.status();
      options.parent = *parent;
    }
    if (h.has_rotated_at()) {
      if (h.rotated_at() < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("rotated_at must be >= 0, got ", h.rotated_at()));
      }
      options.rotated_at = h.rotated_at();
    }
    options.rope_table = h.rope_table();
    options.pre_rope = h.pre_rope();
    options.pin = h.pin();
    options.segment = h.segment();
    auto writer = cache_->BeginPut(std::move(options));
    if (!writer.ok()) return writer.status();
    writer_ = *std::move(writer);
    return absl::OkStatus();
  }

  KvCache* cache_;
  WorkPool* pool_;
  v1::PutResponse* resp_;
  v1::PutRequest req_;
  std::unique_ptr<PutWriter> writer_;
};

// The blocks of a held prefix, as stored or re-rotated (one block at a time, into the staging
// buffer) so that the first token's key sits at `target`.
class PrefixSource final : public ByteSource {
 public:
  PrefixSource(ReadHandle handle, std::optional<int64_t> target)
      : handle_(std::move(handle)), target_(target) {}
  size_t units() const override { return handle_.blocks().size(); }
  absl::StatusOr<absl::string_view> Unit(size_t i, std::string* staging) override {
    if (!target_) return handle_.bytes(i);
    staging->resize(handle_.block_bytes());
    const int64_t pos = *target_ + static_cast<int64_t>(i) * handle_.model().spec.block_tokens;
    if (absl::Status s = handle_.CopyBlock(i, staging->data(), pos); !s.ok()) return s;
    return absl::string_view(*staging);
  }

 private:
  ReadHandle handle_;
  std::optional<int64_t> target_;
};

}  // namespace

KvCacheService::KvCacheService(KvCache* cache, const ServerConfig& config)
    : cache_(cache), config_(config), pool_(std::make_unique<WorkPool>(config.kvcache_threads)) {
  ServeBulk(v1::KVCache::service_full_name(), "Get", &KvCacheService::StreamGet);
  ServeBulk(v1::KVCache::service_full_name(), "Compose", &KvCacheService::StreamCompose);
}

grpc::ServerUnaryReactor* KvCacheService::Submit(grpc::CallbackServerContext* ctx,
                                                 std::function<absl::Status()> work) {
  return FinishOnPool(*pool_, ctx, std::move(work));
}

grpc::ServerUnaryReactor* KvCacheService::RegisterModel(grpc::CallbackServerContext* ctx,
                                                        const v1::RegisterModelRequest* req,
                                                        v1::RegisterModelResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    auto spec = FromProto(req->spec());
    if (!spec.ok()) return spec.status();
    auto reg = cache_->RegisterModel(*spec, req->name());
    if (!reg.ok()) return reg.status();
    resp->set_model_id(reg->id);
    resp->set_created(reg->created);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCacheService::ListModels(grpc::CallbackServerContext* ctx,
                                                     const v1::ListModelsRequest* req,
                                                     v1::ListModelsResponse* resp) {
  for (const RegisteredModel& m : cache_->ListModels()) {
    v1::ModelInfo* info = resp->add_models();
    info->set_model_id(m.id);
    for (const std::string& n : m.names) info->add_names(n);
    *info->mutable_spec() = ToProto(m.spec);
    info->set_block_bytes(BlockBytes(m.spec));
    info->set_blocks(cache_->BlockCount(m.id));
  }
  return Done(ctx, absl::OkStatus());
}

grpc::ServerReadReactor<v1::PutRequest>* KvCacheService::Put(grpc::CallbackServerContext* ctx,
                                                             v1::PutResponse* resp) {
  return new PutReactor(cache_, pool_.get(), resp);
}

grpc::ServerUnaryReactor* KvCacheService::Lookup(grpc::CallbackServerContext* ctx,
                                                 const v1::LookupRequest* req,
                                                 v1::LookupResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    const std::vector<int32_t> tokens = FromProto(req->tokens());
    auto result = req->segment() ? cache_->LookupSegment(req->model(), req->tenant(), tokens)
                                 : cache_->Lookup(req->model(), req->tenant(), tokens);
    if (!result.ok()) return result.status();
    resp->set_matched_tokens(result->matched_tokens);
    for (const BlockInfo& b : result->blocks) ToProto(b, resp->add_blocks());
    resp->set_block_bytes(result->block_bytes);
    return absl::OkStatus();
  });
}

grpc::ServerWriteReactor<BulkMessage>* KvCacheService::StreamGet(grpc::CallbackServerContext* ctx,
                                                                 const v1::GetRequest* req) {
  using Reactor = ChunkedWriteReactor<v1::GetResponse>;
  std::optional<int64_t> target;
  if (req->has_target_position()) {
    // Bounded so that the positions of a range's blocks (first_block and the block index added)
    // cannot overflow.
    constexpr int64_t kMaxTarget = int64_t{1} << 62;
    if (req->target_position() < 0 || req->target_position() > kMaxTarget) {
      return new Reactor(absl::InvalidArgumentError(
          absl::StrCat("target_position must be in [0, 2^62], got ", req->target_position())));
    }
    target = req->target_position();
  }
  return new Reactor(pool_.get(), ChunkBytes(req->chunk_bytes(), config_.chunk_bytes),
                     [this, req, target]() -> absl::StatusOr<Reactor::Prepared> {
                       auto handle = cache_->AcquirePrefix(req->model(), req->tenant(),
                                                           FromProto(req->tokens()),
                                                           req->max_blocks(), req->first_block());
                       if (!handle.ok()) return handle.status();
                       Reactor::Prepared p;
                       v1::GetHeader* header = p.first.mutable_header();
                       header->set_matched_tokens(handle->matched_tokens());
                       header->set_blocks(handle->blocks().size());
                       header->set_block_bytes(handle->block_bytes());
                       header->set_first_block(req->first_block());
                       for (const BlockInfo& b : handle->blocks())
                         ToProto(b, header->add_block_info());
                       // The range's first block sits first_block blocks after the prompt's
                       // first token.
                       std::optional<int64_t> at = target;
                       if (at) {
                         *at += int64_t{req->first_block()} * handle->model().spec.block_tokens;
                       }
                       p.source = std::make_unique<PrefixSource>(*std::move(handle), at);
                       return p;
                     });
}

grpc::ServerWriteReactor<BulkMessage>* KvCacheService::StreamCompose(
    grpc::CallbackServerContext* ctx, const v1::ComposeRequest* req) {
  using Reactor = ChunkedWriteReactor<v1::ComposeResponse>;
  return new Reactor(
      pool_.get(), ChunkBytes(req->chunk_bytes(), config_.chunk_bytes),
      [this, req]() -> absl::StatusOr<Reactor::Prepared> {
        auto prompt =
            ropekv::Compose(*cache_, req->model(), req->tenant(), FromProto(req->parts()));
        if (!prompt.ok()) return prompt.status();
        Reactor::Prepared p;
        v1::ComposeHeader* header = p.first.mutable_header();
        header->set_total_tokens(prompt->total_tokens());
        for (const ComposedPartInfo& info : prompt->parts()) {
          v1::ComposedPart* part = header->add_parts();
          part->set_tokens(info.tokens);
          part->set_position(info.position);
          part->set_hit(info.hit == HitKind::kExact ? v1::HIT_EXACT : v1::HIT_REROTATED);
        }
        p.source = std::make_unique<LayerSource<ComposedPrompt>>(*std::move(prompt));
        return p;
      });
}

grpc::ServerUnaryReactor* KvCacheService::Stats(grpc::CallbackServerContext* ctx,
                                                const v1::StatsRequest* req,
                                                v1::StatsResponse* resp) {
  ToProto(cache_->Stats(), resp);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* KvCacheService::Evict(grpc::CallbackServerContext* ctx,
                                                const v1::EvictRequest* req,
                                                v1::EvictResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    auto n = cache_->Evict(req->model(), req->tenant(), FromProto(req->tokens()));
    if (!n.ok()) return n.status();
    resp->set_blocks_evicted(*n);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* KvCacheService::Pin(grpc::CallbackServerContext* ctx,
                                              const v1::PinRequest* req, v1::PinResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    auto n = cache_->Pin(req->model(), req->tenant(), FromProto(req->tokens()), req->pin());
    if (!n.ok()) return n.status();
    resp->set_blocks(*n);
    return absl::OkStatus();
  });
}

}  // namespace ropekv
