#include "clients/llama/cpu_ops.h"

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace ropekv {
namespace llama {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

std::vector<float> Random(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Bound of the fp32 rounding error of a length-k dot product relative to sum |x_i w_i|.
double DotTolerance(int64_t k) { return 2.0 * static_cast<double>(k) * 6e-8 + 1e-7; }

using GemmFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                        float*, int64_t);

void CheckGemm(GemmFn gemm, int64_t n, int64_t in, int64_t out, std::mt19937& rng) {
  const int64_t ldx = in + 3, ldw = out + 5, ldy = out + 2;
  std::vector<float> x = Random(rng, static_cast<size_t>(n * ldx));
  std::vector<float> w = Random(rng, static_cast<size_t>(in * ldw));
  std::vector<float> y(static_cast<size_t>(n * ldy), kNaN);  // poisoned
  gemm(x.data(), ldx, w.data(), ldw, n, in, out, y.data(), ldy);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < ldy; ++j) {
      if (j >= out) {
        ASSERT_TRUE(std::isnan(y[i * ldy + j])) << "wrote past out at " << i << "," << j;
        continue;
      }
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < in; ++k) {
        const double p = static_cast<double>(x[i * ldx + k]) * w[k * ldw + j];
        ref += p;
        mag += std::fabs(p);
      }
      ASSERT_NEAR(y[i * ldy + j], ref, DotTolerance(in) * mag)
          << "n=" << n << " in=" << in << " out=" << out << " at " << i << "," << j;
    }
  }
}

TEST(CpuOpsTest, GemmMatchesFp64OnOddShapesAndStrides) {
  std::mt19937 rng(7);
  for (GemmFn gemm : {&Gemm, &GemmPortable}) {
    // Row counts cover every tail of the 6- and 3-row tiles and the in-place path for 1-2 rows;
    // columns every tail of the 16-column panel; in = 600 spans two 512-deep packed panels.
    for (int64_t n : {1, 2, 3, 5, 6, 7, 13}) {
      for (int64_t out : {1, 15, 16, 17, 40}) {
        for (int64_t in : {1, 37, 600}) {
          CheckGemm(gemm, n, in, out, rng);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST(CpuOpsTest, GemmWithEmptyReductionWritesZeros) {
  std::vector<float> y(6, kNaN);
  Gemm(nullptr, 0, nullptr, 3, 2, 0, 3, y.data(), 3);
  for (float v : y) EXPECT_EQ(v, 0.0f);
}

TEST(CpuOpsTest, ParallelForCoversEveryIndexOnce) {
  for (int threads : {1, 2, 3, 8}) {
    for (int64_t count : {0, 1, 5, 100}) {
      std::vector<int> hits(static_cast<size_t>(count), 0);
      ParallelFor(count, threads, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) ++hits[i];
      });
      for (int h : hits) ASSERT_EQ(h, 1);
    }
  }
}

TEST(CpuOpsTest, RmsNormAndSwiGluMatchFp64) {
  std::mt19937 rng(8);
  const int64_t n = 3, dim = 50;
  std::vector<float> x = Random(rng, n * dim), w = Random(rng, dim);
  std::vector<float> out(n * dim, kNaN);
  const float eps = 1e-6f;
  RmsNormRows(x.data(), w.data(), n, dim, eps, out.data());
  for (int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (int64_t c = 0; c < dim; ++c) ss += static_cast<double>(x[i * dim + c]) * x[i * dim + c];
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int64_t c = 0; c < dim; ++c) {
      const double ref = static_cast<double>(w[c]) * x[i * dim + c] * inv;
      ASSERT_NEAR(out[i * dim + c], ref, 1e-6 * (1 + std::fabs(ref)));
    }
  }
  const int64_t inter = 20;
  std::vector<float> gu = Random(rng, n * 2 * inter), h(n * inter, kNaN);
  SwiGlu(gu.data(), n, inter, h.data());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < inter; ++c) {
      const double g = gu[i * 2 * inter + c], u = gu[i * 2 * inter + inter + c];
      const double ref = g / (1 + std::exp(-g)) * u;
      ASSERT_NEAR(h[i * inter + c], ref, 1e-6 * (1 + std::fabs(ref)));
    }
  }
}

TEST(CpuOpsTest, CausalAttentionHeadMatchesFp64) {
  std::mt19937 rng(9);
  const int d = 16;
  // n spans several 48-query chunks; past > 0 puts cached keys before the new ones.
  for (auto [past, n] : {std::pair<int64_t, int64_t>{0, 1}, {0, 100}, {37, 61}, {5, 1}}) {
    const int64_t kv_len = past + n + 3;  // extra keys past the last query must be ignored
    const int64_t ldq = d + 4, ldo = d + 2;
    std::vector<float> q = Random(rng, n * ldq), k = Random(rng, kv_len * d),
                       v = Random(rng, kv_len * d);
    std::vector<float> kt(d * kv_len);
    for (int64_t t = 0; t < kv_len; ++t) {
      for (int c = 0; c < d; ++c) kt[c * kv_len + t] = k[t * d + c];
    }
    std::vector<float> out(n * ldo, kNaN);
    const float scale = 0.25f;
    CausalAttentionHead(q.data(), ldq, n, past, kt.data(), kv_len, v.data(), d, scale, out.data(),
                        ldo);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t visible = past + i + 1;
      std::vector<double> s(visible);
      double m = -1e300;
      for (int64_t j = 0; j < visible; ++j) {
        double dot = 0;
        for (int c = 0; c < d; ++c) dot += static_cast<double>(q[i * ldq + c]) * k[j * d + c];
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      double sum = 0;
      for (double& e : s) sum += (e = std::exp(e - m));
      for (int c = 0; c < d; ++c) {
        double ref = 0;
        for (int64_t j = 0; j < visible; ++j) ref += s[j] / sum * v[j * d + c];
        ASSERT_NEAR(out[i * ldo + c], ref, 1e-5) << "past " << past << " i " << i << " c " << c;
      }
      for (int64_t c = d; c < ldo; ++c) ASSERT_TRUE(std::isnan(out[i * ldo + c]));
    }
  }
}

}  // namespace
}  // namespace llama
}  // namespace ropekv
