// The GPU side of device-resident sessions (cache/session.h, SessionStore::Options::device): a pool
// of device memory for session chunks, host <-> device copies (uploads through pinned staging),
// and the fused re-rotate-and-copy launch (kernels/rope/rerotate_cuda.h) with one RerotateEngine
// per model, made on first use. Built from session_gpu.cu with CUDA; from session_gpu_nocuda.cc
// without (Create answers UNAVAILABLE, so the store keeps its host path). No CUDA types here.
//
// Every copy and launch is synchronous (it returns once the bytes are where they go): callers are
// the store's writers and readers, one request at a time, and each call takes its own stream from
// a pool so that concurrent requests overlap on the device.
//
// Thread safety: thread-safe. The pool's memory is given back to it when the last owner of an
// allocation lets go (from any thread); the SessionGpu must outlive every allocation, which the
// deleters ensure by holding a shared_ptr to it.
#ifndef ROPEKV_CACHE_SESSION_GPU_H_
#define ROPEKV_CACHE_SESSION_GPU_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/rope/rope.h"

namespace ropekv {

// Whether this build has the CUDA path of sessions.
bool SessionGpuBuilt();

// Whether the rope kernel handles this head_dim (RerotateEngine::SupportedHeadDim); always false
// without CUDA. Sessions of other models stay in host memory.
bool SessionGpuSupportsHeadDim(int head_dim);

class SessionGpu : public std::enable_shared_from_this<SessionGpu> {
 public:
  struct Options {
    int device = 0;  // CUDA device ordinal
    // Live + cached bytes beyond which freed allocations go back to the driver (and cached ones
    // of other sizes are given back before a new allocation). The store sets it to its capacity.
    uint64_t max_cached_bytes = 4ull << 30;
  };

  // UNAVAILABLE without CUDA or a GPU; INVALID_ARGUMENT for a device out of range.
  static absl::StatusOr<std::shared_ptr<SessionGpu>> Create(const Options& options);
  ~SessionGpu();
  SessionGpu(const SessionGpu&) = delete;
  SessionGpu& operator=(const SessionGpu&) = delete;

  int device() const { return options_.device; }

  // `bytes` of device memory (a freed allocation of the same size is reused). The memory returns
  // to the pool when the last copy of the pointer is destroyed. RESOURCE_EXHAUSTED when the device
  // has no room.
  absl::StatusOr<std::shared_ptr<void>> Alloc(uint64_t bytes);
  // Device bytes the pool holds: live allocations plus cached ones.
  uint64_t pooled_bytes() const;

  // Host -> device, through pinned staging (src may be pageable). INTERNAL for CUDA errors.
  absl::Status Upload(void* device_dst, const void* host_src, uint64_t n);
  // Device -> host (dst may be pageable or pinned).
  absl::Status Download(void* host_dst, const void* device_src, uint64_t n);
  // `rows` rows of `row_bytes` each, device -> host, row r from device_src + r * src_pitch to
  // host_dst + r * dst_pitch (bytes between rows of dst are not touched).
  absl::Status Download2D(void* host_dst, uint64_t dst_pitch, const void* device_src,
                          uint64_t src_pitch, uint64_t row_bytes, uint64_t rows);

  // Runs `jobs` (src and dst device pointers on this device) as ONE launch of the rope kernel of
  // `rope` (RerotateEngine::RerotateCopyCuda, engine-consistent angles) and waits for it. `key`
  // names the model (its engine, frequency tables included, is made once per key). Errors as
  // RerotateCopyCuda.
  absl::Status Rerotate(absl::string_view key, const RopeSpec& rope, const KvGeometry& geometry,
                        absl::Span<const RerotateCopy> jobs);

  struct Impl;

 private:
  SessionGpu(const Options& options, std::unique_ptr<Impl> impl);
  void Free(void* p, uint64_t bytes);

  Options options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_SESSION_GPU_H_
