// CudaIpcBuffer with CUDA: cudaIpcOpenMemHandle, the allocation's extent from the driver
// (cuMemGetAddressRange through the runtime's entry-point query, so the daemon does not link
// libcuda and still starts on machines without a driver), pinned double-buffered staging, device
// scratch and the re-rotation engines of the models copied through the buffer.
#include <cuda.h>  // driver types of the cuMemGetAddressRange entry point (no libcuda link)
#include <cuda_runtime_api.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cache/cuda_ipc.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device.h"
#include "kernels/rope/rerotate_cuda.h"

namespace ropekv {
namespace {

using GetAddressRangeFn = CUresult (*)(CUdeviceptr* base, size_t* bytes, CUdeviceptr ptr);

// cuMemGetAddressRange, or nullptr when the driver does not give it.
GetAddressRangeFn AddressRangeFn() {
  static GetAddressRangeFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &p, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // not sticky; keep later checks clean
      return static_cast<GetAddressRangeFn>(nullptr);
    }
    return reinterpret_cast<GetAddressRangeFn>(p);
  }();
  return fn;
}

// Two pinned host buffers, their "copy done" events and a stream: one transfer's worth.
struct Staging {
  int device = 0;
  cudaStream_t stream = nullptr;
  cudaEvent_t done[2] = {nullptr, nullptr};
  bool pending[2] = {false, false};
  void* host[2] = {nullptr, nullptr};
  size_t bytes[2] = {0, 0};
  void* scratch = nullptr;  // device memory, grown on demand
  size_t scratch_bytes = 0;

  ~Staging() {
    cudaSetDevice(device);
    if (stream != nullptr) cudaStreamSynchronize(stream);
    for (int i = 0; i < 2; ++i) {
      if (host[i] != nullptr) cudaFreeHost(host[i]);
      if (done[i] != nullptr) cudaEventDestroy(done[i]);
    }
    if (scratch != nullptr) cudaFree(scratch);
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  absl::Status Init() {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    for (int i = 0; i < 2; ++i) {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done[i], cudaEventDisableTiming));
    }
    return absl::OkStatus();
  }

  // Slot i free (its last copy done) and at least n bytes large.
  absl::Status Ready(int i, size_t n) {
    if (pending[i]) {
      pending[i] = false;
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(done[i]));
    }
    if (bytes[i] < n) {
      if (host[i] != nullptr) {
        ROPEKV_CUDA_RETURN_IF_ERROR(cudaFreeHost(host[i]));
        host[i] = nullptr;
        bytes[i] = 0;
      }
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaHostAlloc(&host[i], n, cudaHostAllocPortable));
      bytes[i] = n;
    }
    return absl::OkStatus();
  }
};

}  // namespace

struct CudaIpcBuffer::Impl {
  ~Impl() {
    cudaSetDevice(device);
    free.clear();
    engines.clear();
    if (base != nullptr) cudaIpcCloseMemHandle(base);
  }

  // The re-rotation engine of a model on this buffer's device, made on first use.
  absl::StatusOr<RerotateEngine*> Engine(absl::string_view model_id, const RopeSpec& spec) {
    absl::MutexLock lock(&mu);
    auto it = engines.find(model_id);
    if (it != engines.end()) return it->second.get();
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    auto engine = RerotateEngine::Create(spec);
    if (!engine.ok()) return engine.status();
    RerotateEngine* e = engine->get();
    engines.emplace(std::string(model_id), *std::move(engine));
    return e;
  }

  int device = 0;
  void* base = nullptr;      // what cudaIpcOpenMemHandle gave
  uint8_t* begin = nullptr;  // base + offset: the buffer
  absl::Mutex mu;
  std::vector<std::unique_ptr<Staging>> free ABSL_GUARDED_BY(mu);  // idle staging, reused
  // By model id. An engine is thread-safe; it stays until the buffer is unregistered.
  absl::flat_hash_map<std::string, std::unique_ptr<RerotateEngine>> engines ABSL_GUARDED_BY(mu);
};

namespace {

class Transfer final : public CudaIpcTransfer {
 public:
  Transfer(CudaIpcBuffer::Impl* buffer, std::unique_ptr<Staging> staging)
      : buffer_(buffer), staging_(std::move(staging)) {}

