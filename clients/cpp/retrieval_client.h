// The C++ client of ropekvd's Retrieval service (query-aware top-k selection; docs/retrieval.md):
// select the cached tokens that matter to a layer's queries, over a cached prefix or a session,
// optionally with their K/V; keep the selection and gather the same tokens at other layers.
//
//   auto retrieval = RetrievalClient::Connect({.address = "127.0.0.1:50051"});
//   SelectArgs a;
//   a.model = "llama"; a.tokens = prompt;               // or a.session_id = id
//   a.layer = 0; a.query_heads = 32; a.queries = F32Bytes(q);  // [32][head_dim] post-RoPE
//   a.k = 256; a.n_sink = 4; a.n_local = 64; a.gather = true; a.keep = true;
//   auto sel = (*retrieval)->Select(a);    // rows of token indices + K/V of layer 0
//   auto kv = (*retrieval)->Gather(sel->header.selection_id(), {1, 2, 3});
//
// Thread safety: a RetrievalClient may be shared by threads.
#ifndef ROPEKV_CLIENTS_CPP_RETRIEVAL_CLIENT_H_
#define ROPEKV_CLIENTS_CPP_RETRIEVAL_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "clients/cpp/client.h"
#include "ropekv/v1/retrieval.grpc.pb.h"

namespace ropekv::client {

struct SelectArgs {
  // The source: a session when session_id is set, else the longest cached prefix of `tokens`, or
  // (last_block set, tokens empty) the prefix that ends at that block: the 32-byte hash a Put or
  // Lookup returned for its last block.
  std::string model;  // id or name
  std::string tenant;
  std::vector<int32_t> tokens;
  std::string last_block;
  std::string session_id;

  int32_t layer = 0;
  uint32_t query_heads = 0;
  std::string queries;  // [query_heads][head_dim] post-RoPE, little-endian query_dtype
  v1::DType query_dtype = v1::DTYPE_F32;
  int64_t k = 0;
  v1::SelectMode mode = v1::SELECT_MODE_EXACT;
  v1::GqaReduction reduction = v1::GQA_REDUCTION_MAX;
  int64_t n_sink = 0;
  int64_t n_local = 0;
  int64_t candidate_tokens = 0;  // BOUND_THEN_EXACT: 0 = 4 * k
  float softmax_scale = 0.0f;    // captured mass; 0 = 1 / sqrt(head_dim)
  bool want_scores = false;
  bool want_mass = false;
  bool gather = false;  // the selected tokens' K/V at `layer`
  bool keep = false;    // keep the selection for Gather
  // Rows as header.packed() (little-endian int32 / float32 arrays, [rows][capacity]) instead of
  // header.rows(): no per-element decoding on either side.
  bool packed_rows = false;
};

// The bytes of fp32 queries (little-endian, as the wire wants them).
std::string F32Bytes(absl::Span<const float> values);

// The request SelectArgs describe.
v1::SelectRequest ToRequest(const SelectArgs& args);

struct SelectResult {
  v1::SelectHeader header;
  // With gather: [k|v][rows][capacity][head_dim] in header.dtype(), zeros after each row's count.
  std::vector<uint8_t> gathered;
};

// One item of a SelectBatch: its own status and, when that is OK, its selection.
struct BatchSelection {
  absl::Status status;
  v1::SelectHeader header;
};

struct GatherResult {
  v1::GatherHeader header;
  std::vector<uint8_t> data;  // [layer][k|v][rows][capacity][head_dim] in header.dtype()
};

class RetrievalClient {
 public:
  using Options = Client::Options;

  // Creates a channel (connects lazily). INVALID_ARGUMENT for an empty address.
  static absl::StatusOr<std::unique_ptr<RetrievalClient>> Connect(Options options);

  // Selects (see v1::SelectRequest). The server's verdict: NOT_FOUND for an unknown model or
  // session or an uncached prompt; INVALID_ARGUMENT for a bad layer, k, size or NaN; DATA_LOSS
  // when the stream carries another byte count than the header says.
  absl::StatusOr<SelectResult> Select(const SelectArgs& args);
  absl::StatusOr<SelectResult> Select(const v1::SelectRequest& request);

  // Selects for every item in one round trip (see v1::SelectBatchRequest): one BatchSelection an
  // item, in order, each with the status that item's Select would have had. The call's own
  // error: INVALID_ARGUMENT for no items, more than 1024 or an item with gather;
  // RESOURCE_EXHAUSTED for an answer over the daemon's message size.
  absl::StatusOr<std::vector<BatchSelection>> SelectBatch(absl::Span<const SelectArgs> items);
  // The K/V of a kept selection's tokens at `layers`. NOT_FOUND for an unknown or expired
  // selection, or when its prefix blocks were evicted; INVALID_ARGUMENT for a layer out of range.
  absl::StatusOr<GatherResult> Gather(const std::string& selection_id,
                                      const std::vector<int32_t>& layers);

  // Drops a kept selection. NOT_FOUND when unknown.
  absl::Status Release(const std::string& selection_id);

  absl::StatusOr<v1::RetrievalStatsResponse> Stats();

  v1::Retrieval::Stub* stub() { return stub_.get(); }

 private:
  RetrievalClient(Options options, std::shared_ptr<grpc::Channel> channel);
  void Prepare(grpc::ClientContext* ctx) const;

  Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Retrieval::Stub> stub_;
};

}  // namespace ropekv::client

#endif  // ROPEKV_CLIENTS_CPP_RETRIEVAL_CLIENT_H_
