// Tests of the CPU path of kernels/topk: exact / bound / bound-then-exact selection against an
// independent fp64 reference (std::partial_sort), ties, -inf, NaN, GQA reductions, sink and local
// merging, captured softmax mass, bare top-k, gather and argument checks.
#include "kernels/topk/topk.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/topk/topk_internal.h"
#include "tests/unit/kernels/topk/topk_test_util.h"

namespace ropekv {
namespace topk {
namespace {

using ::testing::HasSubstr;
using testing_util::ExpectTopKUpToTies;
using testing_util::Problem;
using testing_util::RefTopK;
using testing_util::Row;
using testing_util::ScoreTol;

constexpr int32_t kPoisonIndex = -7;
constexpr float kPoisonScore = 12345.0f;

struct Output {
  int64_t rows = 0;
  int64_t cap = 0;
  std::vector<int32_t> indices;
  std::vector<int32_t> counts;
  std::vector<float> scores;
  std::vector<float> mass;
};

// Runs SelectCpu with poisoned outputs.
absl::Status RunCpu(const SelectRequest& req, bool want_scores, bool want_mass, Output* out) {
  out->rows = SelectRows(req);
  out->cap = SelectCapacity(req);
  out->indices.assign(out->rows * out->cap, kPoisonIndex);
  out->counts.assign(out->rows, kPoisonIndex);
  out->scores.assign(out->rows * out->cap, kPoisonScore);
  out->mass.assign(out->rows, kPoisonScore);
  SelectResult res;
  res.indices = out->indices.data();
  res.counts = out->counts.data();
  res.scores = want_scores ? out->scores.data() : nullptr;
  res.mass = want_mass ? out->mass.data() : nullptr;
  return SelectCpu(req, res);
}

bool Pinned(int64_t t, int64_t n, int64_t ns, int64_t nl) { return t < ns || t >= n - nl; }

std::string ReductionName(GqaReduction r) {
  switch (r) {
    case GqaReduction::kMax:
      return "max";
    case GqaReduction::kSum:
      return "sum";
    case GqaReduction::kPerQueryHead:
      return "pqh";
  }
  return "?";
}

// Common checks of one output row: ascending, unique, every pinned token present, -1 padding.
// Returns the non-pinned tokens.
std::vector<int64_t> CheckRowShape(const Output& o, int64_t r, int64_t n, int64_t ns, int64_t nl,
                                   const std::string& what) {
  std::vector<int64_t> free;
  EXPECT_GE(o.counts[r], 0) << what;
  EXPECT_LE(o.counts[r], o.cap) << what;
  const std::vector<int64_t> v = Row(o.indices, o.counts, o.cap, r);
  for (size_t j = 1; j < v.size(); ++j) EXPECT_LT(v[j - 1], v[j]) << what << " slot " << j;
  const std::set<int64_t> s(v.begin(), v.end());
  for (int64_t t = 0; t < n; ++t) {
    if (Pinned(t, n, ns, nl)) {
      EXPECT_TRUE(s.count(t)) << what << ": pinned token " << t;
    }
  }
  for (int64_t t : v) {
    EXPECT_TRUE(t >= 0 && t < n) << what;
    if (!Pinned(t, n, ns, nl)) free.push_back(t);
  }
  for (int64_t j = o.counts[r]; j < o.cap; ++j) EXPECT_EQ(o.indices[r * o.cap + j], -1) << what;
  return free;
}

// ------------------------------------------------------------------------------------------
// Exact mode over a grid of lengths and k.

struct ExactCase {
  int64_t n;
  int64_t k;
};

class ExactGridTest : public ::testing::TestWithParam<ExactCase> {};

TEST_P(ExactGridTest, MatchesPartialSortReference) {
  const ExactCase c = GetParam();
  Problem p(/*hkv=*/2, /*hq=*/4, /*d=*/64, c.n, DType::kBF16, DType::kF32, 1000 + c.n * 7 + c.k);
  for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kPerQueryHead}) {
    const SelectRequest req = p.Request(Mode::kExact, red, c.k);
    Output o;
    ASSERT_TRUE(RunCpu(req, /*want_scores=*/true, false, &o).ok());
    EXPECT_EQ(o.cap, std::min(c.n, c.k));
    for (int64_t r = 0; r < o.rows; ++r) {
      const std::string what =
          absl::StrCat("n=", c.n, " k=", c.k, " red=", static_cast<int>(red), " row=", r);
      std::vector<double> score(c.n);
      for (int64_t t = 0; t < c.n; ++t) score[t] = p.RowScore(red, r, t);
      ASSERT_EQ(o.counts[r], std::min(c.n, c.k)) << what;
      const std::vector<int64_t> got = CheckRowShape(o, r, c.n, 0, 0, what);
      ExpectTopKUpToTies(got, score, {}, c.k, ScoreTol(score, 1e-6), what);
      for (int64_t j = 0; j < o.counts[r]; ++j) {
        const int64_t t = o.indices[r * o.cap + j];
        EXPECT_NEAR(o.scores[r * o.cap + j], score[t], 1e-6 * std::max(1.0, std::fabs(score[t])))
            << what;
      }
    }
  }
}

std::vector<ExactCase> ExactCases() {
  std::vector<ExactCase> v;
  for (int64_t k : {1, 64, 4096}) {
    for (int64_t n : {int64_t{1}, k - 1, k, k + 1, int64_t{4096}, int64_t{4099}, int64_t{1000},
                      int64_t{131072}}) {
      if (n >= 1) v.push_back({n, k});
    }
  }
  for (int64_t n : {int64_t{1}, int64_t{37}, int64_t{4096}}) {
    v.push_back({n, n});
    v.push_back({n, n + 100});
  }
  std::vector<ExactCase> unique;
  for (const ExactCase& c : v) {
    bool seen = false;
    for (const ExactCase& u : unique) seen |= u.n == c.n && u.k == c.k;
    if (!seen) unique.push_back(c);
  }
  return unique;
}

INSTANTIATE_TEST_SUITE_P(Lengths, ExactGridTest, ::testing::ValuesIn(ExactCases()),
                         [](const ::testing::TestParamInfo<ExactCase>& info) {
                           return absl::StrCat("n", info.param.n, "_k", info.param.k);
                         });

// dtype x head_dim x reduction, with sink and local tokens.
class ExactTypesTest : public ::testing::TestWithParam<std::tuple<DType, int, GqaReduction>> {};

TEST_P(ExactTypesTest, MatchesReferenceWithSinkAndLocal) {
  const auto [dtype, d, red] = GetParam();
  const int64_t n = 1500, k = 100, ns = 4, nl = 32;
  Problem p(2, 8, d, n, dtype, DType::kBF16, 77 + d);
  SelectRequest req = p.Request(Mode::kExact, red, k);
  req.n_sink = ns;
  req.n_local = nl;
  Output o;
  ASSERT_TRUE(RunCpu(req, true, false, &o).ok());
  EXPECT_EQ(o.cap, ns + nl + k);
  for (int64_t r = 0; r < o.rows; ++r) {
    std::vector<double> score(n);
    std::vector<bool> eligible(n);
    for (int64_t t = 0; t < n; ++t) {
      score[t] = p.RowScore(red, r, t);
      eligible[t] = !Pinned(t, n, ns, nl);
    }
    EXPECT_EQ(o.counts[r], ns + nl + k);
    const std::vector<int64_t> got = CheckRowShape(o, r, n, ns, nl, "types");
    ExpectTopKUpToTies(got, score, eligible, k, ScoreTol(score, 1e-6), "types");
    for (int64_t j = 0; j < o.counts[r]; ++j) {
      const int64_t t = o.indices[r * o.cap + j];
      EXPECT_NEAR(o.scores[r * o.cap + j], score[t], 1e-6 * std::max(1.0, std::fabs(score[t])));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, ExactTypesTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(64, 128, 256),
                       ::testing::Values(GqaReduction::kMax, GqaReduction::kSum,
                                         GqaReduction::kPerQueryHead)),
    [](const ::testing::TestParamInfo<std::tuple<DType, int, GqaReduction>>& info) {
      return absl::StrCat(DTypeName(std::get<0>(info.param)), "_d", std::get<1>(info.param), "_",
                          ReductionName(std::get<2>(info.param)));
    });

// ------------------------------------------------------------------------------------------
// Adversarial values.

TEST(SelectCpuTest, AllEqualScoresPickLowestIndices) {
  Problem p(1, 2, 64, 300, DType::kBF16, DType::kF32, 5);
  for (int64_t t = 0; t < p.n; ++t) {
    for (int c = 0; c < 64; ++c) p.SetKey(0, t, c, 0.5f);
  }
  for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
    Output o;
    ASSERT_TRUE(RunCpu(p.Request(Mode::kExact, red, 40), false, false, &o).ok());
    for (int64_t r = 0; r < o.rows; ++r) {
      ASSERT_EQ(o.counts[r], 40);
      for (int j = 0; j < 40; ++j) EXPECT_EQ(o.indices[r * o.cap + j], j);
    }
  }
}

TEST(SelectCpuTest, Bf16TiesAtTheBoundaryBreakByLowerIndex) {
  // q = e_0, so the score is the bf16 key's column 0: values from {1, 1.5, 2}, many ties.
  const int64_t n = 997;
  Problem p(1, 1, 64, n, DType::kBF16, DType::kF32, 6);
  for (int c = 0; c < 64; ++c) p.queries.Set(c, c == 0 ? 1.0f : 0.0f);
  std::mt19937 rng(3);
  for (int64_t t = 0; t < n; ++t) p.SetKey(0, t, 0, 1.0f + 0.5f * static_cast<float>(rng() % 3));
  std::vector<double> score(n);
  for (int64_t t = 0; t < n; ++t) score[t] = p.HeadScore(0, t);
  for (int64_t k : {1, 10, 333, 500, 996}) {
    Output o;
    ASSERT_TRUE(RunCpu(p.Request(Mode::kExact, GqaReduction::kMax, k), false, false, &o).ok());
    std::vector<int64_t> ref = RefTopK(score, {}, k);
    std::sort(ref.begin(), ref.end());
    EXPECT_EQ(Row(o.indices, o.counts, o.cap, 0), ref) << "k=" << k;
  }
}

TEST(SelectCpuTest, NegativeInfinityScoresAreSelectableLast) {
  const int64_t n = 200;
  Problem p(1, 1, 64, n, DType::kF32, DType::kF32, 7);
  for (int c = 0; c < 64; ++c) p.queries.Set(c, c == 0 ? 2.0f : 0.0f);
  // Tokens >= 150 score -inf.
  for (int64_t t = 150; t < n; ++t) p.SetKey(0, t, 0, -std::numeric_limits<float>::infinity());
  Output o;
  ASSERT_TRUE(RunCpu(p.Request(Mode::kExact, GqaReduction::kMax, 160), true, false, &o).ok());
  const std::vector<int64_t> v = Row(o.indices, o.counts, o.cap, 0);
  ASSERT_EQ(v.size(), 160u);
  for (int64_t t = 0; t < 150; ++t) EXPECT_EQ(v[t], t);
  for (int64_t j = 150; j < 160; ++j) {
    EXPECT_EQ(v[j], j);  // the lowest -inf indices
    EXPECT_EQ(o.scores[j], -std::numeric_limits<float>::infinity());
  }
}

TEST(SelectCpuTest, NanIsInvalidArgument) {
  Problem p(1, 2, 64, 50, DType::kF32, DType::kF32, 8);
  Output o;
  {
    Problem q = p;
    q.SetKey(0, 17, 3, std::numeric_limits<float>::quiet_NaN());
    const absl::Status s = RunCpu(q.Request(Mode::kExact, GqaReduction::kMax, 5), false, false, &o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("token 17"));
    EXPECT_EQ(o.indices[0], kPoisonIndex) << "nothing written on error";
  }
  {
    Problem q = p;
    q.queries.Set(70, std::numeric_limits<float>::quiet_NaN());
    const absl::Status s = RunCpu(q.Request(Mode::kExact, GqaReduction::kMax, 5), false, false, &o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("query head 1"));
  }
  {
    // A NaN in a sink token's key is reported too.
    Problem q = p;
    q.SetKey(0, 0, 9, std::numeric_limits<float>::quiet_NaN());
    SelectRequest req = q.Request(Mode::kExact, GqaReduction::kMax, 5);
    req.n_sink = 2;
    const absl::Status s = RunCpu(req, false, false, &o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("token 0"));
  }
  {
    // inf - inf in a dot product.
    Problem q = p;
    q.SetKey(0, 4, 0, std::numeric_limits<float>::infinity());
    q.SetKey(0, 4, 1, std::numeric_limits<float>::infinity());
    q.queries.Set(0, 1.0f);
    q.queries.Set(1, -1.0f);
    const absl::Status s = RunCpu(q.Request(Mode::kExact, GqaReduction::kMax, 5), false, false, &o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("NaN"));
  }
  {
    // NaN in page metadata (BOUND mode reads only the metadata).
    Problem q = p;
    q.BuildMeta(DType::kF32);
    q.meta.Set(5, std::numeric_limits<float>::quiet_NaN());
    const absl::Status s = RunCpu(q.Request(Mode::kBound, GqaReduction::kMax, 5), false, false, &o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr("page metadata"));
  }
}

// ------------------------------------------------------------------------------------------
// Bound and bound-then-exact against the fp64 reference.

class PageModesTest : public ::testing::TestWithParam<GqaReduction> {};

TEST_P(PageModesTest, BoundPicksTopPagesOfTheReference) {
  const GqaReduction red = GetParam();
  const int64_t n = 2000 + 5, k = 100, ns = 16, nl = 40;  // partial last page
  Problem p(2, 4, 128, n, DType::kBF16, DType::kBF16, 11);
  p.BuildMeta(DType::kBF16);
  SelectRequest req = p.Request(Mode::kBound, red, k);
  req.n_sink = ns;
  req.n_local = nl;
  Output o;
  ASSERT_TRUE(RunCpu(req, false, false, &o).ok());
  const int64_t pages = p.pages();
  const int64_t kp = NumPages(k);
  EXPECT_EQ(o.cap, ns + nl + kp * 16);
  for (int64_t r = 0; r < o.rows; ++r) {
    std::vector<double> bound(pages);
    std::vector<bool> eligible(pages);
    for (int64_t q = 0; q < pages; ++q) {
      bound[q] = p.RowBound(red, r, q);
      // A page is a candidate unless all of its tokens are pinned.
      bool any_free = false;
      for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) any_free |= !Pinned(t, n, ns, nl);
      eligible[q] = any_free;
    }
    const std::vector<int64_t> v = Row(o.indices, o.counts, o.cap, r);
    CheckRowShape(o, r, n, ns, nl, "bound");
    // Pages whose tokens appear (besides pinned ones) must be whole pages (clipped to n).
    std::set<int64_t> tok(v.begin(), v.end());
    std::vector<int64_t> chosen_pages;
    for (int64_t q = 0; q < pages; ++q) {
      if (!eligible[q]) continue;
      int64_t present = 0, total = 0;
      bool has_free_present = false;
      for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) {
        ++total;
        if (tok.count(t)) {
          ++present;
          has_free_present |= !Pinned(t, n, ns, nl);
        }
      }
      if (has_free_present) {
        EXPECT_EQ(present, total) << "page " << q << " partly selected";
        chosen_pages.push_back(q);
      }
    }
    // Every free token of a chosen page appears, so chosen_pages is the chosen set exactly.
    ExpectTopKUpToTies(chosen_pages, bound, eligible, kp, ScoreTol(bound, 1e-6), "bound pages");
  }
}

