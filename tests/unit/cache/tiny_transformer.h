// A tiny reference decoder for the session tests: random weights, 1 or more layers, RMSNorm,
// grouped-query attention (GQA) with RoPE through ApplyRopeCpu, residual connections, no MLP.
// It plays the frontend: it encodes a document at explicit positions and returns the KV exactly
// as a frontend would cache it (keys rotated once and rounded once to the storage dtype), and it
// computes the attention output of a next token over a given KV cache.
//
// Layer 0's keys and values depend only on each token and its position, not on the context: that
// is what lets the tests compare a PIE-edited cache with a full re-encode within ulps.
#ifndef ROPEKV_TESTS_UNIT_CACHE_TINY_TRANSFORMER_H_
#define ROPEKV_TESTS_UNIT_CACHE_TINY_TRANSFORMER_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "cache/model.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rope.h"

namespace ropekv::testing {

struct TinyConfig {
  int layers = 1;
  int vocab = 97;
  int hidden = 48;
  int q_heads = 4;
  int kv_heads = 2;  // GQA: q head h reads kv head h / (q_heads / kv_heads)
  int head_dim = 32;
  DType dtype = DType::kBF16;
  int block_tokens = 8;
  double theta = 10000.0;

  ModelSpec Spec() const {
    ModelSpec s;
    s.layers = layers;
    s.kv_heads = kv_heads;
    s.head_dim = head_dim;
    s.dtype = dtype;
    s.block_tokens = block_tokens;
    s.rope.theta = theta;
    s.rope.head_dim = head_dim;
    return s;
  }
};

class TinyTransformer {
 public:
  TinyTransformer(const TinyConfig& config, uint64_t seed) : c_(config) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto fill = [&](std::vector<float>& w, size_t n, float scale) {
      w.resize(n);
      for (float& x : w) x = normal(rng) * scale;
    };
    const float s = 1.0f / std::sqrt(static_cast<float>(c_.hidden));
    fill(embed_, static_cast<size_t>(c_.vocab) * c_.hidden, 1.0f);
    layers_.resize(c_.layers);
    for (Layer& l : layers_) {
      fill(l.wq, static_cast<size_t>(c_.q_heads) * c_.head_dim * c_.hidden, s);
      fill(l.wk, static_cast<size_t>(c_.kv_heads) * c_.head_dim * c_.hidden, s);
      fill(l.wv, static_cast<size_t>(c_.kv_heads) * c_.head_dim * c_.hidden, s);
      fill(l.wo, static_cast<size_t>(c_.hidden) * c_.q_heads * c_.head_dim,
           1.0f / std::sqrt(static_cast<float>(c_.q_heads * c_.head_dim)));
    }
  }

  const TinyConfig& config() const { return c_; }
  ModelSpec spec() const { return c_.Spec(); }

  // Full causal forward of `tokens` at positions base + i. Returns the KV cache in range layout
  // [layer][k|v][kv_head][n][head_dim] of the dtype.
  std::vector<uint8_t> Encode(const std::vector<int32_t>& tokens, int64_t base = 0) const {
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int D = c_.head_dim, H = c_.kv_heads, Q = c_.q_heads;
    const size_t es = DTypeSize(c_.dtype);
    std::vector<uint8_t> kv(static_cast<size_t>(c_.layers) * 2 * H * n * D * es);
    std::vector<int64_t> positions(n);
    for (int64_t i = 0; i < n; ++i) positions[i] = base + i;
    std::vector<float> x(static_cast<size_t>(n) * c_.hidden);
    for (int64_t i = 0; i < n; ++i) {
      for (int j = 0; j < c_.hidden; ++j)
        x[i * c_.hidden + j] = embed_[Tok(tokens[i]) * c_.hidden + j];
    }
    for (int l = 0; l < c_.layers; ++l) {
      const Layer& w = layers_[l];
      std::vector<float> h = RmsNorm(x, n);
      std::vector<float> q = Project(w.wq, h, n, Q * D);           // [n][Q][D]
      std::vector<uint8_t> k = Round(Project(w.wk, h, n, H * D));  // [n][H][D] of dtype
      std::vector<uint8_t> v = Round(Project(w.wv, h, n, H * D));
      if (n > 0) {
        ApplyRopeCpu(c_.Spec().rope, kBaseTable, DType::kF32, n, Q, q.data(), positions.data())
            .IgnoreError();
        ApplyRopeCpu(c_.Spec().rope, kBaseTable, c_.dtype, n, H, k.data(), positions.data())
            .IgnoreError();
      }
      // Scatter into the cache layout.
      for (int kvi = 0; kvi < 2; ++kvi) {
        const std::vector<uint8_t>& src = kvi == 0 ? k : v;
        for (int hh = 0; hh < H; ++hh) {
          for (int64_t t = 0; t < n; ++t) {
            std::memcpy(&kv[(((static_cast<size_t>(l) * 2 + kvi) * H + hh) * n + t) * D * es],
                        &src[(static_cast<size_t>(t) * H + hh) * D * es], D * es);
          }
        }
      }
      // Causal attention over the stored (rounded) K/V, then o_proj and the residual.
      std::vector<float> attn(static_cast<size_t>(n) * Q * D);
      for (int64_t i = 0; i < n; ++i) {
        for (int qh = 0; qh < Q; ++qh) {
          std::vector<double> o = AttendRows(&q[(i * Q + qh) * D], kv, n, l, qh / (Q / H), i + 1);
          for (int d = 0; d < D; ++d) attn[(i * Q + qh) * D + d] = static_cast<float>(o[d]);
        }
      }
      std::vector<float> out = Project(w.wo, attn, n, c_.hidden, Q * D);
      for (size_t j = 0; j < x.size(); ++j) x[j] += out[j];
    }
    return kv;
  }

