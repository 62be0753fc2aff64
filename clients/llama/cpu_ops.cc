#include "clients/llama/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace ropekv {
namespace llama {
namespace {

// The matmul works on panels of kNr = 16 columns of w, packed contiguously ([kc][16]), and tiles
// of MR rows of x whose MR x 16 accumulators live in vector registers: with AVX2 (8 floats a
// vector) 6 rows x 2 vectors, otherwise (SSE2 / NEON, 4 floats) 3 rows x 4 vectors. GCC's vector
// extensions keep the accumulators in registers; plain arrays are spilled at -O3.
constexpr int kNr = 16;

// Depth of a packed panel: kKc x kNr floats (32 KiB) stay in L1/L2 while every row tile of x
// streams over them. Rows of w are often 4 KiB apart (1024 floats), which maps a column panel read
// in place onto a handful of cache sets; packing makes it contiguous.
constexpr int64_t kKc = 512;

typedef float V4 __attribute__((vector_size(16)));
typedef float V8 __attribute__((vector_size(32)));

// (By pointer: returning a 32-byte vector from a function compiled without AVX changes the ABI.)
template <typename V>
__attribute__((always_inline)) inline void LoadV(V* v, const float* p) {
  std::memcpy(v, p, sizeof(V));
}

// y[r][c] (c < nc) = (accumulate ? y[r][c] : 0) + sum_k x[r][k] p[k][c] for an MR x kNr tile,
// p the panel [kc][kNr] with row stride ldp (kNr when packed; w's own stride when read in place,
// which needs nc == kNr). Accumulation is in k order, so splitting k into panels does not
// change the result.
template <typename V, int MR>
__attribute__((always_inline)) inline void Tile(const float* x, int64_t ldx, const float* p,
                                                int64_t ldp, int64_t kc, bool accumulate, float* y,
                                                int64_t ldy, int64_t nc) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  constexpr int kNv = kNr / kLanes;
  V acc[MR][kNv];
  if (accumulate) {
    float tmp[kNr] = {};
    for (int r = 0; r < MR; ++r) {
      std::memcpy(tmp, y + r * ldy, static_cast<size_t>(nc) * sizeof(float));
      for (int v = 0; v < kNv; ++v) LoadV(&acc[r][v], tmp + v * kLanes);
    }
  } else {
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < kNv; ++v) acc[r][v] = V{};
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    V pv[kNv];
    for (int v = 0; v < kNv; ++v) LoadV(&pv[v], p + k * ldp + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float xv = x[r * ldx + k];
      for (int v = 0; v < kNv; ++v) acc[r][v] += xv * pv[v];
    }
  }
  if (nc == kNr) {
    for (int r = 0; r < MR; ++r) std::memcpy(y + r * ldy, acc[r], sizeof(acc[r]));
  } else {
    for (int r = 0; r < MR; ++r) {
      float tmp[kNr];
      std::memcpy(tmp, acc[r], sizeof(tmp));
      std::memcpy(y + r * ldy, tmp, static_cast<size_t>(nc) * sizeof(float));
    }
  }
}

// Rows [0, n) of one packed panel: full tiles of MR rows, then one tile of the remainder.
template <typename V, int MR>
__attribute__((always_inline)) inline void PanelRows(const float* x, int64_t ldx, const float* p,
                                                     int64_t ldp, int64_t n, int64_t kc,
                                                     bool accumulate, float* y, int64_t ldy,
                                                     int64_t nc) {
  int64_t i = 0;
  for (; i + MR <= n; i += MR)
    Tile<V, MR>(x + i * ldx, ldx, p, ldp, kc, accumulate, y + i * ldy, ldy, nc);
  const float* xt = x + i * ldx;
  float* yt = y + i * ldy;
  switch (n - i) {
    case 5:
      if constexpr (MR > 5) Tile<V, 5>(xt, ldx, p, ldp, kc, accumulate, yt, ldy, nc);
      break;
    case 4:
      if constexpr (MR > 4) Tile<V, 4>(xt, ldx, p, ldp, kc, accumulate, yt, ldy, nc);
      break;
    case 3:
      if constexpr (MR > 3) Tile<V, 3>(xt, ldx, p, ldp, kc, accumulate, yt, ldy, nc);
      break;
    case 2:
      if constexpr (MR > 2) Tile<V, 2>(xt, ldx, p, ldp, kc, accumulate, yt, ldy, nc);
      break;
    case 1:
      if constexpr (MR > 1) Tile<V, 1>(xt, ldx, p, ldp, kc, accumulate, yt, ldy, nc);
      break;
    default:
      break;
  }
}

