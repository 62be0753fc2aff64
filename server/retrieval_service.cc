#include "server/retrieval_service.h"

#include <algorithm>
#include <atomic>
#include <deque>
#include <functional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/config.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/convert.h"
#include "server/stream_reactor.h"
#include "server/work_pool.h"

ABSL_FLAG(std::string, retrieval_metadata_capacity, "256MiB",
          "bytes of page metadata (Quest bounds) the retrieval service keeps");
ABSL_FLAG(bool, retrieval_verify_metadata, true,
          "check kept page metadata of prefix blocks against the serial of the stored block "
          "before use (detects blocks re-Put with other bytes); sessions name their pages");
ABSL_FLAG(bool, retrieval_metadata_on_put, true,
          "build the page metadata of every prefix block when a Put stores it (all layers), so "
          "that page-mode Selects find it; off: built on first use");
ABSL_FLAG(uint32_t, retrieval_max_selections, 1024,
          "most kept selections (Select with keep); the least recently used goes first");
ABSL_FLAG(absl::Duration, retrieval_selection_ttl, absl::Seconds(10),
          "a kept selection unused this long is dropped, e.g. 10s, 1m");
ABSL_FLAG(int32_t, retrieval_threads, 2,
          "worker threads running Select, the items of SelectBatch, and Gather");
ABSL_FLAG(std::string, retrieval_max_gather, "1GiB",
          "most bytes of one layer's gathered K/V a Select (gather or keep) may ask for");
ABSL_FLAG(std::string, retrieval_device, "auto",
          "where Select scores and ranks the keys: auto (the GPU when one is present), cpu, gpu "
          "(required: ropekvd does not start without one)");
ABSL_FLAG(int32_t, retrieval_gpu_device, 0, "CUDA device of Select on the GPU");
ABSL_FLAG(std::string, retrieval_gpu_metadata_capacity, "1GiB",
          "bytes of page metadata Select on the GPU keeps in device memory across calls (a later "
          "Select over the same source and layer copies only what changed); 0: none kept");

namespace ropekv {

namespace {

// One unit of bytes the source owns (a Select's gathered K/V; none when empty).
class OwnedSource final : public ByteSource {
 public:
  explicit OwnedSource(std::string bytes) : bytes_(std::move(bytes)) {}
  size_t units() const override { return bytes_.empty() ? 0 : 1; }
  absl::StatusOr<absl::string_view> Unit(size_t, std::string*) override { return bytes_; }

 private:
  std::string bytes_;
};

// A kept selection's K/V, one requested layer per unit.
class GatherSource final : public ByteSource {
 public:
  GatherSource(RetrievalStore* store, std::shared_ptr<const KeptSelection> selection,
               std::vector<int> layers)
      : store_(store), selection_(std::move(selection)), layers_(std::move(layers)) {}
  size_t units() const override { return layers_.size(); }
  absl::StatusOr<absl::string_view> Unit(size_t i, std::string* staging) override {
    staging->resize(selection_->layer_bytes());
    if (absl::Status s = store_->GatherLayer(*selection_, layers_[i], staging->data()); !s.ok()) {
      return s;
    }
    return absl::string_view(*staging);
  }

