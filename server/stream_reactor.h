// Server-streaming of bulk bytes: a header in the first message, then the bytes of a ByteSource
// cut into chunks below the maximum message size. Get, Compose, Select, Gather, session Read and
// the modules' Compose calls differ only in their header and their source, so they share this
// reactor. The bytes go out without a copy: each message is written as its protobuf wire format
// by hand, the header serialised and the `data` field's bytes handed to gRPC as slices of the
// source's own memory (RESULTS run 18).
#ifndef ROPEKV_SERVER_STREAM_REACTOR_H_
#define ROPEKV_SERVER_STREAM_REACTOR_H_

#include <google/protobuf/descriptor.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/convert.h"
#include "server/work_pool.h"

namespace ropekv {

// The bytes of a response, one unit (a block, a layer) at a time, in order.
class ByteSource {
 public:
  virtual ~ByteSource() = default;
  virtual size_t units() const = 0;
  // The bytes of unit i: a view of bytes the source holds for as long as it lives, or bytes it
  // produced into *staging (an empty string each call; the caller keeps it).
  virtual absl::StatusOr<absl::string_view> Unit(size_t i, std::string* staging) = 0;
};

// One message of a bulk stream as it goes on the wire: `head` (the message's other fields,
// serialised), then its `data` field as slices of memory others own.
struct BulkMessage {
  std::string head;
  uint32_t data_tag = 0;  // the data field's tag (number << 3 | length-delimited)
  std::vector<grpc::Slice> data;
  size_t data_bytes = 0;
};

// A source over anything that writes itself a layer at a time (ComposedPrompt, SessionReader):
// T has layers(), layer_bytes() and WriteLayer(int, void*).
template <typename T>
class LayerSource final : public ByteSource {
 public:
  explicit LayerSource(T layers) : layers_(std::move(layers)) {}
  size_t units() const override { return static_cast<size_t>(layers_.layers()); }
  absl::StatusOr<absl::string_view> Unit(size_t i, std::string* staging) override {
    staging->resize(layers_.layer_bytes());
    if (absl::Status s = layers_.WriteLayer(static_cast<int>(i), staging->data()); !s.ok()) {
      return s;
    }
    return absl::string_view(*staging);
  }

 private:
  T layers_;
};

// A unary call finished with the status `work` returns, `work` run on `pool` (not on gRPC's
// callback thread: it may wait on a disk or a GPU).
inline grpc::ServerUnaryReactor* FinishOnPool(WorkPool& pool, grpc::CallbackServerContext* ctx,
                                              std::function<absl::Status()> work) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  pool.Submit([reactor, work = std::move(work)] { reactor->Finish(ToGrpc(work())); });
  return reactor;
}

// The chunk size of a call: the client's wish, capped by the server's.
inline uint64_t ChunkBytes(uint64_t requested, uint64_t server_chunk) {
  return requested > 0 ? std::min(requested, server_chunk) : server_chunk;
}

// Streams `first` (holding the header) and then the source's bytes. Response is a message with
// `header` and `data` fields, sent as BulkMessages. Deletes itself when done.
template <typename Response>
class ChunkedWriteReactor final : public grpc::ServerWriteReactor<BulkMessage> {
 public:
  struct Prepared {
    Response first;  // holds the header
    std::unique_ptr<ByteSource> source;
  };

  // Ends the call at once with `error`.
  explicit ChunkedWriteReactor(const absl::Status& error) { this->Finish(ToGrpc(error)); }

  // Streams on the reactor's thread: for sources whose units are cheap to produce.
  ChunkedWriteReactor(std::unique_ptr<ByteSource> source, Response first, uint64_t chunk_bytes)
      : source_(std::move(source)), first_(std::move(first)), chunk_(chunk_bytes) {
    NextWrite();
  }

