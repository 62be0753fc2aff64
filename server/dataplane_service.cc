#include "server/dataplane_service.h"

#include <deque>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cache/dataplane.h"
#include "cache/parallel.h"
#include "server/convert.h"
#include "server/stream_reactor.h"
#include "server/work_pool.h"

ABSL_FLAG(std::string, allow_buffers, "auto",
          "buffer registration (shared memory, CUDA IPC): auto (only when listening on loopback), "
          "on, off");
ABSL_FLAG(uint32_t, max_buffers, 64, "most buffers registered at once");
ABSL_FLAG(int32_t, dataplane_threads, 4, "worker threads running the data plane's calls");
ABSL_FLAG(int32_t, dataplane_copy_threads, 0,
          "threads one call splits a copy into shared memory among; 0 = one per core, at most 8");

namespace ropekv {

namespace {

using ::ropekv::FromProto;  // the wire conversions of convert.h beside this file's own

// A session call's capacity layout (TokenLayout), absent when the request has none.
template <typename Request>
std::optional<TokenLayout> LayoutOf(const Request& req) {
  if (!req.has_layout()) return std::nullopt;
  return TokenLayout{req.layout().capacity(), req.layout().token_offset()};
}

void AddRanges(const std::vector<TokenRange>& ranges,
               google::protobuf::RepeatedPtrField<v1::TokenRange>* out) {
  for (const TokenRange& r : ranges) {
    v1::TokenRange* t = out->Add();
    t->set_start(r.start);
    t->set_end(r.end);
  }
}

BufferRange FromProto(const v1::BufferRange& r) {
  BufferRange out;
  out.buffer = r.buffer();
  out.offset = r.offset();
  out.length = r.length();
  out.block_ids.assign(r.block_ids().begin(), r.block_ids().end());
  return out;
}

void ToProto(const BufferInfo& b, v1::BufferInfo* out) {
  out->set_name(b.name);
  out->set_kind(b.kind == BufferKind::kShm ? v1::BUFFER_KIND_SHM : v1::BUFFER_KIND_CUDA_IPC);
  out->set_size(b.size);
  out->set_shm_name(b.shm_name);
  out->set_mapped_bytes(b.mapped_bytes);
  out->set_device(b.device);
  out->set_copies_in_flight(b.copies_in_flight);
  out->set_copies(b.copies);
  out->set_bytes_written(b.bytes_written);
  out->set_bytes_read(b.bytes_read);
  if (b.paged.has_value()) {
    out->mutable_paged()->set_model(b.paged->model_id);
    out->mutable_paged()->set_num_blocks(b.paged->num_blocks);
  }
}

absl::StatusOr<PutOptions> FromProto(const v1::PutHeader& h) {
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
  return options;
}

absl::Status Unavailable(const absl::Status& why) {
  return absl::UnavailableError(absl::StrCat("the data plane is not available: ", why.message()));
}

}  // namespace

absl::StatusOr<DataPlaneOptions> DataPlaneOptionsFromFlags() {
  DataPlaneOptions o;
  o.allow_buffers = absl::GetFlag(FLAGS_allow_buffers);
  o.max_buffers = absl::GetFlag(FLAGS_max_buffers);
  o.threads = absl::GetFlag(FLAGS_dataplane_threads);
  if (auto allowed = BuffersAllowed(o.allow_buffers, ""); !allowed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--", allowed.status().message()));
  }
  if (o.threads < 1 || o.threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dataplane_threads must be in [1, 256], got ", o.threads));
  }
  o.copy_threads = absl::GetFlag(FLAGS_dataplane_copy_threads);
  if (o.copy_threads < 0 || o.copy_threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dataplane_copy_threads must be in [0, 256], got ", o.copy_threads));
  }
  return o;
}

DataPlaneService::DataPlaneService(KvCache* cache, SessionStore* sessions,
                                   const ServerConfig& config)
    : cache_(cache), sessions_(sessions) {
  Init(config, DataPlaneOptionsFromFlags());
}

DataPlaneService::DataPlaneService(KvCache* cache, SessionStore* sessions,
                                   const ServerConfig& config, DataPlaneOptions options)
    : cache_(cache), sessions_(sessions) {
  Init(config, std::move(options));
}

DataPlaneService::~DataPlaneService() { pool_.reset(); }

void DataPlaneService::Init(const ServerConfig& config, absl::StatusOr<DataPlaneOptions> options) {
  if (!options.ok()) {
    status_ = options.status();
    return;
  }
  auto allowed = BuffersAllowed(options->allow_buffers, config.listen);
  if (!allowed.ok()) {
    status_ = allowed.status();
    return;
  }
  BufferRegistry::Options r;
  r.allow = *allowed;
  r.max_buffers = options->max_buffers;
  if (options->allow_buffers == "off") {
    r.off_reason = "ropekvd runs with --allow_buffers=off";
  } else {
    r.off_reason = absl::StrCat("ropekvd listens on ", config.listen,
                                ", not loopback, with --allow_buffers=auto; start it with "
                                "--allow_buffers=on to allow registration from remote clients");
  }
  auto registry = BufferRegistry::Create(std::move(r));
  if (!registry.ok()) {
    status_ =
        absl::InvalidArgumentError(absl::StrCat("--max_buffers: ", registry.status().message()));
    return;
  }
  registry_ = *std::move(registry);
  pool_ = std::make_unique<WorkPool>(options->threads);
  copy_threads_ = options->copy_threads;
  if (copy_threads_ == 0) copy_threads_ = DefaultParallelThreads();
  summary_ = absl::StrCat("buffer registration ", *allowed ? "on" : "off",
                          " (--allow_buffers=", options->allow_buffers, "), ", options->threads,
                          " data-plane threads, ", copy_threads_, " copy threads a call");
}

grpc::ServerUnaryReactor* DataPlaneService::Submit(grpc::CallbackServerContext* ctx,
                                                   std::function<absl::Status()> work) {
  if (!status_.ok()) {
    grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
    reactor->Finish(ToGrpc(Unavailable(status_)));
    return reactor;
  }
  return FinishOnPool(*pool_, ctx, std::move(work));
}

grpc::ServerUnaryReactor* DataPlaneService::RegisterBuffer(grpc::CallbackServerContext* ctx,
                                                           const v1::RegisterBufferRequest* req,
                                                           v1::RegisterBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    std::optional<PagedLayout> paged;
    if (req->has_paged()) {
      auto model = cache_->ResolveModel(req->paged().model());
      if (!model.ok()) return model.status();
      auto layout = MakePagedLayout(*model, req->paged().num_blocks());
      if (!layout.ok()) return layout.status();
      paged = *std::move(layout);
    }
    absl::StatusOr<BufferInfo> info;
    switch (req->region_case()) {
      case v1::RegisterBufferRequest::kShm:
        info = registry_->RegisterShm(req->name(), req->shm().shm_name(), req->shm().size(),
                                      std::move(paged));
        break;
      case v1::RegisterBufferRequest::kCudaIpc: {
        const v1::CudaIpcRegion& c = req->cuda_ipc();
        info = registry_->RegisterCudaIpc(req->name(), c.device(), c.handle(), c.offset(), c.size(),
                                          std::move(paged));
        break;
      }
      default:
        return absl::InvalidArgumentError("RegisterBuffer needs a region: shm or cuda_ipc");
    }
    if (!info.ok()) return info.status();
    ToProto(*info, resp->mutable_buffer());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* DataPlaneService::UnregisterBuffer(grpc::CallbackServerContext* ctx,
                                                             const v1::UnregisterBufferRequest* req,
                                                             v1::UnregisterBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    auto waited = registry_->Unregister(req->name());
    if (!waited.ok()) return waited.status();
    resp->set_waited_copies(*waited);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* DataPlaneService::ListBuffers(grpc::CallbackServerContext* ctx,
                                                        const v1::ListBuffersRequest* req,
                                                        v1::ListBuffersResponse* resp) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!status_.ok()) {
    reactor->Finish(ToGrpc(Unavailable(status_)));
    return reactor;
  }
  // Metadata only, under the registry's lock: answered here.
  for (const BufferInfo& b : registry_->List()) ToProto(b, resp->add_buffers());
  resp->set_registration_allowed(registry_->allowed());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* DataPlaneService::GetToBuffer(grpc::CallbackServerContext* ctx,
                                                        const v1::GetToBufferRequest* req,
                                                        v1::GetToBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    GetToBufferArgs a;
    a.model = req->model();
    a.tenant = req->tenant();
    a.tokens = FromProto(req->tokens());
    a.max_blocks = req->max_blocks();
    if (req->has_target_position()) a.target_position = req->target_position();
    a.dst = FromProto(req->dst());
    a.copy_threads = copy_threads_;
    auto r = ropekv::GetToBuffer(*cache_, *registry_, a);
    if (!r.ok()) return r.status();
    v1::GetHeader* h = resp->mutable_header();
    h->set_matched_tokens(r->matched_tokens);
    h->set_blocks(static_cast<uint32_t>(r->blocks.size()));
    h->set_block_bytes(r->block_bytes);
    for (const BlockInfo& b : r->blocks) ToProto(b, h->add_block_info());
    resp->set_bytes_written(r->bytes_written);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* DataPlaneService::PutFromBuffer(grpc::CallbackServerContext* ctx,
                                                          const v1::PutFromBufferRequest* req,
                                                          v1::PutFromBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    if (!req->has_header()) {
      return absl::InvalidArgumentError("PutFromBuffer needs a header");
    }
    auto options = FromProto(req->header());
    if (!options.ok()) return options.status();
    auto r = ropekv::PutFromBuffer(*cache_, *registry_, *std::move(options), FromProto(req->src()));
    if (!r.ok()) return r.status();
    resp->set_blocks_stored(r->put.blocks_stored);
    resp->set_blocks_existing(r->put.blocks_existing);
    for (const BlockHash& h : r->put.hashes) resp->add_block_hashes(h.Raw());
    resp->set_bytes_read(r->bytes_read);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* DataPlaneService::ComposeToBuffer(grpc::CallbackServerContext* ctx,
                                                            const v1::ComposeToBufferRequest* req,
                                                            v1::ComposeToBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    auto r = ropekv::ComposeToBuffer(*cache_, *registry_, req->model(), req->tenant(),
                                     FromProto(req->parts()), FromProto(req->dst()), copy_threads_);
    if (!r.ok()) return r.status();
    v1::ComposeHeader* h = resp->mutable_header();
    h->set_total_tokens(r->total_tokens);
    for (const ComposedPartInfo& info : r->parts) {
      v1::ComposedPart* p = h->add_parts();
      p->set_tokens(info.tokens);
      p->set_position(info.position);
      p->set_hit(info.hit == HitKind::kExact ? v1::HIT_EXACT : v1::HIT_REROTATED);
    }
    resp->set_layer_bytes(r->layer_bytes);
    resp->set_bytes_written(r->bytes_written);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* DataPlaneService::ReadToBuffer(grpc::CallbackServerContext* ctx,
                                                         const v1::ReadToBufferRequest* req,
                                                         v1::ReadToBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    if (sessions_ == nullptr) {
      return absl::UnavailableError("this ropekvd has no session store");
    }
    std::optional<TokenRange> range;
    if (req->has_range()) range = TokenRange{req->range().start(), req->range().end()};
    std::optional<RopeTableId> table;
    if (req->has_rope_table()) table = req->rope_table();
    auto r = ropekv::ReadToBuffer(*sessions_, *registry_, req->session_id(), range, table,
                                  FromProto(req->dst()), copy_threads_, LayoutOf(*req));
    if (!r.ok()) return r.status();
    v1::ReadHeader* h = resp->mutable_header();
    h->mutable_range()->set_start(r->range.start);
    h->mutable_range()->set_end(r->range.end);
    h->set_length(r->document_length);
    h->set_version(r->version);
    h->set_layer_bytes(r->layer_bytes);
    h->set_total_bytes(r->bytes_written);
    resp->set_bytes_written(r->bytes_written);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* DataPlaneService::OpenFromBuffer(grpc::CallbackServerContext* ctx,
                                                           const v1::OpenFromBufferRequest* req,
                                                           v1::OpenFromBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    if (sessions_ == nullptr) {
      return absl::UnavailableError("this ropekvd has no session store");
    }
    const v1::OpenSessionHeader& h = req->header();
    if (h.from_cache()) {
      return absl::InvalidArgumentError(
          "OpenFromBuffer takes the KV from the buffer: from_cache "
          "must be false");
    }
    OpenSessionArgs args;
    args.model = h.model();
    args.tokens.assign(h.tokens().begin(), h.tokens().end());
    args.base_position = h.base_position();
    if (h.has_rotated_at()) args.rotated_at = h.rotated_at();
    args.rope_table = h.rope_table();
    args.tenant = h.tenant();
    auto r = ropekv::OpenFromBuffer(*sessions_, *registry_, std::move(args), FromProto(req->src()),
                                    LayoutOf(*req));
    if (!r.ok()) return r.status();
    v1::OpenSessionResponse* out = resp->mutable_session();
    out->set_session_id(r->session.id);
    out->set_length(r->session.length);
    out->set_version(r->session.version);
    AddRanges(r->session.fill, out->mutable_fill());
    resp->set_bytes_read(r->bytes_read);
    resp->set_device(r->device);
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* DataPlaneService::FillFromBuffer(grpc::CallbackServerContext* ctx,
                                                           const v1::FillFromBufferRequest* req,
                                                           v1::FillFromBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    if (sessions_ == nullptr) {
      return absl::UnavailableError("this ropekvd has no session store");
    }
    const v1::FillHeader& h = req->header();
    FillArgs args;
    args.range = TokenRange{h.range().start(), h.range().end()};
    if (h.has_rotated_at()) args.rotated_at = h.rotated_at();
    if (h.has_rope_table()) args.rope_table = h.rope_table();
    if (h.has_version()) args.version = h.version();
    auto r = ropekv::FillFromBuffer(*sessions_, *registry_, h.session_id(), std::move(args),
                                    FromProto(req->src()), LayoutOf(*req));
    if (!r.ok()) return r.status();
    v1::FillResponse* out = resp->mutable_fill();
    out->set_length(r->session.length);
    out->set_version(r->session.version);
    AddRanges(r->session.fill, out->mutable_fill());
    resp->set_bytes_read(r->bytes_read);
    return absl::OkStatus();
  });
}

absl::Status DataPlaneService::Gather(const v1::GatherToBufferRequest& req,
                                      v1::GatherToBufferResponse* resp) {
  auto r = ropekv::GatherToBuffer(*retrieval_, *registry_, req.selection_id(),
                                  std::vector<int>(req.layers().begin(), req.layers().end()),
                                  FromProto(req.dst()), copy_threads_);
  if (!r.ok()) return r.status();
  resp->set_rows(r->rows);
  resp->set_capacity(r->capacity);
  resp->mutable_counts()->Assign(r->counts.begin(), r->counts.end());
  resp->set_layer_bytes(r->layer_bytes);
  resp->set_bytes_written(r->bytes_written);
  resp->set_dtype(ToProto(r->dtype));
  resp->set_head_dim(r->head_dim);
  resp->set_on_device(r->on_device);
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* DataPlaneService::GatherToBuffer(grpc::CallbackServerContext* ctx,
                                                           const v1::GatherToBufferRequest* req,
                                                           v1::GatherToBufferResponse* resp) {
  return Submit(ctx, [this, req, resp]() -> absl::Status {
    if (retrieval_ == nullptr) {
      return absl::UnavailableError("this ropekvd has no retrieval store");
    }
    return Gather(*req, resp);
  });
}

grpc::ServerUnaryReactor* DataPlaneService::GatherBatchToBuffer(
    grpc::CallbackServerContext* ctx, const v1::GatherBatchToBufferRequest* req,
    v1::GatherBatchToBufferResponse* resp) {
  return Submit(ctx, [this, ctx, req, resp]() -> absl::Status {
    if (retrieval_ == nullptr) {
      return absl::UnavailableError("this ropekvd has no retrieval store");
    }
    const int n = req->items_size();
    if (n < 1 || n > kMaxGatherBatchItems) {
      return absl::InvalidArgumentError(
          absl::StrCat("GatherBatchToBuffer takes 1 to ", kMaxGatherBatchItems, " items, got ", n));
    }
    for (int i = 0; i < n; ++i) {
      v1::GatherBatchToBufferItem* item = resp->add_items();
      const absl::Status s = ctx->IsCancelled() ? absl::CancelledError("the call was cancelled")
                                                : Gather(req->items(i), item->mutable_result());
      if (!s.ok()) {
        item->clear_result();
        SetItemStatus(s, item);
      }
    }
    return absl::OkStatus();
  });
}

}  // namespace ropekv
