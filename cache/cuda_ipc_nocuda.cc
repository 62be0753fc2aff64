// CudaIpcBuffer in a build without CUDA: absent, and saying so.
#include "cache/cuda_ipc.h"

namespace ropekv {

struct CudaIpcBuffer::Impl {};

bool CudaIpcAvailable() { return false; }

CudaIpcBuffer::CudaIpcBuffer(int device, uint64_t size, uint64_t allocation_bytes,
                             std::unique_ptr<Impl> impl)
    : device_(device), size_(size), allocation_bytes_(allocation_bytes), impl_(std::move(impl)) {}

CudaIpcBuffer::~CudaIpcBuffer() = default;

absl::StatusOr<std::unique_ptr<CudaIpcBuffer>> CudaIpcBuffer::Open(int device,
                                                                   absl::string_view handle,
                                                                   uint64_t offset, uint64_t size) {
  return absl::UnavailableError(
      "CUDA IPC buffers need a CUDA build of ropekvd; this one was built without CUDA (use "
      "shared memory)");
}

absl::StatusOr<std::unique_ptr<CudaIpcTransfer>> CudaIpcBuffer::BeginTransfer() {
  return absl::UnavailableError("CUDA IPC buffers need a CUDA build of ropekvd");
}

}  // namespace ropekv