 private:
  RetrievalStore* store_;
  std::shared_ptr<const KeptSelection> selection_;
  std::vector<int> layers_;
};

grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* ctx, const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  reactor->Finish(ToGrpc(status));
  return reactor;
}

absl::Status Unavailable(const absl::Status& why) {
  return absl::UnavailableError(absl::StrCat("retrieval is not available: ", why.message()));
}

absl::StatusOr<SelectArgs> FromProto(const v1::SelectRequest& req) {
  SelectArgs a;
  switch (req.source().source_case()) {
    case v1::SelectSource::kPrefix:
      a.source.model = req.source().prefix().model();
      a.source.tenant = req.source().prefix().tenant();
      a.source.tokens.assign(req.source().prefix().tokens().begin(),
                             req.source().prefix().tokens().end());
      if (!req.source().prefix().last_block().empty()) {
        if (!a.source.tokens.empty()) {
          return absl::InvalidArgumentError("source.prefix: give tokens or last_block, not both");
        }
        auto last = BlockHash::FromRaw(req.source().prefix().last_block());
        if (!last.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat("source.prefix.last_block: ", last.status().message()));
        }
        a.source.last_block = *last;
      }
      break;
    case v1::SelectSource::kSessionId:
      if (req.source().session_id().empty()) {
        return absl::InvalidArgumentError("source.session_id must not be empty");
      }
      a.source.session_id = req.source().session_id();
      break;
    default:
      return absl::InvalidArgumentError("source must be a prefix or a session_id; got neither");
  }
  a.layer = req.layer();
  if (req.query_heads() > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("query_heads must be <= 65535, got ", req.query_heads()));
  }
  a.query_heads = static_cast<int>(req.query_heads());
  a.queries = req.queries();
  switch (req.query_dtype()) {
    case v1::DTYPE_UNSPECIFIED:
    case v1::DTYPE_F32:
      a.query_dtype = DType::kF32;
      break;
    case v1::DTYPE_F16:
      a.query_dtype = DType::kF16;
      break;
    case v1::DTYPE_BF16:
      a.query_dtype = DType::kBF16;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "query_dtype must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16, got ", req.query_dtype()));
  }
  a.k = req.k();
  switch (req.mode()) {
    case v1::SELECT_MODE_EXACT:
      a.mode = topk::Mode::kExact;
      break;
    case v1::SELECT_MODE_BOUND:
      a.mode = topk::Mode::kBound;
      break;
    case v1::SELECT_MODE_BOUND_THEN_EXACT:
      a.mode = topk::Mode::kBoundThenExact;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "mode must be EXACT, BOUND or BOUND_THEN_EXACT, got ", static_cast<int>(req.mode())));
  }
  switch (req.reduction()) {
    case v1::GQA_REDUCTION_MAX:
      a.reduction = topk::GqaReduction::kMax;
      break;
    case v1::GQA_REDUCTION_SUM:
      a.reduction = topk::GqaReduction::kSum;
      break;
    case v1::GQA_REDUCTION_PER_QUERY_HEAD:
      a.reduction = topk::GqaReduction::kPerQueryHead;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "reduction must be MAX, SUM or PER_QUERY_HEAD, got ", static_cast<int>(req.reduction())));
  }
  a.n_sink = req.n_sink();
  a.n_local = req.n_local();
  a.candidate_tokens = req.candidate_tokens();
  a.softmax_scale = req.softmax_scale();
  a.want_scores = req.want_scores();
  a.want_mass = req.want_mass();
  a.gather = req.gather();
  a.keep = req.keep();
  return a;
}

// The bytes of `v` as the host stores them: little-endian, as the daemon's hosts are.
template <typename T>
std::string LittleEndianBytes(const std::vector<T>& v) {
  static_assert(ABSL_IS_LITTLE_ENDIAN, "packed rows are written as the host stores them");
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// The selection, its rows packed (SelectRequest.packed_rows) or one SelectedRow each.
void ToProto(const SelectOutput& out, bool packed_rows, v1::SelectHeader* h) {
  h->set_model_id(out.model);
  h->set_num_tokens(out.num_tokens);
  h->set_kv_heads(out.kv_heads);
  h->set_head_dim(out.head_dim);
  h->set_dtype(ToProto(out.dtype));
  h->set_capacity(static_cast<uint32_t>(out.capacity));
  if (packed_rows) {
    v1::PackedRows* packed = h->mutable_packed();
    packed->set_counts(LittleEndianBytes(out.counts));
    packed->set_indices(LittleEndianBytes(out.indices));
    if (!out.scores.empty()) packed->set_scores(LittleEndianBytes(out.scores));
  }
  for (int64_t r = 0; r < out.rows && !packed_rows; ++r) {
    v1::SelectedRow* row = h->add_rows();
    const int32_t* first = out.indices.data() + r * out.capacity;
    row->mutable_indices()->Add(first, first + out.counts[r]);
    if (!out.scores.empty()) {
      const float* s = out.scores.data() + r * out.capacity;
      row->mutable_scores()->Add(s, s + out.counts[r]);
    }
  }
  h->mutable_mass()->Add(out.mass.begin(), out.mass.end());
  h->set_selection_id(out.selection_id);
  h->set_gathered_bytes(out.gathered.size());
  h->set_metadata_cached(out.metadata_cached);
}

}  // namespace