  // Layer-0 attention output (fp64, [q_heads][head_dim]) of one more token `token` at position
  // `pos` whose query attends over the n cached tokens of `kv` (range layout, as Encode returns
  // or as a session reads) and over its own key and value.
  std::vector<double> NextTokenAttention(const std::vector<uint8_t>& kv, int64_t n, int32_t token,
                                         int64_t pos) const {
    const int D = c_.head_dim, H = c_.kv_heads, Q = c_.q_heads;
    const size_t es = DTypeSize(c_.dtype);
    std::vector<float> x(embed_.begin() + Tok(token) * c_.hidden,
                         embed_.begin() + (Tok(token) + 1) * c_.hidden);
    const Layer& w = layers_[0];
    std::vector<float> h = RmsNorm(x, 1);
    std::vector<float> q = Project(w.wq, h, 1, Q * D);
    std::vector<uint8_t> k = Round(Project(w.wk, h, 1, H * D));
    std::vector<uint8_t> v = Round(Project(w.wv, h, 1, H * D));
    ApplyRopeCpu(c_.Spec().rope, kBaseTable, DType::kF32, 1, Q, q.data(), &pos).IgnoreError();
    ApplyRopeCpu(c_.Spec().rope, kBaseTable, c_.dtype, 1, H, k.data(), &pos).IgnoreError();
    // The cache extended by the new token (layer 0 only).
    std::vector<uint8_t> ext(static_cast<size_t>(2) * H * (n + 1) * D * es);
    for (int kvi = 0; kvi < 2; ++kvi) {
      for (int hh = 0; hh < H; ++hh) {
        const size_t row_out = ((static_cast<size_t>(kvi) * H + hh) * (n + 1)) * D * es;
        const size_t row_in = ((static_cast<size_t>(kvi) * H + hh) * n) * D * es;
        std::memcpy(&ext[row_out], &kv[row_in], n * D * es);
        std::memcpy(&ext[row_out + n * D * es],
                    &(kvi == 0 ? k : v)[static_cast<size_t>(hh) * D * es], D * es);
      }
    }
    std::vector<double> out;
    for (int qh = 0; qh < Q; ++qh) {
      std::vector<double> o = AttendRows(&q[qh * D], ext, n + 1, 0, qh / (Q / H), n + 1);
      out.insert(out.end(), o.begin(), o.end());
    }
    return out;
  }

 private:
  struct Layer {
    std::vector<float> wq, wk, wv, wo;  // [out][in]
  };

  size_t Tok(int32_t t) const {
    return static_cast<size_t>(((t % c_.vocab) + c_.vocab) % c_.vocab);
  }

  std::vector<float> RmsNorm(const std::vector<float>& x, int64_t n) const {
    std::vector<float> y(x.size());
    for (int64_t i = 0; i < n; ++i) {
      double ss = 0;
      for (int j = 0; j < c_.hidden; ++j) ss += double{x[i * c_.hidden + j]} * x[i * c_.hidden + j];
      const float r = static_cast<float>(1.0 / std::sqrt(ss / c_.hidden + 1e-6));
      for (int j = 0; j < c_.hidden; ++j) y[i * c_.hidden + j] = x[i * c_.hidden + j] * r;
    }
    return y;
  }

