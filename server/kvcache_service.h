// The KVCache gRPC service (callback API). Thin: converts proto <-> domain types, delegates to
// KvCache, maps statuses. Borrows the cache, which must outlive the service. Work that may touch
// the disk (reads of demoted blocks, synced writes, deletes, the model registry) runs on
// config.kvcache_threads worker threads, never on a gRPC thread; Stats and ListModels answer
// inline.
#ifndef ROPEKV_SERVER_KVCACHE_SERVICE_H_
#define ROPEKV_SERVER_KVCACHE_SERVICE_H_

#include <memory>

#include "cache/kv_cache.h"
#include "ropekv/v1/kvcache.grpc.pb.h"
#include "server/config.h"
#include "server/stream_reactor.h"
#include "server/work_pool.h"

namespace ropekv {

class KvCacheService final : public WithBulkStreams<v1::KVCache::CallbackService> {
 public:
  KvCacheService(KvCache* cache, const ServerConfig& config);

  grpc::ServerUnaryReactor* RegisterModel(grpc::CallbackServerContext* ctx,
                                          const v1::RegisterModelRequest* req,
                                          v1::RegisterModelResponse* resp) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx,
                                       const v1::ListModelsRequest* req,
                                       v1::ListModelsResponse* resp) override;
  grpc::ServerReadReactor<v1::PutRequest>* Put(grpc::CallbackServerContext* ctx,
                                               v1::PutResponse* resp) override;
  grpc::ServerUnaryReactor* Lookup(grpc::CallbackServerContext* ctx, const v1::LookupRequest* req,
                                   v1::LookupResponse* resp) override;
  // Get and Compose (GetResponse and ComposeResponse on the wire, sent as BulkMessages).
  grpc::ServerWriteReactor<BulkMessage>* StreamGet(grpc::CallbackServerContext* ctx,
                                                   const v1::GetRequest* req);
  grpc::ServerWriteReactor<BulkMessage>* StreamCompose(grpc::CallbackServerContext* ctx,
                                                       const v1::ComposeRequest* req);
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* req,
                                  v1::StatsResponse* resp) override;
  grpc::ServerUnaryReactor* Evict(grpc::CallbackServerContext* ctx, const v1::EvictRequest* req,
                                  v1::EvictResponse* resp) override;
  grpc::ServerUnaryReactor* Pin(grpc::CallbackServerContext* ctx, const v1::PinRequest* req,
                                v1::PinResponse* resp) override;

 private:
  // Finishes the call with what `work` returns, run on the pool.
  grpc::ServerUnaryReactor* Submit(grpc::CallbackServerContext* ctx,
                                   std::function<absl::Status()> work);

  KvCache* cache_;
  ServerConfig config_;
  std::unique_ptr<WorkPool> pool_;  // last: its destructor runs the queued jobs first
};

}  // namespace ropekv

#endif  // ROPEKV_SERVER_KVCACHE_SERVICE_H_
