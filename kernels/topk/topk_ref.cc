// CPU reference of kernels/topk and the daemon's CPU path: plain loops, fp64 accumulation.
//
// Every score and bound is a sum of products of two fp32-representable values, each exact in fp64;
// the sums run in four interleaved fp64 partial sums (so that the compiler can use vectors), added
// pairwise at the end. The result differs from a sequential sum only by fp64 rounding.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/common/dtype.h"
#include "kernels/topk/topk.h"
#include "kernels/topk/topk_internal.h"
#include "kernels/topk/topk_math.h"

namespace ropekv {
namespace topk {
namespace {

using internal::IsPinned;
using internal::PageAllPinned;

// Address of (head, row) of a view; `Ptr` is const void* or void*.
template <typename Ptr>
const char* RowAddress(const BasicMatrixView<Ptr>& v, int64_t head, int64_t row) {
  const size_t esize = DTypeSize(v.dtype);
  if (v.blocks == nullptr) {
    return static_cast<const char*>(v.base) + (head * v.head_stride + row * v.row_stride) * esize;
  }
  const char* block = static_cast<const char*>(v.blocks[row / v.rows_per_block]);
  return block + (head * v.head_stride + (row % v.rows_per_block) * v.row_stride) * esize;
}

char* MutableRowAddress(const MutableMatrixView& v, int64_t head, int64_t row) {
  return const_cast<char*>(RowAddress(v, head, row));
}

// n elements of `row` (dtype t) as doubles.
void LoadRow(const char* row, int n, DType t, double* out) {
  if (t == DType::kBF16) {
    const uint16_t* r = reinterpret_cast<const uint16_t*>(row);
    for (int i = 0; i < n; ++i) out[i] = BFloat16ToFloat(r[i]);
  } else if (t == DType::kF32) {
    const float* r = reinterpret_cast<const float*>(row);
    for (int i = 0; i < n; ++i) out[i] = r[i];
  } else {
    for (int i = 0; i < n; ++i) out[i] = LoadAsFloat(row, i, t);
  }
}

// The loops below in an AVX2 clone too (the loader picks the one the CPU runs): products and sums
// are the same operations either way, in the same order.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROPEKV_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ROPEKV_AVX2_CLONES
#endif

// out[g] = q[g] . k for the `group` rows of q ([group][d]); d is a multiple of 4 (64, 128, 256).
ROPEKV_AVX2_CLONES void GroupDots(const double* q, int group, int d, const double* k, double* out) {
  for (int g = 0; g < group; ++g, q += d) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (int i = 0; i < d; i += 4) {
      for (int j = 0; j < 4; ++j) s[j] += q[i + j] * k[i + j];
    }
    out[g] = (s[0] + s[1]) + (s[2] + s[3]);
  }
}

// out[g] = sum over i of max(q[g][i] hi[i], q[g][i] lo[i]): the Quest bound, from the positive
// and negative parts of the queries (qp = max(q, 0), qn = min(q, 0), [group][d] each), with finite
// hi and lo (one of each term's two products is then an exact zero). d as GroupDots.
ROPEKV_AVX2_CLONES void GroupBoundDots(const double* qp, const double* qn, int group, int d,
                                       const double* hi, const double* lo, double* out) {
  for (int g = 0; g < group; ++g, qp += d, qn += d) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (int i = 0; i < d; i += 4) {
      for (int j = 0; j < 4; ++j) s[j] += qp[i + j] * hi[i + j] + qn[i + j] * lo[i + j];
    }
    out[g] = (s[0] + s[1]) + (s[2] + s[3]);
  }
}

// One selected element and its score, ordered larger score first, then lower index.
struct Scored {
  float score;
  int64_t index;
};
bool Before(const Scored& a, const Scored& b) {
  if (a.score != b.score) return a.score > b.score;
  return a.index < b.index;
}

// The first min(k, size) elements of `v` in the order Before (partially sorted in place).
void KeepTop(std::vector<Scored>* v, int64_t k) {
  const size_t keep = static_cast<size_t>(std::min<int64_t>(k, static_cast<int64_t>(v->size())));
  std::nth_element(v->begin(), v->begin() + keep, v->end(), Before);
  v->resize(keep);
}

// Queries and key access of one request, in fp64.
class Scorer {
 public:
  explicit Scorer(const SelectRequest& req)
      : req_(req),
        group_(req.query_heads / req.kv_heads),
        q_(static_cast<size_t>(req.query_heads) * req.head_dim),
        qp_(q_.size()),
        qn_(q_.size()),
        k_(req.head_dim) {}

