// Whether a CUDA device can run kernels here. False in builds without CUDA and on machines
// without a GPU (CI), where GPU tests GTEST_SKIP and the daemon runs on its CPU paths.
#ifndef ROPEKV_KERNELS_COMMON_DEVICE_H_
#define ROPEKV_KERNELS_COMMON_DEVICE_H_

namespace ropekv {

// Thread-safe; the answer is computed once.
bool GpuAvailable();

}  // namespace ropekv

#endif  // ROPEKV_KERNELS_COMMON_DEVICE_H_
