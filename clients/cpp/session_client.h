// The C++ client of ropekvd's Sessions service (code-editor sessions with PIE edits; see
// docs/sessions.md): open a session with the KV of a prefilled document, edit it, fill the KV of
// the ranges an edit names, read the document's KV with every key at its position.
//
//   auto sessions = SessionClient::Connect({.address = "127.0.0.1:50051"});
//   auto opened = (*sessions)->Open({.model = "llama", .tokens = file}, blocks);
//   auto edit = (*sessions)->Edit(opened->session_id(), {ReplaceOp(120, 131, line)});
//   for (const v1::TokenRange& r : edit->fill()) (*sessions)->Fill(id, r, EncodeWithModel(r));
//   auto kv = (*sessions)->Read(id);  // [layer][k|v][kv_head][length][head_dim]
//
// Thread safety: a SessionClient may be shared by threads.
#ifndef ROPEKV_CLIENTS_CPP_SESSION_CLIENT_H_
#define ROPEKV_CLIENTS_CPP_SESSION_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "clients/cpp/client.h"
#include "ropekv/v1/session.grpc.pb.h"

namespace ropekv::client {

// Edit ops (coordinates of the document before the Edit call; see v1::EditRequest).
v1::EditOp InsertOp(int64_t at, std::vector<int32_t> tokens);
v1::EditOp DeleteOp(int64_t start, int64_t end);
v1::EditOp ReplaceOp(int64_t start, int64_t end, std::vector<int32_t> tokens);
v1::TokenRange Range(int64_t start, int64_t end);

struct OpenArgs {
  std::string model;  // id or name
  std::vector<int32_t> tokens;
  int64_t base_position = 0;          // position of token 0
  std::optional<int64_t> rotated_at;  // position token 0's key was rotated at (default: base)
  int64_t rope_table = 0;
  // Take the KV from the longest cached prefix of `tokens` (Put blocks of `tenant`); send no bytes.
  bool from_cache = false;
  std::string tenant;
};

struct EditArgs {
  std::vector<v1::TokenRange> stale;  // coordinates after the edit
  uint32_t repair_tokens = 0;         // budgeted repair (see v1::EditRequest)
};

struct FillArgs {
  std::optional<int64_t> rotated_at;  // default: the range's position
  std::optional<int64_t> rope_table;  // default: the session's table
  std::optional<uint64_t> version;    // the version the range refers to
};

struct ReadResult {
  v1::ReadHeader header;
  std::vector<uint8_t> data;  // [layer][k|v][kv_head][range size][head_dim]
};

class SessionClient {
 public:
  using Options = Client::Options;

  // Creates a channel (connects lazily). INVALID_ARGUMENT for an empty address.
  static absl::StatusOr<std::unique_ptr<SessionClient>> Connect(Options options);

  // Opens a session. `block_bytes`: the document's KV in block layout (ceil(n / block_tokens)
  // blocks, the last padded), empty with from_cache. The server's verdict otherwise (NOT_FOUND
  // model, INVALID_ARGUMENT size, RESOURCE_EXHAUSTED capacity).
  absl::StatusOr<v1::OpenSessionResponse> Open(const OpenArgs& args,
                                               absl::Span<const uint8_t> block_bytes);

  // Applies ops left to right with cumulative Δ; the response lists the ranges to Fill.
  absl::StatusOr<v1::EditResponse> Edit(const std::string& session_id,
                                        const std::vector<v1::EditOp>& ops,
                                        const EditArgs& args = {});

  // Stores the KV of `range` (range layout [layer][k|v][kv_head][n][head_dim]).
  absl::StatusOr<v1::FillResponse> Fill(const std::string& session_id, const v1::TokenRange& range,
                                        absl::Span<const uint8_t> kv, const FillArgs& args = {});

  // The KV of `range` (nullopt: the whole document), every key at its position.
  // FAILED_PRECONDITION when the range has tokens awaiting Fill.
  absl::StatusOr<ReadResult> Read(const std::string& session_id,
                                  std::optional<v1::TokenRange> range = std::nullopt,
                                  std::optional<int64_t> rope_table = std::nullopt);
  // The same into a caller's buffer; OUT_OF_RANGE when `dst` is too small.
  absl::StatusOr<v1::ReadHeader> ReadInto(const std::string& session_id,
                                          std::optional<v1::TokenRange> range,
                                          absl::Span<uint8_t> dst);

  absl::StatusOr<v1::SnapshotResponse> Snapshot(const std::string& session_id);
  absl::StatusOr<v1::SessionInfoResponse> Info(const std::string& session_id);
  absl::Status Close(const std::string& session_id);

  v1::Sessions::Stub* stub() { return stub_.get(); }

 private:
  SessionClient(Options options, std::shared_ptr<grpc::Channel> channel);
  void Prepare(grpc::ClientContext* ctx) const;
  // Streams header + bytes in chunks through `writer`, then finishes.
  template <typename Request>
  absl::Status Send(grpc::ClientWriter<Request>* writer, Request* first,
                    absl::Span<const uint8_t> bytes);

  Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Sessions::Stub> stub_;
};

}  // namespace ropekv::client

#endif  // ROPEKV_CLIENTS_CPP_SESSION_CLIENT_H_
