// CUDA half of the GPU tier: the arena, the two streams, batches as events.
#include <cuda_runtime_api.h>

#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cache/gpu_tier.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device.h"

namespace ropekv {

struct GpuTier::Impl {
  int device = 0;
  char* arena = nullptr;            // [chunks][chunk_bytes] device memory
  cudaStream_t upload = nullptr;    // host -> GPU
  cudaStream_t download = nullptr;  // GPU -> host

  absl::Mutex mu;
  Ticket next_ticket ABSL_GUARDED_BY(mu) = 1;
  absl::flat_hash_map<Ticket, cudaEvent_t> pending ABSL_GUARDED_BY(mu);
  std::vector<cudaEvent_t> spare ABSL_GUARDED_BY(mu);  // completed events, for reuse

  ~Impl() {
    // Destruction cannot report errors; finish outstanding copies, then release everything.
    if (cudaSetDevice(device) != cudaSuccess) return;
    if (upload != nullptr) {
      cudaStreamSynchronize(upload);
      cudaStreamDestroy(upload);
    }
    if (download != nullptr) {
      cudaStreamSynchronize(download);
      cudaStreamDestroy(download);
    }
    absl::MutexLock lock(&mu);
    for (auto& [t, e] : pending) cudaEventDestroy(e);
    for (cudaEvent_t e : spare) cudaEventDestroy(e);
    if (arena != nullptr) cudaFree(arena);
  }
};

absl::StatusOr<std::unique_ptr<GpuTier>> GpuTier::Create(const Options& options) {
  auto chunks = CheckOptions(options);
  if (!chunks.ok()) return chunks.status();
  if (!GpuAvailable()) {
    return absl::UnavailableError("GPU tier absent: no CUDA device is available");
  }
  int count = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (options.device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU tier device must be in [0, ", count, "), got ", options.device));
  }
  auto impl = std::make_unique<Impl>();
  impl->device = options.device;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(options.device));
  void* arena = nullptr;
  const uint64_t arena_bytes = *chunks * options.chunk_bytes;
  const cudaError_t err = cudaMalloc(&arena, arena_bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) allocation error
    return absl::ResourceExhaustedError(absl::StrCat("GPU tier: cudaMalloc of ", arena_bytes,
                                                     " bytes failed: ", cudaGetErrorString(err)));
  }
  impl->arena = static_cast<char*>(arena);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&impl->upload, cudaStreamNonBlocking));
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&impl->download, cudaStreamNonBlocking));
  return std::unique_ptr<GpuTier>(new GpuTier(options, *chunks, std::move(impl)));
}

GpuTier::GpuTier(const Options& options, uint64_t chunks, std::unique_ptr<Impl> impl)
    : options_(options), slots_(chunks, options.chunk_bytes), impl_(std::move(impl)) {}

GpuTier::~GpuTier() = default;

void* GpuTier::SlotPointer(GpuSlot slot) const {
  if (slots_.SlotBytes(slot) == 0) return nullptr;
  return impl_->arena + slot;
}

absl::StatusOr<GpuTier::Ticket> GpuTier::Enqueue(absl::Span<const GpuMove> moves, bool to_device) {
  if (auto s = CheckMoves(moves); !s.ok()) return s;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->device));
  const cudaStream_t stream = to_device ? impl_->upload : impl_->download;
  uint64_t bytes = 0;
  Ticket ticket = 0;
  {
    // One batch at a time per tier keeps a batch's copies contiguous on its stream.
    absl::MutexLock lock(&impl_->mu);
    cudaEvent_t event = nullptr;
    if (!impl_->spare.empty()) {
      event = impl_->spare.back();
      impl_->spare.pop_back();
    } else {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    }
    for (const GpuMove& m : moves) {
      if (m.bytes == 0) continue;
      char* dev = impl_->arena + m.slot;
      const cudaError_t err =
          to_device ? cudaMemcpyAsync(dev, m.host, m.bytes, cudaMemcpyHostToDevice, stream)
                    : cudaMemcpyAsync(m.host, dev, m.bytes, cudaMemcpyDeviceToHost, stream);
      if (err != cudaSuccess) {
        impl_->spare.push_back(event);
        return CudaStatus(err, "cudaMemcpyAsync", __FILE__, __LINE__);
      }
      bytes += m.bytes;
    }
    if (const cudaError_t err = cudaEventRecord(event, stream); err != cudaSuccess) {
      impl_->spare.push_back(event);
      return CudaStatus(err, "cudaEventRecord", __FILE__, __LINE__);
    }
    ticket = impl_->next_ticket++;
    impl_->pending.emplace(ticket, event);
  }
  absl::MutexLock lock(&mu_);
  ++counters_.batches;
  (to_device ? counters_.bytes_in : counters_.bytes_out) += bytes;
  return ticket;
}

absl::Status GpuTier::Wait(Ticket ticket) {
  cudaEvent_t event = nullptr;
  {
    absl::MutexLock lock(&impl_->mu);
    auto it = impl_->pending.find(ticket);
    if (it == impl_->pending.end()) {
      return absl::NotFoundError(absl::StrCat("GPU tier: no pending batch with ticket ", ticket));
    }
    event = it->second;
    impl_->pending.erase(it);
  }
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->device));
  const cudaError_t err = cudaEventSynchronize(event);
  absl::MutexLock lock(&impl_->mu);
  impl_->spare.push_back(event);
  return CudaStatus(err, "cudaEventSynchronize", __FILE__, __LINE__);
}

absl::StatusOr<bool> GpuTier::Poll(Ticket ticket) {
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(impl_->device));
  absl::MutexLock lock(&impl_->mu);
  auto it = impl_->pending.find(ticket);
  if (it == impl_->pending.end()) {
    return absl::NotFoundError(absl::StrCat("GPU tier: no pending batch with ticket ", ticket));
  }
  const cudaError_t err = cudaEventQuery(it->second);
  if (err == cudaErrorNotReady) return false;
  ROPEKV_CUDA_RETURN_IF_ERROR(err);
  return true;
}

}  // namespace ropekv
