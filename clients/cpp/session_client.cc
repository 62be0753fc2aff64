#include "clients/cpp/session_client.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "clients/cpp/bulk_stream.h"

namespace ropekv::client {

v1::EditOp InsertOp(int64_t at, std::vector<int32_t> tokens) {
  v1::EditOp op;
  op.mutable_insert()->set_at(at);
  op.mutable_insert()->mutable_tokens()->Add(tokens.begin(), tokens.end());
  return op;
}

v1::EditOp DeleteOp(int64_t start, int64_t end) {
  v1::EditOp op;
  op.mutable_delete_()->set_start(start);
  op.mutable_delete_()->set_end(end);
  return op;
}

v1::EditOp ReplaceOp(int64_t start, int64_t end, std::vector<int32_t> tokens) {
  v1::EditOp op;
  op.mutable_replace()->set_start(start);
  op.mutable_replace()->set_end(end);
  op.mutable_replace()->mutable_tokens()->Add(tokens.begin(), tokens.end());
  return op;
}

v1::TokenRange Range(int64_t start, int64_t end) {
  v1::TokenRange r;
  r.set_start(start);
  r.set_end(end);
  return r;
}

absl::StatusOr<std::unique_ptr<SessionClient>> SessionClient::Connect(Options options) {
  if (options.address.empty()) return absl::InvalidArgumentError("empty server address");
  auto channel = MakeChannel(options.address, options.max_message_bytes);
  return std::unique_ptr<SessionClient>(new SessionClient(std::move(options), std::move(channel)));
}

SessionClient::SessionClient(Options options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::Sessions::NewStub(channel_)) {}

void SessionClient::Prepare(grpc::ClientContext* ctx) const { SetDeadline(ctx, options_.timeout); }

template <typename Request>
absl::Status SessionClient::Send(grpc::ClientWriter<Request>* writer, Request* first,
                                 absl::Span<const uint8_t> bytes) {
  return SendChunked(writer, first, bytes, options_.chunk_bytes);
}

absl::StatusOr<v1::OpenSessionResponse> SessionClient::Open(const OpenArgs& args,
                                                            absl::Span<const uint8_t> block_bytes) {
  if (args.from_cache && !block_bytes.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("from_cache takes the KV from the cache; got ",
                                                   block_bytes.size(), " bytes too"));
  }
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::OpenSessionResponse resp;
  auto writer = stub_->OpenSession(&ctx, &resp);
  v1::OpenSessionRequest req;
  v1::OpenSessionHeader* h = req.mutable_header();
  h->set_model(args.model);
  h->mutable_tokens()->Add(args.tokens.begin(), args.tokens.end());
  h->set_base_position(args.base_position);
  if (args.rotated_at) h->set_rotated_at(*args.rotated_at);
  h->set_rope_table(args.rope_table);
  h->set_from_cache(args.from_cache);
  h->set_tenant(args.tenant);
  if (auto s = Send(writer.get(), &req, block_bytes); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::EditResponse> SessionClient::Edit(const std::string& session_id,
                                                     const std::vector<v1::EditOp>& ops,
                                                     const EditArgs& args) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::EditRequest req;
  req.set_session_id(session_id);
  for (const v1::EditOp& op : ops) *req.add_ops() = op;
  for (const v1::TokenRange& r : args.stale) *req.add_stale() = r;
  req.set_repair_tokens(args.repair_tokens);
  v1::EditResponse resp;
  if (auto s = FromGrpc(stub_->Edit(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::FillResponse> SessionClient::Fill(const std::string& session_id,
                                                     const v1::TokenRange& range,
                                                     absl::Span<const uint8_t> kv,
                                                     const FillArgs& args) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::FillResponse resp;
  auto writer = stub_->Fill(&ctx, &resp);
  v1::FillRequest req;
  v1::FillHeader* h = req.mutable_header();
  h->set_session_id(session_id);
  *h->mutable_range() = range;
  if (args.rotated_at) h->set_rotated_at(*args.rotated_at);
  if (args.rope_table) h->set_rope_table(*args.rope_table);
  if (args.version) h->set_version(*args.version);
  if (auto s = Send(writer.get(), &req, kv); !s.ok()) return s;
  return resp;
}

namespace {

v1::ReadRequest MakeReadRequest(const std::string& session_id,
                                const std::optional<v1::TokenRange>& range,
                                std::optional<int64_t> rope_table) {
  v1::ReadRequest req;
  req.set_session_id(session_id);
  if (range) *req.mutable_range() = *range;
  if (rope_table) req.set_rope_table(*rope_table);
  return req;
}

std::optional<uint64_t> ReadBytes(const v1::ReadHeader& h) { return h.total_bytes(); }

}  // namespace

absl::StatusOr<ReadResult> SessionClient::Read(const std::string& session_id,
                                               std::optional<v1::TokenRange> range,
                                               std::optional<int64_t> rope_table) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  ReadResult result;
  auto header = ReadBulkStream<v1::ReadResponse>(
      channel_.get(), v1::Sessions::service_full_name(), "Read", &ctx,
      MakeReadRequest(session_id, range, rope_table),
      [&](const v1::ReadHeader& h, uint64_t offset, absl::string_view bytes) {
        if (result.data.empty()) result.data.reserve(h.total_bytes());
        result.data.insert(result.data.end(), bytes.begin(), bytes.end());
        return absl::OkStatus();
      },
      ReadBytes);
  if (!header.ok()) return header.status();
  result.header = *std::move(header);
  return result;
}

absl::StatusOr<v1::ReadHeader> SessionClient::ReadInto(const std::string& session_id,
                                                       std::optional<v1::TokenRange> range,
                                                       absl::Span<uint8_t> dst) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  return ReadBulkStream<v1::ReadResponse>(
      channel_.get(), v1::Sessions::service_full_name(), "Read", &ctx,
      MakeReadRequest(session_id, range, std::nullopt),
      [&](const v1::ReadHeader& h, uint64_t offset, absl::string_view bytes) {
        if (offset + bytes.size() > dst.size()) {
          return absl::OutOfRangeError(absl::StrCat("destination holds ", dst.size(),
                                                    " bytes; the range needs ", h.total_bytes()));
        }
        std::memcpy(dst.data() + offset, bytes.data(), bytes.size());
        return absl::OkStatus();
      },
      ReadBytes);
}

absl::StatusOr<v1::SnapshotResponse> SessionClient::Snapshot(const std::string& session_id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::SnapshotRequest req;
  req.set_session_id(session_id);
  v1::SnapshotResponse resp;
  if (auto s = FromGrpc(stub_->Snapshot(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::StatusOr<v1::SessionInfoResponse> SessionClient::Info(const std::string& session_id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::SessionInfoRequest req;
  req.set_session_id(session_id);
  v1::SessionInfoResponse resp;
  if (auto s = FromGrpc(stub_->Info(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

absl::Status SessionClient::Close(const std::string& session_id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::CloseSessionRequest req;
  req.set_session_id(session_id);
  v1::CloseSessionResponse resp;
  return FromGrpc(stub_->CloseSession(&ctx, req, &resp));
}

}  // namespace ropekv::client
