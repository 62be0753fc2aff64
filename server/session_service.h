// The Sessions gRPC service (callback API): code-editor sessions with PIE edits. Thin: converts
// proto <-> domain types, delegates to SessionStore (cache/session.h), maps statuses. Borrows the
// cache, which must outlive the service; owns the session store.
//
// Its limits come from flags defined here (a daemon linking the service gets them):
// --session_max (open sessions), --session_capacity (bytes of session KV), --session_ttl (idle
// time after which a session is closed), --session_device (auto | cpu | gpu: where session KV
// lives; YAML `session: {device: gpu}` or `sessions: {device: gpu}`), --session_gpu_device.
#ifndef ROPEKV_SERVER_SESSION_SERVICE_H_
#define ROPEKV_SERVER_SESSION_SERVICE_H_

#include <memory>

#include "absl/status/status.h"
#include "cache/kv_cache.h"
#include "cache/session.h"
#include "ropekv/v1/session.grpc.pb.h"
#include "server/config.h"
#include "server/stream_reactor.h"

namespace ropekv {

// The session store's options from the --session_* flags. INVALID_ARGUMENT for an unparsable size.
absl::StatusOr<SessionStore::Options> SessionOptionsFromFlags();

class SessionService final : public WithBulkStreams<v1::Sessions::CallbackService> {
 public:
  // Creates the store with SessionOptionsFromFlags(). When that fails, status() says why and
  // every call answers with it (UNAVAILABLE); the daemon checks status() at startup.
  SessionService(KvCache* cache, const ServerConfig& config);
  // With explicit store options (tests).
  SessionService(KvCache* cache, const ServerConfig& config, SessionStore::Options options);

  const absl::Status& status() const { return status_; }
  SessionStore* store() { return store_.get(); }

  grpc::ServerReadReactor<v1::OpenSessionRequest>* OpenSession(
      grpc::CallbackServerContext* ctx, v1::OpenSessionResponse* resp) override;
  grpc::ServerUnaryReactor* Edit(grpc::CallbackServerContext* ctx, const v1::EditRequest* req,
                                 v1::EditResponse* resp) override;
  grpc::ServerReadReactor<v1::FillRequest>* Fill(grpc::CallbackServerContext* ctx,
                                                 v1::FillResponse* resp) override;
  grpc::ServerWriteReactor<BulkMessage>* StreamRead(grpc::CallbackServerContext* ctx,
                                                    const v1::ReadRequest* req);
  grpc::ServerUnaryReactor* Snapshot(grpc::CallbackServerContext* ctx,
                                     const v1::SnapshotRequest* req,
                                     v1::SnapshotResponse* resp) override;
  grpc::ServerUnaryReactor* Info(grpc::CallbackServerContext* ctx,
                                 const v1::SessionInfoRequest* req,
                                 v1::SessionInfoResponse* resp) override;
  grpc::ServerUnaryReactor* CloseSession(grpc::CallbackServerContext* ctx,
                                         const v1::CloseSessionRequest* req,
                                         v1::CloseSessionResponse* resp) override;

 private:
  void Init(KvCache* cache, absl::StatusOr<SessionStore::Options> options);

  ServerConfig config_;
  std::unique_ptr<SessionStore> store_;
  absl::Status status_;
};

}  // namespace ropekv

#endif  // ROPEKV_SERVER_SESSION_SERVICE_H_
