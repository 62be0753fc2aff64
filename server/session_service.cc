#include "server/session_service.h"

#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "server/convert.h"
#include "server/stream_reactor.h"

ABSL_FLAG(uint32_t, session_max, 256,
          "most open editor sessions (PIE); more -> RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, session_capacity, "4GiB", "bytes of KV all editor sessions may hold");
ABSL_FLAG(absl::Duration, session_ttl, absl::Minutes(30),
          "an editor session idle this long is closed, e.g. 30m, 2h");
ABSL_FLAG(std::string, session_device, "auto",
          "where editor sessions keep their KV: auto (the GPU when one is present), cpu, gpu");
ABSL_FLAG(int32_t, session_gpu_device, 0, "CUDA device of GPU-resident editor sessions");

namespace ropekv {
namespace {

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

TokenRange FromProto(const v1::TokenRange& r) { return TokenRange{r.start(), r.end()}; }

void ToProto(const TokenRange& r, v1::TokenRange* out) {
  out->set_start(r.start);
  out->set_end(r.end);
}

template <typename Repeated>
void ToProto(const std::vector<TokenRange>& ranges, Repeated* out) {
  for (const TokenRange& r : ranges) ToProto(r, out->Add());
}

std::vector<int32_t> Tokens(const google::protobuf::RepeatedField<int32_t>& tokens) {
  return std::vector<int32_t>(tokens.begin(), tokens.end());
}

absl::StatusOr<std::vector<EditOp>> FromProto(
    const google::protobuf::RepeatedPtrField<v1::EditOp>& ops) {
  std::vector<EditOp> out;
  out.reserve(ops.size());
  for (int k = 0; k < ops.size(); ++k) {
    const v1::EditOp& op = ops[k];
    switch (op.op_case()) {
      case v1::EditOp::kInsert:
        out.push_back(EditOp::Insert(op.insert().at(), Tokens(op.insert().tokens())));
        break;
      case v1::EditOp::kDelete:
        out.push_back(EditOp::Delete(op.delete_().start(), op.delete_().end()));
        break;
      case v1::EditOp::kReplace:
        out.push_back(EditOp::Replace(op.replace().start(), op.replace().end(),
                                      Tokens(op.replace().tokens())));
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("op ", k, " must be one of insert, delete, replace; got none"));
    }
  }
  return out;
}

// Client-streaming OpenSession: the header opens a SessionWriter (or, with from_cache, waits for
// the end of the stream and copies the cached prefix); every message's bytes go into its blocks.
class OpenReactor final : public grpc::ServerReadReactor<v1::OpenSessionRequest> {
 public:
  OpenReactor(SessionStore* store, v1::OpenSessionResponse* resp) : store_(store), resp_(resp) {
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) return Commit();  // the client closed its side
    if (!started_) {
      if (!req_.has_header()) {
        return Finish(
            ToGrpc(absl::InvalidArgumentError("the first OpenSession message needs a header")));
      }
      if (absl::Status s = Start(req_.header()); !s.ok()) return Finish(ToGrpc(s));
      started_ = true;
    } else if (req_.has_header()) {
      return Finish(
          ToGrpc(absl::InvalidArgumentError("only the first OpenSession message has a header")));
    }
    if (!req_.data().empty()) {
      if (!writer_) {
        return Finish(ToGrpc(
            absl::InvalidArgumentError("OpenSession with from_cache takes no KV bytes, got some")));
      }
      if (absl::Status s = writer_->Write(req_.data()); !s.ok()) return Finish(ToGrpc(s));
    }
    StartRead(&req_);
  }

  void OnDone() override { delete this; }

 private:
  absl::Status Start(const v1::OpenSessionHeader& h) {
    args_.model = h.model();
    args_.tokens = Tokens(h.tokens());
    args_.base_position = h.base_position();
    if (h.has_rotated_at()) args_.rotated_at = h.rotated_at();
    args_.rope_table = h.rope_table();
    args_.tenant = h.tenant();
    from_cache_ = h.from_cache();
    if (from_cache_) return absl::OkStatus();
    auto writer = store_->BeginOpen(args_);
    if (!writer.ok()) return writer.status();
    writer_ = *std::move(writer);
    return absl::OkStatus();
  }

  void Commit() {
    if (!started_) {
      return Finish(ToGrpc(absl::InvalidArgumentError("OpenSession without a header")));
    }
    absl::StatusOr<SessionResult> r =
        from_cache_ ? store_->OpenFromCache(std::move(args_)) : writer_->Finish();
    if (!r.ok()) return Finish(ToGrpc(r.status()));
    resp_->set_session_id(r->id);
    resp_->set_length(r->length);
    resp_->set_version(r->version);
    ToProto(r->fill, resp_->mutable_fill());
    Finish(grpc::Status::OK);
  }

  SessionStore* store_;
  v1::OpenSessionResponse* resp_;
  v1::OpenSessionRequest req_;
  OpenSessionArgs args_;
  bool started_ = false;
  bool from_cache_ = false;
  std::unique_ptr<SessionWriter> writer_;
};

// Client-streaming Fill: the header opens a SessionWriter for the range; bytes follow.
class FillReactor final : public grpc::ServerReadReactor<v1::FillRequest> {
 public:
  FillReactor(SessionStore* store, v1::FillResponse* resp) : store_(store), resp_(resp) {
    StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (!writer_) return Finish(ToGrpc(absl::InvalidArgumentError("Fill without a header")));
      auto r = writer_->Finish();
      if (!r.ok()) return Finish(ToGrpc(r.status()));
      resp_->set_length(r->length);
      resp_->set_version(r->version);
      ToProto(r->fill, resp_->mutable_fill());
      return Finish(grpc::Status::OK);
    }
    if (!writer_) {
      if (!req_.has_header()) {
        return Finish(ToGrpc(absl::InvalidArgumentError("the first Fill message needs a header")));
      }
      const v1::FillHeader& h = req_.header();
      FillArgs args;
      args.range = FromProto(h.range());
      if (h.has_rotated_at()) args.rotated_at = h.rotated_at();
      if (h.has_rope_table()) args.rope_table = h.rope_table();
      if (h.has_version()) args.version = h.version();
      auto writer = store_->BeginFill(h.session_id(), std::move(args));
      if (!writer.ok()) return Finish(ToGrpc(writer.status()));
      writer_ = *std::move(writer);
    } else if (req_.has_header()) {
      return Finish(ToGrpc(absl::InvalidArgumentError("only the first Fill message has a header")));
    }
    if (!req_.data().empty()) {
      if (absl::Status s = writer_->Write(req_.data()); !s.ok()) return Finish(ToGrpc(s));
    }
    StartRead(&req_);
  }

  void OnDone() override { delete this; }

 private:
  SessionStore* store_;
  v1::FillResponse* resp_;
  v1::FillRequest req_;
  std::unique_ptr<SessionWriter> writer_;
};

}  // namespace

