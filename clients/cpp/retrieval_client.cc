#include "clients/cpp/retrieval_client.h"

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "clients/cpp/bulk_stream.h"

namespace ropekv::client {

std::string F32Bytes(absl::Span<const float> values) {
  // The daemon runs on little-endian hosts only (as every KV byte on the wire is little-endian).
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
}

v1::SelectRequest ToRequest(const SelectArgs& a) {
  v1::SelectRequest req;
  if (!a.session_id.empty()) {
    req.mutable_source()->set_session_id(a.session_id);
  } else {
    v1::PrefixSource* p = req.mutable_source()->mutable_prefix();
    p->set_model(a.model);
    p->set_tenant(a.tenant);
    p->mutable_tokens()->Add(a.tokens.begin(), a.tokens.end());
    p->set_last_block(a.last_block);
  }
  req.set_layer(a.layer);
  req.set_query_heads(a.query_heads);
  req.set_queries(a.queries);
  req.set_query_dtype(a.query_dtype);
  req.set_k(a.k);
  req.set_mode(a.mode);
  req.set_reduction(a.reduction);
  req.set_n_sink(a.n_sink);
  req.set_n_local(a.n_local);
  req.set_candidate_tokens(a.candidate_tokens);
  req.set_softmax_scale(a.softmax_scale);
  req.set_want_scores(a.want_scores);
  req.set_want_mass(a.want_mass);
  req.set_gather(a.gather);
  req.set_keep(a.keep);
  req.set_packed_rows(a.packed_rows);
  return req;
}

absl::StatusOr<std::unique_ptr<RetrievalClient>> RetrievalClient::Connect(Options options) {
  if (options.address.empty()) return absl::InvalidArgumentError("empty server address");
  auto channel = MakeChannel(options.address, options.max_message_bytes);
  return std::unique_ptr<RetrievalClient>(
      new RetrievalClient(std::move(options), std::move(channel)));
}

RetrievalClient::RetrievalClient(Options options, std::shared_ptr<grpc::Channel> channel)
    : options_(std::move(options)),
      channel_(std::move(channel)),
      stub_(v1::Retrieval::NewStub(channel_)) {}

void RetrievalClient::Prepare(grpc::ClientContext* ctx) const {
  SetDeadline(ctx, options_.timeout);
}

absl::StatusOr<SelectResult> RetrievalClient::Select(const SelectArgs& args) {
  return Select(ToRequest(args));
}

absl::StatusOr<SelectResult> RetrievalClient::Select(const v1::SelectRequest& request) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  SelectResult result;
  auto header = ReadBulkStream<v1::SelectResponse>(
      channel_.get(), v1::Retrieval::service_full_name(), "Select", &ctx, request,
      [&](const v1::SelectHeader& h, uint64_t offset, absl::string_view bytes) {
        if (offset + bytes.size() > h.gathered_bytes()) {
          return absl::DataLossError(absl::StrCat("Select: the header promised ",
                                                  h.gathered_bytes(), " gathered bytes, got more"));
        }
        if (result.gathered.empty()) result.gathered.reserve(h.gathered_bytes());
        result.gathered.insert(result.gathered.end(), bytes.begin(), bytes.end());
        return absl::OkStatus();
      },
      [](const v1::SelectHeader& h) -> std::optional<uint64_t> { return h.gathered_bytes(); });
  if (!header.ok()) return header.status();
  result.header = *std::move(header);
  return result;
}

absl::StatusOr<std::vector<BatchSelection>> RetrievalClient::SelectBatch(
    absl::Span<const SelectArgs> items) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::SelectBatchRequest req;
  for (const SelectArgs& a : items) *req.add_items() = ToRequest(a);
  v1::SelectBatchResponse resp;
  if (auto s = FromGrpc(stub_->SelectBatch(&ctx, req, &resp)); !s.ok()) return s;
  if (resp.items_size() != req.items_size()) {
    return absl::DataLossError(absl::StrCat("SelectBatch: ", req.items_size(), " items asked, ",
                                            resp.items_size(), " answered"));
  }
  std::vector<BatchSelection> out(items.size());
  for (int i = 0; i < resp.items_size(); ++i) {
    v1::SelectBatchItem* item = resp.mutable_items(i);
    out[i].status = absl::Status(static_cast<absl::StatusCode>(item->code()), item->message());
    out[i].header = std::move(*item->mutable_header());
  }
  return out;
}

absl::StatusOr<GatherResult> RetrievalClient::Gather(const std::string& selection_id,
                                                     const std::vector<int32_t>& layers) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::GatherRequest req;
  req.set_selection_id(selection_id);
  req.mutable_layers()->Add(layers.begin(), layers.end());
  GatherResult result;
  auto header = ReadBulkStream<v1::GatherResponse>(
      channel_.get(), v1::Retrieval::service_full_name(), "Gather", &ctx, req,
      [&](const v1::GatherHeader& h, uint64_t offset, absl::string_view bytes) {
        if (offset + bytes.size() > h.total_bytes()) {
          return absl::DataLossError(
              absl::StrCat("Gather: the header promised ", h.total_bytes(), " bytes, got more"));
        }
        if (result.data.empty()) result.data.reserve(h.total_bytes());
        result.data.insert(result.data.end(), bytes.begin(), bytes.end());
        return absl::OkStatus();
      },
      [](const v1::GatherHeader& h) -> std::optional<uint64_t> { return h.total_bytes(); });
  if (!header.ok()) return header.status();
  result.header = *std::move(header);
  return result;
}

absl::Status RetrievalClient::Release(const std::string& selection_id) {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::ReleaseSelectionRequest req;
  req.set_selection_id(selection_id);
  v1::ReleaseSelectionResponse resp;
  return FromGrpc(stub_->ReleaseSelection(&ctx, req, &resp));
}

absl::StatusOr<v1::RetrievalStatsResponse> RetrievalClient::Stats() {
  grpc::ClientContext ctx;
  Prepare(&ctx);
  v1::RetrievalStatsRequest req;
  v1::RetrievalStatsResponse resp;
  if (auto s = FromGrpc(stub_->Stats(&ctx, req, &resp)); !s.ok()) return s;
  return resp;
}

}  // namespace ropekv::client