absl::StatusOr<RetrievalServiceOptions> RetrievalOptionsFromFlags() {
  RetrievalServiceOptions o;
  auto bytes = ParseSize(absl::GetFlag(FLAGS_retrieval_metadata_capacity));
  if (!bytes.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--retrieval_metadata_capacity: ", bytes.status().message()));
  }
  o.store.metadata_capacity_bytes = *bytes;
  auto gather = ParseSize(absl::GetFlag(FLAGS_retrieval_max_gather));
  if (!gather.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--retrieval_max_gather: ", gather.status().message()));
  }
  o.store.max_gather_bytes = *gather;
  auto gpu_meta = ParseSize(absl::GetFlag(FLAGS_retrieval_gpu_metadata_capacity));
  if (!gpu_meta.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--retrieval_gpu_metadata_capacity: ", gpu_meta.status().message()));
  }
  o.store.gpu_metadata_capacity_bytes = *gpu_meta;
  o.store.verify_metadata = absl::GetFlag(FLAGS_retrieval_verify_metadata);
  o.store.build_metadata_on_put = absl::GetFlag(FLAGS_retrieval_metadata_on_put);
  o.store.max_selections = absl::GetFlag(FLAGS_retrieval_max_selections);
  o.store.selection_ttl = absl::GetFlag(FLAGS_retrieval_selection_ttl);
  o.threads = absl::GetFlag(FLAGS_retrieval_threads);
  auto device = ResolveRetrievalDevice(absl::GetFlag(FLAGS_retrieval_device),
                                       absl::GetFlag(FLAGS_retrieval_gpu_device));
  if (!device.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--retrieval_device: ", device.status().message()));
  }
  o.store.device = *device;
  return o;
}

RetrievalService::RetrievalService(KvCache* cache, SessionStore* sessions,
                                   const ServerConfig& config)
    : config_(config) {
  Init(cache, sessions, RetrievalOptionsFromFlags());
}

RetrievalService::RetrievalService(KvCache* cache, SessionStore* sessions,
                                   const ServerConfig& config, RetrievalServiceOptions options)
    : config_(config) {
  Init(cache, sessions, std::move(options));
}

RetrievalService::~RetrievalService() { pool_.reset(); }

void RetrievalService::Init(KvCache* cache, SessionStore* sessions,
                            absl::StatusOr<RetrievalServiceOptions> options) {
  ServeBulk(v1::Retrieval::service_full_name(), "Select", &RetrievalService::StreamSelect);
  ServeBulk(v1::Retrieval::service_full_name(), "Gather", &RetrievalService::StreamGather);
  if (!options.ok()) {
    status_ = options.status();
    return;
  }
  if (options->threads < 1 || options->threads > 256) {
    status_ = absl::InvalidArgumentError(
        absl::StrCat("--retrieval_threads must be in [1, 256], got ", options->threads));
    return;
  }
  auto store = RetrievalStore::Create(cache, sessions, std::move(options->store));
  if (!store.ok()) {
    status_ = absl::InvalidArgumentError(absl::StrCat("retrieval: ", store.status().message()));
    return;
  }
  store_ = *std::move(store);
  pool_ = std::make_unique<WorkPool>(options->threads);
}

grpc::ServerWriteReactor<BulkMessage>* RetrievalService::StreamSelect(
    grpc::CallbackServerContext* ctx, const v1::SelectRequest* req) {
  using Reactor = ChunkedWriteReactor<v1::SelectResponse>;
  if (!status_.ok()) return new Reactor(Unavailable(status_));
  // `req` stays valid until the call is done, i.e. past the pool's work.
  return new Reactor(pool_.get(), ChunkBytes(req->chunk_bytes(), config_.chunk_bytes),
                     [this, req]() -> absl::StatusOr<Reactor::Prepared> {
                       auto args = FromProto(*req);
                       if (!args.ok()) return args.status();
                       auto out = store_->Select(*args);
                       if (!out.ok()) return out.status();
                       Reactor::Prepared p;
                       ToProto(*out, req->packed_rows(), p.first.mutable_header());
                       p.source = std::make_unique<OwnedSource>(std::move(out->gathered));
                       return p;
                     });
}

