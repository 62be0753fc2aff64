// SessionGpu in a build without CUDA: absent, so that the store keeps every session in host memory.
#include "cache/session_gpu.h"

namespace ropekv {

struct SessionGpu::Impl {};

namespace {
absl::Status NotBuilt() { return absl::UnavailableError("this ropekvd was built without CUDA"); }
}  // namespace

bool SessionGpuBuilt() { return false; }
bool SessionGpuSupportsHeadDim(int /*head_dim*/) { return false; }

absl::StatusOr<std::shared_ptr<SessionGpu>> SessionGpu::Create(const Options& /*options*/) {
  return NotBuilt();
}

SessionGpu::SessionGpu(const Options& options, std::unique_ptr<Impl> impl)
    : options_(options), impl_(std::move(impl)) {}
SessionGpu::~SessionGpu() = default;

absl::StatusOr<std::shared_ptr<void>> SessionGpu::Alloc(uint64_t /*bytes*/) { return NotBuilt(); }
uint64_t SessionGpu::pooled_bytes() const { return 0; }
void SessionGpu::Free(void* /*p*/, uint64_t /*bytes*/) {}
absl::Status SessionGpu::Upload(void*, const void*, uint64_t) { return NotBuilt(); }
absl::Status SessionGpu::Download(void*, const void*, uint64_t) { return NotBuilt(); }
absl::Status SessionGpu::Download2D(void*, uint64_t, const void*, uint64_t, uint64_t, uint64_t) {
  return NotBuilt();
}
absl::Status SessionGpu::Rerotate(absl::string_view, const RopeSpec&, const KvGeometry&,
                                  absl::Span<const RerotateCopy>) {
  return NotBuilt();
}

}  // namespace ropekv