TEST_P(PageModesTest, BoundThenExactMatchesTwoStageReference) {
  const GqaReduction red = GetParam();
  const int64_t n = 3000 + 3, k = 64, ns = 4, nl = 16;
  Problem p(2, 4, 64, n, DType::kF32, DType::kF32, 12);
  p.BuildMeta(DType::kBF16);
  SelectRequest req = p.Request(Mode::kBoundThenExact, red, k);
  req.n_sink = ns;
  req.n_local = nl;
  req.candidate_tokens = 300;  // 19 pages
  Output o;
  ASSERT_TRUE(RunCpu(req, true, false, &o).ok());
  const int64_t pages = p.pages();
  for (int64_t r = 0; r < o.rows; ++r) {
    std::vector<double> bound(pages);
    std::vector<bool> page_ok(pages);
    for (int64_t q = 0; q < pages; ++q) {
      bound[q] = p.RowBound(red, r, q);
      bool any_free = false;
      for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) any_free |= !Pinned(t, n, ns, nl);
      page_ok[q] = any_free;
    }
    const std::vector<int64_t> cand_pages = RefTopK(bound, page_ok, NumPages(300));
    std::vector<double> score(n, 0.0);
    std::vector<bool> eligible(n, false);
    for (int64_t q : cand_pages) {
      for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) {
        eligible[t] = !Pinned(t, n, ns, nl);
        score[t] = p.RowScore(red, r, t);
      }
    }
    const std::vector<int64_t> got = CheckRowShape(o, r, n, ns, nl, "bte");
    // The bound ranking is fp32 in the CPU path; no bound ties in random data.
    ExpectTopKUpToTies(got, score, eligible, k, ScoreTol(score, 1e-6), "bte");
  }
}

