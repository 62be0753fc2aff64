// The APE merge on a CUDA device from host buffers (the daemon's Attend check). Not a hot path:
// it allocates, copies and synchronizes per call.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/modules_cuda.h"
#include "kernels/common/cuda_check.h"

namespace ropekv {
namespace {

// Device allocations freed on scope exit (after the stream was synchronized or on error).
class DeviceAllocs {
 public:
  DeviceAllocs() = default;
  DeviceAllocs(const DeviceAllocs&) = delete;
  DeviceAllocs& operator=(const DeviceAllocs&) = delete;
  ~DeviceAllocs() {
    for (void* p : ptrs_) cudaFree(p);
  }
  absl::Status Alloc(size_t bytes, void** out) {
    *out = nullptr;
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaMalloc(out, bytes == 0 ? 16 : bytes));
    ptrs_.push_back(*out);
    return absl::OkStatus();
  }

 private:
  std::vector<void*> ptrs_;
};

class Stream {
 public:
  Stream() = default;
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    if (stream_ != nullptr) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
  }
  absl::Status Create() {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    return absl::OkStatus();
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace

bool ApeCudaBuilt() { return true; }

absl::Status ApeAttentionCudaFromHost(const ApeArgs& host_args,
                                      absl::Span<const HostRegion> regions) {
  if (absl::Status st = ValidateApeArgs(host_args); !st.ok()) return st;
  const AttentionShape& s = host_args.shape;
  // Declared before the stream so that the stream is synchronized before anything is freed.
  DeviceAllocs allocs;
  Stream stream;
  if (absl::Status st = stream.Create(); !st.ok()) return st;
  std::vector<void*> device(regions.size(), nullptr);
  for (size_t r = 0; r < regions.size(); ++r) {
    if (absl::Status st = allocs.Alloc(regions[r].bytes, &device[r]); !st.ok()) return st;
    if (regions[r].bytes > 0) {
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(device[r], regions[r].data, regions[r].bytes,
                                                  cudaMemcpyHostToDevice, stream.get()));
    }
  }
  // A host pointer -> the same offset in its region's device copy.
  const char* outside = nullptr;  // the first pointer found outside every region
  auto rebase = [&](const void* p, const char* what) -> const void* {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    for (size_t r = 0; r < regions.size(); ++r) {
      const uintptr_t b = reinterpret_cast<uintptr_t>(regions[r].data);
      if (a >= b && a < b + regions[r].bytes) return static_cast<const char*>(device[r]) + (a - b);
    }
    if (outside == nullptr) outside = what;
    return nullptr;
  };
  auto rebase_all = [&](absl::Span<const KvSegment> segs, const char* group) {
    std::vector<KvSegment> out(segs.begin(), segs.end());
    for (KvSegment& g : out) {
      if (g.tokens == 0) continue;
      g.k = rebase(g.k, group);
      g.v = rebase(g.v, group);
    }
    return out;
  };
  const std::vector<KvSegment> context = rebase_all(host_args.context, "a context segment");
  const std::vector<KvSegment> other = rebase_all(host_args.other, "an other segment");
  ApeArgs dev = host_args;
  dev.q = rebase(host_args.q, "q");
  if (outside != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("ApeAttentionCudaFromHost: ", outside, " points outside every host region"));
  }
  dev.context = context;
  dev.other = other;
  const size_t rows = static_cast<size_t>(s.num_queries) * s.q_heads;
  const size_t out_bytes = rows * s.head_dim * DTypeSize(s.out_dtype);
  void* out = nullptr;
  if (absl::Status st = allocs.Alloc(out_bytes, &out); !st.ok()) return st;
  dev.out = out;
  void* lse = nullptr;
  if (host_args.lse != nullptr) {
    if (absl::Status st = allocs.Alloc(rows * sizeof(float), &lse); !st.ok()) return st;
  }
  dev.lse = static_cast<float*>(lse);
  // Poisoned (NaN bytes): an element the kernel does not write comes back NaN.
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(out, 0xFF, out_bytes, stream.get()));
  if (lse != nullptr) {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(lse, 0xFF, rows * sizeof(float), stream.get()));
  }
  absl::StatusOr<size_t> ws_bytes = ApeCudaWorkspaceBytes(dev);
  if (!ws_bytes.ok()) return ws_bytes.status();
  void* ws = nullptr;
  if (absl::Status st = allocs.Alloc(*ws_bytes, &ws); !st.ok()) return st;
  if (absl::Status st = ApeAttentionCuda(dev, ws, *ws_bytes, stream.get()); !st.ok()) return st;
  ROPEKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(host_args.out, out, out_bytes, cudaMemcpyDeviceToHost, stream.get()));
  if (host_args.lse != nullptr) {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(host_args.lse, lse, rows * sizeof(float),
                                                cudaMemcpyDeviceToHost, stream.get()));
  }
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream.get()));
  return absl::OkStatus();
}

}  // namespace ropekv
