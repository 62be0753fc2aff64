// CudaIpcBuffer: a GPU buffer of another process (a frontend's KV pool, a torch tensor), opened
// from its CUDA IPC handle, and the copies between host memory and it. The data plane
// (cache/buffer_registry.h) uses it for buffers registered by CUDA IPC handle.
//
// Copies go through pinned staging buffers owned by the CudaIpcBuffer (two, reused, grown to the
// largest piece asked for): a piece is produced into one while the other's copy to the device is
// in flight. Keys are re-rotated on the device by the kernel of kernels/rope/rerotate_cuda.h (one
// engine per model and buffer, kept), in place in the buffer or from device scratch into it.
// Built with CUDA: cache/cuda_ipc.cu; without: cache/cuda_ipc_nocuda.cc (Open answers
// UNAVAILABLE). No CUDA types here.
//
// Thread safety: Open and the accessors are thread-safe. A CudaIpcTransfer is used by one thread
// at a time; transfers of one buffer may run concurrently (each takes its own staging pair).
#ifndef ROPEKV_CACHE_CUDA_IPC_H_
#define ROPEKV_CACHE_CUDA_IPC_H_

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/rope/rope.h"
#include "kernels/topk/topk.h"

namespace ropekv {

// Bytes of a cudaIpcMemHandle_t.
inline constexpr size_t kCudaIpcHandleBytes = 64;

// Whether this build can open CUDA IPC handles: built with CUDA and a GPU is present.
bool CudaIpcAvailable();

class CudaIpcTransfer {
 public:
  virtual ~CudaIpcTransfer() = default;
  // Copies n bytes that `fill` writes into a host staging buffer (n bytes, pinned) to device bytes
  // [at, at + n) of the buffer, asynchronously. Errors of `fill` are returned as they are;
  // CUDA errors as INTERNAL. The caller keeps [at, at + n) inside the buffer.
  virtual absl::Status Produce(uint64_t at, uint64_t n,
                               absl::FunctionRef<absl::Status(void* dst)> fill) = 0;
  // Copies n host bytes at `src` to device bytes [at, at + n) asynchronously, without staging
  // (DMA when src is pinned; the driver stages pageable memory itself). src must stay valid and
  // unchanged until Finish.
  virtual absl::Status CopyIn(uint64_t at, const void* src, uint64_t n) = 0;
  // Copies device bytes [at, at + n) to a host staging buffer and hands them to `use`.
  virtual absl::Status Consume(uint64_t at, uint64_t n,
                               absl::FunctionRef<absl::Status(const void* src)> use) = 0;

  // The calls below address device memory directly: the buffer (DeviceAt) and the transfer's own
  // scratch. All work runs in order on the transfer's one stream. The caller keeps every access
  // inside the buffer or the scratch it asked for.

  // Device address of byte `at` of the buffer.
  virtual void* DeviceAt(uint64_t at) = 0;
  // Device memory of at least n bytes on the buffer's device, owned by the transfer; valid until
  // the next Scratch call (growing it first waits for the work queued). RESOURCE_EXHAUSTED when
  // the device has no room.
  virtual absl::StatusOr<void*> Scratch(uint64_t n) = 0;
  // Copies n host bytes at src to device address dst, asynchronously (as CopyIn).
  virtual absl::Status Upload(void* dst, const void* src, uint64_t n) = 0;
  // Copies `rows` rows of `width` host bytes (row i at src + i * spitch) to device rows at
  // dst + i * dpitch, asynchronously, in one cudaMemcpy2DAsync.
  virtual absl::Status Upload2D(void* dst, uint64_t dpitch, const void* src, uint64_t spitch,
                                uint64_t width, uint64_t rows) = 0;
  // Copies n device bytes at src, once the work queued before is done, to a host staging buffer
  // and hands them to `use`.
  virtual absl::Status Download(const void* src, uint64_t n,
                                absl::FunctionRef<absl::Status(const void* src)> use) = 0;
  // Enqueues one launch of the re-rotation kernel (RerotateEngine::RerotateCopyCuda, engine mode)
  // over `jobs`, whose pointers are device addresses (DeviceAt, Scratch). The engine of a model is
  // made on first use and kept with the buffer, keyed by `model_id`. INVALID_ARGUMENT as
  // RerotateCopyCuda (e.g. an unsupported head_dim); CUDA errors as INTERNAL.
  virtual absl::Status Rerotate(absl::string_view model_id, const RopeSpec& spec,
                                const KvGeometry& geometry,
                                absl::Span<const RerotateCopy> jobs) = 0;
  // Enqueues topk::GatherCuda over `req`, whose pointers are device addresses on the buffer's
  // device (the block arrays, indices and counts in Scratch, the blocks in device memory, the
  // destinations in the buffer). INVALID_ARGUMENT as GatherCuda; CUDA errors as INTERNAL.
  virtual absl::Status Gather(const topk::GatherRequest& req) = 0;
  // Waits for every copy issued; the first error, if any.
  virtual absl::Status Finish() = 0;
};

class CudaIpcBuffer {
 public:
  // Opens the allocation named by `handle` (kCudaIpcHandleBytes bytes) on `device` and takes
  // [offset, offset + size) of it (size 0: to the end of the allocation). The allocation's real
  // extent comes from the driver, not the caller. UNAVAILABLE without CUDA or a GPU;
  // INVALID_ARGUMENT for a handle of the wrong size, a device out of range, or a range past the
  // allocation; FAILED_PRECONDITION when the driver refuses the handle (a stale handle, or one
  // exported by this very process).
  static absl::StatusOr<std::unique_ptr<CudaIpcBuffer>> Open(int device, absl::string_view handle,
                                                             uint64_t offset, uint64_t size);
  // Closes the handle. Every transfer must have finished.
  ~CudaIpcBuffer();
  CudaIpcBuffer(const CudaIpcBuffer&) = delete;
  CudaIpcBuffer& operator=(const CudaIpcBuffer&) = delete;

  int device() const { return device_; }
  uint64_t size() const { return size_; }
  uint64_t allocation_bytes() const { return allocation_bytes_; }

  // A copy session over the buffer. RESOURCE_EXHAUSTED when no pinned staging can be had.
  absl::StatusOr<std::unique_ptr<CudaIpcTransfer>> BeginTransfer();

  struct Impl;

 private:
  CudaIpcBuffer(int device, uint64_t size, uint64_t allocation_bytes, std::unique_ptr<Impl> impl);

  int device_;
  uint64_t size_;
  uint64_t allocation_bytes_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_CUDA_IPC_H_