grpc::ServerWriteReactor<BulkMessage>* RetrievalService::StreamGather(
    grpc::CallbackServerContext* ctx, const v1::GatherRequest* req) {
  using Reactor = ChunkedWriteReactor<v1::GatherResponse>;
  if (!status_.ok()) return new Reactor(Unavailable(status_));
  if (req->layers().empty()) {
    return new Reactor(absl::InvalidArgumentError("Gather needs at least one layer, got none"));
  }
  auto selection = store_->FindSelection(req->selection_id());
  if (!selection.ok()) return new Reactor(selection.status());
  const KeptSelection& sel = **selection;
  std::vector<int> layers(req->layers().begin(), req->layers().end());
  for (size_t i = 0; i < layers.size(); ++i) {
    if (layers[i] < 0 || layers[i] >= sel.spec().layers) {
      return new Reactor(absl::InvalidArgumentError(absl::StrCat(
          "layers[", i, "] must be in [0, ", sel.spec().layers, "), got ", layers[i])));
    }
  }
  v1::GatherResponse first;
  v1::GatherHeader* h = first.mutable_header();
  h->set_num_tokens(sel.num_tokens());
  h->set_rows(static_cast<uint32_t>(sel.rows()));
  h->set_capacity(static_cast<uint32_t>(sel.capacity()));
  h->set_head_dim(sel.spec().head_dim);
  h->set_dtype(ToProto(sel.spec().dtype));
  h->mutable_counts()->Add(sel.counts().begin(), sel.counts().end());
  h->mutable_layers()->Add(layers.begin(), layers.end());
  h->set_layer_bytes(sel.layer_bytes());
  h->set_total_bytes(sel.layer_bytes() * layers.size());
  auto source = std::make_shared<std::unique_ptr<ByteSource>>(
      std::make_unique<GatherSource>(store_.get(), *std::move(selection), std::move(layers)));
  auto header = std::make_shared<v1::GatherResponse>(std::move(first));
  return new Reactor(pool_.get(), ChunkBytes(req->chunk_bytes(), config_.chunk_bytes),
                     [header, source]() -> absl::StatusOr<Reactor::Prepared> {
                       return Reactor::Prepared{std::move(*header), std::move(*source)};
                     });
}

grpc::ServerUnaryReactor* RetrievalService::SelectBatch(grpc::CallbackServerContext* ctx,
                                                        const v1::SelectBatchRequest* req,
                                                        v1::SelectBatchResponse* resp) {
  if (!status_.ok()) return Done(ctx, Unavailable(status_));
  const int n = req->items_size();
  if (n < 1 || n > kMaxSelectBatchItems) {
    return Done(ctx, absl::InvalidArgumentError(absl::StrCat(
                         "SelectBatch takes 1 to ", kMaxSelectBatchItems, " items, got ", n)));
  }
  for (int i = 0; i < n; ++i) {
    if (req->items(i).gather()) {
      return Done(ctx, absl::InvalidArgumentError(absl::StrCat(
                           "items[", i,
                           "].gather: SelectBatch returns no K/V; keep the selection and Gather "
                           "it, or Select it alone")));
    }
  }
  for (int i = 0; i < n; ++i) resp->add_items();
  // The jobs write their own items (allocated above) and the last one to finish answers; `ctx`,
  // `req` and `resp` stay valid until then. On the CPU each job selects the items it takes; with a
  // GPU the jobs prepare them (Select's host work) and the last one scores them all in one GPU pass
  // (RetrievalStore::Run).
  struct Batch {
    std::atomic<int> next{0};
    std::atomic<int> jobs_left{0};
    std::atomic<uint64_t> bytes{0};  // of the items answered (or, prepared, their outputs) so far
    std::vector<SelectArgs> args;    // GPU: each item's, borrowed by its prepared selection
    std::vector<std::shared_ptr<RetrievalStore::PreparedSelect>> prepared;  // null: not prepared
  };
  auto batch = std::make_shared<Batch>();
  const bool one_pass = store_->device() >= 0;
  if (one_pass) {
    batch->args.resize(n);
    batch->prepared.resize(n);
  }
  const int jobs = std::min(n, pool_->threads());
  batch->jobs_left.store(jobs);
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  const uint64_t max_bytes = config_.max_message_bytes;
  for (int j = 0; j < jobs; ++j) {
    pool_->Submit([this, ctx, req, resp, n, batch, reactor, max_bytes, one_pass] {
      for (int i = batch->next.fetch_add(1); i < n; i = batch->next.fetch_add(1)) {
        // An answer already over the message size fails whole: the rest is not selected (or
        // prepared), so that a batch holds at most about one message's worth of answers.
        if (batch->bytes.load() > max_bytes) break;
        v1::SelectBatchItem* item = resp->mutable_items(i);
        if (ctx->IsCancelled()) {  // the caller is gone: the rest is not worth selecting
          SetItemStatus(absl::CancelledError("the call was cancelled"), item);
          continue;
        }
        absl::StatusOr<SelectArgs> args = FromProto(req->items(i));
        if (!args.ok()) {
          SetItemStatus(args.status(), item);
        } else if (one_pass) {
          batch->args[i] = *std::move(args);
          auto prepared = store_->Prepare(batch->args[i]);
          if (prepared.ok()) {
            batch->bytes.fetch_add(RetrievalStore::OutputBytes(**prepared));
            batch->prepared[i] = *std::move(prepared);
          } else {
            SetItemStatus(prepared.status(), item);
          }
          continue;
        } else if (absl::StatusOr<SelectOutput> out = store_->Select(*args); out.ok()) {
          ToProto(*out, req->items(i).packed_rows(), item->mutable_header());
        } else {
          SetItemStatus(out.status(), item);
        }
        batch->bytes.fetch_add(item->ByteSizeLong());
      }
      if (batch->jobs_left.fetch_sub(1) != 1) return;
      // Stopped early: the answers (or the prepared outputs) passed the message size.
      const bool stopped = batch->bytes.load() > max_bytes;
      if (one_pass && !stopped) {
        std::vector<int> order;
        std::vector<std::shared_ptr<RetrievalStore::PreparedSelect>> run;
        for (int i = 0; i < n; ++i) {
          if (batch->prepared[i] == nullptr) continue;
          order.push_back(i);
          run.push_back(std::move(batch->prepared[i]));
        }
        std::vector<absl::StatusOr<SelectOutput>> outs = store_->Run(std::move(run));
        for (size_t j = 0; j < order.size(); ++j) {
          v1::SelectBatchItem* item = resp->mutable_items(order[j]);
          if (outs[j].ok()) {
            ToProto(*outs[j], req->items(order[j]).packed_rows(), item->mutable_header());
          } else {
            SetItemStatus(outs[j].status(), item);
          }
        }
      }
      const size_t bytes = stopped ? batch->bytes.load() : resp->ByteSizeLong();
      if (bytes > max_bytes) {
        resp->Clear();
        reactor->Finish(ToGrpc(absl::ResourceExhaustedError(absl::StrCat(
            "SelectBatch: the answer takes ", stopped ? "at least " : "", bytes,
            " bytes, over the daemon's message size of ", max_bytes, "; split the batch"))));
        return;
      }
      reactor->Finish(grpc::Status::OK);
    });
  }
  return reactor;
}

