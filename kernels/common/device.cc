#include "kernels/common/device.h"

#ifdef ROPEKV_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ropekv {

bool GpuAvailable() {
#ifdef ROPEKV_WITH_CUDA
  static const bool available = [] {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
  }();
  return available;
#else
  return false;
#endif
}

}  // namespace ropekv
