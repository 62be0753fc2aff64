// What every C++ client of ropekvd shares: the channel, call deadlines, sending bulk bytes in
// chunks (client-streaming Put, Fill, PutModule...) and reading a server-streamed bulk response
// (Get, Compose, session Read): the header from the first message, then every message's bytes
// handed to a sink in order.
#ifndef ROPEKV_CLIENTS_CPP_BULK_STREAM_H_
#define ROPEKV_CLIENTS_CPP_BULK_STREAM_H_

#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/rpc_method.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/sync_stream.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
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

// The protobuf wire format of one message, read off its slices without copying them: the fields
// in order, the length-delimited ones as pieces of the slices they span.
class WireReader {
 public:
  explicit WireReader(const grpc::ByteBuffer& message) { (void)message.Dump(&slices_); }
  bool done() {
    while (i_ < slices_.size() && at_ == slices_[i_].size()) next();
    return i_ == slices_.size();
  }
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (done()) return false;
      const uint8_t b = slices_[i_].begin()[at_++];
      *v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if (b < 0x80) return true;
    }
    return false;
  }
  // Hands the next n bytes to piece(absl::string_view) in order; false if fewer are left.
  template <typename Piece>
  bool Take(uint64_t n, Piece piece) {
    while (n > 0) {
      if (done()) return false;
      const size_t k = std::min<uint64_t>(n, slices_[i_].size() - at_);
      piece(absl::string_view(reinterpret_cast<const char*>(slices_[i_].begin()) + at_, k));
      at_ += k;
      n -= k;
    }
    return true;
  }

 private:
  void next() {
    ++i_;
    at_ = 0;
  }
  std::vector<grpc::Slice> slices_;
  size_t i_ = 0, at_ = 0;
};

// Calls the server-streaming method `method` of `service` with `request` and reads the stream
// to its end. Response is the method's message, with a `header` (first message) and a `data`
// field. `sink(header, offset, bytes)` receives the data as pieces of the received slices (no
// copy into a message); an error from it cancels the call and is returned. `expected(header)`
// gives the byte count the header promises (nullopt: unchecked); a stream carrying another count
// is DATA_LOSS.
template <typename Response, typename Request, typename Sink, typename Expected>
auto ReadBulkStream(grpc::ChannelInterface* channel, const char* service, const char* method,
                    grpc::ClientContext* ctx, const Request& request, Sink sink, Expected expected)
    -> absl::StatusOr<std::decay_t<decltype(std::declval<Response>().header())>> {
  using Header = std::decay_t<decltype(std::declval<Response>().header())>;
  static const uint64_t header_field = Response::descriptor()->FindFieldByName("header")->number();
  static const uint64_t data_field = Response::descriptor()->FindFieldByName("data")->number();
  const std::string path = absl::StrCat("/", service, "/", method);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(
          channel,
          grpc::internal::RpcMethod(path.c_str(), grpc::internal::RpcMethod::SERVER_STREAMING), ctx,
          request));
  grpc::ByteBuffer msg;
  Header header;
  bool have_header = false;
  uint64_t offset = 0;
  absl::Status status;  // the first error of the sink or of a message's format
  auto fail = [&](absl::Status s) {
    if (status.ok()) {
      status = std::move(s);
      ctx->TryCancel();
    }
  };
  while (reader->Read(&msg)) {
    WireReader in(msg);
    while (status.ok() && !in.done()) {
      uint64_t tag = 0, len = 0;
      bool ok = in.Varint(&tag);
      const uint64_t field = tag >> 3, type = tag & 7;
      if (ok && type == 2) {
        ok = in.Varint(&len);
        if (ok && field == data_field) {
          ok = in.Take(len, [&](absl::string_view piece) {
            if (status.ok()) {
              if (absl::Status s = sink(header, offset, piece); !s.ok()) fail(std::move(s));
            }
            offset += piece.size();
          });
        } else if (ok) {
          std::string bytes;
          ok = in.Take(len,
                       [&](absl::string_view piece) { bytes.append(piece.data(), piece.size()); });
          if (ok && field == header_field) {
            ok = header.ParseFromString(bytes);
            have_header = true;
          }
        }
      } else if (ok && (type == 0 || type == 1 || type == 5)) {
        uint64_t skip = 0;
        ok = type == 0 ? in.Varint(&skip) : in.Take(type == 1 ? 8 : 4, [](absl::string_view) {});
      } else {
        ok = false;
      }
      if (!ok)
        fail(absl::DataLossError(
            absl::StrCat("a ", method, " message is not a ", Response::descriptor()->full_name())));
    }
  }
  absl::Status s = FromGrpc(reader->Finish());
  if (!status.ok()) return status;
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