  // Loads the queries; INVALID_ARGUMENT if one holds NaN.
  absl::Status LoadQueries() {
    for (int h = 0; h < req_.query_heads; ++h) {
      for (int d = 0; d < req_.head_dim; ++d) {
        const size_t i = static_cast<size_t>(h) * req_.head_dim + d;
        const float v = LoadAsFloat(req_.queries, i, req_.query_dtype);
        if (std::isnan(v)) {
          return absl::InvalidArgumentError(
              absl::StrCat("query head ", h, " holds NaN at column ", d));
        }
        q_[i] = v;
        qp_[i] = v > 0 ? v : 0.0;
        qn_[i] = v < 0 ? v : 0.0;
      }
    }
    return absl::OkStatus();
  }

  int group() const { return group_; }

  // Scores of the `group()` query heads of KV head `kvh` against token t: out[g] for query head
  // kvh * group + g. INVALID_ARGUMENT on a NaN score (NaN key, or inf - inf).
  absl::Status GroupScores(int kvh, int64_t t, double* out) {
    LoadRow(RowAddress(req_.keys, kvh, t), req_.head_dim, req_.keys.dtype, k_.data());
    GroupDots(&q_[static_cast<size_t>(kvh) * group_ * req_.head_dim], group_, req_.head_dim,
              k_.data(), out);
    for (int g = 0; g < group_; ++g) {
      if (std::isnan(out[g])) {
        return absl::InvalidArgumentError(
            absl::StrCat("score of query head ", kvh * group_ + g, " at token ", t,
                         " is NaN (NaN in the key of kv head ", kvh, ", or infinite values)"));
      }
    }
    return absl::OkStatus();
  }

  // The score of token t for output row `row` (reduced as the request says).
  absl::StatusOr<double> RowScore(int64_t row, int64_t t) {
    std::vector<double>& s = scratch_;
    s.resize(group_);
    if (req_.reduction == GqaReduction::kPerQueryHead) {
      const int kvh = static_cast<int>(row / group_);
      absl::Status st = GroupScores(kvh, t, s.data());
      if (!st.ok()) return st;
      return s[row % group_];
    }
    absl::Status st = GroupScores(static_cast<int>(row), t, s.data());
    if (!st.ok()) return st;
    return Reduce(s.data());
  }

  // Reduction of the group's scores (kMax or kSum).
  double Reduce(const double* s) const {
    double r = s[0];
    for (int g = 1; g < group_; ++g) {
      r = req_.reduction == GqaReduction::kMax ? std::max(r, s[g]) : r + s[g];
    }
    return r;
  }

  // Quest bounds of page p of KV head kvh for the group: out[g].
  absl::Status GroupBounds(int kvh, int64_t p, double* out) {
    const int d_all = req_.head_dim;
    const char* row = RowAddress(req_.page_meta, kvh, p);
    std::vector<double>& mm = scratch_meta_;
    mm.resize(2 * d_all);
    LoadRow(row, 2 * d_all, req_.page_meta.dtype, mm.data());
    bool finite = true;
    for (int d = 0; d < 2 * d_all; ++d) {
      if (std::isnan(mm[d])) {
        return absl::InvalidArgumentError(absl::StrCat("page metadata of kv head ", kvh, ", page ",
                                                       p, " holds NaN at column ", d));
      }
      finite = finite && std::isfinite(mm[d]);
    }
    const size_t q0 = static_cast<size_t>(kvh) * group_ * d_all;
    if (finite) {
      GroupBoundDots(&qp_[q0], &qn_[q0], group_, d_all, mm.data(), mm.data() + d_all, out);
      return absl::OkStatus();
    }
    for (int g = 0; g < group_; ++g) {
      const double* q = &q_[q0 + static_cast<size_t>(g) * d_all];
      double acc = 0.0;
      for (int d = 0; d < d_all; ++d) {
        // max(q M, q m) without 0 * inf.
        if (q[d] > 0) {
          acc += q[d] * mm[d];
        } else if (q[d] < 0) {
          acc += q[d] * mm[d_all + d];
        }
      }
      out[g] = std::isnan(acc) ? std::numeric_limits<double>::infinity() : acc;
    }
    return absl::OkStatus();
  }

