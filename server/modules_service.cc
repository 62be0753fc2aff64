#include "server/modules_service.h"

#include <algorithm>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/convert.h"
#include "server/stream_reactor.h"

namespace ropekv {
namespace {

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

std::vector<int32_t> Tokens(const google::protobuf::RepeatedField<int32_t>& tokens) {
  return std::vector<int32_t>(tokens.begin(), tokens.end());
}

v1::Hit ToProto(HitKind hit) { return hit == HitKind::kExact ? v1::HIT_EXACT : v1::HIT_REROTATED; }

void ToProto(const KvRange& r, v1::KvRangeInfo* out) {
  out->set_kv_begin(r.kv_begin);
  out->set_kv_end(r.kv_end);
  out->set_position(r.position);
  out->set_hit(ToProto(r.hit));
}

// The schema with every element's positions; `cached` (one flag per module) when known.
void ToProto(const RegisteredSchema& reg, const std::vector<bool>* cached, v1::SchemaInfo* out) {
  const Schema& s = *reg.schema;
  out->set_schema_id(reg.id);
  out->set_name(s.name);
  out->set_model_id(reg.model_id);
  out->set_length(s.length);
  auto union_name = [&](int u) {
    return s.unions[u].name.empty() ? absl::StrCat("#", u) : s.unions[u].name;
  };
  for (size_t m = 0; m < s.modules.size(); ++m) {
    const SchemaModule& module = s.modules[m];
    v1::SchemaModuleInfo* p = out->add_modules();
    p->set_name(module.name);
    if (module.parent >= 0) p->set_parent(s.modules[module.parent].name);
    if (module.union_index >= 0) p->set_union_name(union_name(module.union_index));
    p->set_start(module.start);
    p->set_length(module.length);
    p->mutable_tokens()->Add(module.tokens.begin(), module.tokens.end());
    p->mutable_positions()->Add(module.positions.begin(), module.positions.end());
    if (cached != nullptr) p->set_cached((*cached)[m]);
  }
  for (const SchemaUnion& u : s.unions) {
    v1::SchemaUnionInfo* p = out->add_unions();
    p->set_name(u.name);
    if (u.parent >= 0) p->set_parent(s.modules[u.parent].name);
    for (int m : u.members) p->add_members(s.modules[m].name);
    p->set_start(u.start);
    p->set_length(u.length);
  }
  for (const SchemaParameter& param : s.parameters) {
    v1::SchemaParameterInfo* p = out->add_parameters();
    p->set_name(param.name);
    p->set_module(s.modules[param.module].name);
    p->set_start(param.start);
    p->set_length(param.length);
  }
}

ParallelArgs FromProto(const v1::ComposeParallelRequest& req) {
  ParallelArgs a;
  a.model = req.model();
  a.tenant = req.tenant();
  a.prefix = Tokens(req.prefix());
  for (const v1::TokenList& c : req.contexts()) a.contexts.push_back(Tokens(c.tokens()));
  a.query = Tokens(req.query());
  if (req.has_temperature()) a.temperature = req.temperature();
  if (req.has_scale()) a.scale = req.scale();
  return a;
}

// Client-streaming PutModule / PutContext: the first message's header opens a KvWriter (via
// `begin`), every message's bytes go into it, the end of the stream stores the segments.
template <typename Request>
class PutKvReactor final : public grpc::ServerReadReactor<Request> {
 public:
  using Begin =
      std::function<absl::StatusOr<std::unique_ptr<KvWriter>>(const Request& first_message)>;
  PutKvReactor(const char* rpc, Begin begin, v1::PutKvResponse* resp)
      : rpc_(rpc), begin_(std::move(begin)), resp_(resp) {
    this->StartRead(&req_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side: store
      if (!writer_) {
        return this->Finish(
            ToGrpc(absl::InvalidArgumentError(absl::StrCat(rpc_, " without a header"))));
      }
      absl::StatusOr<PutKvResult> r = writer_->Finish();
      if (!r.ok()) return this->Finish(ToGrpc(r.status()));
      resp_->set_tokens(r->tokens);
      resp_->set_segments(r->segments);
      resp_->set_blocks_stored(r->blocks_stored);
      resp_->set_blocks_existing(r->blocks_existing);
      return this->Finish(grpc::Status::OK);
    }
    if (!writer_) {
      if (!req_.has_header()) {
        return this->Finish(ToGrpc(absl::InvalidArgumentError(
            absl::StrCat("the first ", rpc_, " message needs a header"))));
      }
      absl::StatusOr<std::unique_ptr<KvWriter>> writer = begin_(req_);
      if (!writer.ok()) return this->Finish(ToGrpc(writer.status()));
      writer_ = *std::move(writer);
    } else if (req_.has_header()) {
      return this->Finish(ToGrpc(absl::InvalidArgumentError(
          absl::StrCat("only the first ", rpc_, " message has a header"))));
    }
    if (!req_.data().empty()) {
      if (absl::Status s = writer_->Write(req_.data()); !s.ok()) return this->Finish(ToGrpc(s));
    }
    this->StartRead(&req_);
  }

