// The Modules gRPC service (callback API): prompt modules (Prompt Cache) and parallel contexts
// (APE). Thin: converts proto <-> domain types, delegates to ModuleStore (cache/modules.h), maps
// statuses. Borrows the cache, which must outlive the service; owns the module store.
//
// Composed KV is streamed like KVCache.Compose: a header, then [k|v][kv_head][tokens][head_dim]
// one layer after another, in messages of at most the server's chunk size. Attend (a check, not a
// serving path) runs the APE merge in the handler: the CPU reference, or CUDA where a GPU is.
#ifndef ROPEKV_SERVER_MODULES_SERVICE_H_
#define ROPEKV_SERVER_MODULES_SERVICE_H_

#include <memory>

#include "absl/status/status.h"
#include "cache/kv_cache.h"
#include "cache/modules.h"
#include "ropekv/v1/modules.grpc.pb.h"
#include "server/config.h"
#include "server/stream_reactor.h"

namespace ropekv {

class ModulesService final : public WithBulkStreams<v1::Modules::CallbackService> {
 public:
  // Creates the module store with default options. When that fails, status() says why and every
  // call answers with it (UNAVAILABLE); the daemon checks status() at startup.
  ModulesService(KvCache* cache, const ServerConfig& config);
  // With explicit store options (tests).
  ModulesService(KvCache* cache, const ServerConfig& config, ModuleStore::Options options);

  const absl::Status& status() const { return status_; }
  ModuleStore* store() { return store_.get(); }

  grpc::ServerUnaryReactor* RegisterSchema(grpc::CallbackServerContext* ctx,
                                           const v1::RegisterSchemaRequest* req,
                                           v1::RegisterSchemaResponse* resp) override;
  grpc::ServerUnaryReactor* GetSchema(grpc::CallbackServerContext* ctx,
                                      const v1::GetSchemaRequest* req,
                                      v1::GetSchemaResponse* resp) override;
  grpc::ServerReadReactor<v1::PutModuleRequest>* PutModule(grpc::CallbackServerContext* ctx,
                                                           v1::PutKvResponse* resp) override;
  grpc::ServerWriteReactor<BulkMessage>* StreamComposePrompt(grpc::CallbackServerContext* ctx,
                                                             const v1::ComposePromptRequest* req);
  grpc::ServerReadReactor<v1::PutContextRequest>* PutContext(grpc::CallbackServerContext* ctx,
                                                             v1::PutKvResponse* resp) override;
  grpc::ServerWriteReactor<BulkMessage>* StreamComposeParallel(
      grpc::CallbackServerContext* ctx, const v1::ComposeParallelRequest* req);
  grpc::ServerUnaryReactor* Attend(grpc::CallbackServerContext* ctx, const v1::AttendRequest* req,
                                   v1::AttendResponse* resp) override;

 private:
  ServerConfig config_;
  std::unique_ptr<ModuleStore> store_;
  absl::Status status_;
};

}  // namespace ropekv

#endif  // ROPEKV_SERVER_MODULES_SERVICE_H_
