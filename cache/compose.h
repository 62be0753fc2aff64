// Compose: the KV of a whole prompt assembled from cached parts — prefixes and position-independent
// segments — each placed at its own position. Keys are re-rotated from their stored copy in one
// rotation where a part sits elsewhere than it was rotated at; values are copied bit for bit.
//
// The parts' blocks stay held (never evicted) for the life of the ComposedPrompt; the prompt is
// produced one layer at a time so that a server can stream it without building it whole.
#ifndef ROPEKV_CACHE_COMPOSE_H_
#define ROPEKV_CACHE_COMPOSE_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/kv_cache.h"

namespace ropekv {

struct ComposePart {
  std::vector<int32_t> tokens;  // a cached prefix (full blocks) or a segment
  bool segment = false;
  // Position of the part's first token; nullopt: right after the previous part (0 for the first).
  std::optional<int64_t> target_position;
};

enum class HitKind : uint8_t { kExact = 1, kRerotated = 2 };

struct ComposedPartInfo {
  uint32_t tokens = 0;
  int64_t position = 0;
  HitKind hit = HitKind::kExact;
};

class ComposedPrompt {
 public:
  const std::vector<ComposedPartInfo>& parts() const { return parts_; }
  uint32_t total_tokens() const { return total_tokens_; }
  int layers() const { return spec_.layers; }
  // Bytes of one layer of the prompt: [k|v][kv_head][total_tokens][head_dim].
  uint64_t layer_bytes() const;
  // Writes one layer into dst (layer_bytes() bytes). INVALID_ARGUMENT for a layer out of range.
  absl::Status WriteLayer(int layer, void* dst) const;

 private:
  friend absl::StatusOr<ComposedPrompt> Compose(KvCache&, absl::string_view, absl::string_view,
                                                const std::vector<ComposePart>&);
  struct Copy {
    const void* block;  // [layer][k|v][kv_head][block_tokens][head_dim]
    int64_t dst_token;
    int64_t n_tokens;
    int64_t from_pos;
    int64_t to_pos;
    RopeTableId table;
  };

  ModelSpec spec_;
  std::vector<ReadHandle> handles_;
  std::vector<Copy> copies_;
  std::vector<ComposedPartInfo> parts_;
  uint32_t total_tokens_ = 0;
};

// Holds every part's blocks and plans the copies. NOT_FOUND naming the part when a part is not
// fully cached; INVALID_ARGUMENT for an empty part list, a negative position or a prefix part
// that is not a multiple of block_tokens.
absl::StatusOr<ComposedPrompt> Compose(KvCache& cache, absl::string_view model,
                                       absl::string_view tenant,
                                       const std::vector<ComposePart>& parts);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_COMPOSE_H_
