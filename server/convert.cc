#include "server/convert.h"

#include "absl/strings/str_cat.h"

namespace ropekv {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbering.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::StatusOr<ModelSpec> FromProto(const v1::ModelSpec& p) {
  ModelSpec spec;
  spec.layers = static_cast<int>(p.layers());
  spec.kv_heads = static_cast<int>(p.kv_heads());
  spec.head_dim = static_cast<int>(p.head_dim());
  spec.block_tokens = static_cast<int>(p.block_tokens());
  switch (p.dtype()) {
    case v1::DTYPE_F32:
      spec.dtype = DType::kF32;
      break;
    case v1::DTYPE_F16:
      spec.dtype = DType::kF16;
      break;
    case v1::DTYPE_BF16:
      spec.dtype = DType::kBF16;
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("model spec: dtype must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16, got ",
                       v1::DType_Name(p.dtype())));
  }
  const v1::RopeSpec& r = p.rope();
  RopeSpec& rope = spec.rope;
  if (r.type() < v1::ROPE_TYPE_DEFAULT || r.type() > v1::ROPE_TYPE_LONGROPE) {
    return absl::InvalidArgumentError(
        absl::StrCat("model spec: unknown rope type ", static_cast<int>(r.type())));
  }
  rope.type = static_cast<RopeType>(r.type());
  rope.theta = r.theta() == 0 ? 10000.0 : r.theta();
  rope.head_dim = spec.head_dim;
  rope.rotary_dim = static_cast<int>(r.rotary_dim());
  rope.layout = r.layout() == v1::PAIR_LAYOUT_GPTJ ? PairLayout::kGptj : PairLayout::kNeox;
  rope.factor = r.factor() == 0 ? 1.0 : r.factor();
  rope.max_position_embeddings = r.max_position_embeddings();
  rope.original_max_position_embeddings = r.original_max_position_embeddings();
  rope.low_freq_factor = r.low_freq_factor() == 0 ? 1.0 : r.low_freq_factor();
  rope.high_freq_factor = r.high_freq_factor() == 0 ? 4.0 : r.high_freq_factor();
  rope.beta_fast = r.beta_fast() == 0 ? 32.0 : r.beta_fast();
  rope.beta_slow = r.beta_slow() == 0 ? 1.0 : r.beta_slow();
  rope.mscale = r.mscale();
  rope.mscale_all_dim = r.mscale_all_dim();
  rope.truncate = r.has_truncate() ? r.truncate() : true;
  rope.attention_factor = r.attention_factor();
  rope.short_factor.assign(r.short_factor().begin(), r.short_factor().end());
  rope.long_factor.assign(r.long_factor().begin(), r.long_factor().end());
  return spec;
}

v1::DType ToProto(DType dtype) {
  return dtype == DType::kF32   ? v1::DTYPE_F32
         : dtype == DType::kF16 ? v1::DTYPE_F16
                                : v1::DTYPE_BF16;
}

v1::ModelSpec ToProto(const ModelSpec& spec) {
  v1::ModelSpec p;
  p.set_layers(spec.layers);
  p.set_kv_heads(spec.kv_heads);
  p.set_head_dim(spec.head_dim);
  p.set_block_tokens(spec.block_tokens);
  p.set_dtype(ToProto(spec.dtype));
  const RopeSpec& rope = spec.rope;
  v1::RopeSpec* r = p.mutable_rope();
  r->set_type(static_cast<v1::RopeType>(rope.type));
  r->set_theta(rope.theta);
  r->set_rotary_dim(rope.rotary_dim);
  r->set_layout(rope.layout == PairLayout::kGptj ? v1::PAIR_LAYOUT_GPTJ : v1::PAIR_LAYOUT_NEOX);
  r->set_factor(rope.factor);
  r->set_max_position_embeddings(rope.max_position_embeddings);
  r->set_original_max_position_embeddings(rope.original_max_position_embeddings);
  r->set_low_freq_factor(rope.low_freq_factor);
  r->set_high_freq_factor(rope.high_freq_factor);
  r->set_beta_fast(rope.beta_fast);
  r->set_beta_slow(rope.beta_slow);
  r->set_mscale(rope.mscale);
  r->set_mscale_all_dim(rope.mscale_all_dim);
  r->set_truncate(rope.truncate);
  r->set_attention_factor(rope.attention_factor);
  for (double f : rope.short_factor) r->add_short_factor(f);
  for (double f : rope.long_factor) r->add_long_factor(f);
  return p;
}

v1::Tier ToProto(TierKind tier) {
  switch (tier) {
    case TierKind::kGpu:
      return v1::TIER_GPU;
    case TierKind::kHost:
      return v1::TIER_HOST;
    case TierKind::kDisk:
      return v1::TIER_DISK;
  }
  return v1::TIER_UNSPECIFIED;
}

void ToProto(const BlockInfo& info, v1::BlockInfo* out) {
  out->set_hash(info.hash.Raw());
  out->set_tier(ToProto(info.tier));
  out->set_rotated_at(info.rotated_at);
  out->set_pinned(info.pinned);
}

void ToProto(const CacheStats& s, v1::StatsResponse* out) {
  for (const TierCounters& t : s.tiers) {
    v1::TierStats* p = out->add_tiers();
    p->set_tier(ToProto(t.tier));
    p->set_bytes_used(t.bytes_used);
    p->set_capacity_bytes(t.capacity_bytes);
    p->set_blocks(t.blocks);
    p->set_pinned_blocks(t.pinned_blocks);
    p->set_hits(t.hits);
    p->set_misses(t.misses);
    p->set_evictions(t.evictions);
    p->set_promotions(t.promotions);
    p->set_demotions(t.demotions);
    p->set_bytes_moved(t.bytes_moved);
    p->set_corrupt_blocks(t.corrupt_blocks);
    p->set_reserved_bytes(t.reserved_bytes);
  }
  out->set_lookups(s.lookups);
  out->set_lookup_hit_tokens(s.lookup_hit_tokens);
  out->set_lookup_miss_tokens(s.lookup_miss_tokens);
  out->set_puts(s.puts);
  out->set_gets(s.gets);
  out->set_bytes_in(s.bytes_in);
  out->set_bytes_out(s.bytes_out);
  out->set_models(s.models);
  out->set_prompt_blocks_reused(s.prompt_blocks_reused);
}

std::vector<int32_t> FromProto(const google::protobuf::RepeatedField<int32_t>& tokens) {
  return std::vector<int32_t>(tokens.begin(), tokens.end());
}

std::vector<ComposePart> FromProto(
    const google::protobuf::RepeatedPtrField<v1::ComposePart>& parts) {
  std::vector<ComposePart> out;
  out.reserve(parts.size());
  for (const v1::ComposePart& p : parts) {
    ComposePart part;
    part.tokens = FromProto(p.tokens());
    part.segment = p.segment();
    if (p.has_target_position()) part.target_position = p.target_position();
    out.push_back(std::move(part));
  }
  return out;
}

}  // namespace ropekv