  ~Transfer() override {
    Finish().IgnoreError();
    absl::MutexLock lock(&buffer_->mu);
    buffer_->free.push_back(std::move(staging_));
  }

  absl::Status Produce(uint64_t at, uint64_t n,
                       absl::FunctionRef<absl::Status(void* dst)> fill) override {
    if (!status_.ok()) return status_;
    const int slot = next_;
    next_ ^= 1;
    absl::Status s = [&]() -> absl::Status {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(staging_->device));
      if (auto r = staging_->Ready(slot, n); !r.ok()) return r;
      if (auto r = fill(staging_->host[slot]); !r.ok()) return r;
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(buffer_->begin + at, staging_->host[slot], n,
                                                  cudaMemcpyHostToDevice, staging_->stream));
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(staging_->done[slot], staging_->stream));
      staging_->pending[slot] = true;
      return absl::OkStatus();
    }();
    if (!s.ok()) status_ = s;
    return s;
  }

  absl::Status CopyIn(uint64_t at, const void* src, uint64_t n) override {
    return Upload(buffer_->begin + at, src, n);
  }

  absl::Status Consume(uint64_t at, uint64_t n,
                       absl::FunctionRef<absl::Status(const void* src)> use) override {
    return Download(buffer_->begin + at, n, use);
  }

  void* DeviceAt(uint64_t at) override { return buffer_->begin + at; }

  absl::StatusOr<void*> Scratch(uint64_t n) override {
    if (!status_.ok()) return status_;
    if (staging_->scratch_bytes >= n) return staging_->scratch;
    absl::Status s = [&]() -> absl::Status {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(staging_->device));
      if (staging_->scratch != nullptr) {
        // Work queued may still read the old scratch.
        ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(staging_->stream));
        ROPEKV_CUDA_RETURN_IF_ERROR(cudaFree(staging_->scratch));
        staging_->scratch = nullptr;
        staging_->scratch_bytes = 0;
      }
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&staging_->scratch, n));
      staging_->scratch_bytes = n;
      return absl::OkStatus();
    }();
    if (!s.ok()) {
      status_ = s;
      return s;
    }
    return staging_->scratch;
  }

  absl::Status Upload(void* dst, const void* src, uint64_t n) override {
    return Enqueue([&]() -> absl::Status {
      ROPEKV_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, staging_->stream));
      return absl::OkStatus();
    });
  }

  absl::Status Upload2D(void* dst, uint64_t dpitch, const void* src, uint64_t spitch,
                        uint64_t width, uint64_t rows) override {
    return Enqueue([&]() -> absl::Status {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, rows,
                                                    cudaMemcpyHostToDevice, staging_->stream));
      return absl::OkStatus();
    });
  }

  absl::Status Download(const void* src, uint64_t n,
                        absl::FunctionRef<absl::Status(const void* src)> use) override {
    return Enqueue([&]() -> absl::Status {
      if (auto r = staging_->Ready(0, n); !r.ok()) return r;
      ROPEKV_CUDA_RETURN_IF_ERROR(
          cudaMemcpyAsync(staging_->host[0], src, n, cudaMemcpyDeviceToHost, staging_->stream));
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(staging_->stream));
      return use(staging_->host[0]);
    });
  }

  absl::Status Rerotate(absl::string_view model_id, const RopeSpec& spec,
                        const KvGeometry& geometry, absl::Span<const RerotateCopy> jobs) override {
    if (jobs.empty()) return status_;
    return Enqueue([&]() -> absl::Status {
      auto engine = buffer_->Engine(model_id, spec);
      if (!engine.ok()) return engine.status();
      return (*engine)->RerotateCopyCuda(geometry, jobs, RerotateMode::kEngine, staging_->stream);
    });
  }

  absl::Status Gather(const topk::GatherRequest& req) override {
    return Enqueue([&] { return topk::GatherCuda(req, staging_->stream); });
  }

  absl::Status Finish() override {
    if (finished_) return status_;
    finished_ = true;
    const absl::Status s = [&]() -> absl::Status {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(staging_->device));
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(staging_->stream));
      return absl::OkStatus();
    }();
    staging_->pending[0] = staging_->pending[1] = false;
    if (status_.ok()) status_ = s;
    return status_;
  }

 private:
  // Runs `work` on the buffer's device unless an earlier step failed; its error sticks.
  absl::Status Enqueue(absl::FunctionRef<absl::Status()> work) {
    if (!status_.ok()) return status_;
    absl::Status s = [&]() -> absl::Status {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(staging_->device));
      return work();
    }();
    if (!s.ok()) status_ = s;
    return s;
  }

  CudaIpcBuffer::Impl* buffer_;
  std::unique_ptr<Staging> staging_;
  int next_ = 0;
  bool finished_ = false;
  absl::Status status_;
};

}  // namespace

