#include "clients/llama/llama_model.h"

#include <algorithm>
#include <cmath>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "clients/llama/cpu_ops.h"
#include "clients/llama/safetensors.h"

namespace ropekv {
namespace llama {
namespace {

// Deterministic across platforms and standard libraries (std::uniform_real_distribution is not).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float Symmetric() {
    return static_cast<float>(static_cast<double>(Next() >> 11) * 0x1.0p-52 - 1.0);
  }

 private:
  uint64_t state_;
};

std::vector<float> RandomVector(SplitMix64& rng, int64_t n, float scale, float offset) {
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = offset + scale * rng.Symmetric();
  return v;
}

// src [rows][cols] -> dst (row stride ld_dst, starting at column col0) as [cols][rows].
void TransposeInto(const std::vector<float>& src, int64_t rows, int64_t cols, float* dst,
                   int64_t ld_dst, int64_t col0) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + col0 + r] = src[r * cols + c];
  }
}

}  // namespace

void MatmulF32(const float* x, const float* wt, int64_t n, int64_t in, int64_t out, float* y,
               int threads) {
  // Small products are not worth a thread start (~20 us).
  if (threads <= 1 || n * in * out < (int64_t{1} << 18)) {
    Gemm(x, in, wt, out, n, in, out, y, out);
    return;
  }
  constexpr int64_t kRowTile = 6, kColTile = 16;
  if (n >= 2 * kRowTile * threads) {
    const int64_t tiles = (n + kRowTile - 1) / kRowTile;
    ParallelFor(tiles, threads, [&](int64_t b, int64_t e) {
      const int64_t r0 = b * kRowTile, r1 = std::min(n, e * kRowTile);
      Gemm(x + r0 * in, in, wt, out, r1 - r0, in, out, y + r0 * out, out);
    });
  } else {
    const int64_t tiles = (out + kColTile - 1) / kColTile;
    ParallelFor(tiles, threads, [&](int64_t b, int64_t e) {
      const int64_t c0 = b * kColTile, c1 = std::min(out, e * kColTile);
      Gemm(x, in, wt + c0, out, n, in, c1 - c0, y + c0, out);
    });
  }
}

