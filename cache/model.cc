#include "cache/model.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cache/hash.h"

namespace ropekv {
namespace {

absl::Status CheckRange(const char* field, int64_t value, int64_t lo, int64_t hi) {
  if (value < lo || value > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("model spec: ", field, " must be in [", lo, ", ", hi, "], got ", value));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateModelSpec(const ModelSpec& spec) {
  if (auto s = CheckRange("layers", spec.layers, 1, kMaxLayers); !s.ok()) return s;
  if (auto s = CheckRange("kv_heads", spec.kv_heads, 1, kMaxKvHeads); !s.ok()) return s;
  if (auto s = CheckRange("head_dim", spec.head_dim, 2, kMaxHeadDim); !s.ok()) return s;
  if (spec.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model spec: head_dim must be even, got ", spec.head_dim));
  }
  if (auto s = CheckRange("block_tokens", spec.block_tokens, 1, kMaxBlockTokens); !s.ok()) {
    return s;
  }
  if (spec.rope.head_dim != spec.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat("model spec: rope.head_dim must equal head_dim ",
                                                   spec.head_dim, ", got ", spec.rope.head_dim));
  }
  return ValidateRopeSpec(spec.rope);
}

ModelId ModelIdOf(const ModelSpec& spec) {
  // A canonical text encoding: every field, fixed order, doubles with 17 significant digits.
  const RopeSpec& r = spec.rope;
  std::string enc = absl::StrFormat(
      "ropekv.model.v1|%d|%d|%d|%s|%d|rope|%d|%.17g|%d|%d|%.17g|%d|%d|%.17g|%.17g|%.17g|%.17g|"
      "%.17g|%.17g|%d|%.17g",
      spec.layers, spec.kv_heads, spec.head_dim, std::string(DTypeName(spec.dtype)),
      spec.block_tokens, static_cast<int>(r.type), r.theta, r.rotary_dim,
      static_cast<int>(r.layout), r.factor, r.max_position_embeddings,
      r.original_max_position_embeddings, r.low_freq_factor, r.high_freq_factor, r.beta_fast,
      r.beta_slow, r.mscale, r.mscale_all_dim, r.truncate ? 1 : 0, r.attention_factor);
  for (double f : r.short_factor) absl::StrAppendFormat(&enc, "|s%.17g", f);
  for (double f : r.long_factor) absl::StrAppendFormat(&enc, "|l%.17g", f);
  return Sha256Hex(enc).substr(0, 16);
}

uint64_t BlockBytes(const ModelSpec& spec) {
  return static_cast<uint64_t>(spec.layers) * 2 * spec.kv_heads * spec.block_tokens *
         spec.head_dim * DTypeSize(spec.dtype);
}

KvGeometry BlockGeometry(const ModelSpec& spec) {
  return KvGeometry{spec.layers, spec.kv_heads, spec.head_dim, spec.dtype};
}

KvStrides BlockStrides(const ModelSpec& spec) {
  const int64_t token = spec.head_dim;
  const int64_t head = token * spec.block_tokens;
  const int64_t kv = head * spec.kv_heads;
  return KvStrides{2 * kv, kv, head, token};
}

ModelSpec DemoModelSpec() {
  ModelSpec spec;
  spec.layers = 4;
  spec.kv_heads = 2;
  spec.head_dim = 64;
  spec.dtype = DType::kBF16;
  spec.block_tokens = 16;
  spec.rope.type = RopeType::kDefault;
  spec.rope.theta = 10000.0;
  spec.rope.head_dim = 64;
  return spec;
}

}  // namespace ropekv
