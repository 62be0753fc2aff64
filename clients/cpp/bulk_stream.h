// Reading a server-streamed bulk response (Get, Compose, session Read): the header from the first
// message, then every message's bytes handed to a sink in order. Shared by the C++ clients.
#ifndef ROPEKV_CLIENTS_CPP_BULK_STREAM_H_
#define ROPEKV_CLIENTS_CPP_BULK_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace ropekv::client {

absl::Status FromGrpc(const grpc::Status& status);

// Reads the stream to its end. `sink(header, offset, bytes)` receives the bytes; an error from it
// cancels the call and is returned. `expected(header)` gives the byte count the header promises
// (nullopt: unchecked); a stream carrying another count is DATA_LOSS.
template <typename Response, typename Sink, typename Expected>
auto ReadBulkStream(grpc::ClientReader<Response>* reader, grpc::ClientContext* ctx, Sink sink,
                    Expected expected)
    -> absl::StatusOr<std::decay_t<decltype(std::declval<Response>().header())>> {
  Response msg;
  std::decay_t<decltype(msg.header())> header;
  bool have_header = false;
  uint64_t offset = 0;
  absl::Status sink_status;
  while (reader->Read(&msg)) {
    if (msg.has_header()) {
      header = msg.header();
      have_header = true;
    }
    if (!msg.data().empty() && sink_status.ok()) {
      sink_status = sink(header, offset, msg.data());
      if (!sink_status.ok()) ctx->TryCancel();
    }
    offset += msg.data().size();
  }
  absl::Status s = FromGrpc(reader->Finish());
  if (!sink_status.ok()) return sink_status;
  if (!s.ok()) return s;
  if (!have_header) return absl::InternalError("stream ended without a header");
  if (std::optional<uint64_t> want = expected(header); want && *want != offset) {
    return absl::DataLossError(
        absl::StrCat("stream carried ", offset, " bytes, its header promised ", *want));
  }
  return header;
}

}  // namespace ropekv::client

#endif  // ROPEKV_CLIENTS_CPP_BULK_STREAM_H_