TEST_P(PageModesTest, BoundThenExactWithAllPagesEqualsExact) {
  const GqaReduction red = GetParam();
  const int64_t n = 777, k = 50;
  Problem p(1, 2, 64, n, DType::kBF16, DType::kF32, 13);
  p.BuildMeta(DType::kBF16);
  SelectRequest bte = p.Request(Mode::kBoundThenExact, red, k);
  bte.candidate_tokens = 100000;
  Output a, b;
  ASSERT_TRUE(RunCpu(bte, true, false, &a).ok());
  ASSERT_TRUE(RunCpu(p.Request(Mode::kExact, red, k), true, false, &b).ok());
  EXPECT_EQ(a.indices, b.indices);
  EXPECT_EQ(a.scores, b.scores);
}

INSTANTIATE_TEST_SUITE_P(Reductions, PageModesTest,
                         ::testing::Values(GqaReduction::kMax, GqaReduction::kSum,
                                           GqaReduction::kPerQueryHead),
                         [](const ::testing::TestParamInfo<GqaReduction>& info) {
                           return ReductionName(info.param);
                         });

// A planted needle key (aligned with the query, far above the rest) is always selected, and its
// page in page modes.
TEST(SelectCpuTest, PlantedNeedleIsAlwaysSelected) {
  for (uint64_t seed = 0; seed < 6; ++seed) {
    const int64_t n = 5000 + static_cast<int64_t>(seed) * 37;
    Problem p(2, 8, 128, n, DType::kBF16, DType::kBF16, 100 + seed);
    std::mt19937_64 rng(seed);
    const int64_t needle = 40 + static_cast<int64_t>(rng() % static_cast<uint64_t>(n - 100));
    const int kvh = static_cast<int>(seed % 2);
    const int qh = kvh * 4 + static_cast<int>(seed % 4);
    for (int c = 0; c < 128; ++c) p.SetKey(kvh, needle, c, 4.0f * p.Query(qh, c));
    p.BuildMeta(DType::kBF16);
    for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
      for (GqaReduction red :
           {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
        SelectRequest req = p.Request(mode, red, 32);
        req.n_sink = 4;
        req.n_local = 16;
        Output o;
        ASSERT_TRUE(RunCpu(req, false, false, &o).ok());
        const int64_t row = red == GqaReduction::kPerQueryHead ? qh : kvh;
        const std::vector<int64_t> v = Row(o.indices, o.counts, o.cap, row);
        if (mode == Mode::kBound) {
          for (int64_t t = needle / 16 * 16; t < std::min(n, needle / 16 * 16 + 16); ++t) {
            EXPECT_TRUE(std::binary_search(v.begin(), v.end(), t))
                << "seed " << seed << " page token " << t;
          }
        } else {
          EXPECT_TRUE(std::binary_search(v.begin(), v.end(), needle))
              << "seed " << seed << " mode " << static_cast<int>(mode) << " red "
              << static_cast<int>(red);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// GQA reductions equal the top-k of the reduced fp64 scores, computed here by hand.

TEST(SelectCpuTest, GqaReductionsEqualTopKOfReducedScores) {
  const int64_t n = 1024, k = 37;
  Problem p(2, 6, 64, n, DType::kF32, DType::kF32, 21);
  for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum}) {
    Output o;
    ASSERT_TRUE(RunCpu(p.Request(Mode::kExact, red, k), false, false, &o).ok());
    for (int kvh = 0; kvh < 2; ++kvh) {
      std::vector<double> reduced(n);
      for (int64_t t = 0; t < n; ++t) {
        double acc = red == GqaReduction::kMax ? -1e300 : 0.0;
        for (int g = 0; g < 3; ++g) {
          double s = 0;
          for (int c = 0; c < 64; ++c) {
            s += double{p.Query(kvh * 3 + g, c)} * double{p.Key(kvh, t, c)};
          }
          acc = red == GqaReduction::kMax ? std::max(acc, s) : acc + s;
        }
        reduced[t] = acc;
      }
      std::vector<int64_t> ref = RefTopK(reduced, {}, k);
      std::sort(ref.begin(), ref.end());
      EXPECT_EQ(Row(o.indices, o.counts, o.cap, kvh), ref);
    }
  }
  // Per query head: every query head's own top-k.
  Output o;
  ASSERT_TRUE(
      RunCpu(p.Request(Mode::kExact, GqaReduction::kPerQueryHead, k), false, false, &o).ok());
  ASSERT_EQ(o.rows, 6);
  for (int h = 0; h < 6; ++h) {
    std::vector<double> s(n);
    for (int64_t t = 0; t < n; ++t) s[t] = p.HeadScore(h, t);
    std::vector<int64_t> ref = RefTopK(s, {}, k);
    std::sort(ref.begin(), ref.end());
    EXPECT_EQ(Row(o.indices, o.counts, o.cap, h), ref) << "head " << h;
  }
}

// ------------------------------------------------------------------------------------------
// Sink and local merging.

TEST(SelectCpuTest, SinkAndLocalAreMergedSortedAndDeduplicated) {
  // Overlapping sink and local windows cover everything.
  {
    Problem p(1, 1, 64, 10, DType::kBF16, DType::kF32, 30);
    SelectRequest req = p.Request(Mode::kExact, GqaReduction::kMax, 3);
    req.n_sink = 6;
    req.n_local = 6;
    Output o;
    ASSERT_TRUE(RunCpu(req, false, false, &o).ok());
    EXPECT_EQ(o.cap, 10);
    EXPECT_EQ(Row(o.indices, o.counts, o.cap, 0),
              (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  }
  // Top tokens planted inside the sink and local windows are not counted twice: k more tokens
  // come from the middle.
  {
    const int64_t n = 400;
    Problem p(1, 1, 64, n, DType::kF32, DType::kF32, 31);
    for (int64_t t : {1, 2, 395, 399}) {
      for (int c = 0; c < 64; ++c) p.SetKey(0, t, c, 10.0f * p.Query(0, c));
    }
    SelectRequest req = p.Request(Mode::kExact, GqaReduction::kMax, 20);
    req.n_sink = 4;
    req.n_local = 8;
    Output o;
    ASSERT_TRUE(RunCpu(req, false, false, &o).ok());
    ASSERT_EQ(o.counts[0], 32);
    std::vector<double> score(n);
    std::vector<bool> eligible(n);
    for (int64_t t = 0; t < n; ++t) {
      score[t] = p.HeadScore(0, t);
      eligible[t] = !Pinned(t, n, 4, 8);
    }
    const std::vector<int64_t> got = CheckRowShape(o, 0, n, 4, 8, "merge");
    ExpectTopKUpToTies(got, score, eligible, 20, 1e-9, "merge");
  }
  // Page mode: a chosen page overlapping the local window is not duplicated.
  {
    const int64_t n = 100;
    Problem p(1, 1, 64, n, DType::kF32, DType::kF32, 32);
    for (int c = 0; c < 64; ++c) p.SetKey(0, 90, c, 10.0f * p.Query(0, c));  // page 5 = 80..95
    p.BuildMeta(DType::kF32);
    SelectRequest req = p.Request(Mode::kBound, GqaReduction::kMax, 16);
    req.n_local = 12;  // 88..99
    Output o;
    ASSERT_TRUE(RunCpu(req, false, false, &o).ok());
    std::vector<int64_t> want;
    for (int64_t t = 80; t < 100; ++t) want.push_back(t);
    EXPECT_EQ(Row(o.indices, o.counts, o.cap, 0), want);
  }
}

// ------------------------------------------------------------------------------------------
// Captured softmax mass against fp64.

TEST(SelectCpuTest, CapturedMassMatchesFp64) {
  const int64_t n = 3000;
  Problem p(2, 4, 64, n, DType::kBF16, DType::kF32, 40);
  p.BuildMeta(DType::kBF16);
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kPerQueryHead}) {
      SelectRequest req = p.Request(mode, red, 200);
      req.n_sink = 4;
      req.n_local = 64;
      req.softmax_scale = 0.7f;  // sharper than 1/8 so the mass is far from uniform
      Output o;
      ASSERT_TRUE(RunCpu(req, false, true, &o).ok());
      for (int64_t r = 0; r < o.rows; ++r) {
        const std::vector<int64_t> v = Row(o.indices, o.counts, o.cap, r);
        std::vector<int> heads;
        if (red == GqaReduction::kPerQueryHead) {
          heads.push_back(static_cast<int>(r));
        } else {
          for (int g = 0; g < 2; ++g) heads.push_back(static_cast<int>(r) * 2 + g);
        }
        double mass = 0.0;
        for (int h : heads) {
          std::vector<double> s(n);
          double mx = -1e300;
          for (int64_t t = 0; t < n; ++t) {
            s[t] = double{0.7f} * p.HeadScore(h, t);
            mx = std::max(mx, s[t]);
          }
          double all = 0, sel = 0;
          for (int64_t t = 0; t < n; ++t) all += std::exp(s[t] - mx);
          for (int64_t t : v) sel += std::exp(s[t] - mx);
          mass += sel / all / static_cast<double>(heads.size());
        }
        EXPECT_NEAR(o.mass[r], mass, 1e-6) << "mode " << static_cast<int>(mode);
        EXPECT_GT(mass, 0.0);
        EXPECT_LT(mass, 1.0);
      }
    }
  }
  // Everything selected: mass 1.
  SelectRequest req = p.Request(Mode::kExact, GqaReduction::kMax, n);
  Output o;
  ASSERT_TRUE(RunCpu(req, false, true, &o).ok());
  EXPECT_NEAR(o.mass[0], 1.0, 1e-7);
  EXPECT_NEAR(o.mass[1], 1.0, 1e-7);
}

// ------------------------------------------------------------------------------------------
// Key sources given as block lists give the same selection as one buffer.

TEST(SelectCpuTest, BlockedKeysAndMetadataEqualContiguous) {
  const int64_t n = 1000, bt = 48;  // 3 pages per block; last block partial
  Problem p(3, 6, 64, n, DType::kBF16, DType::kF32, 50);
  p.BuildMeta(DType::kBF16);
  const int64_t blocks = (n + bt - 1) / bt;
  // Block b: [kv_heads][bt][d] keys and [kv_heads][bt/16][2d] metadata.
  std::vector<std::vector<uint16_t>> kb(blocks, std::vector<uint16_t>(3 * bt * 64, 0xffff));
  std::vector<std::vector<uint16_t>> mb(blocks, std::vector<uint16_t>(3 * (bt / 16) * 128, 0xffff));
  const uint16_t* keys = static_cast<const uint16_t*>(p.keys.data());
  const uint16_t* meta = static_cast<const uint16_t*>(p.meta.data());
  for (int h = 0; h < 3; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      for (int c = 0; c < 64; ++c)
        kb[t / bt][(h * bt + t % bt) * 64 + c] = keys[(h * n + t) * 64 + c];
    }
    for (int64_t q = 0; q < p.pages(); ++q) {
      const int64_t ppb = bt / 16;
      for (int c = 0; c < 128; ++c) {
        mb[q / ppb][(h * ppb + q % ppb) * 128 + c] = meta[(h * p.pages() + q) * 128 + c];
      }
    }
  }
  std::vector<const void*> kptr, mptr;
  for (int64_t b = 0; b < blocks; ++b) {
    kptr.push_back(kb[b].data());
    mptr.push_back(mb[b].data());
  }
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    SelectRequest dense = p.Request(mode, GqaReduction::kSum, 70);
    dense.n_sink = 2;
    dense.n_local = 5;
    SelectRequest blocked = dense;
    blocked.keys = BlockedMatrix<const void*>(kptr.data(), DType::kBF16, bt, 64);
    blocked.page_meta = BlockedMatrix<const void*>(mptr.data(), DType::kBF16, bt / 16, 128);
    Output a, b;
    ASSERT_TRUE(RunCpu(dense, true, true, &a).ok());
    ASSERT_TRUE(RunCpu(blocked, true, true, &b).ok());
    EXPECT_EQ(a.indices, b.indices);
    EXPECT_EQ(a.counts, b.counts);
    EXPECT_EQ(a.scores, b.scores);
    EXPECT_EQ(a.mass, b.mass);
  }
}

