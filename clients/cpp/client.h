// The C++ client of ropekvd: typed calls over the gRPC stub. KV travels as spans of bytes with a
// shape; bulk bytes are chunked below the maximum message size.
//
// Thread safety: a Client may be shared by threads (gRPC channels and stubs are thread-safe).
#ifndef ROPEKV_CLIENTS_CPP_CLIENT_H_
#define ROPEKV_CLIENTS_CPP_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "ropekv/v1/kvcache.grpc.pb.h"

namespace ropekv::client {

// Shape of KV bytes: `blocks` blocks, each [layers][k|v][kv_heads][block_tokens][head_dim] of
// `dtype`.
struct KvShape {
  uint32_t blocks = 0;
  uint32_t layers = 0;
  uint32_t kv_heads = 0;
  uint32_t block_tokens = 0;
  uint32_t head_dim = 0;
  v1::DType dtype = v1::DTYPE_BF16;

  uint64_t BlockBytes() const;
  uint64_t Bytes() const { return BlockBytes() * blocks; }
  // The shape of n blocks of a model.
  static KvShape Of(const v1::ModelSpec& spec, uint32_t blocks);
};

// KV bytes with their shape (borrowed).
struct KvView {
  absl::Span<const uint8_t> bytes;
  KvShape shape;
};

struct PutArgs {
  std::string model;  // id or name
  std::string tenant;
  std::vector<int32_t> tokens;  // shape.blocks * block_tokens of them
  std::string parent;           // raw 32-byte hash of the block before; empty = start
  std::optional<int64_t> rotated_at;
  bool pin = false;
  // A position-independent segment: any token count, ceil(tokens / block_tokens) blocks (the last
  // padded), no parent.
  bool segment = false;
};

struct GetArgs {
  std::string model;
  std::string tenant;
  std::vector<int32_t> tokens;
  uint32_t max_blocks = 0;  // 0 = all matched (from first_block on)
  // Blocks [first_block, first_block + max_blocks) of the longest cached prefix (none when it is
  // shorter). target_position stays that of the prompt's first token.
  uint32_t first_block = 0;
  std::optional<int64_t> target_position;
  // Connections the bytes come over (at most kMaxStreams, and a block each). With more than one,
  // a Lookup sizes the prefix, then as many block ranges of it are read at once, each over a TCP
  // connection of its own, made on first use and kept by the Client (one gRPC stream
  // carries ~2-2.6 GB/s on a 16-core host). Blocks evicted between the Lookup and the reads end
  // the answer where a Get would have ended it; blocks cached meanwhile are not in it.
  uint32_t streams = 1;
  static constexpr uint32_t kMaxStreams = 64;
};

struct GetResult {
  v1::GetHeader header;
  std::vector<uint8_t> data;  // header.blocks() * header.block_bytes() bytes
};

struct ComposeResult {
  v1::ComposeHeader header;
  // [layer][k|v][kv_head][header.total_tokens()][head_dim] of the model's dtype.
  std::vector<uint8_t> data;
};

class Client {
 public:
  struct Options {
    std::string address = "127.0.0.1:50051";      // HOST:PORT
    uint64_t max_message_bytes = 64ull << 20;     // gRPC receive/send limit of the channel
    uint64_t chunk_bytes = 4ull << 20;            // bytes per streamed Put message
    absl::Duration timeout = absl::Seconds(120);  // deadline of each call
  };

  // Creates a channel (connects lazily). INVALID_ARGUMENT for an empty address.
  static absl::StatusOr<std::unique_ptr<Client>> Connect(Options options);

  // grpc.health.v1 Check of the whole server: OK when SERVING, UNAVAILABLE otherwise.
  absl::Status Health();

  // Registers a model; returns its id (the same for the same spec, in every process).
  absl::StatusOr<v1::RegisterModelResponse> RegisterModel(const v1::ModelSpec& spec,
                                                          const std::string& name = "");
  absl::StatusOr<std::vector<v1::ModelInfo>> ListModels();

  // Stores KV for args.tokens. INVALID_ARGUMENT locally when the bytes do not match the shape or
  // the token count; otherwise the server's verdict.
  absl::StatusOr<v1::PutResponse> Put(const PutArgs& args, const KvView& kv);

  // The longest cached prefix of `tokens`, or with `segment` whether the segment of exactly
  // these tokens is cached.
  absl::StatusOr<v1::LookupResponse> Lookup(const std::string& model, const std::string& tenant,
                                            absl::Span<const int32_t> tokens, bool segment = false);

  // The KV of a prompt assembled from cached parts, each at its position (re-rotated as needed).
  absl::StatusOr<ComposeResult> Compose(const std::string& model, const std::string& tenant,
                                        const std::vector<v1::ComposePart>& parts);

  // Fetches the longest cached prefix of args.tokens.
  absl::StatusOr<GetResult> Get(const GetArgs& args);
  // The same, into a caller's buffer; OUT_OF_RANGE when `dst` is too small (the message says how
  // many bytes are needed; with args.streams > 1 nothing is written then).
  absl::StatusOr<v1::GetHeader> GetInto(const GetArgs& args, absl::Span<uint8_t> dst);

  absl::StatusOr<v1::StatsResponse> Stats();
  absl::StatusOr<uint32_t> Evict(const std::string& model, const std::string& tenant,
                                 absl::Span<const int32_t> tokens);
  absl::StatusOr<uint32_t> Pin(const std::string& model, const std::string& tenant,
                               absl::Span<const int32_t> tokens, bool pin);

  v1::KVCache::Stub* stub() { return stub_.get(); }

 private:
  // The bytes a Get answer needs -> where they go (at least that many), or an error.
  using Reserve = absl::FunctionRef<absl::StatusOr<uint8_t*>(uint64_t bytes)>;

  explicit Client(Options options, std::shared_ptr<grpc::Channel> channel);
  void Prepare(grpc::ClientContext* ctx) const;
  // A Get into what `reserve` gives.
  absl::StatusOr<v1::GetHeader> GetAny(const GetArgs& args, Reserve reserve);
  // One Get stream over `channel` (one other than channel_ waits for its connection).
  absl::StatusOr<v1::GetHeader> GetStream(grpc::ChannelInterface* channel, const GetArgs& args,
                                          Reserve reserve);
  // A Get of args.streams ranges at once.
  absl::StatusOr<v1::GetHeader> GetParallel(const GetArgs& args, Reserve reserve);
  // Connection i of a parallel Get: channel_ for 0, others made on first use.
  std::shared_ptr<grpc::Channel> StreamChannel(size_t i) ABSL_LOCKS_EXCLUDED(channels_mu_);

  Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  absl::Mutex channels_mu_;
  std::vector<std::shared_ptr<grpc::Channel>> stream_channels_ ABSL_GUARDED_BY(channels_mu_);
  std::unique_ptr<v1::KVCache::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// grpc::Status -> absl::Status (same canonical codes).
absl::Status FromGrpc(const grpc::Status& status);

}  // namespace ropekv::client

#endif  // ROPEKV_CLIENTS_CPP_CLIENT_H_
