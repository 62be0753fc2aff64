// CPU reference of the APE merge and of plain softmax attention: plain loops, fp64 accumulation,
// one rounding to the output type. Written to be obviously right; also the daemon's CPU path.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/ape/ape.h"

namespace ropekv {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();
constexpr int64_t kMaxGroupTokens = int64_t{1} << 31;

bool ValidDType(DType t) { return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16; }

absl::Status CheckShape(const char* who, const AttentionShape& s) {
  if (s.num_queries < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": num_queries must be >= 1, got ", s.num_queries));
  }
  if (s.q_heads < 1 || s.kv_heads < 1) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": q_heads and kv_heads must be >= 1, got ",
                                                   s.q_heads, " and ", s.kv_heads));
  }
  if (s.q_heads % s.kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": q_heads must be a multiple of kv_heads, got q_heads ", s.q_heads,
                     " and kv_heads ", s.kv_heads));
  }
  if (s.head_dim < 1 || s.head_dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": head_dim must be in 1..1024, got ", s.head_dim));
  }
  if (!ValidDType(s.q_dtype) || !ValidDType(s.kv_dtype) || !ValidDType(s.out_dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        who, ": dtypes must be f32, f16 or bf16, got q ", static_cast<int>(s.q_dtype), ", kv ",
        static_cast<int>(s.kv_dtype), ", out ", static_cast<int>(s.out_dtype)));
  }
  return absl::OkStatus();
}

absl::Status CheckQuery(const char* who, const AttentionShape& s, const void* q,
                        int64_t token_stride, int64_t head_stride, const void* out) {
  if (q == nullptr) return absl::InvalidArgumentError(absl::StrCat(who, ": q is null"));
  if (out == nullptr) return absl::InvalidArgumentError(absl::StrCat(who, ": out is null"));
  if (token_stride < 0 || head_stride < 0 || (token_stride > 0 && token_stride < s.head_dim) ||
      (head_stride > 0 && head_stride < s.head_dim)) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": q strides must be 0 (packed) or >= head_dim ", s.head_dim,
                     ", got token_stride ", token_stride, " and head_stride ", head_stride));
  }
  return absl::OkStatus();
}

// Checks one group of segments; sets *total to its token count.
absl::Status CheckSegments(const char* who, const char* group, const AttentionShape& s,
                           absl::Span<const KvSegment> segs, int64_t* total) {
  *total = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    const KvSegment& g = segs[i];
    if (g.tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": ", group, "[", i, "].tokens must be >= 0, got ", g.tokens));
    }
    if (g.tokens == 0) continue;
    if (g.k == nullptr || g.v == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": ", group, "[", i, "] has ", g.tokens,
                                                     " tokens but a null ",
                                                     g.k == nullptr ? "k" : "v", " pointer"));
    }
    if (g.head_stride < 0 || g.token_stride < 0 ||
        (g.head_stride > 0 && g.head_stride < s.head_dim) ||
        (g.token_stride > 0 && g.token_stride < s.head_dim)) {
      return absl::InvalidArgumentError(absl::StrCat(
          who, ": ", group, "[", i, "] strides must be 0 (packed) or >= head_dim ", s.head_dim,
          ", got head_stride ", g.head_stride, " and token_stride ", g.token_stride));
    }
    *total += g.tokens;
    if (*total >= kMaxGroupTokens) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": ", group, " holds more than 2^31 - 1 tokens"));
    }
  }
  return absl::OkStatus();
}

// A segment with its strides resolved (0 -> packed).
KvSegment Resolve(const KvSegment& g, int32_t head_dim) {
  KvSegment r = g;
  if (r.token_stride == 0) r.token_stride = head_dim;
  if (r.head_stride == 0) r.head_stride = g.tokens * head_dim;
  return r;
}

std::vector<KvSegment> ResolveAll(absl::Span<const KvSegment> segs, int32_t head_dim) {
  std::vector<KvSegment> out;
  for (const KvSegment& g : segs) {
    if (g.tokens > 0) out.push_back(Resolve(g, head_dim));
  }
  return out;
}

