// The APE merge on a CUDA device for callers that hold their buffers in host memory (the daemon's
// Attend check): copies the buffers to the device, runs ApeAttentionCuda, copies the output back.
// Built from modules_cuda.cu with CUDA, from modules_nocuda.cc (UNIMPLEMENTED) without. No CUDA
// types in this header.
#ifndef ROPEKV_CACHE_MODULES_CUDA_H_
#define ROPEKV_CACHE_MODULES_CUDA_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/ape/ape.h"

namespace ropekv {

// A host buffer that pointers of an ApeArgs point into.
struct HostRegion {
  const void* data = nullptr;
  size_t bytes = 0;
};

// Whether this build has the CUDA path.
bool ApeCudaBuilt();

// Runs the APE merge of `host_args` on the current CUDA device. Every input pointer of host_args
// (q and each segment's k and v) must point into one of `regions` (host memory), which are copied
// to the device whole; out and lse (host, may be null for lse) receive the results. Synchronous:
// returns once the results are in host memory. Errors: INVALID_ARGUMENT as ApeAttentionCuda, or
// for a pointer outside every region; INTERNAL / RESOURCE_EXHAUSTED for CUDA errors; UNIMPLEMENTED
// in builds without CUDA. Thread-safe.
absl::Status ApeAttentionCudaFromHost(const ApeArgs& host_args,
                                      absl::Span<const HostRegion> regions);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_MODULES_CUDA_H_
