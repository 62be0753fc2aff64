// The Retrieval gRPC service (callback API): query-aware top-k Select over cached prefixes and
// sessions, and Gather of kept selections at other layers (docs/retrieval.md). Thin: converts
// proto <-> domain types and delegates to RetrievalStore (cache/retrieval.h). Selections and
// gathers are CPU work (scoring every key of a layer), so they run on the service's own bounded
// pool of threads, which also produces the streamed bytes; reactors never block.
//
// Borrows the cache and the session store (which must outlive the service); owns the retrieval
// store and the pool. Its limits come from flags defined here: --retrieval_metadata_capacity,
// --retrieval_verify_metadata, --retrieval_max_selections, --retrieval_selection_ttl,
// --retrieval_threads, --retrieval_max_gather, --retrieval_device (auto | cpu | gpu: where Select
// runs, see RetrievalStore::Options::device), --retrieval_gpu_device,
// --retrieval_gpu_metadata_capacity.
#ifndef ROPEKV_SERVER_RETRIEVAL_SERVICE_H_
#define ROPEKV_SERVER_RETRIEVAL_SERVICE_H_

#include <memory>

#include "absl/status/statusor.h"
#include "cache/kv_cache.h"
#include "cache/retrieval.h"
#include "cache/session.h"
#include "ropekv/v1/retrieval.grpc.pb.h"
#include "server/config.h"
#include "server/stream_reactor.h"

namespace ropekv {

class WorkPool;

// Most items of one SelectBatch.
inline constexpr int kMaxSelectBatchItems = 1024;

struct RetrievalServiceOptions {
  RetrievalStore::Options store;  // metadata capacity, selection TTL and count, device
  int threads = 2;                // pool threads running Select and Gather, in [1, 256]
};

// The options from the --retrieval_* flags. INVALID_ARGUMENT for an unparsable size or a thread
// count out of range.
absl::StatusOr<RetrievalServiceOptions> RetrievalOptionsFromFlags();

class RetrievalService final : public WithBulkStreams<v1::Retrieval::CallbackService> {
 public:
  // With RetrievalOptionsFromFlags(). When that or the store fails, status() says why and every
  // call answers UNAVAILABLE; the daemon checks status() at startup. `sessions` may be null
  // (session sources are then FAILED_PRECONDITION).
  RetrievalService(KvCache* cache, SessionStore* sessions, const ServerConfig& config);
  // With explicit options (tests).
  RetrievalService(KvCache* cache, SessionStore* sessions, const ServerConfig& config,
                   RetrievalServiceOptions options);
  // Runs what the pool has queued (in-flight calls finish), then joins it.
  ~RetrievalService() override;

  const absl::Status& status() const { return status_; }
  RetrievalStore* store() { return store_.get(); }

  grpc::ServerWriteReactor<BulkMessage>* StreamSelect(grpc::CallbackServerContext* ctx,
                                                      const v1::SelectRequest* req);
  grpc::ServerWriteReactor<BulkMessage>* StreamGather(grpc::CallbackServerContext* ctx,
                                                      const v1::GatherRequest* req);
  // The items on the pool, at most one job a pool thread (each takes the next item until none is
  // left), so that a large batch shares the pool in turn with the calls queued behind it.
  grpc::ServerUnaryReactor* SelectBatch(grpc::CallbackServerContext* ctx,
                                        const v1::SelectBatchRequest* req,
                                        v1::SelectBatchResponse* resp) override;
  grpc::ServerUnaryReactor* ReleaseSelection(grpc::CallbackServerContext* ctx,
                                             const v1::ReleaseSelectionRequest* req,
                                             v1::ReleaseSelectionResponse* resp) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx,
                                  const v1::RetrievalStatsRequest* req,
                                  v1::RetrievalStatsResponse* resp) override;

 private:
  void Init(KvCache* cache, SessionStore* sessions, absl::StatusOr<RetrievalServiceOptions> o);

  ServerConfig config_;
  std::unique_ptr<RetrievalStore> store_;
  std::unique_ptr<WorkPool> pool_;
  absl::Status status_;
};

}  // namespace ropekv

#endif  // ROPEKV_SERVER_RETRIEVAL_SERVICE_H_
