// Tests of page metadata (bulk build, appends, outward rounding) and of the Quest bound.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/topk/topk.h"
#include "kernels/topk/topk_math.h"
#include "tests/unit/kernels/topk/topk_test_util.h"

namespace ropekv {
namespace topk {
namespace {

using ::testing::HasSubstr;
using testing_util::Problem;

constexpr float kInf = std::numeric_limits<float>::infinity();

TEST(RoundOutwardTest, RoundsAwayFromTheValueInTheAskedDirection) {
  using internal::RoundOutward;
  const float x = 1.0f + std::ldexp(1.0f, -10);  // between bf16 1.0 and 1.0078125
  EXPECT_EQ(RoundOutward(DType::kBF16, x, true), 1.0078125f);
  EXPECT_EQ(RoundOutward(DType::kBF16, x, false), 1.0f);
  EXPECT_EQ(RoundOutward(DType::kBF16, -x, true), -1.0f);
  EXPECT_EQ(RoundOutward(DType::kBF16, -x, false), -1.0078125f);
  EXPECT_EQ(RoundOutward(DType::kBF16, 1.5f, true), 1.5f);  // representable: unchanged
  EXPECT_EQ(RoundOutward(DType::kF16, 70000.0f, true), kInf);
  EXPECT_EQ(RoundOutward(DType::kF16, 70000.0f, false), 65504.0f);
  EXPECT_EQ(RoundOutward(DType::kF16, -70000.0f, true), -65504.0f);
  EXPECT_EQ(RoundOutward(DType::kF16, -70000.0f, false), -kInf);
  EXPECT_EQ(RoundOutward(DType::kF16, 1e-10f, true), std::ldexp(1.0f, -24));
  EXPECT_EQ(RoundOutward(DType::kF16, -1e-10f, false), -std::ldexp(1.0f, -24));
  // Zeros: +0 in an upper bound, -0 in a lower bound.
  EXPECT_FALSE(std::signbit(RoundOutward(DType::kF16, -1e-10f, true)));
  EXPECT_TRUE(std::signbit(RoundOutward(DType::kF16, 1e-10f, false)));
  EXPECT_FALSE(std::signbit(RoundOutward(DType::kF32, -0.0f, true)));
  EXPECT_TRUE(std::signbit(RoundOutward(DType::kF32, 0.0f, false)));
  EXPECT_FALSE(std::signbit(RoundOutward(DType::kBF16, -0.0f, true)));
}

TEST(OrderKeyTest, OrdersLikeFloatsWithNanAsNegativeInfinity) {
  using internal::OrderKey;
  const std::vector<float> v = {-kInf, -3e38f, -1.0f, -1e-40f, 0.0f, 1e-40f, 1.0f, 3e38f, kInf};
  for (size_t i = 1; i < v.size(); ++i) EXPECT_LT(OrderKey(v[i - 1]), OrderKey(v[i])) << i;
  EXPECT_EQ(OrderKey(-0.0f), OrderKey(0.0f));
  EXPECT_EQ(OrderKey(std::numeric_limits<float>::quiet_NaN()), OrderKey(-kInf));
  EXPECT_GT(OrderKey(-kInf), 0u);
  for (float f : v) EXPECT_EQ(internal::KeyToFloat(OrderKey(f)), f);
}

class PageMetaTypesTest : public ::testing::TestWithParam<std::tuple<DType, DType>> {};

TEST_P(PageMetaTypesTest, BoundsEveryKeyTightlyAndDominatesEveryScore) {
  const auto [key_type, meta_type] = GetParam();
  const int64_t n = 16 * 40 + 7;  // partial last page
  Problem p(2, 8, 128, n, key_type, DType::kBF16,
            200 + static_cast<int>(key_type) * 3 + static_cast<int>(meta_type));
  // Wider spread, some exact zeros of both signs.
  std::mt19937_64 rng(9);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (int h = 0; h < 2; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      for (int c = 0; c < 128; ++c) {
        const uint64_t u = rng() % 50;
        p.SetKey(h, t, c, u == 0 ? 0.0f : (u == 1 ? -0.0f : dist(rng)));
      }
    }
  }
  p.BuildMeta(meta_type);
  for (int h = 0; h < 2; ++h) {
    for (int64_t q = 0; q < p.pages(); ++q) {
      for (int c = 0; c < 128; ++c) {
        double mx = -1e300, mn = 1e300;
        for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) {
          mx = std::max(mx, double{p.Key(h, t, c)});
          mn = std::min(mn, double{p.Key(h, t, c)});
        }
        const double hi = p.MetaHi(h, q, c), lo = p.MetaLo(h, q, c);
        ASSERT_GE(hi, mx);
        ASSERT_LE(lo, mn);
        // Tight: within one unit of the stored type.
        ASSERT_LE(hi - mx, UlpOf(meta_type, mx)) << "page " << q << " col " << c;
        ASSERT_LE(mn - lo, UlpOf(meta_type, mn)) << "page " << q << " col " << c;
        ASSERT_FALSE(std::signbit(p.MetaHi(h, q, c)) && p.MetaHi(h, q, c) == 0.0f);
        ASSERT_FALSE(!std::signbit(p.MetaLo(h, q, c)) && p.MetaLo(h, q, c) == 0.0f);
      }
    }
  }
  // The bound, in fp64 from the stored metadata, is >= every q.k of its page; PageBoundCpu
  // (per query head) is that bound within float rounding.
  SelectRequest req = p.Request(Mode::kBound, GqaReduction::kPerQueryHead, 1);
  std::vector<float> bounds(8 * p.pages(), -1.0f);
  ASSERT_TRUE(PageBoundCpu(req, bounds.data()).ok());
  for (int h = 0; h < 8; ++h) {
    for (int64_t q = 0; q < p.pages(); ++q) {
      const double b = p.HeadBound(h, q);
      for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) {
        ASSERT_GE(b, p.HeadScore(h, t)) << "head " << h << " token " << t;
      }
      ASSERT_NEAR(bounds[h * p.pages() + q], b, 1e-6 * std::fabs(b));
    }
  }
  // Reduced bounds: max and sum over the group of the per-head bounds.
  for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum}) {
    std::vector<float> rb(2 * p.pages());
    ASSERT_TRUE(PageBoundCpu(p.Request(Mode::kBound, red, 1), rb.data()).ok());
    for (int h = 0; h < 2; ++h) {
      for (int64_t q = 0; q < p.pages(); ++q) {
        const double want = p.RowBound(red, h, q);
        ASSERT_NEAR(rb[h * p.pages() + q], want, 1e-6 * std::max(1.0, std::fabs(want)));
      }
    }
  }
}