grpc::ServerUnaryReactor* RetrievalService::ReleaseSelection(grpc::CallbackServerContext* ctx,
                                                             const v1::ReleaseSelectionRequest* req,
                                                             v1::ReleaseSelectionResponse* resp) {
  if (!status_.ok()) return Done(ctx, Unavailable(status_));
  return Done(ctx, store_->Release(req->selection_id()));
}

grpc::ServerUnaryReactor* RetrievalService::Stats(grpc::CallbackServerContext* ctx,
                                                  const v1::RetrievalStatsRequest* req,
                                                  v1::RetrievalStatsResponse* resp) {
  if (!status_.ok()) return Done(ctx, Unavailable(status_));
  const RetrievalStore::Stats s = store_->stats();
  resp->set_selects(s.selects);
  resp->set_gathers(s.gathers);
  resp->set_metadata_entries(s.metadata_entries);
  resp->set_metadata_bytes(s.metadata_bytes);
  resp->set_metadata_capacity_bytes(s.metadata_capacity_bytes);
  resp->set_metadata_hits(s.metadata_hits);
  resp->set_metadata_builds(s.metadata_builds);
  resp->set_metadata_stale(s.metadata_stale);
  resp->set_metadata_evictions(s.metadata_evictions);
  resp->set_selections(s.selections);
  resp->set_gpu_selects(s.gpu_selects);
  resp->set_gpu_fallbacks(s.gpu_fallbacks);
  resp->set_metadata_put_builds(s.metadata_put_builds);
  resp->set_metadata_session_pages_built(s.metadata_session_pages_built);
  resp->set_gpu_metadata_bytes(s.gpu_metadata_bytes);
  resp->set_gpu_metadata_pages_uploaded(s.gpu_metadata_pages_uploaded);
  resp->set_metadata_prefix_view_hits(s.metadata_prefix_view_hits);
  resp->set_gpu_keys_in_place(s.gpu_keys_in_place);
  return Done(ctx, absl::OkStatus());
}

}  // namespace ropekv