// ------------------------------------------------------------------------------------------
// Bare top-k.

TEST(TopKCpuTest, MatchesPartialSortAndRejectsNan) {
  const int64_t rows = 3, len = 5000;
  std::vector<float> s(rows * len);
  std::mt19937_64 rng(60);
  std::normal_distribution<float> dist;
  for (float& x : s) x = dist(rng);
  s[7] = -std::numeric_limits<float>::infinity();
  for (int64_t k : {1, 100, 4999, 5000, 9000}) {
    const int64_t keep = std::min(k, len);
    std::vector<int32_t> idx(rows * keep, kPoisonIndex);
    ASSERT_TRUE(TopKCpu(s.data(), rows, len, k, idx.data()).ok());
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> row(s.begin() + r * len, s.begin() + (r + 1) * len);
      std::vector<int64_t> ref = RefTopK(row, {}, k);
      std::sort(ref.begin(), ref.end());
      EXPECT_EQ(std::vector<int64_t>(idx.begin() + r * keep, idx.begin() + (r + 1) * keep), ref);
    }
  }
  s[100] = std::numeric_limits<float>::quiet_NaN();
  std::vector<int32_t> idx(rows * 10);
  EXPECT_EQ(TopKCpu(s.data(), rows, len, 10, idx.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TopKCpu(s.data(), rows, len, 0, idx.data()).code(), absl::StatusCode::kInvalidArgument);
}

