// Test helpers of kernels/topk: random problems and an independent fp64 reference (its own
// loops and std::partial_sort, sharing no code with topk_ref.cc). Also used by the GPU test.
#ifndef ROPEKV_TESTS_UNIT_KERNELS_TOPK_TOPK_TEST_UTIL_H_
#define ROPEKV_TESTS_UNIT_KERNELS_TOPK_TOPK_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/common/dtype.h"
#include "kernels/topk/topk.h"

namespace ropekv {
namespace topk {
namespace testing_util {

// A buffer of `count` elements of `dtype` and the float value of each element.
struct TypedBuffer {
  DType dtype = DType::kF32;
  std::vector<uint8_t> bytes;
  std::vector<float> values;

  TypedBuffer() = default;
  TypedBuffer(DType t, size_t count) : dtype(t), bytes(count * DTypeSize(t)), values(count) {}
  void Set(size_t i, float v) {
    StoreFromFloat(bytes.data(), i, dtype, v);
    values[i] = LoadAsFloat(bytes.data(), i, dtype);
  }
  const void* data() const { return bytes.data(); }
  void* data() { return bytes.data(); }
};

// Fills with N(0, sigma) values rounded to the buffer's type.
inline void FillNormal(TypedBuffer* b, uint64_t seed, float sigma = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  for (size_t i = 0; i < b->values.size(); ++i) b->Set(i, dist(rng));
}

// A selection problem with dense buffers: keys [kv_heads][n][d], queries [query_heads][d].
struct Problem {
  int kv_heads = 1;
  int query_heads = 1;
  int head_dim = 64;
  int64_t n = 1;
  TypedBuffer keys;
  TypedBuffer queries;
  TypedBuffer meta;  // [kv_heads][pages][2][d], filled by BuildMeta

  Problem(int hkv, int hq, int d, int64_t tokens, DType key_type, DType query_type, uint64_t seed)
      : kv_heads(hkv),
        query_heads(hq),
        head_dim(d),
        n(tokens),
        keys(key_type, static_cast<size_t>(hkv) * tokens * d),
        queries(query_type, static_cast<size_t>(hq) * d) {
    FillNormal(&keys, seed);
    FillNormal(&queries, seed ^ 0x9e3779b97f4a7c15ull);
  }

  float Key(int h, int64_t t, int c) const {
    return keys.values[(static_cast<size_t>(h) * n + t) * head_dim + c];
  }
  void SetKey(int h, int64_t t, int c, float v) {
    keys.Set((static_cast<size_t>(h) * n + t) * head_dim + c, v);
  }
  float Query(int h, int c) const { return queries.values[static_cast<size_t>(h) * head_dim + c]; }
  int group() const { return query_heads / kv_heads; }
  int64_t pages() const { return NumPages(n); }

  MatrixView KeyView() const {
    return DenseMatrix<const void*>(keys.data(), keys.dtype, n, head_dim);
  }

  // Builds page metadata of type t with BuildPageMetaCpu.
  void BuildMeta(DType t) {
    meta = TypedBuffer(t, static_cast<size_t>(kv_heads) * pages() * 2 * head_dim);
    PageMetaShape shape{kv_heads, head_dim, n};
    const absl::Status s = BuildPageMetaCpu(
        KeyView(), shape, DenseMatrix<void*>(meta.data(), t, pages(), 2 * head_dim));
    ASSERT_TRUE(s.ok()) << s;
    for (size_t i = 0; i < meta.values.size(); ++i) {
      meta.values[i] = LoadAsFloat(meta.bytes.data(), i, t);
    }
  }
  float MetaHi(int h, int64_t p, int c) const {
    return meta.values[(static_cast<size_t>(h) * pages() + p) * 2 * head_dim + c];
  }
  float MetaLo(int h, int64_t p, int c) const {
    return meta.values[(static_cast<size_t>(h) * pages() + p) * 2 * head_dim + head_dim + c];
  }

  SelectRequest Request(Mode mode, GqaReduction red, int64_t k) const {
    SelectRequest r;
    r.kv_heads = kv_heads;
    r.query_heads = query_heads;
    r.head_dim = head_dim;
    r.num_tokens = n;
    r.queries = queries.data();
    r.query_dtype = queries.dtype;
    r.keys = KeyView();
    if (!meta.bytes.empty()) {
      r.page_meta = DenseMatrix<const void*>(meta.data(), meta.dtype, pages(), 2 * head_dim);
    }
    r.mode = mode;
    r.reduction = red;
    r.k = k;
    return r;
  }

  // fp64 q.k of query head h and token t.
  double HeadScore(int h, int64_t t) const {
    const int kvh = h / group();
    double acc = 0.0;
    for (int c = 0; c < head_dim; ++c) {
      acc += static_cast<double>(Query(h, c)) * static_cast<double>(Key(kvh, t, c));
    }
    return acc;
  }