// Softmax attention of one query row (q, head_dim values) over the first `visible` keys of the
// concatenated segments, KV head hk; writes o[head_dim] and returns lse (-inf, o = 0 when nothing
// is visible).
double GroupAttention(const std::vector<double>& q, int64_t hk, const std::vector<KvSegment>& segs,
                      int64_t visible, double scale, DType kv_dtype, std::vector<double>& scores,
                      std::vector<double>& o) {
  const size_t d = q.size();
  std::fill(o.begin(), o.end(), 0.0);
  scores.clear();
  double m = kNegInf;
  int64_t seen = 0;
  for (const KvSegment& g : segs) {
    for (int64_t t = 0; t < g.tokens && seen < visible; ++t, ++seen) {
      const size_t base = static_cast<size_t>(hk * g.head_stride + t * g.token_stride);
      double dot = 0.0;
      for (size_t e = 0; e < d; ++e) dot += q[e] * LoadAsFloat(g.k, base + e, kv_dtype);
      scores.push_back(dot * scale);
      m = std::max(m, scores.back());
    }
  }
  if (scores.empty()) return kNegInf;
  double sum = 0.0;
  size_t j = 0;
  for (const KvSegment& g : segs) {
    for (int64_t t = 0; t < g.tokens && j < scores.size(); ++t, ++j) {
      const size_t base = static_cast<size_t>(hk * g.head_stride + t * g.token_stride);
      const double w = std::exp(scores[j] - m);
      sum += w;
      for (size_t e = 0; e < d; ++e) o[e] += w * LoadAsFloat(g.v, base + e, kv_dtype);
    }
  }
  for (size_t e = 0; e < d; ++e) o[e] /= sum;
  return m + std::log(sum);
}

void LoadQuery(const void* q, DType t, size_t base, std::vector<double>& out) {
  for (size_t e = 0; e < out.size(); ++e) out[e] = LoadAsFloat(q, base + e, t);
}

}  // namespace

absl::Status ValidateApeArgs(const ApeArgs& args) {
  const AttentionShape& s = args.shape;
  if (absl::Status st = CheckShape("ape", s); !st.ok()) return st;
  if (!(std::isfinite(args.temperature) && args.temperature > 0.0f) ||
      !(std::isfinite(args.scale) && args.scale > 0.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ape: temperature and scale must be finite and > 0, got T ", args.temperature,
                     " and S ", args.scale));
  }
  if (absl::Status st =
          CheckQuery("ape", s, args.q, args.q_token_stride, args.q_head_stride, args.out);
      !st.ok()) {
    return st;
  }
  int64_t context_tokens = 0;
  int64_t other_tokens = 0;
  if (absl::Status st = CheckSegments("ape", "context", s, args.context, &context_tokens);
      !st.ok()) {
    return st;
  }
  if (absl::Status st = CheckSegments("ape", "other", s, args.other, &other_tokens); !st.ok()) {
    return st;
  }
  if (other_tokens < s.num_queries) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ape: other must end with the queries' own keys: expected at least num_queries = ",
        s.num_queries, " tokens, got ", other_tokens));
  }
  return absl::OkStatus();
}

