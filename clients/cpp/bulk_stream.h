// What every C++ client of ropekvd shares: the channel, call deadlines, sending bulk bytes in
// chunks (client-streaming Put, Fill, PutModule...) and reading a server-streamed bulk response
// (Get, Compose, session Read): the header from the first message, then every message's bytes
// handed to a sink in order.
#ifndef ROPEKV_CLIENTS_CPP_BULK_STREAM_H_
#define ROPEKV_CLIENTS_CPP_BULK_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

namespace ropekv::client {

absl::Status FromGrpc(const grpc::Status& status);

// An insecure channel to HOST:PORT with the given message size limit both ways, on a TCP
// connection of its own. gRPC otherwise shares one connection among all channels of a process
// with the same target and arguments (its global subchannel pool), so that clients made to move
// bytes in parallel would all queue on one HTTP/2 stream of bytes (RESULTS run 18: four clients'
// Gets shared one connection).
inline std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                                  uint64_t max_message_bytes) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(static_cast<int>(max_message_bytes));
  args.SetMaxSendMessageSize(static_cast<int>(max_message_bytes));
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

// Sets the call's deadline `timeout` from now.
inline void SetDeadline(grpc::ClientContext* ctx, absl::Duration timeout) {
  ctx->set_deadline(std::chrono::system_clock::now() +
                    std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout)));
}

// Sends `bytes` in messages of at most `chunk_bytes`; the first carries `first`'s header. Closes
// the stream and returns the call's status.
template <typename Request>
absl::Status SendChunked(grpc::ClientWriter<Request>* writer, Request* first,
                         absl::Span<const uint8_t> bytes, uint64_t chunk_bytes) {
  Request& req = *first;
  size_t offset = 0;
  do {
    const size_t n = std::min<size_t>(chunk_bytes, bytes.size() - offset);
    req.set_data(bytes.data() + offset, n);
    offset += n;
    if (!writer->Write(req)) break;  // the server ended the call: Finish says why
    req.clear_header();
  } while (offset < bytes.size());
  writer->WritesDone();
  return FromGrpc(writer->Finish());
}

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