  int64_t Rows(GqaReduction red) const {
    return red == GqaReduction::kPerQueryHead ? query_heads : kv_heads;
  }

  // fp64 score of token t for output row r.
  double RowScore(GqaReduction red, int64_t r, int64_t t) const {
    if (red == GqaReduction::kPerQueryHead) return HeadScore(static_cast<int>(r), t);
    double acc = red == GqaReduction::kMax ? -std::numeric_limits<double>::infinity() : 0.0;
    for (int g = 0; g < group(); ++g) {
      const double s = HeadScore(static_cast<int>(r) * group() + g, t);
      acc = red == GqaReduction::kMax ? std::max(acc, s) : acc + s;
    }
    return acc;
  }

  // fp64 Quest bound of page p for query head h from the stored metadata.
  double HeadBound(int h, int64_t p) const {
    const int kvh = h / group();
    double acc = 0.0;
    for (int c = 0; c < head_dim; ++c) {
      const double q = Query(h, c);
      acc += std::max(q * MetaHi(kvh, p, c), q * MetaLo(kvh, p, c));
    }
    return acc;
  }
  double RowBound(GqaReduction red, int64_t r, int64_t p) const {
    if (red == GqaReduction::kPerQueryHead) return HeadBound(static_cast<int>(r), p);
    double acc = red == GqaReduction::kMax ? -std::numeric_limits<double>::infinity() : 0.0;
    for (int g = 0; g < group(); ++g) {
      const double s = HeadBound(static_cast<int>(r) * group() + g, p);
      acc = red == GqaReduction::kMax ? std::max(acc, s) : acc + s;
    }
    return acc;
  }
};

// Indices of the k best eligible elements by (score desc, index asc), by std::partial_sort.
inline std::vector<int64_t> RefTopK(const std::vector<double>& score,
                                    const std::vector<bool>& eligible, int64_t k) {
  std::vector<int64_t> idx;
  for (size_t i = 0; i < score.size(); ++i) {
    if (eligible.empty() || eligible[i]) idx.push_back(static_cast<int64_t>(i));
  }
  const size_t keep = std::min<size_t>(static_cast<size_t>(k), idx.size());
  std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), [&](int64_t a, int64_t b) {
    if (score[a] != score[b]) return score[a] > score[b];
    return a < b;
  });
  idx.resize(keep);
  return idx;
}

// Checks that `got` is a top-k of the eligible elements up to ties within `tol`: the same count
// as the reference, no duplicates, only eligible elements, every chosen score >= the reference's
// k-th score - tol and every unchosen eligible score <= it + tol.
inline void ExpectTopKUpToTies(const std::vector<int64_t>& got, const std::vector<double>& score,
                               const std::vector<bool>& eligible, int64_t k, double tol,
                               const std::string& what) {
  const std::vector<int64_t> ref = RefTopK(score, eligible, k);
  ASSERT_EQ(got.size(), ref.size()) << what;
  if (ref.empty()) return;
  const std::set<int64_t> got_set(got.begin(), got.end());
  ASSERT_EQ(got_set.size(), got.size()) << what << ": duplicates";
  double kth = std::numeric_limits<double>::infinity();
  for (int64_t i : ref) kth = std::min(kth, score[i]);
  for (int64_t i : got) {
    ASSERT_TRUE(i >= 0 && i < static_cast<int64_t>(score.size())) << what << ": index " << i;
    ASSERT_TRUE(eligible.empty() || eligible[i]) << what << ": ineligible " << i;
    ASSERT_GE(score[i], kth - tol) << what << ": chose " << i;
  }
  for (size_t i = 0; i < score.size(); ++i) {
    if ((eligible.empty() || eligible[i]) && !got_set.count(static_cast<int64_t>(i))) {
      ASSERT_LE(score[i], kth + tol) << what << ": missed " << i;
    }
  }
}

// Relative tolerance for comparing scores rounded to float (or fp32-accumulated) with fp64.
inline double ScoreTol(const std::vector<double>& score, double rel) {
  double m = 0.0;
  for (double s : score) {
    if (std::isfinite(s)) m = std::max(m, std::fabs(s));
  }
  return rel * std::max(1.0, m);
}

// Output row r of a selection as a vector (counts[r] entries).
inline std::vector<int64_t> Row(const std::vector<int32_t>& indices,
                                const std::vector<int32_t>& counts, int64_t cap, int64_t r) {
  std::vector<int64_t> v;
  for (int64_t j = 0; j < counts[r]; ++j) v.push_back(indices[r * cap + j]);
  return v;
}

}  // namespace testing_util
}  // namespace topk
}  // namespace ropekv

#endif  // ROPEKV_TESTS_UNIT_KERNELS_TOPK_TOPK_TEST_UTIL_H_
