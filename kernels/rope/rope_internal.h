// Helpers shared by the CPU reference and the CUDA launcher of kernels/rope. Not public API.
#ifndef ROPEKV_KERNELS_ROPE_ROPE_INTERNAL_H_
#define ROPEKV_KERNELS_ROPE_ROPE_INTERNAL_H_

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace rope_internal {

// Validates a spec, a geometry that must match it, and every job (counts, null pointers,
// positions, strides, table ids). INVALID_ARGUMENT naming the job and field, else OK.
absl::Status ValidateJobs(const RopeSpec& spec, const KvGeometry& geometry,
                          absl::Span<const RerotateCopy> jobs);

}  // namespace rope_internal
}  // namespace ropekv

#endif  // ROPEKV_KERNELS_ROPE_ROPE_INTERNAL_H_
