// Server-streaming of bulk bytes: a header in the first message, then the bytes of a ByteSource
// cut into chunks below the maximum message size. Get, Compose and session Read differ only in
// their header and their source, so they share this reactor.
#ifndef ROPEKV_SERVER_STREAM_REACTOR_H_
#define ROPEKV_SERVER_STREAM_REACTOR_H_

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <string>

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
  // The bytes of unit i: a view of bytes the source holds, or bytes it produced into *staging.
  // The view stays valid until the next call.
  virtual absl::StatusOr<absl::string_view> Unit(size_t i, std::string* staging) = 0;
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
// `header` and `data` fields. Deletes itself when done.
template <typename Response>
class ChunkedWriteReactor final : public grpc::ServerWriteReactor<Response> {
 public:
  struct Prepared {
    Response first;  // holds the header
    std::unique_ptr<ByteSource> source;
  };

  // Ends the call at once with `error`.
  explicit ChunkedWriteReactor(const absl::Status& error) { this->Finish(ToGrpc(error)); }

  // Streams on the reactor's thread: for sources whose units are cheap to produce.
  ChunkedWriteReactor(std::unique_ptr<ByteSource> source, Response first, uint64_t chunk_bytes)
      : source_(std::move(source)), resp_(std::move(first)), chunk_(chunk_bytes) {
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
      resp_ = std::move(p->first);
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
    // resp_ is free again: the previous write (if any) is done. Only the first has a header.
    if (!first_) {
      if (unit_ >= source_->units() && pending_.empty()) return this->Finish(grpc::Status::OK);
      resp_.clear_header();
    }
    first_ = false;
    std::string* data = resp_.mutable_data();
    data->clear();
    while (data->size() < chunk_) {
      if (pending_.empty()) {
        if (unit_ >= source_->units()) break;
        auto unit = source_->Unit(unit_++, &staging_);
        if (!unit.ok()) return this->Finish(ToGrpc(unit.status()));
        pending_ = *unit;
        continue;
      }
      const size_t n = std::min<uint64_t>(pending_.size(), chunk_ - data->size());
      data->append(pending_.data(), n);
      pending_.remove_prefix(n);
    }
    this->StartWrite(&resp_);
  }

  WorkPool* pool_ = nullptr;
  std::unique_ptr<ByteSource> source_;
  Response resp_;
  uint64_t chunk_ = 0;
  size_t unit_ = 0;
  absl::string_view pending_;  // the rest of the current unit
  std::string staging_;
  bool first_ = true;
};

}  // namespace ropekv

#endif  // ROPEKV_SERVER_STREAM_REACTOR_H_
