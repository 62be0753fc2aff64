// How the cache moves blocks between its tiers (GPU, host, disk): where Puts land, when blocks
// are written through to disk, promoted on reads and demoted under pressure, and per-model
// limits. Plain data with parsers for the daemon's configuration; KvCache applies it.
#ifndef ROPEKV_CACHE_TIER_POLICY_H_
#define ROPEKV_CACHE_TIER_POLICY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ropekv {

// The tier a Put's blocks are kept in once it is acknowledged (besides disk with write-through).
enum class WriteTier : uint8_t {
  kGpu = 1,   // host staging copy plus a GPU copy (blocks larger than a GPU slot stay on host)
  kHost = 2,  // host memory
  kDisk = 3,  // disk only: the host copy is dropped once the disk has the block
};
// "gpu", "host" or "disk"; INVALID_ARGUMENT otherwise.
absl::StatusOr<WriteTier> ParseWriteTier(absl::string_view text);
const char* WriteTierName(WriteTier tier);

// Limits of one model, on top of the global capacities.
struct ModelLimit {
  std::string model;        // model name or id
  uint64_t host_bytes = 0;  // host tier bytes the model may hold; 0 = no limit of its own
  uint64_t disk_bytes = 0;  // disk tier bytes the model may hold; 0 = no limit of its own
};

// Parses "NAME=host:SIZE,disk:SIZE;NAME2=host:SIZE" (sizes as ParseByteSize). An empty text is
// no limits. INVALID_ARGUMENT naming the entry otherwise.
absl::StatusOr<std::vector<ModelLimit>> ParseModelLimits(absl::string_view text);
std::string FormatModelLimits(const std::vector<ModelLimit>& limits);

// "2GiB", "512MiB", "64k", "1048576": binary multiples k, M, G, T with optional "iB"/"B".
// INVALID_ARGUMENT otherwise.
absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text);

struct TierPolicy {
  // Where Puts keep their blocks.
  WriteTier write_tier = WriteTier::kHost;
  // Puts are written to the disk tier before they are acknowledged (durability per the disk
  // tier's setting). Off: blocks reach the disk only when demoted from the host.
  bool write_through = true;
  // A read of a block that is only on disk (or only on the GPU) keeps the host copy it makes.
  // Off: the copy is freed when the read ends.
  bool promote_on_read = true;
  // A read also uploads the blocks it reads to the GPU tier (batched, after the host copy).
  bool gpu_promote_on_read = false;
  // Demotion starts when a tier is fuller than high_watermark of its capacity and frees down to
  // low_watermark (by a background pass; a full tier also frees on demand).
  double high_watermark = 0.95;
  double low_watermark = 0.85;
  std::vector<ModelLimit> model_limits;
};

// INVALID_ARGUMENT unless 0 < low_watermark < high_watermark <= 1 and no model is listed twice.
absl::Status ValidateTierPolicy(const TierPolicy& policy);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_TIER_POLICY_H_