// ------------------------------------------------------------------------------------------
// Gather.

TEST(GatherCpuTest, CopiesSelectedRowsAndZeroFillsTheRest) {
  const int64_t n = 300, cap = 12;
  Problem p(2, 4, 128, n, DType::kBF16, DType::kF32, 70);
  testing_util::TypedBuffer values(DType::kBF16, static_cast<size_t>(2) * n * 128);
  testing_util::FillNormal(&values, 71);
  // Per query head lists (rows = 4, group 2).
  std::vector<int32_t> idx(4 * cap, -1);
  std::vector<int32_t> counts = {12, 5, 0, 7};
  std::mt19937 rng(72);
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < counts[r]; ++j) idx[r * cap + j] = static_cast<int32_t>(rng() % n);
  }
  std::vector<uint16_t> dk(4 * cap * 128, 0x7fc1), dv(4 * cap * 128, 0x7fc1);
  GatherRequest g;
  g.kv_heads = 2;
  g.head_dim = 128;
  g.num_tokens = n;
  g.rows = 4;
  g.capacity = cap;
  g.keys = p.KeyView();
  g.values = DenseMatrix<const void*>(values.data(), DType::kBF16, n, 128);
  g.indices = idx.data();
  g.counts = counts.data();
  g.dst_keys = dk.data();
  g.dst_values = dv.data();
  ASSERT_TRUE(GatherCpu(g).ok());
  const uint16_t* ks = static_cast<const uint16_t*>(p.keys.data());
  const uint16_t* vs = static_cast<const uint16_t*>(values.data());
  for (int r = 0; r < 4; ++r) {
    for (int j = 0; j < cap; ++j) {
      for (int c = 0; c < 128; ++c) {
        const size_t o = (static_cast<size_t>(r) * cap + j) * 128 + c;
        if (j < counts[r]) {
          const size_t s = (static_cast<size_t>(r / 2) * n + idx[r * cap + j]) * 128 + c;
          ASSERT_EQ(dk[o], ks[s]);
          ASSERT_EQ(dv[o], vs[s]);
        } else {
          ASSERT_EQ(dk[o], 0);
          ASSERT_EQ(dv[o], 0);
        }
      }
    }
  }
  // An index out of range is rejected and nothing is written.
  std::fill(dk.begin(), dk.end(), 0x7fc1);
  idx[3 * cap + 2] = static_cast<int32_t>(n);
  const absl::Status s = GatherCpu(g);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("must be in [0, 300)"));
  EXPECT_EQ(dk[0], 0x7fc1);
}

