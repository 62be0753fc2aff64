#include "clients/cpp/client.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

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
  req.set_first_block(args.first_block);
  if (args.target_position) req.set_target_position(*args.target_position);
  return req;
}

}  // namespace

absl::StatusOr<GetResult> Client::Get(const GetArgs& args) {
  GetResult result;
  auto header = GetAny(args, [&](uint64_t bytes) -> absl::StatusOr<uint8_t*> {
    result.data.resize(bytes);
    return result.data.data();
  });
  if (!header.ok()) return header.status();
  result.header = *std::move(header);
  result.data.resize(uint64_t{result.header.blocks()} * result.header.block_bytes());
  return result;
}

absl::StatusOr<v1::GetHeader> Client::GetInto(const GetArgs& args, absl::Span<uint8_t> dst) {
  return GetAny(args, [&](uint64_t bytes) -> absl::StatusOr<uint8_t*> {
    if (bytes > dst.size()) {
      return absl::OutOfRangeError(absl::StrCat("destination holds ", dst.size(),
                                                " bytes; the cached prefix needs ", bytes));
    }
    return dst.data();
  });
}

absl::StatusOr<v1::GetHeader> Client::GetAny(const GetArgs& args, Reserve reserve) {
  if (args.streams > 1) return GetParallel(args, reserve);
  return GetStream(channel_.get(), args, reserve);
}

absl::StatusOr<v1::GetHeader> Client::GetStream(grpc::ChannelInterface* channel,
                                                const GetArgs& args, Reserve reserve) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  // A range's fresh connection to a daemon that has just answered the Lookup: a failed connect is
  // transient, so the call waits for it (within the deadline) instead of failing at once.
  ctx.set_wait_for_ready(channel != channel_.get());
  const v1::GetRequest req = MakeGetRequest(args);
  uint8_t* dst = nullptr;
  return ReadBulkStream<v1::GetResponse>(
      channel, v1::KVCache::service_full_name(), "Get", &ctx, req,
      [&](const v1::GetHeader& h, uint64_t offset, absl::string_view bytes) -> absl::Status {
        const uint64_t want = *GetBytes(h);
        if (dst == nullptr) {
          auto d = reserve(want);
          if (!d.ok()) return d.status();
          dst = *d;
        }
        if (offset + bytes.size() > want) {
          return absl::DataLossError("Get stream longer than its header says");
        }
        std::memcpy(dst + offset, bytes.data(), bytes.size());
        return absl::OkStatus();
      },
      GetBytes);
}

std::shared_ptr<grpc::Channel> Client::StreamChannel(size_t i) {
  if (i == 0) return channel_;
  absl::MutexLock lock(&channels_mu_);
  while (stream_channels_.size() < i) {
    stream_channels_.push_back(MakeChannel(options_.address, options_.max_message_bytes));
  }
  return stream_channels_[i - 1];
}

absl::StatusOr<v1::GetHeader> Client::GetParallel(const GetArgs& args, Reserve reserve) {
  auto match = Lookup(args.model, args.tenant, args.tokens);
  if (!match.ok()) return match.status();
  const uint32_t matched = match->blocks_size();
  const uint32_t first = std::min(args.first_block, matched);
  const uint32_t blocks =
      args.max_blocks == 0 ? matched - first : std::min(args.max_blocks, matched - first);
  const uint32_t streams = std::min({args.streams, blocks, GetArgs::kMaxStreams});
  if (streams <= 1) return GetStream(channel_.get(), args, reserve);
  const uint64_t bb = match->block_bytes();
  auto dst = reserve(uint64_t{blocks} * bb);
  if (!dst.ok()) return dst.status();

  // Range r: blocks [first + start[r], first + start[r + 1]), shares equal within a block.
  std::vector<uint32_t> start(streams + 1);
  for (uint32_t r = 0; r <= streams; ++r) {
    start[r] = static_cast<uint32_t>(uint64_t{blocks} * r / streams);
  }
  std::vector<absl::StatusOr<v1::GetHeader>> got(streams, absl::UnknownError("not read"));
  auto read = [&](uint32_t r) {
    GetArgs part = args;
    part.first_block = first + start[r];
    part.max_blocks = start[r + 1] - start[r];
    uint8_t* at = *dst + uint64_t{start[r]} * bb;
    got[r] =
        GetStream(StreamChannel(r).get(), part, [&](uint64_t bytes) -> absl::StatusOr<uint8_t*> {
          if (bytes > uint64_t{part.max_blocks} * bb) {
            return absl::DataLossError("a Get range longer than asked for");
          }
          return at;
        });
  };
  std::vector<std::thread> threads;
  for (uint32_t r = 1; r < streams; ++r) threads.emplace_back(read, r);
  read(0);
  for (std::thread& t : threads) t.join();

  // The ranges in order, up to the first that came back short (evicted meanwhile).
  v1::GetHeader header;
  header.set_block_bytes(bb);
  header.set_first_block(first);
  for (uint32_t r = 0; r < streams; ++r) {
    if (!got[r].ok()) return got[r].status();
    header.set_blocks(header.blocks() + got[r]->blocks());
    header.set_matched_tokens(header.matched_tokens() + got[r]->matched_tokens());
    for (const v1::BlockInfo& b : got[r]->block_info()) *header.add_block_info() = b;
    if (got[r]->blocks() < start[r + 1] - start[r]) break;
  }
  return header;
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
