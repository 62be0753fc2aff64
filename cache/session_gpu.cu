// SessionGpu with CUDA: a size-keyed free list over cudaMalloc, pinned double-buffered uploads, a
// stream pool, and one RerotateEngine per model key.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cache/session_gpu.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device.h"
#include "kernels/rope/rerotate_cuda.h"

namespace ropekv {
namespace {

// Pinned staging for uploads: two buffers of this size, filled by memcpy while the other's copy
// runs.
constexpr uint64_t kStagingBytes = 8ull << 20;

// What one call needs: a stream, its two pinned staging buffers and their events.
struct Lane {
  cudaStream_t stream = nullptr;
  void* host[2] = {nullptr, nullptr};
  cudaEvent_t done[2] = {nullptr, nullptr};

  ~Lane() {
    if (stream != nullptr) cudaStreamSynchronize(stream);
    for (int i = 0; i < 2; ++i) {
      if (host[i] != nullptr) cudaFreeHost(host[i]);
      if (done[i] != nullptr) cudaEventDestroy(done[i]);
    }
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  absl::Status Init() {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    return absl::OkStatus();
  }

  // Staging is made on the first upload: reads and launches do not need it.
  absl::Status InitStaging() {
    if (host[0] != nullptr) return absl::OkStatus();
    for (int i = 0; i < 2; ++i) {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&host[i], kStagingBytes, cudaHostAllocPortable));
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming));
    }
    return absl::OkStatus();
  }
};

}  // namespace

struct SessionGpu::Impl {
  ~Impl() {
    cudaSetDevice(device);
    lanes.clear();
    for (auto& [bytes, list] : cached) {
      for (void* p : list) cudaFree(p);
    }
  }

  // A lane for one call, returned to the pool by the caller.
  absl::StatusOr<std::unique_ptr<Lane>> TakeLane() {
    {
      absl::MutexLock lock(&mu);
      if (!lanes.empty()) {
        auto lane = std::move(lanes.back());
        lanes.pop_back();
        return lane;
      }
    }
    auto lane = std::make_unique<Lane>();
    if (auto s = lane->Init(); !s.ok()) return s;
    return lane;
  }
  void GiveLane(std::unique_ptr<Lane> lane) {
    absl::MutexLock lock(&mu);
    lanes.push_back(std::move(lane));
  }

  int device = 0;
  absl::Mutex mu;
  std::vector<std::unique_ptr<Lane>> lanes ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<uint64_t, std::vector<void*>> cached ABSL_GUARDED_BY(mu);  // by size
  uint64_t cached_bytes ABSL_GUARDED_BY(mu) = 0;
  uint64_t live_bytes ABSL_GUARDED_BY(mu) = 0;
  absl::flat_hash_map<std::string, std::shared_ptr<RerotateEngine>> engines ABSL_GUARDED_BY(mu);
};

namespace {

// Runs fn with a lane of `impl` on its device; the lane goes back to the pool afterwards (also on
// error: its stream is synchronized first, so nothing of the failed call is still in flight).
template <typename Fn>
absl::Status WithLane(SessionGpu::Impl* impl, Fn&& fn) {
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(impl->device));
  auto lane = impl->TakeLane();
  if (!lane.ok()) return lane.status();
  absl::Status s = fn(**lane);
  const cudaError_t sync = cudaStreamSynchronize((*lane)->stream);
  s.Update(CudaStatus(sync, "cudaStreamSynchronize", __FILE__, __LINE__));
  impl->GiveLane(*std::move(lane));
  return s;
}

}  // namespace

bool SessionGpuBuilt() { return true; }

bool SessionGpuSupportsHeadDim(int head_dim) { return RerotateEngine::SupportedHeadDim(head_dim); }

absl::StatusOr<std::shared_ptr<SessionGpu>> SessionGpu::Create(const Options& options) {
  if (!GpuAvailable()) {
    return absl::UnavailableError("no usable CUDA device");
  }
  int count = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", options.device, " out of range [0, ", count, ")"));
  }
  auto impl = std::make_unique<Impl>();
  impl->device = options.device;
  return std::shared_ptr<SessionGpu>(new SessionGpu(options, std::move(impl)));
}

SessionGpu::SessionGpu(const Options& options, std::unique_ptr<Impl> impl)
    : options_(options), impl_(std::move(impl)) {}

SessionGpu::~SessionGpu() = default;

