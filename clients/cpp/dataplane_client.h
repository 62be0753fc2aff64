// The C++ client of ropekvd's DataPlane service: register a buffer once (POSIX shared memory this
// process made, or a GPU buffer by CUDA IPC handle), then Get / Put / Compose / session Read
// through it — the daemon copies straight into or out of the buffer, no bytes in protobuf.
//
//   auto shm = SharedMemory::Create("/ropekv-demo", 64 << 20);      // this process's region
//   auto dp = DataPlaneClient::Connect(options);
//   dp->RegisterShm("demo", (*shm)->name(), (*shm)->size());
//   auto got = dp->GetToBuffer(get_args, {"demo", 0, 0});           // bytes in (*shm)->data()
//
// Thread safety: DataPlaneClient may be shared by threads; SharedMemory is thread-compatible.
#ifndef ROPEKV_CLIENTS_CPP_DATAPLANE_CLIENT_H_
#define ROPEKV_CLIENTS_CPP_DATAPLANE_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "clients/cpp/client.h"
#include "ropekv/v1/dataplane.grpc.pb.h"

namespace ropekv::client {

// A POSIX shared-memory region created by this process (shm_open O_CREAT | O_EXCL, mode 0600,
// ftruncate, mmap). Destruction unmaps it and, when this object created it, unlinks the name (a
// daemon's mapping stays valid until the daemon unmaps it).
class SharedMemory {
 public:
  // ALREADY_EXISTS when the name is taken; INVALID_ARGUMENT for a malformed name or size 0;
  // other errno values as INTERNAL / PERMISSION_DENIED / RESOURCE_EXHAUSTED.
  static absl::StatusOr<std::unique_ptr<SharedMemory>> Create(const std::string& name,
                                                              uint64_t size);
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  const std::string& name() const { return name_; }  // "/..."
  uint64_t size() const { return size_; }
  uint8_t* data() const { return data_; }
  int fd() const { return fd_; }

 private:
  SharedMemory(std::string name, int fd, uint8_t* data, uint64_t size)
      : name_(std::move(name)), fd_(fd), data_(data), size_(size) {}
  std::string name_;
  int fd_;
  uint8_t* data_;
  uint64_t size_;
};

// [offset, offset + length) of a registered buffer (length 0: to its end); or, for Get and Put on
// a buffer registered with a paged layout, the pages `block_ids` (offset and length 0).
struct BufferRef {
  std::string buffer;
  uint64_t offset = 0;
  uint64_t length = 0;
  std::vector<uint32_t> block_ids;
};

class DataPlaneClient {
 public:
  // Creates a channel (connects lazily). INVALID_ARGUMENT for an empty address.
  static absl::StatusOr<std::unique_ptr<DataPlaneClient>> Connect(Client::Options options);

  // Registers shared memory `shm_name` as buffer `name`, its first `size` bytes (0: all). With
  // `paged`, the buffer holds that paged layout (dataplane.proto PagedLayout) and Get / Put may
  // name its pages by BufferRef::block_ids.
  absl::StatusOr<v1::BufferInfo> RegisterShm(const std::string& name, const std::string& shm_name,
                                             uint64_t size = 0,
                                             std::optional<v1::PagedLayout> paged = std::nullopt);
  // Registers a GPU buffer: `handle` is a cudaIpcMemHandle_t's 64 bytes, [offset, offset + size)
  // of its allocation (size 0: to its end); `paged` as RegisterShm.
  absl::StatusOr<v1::BufferInfo> RegisterCudaIpc(
      const std::string& name, int device, const std::string& handle, uint64_t offset,
      uint64_t size, std::optional<v1::PagedLayout> paged = std::nullopt);
  // Waits (in the daemon) for copies in flight; returns how many it waited for.
  absl::StatusOr<uint32_t> Unregister(const std::string& name);
  absl::StatusOr<v1::ListBuffersResponse> ListBuffers();

  // The longest cached prefix of args.tokens into dst, block layout.
  absl::StatusOr<v1::GetToBufferResponse> GetToBuffer(const GetArgs& args, const BufferRef& dst);
  // Stores args.tokens' blocks, their bytes read from src (block layout).
  absl::StatusOr<v1::PutFromBufferResponse> PutFromBuffer(const PutArgs& args,
                                                          const BufferRef& src);
  // Compose into dst, prompt layout [layer][k|v][kv_head][total_tokens][head_dim].
  absl::StatusOr<v1::ComposeToBufferResponse> ComposeToBuffer(
      const std::string& model, const std::string& tenant,
      const std::vector<v1::ComposePart>& parts, const BufferRef& dst);
  // A session's range (nullopt: the document) into dst, prompt layout over the range; with
  // `layout`, at tokens [token_offset, token_offset + range) of the capacity layout
  // [layer][k|v][kv_head][capacity][head_dim] that dst holds (docs/sessions.md).
  absl::StatusOr<v1::ReadToBufferResponse> ReadToBuffer(
      const std::string& session_id, std::optional<v1::TokenRange> range,
      std::optional<int64_t> rope_table, const BufferRef& dst,
      std::optional<v1::TokenLayout> layout = std::nullopt);
  // Opens a session (header as Sessions.OpenSession, from_cache false) with its KV read from src
  // (prompt layout of the tokens, or tokens [token_offset, +n) of `layout`).
  absl::StatusOr<v1::OpenFromBufferResponse> OpenFromBuffer(
      const v1::OpenSessionHeader& header, const BufferRef& src,
      std::optional<v1::TokenLayout> layout = std::nullopt);
  // Fills header.range of a session with its KV read from src (layouts as OpenFromBuffer).
  absl::StatusOr<v1::FillFromBufferResponse> FillFromBuffer(
      const v1::FillHeader& header, const BufferRef& src,
      std::optional<v1::TokenLayout> layout = std::nullopt);
  // The K/V of a kept selection (Retrieval.Select with keep) at `layers` (empty: all) into dst:
  // [layer][k|v][rows][capacity][head_dim].
  absl::StatusOr<v1::GatherToBufferResponse> GatherToBuffer(const std::string& selection_id,
                                                            const std::vector<int32_t>& layers,
                                                            const BufferRef& dst);

  // GatherToBuffer for each (selection id, layers, dst) in one round trip: one
  // GatherBatchToBufferItem an item, in order, each with its own status (code, message). The
  // call's own error: INVALID_ARGUMENT for no items or more than 1024.
  struct GatherItem {
    std::string selection_id;
    std::vector<int32_t> layers;  // empty: all
    BufferRef dst;
  };
  absl::StatusOr<v1::GatherBatchToBufferResponse> GatherBatchToBuffer(
      const std::vector<GatherItem>& items);

  v1::DataPlane::Stub* stub() { return stub_.get(); }

 private:
  DataPlaneClient(Client::Options options, std::shared_ptr<grpc::Channel> channel);
  void Prepare(grpc::ClientContext* ctx) const;

  Client::Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::DataPlane::Stub> stub_;
};

}  // namespace ropekv::client

#endif  // ROPEKV_CLIENTS_CPP_DATAPLANE_CLIENT_H_
