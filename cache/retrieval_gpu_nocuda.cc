// RetrievalGpu in a build without CUDA: absent, so that the store keeps SelectCpu.
#include "cache/retrieval_gpu.h"

namespace ropekv {

struct RetrievalGpu::Impl {};

namespace {
absl::Status NotBuilt() { return absl::UnavailableError("this ropekvd was built without CUDA"); }
}  // namespace

bool RetrievalGpuBuilt() { return false; }

absl::StatusOr<std::unique_ptr<RetrievalGpu>> RetrievalGpu::Create(
    int /*device*/, uint64_t /*meta_capacity_bytes*/) {
  return NotBuilt();
}

RetrievalGpu::RetrievalGpu(int device, std::unique_ptr<Impl> impl)
    : device_(device), impl_(std::move(impl)) {}
RetrievalGpu::~RetrievalGpu() = default;

uint64_t RetrievalGpu::arena_bytes() const { return 0; }
uint64_t RetrievalGpu::keys_read_in_place() const { return 0; }
uint64_t RetrievalGpu::meta_bytes() const { return 0; }
uint64_t RetrievalGpu::meta_pages_uploaded() const { return 0; }

absl::Status RetrievalGpu::BuildPageMeta(const topk::MatrixView& /*device_keys*/,
                                         const topk::PageMetaShape& /*shape*/,
                                         void* /*host_meta*/) {
  return NotBuilt();
}

absl::Status RetrievalGpu::Select(const topk::SelectRequest& /*host_req*/,
                                  const topk::SelectResult& /*host_result*/,
                                  const MetaName* /*meta_name*/, bool /*keys_from_one_pool*/) {
  return NotBuilt();
}

std::vector<absl::Status> RetrievalGpu::SelectBatch(absl::Span<const BatchItem> items) {
  return std::vector<absl::Status>(items.size(), NotBuilt());
}

}  // namespace ropekv