 private:
  const SelectRequest& req_;
  const int group_;
  std::vector<double> q_;   // [query_heads][head_dim]
  std::vector<double> qp_;  // max(q_, 0)
  std::vector<double> qn_;  // min(q_, 0)
  std::vector<double> k_;   // [head_dim]
  std::vector<double> scratch_;
  std::vector<double> scratch_meta_;
};

// Writes reduced per-row values of a per-(kv head, element) computation into out[rows][len].
// `fn(kvh, element, double* group_values)` fills the group's values.
template <typename Fn>
absl::Status ForAllRows(const SelectRequest& req, int64_t len, Fn fn, float* out) {
  const int group = req.query_heads / req.kv_heads;
  std::vector<double> s(group);
  for (int kvh = 0; kvh < req.kv_heads; ++kvh) {
    for (int64_t e = 0; e < len; ++e) {
      absl::Status st = fn(kvh, e, s.data());
      if (!st.ok()) return st;
      if (req.reduction == GqaReduction::kPerQueryHead) {
        for (int g = 0; g < group; ++g) {
          out[static_cast<size_t>(kvh * group + g) * len + e] = static_cast<float>(s[g]);
        }
      } else {
        double r = s[0];
        for (int g = 1; g < group; ++g) {
          r = req.reduction == GqaReduction::kMax ? std::max(r, s[g]) : r + s[g];
        }
        out[static_cast<size_t>(kvh) * len + e] = static_cast<float>(r);
      }
    }
  }
  return absl::OkStatus();
}

// Row-wise log-sum-exp of scale * score over all tokens, per query head: (max, sum of exp).
struct Lse {
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0.0;
};

double ExpRel(double x, const Lse& l) {
  if (std::isinf(l.max)) return x == l.max ? 1.0 : 0.0;  // degenerate: all -inf or some +inf
  return std::exp(x - l.max);
}

}  // namespace

namespace {

// Order-preserving signed key of a 16-bit float's bits (sign-magnitude -> two's complement
// order; -0 just below +0); the map is its own inverse.
inline int16_t Key16(uint16_t b) {
  const int16_t s = static_cast<int16_t>(b);
  return s < 0 ? static_cast<int16_t>(s ^ 0x7fff) : s;
}
inline uint16_t Unkey16(int16_t k) {
  return static_cast<uint16_t>(k < 0 ? static_cast<int16_t>(k ^ 0x7fff) : k);
}

// BuildPageMetaCpu where the metadata has the keys' 16-bit type: outward rounding is then the
// identity (every key is representable), so M and m are the max and min of the bits in order-key
// space, zeros taken as +0 for M and -0 for m. Same bits as the plain loop (the tests compare it
// with token-by-token appends), ~20x faster: it runs on the Put path (page metadata on write).
// Returns false, having written nothing useful, when a key is NaN (the plain loop reports it).
bool BuildSameType16(const MatrixView& keys, const PageMetaShape& shape,
                     const MutableMatrixView& meta) {
  const uint16_t nan_above = keys.dtype == DType::kBF16 ? 0x7f80u : 0x7c00u;
  const int d_all = shape.head_dim;
  const int64_t pages = NumPages(shape.num_tokens);
  std::vector<int16_t> hi(d_all), lo(d_all);
  for (int h = 0; h < shape.kv_heads; ++h) {
    for (int64_t p = 0; p < pages; ++p) {
      const int64_t t0 = p * kPageTokens;
      const int64_t t1 = std::min(t0 + kPageTokens, shape.num_tokens);
      uint16_t nan = 0;
      for (int d = 0; d < d_all; ++d) {
        hi[d] = std::numeric_limits<int16_t>::min();
        lo[d] = std::numeric_limits<int16_t>::max();
      }
      for (int64_t t = t0; t < t1; ++t) {
        const uint16_t* row = reinterpret_cast<const uint16_t*>(RowAddress(keys, h, t));
        for (int d = 0; d < d_all; ++d) {
          const uint16_t b = row[d];
          nan |= static_cast<uint16_t>((b & 0x7fffu) > nan_above);
          const int16_t up = Key16(b == 0x8000u ? 0 : b);
          const int16_t down = Key16(b == 0 ? 0x8000u : b);
          hi[d] = up > hi[d] ? up : hi[d];
          lo[d] = down < lo[d] ? down : lo[d];
        }
      }
      if (nan != 0) return false;
      uint16_t* out = reinterpret_cast<uint16_t*>(MutableRowAddress(meta, h, p));
      for (int d = 0; d < d_all; ++d) {
        out[d] = Unkey16(hi[d]);
        out[d_all + d] = Unkey16(lo[d]);
      }
    }
  }
  return true;
}

}  // namespace

