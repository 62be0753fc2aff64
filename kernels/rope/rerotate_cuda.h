// CUDA re-rotate-and-copy: the GPU version of RerotateCopyCpu (kernels/rope/rope.h). One kernel
// launch moves every job's K and V from source regions (tier blocks) to destinations, re-rotating
// the keys' rotary dims from the position/table they were rotated at to the target, in fp32 with
// one rounding; values and pass-through dims are plain 16-byte moves. Results equal the CPU
// reference (bit for bit, except where the two libraries' fp64 sin/cos round to different fp32
// coefficients: rare, 1 ulp).
//
// No CUDA types here beyond the opaque stream handle; include from any .cc.
#ifndef ROPEKV_KERNELS_ROPE_REROTATE_CUDA_H_
#define ROPEKV_KERNELS_ROPE_REROTATE_CUDA_H_

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/rope/rope.h"

typedef struct CUstream_st* cudaStream_t;

namespace ropekv {

// Re-rotation engine of one model (RopeSpec) on the current CUDA device.
//
// Holds the host cache of the model's frequency tables (inv_freq per RopeTableId, computed as HF
// does) and a pool of pinned staging buffers + device buffers through which each launch uploads
// its job list and the tables its jobs use (cudaMemcpyAsync on the caller's stream; a staging
// buffer is reused only once the event recorded after its kernel has completed, checked with
// cudaEventQuery: no host synchronization on the launch path). Thread-safe: launches from several
// threads serialize on an internal mutex only for the host-side bookkeeping.
class RerotateEngine {
 public:
  // Supported head dims (FlashInfer-style dispatch; others -> INVALID_ARGUMENT).
  static bool SupportedHeadDim(int head_dim) {
    return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 || head_dim == 256;
  }

  // INVALID_ARGUMENT for an invalid spec or an unsupported head_dim; UNAVAILABLE without a
  // device. The engine is bound to the device current at Create.
  static absl::StatusOr<std::unique_ptr<RerotateEngine>> Create(const RopeSpec& spec);

  ~RerotateEngine();
  RerotateEngine(const RerotateEngine&) = delete;
  RerotateEngine& operator=(const RerotateEngine&) = delete;

  // Launches one kernel on `stream` doing every job of `jobs` (src/dst are device pointers; the
  // span itself is host memory and may be freed on return). Semantics as RerotateCopyCpu: keys
  // re-rotated from (from_pos + t, from_table) to (to_pos + t, to_table), one rounding; values
  // and pass-through dims bit-exact; from == to copies bit-exact; in place allowed when src and
  // dst regions are identical; dst regions of different jobs must not overlap. Returns after
  // enqueueing (asynchronous: the caller synchronizes the stream before reading dst).
  // Vector width: 16-byte loads/stores when every job's pointers and strides allow it, else the
  // widest width that all allow (down to one element).
  // Errors: INVALID_ARGUMENT as RerotateCopyCpu, plus unsupported head_dim; INTERNAL /
  // RESOURCE_EXHAUSTED for CUDA failures (launch errors are checked with cudaGetLastError).
  absl::Status RerotateCopyCuda(const KvGeometry& geometry, absl::Span<const RerotateCopy> jobs,
                                RerotateMode mode, cudaStream_t stream);

  const RopeSpec& spec() const { return spec_; }

 private:
  struct Impl;
  RerotateEngine(const RopeSpec& spec, std::unique_ptr<Impl> impl);

  RopeSpec spec_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ropekv

#endif  // ROPEKV_KERNELS_ROPE_REROTATE_CUDA_H_