TEST_P(PageMetaTypesTest, BulkBuildEqualsTokenByTokenAndChunkedAppends) {
  const auto [key_type, meta_type] = GetParam();
  const int64_t n = 16 * 9 + 11;
  Problem p(3, 3, 64, n, key_type, DType::kF32, 300);
  // Signed zeros, infinities and tiny values in some columns (the 16-bit same-type fast path
  // handles them in integer order-key space).
  for (int h = 0; h < 3; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      if (t % 7 == 0) p.SetKey(h, t, 0, -0.0f);
      if (t % 5 == 0) p.SetKey(h, t, 1, 0.0f);
      if (t % 11 == 0) p.SetKey(h, t, 2, kInf);
      if (t % 13 == 0) p.SetKey(h, t, 3, -kInf);
      if (t % 3 == 0) p.SetKey(h, t, 4, (t % 2 ? -1.0f : 1.0f) * 1e-40f);
      p.SetKey(h, t, 5, (t / 16) % 2 ? -0.0f : 0.0f);  // pages of -0 only and of +0 only
    }
  }
  p.BuildMeta(meta_type);
  const std::vector<uint8_t> bulk = p.meta.bytes;
  const size_t meta_elems = p.meta.values.size();
  // Token by token.
  std::vector<uint8_t> step(meta_elems * DTypeSize(meta_type), 0xAB);
  const MutableMatrixView mview = DenseMatrix<void*>(step.data(), meta_type, p.pages(), 128);
  for (int64_t t = 0; t < n; ++t) {
    PageMetaShape shape{3, 64, t + 1};
    // Metadata of the first t tokens is laid out the same for any length (dense per page), so
    // the view of the full buffer serves every prefix: pages beyond the prefix are not touched.
    MutableMatrixView v = mview;
    ASSERT_TRUE(AppendPageMetaCpu(p.KeyView(), shape, t, v).ok());
  }
  EXPECT_EQ(step, bulk);
  // Random chunks.
  std::vector<uint8_t> chunked(meta_elems * DTypeSize(meta_type), 0xCD);
  const MutableMatrixView cview = DenseMatrix<void*>(chunked.data(), meta_type, p.pages(), 128);
  std::mt19937 rng(5);
  for (int64_t t = 0; t < n;) {
    const int64_t len = std::min<int64_t>(n - t, 1 + rng() % 37);
    PageMetaShape shape{3, 64, t + len};
    ASSERT_TRUE(AppendPageMetaCpu(p.KeyView(), shape, t, cview).ok());
    t += len;
  }
  EXPECT_EQ(chunked, bulk);
}