  // Runs `prepare` and the production of every chunk on `pool` (borrowed; outlives the call):
  // for work that must not block a reactor (scoring every key of a layer, re-reading a layer).
  ChunkedWriteReactor(WorkPool* pool, uint64_t chunk_bytes,
                      std::function<absl::StatusOr<Prepared>()> prepare)
      : pool_(pool), chunk_(chunk_bytes) {
    pool_->Submit([this, prepare = std::move(prepare)] {
      absl::StatusOr<Prepared> p = prepare();
      if (!p.ok()) return this->Finish(ToGrpc(p.status()));
      first_ = std::move(p->first);
      source_ = std::move(p->source);
      NextWrite();
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return this->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
    if (pool_ != nullptr) {
      pool_->Submit([this] { NextWrite(); });
    } else {
      NextWrite();
    }
  }

  void OnDone() override { delete this; }

 private:
  // Its last act is StartWrite or Finish (after which `this` may be gone).
  void NextWrite() {
    // msg_ is free again: gRPC took its slices with the previous write. Only the first message
    // has a header.
    msg_.data.clear();
    msg_.data_bytes = 0;
    if (started_) {
      if (unit_ >= source_->units() && pending_.empty()) return this->Finish(grpc::Status::OK);
      msg_.head.clear();
    } else {
      msg_.head = first_.SerializeAsString();
      static const uint32_t tag =
          (static_cast<uint32_t>(Response::descriptor()->FindFieldByName("data")->number()) << 3) |
          2u;
      msg_.data_tag = tag;
      started_ = true;
    }
    while (msg_.data_bytes < chunk_) {
      if (pending_.empty()) {
        if (unit_ >= source_->units()) break;
        std::string staging;
        auto unit = source_->Unit(unit_++, &staging);
        if (!unit.ok()) return this->Finish(ToGrpc(unit.status()));
        pending_ = *unit;
        const char* begin = staging.data();
        if (pending_.data() >= begin && pending_.data() < begin + staging.size()) {
          // Bytes of the staging string: theirs is now the slices' to keep. A call holds at most
          // two such units: this one and, until gRPC has sent its tail, the one before.
          const size_t at = static_cast<size_t>(pending_.data() - begin);
          auto owned = std::make_shared<std::string>(std::move(staging));
          pending_ = absl::string_view(*owned).substr(at, pending_.size());
          owner_ = std::move(owned);
        } else {
          owner_ = source_;  // views of the source's bytes: the slices keep it alive
        }
        continue;
      }
      const size_t n = std::min<uint64_t>(pending_.size(), chunk_ - msg_.data_bytes);
      msg_.data.push_back(SliceOf(pending_.substr(0, n), owner_));
      msg_.data_bytes += n;
      pending_.remove_prefix(n);
    }
    this->StartWrite(&msg_);
  }

  // A slice of `bytes` that keeps `owner` alive until gRPC lets go of it.
  static grpc::Slice SliceOf(absl::string_view bytes, const std::shared_ptr<const void>& owner) {
    return grpc::Slice(
        const_cast<char*>(bytes.data()), bytes.size(),
        [](void* keep) { delete static_cast<std::shared_ptr<const void>*>(keep); },
        new std::shared_ptr<const void>(owner));
  }

  WorkPool* pool_ = nullptr;
  std::shared_ptr<ByteSource> source_;
  Response first_;
  uint64_t chunk_ = 0;
  BulkMessage msg_;
  bool started_ = false;
  size_t unit_ = 0;
  absl::string_view pending_;  // the rest of the current unit, owned by owner_
  std::shared_ptr<const void> owner_;
};

// A service whose server-streaming bulk methods send BulkMessages: Base is a generated
// CallbackService; ServeBulk puts a handler of the method's request and BulkMessage in the place
// of the generated one (the wire format is the same).
template <typename Base>
class WithBulkStreams : public Base {
 protected:
  // `fn`, a member of the derived service, serves `method` of the service named `service`.
  template <typename Derived, typename Request>
  void ServeBulk(const char* service, const char* method,
                 grpc::ServerWriteReactor<BulkMessage>* (Derived::*fn)(grpc::CallbackServerContext*,
                                                                       const Request*)) {
    const google::protobuf::ServiceDescriptor* sd =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
    const google::protobuf::MethodDescriptor* md =
        sd == nullptr ? nullptr : sd->FindMethodByName(method);
    if (md == nullptr || md->input_type() != Request::descriptor() || md->client_streaming() ||
        !md->server_streaming()) {
      std::fprintf(stderr, "ropekvd: %s.%s is not a server-streaming method of this request\n",
                   service, method);
      std::abort();  // a programming error, at start-up
    }
    this->MarkMethodCallback(
        md->index(), new grpc::internal::CallbackServerStreamingHandler<Request, BulkMessage>(
                         [this, fn](grpc::CallbackServerContext* ctx, const Request* req) {
                           return (static_cast<Derived*>(this)->*fn)(ctx, req);
                         }));
  }
};

}  // namespace ropekv

namespace grpc {

// A BulkMessage's bytes are its head, the data field's tag and length, and the data slices: no
// byte of the data is copied. The server never reads one.
template <>
class SerializationTraits<ropekv::BulkMessage, void> {
 public:
  static Status Serialize(const ropekv::BulkMessage& m, ByteBuffer* bb, bool* own_buffer) {
    std::string prefix = m.head;
    auto varint = [&prefix](uint64_t v) {
      for (; v >= 0x80; v >>= 7) prefix.push_back(static_cast<char>((v & 0x7f) | 0x80));
      prefix.push_back(static_cast<char>(v));
    };
    if (m.data_bytes > 0) {
      varint(m.data_tag);
      varint(m.data_bytes);
    }
    std::vector<Slice> slices;
    slices.reserve(m.data.size() + 1);
    slices.emplace_back(prefix);
    slices.insert(slices.end(), m.data.begin(), m.data.end());
    ByteBuffer out(slices.data(), slices.size());
    bb->Swap(&out);
    *own_buffer = true;
    return Status::OK;
  }
  static Status Deserialize(ByteBuffer*, ropekv::BulkMessage*) {
    return Status(StatusCode::UNIMPLEMENTED, "a BulkMessage is only sent");
  }
};

}  // namespace grpc

#endif  // ROPEKV_SERVER_STREAM_REACTOR_H_
