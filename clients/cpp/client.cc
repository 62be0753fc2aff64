#include "clients/cpp/client.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "clients/cpp/bulk_stream.h"

namespace ropekv::client {

uint64_t KvShape::BlockBytes() const {
  const uint64_t elem = dtype == v1::DTYPE_F32 ? 4 : 2;
  return uint64_t{layers} * 2 * kv_heads * block_tokens * head_dim * elem;
}

KvShape KvShape::Of(const v1::ModelSpec& spec, uint32_t blocks) {
  return KvShape{blocks,          spec.layers(), spec.kv_heads(), spec.block_tokens(),
                 spec.head_dim(), spec.dtype()};
}

absl::Status FromGrpc(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::StatusOr<std::unique_ptr<Client>> Client::Connect(Options options) {
  if (options.address.empty()) return absl::InvalidArgumentError("empty server address");
  auto channel = MakeChannel(options.address, options.max_message_bytes);
  return std::unique_ptr<Client>(new Client(std::move(options), std::move(channel)));
}

Client::Client(Options options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::KVCache::NewStub(channel_)),
      health_(grpc::health::v1::Health::NewStub(channel_)) {}

void Client::Prepare(grpc::ClientContext* ctx) const { SetDeadline(ctx, options_.timeout); }

absl::Status Client::Health() {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  if (auto s = FromGrpc(health_->Check(&ctx, req, &resp)); !s.ok()) return s;
  if (resp.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::UnavailableError(absl::StrCat(
        "server is ", grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status())));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::RegisterModelResponse> Client::RegisterModel(const v1::ModelSpec& spec,
                                                                const std::string& name) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::RegisterModelRequest req;
  *req.mutable_spec() = spec;
  req.set_name(name);
  v1::RegisterModelResponse resp;
  if (auto s = FromGrpc(stub_->RegisterModel(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<std::vector<v1::ModelInfo>> Client::ListModels() {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ListModelsResponse resp;
  if (auto s = FromGrpc(stub_->ListModels(&ctx, v1::ListModelsRequest(), &resp)); !s.ok()) {
    return s;
  }
  return std::vector<v1::ModelInfo>(resp.models().begin(), resp.models().end());
}

absl::StatusOr<v1::PutResponse> Client::Put(const PutArgs& args, const KvView& kv) {
  if (kv.bytes.size() != kv.shape.Bytes()) {
    return absl::InvalidArgumentError(absl::StrCat("KV of ", kv.shape.blocks, " blocks needs ",
                                                   kv.shape.Bytes(), " bytes, got ",
                                                   kv.bytes.size()));
  }
  const uint64_t block_tokens = kv.shape.block_tokens;
  const uint64_t blocks_needed =
      args.segment ? (args.tokens.size() + block_tokens - 1) / block_tokens
                   : (args.tokens.size() % block_tokens == 0 ? args.tokens.size() / block_tokens
                                                             : ~uint64_t{0});
  if (blocks_needed != kv.shape.blocks) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV of ", kv.shape.blocks, " blocks of ", kv.shape.block_tokens, " tokens needs ",
        uint64_t{kv.shape.blocks} * kv.shape.block_tokens, " tokens, got ", args.tokens.size()));
  }
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::PutResponse resp;
  std::unique_ptr<grpc::ClientWriter<v1::PutRequest>> writer(stub_->Put(&ctx, &resp));
  v1::PutRequest req;
  v1::PutHeader* h = req.mutable_header();
  h->set_model(args.model);
  h->set_tenant(args.tenant);
  h->mutable_tokens()->Add(args.tokens.begin(), args.tokens.end());
  h->set_parent(args.parent);
  if (args.rotated_at) h->set_rotated_at(*args.rotated_at);
  h->set_pin(args.pin);
  h->set_segment(args.segment);
  if (auto s = SendChunked(writer.get(), &req, kv.bytes, options_.chunk_bytes); !s.ok()) {
    return s;
  }
  return resp;
}

absl::StatusOr<v1::LookupResponse> Client::Lookup(const std::string& model,
                                                  const std::string& tenant,
                                                  absl::Span<const int32_t> tokens, bool segment) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::LookupRequest req;
  req.set_model(model);
  req.set_tenant(tenant);
  req.mutable_tokens()->Add(tokens.begin(), tokens.end());
  req.set_segment(segment);
  v1::LookupResponse resp;
  if (auto s = FromGrpc(stub_->Lookup(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

namespace {

// The bytes a Get header promises.
std::optional<uint64_t> GetBytes(const v1::GetHeader& h) {
  return uint64_t{h.blocks()} * h.block_bytes();
}

v1::GetRequest MakeGetRequest(const GetArgs& args) {
  v1::GetRequest req;
  req.set_model(args.model);
  req.set_tenant(args.tenant);
  req.mutable_tokens()->Add(args.tokens.begin(), args.tokens.end());
  req.set_max_blocks(args.max_blocks);
  if (args.target_position) req.set_target_position(*args.target_position);
  return req;
}

}  // namespace

absl::StatusOr<GetResult> Client::Get(const GetArgs& args) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  const v1::GetRequest req = MakeGetRequest(args);
  GetResult result;
  auto header = ReadBulkStream<v1::GetResponse>(
      channel_.get(), v1::KVCache::service_full_name(), "Get", &ctx, req,
      [&](const v1::GetHeader& h, uint64_t offset, absl::string_view bytes) {
        if (result.data.empty()) {
          result.data.resize(uint64_t{h.blocks()} * h.block_bytes());
        }
        if (offset + bytes.size() > result.data.size()) {
          return absl::DataLossError("Get stream longer than its header says");
        }
        std::memcpy(result.data.data() + offset, bytes.data(), bytes.size());
        return absl::OkStatus();
      },
      GetBytes);
  if (!header.ok()) return header.status();
  result.header = *std::move(header);
  result.data.resize(uint64_t{result.header.blocks()} * result.header.block_bytes());
  return result;
}

absl::StatusOr<v1::GetHeader> Client::GetInto(const GetArgs& args, absl::Span<uint8_t> dst) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  const v1::GetRequest req = MakeGetRequest(args);
  return ReadBulkStream<v1::GetResponse>(
      channel_.get(), v1::KVCache::service_full_name(), "Get", &ctx, req,
      [&](const v1::GetHeader& h, uint64_t offset, absl::string_view bytes) {
        if (offset + bytes.size() > dst.size()) {
          return absl::OutOfRangeError(absl::StrCat("destination holds ", dst.size(),
                                                    " bytes; the cached prefix needs ",
                                                    uint64_t{h.blocks()} * h.block_bytes()));
        }
        std::memcpy(dst.data() + offset, bytes.data(), bytes.size());
        return absl::OkStatus();
      },
      GetBytes);
}

absl::StatusOr<ComposeResult> Client::Compose(const std::string& model, const std::string& tenant,
                                              const std::vector<v1::ComposePart>& parts) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ComposeRequest req;
  req.set_model(model);
  req.set_tenant(tenant);
  for (const v1::ComposePart& p : parts) *req.add_parts() = p;
  ComposeResult result;
  auto header = ReadBulkStream<v1::ComposeResponse>(
      channel_.get(), v1::KVCache::service_full_name(), "Compose", &ctx, req,
      [&](const v1::ComposeHeader&, uint64_t, absl::string_view bytes) {
        result.data.insert(result.data.end(), bytes.begin(), bytes.end());
        return absl::OkStatus();
      },
      [](const v1::ComposeHeader&) { return std::optional<uint64_t>(); });
  if (!header.ok()) return header.status();
  result.header = *std::move(header);
  return result;
}

absl::StatusOr<v1::StatsResponse> Client::Stats() {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::StatsResponse resp;
  if (auto s = FromGrpc(stub_->Stats(&ctx, v1::StatsRequest(), &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<uint32_t> Client::Evict(const std::string& model, const std::string& tenant,
                                       absl::Span<const int32_t> tokens) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::EvictRequest req;
  req.set_model(model);
  req.set_tenant(tenant);
  req.mutable_tokens()->Add(tokens.begin(), tokens.end());
  v1::EvictResponse resp;
  if (auto s = FromGrpc(stub_->Evict(&ctx, req, &resp)); !s.ok()) return s;
  return resp.blocks_evicted();
}

absl::StatusOr<uint32_t> Client::Pin(const std::string& model, const std::string& tenant,
                                     absl::Span<const int32_t> tokens, bool pin) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::PinRequest req;
  req.set_model(model);
  req.set_tenant(tenant);
  req.mutable_tokens()->Add(tokens.begin(), tokens.end());
  req.set_pin(pin);
  v1::PinResponse resp;
  if (auto s = FromGrpc(stub_->Pin(&ctx, req, &resp)); !s.ok()) return s;
  return resp.blocks();
}

}  // namespace ropekv::client
