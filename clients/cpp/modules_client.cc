#include "clients/cpp/modules_client.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "clients/cpp/bulk_stream.h"

namespace ropekv::client {
namespace {

v1::ComposeParallelRequest ToProto(const ParallelArgs& args) {
  v1::ComposeParallelRequest req;
  req.set_model(args.model);
  req.set_tenant(args.tenant);
  req.mutable_prefix()->Add(args.prefix.begin(), args.prefix.end());
  for (const std::vector<int32_t>& c : args.contexts) {
    req.add_contexts()->mutable_tokens()->Add(c.begin(), c.end());
  }
  req.mutable_query()->Add(args.query.begin(), args.query.end());
  req.set_temperature(args.temperature);
  req.set_scale(args.scale);
  return req;
}

// Reads a server stream: the header (first message), then every message's bytes.
template <typename Response, typename Header>
absl::Status ReadStream(grpc::ClientReader<Response>* reader, Header* header,
                        std::vector<uint8_t>* data, const char* rpc) {
  Response msg;
  bool have_header = false;
  while (reader->Read(&msg)) {
    if (msg.has_header()) {
      *header = msg.header();
      have_header = true;
      data->reserve(header->total_bytes());
    }
    data->insert(data->end(), msg.data().begin(), msg.data().end());
  }
  if (absl::Status s = FromGrpc(reader->Finish()); !s.ok()) return s;
  if (!have_header) return absl::InternalError(absl::StrCat(rpc, " stream without a header"));
  if (data->size() != header->total_bytes()) {
    return absl::DataLossError(absl::StrCat(rpc, " stream carried ", data->size(),
                                            " bytes, expected ", header->total_bytes()));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<ModulesClient>> ModulesClient::Connect(Options options) {
  if (options.address.empty()) return absl::InvalidArgumentError("empty server address");
  auto channel = MakeChannel(options.address, options.max_message_bytes);
  return std::unique_ptr<ModulesClient>(new ModulesClient(std::move(options), std::move(channel)));
}

ModulesClient::ModulesClient(Options options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::Modules::NewStub(channel_)) {}

void ModulesClient::Prepare(grpc::ClientContext* ctx) const { SetDeadline(ctx, options_.timeout); }

template <typename Request>
absl::Status ModulesClient::Send(grpc::ClientWriter<Request>* writer, Request* first,
                                 absl::Span<const uint8_t> bytes) {
  return SendChunked(writer, first, bytes, options_.chunk_bytes);
}

absl::StatusOr<v1::RegisterSchemaResponse> ModulesClient::RegisterSchema(
    const std::string& model, const std::string& schema_text) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::RegisterSchemaRequest req;
  req.set_model(model);
  req.set_schema(schema_text);
  v1::RegisterSchemaResponse resp;
  if (auto s = FromGrpc(stub_->RegisterSchema(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::SchemaInfo> ModulesClient::GetSchema(const std::string& schema_id,
                                                        const std::string& tenant) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GetSchemaRequest req;
  req.set_schema_id(schema_id);
  req.set_tenant(tenant);
  v1::GetSchemaResponse resp;
  if (auto s = FromGrpc(stub_->GetSchema(&ctx, req, &resp)); !s.ok()) return s;
  return resp.schema();
}

absl::StatusOr<v1::PutKvResponse> ModulesClient::PutModule(const PutModuleArgs& args,
                                                           absl::Span<const uint8_t> kv) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::PutKvResponse resp;
  auto writer = stub_->PutModule(&ctx, &resp);
  v1::PutModuleRequest req;
  v1::PutModuleHeader* h = req.mutable_header();
  h->set_schema_id(args.schema_id);
  h->set_module(args.module);
  h->set_tenant(args.tenant);
  h->set_rope_table(args.rope_table);
  h->set_pin(args.pin);
  if (auto s = Send(writer.get(), &req, kv); !s.ok()) return s;
  return resp;
}

absl::StatusOr<ComposePromptResult> ModulesClient::ComposePrompt(const ComposePromptArgs& args) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ComposePromptRequest req;
  req.set_schema_id(args.schema_id);
  req.set_tenant(args.tenant);
  for (const std::string& m : args.modules) req.add_modules(m);
  for (const auto& [name, tokens] : args.arguments) {
    (*req.mutable_arguments())[name].mutable_tokens()->Add(tokens.begin(), tokens.end());
  }
  req.mutable_user_tokens()->Add(args.user_tokens.begin(), args.user_tokens.end());
  req.set_layout(args.layout);
  auto reader = stub_->ComposePrompt(&ctx, req);
  ComposePromptResult result;
  if (auto s = ReadStream(reader.get(), &result.header, &result.data, "ComposePrompt"); !s.ok()) {
    return s;
  }
  return result;
}

absl::StatusOr<v1::PutKvResponse> ModulesClient::PutContext(const PutContextArgs& args,
                                                            absl::Span<const uint8_t> kv) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::PutKvResponse resp;
  auto writer = stub_->PutContext(&ctx, &resp);
  v1::PutContextRequest req;
  v1::PutContextHeader* h = req.mutable_header();
  h->set_model(args.model);
  h->set_tenant(args.tenant);
  h->mutable_prefix()->Add(args.prefix.begin(), args.prefix.end());
  h->mutable_context()->Add(args.context.begin(), args.context.end());
  h->set_rope_table(args.rope_table);
  h->set_pin(args.pin);
  if (auto s = Send(writer.get(), &req, kv); !s.ok()) return s;
  return resp;
}

absl::StatusOr<ComposeParallelResult> ModulesClient::ComposeParallel(const ParallelArgs& args) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  auto reader = stub_->ComposeParallel(&ctx, ToProto(args));
  ComposeParallelResult result;
  if (auto s = ReadStream(reader.get(), &result.header, &result.data, "ComposeParallel"); !s.ok()) {
    return s;
  }
  return result;
}

absl::StatusOr<v1::AttendResponse> ModulesClient::Attend(const ParallelArgs& prompt,
                                                         const AttendArgs& args) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::AttendRequest req;
  *req.mutable_prompt() = ToProto(prompt);
  req.set_layer(args.layer);
  req.set_num_queries(args.num_queries);
  req.set_q_heads(args.q_heads);
  req.set_q_dtype(args.q_dtype);
  req.set_q(args.q.data(), args.q.size());
  req.set_query_kv_tokens(args.query_kv_tokens);
  req.set_query_kv(args.query_kv.data(), args.query_kv.size());
  req.set_device(args.device);
  v1::AttendResponse resp;
  if (auto s = FromGrpc(stub_->Attend(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

}  // namespace ropekv::client