bool CudaIpcAvailable() { return GpuAvailable(); }

CudaIpcBuffer::CudaIpcBuffer(int device, uint64_t size, uint64_t allocation_bytes,
                             std::unique_ptr<Impl> impl)
    : device_(device), size_(size), allocation_bytes_(allocation_bytes), impl_(std::move(impl)) {}

CudaIpcBuffer::~CudaIpcBuffer() = default;

absl::StatusOr<std::unique_ptr<CudaIpcBuffer>> CudaIpcBuffer::Open(int device,
                                                                   absl::string_view handle,
                                                                   uint64_t offset, uint64_t size) {
  if (handle.size() != kCudaIpcHandleBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("a CUDA IPC handle has ", kCudaIpcHandleBytes, " bytes, got ", handle.size()));
  }
  if (!GpuAvailable()) {
    return absl::UnavailableError(
        "CUDA IPC buffers need a GPU; this ropekvd runs without one (use shared memory)");
  }
  int count = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " out of range [0, ", count, ")"));
  }
  GetAddressRangeFn range_fn = AddressRangeFn();
  if (range_fn == nullptr) {
    return absl::UnavailableError(
        "the CUDA driver gives no cuMemGetAddressRange: cannot check the size of an IPC buffer");
  }
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  cudaIpcMemHandle_t h;
  std::memcpy(&h, handle.data(), sizeof(h));
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  const cudaError_t err = cudaIpcOpenMemHandle(&impl->base, h, cudaIpcMemLazyEnablePeerAccess);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: a refused handle is the caller's problem, not a sticky one
    impl->base = nullptr;
    return absl::FailedPreconditionError(absl::StrCat(
        "cudaIpcOpenMemHandle on device ", device, ": ", cudaGetErrorString(err),
        " (a handle must come from another live process, for an allocation on this device)"));
  }
  CUdeviceptr alloc_base = 0;
  size_t alloc_bytes = 0;
  const CUresult r = range_fn(&alloc_base, &alloc_bytes, reinterpret_cast<CUdeviceptr>(impl->base));
  if (r != CUDA_SUCCESS) {
    return absl::InternalError(
        absl::StrCat("cuMemGetAddressRange of an opened IPC handle failed with CUresult ", r));
  }
  // The opened pointer may sit inside the allocation; the buffer can reach its end.
  const uint64_t skip = reinterpret_cast<CUdeviceptr>(impl->base) - alloc_base;
  const uint64_t avail = alloc_bytes - skip;
  if (offset > avail || size > avail - offset) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA IPC buffer [", offset, ", +", size,
                                                   ") leaves its allocation of ", avail, " bytes"));
  }
  const uint64_t usable = size == 0 ? avail - offset : size;
  if (usable == 0) {
    return absl::InvalidArgumentError("a CUDA IPC buffer of 0 bytes");
  }
  impl->begin = static_cast<uint8_t*>(impl->base) + offset;
  return std::unique_ptr<CudaIpcBuffer>(new CudaIpcBuffer(device, usable, avail, std::move(impl)));
}

absl::StatusOr<std::unique_ptr<CudaIpcTransfer>> CudaIpcBuffer::BeginTransfer() {
  std::unique_ptr<Staging> staging;
  {
    absl::MutexLock lock(&impl_->mu);
    if (!impl_->free.empty()) {
      staging = std::move(impl_->free.back());
      impl_->free.pop_back();
    }
  }
  if (staging == nullptr) {
    staging = std::make_unique<Staging>();
    staging->device = device_;
    if (auto s = staging->Init(); !s.ok()) return s;
  }
  return std::unique_ptr<CudaIpcTransfer>(new Transfer(impl_.get(), std::move(staging)));
}

}  // namespace ropekv