LlamaModel::LlamaModel(const LlamaConfig& config, const RopeSpec& rope, const Options& options)
    : config_(config), rope_(rope) {
  threads_ =
      options.threads > 0 ? options.threads : std::max(1u, std::thread::hardware_concurrency());
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                             const Options& options) {
  absl::StatusOr<LlamaConfig> config = LoadLlamaConfig(dir);
  if (!config.ok()) return config.status();
  absl::StatusOr<RopeSpec> rope = RopeSpecOf(*config);
  if (!rope.ok()) return rope.status();
  absl::StatusOr<std::unique_ptr<SafetensorsModel>> st = SafetensorsModel::Open(dir);
  if (!st.ok()) return st.status();
  auto model = std::unique_ptr<LlamaModel>(new LlamaModel(*config, *rope, options));

  const LlamaConfig& c = *config;
  const int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = c.num_attention_heads * c.head_dim;
  const int64_t kvd = c.num_key_value_heads * c.head_dim;
  absl::Status status;
  auto read = [&](const std::string& name, std::vector<int64_t> shape, std::vector<float>* out) {
    if (!status.ok()) return;
    absl::StatusOr<std::vector<float>> t = (*st)->ReadFloat(name, shape);
    if (!t.ok()) {
      status = t.status();
      return;
    }
    *out = std::move(*t);
  };
  LlamaWeights& w = model->weights_;
  read("model.embed_tokens.weight", {V, D}, &w.embed_tokens);
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LlamaWeights::Layer& L = w.layers[static_cast<size_t>(l)];
    read(p + "input_layernorm.weight", {D}, &L.input_norm);
    read(p + "self_attn.q_proj.weight", {qd, D}, &L.q_proj);
    read(p + "self_attn.k_proj.weight", {kvd, D}, &L.k_proj);
    read(p + "self_attn.v_proj.weight", {kvd, D}, &L.v_proj);
    read(p + "self_attn.o_proj.weight", {D, qd}, &L.o_proj);
    read(p + "post_attention_layernorm.weight", {D}, &L.post_attn_norm);
    read(p + "mlp.gate_proj.weight", {I, D}, &L.gate_proj);
    read(p + "mlp.up_proj.weight", {I, D}, &L.up_proj);
    read(p + "mlp.down_proj.weight", {D, I}, &L.down_proj);
  }
  read("model.norm.weight", {D}, &w.final_norm);
  if (c.tie_word_embeddings && !(*st)->Has("lm_head.weight")) {
    w.lm_head = w.embed_tokens;
  } else {
    read("lm_head.weight", {V, D}, &w.lm_head);
  }
  if (!status.ok()) return status;
  model->BuildTransposed();
  return model;
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Random(const LlamaConfig& config,
                                                               uint64_t seed,
                                                               const Options& options) {
  if (absl::Status s = ValidateLlamaConfig(config); !s.ok()) return s;
  absl::StatusOr<RopeSpec> rope = RopeSpecOf(config);
  if (!rope.ok()) return rope.status();
  auto model = std::unique_ptr<LlamaModel>(new LlamaModel(config, *rope, options));
  const LlamaConfig& c = config;
  const int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = c.num_attention_heads * c.head_dim;
  const int64_t kvd = c.num_key_value_heads * c.head_dim;
  SplitMix64 rng(seed);
  auto linear = [&](int64_t out, int64_t in) {
    return RandomVector(rng, out * in, 1.0f / std::sqrt(static_cast<float>(in)), 0.0f);
  };
  LlamaWeights& w = model->weights_;
  w.embed_tokens = RandomVector(rng, V * D, 1.0f, 0.0f);
  w.layers.resize(static_cast<size_t>(c.num_hidden_layers));
  for (LlamaWeights::Layer& L : w.layers) {
    L.input_norm = RandomVector(rng, D, 0.1f, 1.0f);
    L.q_proj = linear(qd, D);
    L.k_proj = linear(kvd, D);
    L.v_proj = linear(kvd, D);
    L.o_proj = linear(D, qd);
    L.post_attn_norm = RandomVector(rng, D, 0.1f, 1.0f);
    L.gate_proj = linear(I, D);
    L.up_proj = linear(I, D);
    L.down_proj = linear(D, I);
  }
  w.final_norm = RandomVector(rng, D, 0.1f, 1.0f);
  w.lm_head = c.tie_word_embeddings ? w.embed_tokens : linear(V, D);
  model->BuildTransposed();
  return model;
}

void LlamaModel::BuildTransposed() {
  const LlamaConfig& c = config_;
  const int64_t D = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  const int64_t qd = c.num_attention_heads * c.head_dim;
  const int64_t kvd = c.num_key_value_heads * c.head_dim;
  const int64_t qkv = qd + 2 * kvd;
  layers_t_.resize(weights_.layers.size());
  for (size_t l = 0; l < weights_.layers.size(); ++l) {
    const LlamaWeights::Layer& L = weights_.layers[l];
    LayerT& T = layers_t_[l];
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
  lm_head_t_.assign(static_cast<size_t>(D * V), 0.0f);
  TransposeInto(weights_.lm_head, V, D, lm_head_t_.data(), V, 0);
}

absl::StatusOr<std::unique_ptr<KvCache>> LlamaModel::NewCache(DType dtype, int block_tokens) const {
  KvCacheOptions o;
  o.num_layers = static_cast<int>(config_.num_hidden_layers);
  o.num_kv_heads = static_cast<int>(config_.num_key_value_heads);
  o.head_dim = static_cast<int>(config_.head_dim);
  o.dtype = dtype;
  o.block_tokens = block_tokens;
  return KvCache::Create(o);
}

absl::Status LlamaModel::CheckInputs(absl::Span<const int32_t> tokens,
                                     absl::Span<const int64_t> positions) const {
  if (tokens.size() != positions.size()) {
    return absl::InvalidArgumentError(absl::StrCat("LlamaModel: ", tokens.size(), " tokens but ",
                                                   positions.size(), " positions"));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("LlamaModel: token ", i, " is ", tokens[i],
                                                     ", expected [0, ", config_.vocab_size, ")"));
    }
    if (positions[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("LlamaModel: position ", i, " is ", positions[i], ", expected >= 0"));
    }
  }
  return absl::OkStatus();
}

