#include "bench/quality/forward.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "clients/llama/cpu_ops.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace quality {
namespace {

// dst[c][col0 + r] = src[r][c] for src [rows][cols]; dst rows are dst_cols wide.
void TransposeInto(const std::vector<float>& src, int64_t rows, int64_t cols, float* dst,
                   int64_t dst_cols, int64_t col0) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_cols + col0 + r] = src[r * cols + c];
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<HookedForward>> HookedForward::Create(
    const llama::LlamaModel* model) {
  if (model == nullptr) return absl::InvalidArgumentError("HookedForward: null model");
  std::unique_ptr<HookedForward> f(new HookedForward(model));
  const llama::LlamaConfig& c = model->config();
  const llama::LlamaWeights& w = model->weights();
  const int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = c.num_attention_heads * c.head_dim;
  const int64_t kvd = c.num_key_value_heads * c.head_dim;
  const int64_t qkv = qd + 2 * kvd;
  f->layers_t_.resize(w.layers.size());
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const llama::LlamaWeights::Layer& L = w.layers[l];
    LayerT& T = f->layers_t_[l];
    T.qkv.assign(static_cast<size_t>(D * qkv), 0.0f);
    TransposeInto(L.q_proj, qd, D, T.qkv.data(), qkv, 0);
    TransposeInto(L.k_proj, kvd, D, T.qkv.data(), qkv, qd);
    TransposeInto(L.v_proj, kvd, D, T.qkv.data(), qkv, qd + kvd);
    T.o.assign(static_cast<size_t>(qd * D), 0.0f);
    TransposeInto(L.o_proj, D, qd, T.o.data(), D, 0);
    T.gate_up.assign(static_cast<size_t>(D * 2 * I), 0.0f);
    TransposeInto(L.gate_proj, I, D, T.gate_up.data(), 2 * I, 0);
    TransposeInto(L.up_proj, I, D, T.gate_up.data(), 2 * I, I);
    T.down.assign(static_cast<size_t>(I * D), 0.0f);
    TransposeInto(L.down_proj, D, I, T.down.data(), D, 0);
  }
  f->lm_head_t_.assign(static_cast<size_t>(D * V), 0.0f);
  TransposeInto(w.lm_head, V, D, f->lm_head_t_.data(), V, 0);
  return f;
}