absl::StatusOr<std::shared_ptr<void>> SessionGpu::Alloc(uint64_t bytes) {
  void* p = nullptr;
  {
    absl::MutexLock lock(&impl_->mu);
    auto it = impl_->cached.find(bytes);
    if (it != impl_->cached.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      impl_->cached_bytes -= bytes;
    }
    impl_->live_bytes += bytes;
  }
  if (p == nullptr) {
    // A new allocation: first give back cached ones (of other sizes) while live + cached would
    // pass the limit, so that the pool never holds more than the store's capacity for long.
    std::vector<void*> drop;
    {
      absl::MutexLock lock(&impl_->mu);
      for (auto& [size, list] : impl_->cached) {
        while (!list.empty() &&
               impl_->live_bytes + impl_->cached_bytes > options_.max_cached_bytes) {
          drop.push_back(list.back());
          list.pop_back();
          impl_->cached_bytes -= size;
        }
      }
    }
    if (!drop.empty()) {
      cudaSetDevice(impl_->device);
      for (void* q : drop) cudaFree(q);
    }
    const cudaError_t err = [&] {
      cudaError_t e = cudaSetDevice(impl_->device);
      return e == cudaSuccess ? cudaMalloc(&p, bytes == 0 ? 1 : bytes) : e;
    }();
    if (err != cudaSuccess) {
      cudaGetLastError();  // an out-of-memory error is not sticky; keep later checks clean
      {
        absl::MutexLock lock(&impl_->mu);
        impl_->live_bytes -= bytes;
      }
      return absl::ResourceExhaustedError(absl::StrCat(
          "cudaMalloc of ", bytes, " bytes for a session chunk: ", cudaGetErrorString(err)));
    }
  }
  std::shared_ptr<SessionGpu> self = shared_from_this();
  return std::shared_ptr<void>(p, [self, bytes](void* q) { self->Free(q, bytes); });
}

void SessionGpu::Free(void* p, uint64_t bytes) {
  {
    absl::MutexLock lock(&impl_->mu);
    impl_->live_bytes -= bytes;
    if (impl_->live_bytes + impl_->cached_bytes + bytes <= options_.max_cached_bytes) {
      impl_->cached[bytes].push_back(p);
      impl_->cached_bytes += bytes;
      return;
    }
  }
  cudaSetDevice(impl_->device);
  cudaFree(p);
}

uint64_t SessionGpu::pooled_bytes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->live_bytes + impl_->cached_bytes;
}

absl::Status SessionGpu::Upload(void* device_dst, const void* host_src, uint64_t n) {
  return WithLane(impl_.get(), [&](Lane& lane) -> absl::Status {
    if (auto s = lane.InitStaging(); !s.ok()) return s;
    bool pending[2] = {false, false};
    int slot = 0;
    for (uint64_t at = 0; at < n; at += kStagingBytes, slot ^= 1) {
      const uint64_t len = std::min(kStagingBytes, n - at);
      if (pending[slot]) ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(lane.done[slot]));
      std::memcpy(lane.host[slot], static_cast<const char*>(host_src) + at, len);
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(static_cast<char*>(device_dst) + at,
                                                  lane.host[slot], len, cudaMemcpyHostToDevice,
                                                  lane.stream));
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(lane.done[slot], lane.stream));
      pending[slot] = true;
    }
    return absl::OkStatus();
  });
}

absl::Status SessionGpu::Download(void* host_dst, const void* device_src, uint64_t n) {
  return WithLane(impl_.get(), [&](Lane& lane) -> absl::Status {
    if (n > 0) {
      ROPEKV_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(host_dst, device_src, n, cudaMemcpyDeviceToHost, lane.stream));
    }
    return absl::OkStatus();
  });
}

absl::Status SessionGpu::Download2D(void* host_dst, uint64_t dst_pitch, const void* device_src,
                                    uint64_t src_pitch, uint64_t row_bytes, uint64_t rows) {
  return WithLane(impl_.get(), [&](Lane& lane) -> absl::Status {
    if (rows > 0 && row_bytes > 0) {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(host_dst, dst_pitch, device_src, src_pitch,
                                                    row_bytes, rows, cudaMemcpyDeviceToHost,
                                                    lane.stream));
    }
    return absl::OkStatus();
  });
}

absl::Status SessionGpu::Rerotate(absl::string_view key, const RopeSpec& rope,
                                  const KvGeometry& geometry, absl::Span<const RerotateCopy> jobs) {
  std::shared_ptr<RerotateEngine> engine;
  {
    absl::MutexLock lock(&impl_->mu);
    auto it = impl_->engines.find(key);
    if (it != impl_->engines.end()) engine = it->second;
  }
  if (engine == nullptr) {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->device));
    auto made = RerotateEngine::Create(rope);
    if (!made.ok()) return made.status();
    absl::MutexLock lock(&impl_->mu);
    auto [it, inserted] =
        impl_->engines.emplace(std::string(key), std::shared_ptr<RerotateEngine>(*std::move(made)));
    engine = it->second;
  }
  return WithLane(impl_.get(), [&](Lane& lane) {
    return engine->RerotateCopyCuda(geometry, jobs, RerotateMode::kEngine, lane.stream);
  });
}

}  // namespace ropekv