void LlamaModel::RmsNorm(const float* x, const float* w, int64_t n, float* out) const {
  RmsNormRows(x, w, n, config_.hidden_size, static_cast<float>(config_.rms_norm_eps), out);
}

absl::Status LlamaModel::Rope(int64_t n, int heads, float* x, const int64_t* positions,
                              int64_t seq_len) const {
  return ApplyRopeCpu(rope_, RopeTableFor(rope_, seq_len), DType::kF32, n, heads, x, positions);
}

absl::StatusOr<std::vector<float>> LlamaModel::Prefill(absl::Span<const int32_t> tokens,
                                                       absl::Span<const int64_t> positions,
                                                       KvCache* cache, ForwardTrace* trace) const {
  if (absl::Status s = CheckInputs(tokens, positions); !s.ok()) return s;
  if (cache == nullptr) return absl::InvalidArgumentError("LlamaModel::Prefill: null cache");
  const KvCacheOptions& co = cache->options();
  if (co.num_layers != config_.num_hidden_layers ||
      co.num_kv_heads != config_.num_key_value_heads || co.head_dim != config_.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LlamaModel::Prefill: the model needs a cache of ", config_.num_hidden_layers, " layers x ",
        config_.num_key_value_heads, " KV heads x head_dim ", config_.head_dim, ", got ",
        co.num_layers, " x ", co.num_kv_heads, " x ", co.head_dim));
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (trace != nullptr) *trace = ForwardTrace();
  if (n == 0) return std::vector<float>();

  const int64_t D = config_.hidden_size, I = config_.intermediate_size;
  const int64_t V = config_.vocab_size, d = config_.head_dim;
  const int H = static_cast<int>(config_.num_attention_heads);
  const int K = static_cast<int>(config_.num_key_value_heads);
  const int64_t qd = H * d, kvd = K * d, qkv_w = qd + 2 * kvd;
  const int64_t group = config_.group_size();
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));

  // The RoPE table of this call, as HF picks it: from max(position) + 1 of the batch; dynamic
  // NTK keeps a grown table until a batch is shorter than max_position_embeddings again.
  const int64_t seq = *std::max_element(positions.begin(), positions.end()) + 1;
  int64_t rope_len = seq;
  if (rope_.type == RopeType::kDynamic) {
    const int64_t cached = cache->rope_seq_len();
    rope_len = (seq > cached || seq < config_.max_position_embeddings) ? seq : cached;
  }

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
    std::copy_n(weights_.embed_tokens.data() + tokens[i] * D, D, x.data() + i * D);
  }
  if (trace != nullptr) trace->hidden.push_back(x);

  std::vector<float> xn(static_cast<size_t>(n * D)), qkv(static_cast<size_t>(n * qkv_w));
  std::vector<float> q(static_cast<size_t>(n * qd)), k(static_cast<size_t>(n * kvd)),
      v(static_cast<size_t>(n * kvd)), attn(static_cast<size_t>(n * qd)),
      proj(static_cast<size_t>(n * D)), gate_up(static_cast<size_t>(n * 2 * I)),
      h(static_cast<size_t>(n * I));
  std::vector<float> kt(static_cast<size_t>(K * d * total)),
      vals(static_cast<size_t>(K * total * d)), kbuf(static_cast<size_t>(total * d));

  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    const LlamaWeights::Layer& L = weights_.layers[static_cast<size_t>(l)];
    const LayerT& T = layers_t_[static_cast<size_t>(l)];

    // Attention block.
    RmsNorm(x.data(), L.input_norm.data(), n, xn.data());
    MatmulF32(xn.data(), T.qkv.data(), n, D, qkv_w, qkv.data(), threads_);
    for (int64_t i = 0; i < n; ++i) {
      const float* row = qkv.data() + i * qkv_w;
      std::copy_n(row, qd, q.data() + i * qd);
      std::copy_n(row + qd, kvd, k.data() + i * kvd);
      std::copy_n(row + qd + kvd, kvd, v.data() + i * kvd);
    }
    if (absl::Status s = Rope(n, H, q.data(), positions.data(), rope_len); !s.ok()) {
      return fail(s);
    }
    if (absl::Status s = Rope(n, K, k.data(), positions.data(), rope_len); !s.ok()) {
      return fail(s);
    }
    if (absl::Status s = cache->WriteLayer(static_cast<int>(l), *first, k, v); !s.ok()) {
      return fail(s);
    }
    // Attend over the stored (rounded) keys and values of every token in the cache.
    for (int g = 0; g < K; ++g) {
      absl::Span<float> kspan(kbuf.data(), static_cast<size_t>(total * d));
      absl::Span<float> vspan(vals.data() + g * total * d, static_cast<size_t>(total * d));
      if (absl::Status s = cache->ReadHead(static_cast<int>(l), g, 0, total, kspan, vspan);
          !s.ok()) {
        return fail(s);
      }
      float* ktg = kt.data() + g * d * total;
      for (int64_t t = 0; t < total; ++t) {
        for (int64_t c = 0; c < d; ++c) ktg[c * total + t] = kbuf[t * d + c];
      }
    }
    ParallelFor(H, threads_, [&](int64_t h0, int64_t h1) {
      for (int64_t hh = h0; hh < h1; ++hh) {
        const int64_t g = hh / group;  // HF repeat_kv: query head hh reads KV head hh / group
        CausalAttentionHead(q.data() + hh * d, qd, n, past, kt.data() + g * d * total, total,
                            vals.data() + g * total * d, static_cast<int>(d), scale,
                            attn.data() + hh * d, qd);
      }
    });
    MatmulF32(attn.data(), T.o.data(), n, qd, D, proj.data(), threads_);
    for (int64_t i = 0; i < n * D; ++i) x[i] += proj[i];
    if (trace != nullptr) {
      trace->queries.push_back(q);
      trace->keys.push_back(k);
      trace->values.push_back(v);
      trace->attention.push_back(attn);
    }

    // MLP block.
    RmsNorm(x.data(), L.post_attn_norm.data(), n, xn.data());
    MatmulF32(xn.data(), T.gate_up.data(), n, D, 2 * I, gate_up.data(), threads_);
    SwiGlu(gate_up.data(), n, I, h.data());
    MatmulF32(h.data(), T.down.data(), n, I, D, proj.data(), threads_);
    for (int64_t i = 0; i < n * D; ++i) x[i] += proj[i];
    if (trace != nullptr) trace->hidden.push_back(x);
  }

  RmsNorm(x.data(), weights_.final_norm.data(), n, xn.data());
  std::vector<float> logits(static_cast<size_t>(n * V));
  MatmulF32(xn.data(), lm_head_t_.data(), n, D, V, logits.data(), threads_);
  cache->set_rope_seq_len(rope_len);
  return logits;
}