INSTANTIATE_TEST_SUITE_P(Types, PageMetaTypesTest,
                         ::testing::Values(std::make_tuple(DType::kF32, DType::kBF16),
                                           std::make_tuple(DType::kF32, DType::kF16),
                                           std::make_tuple(DType::kF32, DType::kF32),
                                           std::make_tuple(DType::kBF16, DType::kBF16),
                                           std::make_tuple(DType::kF16, DType::kF16),
                                           std::make_tuple(DType::kF16, DType::kBF16),
                                           std::make_tuple(DType::kBF16, DType::kF16)),
                         [](const ::testing::TestParamInfo<std::tuple<DType, DType>>& info) {
                           return absl::StrCat("keys_", DTypeName(std::get<0>(info.param)),
                                               "_meta_", DTypeName(std::get<1>(info.param)));
                         });

// Infinite keys make infinite metadata: a query column of 0 ignores it (no 0 * inf), one of the
// right sign makes the bound +inf; finite pages keep their finite bound.
TEST(PageMetaTest, BoundWithInfiniteMetadata) {
  Problem p(1, 3, 64, 48, DType::kBF16, DType::kF32, 302);
  p.SetKey(0, 3, 5, kInf);    // page 0: M[5] = +inf
  p.SetKey(0, 20, 7, -kInf);  // page 1: m[7] = -inf
  p.queries.Set(0 * 64 + 5, 0.0f);
  p.queries.Set(0 * 64 + 7, 0.0f);   // head 0 ignores both
  p.queries.Set(1 * 64 + 5, 0.5f);   // head 1: page 0 is +inf
  p.queries.Set(1 * 64 + 7, 0.25f);  // ... page 1 finite (q > 0 reads M[7])
  p.queries.Set(2 * 64 + 5, -0.5f);  // head 2: page 0 finite (q < 0 reads m[5])
  p.queries.Set(2 * 64 + 7, -2.0f);  // ... page 1 is +inf (-2 * -inf)
  p.BuildMeta(DType::kBF16);
  std::vector<float> bounds(3 * p.pages(), -1.0f);
  ASSERT_TRUE(
      PageBoundCpu(p.Request(Mode::kBound, GqaReduction::kPerQueryHead, 1), bounds.data()).ok());
  // The bound as the branches define it: a term q M for q > 0, q m for q < 0, none for q = 0.
  auto bound = [&](int h, int64_t page) {
    double acc = 0.0;
    for (int c = 0; c < 64; ++c) {
      const double q = p.Query(h, c);
      if (q > 0) acc += q * p.MetaHi(0, page, c);
      if (q < 0) acc += q * p.MetaLo(0, page, c);
    }
    return acc;
  };
  const double want[3][3] = {{bound(0, 0), bound(0, 1), bound(0, 2)},
                             {kInf, bound(1, 1), bound(1, 2)},
                             {bound(2, 0), kInf, bound(2, 2)}};
  for (int h = 0; h < 3; ++h) {
    for (int64_t page = 0; page < 3; ++page) {
      const float got = bounds[h * p.pages() + page];
      if (std::isinf(want[h][page])) {
        EXPECT_EQ(got, kInf) << "head " << h << " page " << page;
      } else {
        ASSERT_TRUE(std::isfinite(want[h][page]));
        EXPECT_NEAR(got, want[h][page], 1e-6 * std::fabs(want[h][page]))
            << "head " << h << " page " << page;
      }
    }
  }
  EXPECT_EQ(p.MetaHi(0, 0, 5), kInf);
  EXPECT_EQ(p.MetaLo(0, 1, 7), -kInf);
}