absl::StatusOr<SessionStore::Options> SessionOptionsFromFlags() {
  SessionStore::Options o;
  o.max_sessions = absl::GetFlag(FLAGS_session_max);
  auto bytes = ParseSize(absl::GetFlag(FLAGS_session_capacity));
  if (!bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--session_capacity: ", bytes.status().message()));
  }
  o.capacity_bytes = *bytes;
  o.idle_ttl = absl::GetFlag(FLAGS_session_ttl);
  auto device = ParseSessionDevice(absl::GetFlag(FLAGS_session_device));
  if (!device.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--session_device: ", device.status().message()));
  }
  o.device = *device;
  o.gpu_device = absl::GetFlag(FLAGS_session_gpu_device);
  return o;
}

SessionService::SessionService(KvCache* cache, const ServerConfig& config) : config_(config) {
  Init(cache, SessionOptionsFromFlags());
}

SessionService::SessionService(KvCache* cache, const ServerConfig& config,
                               SessionStore::Options options)
    : config_(config) {
  Init(cache, std::move(options));
}

void SessionService::Init(KvCache* cache, absl::StatusOr<SessionStore::Options> options) {
  ServeBulk(v1::Sessions::service_full_name(), "Read", &SessionService::StreamRead);
  if (!options.ok()) {
    status_ = options.status();
    return;
  }
  auto store = SessionStore::Create(cache, *std::move(options));
  if (!store.ok()) {
    status_ = absl::InvalidArgumentError(absl::StrCat("sessions: ", store.status().message()));
    return;
  }
  store_ = *std::move(store);
}

namespace {
absl::Status Unavailable(const absl::Status& why) {
  return absl::UnavailableError(absl::StrCat("sessions are not available: ", why.message()));
}

// A reactor that finishes at once with `status` (for a service whose store failed to start).
template <typename Base>
class FailedReactor final : public Base {
 public:
  explicit FailedReactor(const absl::Status& status) { this->Finish(ToGrpc(status)); }
  void OnDone() override { delete this; }
};
}  // namespace