absl::StatusOr<std::vector<float>> LlamaModel::Layer0Keys(
    absl::Span<const int32_t> tokens, absl::Span<const int64_t> positions) const {
  if (absl::Status s = CheckInputs(tokens, positions); !s.ok()) return s;
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) return std::vector<float>();
  const int64_t D = config_.hidden_size, d = config_.head_dim;
  const int H = static_cast<int>(config_.num_attention_heads);
  const int K = static_cast<int>(config_.num_key_value_heads);
  const int64_t qd = H * d, kvd = K * d, qkv_w = qd + 2 * kvd;
  std::vector<float> x(static_cast<size_t>(n * D)), xn(static_cast<size_t>(n * D));
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(weights_.embed_tokens.data() + tokens[i] * D, D, x.data() + i * D);
  }
  RmsNorm(x.data(), weights_.layers[0].input_norm.data(), n, xn.data());
  std::vector<float> k(static_cast<size_t>(n * kvd));
  // The k columns of the fused [hidden][q | k | v] weight.
  Gemm(xn.data(), D, layers_t_[0].qkv.data() + qd, qkv_w, n, D, kvd, k.data(), kvd);
  const int64_t seq = *std::max_element(positions.begin(), positions.end()) + 1;
  if (absl::Status s = Rope(n, K, k.data(), positions.data(), seq); !s.ok()) return s;
  return k;
}

}  // namespace llama
}  // namespace ropekv