absl::Status ApeAttentionCpu(const ApeArgs& args) {
  if (absl::Status st = ValidateApeArgs(args); !st.ok()) return st;
  const AttentionShape& s = args.shape;
  const int64_t d = s.head_dim;
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t q_hs = args.q_head_stride > 0 ? args.q_head_stride : d;
  const int64_t q_ts = args.q_token_stride > 0 ? args.q_token_stride : s.q_heads * d;
  const std::vector<KvSegment> context = ResolveAll(args.context, s.head_dim);
  const std::vector<KvSegment> other = ResolveAll(args.other, s.head_dim);
  int64_t context_tokens = 0, other_tokens = 0;
  for (const KvSegment& g : context) context_tokens += g.tokens;
  for (const KvSegment& g : other) other_tokens += g.tokens;

  const double scale_o = 1.0 / std::sqrt(static_cast<double>(d));
  const double scale_c = scale_o / static_cast<double>(args.temperature);
  const double st_factor = static_cast<double>(args.scale) * args.temperature;
  std::vector<double> q(d), o_c(d), o_o(d), scores;
  for (int64_t i = 0; i < s.num_queries; ++i) {
    for (int64_t h = 0; h < s.q_heads; ++h) {
      const int64_t hk = h / group;
      LoadQuery(args.q, s.q_dtype, static_cast<size_t>(i * q_ts + h * q_hs), q);
      const double lse_c =
          GroupAttention(q, hk, context, context_tokens, scale_c, s.kv_dtype, scores, o_c);
      const int64_t visible = other_tokens - s.num_queries + i + 1;
      const double lse_o = GroupAttention(q, hk, other, visible, scale_o, s.kv_dtype, scores, o_o);
      // softmax([S*T*lse_c, lse_o]); lse_o is finite (the query's own key is visible).
      const double a = lse_c == kNegInf ? kNegInf : st_factor * lse_c;
      const double m = std::max(a, lse_o);
      const double w_c = std::exp(a - m);
      const double w_o = std::exp(lse_o - m);
      const double z = w_c + w_o;
      const size_t out_base = static_cast<size_t>((i * s.q_heads + h) * d);
      for (int64_t e = 0; e < d; ++e) {
        StoreFromFloat(args.out, out_base + e, s.out_dtype,
                       static_cast<float>((w_c * o_c[e] + w_o * o_o[e]) / z));
      }
      if (args.lse != nullptr) {
        args.lse[i * s.q_heads + h] = static_cast<float>(m + std::log(z));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status AttentionCpu(const AttentionArgs& args) {
  const AttentionShape& s = args.shape;
  if (absl::Status st = CheckShape("attention", s); !st.ok()) return st;
  if (!(std::isfinite(args.softmax_scale) && args.softmax_scale >= 0.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention: softmax_scale must be finite and >= 0 (0 = 1/sqrt(head_dim)), got ",
        args.softmax_scale));
  }
  if (absl::Status st =
          CheckQuery("attention", s, args.q, args.q_token_stride, args.q_head_stride, args.out);
      !st.ok()) {
    return st;
  }
  int64_t total = 0;
  if (absl::Status st = CheckSegments("attention", "keys", s, args.keys, &total); !st.ok()) {
    return st;
  }
  if (total < s.num_queries) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attention: keys must end with the queries' own keys: expected at least num_queries = ",
        s.num_queries, " tokens, got ", total));
  }
  const int64_t d = s.head_dim;
  const int64_t group = s.q_heads / s.kv_heads;
  const int64_t q_hs = args.q_head_stride > 0 ? args.q_head_stride : d;
  const int64_t q_ts = args.q_token_stride > 0 ? args.q_token_stride : s.q_heads * d;
  const double scale =
      args.softmax_scale > 0.0 ? args.softmax_scale : 1.0 / std::sqrt(static_cast<double>(d));
  const std::vector<KvSegment> keys = ResolveAll(args.keys, s.head_dim);
  std::vector<double> q(d), o(d), scores;
  for (int64_t i = 0; i < s.num_queries; ++i) {
    for (int64_t h = 0; h < s.q_heads; ++h) {
      LoadQuery(args.q, s.q_dtype, static_cast<size_t>(i * q_ts + h * q_hs), q);
      const int64_t visible = total - s.num_queries + i + 1;
      const double lse = GroupAttention(q, h / group, keys, visible, scale, s.kv_dtype, scores, o);
      const size_t out_base = static_cast<size_t>((i * s.q_heads + h) * d);
      for (int64_t e = 0; e < d; ++e) {
        StoreFromFloat(args.out, out_base + e, s.out_dtype, static_cast<float>(o[e]));
      }
      if (args.lse != nullptr) args.lse[i * s.q_heads + h] = static_cast<float>(lse);
    }
  }
  return absl::OkStatus();
}

#ifndef ROPEKV_WITH_CUDA
absl::StatusOr<size_t> ApeCudaWorkspaceBytes(const ApeArgs& args, const ApeCudaOptions& options) {
  return absl::UnimplementedError("ape: this build of ropekv has no CUDA (ROPEKV_CUDA=OFF)");
}

absl::Status ApeAttentionCuda(const ApeArgs& args, void* workspace, size_t workspace_bytes,
                              CUstream_st* stream, const ApeCudaOptions& options) {
  return absl::UnimplementedError("ape: this build of ropekv has no CUDA (ROPEKV_CUDA=OFF)");
}
#endif  // ROPEKV_WITH_CUDA

}  // namespace ropekv