TEST(PageMetaTest, DenseViewOfMetadataMustUseTheFullPageCount) {
  // The dense views above have head_stride = pages(n) * 2d for the final n; check that a
  // prefix build with that stride equals the bulk build's pages of the prefix.
  Problem p(2, 2, 64, 100, DType::kBF16, DType::kF32, 301);
  p.BuildMeta(DType::kBF16);
  std::vector<uint16_t> pre(p.meta.values.size(), 0x1234);
  MutableMatrixView v = DenseMatrix<void*>(pre.data(), DType::kBF16, p.pages(), 128);
  ASSERT_TRUE(BuildPageMetaCpu(p.KeyView(), PageMetaShape{2, 64, 40}, v).ok());
  const uint16_t* bulk = static_cast<const uint16_t*>(p.meta.data());
  for (int h = 0; h < 2; ++h) {
    for (int64_t q = 0; q < 2; ++q) {  // pages 0 and 1 are complete in both
      for (int c = 0; c < 128; ++c) {
        const size_t i = (static_cast<size_t>(h) * p.pages() + q) * 128 + c;
        EXPECT_EQ(pre[i], bulk[i]);
      }
    }
    // Page 3 (tokens 48..) is not written by a 40-token build.
    EXPECT_EQ(pre[(static_cast<size_t>(h) * p.pages() + 3) * 128], 0x1234);
  }
}

TEST(PageMetaTest, PartialLastPageHoldsItsOwnTokens) {
  Problem p(1, 1, 64, 17, DType::kF32, DType::kF32, 302);
  p.BuildMeta(DType::kBF16);
  ASSERT_EQ(p.pages(), 2);
  for (int c = 0; c < 64; ++c) {
    EXPECT_EQ(p.MetaHi(0, 1, c), internal::RoundOutward(DType::kBF16, p.Key(0, 16, c), true));
    EXPECT_EQ(p.MetaLo(0, 1, c), internal::RoundOutward(DType::kBF16, p.Key(0, 16, c), false));
  }
}

TEST(PageMetaTest, BadArgumentsAndNanAreInvalidArgument) {
  Problem p(1, 1, 64, 40, DType::kF32, DType::kF32, 303);
  std::vector<uint16_t> meta(3 * 128, 0x4242);
  MutableMatrixView v = DenseMatrix<void*>(meta.data(), DType::kBF16, 3, 128);
  EXPECT_EQ(AppendPageMetaCpu(p.KeyView(), PageMetaShape{1, 64, 40}, 40, v).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BuildPageMetaCpu(p.KeyView(), PageMetaShape{1, 80, 40}, v).code(),
            absl::StatusCode::kInvalidArgument);
  MutableMatrixView no_base = v;
  no_base.base = nullptr;
  EXPECT_EQ(BuildPageMetaCpu(p.KeyView(), PageMetaShape{1, 64, 40}, no_base).code(),
            absl::StatusCode::kInvalidArgument);
  p.SetKey(0, 33, 5, std::numeric_limits<float>::quiet_NaN());
  absl::Status s = AppendPageMetaCpu(p.KeyView(), PageMetaShape{1, 64, 40}, 30, v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("token 33"));
  for (uint16_t x : meta) ASSERT_EQ(x, 0x4242) << "nothing written";
  s = BuildPageMetaCpu(p.KeyView(), PageMetaShape{1, 64, 40}, v);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace topk
}  // namespace ropekv
