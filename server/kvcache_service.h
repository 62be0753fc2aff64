// The KVCache gRPC service (callback API). Thin: converts proto <-> domain types, delegates to
// KvCache, maps statuses. Borrows the cache, which must outlive the service.
#ifndef ROPEKV_SERVER_KVCACHE_SERVICE_H_
#define ROPEKV_SERVER_KVCACHE_SERVICE_H_

#include "cache/kv_cache.h"
#include "ropekv/v1/kvcache.grpc.pb.h"
#include "server/config.h"

namespace ropekv {

class KvCacheService final : public v1::KVCache::CallbackService {
 public:
  KvCacheService(KvCache* cache, const ServerConfig& config) : cache_(cache), config_(config) {}

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
  grpc::ServerWriteReactor<v1::GetResponse>* Get(grpc::CallbackServerContext* ctx,
                                                 const v1::GetRequest* req) override;
  grpc::ServerWriteReactor<v1::ComposeResponse>* Compose(grpc::CallbackServerContext* ctx,
                                                         const v1::ComposeRequest* req) override;
  grpc::ServerUnaryReactor* Stats(grpc::CallbackServerContext* ctx, const v1::StatsRequest* req,
                                  v1::StatsResponse* resp) override;
  grpc::ServerUnaryReactor* Evict(grpc::CallbackServerContext* ctx, const v1::EvictRequest* req,
                                  v1::EvictResponse* resp) override;
  grpc::ServerUnaryReactor* Pin(grpc::CallbackServerContext* ctx, const v1::PinRequest* req,
                                v1::PinResponse* resp) override;

 private:
  KvCache* cache_;
  ServerConfig config_;
};

}  // namespace ropekv

#endif  // ROPEKV_SERVER_KVCACHE_SERVICE_H_
