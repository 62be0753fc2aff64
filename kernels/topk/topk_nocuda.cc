// The CUDA entry points of kernels/topk in a build without CUDA: they exist so that callers need
// no #ifdef, and say UNIMPLEMENTED.
#include "kernels/topk/topk.h"

namespace ropekv {
namespace topk {
namespace {

absl::Status NoCuda() {
  return absl::UnimplementedError("ropekv was built without CUDA; use the *Cpu functions");
}

}  // namespace

absl::Status BuildPageMetaCuda(const MatrixView&, const PageMetaShape&, const MutableMatrixView&,
                               cudaStream_t, int*) {
  return NoCuda();
}
absl::Status AppendPageMetaCuda(const MatrixView&, const PageMetaShape&, int64_t,
                                const MutableMatrixView&, cudaStream_t) {
  return NoCuda();
}
absl::Status SelectCuda(const SelectRequest&, const SelectResult&, void*, size_t, cudaStream_t) {
  return NoCuda();
}
absl::Status ScoreCuda(const SelectRequest&, float*, cudaStream_t) { return NoCuda(); }
absl::Status PageBoundCuda(const SelectRequest&, float*, cudaStream_t) { return NoCuda(); }
absl::Status TopKCuda(const float*, int64_t, int64_t, int64_t, int32_t*, void*, size_t,
                      cudaStream_t) {
  return NoCuda();
}
absl::Status GatherCuda(const GatherRequest&, cudaStream_t) { return NoCuda(); }

}  // namespace topk
}  // namespace ropekv