  void OnDone() override { delete this; }

 private:
  const char* rpc_;
  Begin begin_;
  v1::PutKvResponse* resp_;
  Request req_;
  std::unique_ptr<KvWriter> writer_;
};

absl::StatusOr<DType> QDTypeFromProto(v1::DType d) {
  switch (d) {
    case v1::DTYPE_UNSPECIFIED:
    case v1::DTYPE_F32:
      return DType::kF32;
    case v1::DTYPE_F16:
      return DType::kF16;
    case v1::DTYPE_BF16:
      return DType::kBF16;
    default:
      break;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "q_dtype must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16, got ", static_cast<int>(d)));
}

}  // namespace

ModulesService::ModulesService(KvCache* cache, const ServerConfig& config)
    : ModulesService(cache, config, ModuleStore::Options()) {}

ModulesService::ModulesService(KvCache* cache, const ServerConfig& config,
                               ModuleStore::Options options)
    : config_(config) {
  ServeBulk(v1::Modules::service_full_name(), "ComposePrompt",
            &ModulesService::StreamComposePrompt);
  ServeBulk(v1::Modules::service_full_name(), "ComposeParallel",
            &ModulesService::StreamComposeParallel);
  absl::StatusOr<std::unique_ptr<ModuleStore>> store = ModuleStore::Create(cache, options);
  if (store.ok()) {
    store_ = *std::move(store);
  } else {
    status_ = absl::UnavailableError(
        absl::StrCat("the Modules service is not available: ", store.status().message()));
  }
}

grpc::ServerUnaryReactor* ModulesService::RegisterSchema(grpc::CallbackServerContext* ctx,
                                                         const v1::RegisterSchemaRequest* req,
                                                         v1::RegisterSchemaResponse* resp) {
  if (!status_.ok()) return Done(ctx, status_);
  absl::StatusOr<RegisteredSchema> reg = store_->RegisterSchema(req->model(), req->schema());
  if (!reg.ok()) return Done(ctx, reg.status());
  ToProto(*reg, nullptr, resp->mutable_schema());
  resp->set_created(reg->created);
  return Done(ctx, absl::OkStatus());
}

grpc::ServerUnaryReactor* ModulesService::GetSchema(grpc::CallbackServerContext* ctx,
                                                    const v1::GetSchemaRequest* req,
                                                    v1::GetSchemaResponse* resp) {
  if (!status_.ok()) return Done(ctx, status_);
  absl::StatusOr<RegisteredSchema> reg = store_->GetSchema(req->schema_id());
  if (!reg.ok()) return Done(ctx, reg.status());
  absl::StatusOr<std::vector<bool>> cached = store_->CachedModules(req->schema_id(), req->tenant());
  if (!cached.ok()) return Done(ctx, cached.status());
  ToProto(*reg, &*cached, resp->mutable_schema());
  return Done(ctx, absl::OkStatus());
}

grpc::ServerReadReactor<v1::PutModuleRequest>* ModulesService::PutModule(
    grpc::CallbackServerContext* ctx, v1::PutKvResponse* resp) {
  ModuleStore* store = store_.get();
  const absl::Status unavailable = status_;
  return new PutKvReactor<v1::PutModuleRequest>(
      "PutModule",
      [store,
       unavailable](const v1::PutModuleRequest& req) -> absl::StatusOr<std::unique_ptr<KvWriter>> {
        if (!unavailable.ok()) return unavailable;
        const v1::PutModuleHeader& h = req.header();
        PutModuleArgs args;
        args.schema_id = h.schema_id();
        args.module = h.module();
        args.tenant = h.tenant();
        args.rope_table = h.rope_table();
        args.pin = h.pin();
        return store->BeginPutModule(args);
      },
      resp);
}