template <typename V, int MR>
__attribute__((always_inline)) inline void GemmImpl(const float* x, int64_t ldx, const float* w,
                                                    int64_t ldw, int64_t n, int64_t in, int64_t out,
                                                    float* y, int64_t ldy) {
  thread_local std::vector<float> pack;
  pack.resize(static_cast<size_t>(kKc * kNr));
  for (int64_t j0 = 0; j0 < out; j0 += kNr) {
    const int64_t nc = std::min<int64_t>(kNr, out - j0);
    if (n < 3 && nc == kNr) {
      // A row or two (decode): each panel row is used once or twice, so packing would only
      // double the reads of w. Read it in place.
      PanelRows<V, MR>(x, ldx, w + j0, ldw, n, in, false, y + j0, ldy, nc);
      continue;
    }
    for (int64_t k0 = 0; k0 < in; k0 += kKc) {
      const int64_t kc = std::min(kKc, in - k0);
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = w + (k0 + k) * ldw + j0;
        float* dst = pack.data() + k * kNr;
        for (int64_t c = 0; c < nc; ++c) dst[c] = src[c];
        for (int64_t c = nc; c < kNr; ++c) dst[c] = 0.0f;
      }
      PanelRows<V, MR>(x + k0, ldx, pack.data(), kNr, n, kc, k0 > 0, y + j0, ldy, nc);
    }
  }
}

void GemmPortableImpl(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t n,
                      int64_t in, int64_t out, float* y, int64_t ldy) {
  GemmImpl<V4, 3>(x, ldx, w, ldw, n, in, out, y, ldy);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define ROPEKV_LLAMA_HAVE_AVX2_PATH 1
// The same template compiled for AVX2 + FMA, chosen at run time.
__attribute__((target("avx2,fma"))) void GemmAvx2(const float* x, int64_t ldx, const float* w,
                                                  int64_t ldw, int64_t n, int64_t in, int64_t out,
                                                  float* y, int64_t ldy) {
  GemmImpl<V8, 6>(x, ldx, w, ldw, n, in, out, y, ldy);
}
#endif

}  // namespace

void ParallelFor(int64_t count, int threads, const std::function<void(int64_t, int64_t)>& fn) {
  if (count <= 0) return;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, count));
  if (parts == 1) {
    fn(0, count);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(parts - 1));
  const int64_t chunk = (count + parts - 1) / parts;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t b = p * chunk, e = std::min(count, b + chunk);
    if (b >= e) break;
    workers.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(0, std::min(count, chunk));
  for (std::thread& t : workers) t.join();
}

void Gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t n, int64_t in,
          int64_t out, float* y, int64_t ldy) {
  if (n <= 0 || out <= 0) return;
  if (in <= 0) {
    for (int64_t i = 0; i < n; ++i) std::fill_n(y + i * ldy, out, 0.0f);
    return;
  }
#ifdef ROPEKV_LLAMA_HAVE_AVX2_PATH
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    GemmAvx2(x, ldx, w, ldw, n, in, out, y, ldy);
    return;
  }
#endif
  GemmPortableImpl(x, ldx, w, ldw, n, in, out, y, ldy);
}

void GemmPortable(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t n, int64_t in,
                  int64_t out, float* y, int64_t ldy) {
  if (n <= 0 || out <= 0) return;
  if (in <= 0) {
    for (int64_t i = 0; i < n; ++i) std::fill_n(y + i * ldy, out, 0.0f);
    return;
  }
  GemmPortableImpl(x, ldx, w, ldw, n, in, out, y, ldy);
}

void RmsNormRows(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float* xr = x + i * dim;
    double ss = 0;
    for (int64_t c = 0; c < dim; ++c) ss += static_cast<double>(xr[c]) * xr[c];
    const float var = static_cast<float>(ss / static_cast<double>(dim));
    const float inv = 1.0f / std::sqrt(var + eps);
    float* o = out + i * dim;
    for (int64_t c = 0; c < dim; ++c) o[c] = w[c] * (xr[c] * inv);
  }
}

void SwiGlu(const float* gate_up, int64_t n, int64_t inter, float* h) {
  for (int64_t i = 0; i < n; ++i) {
    const float* g = gate_up + i * 2 * inter;
    const float* u = g + inter;
    float* o = h + i * inter;
    for (int64_t c = 0; c < inter; ++c) {
      const float s = g[c] / (1.0f + std::exp(-g[c]));
      o[c] = s * u[c];
    }
  }
}

void CausalAttentionHead(const float* q, int64_t ldq, int64_t n, int64_t past, const float* kt,
                         int64_t kv_len, const float* v, int d, float scale, float* out,
                         int64_t ldo) {
  // Queries in chunks: scores of a chunk over the keys its last query sees are one matmul
  // (the causal rectangle wastes at most kChunk/2 keys per row), then P . V is another.
  constexpr int64_t kChunk = 48;
  std::vector<float> s(static_cast<size_t>(kChunk * (past + n)));
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t rows = std::min(kChunk, n - i0);
    const int64_t len = past + i0 + rows;  // keys visible to the chunk's last query
    Gemm(q + i0 * ldq, ldq, kt, kv_len, rows, d, len, s.data(), len);
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s.data() + r * len;
      const int64_t visible = past + i0 + r + 1;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        sr[j] *= scale;
        m = std::max(m, sr[j]);
      }
      float sum = 0;
      for (int64_t j = 0; j < visible; ++j) {
        sr[j] = std::exp(sr[j] - m);
        sum += sr[j];
      }
      for (int64_t j = 0; j < visible; ++j) sr[j] /= sum;
      for (int64_t j = visible; j < len; ++j) sr[j] = 0;
    }
    Gemm(s.data(), len, v, d, rows, len, d, out + i0 * ldo, ldo);
  }
}

}  // namespace llama
}  // namespace ropekv