// ------------------------------------------------------------------------------------------
// Argument checks.

TEST(SelectCpuTest, BadArgumentsAreInvalidArgument) {
  Problem p(2, 4, 64, 100, DType::kBF16, DType::kF32, 80);
  Output o;
  auto expect_bad = [&](SelectRequest req, const std::string& text) {
    const absl::Status s = RunCpu(req, false, false, &o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(s.message(), HasSubstr(text));
  };
  SelectRequest r = p.Request(Mode::kExact, GqaReduction::kMax, 5);
  SelectRequest bad = r;
  bad.head_dim = 96;
  expect_bad(bad, "head_dim must be 64, 128 or 256, got 96");
  bad = r;
  bad.query_heads = 5;
  expect_bad(bad, "multiple of kv_heads (2), got 5");
  bad = r;
  bad.k = 0;
  expect_bad(bad, "k must be >= 1, got 0");
  bad = r;
  bad.n_sink = -1;
  expect_bad(bad, "n_sink and n_local must be >= 0");
  bad = r;
  bad.num_tokens = 0;
  expect_bad(bad, "num_tokens must be in [1");
  bad = r;
  bad.queries = nullptr;
  expect_bad(bad, "queries must be set");
  bad = r;
  bad.keys.base = nullptr;
  expect_bad(bad, "keys: base or blocks must be set");
  bad = r;
  bad.keys.row_stride = 10;
  expect_bad(bad, "keys.row_stride must be >= the row width 64, got 10");
  bad = r;
  bad.mode = Mode::kBound;  // no metadata given
  expect_bad(bad, "page_meta: base or blocks must be set");
  bad = r;
  bad.mode = Mode::kBoundThenExact;
  bad.candidate_tokens = 3;
  expect_bad(bad, "candidate_tokens must be 0 (4 * k) or >= k = 5, got 3");
  SelectResult none;
  EXPECT_EQ(SelectCpu(r, none).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SelectWorkspaceBytes(bad, false).status().code(), absl::StatusCode::kInvalidArgument);
  absl::StatusOr<size_t> ws = SelectWorkspaceBytes(r, true);
  ASSERT_TRUE(ws.ok());
  EXPECT_GT(*ws, 0u);
}

// The plan of the GPU's chunk selection (ChunkSelectKernel), host code: both one-block
// selections fit their block, a thread's tokens lie in one chunk, and the shapes of the issue's
// benchmark get the pools measured fastest (bench/RESULTS.md, run 8) or none where the chunk
// path does not apply.
TEST(ChunkPlanTest, FitsOneBlockAndPicksTheFewestKeysAThread) {
  using internal::ChunkPlan;
  using internal::PlanChunkSelect;
  for (int64_t len : {int64_t{16385}, int64_t{50001}, int64_t{131072}, int64_t{600003},
                      int64_t{1} << 20, int64_t{1} << 22}) {
    for (int64_t k : {int64_t{1}, int64_t{64}, int64_t{256}, int64_t{1000}, int64_t{1024},
                      int64_t{1025}, int64_t{4096}}) {
      for (const auto& [rows, group] :
           {std::pair<int64_t, int64_t>{8, 4}, std::pair<int64_t, int64_t>{8, 64},
            std::pair<int64_t, int64_t>{512, 1}}) {
        const ChunkPlan c = PlanChunkSelect(len, k, rows, group);
        const std::string w = absl::StrCat("len ", len, " k ", k, " rows ", rows, " group ", group);
        const int64_t tiles = (len + 15) / 16;
        // Whether any pool fits both selections: brute force over the pools.
        bool any = false;
        for (int pool = 1; pool <= 32; pool *= 2) {
          any |= (tiles + pool - 1) / pool <= 16384 && k * 16 * pool <= 16384;
        }
        if (!any) {
          // Rounds (ChunkRoundsKernel): the smallest pool whose chunk keys fit one block, where k
          // is at most 4096 and a quarter of its chunks (8 rows of 4 heads), or half (16 rows or
          // more, or 16 heads a KV head or more).
          int want = 0;
          for (int pool = 1; pool <= 32 && k <= 4096; pool *= 2) {
            const int64_t chunks = (tiles + pool - 1) / pool;
            if (chunks > 16384) continue;
            if ((rows >= 16 || group >= 16 ? 2 : 4) * k <= chunks) want = pool;
            break;
          }
          EXPECT_EQ(c.pool, want) << w;
          if (want > 0) {
            EXPECT_TRUE(c.rounds) << w;
            EXPECT_EQ(c.per2, 0) << w;
            EXPECT_LE((tiles + want - 1) / want, int64_t{c.per1} * 1024) << w;
            EXPECT_LE(c.per1, 16) << w;
          }
          continue;
        }
        ASSERT_GT(c.pool, 0) << w;
        EXPECT_FALSE(c.rounds) << w;
        EXPECT_EQ(c.pool & (c.pool - 1), 0) << w;
        const int64_t chunks = (tiles + c.pool - 1) / c.pool;
        EXPECT_LE(chunks, int64_t{c.per1} * 1024) << w;
        EXPECT_LE(k * 16 * c.pool, int64_t{c.per2} * 1024) << w;
        EXPECT_LE(c.per1, 16) << w;
        EXPECT_LE(c.per2, 16) << w;
        EXPECT_GE(c.per2, 4) << w;
        EXPECT_EQ((16 * c.pool) % c.per2, 0) << w;
      }
    }
  }
  // 128K tokens: k 256 in tiles (8192 chunk keys, 4096 tokens), k 64 in chunks of 4 tiles;
  // k 1024 still fits, 4096 takes rounds with many rows. 1M tokens: chunks of 4 tiles at k 256,
  // rounds at 1024.
  EXPECT_EQ(PlanChunkSelect(131072, 256, 8, 4).pool, 1);
  EXPECT_EQ(PlanChunkSelect(131072, 256, 8, 4).per1, 8);
  EXPECT_EQ(PlanChunkSelect(131072, 256, 8, 4).per2, 4);
  EXPECT_EQ(PlanChunkSelect(131072, 64, 8, 4).pool, 4);
  EXPECT_EQ(PlanChunkSelect(131072, 1024, 8, 4).pool, 1);
  EXPECT_EQ(PlanChunkSelect(131072, 1024, 8, 4).per2, 16);
  EXPECT_EQ(PlanChunkSelect(131072, 4096, 8, 4).pool, 0);  // 8 rows of 4: the filter path
  EXPECT_TRUE(PlanChunkSelect(131072, 4096, 8, 64).rounds);
  EXPECT_EQ(PlanChunkSelect(131072, 4096, 512, 1).pool, 1);
  EXPECT_TRUE(PlanChunkSelect(131072, 4096, 512, 1).rounds);
  EXPECT_EQ(PlanChunkSelect(int64_t{1} << 20, 256, 8, 4).pool, 4);
  EXPECT_EQ(PlanChunkSelect(int64_t{1} << 20, 1024, 8, 4).pool, 4);
  EXPECT_TRUE(PlanChunkSelect(int64_t{1} << 20, 1024, 8, 4).rounds);
  EXPECT_EQ(PlanChunkSelect(32768, 4096, 8, 4).pool, 0);  // 4096 of 2048 chunks: the filter path
}

}  // namespace
}  // namespace topk
}  // namespace ropekv