grpc::ServerWriteReactor<BulkMessage>* ModulesService::StreamComposePrompt(
    grpc::CallbackServerContext* ctx, const v1::ComposePromptRequest* req) {
  if (!status_.ok()) return new ChunkedWriteReactor<v1::ComposePromptResponse>(status_);
  ComposePromptArgs args;
  args.schema_id = req->schema_id();
  args.tenant = req->tenant();
  args.modules.assign(req->modules().begin(), req->modules().end());
  for (const auto& [name, list] : req->arguments()) args.arguments[name] = Tokens(list.tokens());
  args.user_tokens = Tokens(req->user_tokens());
  switch (req->layout()) {
    case v1::PROMPT_LAYOUT_SCHEMA:
      args.layout = Layout::kSchema;
      break;
    case v1::PROMPT_LAYOUT_COMPACT:
      args.layout = Layout::kCompact;
      break;
    default:
      return new ChunkedWriteReactor<v1::ComposePromptResponse>(absl::InvalidArgumentError(
          absl::StrCat("layout must be PROMPT_LAYOUT_SCHEMA or PROMPT_LAYOUT_COMPACT, got ",
                       static_cast<int>(req->layout()))));
  }
  absl::StatusOr<ModulePrompt> prompt = store_->ComposePrompt(args);
  if (!prompt.ok()) return new ChunkedWriteReactor<v1::ComposePromptResponse>(prompt.status());
  ModulePrompt& p = *prompt;
  v1::ComposePromptResponse first;
  v1::ComposePromptHeader* h = first.mutable_header();
  for (const ComposedPiece& cp : p.pieces) {
    v1::PromptPieceInfo* out = h->add_pieces();
    switch (cp.piece.kind) {
      case PromptPiece::Kind::kCached:
        out->set_kind(v1::PromptPieceInfo::KIND_CACHED);
        out->set_hit(ToProto(cp.hit));
        break;
      case PromptPiece::Kind::kArgument:
        out->set_kind(v1::PromptPieceInfo::KIND_ARGUMENT);
        break;
      case PromptPiece::Kind::kUser:
        out->set_kind(v1::PromptPieceInfo::KIND_USER);
        break;
    }
    out->set_module(cp.piece.module);
    out->set_parameter(cp.piece.parameter);
    out->mutable_tokens()->Add(cp.piece.tokens.begin(), cp.piece.tokens.end());
    out->set_position(cp.piece.position);
    out->set_schema_position(cp.piece.schema_position);
    out->set_prompt_offset(cp.prompt_offset);
    out->set_kv_offset(cp.kv_offset);
  }
  h->mutable_tokens()->Add(p.tokens.begin(), p.tokens.end());
  h->mutable_position_ids()->Add(p.position_ids.begin(), p.position_ids.end());
  h->set_next_position(p.next_position);
  for (const EncodeRange& r : p.encode) {
    v1::EncodeRange* out = h->add_encode();
    out->set_begin(r.begin);
    out->set_end(r.end);
    out->set_position(r.position);
  }
  h->set_kv_tokens(p.kv.total_tokens());
  h->mutable_kv_positions()->Add(p.kv_positions.begin(), p.kv_positions.end());
  h->set_layer_bytes(p.kv.layer_bytes());
  h->set_total_bytes(p.kv.bytes());
  return new ChunkedWriteReactor<v1::ComposePromptResponse>(
      std::make_unique<LayerSource<AssembledKv>>(std::move(p.kv)), std::move(first),
      ChunkBytes(req->chunk_bytes(), config_.chunk_bytes));
}