absl::StatusOr<std::vector<float>> HookedForward::Run(absl::Span<const int32_t> tokens,
                                                      absl::Span<const int64_t> positions,
                                                      llama::KvCache* cache,
                                                      AttentionHook* hook) const {
  const llama::LlamaConfig& c = model_->config();
  const llama::LlamaWeights& w = model_->weights();
  if (cache == nullptr) return absl::InvalidArgumentError("HookedForward::Run: null cache");
  if (tokens.size() != positions.size()) {
    return absl::InvalidArgumentError(absl::StrCat("HookedForward::Run: ", tokens.size(),
                                                   " tokens but ", positions.size(), " positions"));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("HookedForward::Run: token ", i, " is ",
                                                     tokens[i], ", expected [0, ", c.vocab_size,
                                                     ")"));
    }
    if (positions[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("HookedForward::Run: position ", i, " is ",
                                                     positions[i], ", expected >= 0"));
    }
  }
  const llama::KvCacheOptions& co = cache->options();
  if (co.num_layers != c.num_hidden_layers || co.num_kv_heads != c.num_key_value_heads ||
      co.head_dim != c.head_dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("HookedForward::Run: the model needs a cache of ", c.num_hidden_layers,
                     " layers x ", c.num_key_value_heads, " KV heads x head_dim ", c.head_dim,
                     ", got ", co.num_layers, " x ", co.num_kv_heads, " x ", co.head_dim));
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return std::vector<float>();

  const int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size, d = c.head_dim;
  const int H = static_cast<int>(c.num_attention_heads);
  const int K = static_cast<int>(c.num_key_value_heads);
  const int64_t qd = H * d, kvd = K * d, qkv_w = qd + 2 * kvd;
  const int64_t group = c.group_size();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  const float eps = static_cast<float>(c.rms_norm_eps);
  const RopeSpec& rope = model_->rope();

  // The RoPE table as Prefill picks it (HF: from max(position) + 1; dynamic NTK keeps a grown
  // table until a batch is shorter than max_position_embeddings again).
  const int64_t seq = *std::max_element(positions.begin(), positions.end()) + 1;
  int64_t rope_len = seq;
  if (rope.type == RopeType::kDynamic) {
    const int64_t cached = cache->rope_seq_len();
    rope_len = (seq > cached || seq < c.max_position_embeddings) ? seq : cached;
  }
  const RopeTableId table = RopeTableFor(rope, rope_len);

  const int64_t past = cache->tokens();
  absl::StatusOr<int64_t> first = cache->Reserve(tokens, positions);
  if (!first.ok()) return first.status();
  const int64_t total = past + n;
  auto fail = [&](absl::Status s) {
    (void)cache->Truncate(past);
    return s;
  };

  std::vector<float> x(static_cast<size_t>(n * D));
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(w.embed_tokens.data() + tokens[i] * D, D, x.data() + i * D);
  }
  std::vector<float> xn(static_cast<size_t>(n * D)), qkv(static_cast<size_t>(n * qkv_w));
  std::vector<float> q(static_cast<size_t>(n * qd)), k(static_cast<size_t>(n * kvd)),
      v(static_cast<size_t>(n * kvd)), attn(static_cast<size_t>(n * qd)),
      proj(static_cast<size_t>(n * D)), gate_up(static_cast<size_t>(n * 2 * I)),
      h(static_cast<size_t>(n * I));
  // Stored K and V of every cached token, [kv_heads][total][head_dim], and K transposed per head
  // ([kv_heads][head_dim][total]) for the frontend's own attention.
  std::vector<float> keys(static_cast<size_t>(K * total * d)),
      vals(static_cast<size_t>(K * total * d)), kt(static_cast<size_t>(K * d * total));

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const llama::LlamaWeights::Layer& L = w.layers[static_cast<size_t>(l)];
    const LayerT& T = layers_t_[static_cast<size_t>(l)];

    llama::RmsNormRows(x.data(), L.input_norm.data(), n, D, eps, xn.data());
    llama::MatmulF32(xn.data(), T.qkv.data(), n, D, qkv_w, qkv.data(), 1);
    for (int64_t i = 0; i < n; ++i) {
      const float* row = qkv.data() + i * qkv_w;
      std::copy_n(row, qd, q.data() + i * qd);
      std::copy_n(row + qd, kvd, k.data() + i * kvd);
      std::copy_n(row + qd + kvd, kvd, v.data() + i * kvd);
    }
    if (absl::Status s = ApplyRopeCpu(rope, table, DType::kF32, n, H, q.data(), positions.data());
        !s.ok()) {
      return fail(s);
    }
    if (absl::Status s = ApplyRopeCpu(rope, table, DType::kF32, n, K, k.data(), positions.data());
        !s.ok()) {
      return fail(s);
    }
    if (absl::Status s = cache->WriteLayer(static_cast<int>(l), *first, k, v); !s.ok()) {
      return fail(s);
    }
    for (int g = 0; g < K; ++g) {
      absl::Span<float> kspan(keys.data() + g * total * d, static_cast<size_t>(total * d));
      absl::Span<float> vspan(vals.data() + g * total * d, static_cast<size_t>(total * d));
      if (absl::Status s = cache->ReadHead(static_cast<int>(l), g, 0, total, kspan, vspan);
          !s.ok()) {
        return fail(s);
      }
    }
    if (hook != nullptr) {
      AttentionInputs in;
      in.layer = static_cast<int>(l);
      in.n = n;
      in.past = past;
      in.total = total;
      in.heads = H;
      in.kv_heads = K;
      in.head_dim = static_cast<int>(d);
      in.scale = scale;
      in.q = q.data();
      in.k = keys.data();
      in.v = vals.data();
      in.cache = cache;
      if (absl::Status s = hook->Attend(in, attn.data()); !s.ok()) return fail(s);
    } else {
      for (int g = 0; g < K; ++g) {
        const float* kg = keys.data() + g * total * d;
        float* ktg = kt.data() + g * d * total;
        for (int64_t t = 0; t < total; ++t) {
          for (int64_t col = 0; col < d; ++col) ktg[col * total + t] = kg[t * d + col];
        }
      }
      for (int64_t hh = 0; hh < H; ++hh) {
        const int64_t g = hh / group;  // HF repeat_kv
        llama::CausalAttentionHead(q.data() + hh * d, qd, n, past, kt.data() + g * d * total, total,
                                   vals.data() + g * total * d, static_cast<int>(d), scale,
                                   attn.data() + hh * d, qd);
      }
    }
    llama::MatmulF32(attn.data(), T.o.data(), n, qd, D, proj.data(), 1);
    for (int64_t i = 0; i < n * D; ++i) x[i] += proj[i];

    llama::RmsNormRows(x.data(), L.post_attn_norm.data(), n, D, eps, xn.data());
    llama::MatmulF32(xn.data(), T.gate_up.data(), n, D, 2 * I, gate_up.data(), 1);
    llama::SwiGlu(gate_up.data(), n, I, h.data());
    llama::MatmulF32(h.data(), T.down.data(), n, I, D, proj.data(), 1);
    for (int64_t i = 0; i < n * D; ++i) x[i] += proj[i];
  }

  llama::RmsNormRows(x.data(), w.final_norm.data(), n, D, eps, xn.data());
  std::vector<float> logits(static_cast<size_t>(n * V));
  llama::MatmulF32(xn.data(), lm_head_t_.data(), n, D, V, logits.data(), 1);
  cache->set_rope_seq_len(rope_len);
  return logits;
}

absl::Status FullAttentionHook::Attend(const AttentionInputs& in, float* out) {
  const int64_t d = in.head_dim, group = in.heads / in.kv_heads;
  std::vector<double> p(static_cast<size_t>(in.total)), acc(static_cast<size_t>(d));
  for (int64_t i = 0; i < in.n; ++i) {
    const int64_t visible = in.past + i + 1;
    for (int h = 0; h < in.heads; ++h) {
      const float* q = in.q + (i * in.heads + h) * d;
      const float* k = in.k + (h / group) * in.total * d;
      const float* v = in.v + (h / group) * in.total * d;
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t t = 0; t < visible; ++t) {
        double s = 0;
        for (int64_t c = 0; c < d; ++c) s += static_cast<double>(q[c]) * k[t * d + c];
        p[t] = s * in.scale;
        m = std::max(m, p[t]);
      }
      double sum = 0;
      for (int64_t t = 0; t < visible; ++t) sum += (p[t] = std::exp(p[t] - m));
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t t = 0; t < visible; ++t) {
        for (int64_t c = 0; c < d; ++c) acc[c] += p[t] * v[t * d + c];
      }
      float* o = out + (i * in.heads + h) * d;
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<float>(acc[c] / sum);
    }
  }
  return absl::OkStatus();
}

}  // namespace quality
}  // namespace ropekv