absl::Status BuildPageMetaCpu(const MatrixView& keys, const PageMetaShape& shape,
                              const MutableMatrixView& meta) {
  absl::Status s = internal::ValidatePageMetaArgs(keys, shape, meta);
  if (!s.ok()) return s;
  if (keys.dtype == meta.dtype && keys.dtype != DType::kF32 && BuildSameType16(keys, shape, meta)) {
    return absl::OkStatus();
  }
  const int d_all = shape.head_dim;
  const int64_t pages = NumPages(shape.num_tokens);
  std::vector<float> hi(d_all), lo(d_all);
  for (int h = 0; h < shape.kv_heads; ++h) {
    for (int64_t p = 0; p < pages; ++p) {
      const int64_t t0 = p * kPageTokens;
      const int64_t t1 = std::min(t0 + kPageTokens, shape.num_tokens);
      for (int64_t t = t0; t < t1; ++t) {
        const char* row = RowAddress(keys, h, t);
        for (int d = 0; d < d_all; ++d) {
          const float v = LoadAsFloat(row, d, keys.dtype);
          if (std::isnan(v)) {
            return absl::InvalidArgumentError(
                absl::StrCat("key of kv head ", h, ", token ", t, " holds NaN at column ", d));
          }
          const float up = internal::RoundOutward(meta.dtype, v, true);
          const float down = internal::RoundOutward(meta.dtype, v, false);
          hi[d] = (t == t0 || up > hi[d]) ? up : hi[d];
          lo[d] = (t == t0 || down < lo[d]) ? down : lo[d];
        }
      }
      char* out = MutableRowAddress(meta, h, p);
      for (int d = 0; d < d_all; ++d) {
        StoreFromFloat(out, d, meta.dtype, hi[d]);
        StoreFromFloat(out, d_all + d, meta.dtype, lo[d]);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status AppendPageMetaCpu(const MatrixView& keys, const PageMetaShape& shape,
                               int64_t first_token, const MutableMatrixView& meta) {
  absl::Status s = internal::ValidatePageMetaArgs(keys, shape, meta);
  if (!s.ok()) return s;
  if (first_token < 0 || first_token >= shape.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_token must be in [0, num_tokens = ", shape.num_tokens, "), got ", first_token));
  }
  const int d_all = shape.head_dim;
  // Check every new key before writing anything.
  for (int h = 0; h < shape.kv_heads; ++h) {
    for (int64_t t = first_token; t < shape.num_tokens; ++t) {
      const char* row = RowAddress(keys, h, t);
      for (int d = 0; d < d_all; ++d) {
        if (std::isnan(LoadAsFloat(row, d, keys.dtype))) {
          return absl::InvalidArgumentError(
              absl::StrCat("key of kv head ", h, ", token ", t, " holds NaN at column ", d));
        }
      }
    }
  }
  for (int h = 0; h < shape.kv_heads; ++h) {
    for (int64_t t = first_token; t < shape.num_tokens; ++t) {
      const int64_t p = t / kPageTokens;
      const bool fresh = t % kPageTokens == 0;  // a page starts empty at its first token
      const char* row = RowAddress(keys, h, t);
      char* out = MutableRowAddress(meta, h, p);
      for (int d = 0; d < d_all; ++d) {
        const float v = LoadAsFloat(row, d, keys.dtype);
        float up = internal::RoundOutward(meta.dtype, v, true);
        float down = internal::RoundOutward(meta.dtype, v, false);
        if (!fresh) {
          const float old_hi = LoadAsFloat(out, d, meta.dtype);
          const float old_lo = LoadAsFloat(out, d_all + d, meta.dtype);
          up = up > old_hi ? up : old_hi;
          down = down < old_lo ? down : old_lo;
        }
        StoreFromFloat(out, d, meta.dtype, up);
        StoreFromFloat(out, d_all + d, meta.dtype, down);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ScoreCpu(const SelectRequest& req, float* out) {
  absl::Status s = internal::ValidateShape(req);
  if (!s.ok()) return s;
  if (req.queries == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("queries and out must be set");
  }
  s = internal::ValidateView(req.keys, "keys", req.head_dim, req.num_tokens, req.kv_heads);
  if (!s.ok()) return s;
  Scorer scorer(req);
  s = scorer.LoadQueries();
  if (!s.ok()) return s;
  return ForAllRows(
      req, req.num_tokens,
      [&](int kvh, int64_t t, double* v) { return scorer.GroupScores(kvh, t, v); }, out);
}

absl::Status PageBoundCpu(const SelectRequest& req, float* out) {
  absl::Status s = internal::ValidateShape(req);
  if (!s.ok()) return s;
  if (req.queries == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("queries and out must be set");
  }
  s = internal::ValidateView(req.page_meta, "page_meta", 2 * req.head_dim, NumPages(req.num_tokens),
                             req.kv_heads);
  if (!s.ok()) return s;
  Scorer scorer(req);
  s = scorer.LoadQueries();
  if (!s.ok()) return s;
  return ForAllRows(
      req, NumPages(req.num_tokens),
      [&](int kvh, int64_t p, double* v) { return scorer.GroupBounds(kvh, p, v); }, out);
}

absl::Status TopKCpu(const float* scores, int64_t rows, int64_t len, int64_t k, int32_t* indices) {
  absl::StatusOr<internal::SelectPlan> plan = internal::MakeTopKPlan(rows, len, k);
  if (!plan.ok()) return plan.status();
  if (scores == nullptr || indices == nullptr) {
    return absl::InvalidArgumentError("scores and indices must be set");
  }
  const int64_t keep = plan->k_sel;
  std::vector<Scored> v;
  for (int64_t r = 0; r < rows; ++r) {
    v.clear();
    for (int64_t i = 0; i < len; ++i) {
      const float x = scores[r * len + i];
      if (std::isnan(x)) {
        return absl::InvalidArgumentError(
            absl::StrCat("score of row ", r, ", element ", i, " is NaN"));
      }
      v.push_back({x, i});
    }
    KeepTop(&v, keep);
    std::vector<int32_t> idx;
    for (const Scored& e : v) idx.push_back(static_cast<int32_t>(e.index));
    std::sort(idx.begin(), idx.end());
    std::copy(idx.begin(), idx.end(), indices + r * keep);
  }
  return absl::OkStatus();
}

absl::Status SelectCpu(const SelectRequest& req, const SelectResult& result) {
  absl::Status s = ValidateSelectRequest(req, result);
  if (!s.ok()) return s;
  absl::StatusOr<internal::SelectPlan> plan_or = internal::MakeSelectPlan(req, false);
  if (!plan_or.ok()) return plan_or.status();
  const internal::SelectPlan& plan = *plan_or;
  const int64_t n = req.num_tokens;
  const int64_t rows = plan.rows;
  const int group = static_cast<int>(plan.group);
  const bool per_head = req.reduction == GqaReduction::kPerQueryHead;

  Scorer scorer(req);
  s = scorer.LoadQueries();
  if (!s.ok()) return s;

  // Per row: the chosen tokens (besides the pinned ones).
  std::vector<std::vector<int64_t>> chosen(rows);
  std::vector<Scored> cand;
  std::vector<double> gs(group);

  if (req.mode == Mode::kExact) {
    std::vector<std::vector<Scored>> all(rows);
    for (int kvh = 0; kvh < req.kv_heads; ++kvh) {
      for (int64_t t = 0; t < n; ++t) {
        // Pinned tokens are scored too, so that a NaN anywhere in the keys is reported.
        s = scorer.GroupScores(kvh, t, gs.data());
        if (!s.ok()) return s;
        if (IsPinned(t, n, req.n_sink, req.n_local)) continue;
        if (per_head) {
          for (int g = 0; g < group; ++g) {
            all[kvh * group + g].push_back({static_cast<float>(gs[g]), t});
          }
        } else {
          all[kvh].push_back({static_cast<float>(scorer.Reduce(gs.data())), t});
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      KeepTop(&all[r], req.k);
      for (const Scored& e : all[r]) chosen[r].push_back(e.index);
    }
  } else {
    // Page bounds of every row, then the top pages.
    std::vector<float> bounds(static_cast<size_t>(rows) * plan.pages);
    s = ForAllRows(
        req, plan.pages,
        [&](int kvh, int64_t p, double* v) { return scorer.GroupBounds(kvh, p, v); },
        bounds.data());
    if (!s.ok()) return s;
    for (int64_t r = 0; r < rows; ++r) {
      cand.clear();
      for (int64_t p = 0; p < plan.pages; ++p) {
        if (PageAllPinned(p, n, req.n_sink, req.n_local)) continue;
        cand.push_back({bounds[r * plan.pages + p], p});
      }
      KeepTop(&cand, plan.k_sel);
      if (req.mode == Mode::kBound) {
        for (const Scored& e : cand) {
          for (int64_t t = e.index * kPageTokens; t < std::min(n, (e.index + 1) * kPageTokens);
               ++t) {
            chosen[r].push_back(t);
          }
        }
        continue;
      }
      // kBoundThenExact: exact scores on the candidate pages' free tokens.
      std::vector<Scored> toks;
      for (const Scored& e : cand) {
        for (int64_t t = e.index * kPageTokens; t < std::min(n, (e.index + 1) * kPageTokens); ++t) {
          if (IsPinned(t, n, req.n_sink, req.n_local)) continue;
          absl::StatusOr<double> sc = scorer.RowScore(r, t);
          if (!sc.ok()) return sc.status();
          toks.push_back({static_cast<float>(*sc), t});
        }
      }
      KeepTop(&toks, req.k);
      for (const Scored& e : toks) chosen[r].push_back(e.index);
    }
  }

  // Merge with the pinned tokens, sort, deduplicate, write.
  const int64_t cap = plan.capacity;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int64_t>& v = chosen[r];
    for (int64_t t = 0; t < std::min(n, req.n_sink); ++t) v.push_back(t);
    for (int64_t t = std::max<int64_t>(0, n - req.n_local); t < n; ++t) v.push_back(t);
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
    if (static_cast<int64_t>(v.size()) > cap) {
      return absl::InternalError(
          absl::StrCat("selection of row ", r, " has ", v.size(), " tokens, capacity ", cap));
    }
  }
  // Scores and mass first (they may fail), then the indices.
  std::vector<float> out_scores;
  if (result.scores != nullptr) {
    out_scores.assign(static_cast<size_t>(rows) * cap, std::numeric_limits<float>::quiet_NaN());
    for (int64_t r = 0; r < rows; ++r) {
      for (size_t j = 0; j < chosen[r].size(); ++j) {
        absl::StatusOr<double> sc = scorer.RowScore(r, chosen[r][j]);
        if (!sc.ok()) return sc.status();
        out_scores[r * cap + j] = static_cast<float>(*sc);
      }
    }
  }
  std::vector<float> out_mass;
  if (result.mass != nullptr) {
    const double scale = internal::SoftmaxScale(req);
    // Per query head: LSE over all tokens, and the selected part.
    std::vector<Lse> lse(req.query_heads);
    std::vector<std::vector<double>> head_scores(group, std::vector<double>(n));
    out_mass.assign(rows, 0.0f);
    for (int kvh = 0; kvh < req.kv_heads; ++kvh) {
      for (int64_t t = 0; t < n; ++t) {
        s = scorer.GroupScores(kvh, t, gs.data());
        if (!s.ok()) return s;
        for (int g = 0; g < group; ++g) head_scores[g][t] = gs[g] * scale;
      }
      for (int g = 0; g < group; ++g) {
        Lse l;
        for (int64_t t = 0; t < n; ++t) l.max = std::max(l.max, head_scores[g][t]);
        for (int64_t t = 0; t < n; ++t) l.sum += ExpRel(head_scores[g][t], l);
        const int h = kvh * group + g;
        const int64_t r = per_head ? h : kvh;
        double sel = 0.0;
        for (int64_t t : chosen[r]) sel += ExpRel(head_scores[g][t], l);
        out_mass[r] += static_cast<float>(sel / l.sum / (per_head ? 1 : group));
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const std::vector<int64_t>& v = chosen[r];
    for (int64_t j = 0; j < cap; ++j) {
      result.indices[r * cap + j] = j < static_cast<int64_t>(v.size()) ? static_cast<int32_t>(v[j])
                                                                       : static_cast<int32_t>(-1);
    }
    if (result.counts != nullptr) result.counts[r] = static_cast<int32_t>(v.size());
  }
  if (result.scores != nullptr) {
    std::copy(out_scores.begin(), out_scores.end(), result.scores);
  }
  if (result.mass != nullptr) std::copy(out_mass.begin(), out_mass.end(), result.mass);
  return absl::OkStatus();
}

absl::Status GatherCpu(const GatherRequest& req) {
  absl::Status s = internal::ValidateGather(req);
  if (!s.ok()) return s;
  const int64_t group = req.rows / req.kv_heads;
  for (int64_t r = 0; r < req.rows; ++r) {
    const int64_t count = req.counts == nullptr ? req.capacity : req.counts[r];
    if (count < 0 || count > req.capacity) {
      return absl::InvalidArgumentError(absl::StrCat(
          "counts[", r, "] must be in [0, capacity = ", req.capacity, "], got ", count));
    }
    for (int64_t j = 0; j < count; ++j) {
      const int32_t t = req.indices[r * req.capacity + j];
      if (t < 0 || t >= req.num_tokens) {
        return absl::InvalidArgumentError(absl::StrCat(
            "index ", j, " of list ", r, " must be in [0, ", req.num_tokens, "), got ", t));
      }
    }
  }
  for (int which = 0; which < 2; ++which) {
    const MatrixView& src = which == 0 ? req.keys : req.values;
    char* dst = static_cast<char*>(which == 0 ? req.dst_keys : req.dst_values);
    if (dst == nullptr) continue;
    const size_t row_bytes = static_cast<size_t>(req.head_dim) * DTypeSize(src.dtype);
    for (int64_t r = 0; r < req.rows; ++r) {
      const int64_t count = req.counts == nullptr ? req.capacity : req.counts[r];
      for (int64_t j = 0; j < req.capacity; ++j) {
        char* out = dst + (r * req.capacity + j) * row_bytes;
        if (j < count) {
          const int32_t t = req.indices[r * req.capacity + j];
          std::memcpy(out, RowAddress(src, r / group, t), row_bytes);
        } else {
          std::memset(out, 0, row_bytes);
        }
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace topk
}  // namespace ropekv