grpc::ServerReadReactor<v1::OpenSessionRequest>* SessionService::OpenSession(
    grpc::CallbackServerContext* ctx, v1::OpenSessionResponse* resp) {
  if (!store_) {
    return new FailedReactor<grpc::ServerReadReactor<v1::OpenSessionRequest>>(Unavailable(status_));
  }
  return new OpenReactor(store_.get(), resp);
}

grpc::ServerUnaryReactor* SessionService::Edit(grpc::CallbackServerContext* ctx,
                                               const v1::EditRequest* req, v1::EditResponse* resp) {
  if (!store_) return Done(ctx, Unavailable(status_));
  auto ops = FromProto(req->ops());
  if (!ops.ok()) return Done(ctx, ops.status());
  EditOptions options;
  for (const v1::TokenRange& r : req->stale()) options.stale.push_back(FromProto(r));
  options.repair_tokens = req->repair_tokens();
  auto r = store_->Edit(req->session_id(), *ops, options);
  if (!r.ok()) return Done(ctx, r.status());
  resp->set_length(r->length);
  resp->set_version(r->version);
  ToProto(r->inserted, resp->mutable_inserted());
  ToProto(r->repair, resp->mutable_repair());
  ToProto(r->fill, resp->mutable_fill());
  return Done(ctx, absl::OkStatus());
}

grpc::ServerReadReactor<v1::FillRequest>* SessionService::Fill(grpc::CallbackServerContext* ctx,
                                                               v1::FillResponse* resp) {
  if (!store_) {
    return new FailedReactor<grpc::ServerReadReactor<v1::FillRequest>>(Unavailable(status_));
  }
  return new FillReactor(store_.get(), resp);
}

grpc::ServerWriteReactor<BulkMessage>* SessionService::StreamRead(grpc::CallbackServerContext* ctx,
                                                                  const v1::ReadRequest* req) {
  if (!store_) {
    return new ChunkedWriteReactor<v1::ReadResponse>(Unavailable(status_));
  }
  // The header, then the range's KV one layer at a time, keys re-rotated from their stored copy.
  using Reactor = ChunkedWriteReactor<v1::ReadResponse>;
  std::optional<TokenRange> range;
  if (req->has_range()) range = FromProto(req->range());
  std::optional<RopeTableId> table;
  if (req->has_rope_table()) table = req->rope_table();
  auto reader = store_->Read(req->session_id(), range, table);
  if (!reader.ok()) return new Reactor(reader.status());
  v1::ReadResponse first;
  v1::ReadHeader* header = first.mutable_header();
  ToProto(reader->range(), header->mutable_range());
  header->set_length(reader->document_length());
  header->set_version(reader->version());
  header->set_layer_bytes(reader->layer_bytes());
  header->set_total_bytes(reader->bytes());
  return new Reactor(std::make_unique<LayerSource<SessionReader>>(*std::move(reader)),
                     std::move(first), ChunkBytes(req->chunk_bytes(), config_.chunk_bytes));
}

grpc::ServerUnaryReactor* SessionService::Snapshot(grpc::CallbackServerContext* ctx,
                                                   const v1::SnapshotRequest* req,
                                                   v1::SnapshotResponse* resp) {
  if (!store_) return Done(ctx, Unavailable(status_));
  auto r = store_->Snapshot(req->session_id());
  if (!r.ok()) return Done(ctx, r.status());
  resp->set_session_id(r->id);
  resp->set_length(r->length);
  resp->set_version(r->version);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* SessionService::Info(grpc::CallbackServerContext* ctx,
                                               const v1::SessionInfoRequest* req,
                                               v1::SessionInfoResponse* resp) {
  if (!store_) return Done(ctx, Unavailable(status_));
  auto info = store_->Info(req->session_id());
  if (!info.ok()) return Done(ctx, info.status());
  resp->set_model_id(info->model);
  resp->mutable_tokens()->Add(info->tokens.begin(), info->tokens.end());
  resp->set_length(info->length);
  resp->set_base_position(info->base_position);
  resp->set_rope_table(info->rope_table);
  resp->set_version(info->version);
  ToProto(info->fill, resp->mutable_fill());
  resp->set_pieces(info->pieces);
  resp->set_stored_bytes(info->stored_bytes);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* SessionService::CloseSession(grpc::CallbackServerContext* ctx,
                                                       const v1::CloseSessionRequest* req,
                                                       v1::CloseSessionResponse* resp) {
  if (!store_) return Done(ctx, Unavailable(status_));
  return Done(ctx, store_->Close(req->session_id()));
}

}  // namespace ropekv
