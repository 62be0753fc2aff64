// One place where CUDA errors become absl::Status: ROPEKV_CUDA_RETURN_IF_ERROR(expr) returns
// INTERNAL (or RESOURCE_EXHAUSTED for out-of-memory) with cudaGetErrorString, file and line.
// Only included by .cu files and CUDA-aware .cc files (built when ROPEKV_WITH_CUDA).
#ifndef ROPEKV_KERNELS_COMMON_CUDA_CHECK_H_
#define ROPEKV_KERNELS_COMMON_CUDA_CHECK_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ropekv {

inline absl::Status CudaStatus(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  std::string msg = absl::StrCat(expr, ": ", cudaGetErrorString(err), " (", file, ":", line, ")");
  if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    return absl::UnavailableError(msg);
  }
  return absl::InternalError(msg);
}

}  // namespace ropekv

#define ROPEKV_CUDA_RETURN_IF_ERROR(expr)                                              \
  do {                                                                                 \
    ::absl::Status _ropekv_cuda_status = ::ropekv::CudaStatus((expr), #expr, __FILE__, \
                                                              __LINE__);               \
    if (!_ropekv_cuda_status.ok()) return _ropekv_cuda_status;                         \
  } while (0)

#endif  // ROPEKV_KERNELS_COMMON_CUDA_CHECK_H_
