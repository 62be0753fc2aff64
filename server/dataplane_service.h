// The DataPlane gRPC service (callback API): registered buffers (POSIX shared memory, CUDA IPC)
// and Get / Put / Compose / session Read through them instead of streamed bytes. Thin: converts
// proto <-> domain types and delegates to cache/buffer_registry.h and cache/dataplane.h. Copies run
// on a bounded pool of worker threads that finishes each call, never on gRPC's threads.
//
// Borrows the cache and the session store (nullable: ReadToBuffer then answers UNAVAILABLE), which
// must outlive the service; owns the buffer registry and the pool.
//
// Its settings come from flags defined here (a daemon linking the service gets them; the YAML
// file sets them too): --allow_buffers (auto | on | off; auto = on for loopback listeners only),
// --max_buffers, --dataplane_threads, --dataplane_copy_threads.
#ifndef ROPEKV_SERVER_DATAPLANE_SERVICE_H_
#define ROPEKV_SERVER_DATAPLANE_SERVICE_H_

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cache/buffer_registry.h"
#include "cache/kv_cache.h"
#include "cache/retrieval.h"
#include "cache/session.h"
#include "ropekv/v1/dataplane.grpc.pb.h"
#include "server/config.h"

namespace ropekv {

class WorkPool;

// Most items of one GatherBatchToBuffer.
inline constexpr int kMaxGatherBatchItems = 1024;

struct DataPlaneOptions {
  std::string allow_buffers = "auto";  // auto (loopback listeners only), on, off
  uint32_t max_buffers = 64;           // registered at once
  int threads = 4;                     // workers that run the calls
  // Threads one call splits a copy into shared memory among (blocks or layers); 0 = one per core,
  // at most 8.
  int copy_threads = 0;
};

// The options from the flags. INVALID_ARGUMENT for a bad --allow_buffers or thread counts
// outside [1, 256] ([0, 256] for copy threads).
absl::StatusOr<DataPlaneOptions> DataPlaneOptionsFromFlags();

class DataPlaneService final : public v1::DataPlane::CallbackService {
 public:
  // With DataPlaneOptionsFromFlags(). When the options are bad, status() says why and every call
  // answers UNAVAILABLE with it; the daemon checks status() at startup.
  DataPlaneService(KvCache* cache, SessionStore* sessions, const ServerConfig& config);
  DataPlaneService(KvCache* cache, SessionStore* sessions, const ServerConfig& config,
                   DataPlaneOptions options);
  // Finishes the queued calls and joins the workers.
  ~DataPlaneService() override;

  const absl::Status& status() const { return status_; }
  // One line for the daemon's startup message: whether registration is allowed, and why.
  const std::string& summary() const { return summary_; }
  BufferRegistry* registry() { return registry_.get(); }

  grpc::ServerUnaryReactor* RegisterBuffer(grpc::CallbackServerContext* ctx,
                                           const v1::RegisterBufferRequest* req,
                                           v1::RegisterBufferResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterBuffer(grpc::CallbackServerContext* ctx,
                                             const v1::UnregisterBufferRequest* req,
                                             v1::UnregisterBufferResponse* resp) override;
  grpc::ServerUnaryReactor* ListBuffers(grpc::CallbackServerContext* ctx,
                                        const v1::ListBuffersRequest* req,
                                        v1::ListBuffersResponse* resp) override;
  grpc::ServerUnaryReactor* GetToBuffer(grpc::CallbackServerContext* ctx,
                                        const v1::GetToBufferRequest* req,
                                        v1::GetToBufferResponse* resp) override;
  grpc::ServerUnaryReactor* PutFromBuffer(grpc::CallbackServerContext* ctx,
                                          const v1::PutFromBufferRequest* req,
                                          v1::PutFromBufferResponse* resp) override;
  grpc::ServerUnaryReactor* ComposeToBuffer(grpc::CallbackServerContext* ctx,
                                            const v1::ComposeToBufferRequest* req,
                                            v1::ComposeToBufferResponse* resp) override;
  grpc::ServerUnaryReactor* ReadToBuffer(grpc::CallbackServerContext* ctx,
                                         const v1::ReadToBufferRequest* req,
                                         v1::ReadToBufferResponse* resp) override;
  // Sessions from / into a buffer (issue 5): the session store's OpenFrom / FillFrom.
  grpc::ServerUnaryReactor* OpenFromBuffer(grpc::CallbackServerContext* ctx,
                                           const v1::OpenFromBufferRequest* req,
                                           v1::OpenFromBufferResponse* resp) override;
  grpc::ServerUnaryReactor* FillFromBuffer(grpc::CallbackServerContext* ctx,
                                           const v1::FillFromBufferRequest* req,
                                           v1::FillFromBufferResponse* resp) override;
  // Retrieval.Gather into a buffer (a kept selection of the store set by SetRetrieval).
  grpc::ServerUnaryReactor* GatherToBuffer(grpc::CallbackServerContext* ctx,
                                           const v1::GatherToBufferRequest* req,
                                           v1::GatherToBufferResponse* resp) override;
  // GatherToBuffer for each item, in order, each with its own status (a decode batch's kept
  // selections in one round trip).
  grpc::ServerUnaryReactor* GatherBatchToBuffer(grpc::CallbackServerContext* ctx,
                                                const v1::GatherBatchToBufferRequest* req,
                                                v1::GatherBatchToBufferResponse* resp) override;
  // The retrieval store GatherToBuffer reads (borrowed; it must outlive the service). Set before
  // the server starts; without it GatherToBuffer answers UNAVAILABLE.
  void SetRetrieval(RetrievalStore* store) { retrieval_ = store; }

 private:
  void Init(const ServerConfig& config, absl::StatusOr<DataPlaneOptions> options);
  // Runs `work` on the pool and finishes the call with its status.
  grpc::ServerUnaryReactor* Submit(grpc::CallbackServerContext* ctx,
                                   std::function<absl::Status()> work);
  // One GatherToBuffer (retrieval_ set), its answer into *resp.
  absl::Status Gather(const v1::GatherToBufferRequest& req, v1::GatherToBufferResponse* resp);

  KvCache* cache_;
  SessionStore* sessions_;
  RetrievalStore* retrieval_ = nullptr;
  std::unique_ptr<BufferRegistry> registry_;
  std::unique_ptr<WorkPool> pool_;
  int copy_threads_ = 1;
  absl::Status status_;
  std::string summary_;
};

}  // namespace ropekv

#endif  // ROPEKV_SERVER_DATAPLANE_SERVICE_H_