grpc::ServerReadReactor<v1::PutContextRequest>* ModulesService::PutContext(
    grpc::CallbackServerContext* ctx, v1::PutKvResponse* resp) {
  ModuleStore* store = store_.get();
  const absl::Status unavailable = status_;
  return new PutKvReactor<v1::PutContextRequest>(
      "PutContext",
      [store,
       unavailable](const v1::PutContextRequest& req) -> absl::StatusOr<std::unique_ptr<KvWriter>> {
        if (!unavailable.ok()) return unavailable;
        const v1::PutContextHeader& h = req.header();
        PutContextArgs args;
        args.model = h.model();
        args.tenant = h.tenant();
        args.prefix_tokens = h.prefix_size();
        args.context = Tokens(h.context());
        args.rope_table = h.rope_table();
        args.pin = h.pin();
        return store->BeginPutContext(args);
      },
      resp);
}

grpc::ServerWriteReactor<BulkMessage>* ModulesService::StreamComposeParallel(
    grpc::CallbackServerContext* ctx, const v1::ComposeParallelRequest* req) {
  if (!status_.ok()) return new ChunkedWriteReactor<v1::ComposeParallelResponse>(status_);
  absl::StatusOr<ParallelPrompt> prompt = store_->ComposeParallel(FromProto(*req));
  if (!prompt.ok()) return new ChunkedWriteReactor<v1::ComposeParallelResponse>(prompt.status());
  ParallelPrompt& p = *prompt;
  v1::ComposeParallelResponse first;
  v1::ComposeParallelHeader* h = first.mutable_header();
  ToProto(p.prefix, h->mutable_prefix());
  for (const KvRange& r : p.contexts) ToProto(r, h->add_contexts());
  h->set_query_position(p.query_position);
  h->mutable_query_positions()->Add(p.query_positions.begin(), p.query_positions.end());
  for (const KvRange& r : p.context_group) ToProto(r, h->add_context_group());
  h->set_temperature(p.temperature);
  h->set_scale(p.scale);
  h->set_kv_tokens(p.kv.total_tokens());
  h->mutable_kv_positions()->Add(p.kv_positions.begin(), p.kv_positions.end());
  h->set_layer_bytes(p.kv.layer_bytes());
  h->set_total_bytes(p.kv.bytes());
  return new ChunkedWriteReactor<v1::ComposeParallelResponse>(
      std::make_unique<LayerSource<AssembledKv>>(std::move(p.kv)), std::move(first),
      ChunkBytes(req->chunk_bytes(), config_.chunk_bytes));
}

grpc::ServerUnaryReactor* ModulesService::Attend(grpc::CallbackServerContext* ctx,
                                                 const v1::AttendRequest* req,
                                                 v1::AttendResponse* resp) {
  if (!status_.ok()) return Done(ctx, status_);
  absl::StatusOr<DType> q_dtype = QDTypeFromProto(req->q_dtype());
  if (!q_dtype.ok()) return Done(ctx, q_dtype.status());
  AttendArgs a;
  a.layer = req->layer();
  a.num_queries = req->num_queries();
  a.q_heads = req->q_heads();
  a.q_dtype = *q_dtype;
  a.q = req->q();
  a.query_kv_tokens = req->query_kv_tokens();
  a.query_kv = req->query_kv();
  switch (req->device()) {
    case v1::ATTEND_DEVICE_AUTO:
      a.device = AttendDevice::kAuto;
      break;
    case v1::ATTEND_DEVICE_CPU:
      a.device = AttendDevice::kCpu;
      break;
    case v1::ATTEND_DEVICE_CUDA:
      a.device = AttendDevice::kCuda;
      break;
    default:
      return Done(ctx, absl::InvalidArgumentError(
                           absl::StrCat("device must be ATTEND_DEVICE_AUTO, _CPU or _CUDA, got ",
                                        static_cast<int>(req->device()))));
  }
  absl::StatusOr<ParallelPrompt> prompt = store_->ComposeParallel(FromProto(req->prompt()));
  if (!prompt.ok()) return Done(ctx, prompt.status());
  absl::StatusOr<AttendResult> r = ModuleStore::Attend(*prompt, a);
  if (!r.ok()) return Done(ctx, r.status());
  resp->mutable_out()->Add(r->out.begin(), r->out.end());
  resp->mutable_lse()->Add(r->lse.begin(), r->lse.end());
  resp->set_device(r->device == AttendDevice::kCuda ? v1::ATTEND_DEVICE_CUDA
                                                    : v1::ATTEND_DEVICE_CPU);
  return Done(ctx, absl::OkStatus());
}

}  // namespace ropekv
