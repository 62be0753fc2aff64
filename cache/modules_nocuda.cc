// The CUDA path of the daemon's Attend check in a build without CUDA.
#include "cache/modules_cuda.h"

namespace ropekv {

bool ApeCudaBuilt() { return false; }

absl::Status ApeAttentionCudaFromHost(const ApeArgs& host_args,
                                      absl::Span<const HostRegion> regions) {
  return absl::UnimplementedError("this ropekv was built without CUDA (ROPEKV_CUDA=OFF)");
}

}  // namespace ropekv