  // y[i][o] = sum_j w[o][j] x[i][j] (fp64 accumulation).
  std::vector<float> Project(const std::vector<float>& w, const std::vector<float>& x, int64_t n,
                             int out, int in = -1) const {
    if (in < 0) in = c_.hidden;
    std::vector<float> y(static_cast<size_t>(n) * out);
    for (int64_t i = 0; i < n; ++i) {
      for (int o = 0; o < out; ++o) {
        double acc = 0;
        for (int j = 0; j < in; ++j)
          acc += double{w[static_cast<size_t>(o) * in + j]} * x[i * in + j];
        y[i * out + o] = static_cast<float>(acc);
      }
    }
    return y;
  }

  std::vector<uint8_t> Round(const std::vector<float>& x) const {
    std::vector<uint8_t> out(x.size() * DTypeSize(c_.dtype));
    for (size_t i = 0; i < x.size(); ++i) StoreFromFloat(out.data(), i, c_.dtype, x[i]);
    return out;
  }

  // Softmax attention of one fp32 query over the first `m` tokens of kv head `kh` of layer `l` of
  // a range-layout cache of n tokens, in fp64.
  std::vector<double> AttendRows(const float* q, const std::vector<uint8_t>& kv, int64_t n, int l,
                                 int kh, int64_t m) const {
    const int D = c_.head_dim, H = c_.kv_heads;
    const size_t kbase = ((static_cast<size_t>(l) * 2 + 0) * H + kh) * n * D;
    const size_t vbase = ((static_cast<size_t>(l) * 2 + 1) * H + kh) * n * D;
    std::vector<double> scores(m);
    double mx = -1e300;
    for (int64_t t = 0; t < m; ++t) {
      double s = 0;
      for (int d = 0; d < D; ++d)
        s += double{q[d]} * LoadAsFloat(kv.data(), kbase + t * D + d, c_.dtype);
      scores[t] = s / std::sqrt(static_cast<double>(D));
      mx = std::max(mx, scores[t]);
    }
    double z = 0;
    for (double& s : scores) z += (s = std::exp(s - mx));
    std::vector<double> o(D, 0.0);
    for (int64_t t = 0; t < m; ++t) {
      for (int d = 0; d < D; ++d)
        o[d] += scores[t] / z * LoadAsFloat(kv.data(), vbase + t * D + d, c_.dtype);
    }
    return o;
  }

  TinyConfig c_;
  std::vector<float> embed_;  // [vocab][hidden]
  std::vector<Layer> layers_;
};

// Range-layout KV of n tokens -> block layout (ceil(n / bt) blocks, the padding poisoned 0xFF).
inline std::vector<uint8_t> ToBlocks(const ModelSpec& spec, const std::vector<uint8_t>& kv,
                                     int64_t n) {
  const int64_t bt = spec.block_tokens;
  const int64_t blocks = (n + bt - 1) / bt;
  const size_t row = static_cast<size_t>(spec.head_dim) * DTypeSize(spec.dtype);
  const int rows = spec.layers * 2 * spec.kv_heads;
  std::vector<uint8_t> out(static_cast<size_t>(blocks) * rows * bt * row, 0xFF);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int r = 0; r < rows; ++r) {
      for (int64_t t = 0; t < bt && b * bt + t < n; ++t) {
        std::memcpy(&out[((static_cast<size_t>(b) * rows + r) * bt + t) * row],
                    &kv[(static_cast<size_t>(r) * n + b * bt + t) * row], row);
      }
    }
  }
  return out;
}

// Tokens [a, b) of a range-layout KV of n tokens, in range layout.
inline std::vector<uint8_t> SliceTokens(const ModelSpec& spec, const std::vector<uint8_t>& kv,
                                        int64_t n, int64_t a, int64_t b) {
  const size_t row = static_cast<size_t>(spec.head_dim) * DTypeSize(spec.dtype);
  const int rows = spec.layers * 2 * spec.kv_heads;
  std::vector<uint8_t> out(static_cast<size_t>(rows) * (b - a) * row);
  for (int r = 0; r < rows; ++r) {
    if (b > a) {
      std::memcpy(&out[static_cast<size_t>(r) * (b - a) * row],
                  &kv[(static_cast<size_t>(r) * n + a) * row], (b - a) * row);
    }
  }
  return out;
}

}  // namespace ropekv::testing

#endif  // ROPEKV_TESTS_UNIT_CACHE_TINY_TRANSFORMER_H_
