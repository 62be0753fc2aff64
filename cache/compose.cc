#include "cache/compose.h"

#include "absl/strings/str_cat.h"

namespace ropekv {

uint64_t ComposedPrompt::layer_bytes() const {
  return uint64_t{2} * spec_.kv_heads * total_tokens_ * spec_.head_dim * DTypeSize(spec_.dtype);
}

absl::Status ComposedPrompt::WriteLayer(int layer, void* dst) const {
  if (layer < 0 || layer >= spec_.layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " out of range [0, ", spec_.layers, ")"));
  }
  const KvStrides src = BlockStrides(spec_);
  const int64_t hd = spec_.head_dim;
  const KvStrides out{0, int64_t{spec_.kv_heads} * total_tokens_ * hd, int64_t{total_tokens_} * hd,
                      hd};
  const size_t layer_offset = static_cast<size_t>(layer) * src.layer * DTypeSize(spec_.dtype);
  std::vector<RerotateCopy> jobs;
  jobs.reserve(copies_.size());
  for (const Copy& c : copies_) {
    jobs.push_back(RerotateCopy{static_cast<const char*>(c.block) + layer_offset, src, 0, dst, out,
                                c.dst_token, c.n_tokens, c.from_pos, c.table, c.to_pos, c.table});
  }
  KvGeometry one_layer = BlockGeometry(spec_);
  one_layer.layers = 1;
  return RerotateCopyCpu(spec_.rope, one_layer, jobs);
}

absl::StatusOr<ComposedPrompt> Compose(KvCache& cache, absl::string_view model,
                                       absl::string_view tenant,
                                       const std::vector<ComposePart>& parts) {
  if (parts.empty()) return absl::InvalidArgumentError("Compose needs at least one part");
  auto m = cache.ResolveModel(model);
  if (!m.ok()) return m.status();
  ComposedPrompt prompt;
  prompt.spec_ = m->spec;
  const int bt = m->spec.block_tokens;
  int64_t next_position = 0;
  uint64_t total = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    const ComposePart& part = parts[p];
    const int64_t position = part.target_position.value_or(next_position);
    if (position < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("part ", p, ": target position must be >= 0, got ", position));
    }
    if (!part.segment && (part.tokens.empty() || part.tokens.size() % bt != 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "part ", p, ": a prefix part needs a positive multiple of block_tokens = ", bt,
          " tokens, got ", part.tokens.size()));
    }
    absl::StatusOr<ReadHandle> handle = part.segment
                                            ? cache.AcquireSegment(model, tenant, part.tokens)
                                            : cache.AcquirePrefix(model, tenant, part.tokens, 0);
    if (!handle.ok()) {
      return absl::Status(handle.status().code(),
                          absl::StrCat("part ", p, ": ", handle.status().message()));
    }
    if (handle->matched_tokens() != part.tokens.size()) {
      return absl::NotFoundError(absl::StrCat("part ", p, ": ", handle->matched_tokens(), " of ",
                                              part.tokens.size(), " tokens are cached"));
    }
    ComposedPartInfo info{static_cast<uint32_t>(part.tokens.size()), position, HitKind::kExact};
    for (size_t b = 0; b < handle->blocks().size(); ++b) {
      const BlockInfo& block = handle->blocks()[b];
      const int64_t offset = static_cast<int64_t>(b) * bt;
      const int64_t to = position + offset;
      // Position-free (pre-RoPE) keys are copied as they are.
      const int64_t from = block.pre_rope ? to : block.rotated_at;
      if (from != to) info.hit = HitKind::kRerotated;
      prompt.copies_.push_back(ComposedPrompt::Copy{
          handle->bytes(b).data(), static_cast<int64_t>(total) + offset,
          std::min<int64_t>(bt, static_cast<int64_t>(part.tokens.size()) - offset), from, to,
          block.rope_table});
    }
    prompt.parts_.push_back(info);
    prompt.handles_.push_back(*std::move(handle));
    total += part.tokens.size();
    next_position = position + static_cast<int64_t>(part.tokens.size());
  }
  if (total > (1u << 31)) return absl::InvalidArgumentError("composed prompt too long");
  prompt.total_tokens_ = static_cast<uint32_t>(total);
  return prompt;
}

}  // namespace ropekv
