// RetrievalStore over an in-process KvCache and SessionStore: every selection is checked against a
// top-k of fp64 scores (or fp64 Quest bounds) computed here from the stored bytes, up to ties.
#include "cache/retrieval.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cache/kv_cache.h"
#include "cache/retrieval_gpu.h"
#include "cache/session.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"
#include "tests/unit/cache/block_layout.h"

namespace ropekv {
namespace {

using topk::GqaReduction;
using topk::Mode;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Keys of one layer as fp64: key(head, token, column).
using KeyFn = std::function<double(int, int64_t, int)>;

std::string ModeName(Mode m) {
  return m == Mode::kExact ? "Exact" : m == Mode::kBound ? "Bound" : "BoundThenExact";
}
std::string ReductionName(GqaReduction r) {
  return r == GqaReduction::kMax ? "Max" : r == GqaReduction::kSum ? "Sum" : "PerQueryHead";
}

// Random KV in block layout: `blocks` blocks of [layer][k|v][kv_head][block_tokens][head_dim].
std::string RandomBlocks(const ModelSpec& spec, int64_t blocks, std::mt19937_64& rng) {
  const size_t es = DTypeSize(spec.dtype);
  const size_t elems = BlockBytes(spec) / es * blocks;
  std::string out(elems * es, '\0');
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < elems; ++i) StoreFromFloat(out.data(), i, spec.dtype, normal(rng));
  return out;
}

using testing::BlockIndex;

KeyFn BlockKeys(const ModelSpec& s, const std::string& blocks, int layer, int kv = 0) {
  return [&s, &blocks, layer, kv](int h, int64_t t, int c) {
    return static_cast<double>(
        LoadAsFloat(blocks.data(), BlockIndex(s, layer, kv, h, t, c), s.dtype));
  };
}

// Keys of a layer in range layout [k|v][kv_head][n][head_dim] (SessionReader::WriteLayer).
KeyFn RangeKeys(const ModelSpec& s, const std::string& layer, int64_t n, int kv = 0) {
  return [&s, &layer, n, kv](int h, int64_t t, int c) {
    const size_t i = ((static_cast<size_t>(kv) * s.kv_heads + h) * n + t) * s.head_dim + c;
    return static_cast<double>(LoadAsFloat(layer.data(), i, s.dtype));
  };
}

std::vector<float> RandomQueries(int query_heads, int head_dim, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<size_t>(query_heads) * head_dim);
  for (float& x : q) x = normal(rng);
  return q;
}

absl::string_view Bytes(const std::vector<float>& v) {
  return absl::string_view(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// Per query head fp64 scores q.k: [query_heads][n].
std::vector<std::vector<double>> HeadScores(const std::vector<float>& q, int query_heads,
                                            int kv_heads, int head_dim, int64_t n,
                                            const KeyFn& key) {
  const int group = query_heads / kv_heads;
  std::vector<std::vector<double>> s(query_heads, std::vector<double>(n));
  for (int h = 0; h < query_heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      double acc = 0;
      for (int c = 0; c < head_dim; ++c) acc += double{q[h * head_dim + c]} * key(h / group, t, c);
      s[h][t] = acc;
    }
  }
  return s;
}

// Row values reduced as the row is: rows x len, from per-head values [query_heads][len].
std::vector<std::vector<double>> Reduce(const std::vector<std::vector<double>>& per_head,
                                        int kv_heads, GqaReduction r) {
  if (r == GqaReduction::kPerQueryHead) return per_head;
  const int group = static_cast<int>(per_head.size()) / kv_heads;
  std::vector<std::vector<double>> out(kv_heads, std::vector<double>(per_head[0].size()));
  for (int g = 0; g < kv_heads; ++g) {
    for (size_t t = 0; t < per_head[0].size(); ++t) {
      double v = r == GqaReduction::kMax ? -kInf : 0.0;
      for (int j = 0; j < group; ++j) {
        const double x = per_head[g * group + j][t];
        v = r == GqaReduction::kMax ? std::max(v, x) : v + x;
      }
      out[g][t] = v;
    }
  }
  return out;
}

// Quest bound of every page per query head, fp64 over the exact per-page max/min of the keys.
std::vector<std::vector<double>> HeadBounds(const std::vector<float>& q, int query_heads,
                                            int kv_heads, int head_dim, int64_t n,
                                            const KeyFn& key) {
  const int group = query_heads / kv_heads;
  const int64_t pages = topk::NumPages(n);
  std::vector<std::vector<double>> b(query_heads, std::vector<double>(pages));
  for (int h = 0; h < query_heads; ++h) {
    for (int64_t p = 0; p < pages; ++p) {
      double acc = 0;
      for (int c = 0; c < head_dim; ++c) {
        double hi = -kInf, lo = kInf;
        for (int64_t t = p * 16; t < std::min(n, (p + 1) * 16); ++t) {
          hi = std::max(hi, key(h / group, t, c));
          lo = std::min(lo, key(h / group, t, c));
        }
        const double qc = q[h * head_dim + c];
        acc += std::max(qc * hi, qc * lo);
      }
      b[h][p] = acc;
    }
  }
  return b;
}

// Checks that `chosen` holds the top `want` of `candidates` by `value`, up to ties: every chosen
// value is >= every other candidate's value, within a relative tolerance.
void ExpectTopUpToTies(const std::vector<int64_t>& chosen, const std::vector<int64_t>& candidates,
                       const std::vector<double>& value, size_t want, const std::string& what) {
  ASSERT_EQ(chosen.size(), want) << what;
  std::set<int64_t> in(chosen.begin(), chosen.end());
  double min_in = kInf, max_out = -kInf;
  for (int64_t c : candidates) {
    if (in.count(c)) {
      min_in = std::min(min_in, value[c]);
    } else {
      max_out = std::max(max_out, value[c]);
    }
  }
  for (int64_t c : chosen) {
    EXPECT_TRUE(std::find(candidates.begin(), candidates.end(), c) != candidates.end())
        << what << ": " << c << " is not a candidate";
  }
  EXPECT_GE(min_in, max_out - 1e-6 * (1 + std::abs(max_out))) << what;
}

// The selection of row r as a vector (count entries).
std::vector<int64_t> Row(const SelectOutput& out, int64_t r) {
  std::vector<int64_t> v;
  for (int32_t j = 0; j < out.counts[r]; ++j) v.push_back(out.indices[r * out.capacity + j]);
  return v;
}

// Checks every row of `out` against fp64 references: ascending, sink/local included, and the
// rest the top of the exact scores (kExact) or of the page bounds (kBound), or the top exact
// scores among the bound's candidate pages (kBoundThenExact); scores and mass when present.
void CheckSelection(const SelectOutput& out, const SelectArgs& a, const std::vector<float>& q,
                    int kv_heads, int head_dim, int64_t n, const KeyFn& key) {
  const auto head_scores = HeadScores(q, a.query_heads, kv_heads, head_dim, n, key);
  const auto scores = Reduce(head_scores, kv_heads, a.reduction);
  const auto bounds =
      Reduce(HeadBounds(q, a.query_heads, kv_heads, head_dim, n, key), kv_heads, a.reduction);
  ASSERT_EQ(out.num_tokens, n);
  ASSERT_EQ(out.rows, static_cast<int64_t>(scores.size()));
  const int64_t pages = topk::NumPages(n);
  auto pinned = [&](int64_t t) { return t < a.n_sink || t >= n - a.n_local; };
  for (int64_t r = 0; r < out.rows; ++r) {
    const std::string what =
        absl::StrCat(ModeName(a.mode), "/", ReductionName(a.reduction), " row ", r);
    const std::vector<int64_t> row = Row(out, r);
    ASSERT_TRUE(std::is_sorted(row.begin(), row.end())) << what;
    ASSERT_EQ(std::set<int64_t>(row.begin(), row.end()).size(), row.size()) << what;
    for (int64_t j = out.counts[r]; j < out.capacity; ++j) {
      EXPECT_EQ(out.indices[r * out.capacity + j], -1) << what;
    }
    for (int64_t t = 0; t < n; ++t) {
      if (pinned(t)) {
        EXPECT_TRUE(std::binary_search(row.begin(), row.end(), t)) << what << ": pinned " << t;
      }
    }
    std::vector<int64_t> free_tokens;
    for (int64_t t = 0; t < n; ++t) {
      if (!pinned(t)) free_tokens.push_back(t);
    }
    std::vector<int64_t> chosen;
    for (int64_t t : row) {
      if (!pinned(t)) chosen.push_back(t);
    }
    if (a.mode == Mode::kExact) {
      ExpectTopUpToTies(chosen, free_tokens, scores[r], std::min<size_t>(a.k, free_tokens.size()),
                        what);
    } else {
      // Pages with a free token compete on their bound.
      std::vector<int64_t> free_pages;
      for (int64_t p = 0; p < pages; ++p) {
        for (int64_t t = p * 16; t < std::min(n, (p + 1) * 16); ++t) {
          if (!pinned(t)) {
            free_pages.push_back(p);
            break;
          }
        }
      }
      if (a.mode == Mode::kBound) {
        std::set<int64_t> chosen_pages;
        for (int64_t t : chosen) chosen_pages.insert(t / 16);
        // Every token of a chosen page is in the row.
        for (int64_t p : chosen_pages) {
          for (int64_t t = p * 16; t < std::min(n, (p + 1) * 16); ++t) {
            EXPECT_TRUE(std::binary_search(row.begin(), row.end(), t)) << what << ": page " << p;
          }
        }
        ExpectTopUpToTies(std::vector<int64_t>(chosen_pages.begin(), chosen_pages.end()),
                          free_pages, bounds[r],
                          std::min<size_t>(topk::NumPages(a.k), free_pages.size()), what);
      } else {
        const int64_t cand_tokens = a.candidate_tokens == 0 ? 4 * a.k : a.candidate_tokens;
        const size_t cand_pages = std::min<size_t>(topk::NumPages(cand_tokens), free_pages.size());
        // The candidate pages: the top cand_pages by bound (ties at the edge make this a choice;
        // the test data has no exact ties). The chosen tokens are the top of their free tokens.
        std::vector<int64_t> by_bound = free_pages;
        std::stable_sort(by_bound.begin(), by_bound.end(),
                         [&](int64_t x, int64_t y) { return bounds[r][x] > bounds[r][y]; });
        by_bound.resize(cand_pages);
        std::vector<int64_t> cand;
        for (int64_t p : by_bound) {
          for (int64_t t = p * 16; t < std::min(n, (p + 1) * 16); ++t) {
            if (!pinned(t)) cand.push_back(t);
          }
        }
        std::sort(cand.begin(), cand.end());
        ExpectTopUpToTies(chosen, cand, scores[r], std::min<size_t>(a.k, cand.size()), what);
      }
    }
    if (!out.scores.empty()) {
      for (int64_t j = 0; j < out.counts[r]; ++j) {
        const double want = scores[r][row[j]];
        EXPECT_NEAR(out.scores[r * out.capacity + j], want, 1e-4 * (1 + std::abs(want)))
            << what << " score of token " << row[j];
      }
    }
    if (!out.mass.empty()) {
      const double scale = a.softmax_scale != 0 ? a.softmax_scale : 1.0 / std::sqrt(head_dim);
      const int group = a.query_heads / kv_heads;
      const int first = a.reduction == GqaReduction::kPerQueryHead ? r : r * group;
      const int count = a.reduction == GqaReduction::kPerQueryHead ? 1 : group;
      double mass = 0;
      for (int h = first; h < first + count; ++h) {
        const double mx = *std::max_element(head_scores[h].begin(), head_scores[h].end());
        double all = 0, sel = 0;
        for (int64_t t = 0; t < n; ++t) all += std::exp((head_scores[h][t] - mx) * scale);
        for (int64_t t : row) sel += std::exp((head_scores[h][t] - mx) * scale);
        mass += sel / all;
      }
      EXPECT_NEAR(out.mass[r], mass / count, 1e-5) << what << " mass";
    }
  }
}

// The gathered K/V [k|v][rows][capacity][head_dim] of `out` equals the keys/values at the
// selected tokens, zeros after each row's count.
void CheckGathered(absl::string_view gathered, const std::vector<int32_t>& indices,
                   const std::vector<int32_t>& counts, int64_t rows, int64_t capacity, int kv_heads,
                   int head_dim, DType dtype, const KeyFn& keys, const KeyFn& values) {
  ASSERT_EQ(gathered.size(), 2 * rows * capacity * head_dim * DTypeSize(dtype));
  const int group = static_cast<int>(rows / kv_heads);
  for (int kv = 0; kv < 2; ++kv) {
    const KeyFn& src = kv == 0 ? keys : values;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < capacity; ++j) {
        for (int c = 0; c < head_dim; ++c) {
          const size_t i = ((kv * rows + r) * capacity + j) * head_dim + c;
          const double got = LoadAsFloat(gathered.data(), i, dtype);
          const double want =
              j < counts[r] ? src(static_cast<int>(r / group), indices[r * capacity + j], c) : 0.0;
          ASSERT_EQ(got, want) << "kv " << kv << " row " << r << " slot " << j << " col " << c;
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------

class RetrievalTest : public ::testing::Test {
 protected:
  void SetUp() override { Init(16, DType::kBF16); }

  void Init(int block_tokens, DType dtype, RetrievalStore::Options options = {}) {
    store_.reset();  // before its cache goes
    sessions_.reset();
    spec_.layers = 3;
    spec_.kv_heads = 2;
    spec_.head_dim = 64;
    spec_.dtype = dtype;
    spec_.block_tokens = block_tokens;
    spec_.rope.head_dim = 64;
    spec_.rope.theta = 10000;
    KvCache::Options o;
    o.background_maintenance = false;
    auto cache = KvCache::Create(std::move(o));
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    auto reg = cache_->RegisterModel(spec_, "m");
    ASSERT_TRUE(reg.ok()) << reg.status();
    auto sessions = SessionStore::Create(cache_.get(), SessionStore::Options());
    ASSERT_TRUE(sessions.ok()) << sessions.status();
    sessions_ = *std::move(sessions);
    MakeStore(std::move(options));
  }

  void MakeStore(RetrievalStore::Options options) {
    options.now = [this] { return now_; };
    auto store = RetrievalStore::Create(cache_.get(), sessions_.get(), std::move(options));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  std::vector<int32_t> Tokens(int64_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng_() % 50000);
    return t;
  }

  // Puts `blocks` (block layout) for tokens; returns the status of the Put.
  absl::Status Put(const std::vector<int32_t>& tokens, const std::string& blocks,
                   std::optional<int64_t> rotated_at = std::nullopt, bool pre_rope = false) {
    PutOptions p;
    p.model = "m";
    p.tenant = tenant_;
    p.tokens = tokens;
    p.rotated_at = rotated_at;
    p.pre_rope = pre_rope;
    auto w = cache_->BeginPut(std::move(p));
    if (!w.ok()) return w.status();
    if (absl::Status s = (*w)->Write(blocks); !s.ok()) return s;
    return (*w)->Finish().status();
  }

  // A prefix of `blocks` random blocks, put; its tokens in *tokens.
  std::string PutRandom(int64_t blocks, std::vector<int32_t>* tokens) {
    *tokens = Tokens(blocks * spec_.block_tokens);
    std::string kv = RandomBlocks(spec_, blocks, rng_);
    EXPECT_TRUE(Put(*tokens, kv).ok());
    return kv;
  }

  SelectArgs PrefixArgs(const std::vector<int32_t>& tokens, const std::vector<float>& q,
                        int query_heads) {
    SelectArgs a;
    a.source.model = "m";
    a.source.tenant = tenant_;
    a.source.tokens = tokens;
    a.query_heads = query_heads;
    a.queries = Bytes(q);
    return a;
  }

  // Puts six random blocks (*tokens) and returns a page-mode Select over them at layer 1: k 24,
  // four query heads (*q).
  SelectArgs PutSixBlocksForBound(std::vector<int32_t>* tokens, std::vector<float>* q) {
    PutRandom(6, tokens);
    *q = RandomQueries(4, spec_.head_dim, rng_);
    SelectArgs a = PrefixArgs(*tokens, *q, 4);
    a.mode = Mode::kBound;
    a.k = 24;
    a.layer = 1;
    return a;
  }

  // Opens a session of n random tokens with random KV; returns its id.
  std::string OpenRandomSession(int64_t n) {
    OpenSessionArgs open;
    open.model = "m";
    open.tokens = Tokens(n);
    const int64_t blocks = (n + spec_.block_tokens - 1) / spec_.block_tokens;
    auto opened = sessions_->Open(open, RandomBlocks(spec_, blocks, rng_));
    EXPECT_TRUE(opened.ok()) << opened.status();
    return opened.ok() ? opened->id : std::string();
  }

  // A Select over session `id` at `layer` with fp32 queries q (q.size() / head_dim query heads).
  SelectArgs SessionArgs(const std::string& id, int layer, const std::vector<float>& q, Mode mode,
                         int64_t k) const {
    SelectArgs a;
    a.source.session_id = id;
    a.layer = layer;
    a.query_heads = static_cast<int>(q.size() / spec_.head_dim);
    a.queries = Bytes(q);
    a.mode = mode;
    a.k = k;
    return a;
  }

  // Random KV of n tokens in the Fill layout ([layer][k|v][kv_head][n][head_dim]).
  std::string RandomRange(int64_t n) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::string kv(RangeBytes(spec_, n), '\0');
    for (size_t i = 0; i < kv.size() / DTypeSize(spec_.dtype); ++i) {
      StoreFromFloat(kv.data(), i, spec_.dtype, normal(rng_));
    }
    return kv;
  }

  // Inserts n tokens at `at` into session `id` and fills them with random KV.
  void InsertAndFill(const std::string& id, int64_t at, int64_t n) {
    ASSERT_TRUE(sessions_->Edit(id, {EditOp::Insert(at, Tokens(n))}).ok());
    FillArgs fill;
    fill.range = TokenRange{at, at + n};
    ASSERT_TRUE(sessions_->Fill(id, fill, RandomRange(n)).ok());
  }

  // The whole layer of a session as the reader writes it.
  std::string SessionLayer(const std::string& id, int layer, int64_t* n) {
    auto reader = sessions_->Read(id, std::nullopt);
    EXPECT_TRUE(reader.ok()) << reader.status();
    if (!reader.ok()) return "";
    *n = reader->range().size();
    std::string out(reader->layer_bytes(), '\xff');
    EXPECT_TRUE(reader->WriteLayer(layer, out.data()).ok());
    return out;
  }

  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<SessionStore> sessions_;
  std::unique_ptr<RetrievalStore> store_;
  std::string tenant_ = "t";
  absl::Time now_ = absl::FromUnixSeconds(1000);
  std::mt19937_64 rng_{0x7e7a11};
};

// ----------------------------------------------------------------------------------------------
// Exact, bound and bound-then-exact over a prefix vs fp64, over block sizes, dtypes, reductions.

using GridParam = std::tuple<int, DType, Mode, GqaReduction>;

class RetrievalGridTest : public RetrievalTest, public ::testing::WithParamInterface<GridParam> {
 protected:
  void SetUp() override { Init(std::get<0>(GetParam()), std::get<1>(GetParam())); }
};

TEST_P(RetrievalGridTest, PrefixSelectionMatchesFp64) {
  const Mode mode = std::get<2>(GetParam());
  const GqaReduction reduction = std::get<3>(GetParam());
  const int64_t blocks = 320 / spec_.block_tokens;  // 320 tokens: 20 pages
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(blocks, &tokens);
  const int64_t n = blocks * spec_.block_tokens;
  // The prompt goes on past the cached blocks: the selection covers the cached ones.
  std::vector<int32_t> prompt = tokens;
  for (int i = 0; i < 5; ++i) prompt.push_back(7);
  const int query_heads = 6;  // 3 per KV head
  for (int layer : {0, 2}) {
    const std::vector<float> q = RandomQueries(query_heads, spec_.head_dim, rng_);
    SelectArgs a = PrefixArgs(prompt, q, query_heads);
    a.layer = layer;
    a.mode = mode;
    a.reduction = reduction;
    a.k = 37;
    a.n_sink = 4;
    a.n_local = 9;
    a.want_scores = true;
    a.want_mass = true;
    a.gather = true;
    auto out = store_->Select(a);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->model, ModelIdOf(spec_));
    EXPECT_EQ(out->kv_heads, spec_.kv_heads);
    EXPECT_EQ(out->rows, reduction == GqaReduction::kPerQueryHead ? query_heads : spec_.kv_heads);
    CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, n, BlockKeys(spec_, kv, layer));
    CheckGathered(out->gathered, out->indices, out->counts, out->rows, out->capacity,
                  spec_.kv_heads, spec_.head_dim, spec_.dtype, BlockKeys(spec_, kv, layer, 0),
                  BlockKeys(spec_, kv, layer, 1));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Grid, RetrievalGridTest,
    ::testing::Combine(::testing::Values(16, 32, 8), ::testing::Values(DType::kBF16, DType::kF32),
                       ::testing::Values(Mode::kExact, Mode::kBound, Mode::kBoundThenExact),
                       ::testing::Values(GqaReduction::kMax, GqaReduction::kSum,
                                         GqaReduction::kPerQueryHead)),
    [](const ::testing::TestParamInfo<GridParam>& info) {
      return absl::StrCat("Block", std::get<0>(info.param), "_", DTypeName(std::get<1>(info.param)),
                          "_", ModeName(std::get<2>(info.param)), "_",
                          ReductionName(std::get<3>(info.param)));
    });

// Queries in the model's dtype (bf16) select as their fp32 values do.
TEST_F(RetrievalTest, QueriesInModelDtype) {
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(8, &tokens);
  std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
  std::string q_bf16(q.size() * 2, '\0');
  for (size_t i = 0; i < q.size(); ++i) {
    StoreFromFloat(q_bf16.data(), i, DType::kBF16, q[i]);
    q[i] = LoadAsFloat(q_bf16.data(), i, DType::kBF16);  // the reference sees the rounded values
  }
  SelectArgs a = PrefixArgs(tokens, q, 4);
  a.queries = q_bf16;
  a.query_dtype = DType::kBF16;
  a.k = 20;
  auto out = store_->Select(a);
  ASSERT_TRUE(out.ok()) << out.status();
  CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, 128, BlockKeys(spec_, kv, 0));
}

// A key planted along a query is always chosen: its token (exact modes) or its page (bound).
TEST_F(RetrievalTest, PlantedNeedleIsSelected) {
  const int64_t blocks = 64;  // 1024 tokens
  const int64_t n = blocks * spec_.block_tokens;
  for (int trial = 0; trial < 6; ++trial) {
    tenant_ = absl::StrCat("needle", trial);
    std::vector<int32_t> tokens = Tokens(n);
    std::string kv = RandomBlocks(spec_, blocks, rng_);
    const int layer = trial % spec_.layers;
    const int head = trial % spec_.kv_heads;
    const int64_t needle = 20 + static_cast<int64_t>(rng_() % (n - 40));
    const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
    // Query head 2 * head reads KV head `head`: the needle is 4x that query, scaled.
    for (int c = 0; c < spec_.head_dim; ++c) {
      StoreFromFloat(kv.data(), BlockIndex(spec_, layer, 0, head, needle, c), spec_.dtype,
                     4.0f * q[(2 * head) * spec_.head_dim + c]);
    }
    ASSERT_TRUE(Put(tokens, kv).ok());
    for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
      SelectArgs a = PrefixArgs(tokens, q, 4);
      a.layer = layer;
      a.mode = mode;
      a.k = 16;
      a.n_sink = 4;
      a.n_local = 16;
      auto out = store_->Select(a);
      ASSERT_TRUE(out.ok()) << out.status();
      const std::vector<int64_t> row = Row(*out, head);
      const int64_t first = mode == Mode::kBound ? needle / 16 * 16 : needle;
      const int64_t last = mode == Mode::kBound ? first + 15 : needle;
      for (int64_t t = first; t <= last; ++t) {
        EXPECT_TRUE(std::binary_search(row.begin(), row.end(), t))
            << ModeName(mode) << " trial " << trial << ": token " << t << " (needle " << needle
            << ")";
      }
    }
  }
}

TEST_F(RetrievalTest, SinkAndLocalAlwaysIncludedWithoutDuplicates) {
  std::vector<int32_t> tokens;
  PutRandom(4, &tokens);  // 64 tokens
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.k = 1;
  a.n_sink = 5;
  a.n_local = 7;
  auto out = store_->Select(a);
  ASSERT_TRUE(out.ok()) << out.status();
  for (int64_t r = 0; r < out->rows; ++r) {
    const std::vector<int64_t> row = Row(*out, r);
    ASSERT_EQ(row.size(), 13u);
    for (int64_t t = 0; t < 5; ++t) EXPECT_EQ(row[t], t);
    for (int64_t t = 0; t < 7; ++t) EXPECT_EQ(row[6 + t], 57 + t);
    EXPECT_GE(row[5], 5);
    EXPECT_LT(row[5], 57);
  }
  // Sink and local windows covering everything: every token once.
  a.n_sink = 40;
  a.n_local = 40;
  out = store_->Select(a);
  ASSERT_TRUE(out.ok()) << out.status();
  for (int64_t r = 0; r < out->rows; ++r) {
    const std::vector<int64_t> row = Row(*out, r);
    ASSERT_EQ(row.size(), 64u);
    for (int64_t t = 0; t < 64; ++t) EXPECT_EQ(row[t], t);
  }
}

// k >= N returns every token.
TEST_F(RetrievalTest, KAtLeastNReturnsEverything) {
  std::vector<int32_t> tokens;
  PutRandom(2, &tokens);
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.k = 1000;
  auto out = store_->Select(a);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->capacity, 32);
  for (int64_t r = 0; r < out->rows; ++r) EXPECT_EQ(out->counts[r], 32);
}

// Select at one layer, keep, gather the same tokens at the others (TidalDecode).
TEST_F(RetrievalTest, GatherAtOtherLayersEqualsStoredBytes) {
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(10, &tokens);
  for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kPerQueryHead}) {
    const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
    SelectArgs a = PrefixArgs(tokens, q, 4);
    a.layer = 1;
    a.reduction = red;
    a.k = 24;
    a.n_sink = 2;
    a.n_local = 3;
    a.keep = true;
    auto out = store_->Select(a);
    ASSERT_TRUE(out.ok()) << out.status();
    ASSERT_FALSE(out->selection_id.empty());
    auto sel = store_->FindSelection(out->selection_id);
    ASSERT_TRUE(sel.ok()) << sel.status();
    EXPECT_EQ((*sel)->indices(), out->indices);
    EXPECT_EQ((*sel)->counts(), out->counts);
    for (int layer = 0; layer < spec_.layers; ++layer) {
      auto g = store_->Gather(out->selection_id, layer);
      ASSERT_TRUE(g.ok()) << g.status();
      CheckGathered(*g, out->indices, out->counts, out->rows, out->capacity, spec_.kv_heads,
                    spec_.head_dim, spec_.dtype, BlockKeys(spec_, kv, layer, 0),
                    BlockKeys(spec_, kv, layer, 1));
    }
  }
}

// Page metadata is built once per (block, layer) and shared by prompts with the block; a block
// re-Put with other keys after an eviction is detected and its metadata re-derived.
TEST_F(RetrievalTest, MetadataBuiltOnceAndRederivedWhenKeysChange) {
  RetrievalStore::Options lazy;
  lazy.build_metadata_on_put = false;  // the lazy path (metadata on write: below)
  MakeStore(lazy);
  std::vector<int32_t> tokens;
  std::string kv = PutRandom(6, &tokens);
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.mode = Mode::kBound;
  a.k = 32;
  auto first = store_->Select(a);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->metadata_cached);
  EXPECT_EQ(store_->stats().metadata_builds, 6u);
  EXPECT_EQ(store_->stats().metadata_entries, 6u);
  auto second = store_->Select(a);
  ASSERT_TRUE(second.ok());
  EXPECT_TRUE(second->metadata_cached);
  EXPECT_EQ(second->indices, first->indices);
  EXPECT_EQ(store_->stats().metadata_builds, 6u);
  EXPECT_EQ(store_->stats().metadata_hits, 6u);
  // A longer prompt sharing the 6 blocks builds only its new ones.
  std::vector<int32_t> longer = tokens;
  std::vector<int32_t> more = Tokens(2 * spec_.block_tokens);
  longer.insert(longer.end(), more.begin(), more.end());
  const std::string kv_more = RandomBlocks(spec_, 2, rng_);
  {
    PutOptions p;
    p.model = "m";
    p.tenant = tenant_;
    p.tokens = more;
    auto lookup = cache_->Lookup("m", tenant_, tokens);
    ASSERT_TRUE(lookup.ok());
    p.parent = lookup->blocks.back().hash;
    auto w = cache_->BeginPut(std::move(p));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Write(kv_more).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  a.source.tokens = longer;
  auto third = store_->Select(a);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->num_tokens, 128);
  EXPECT_EQ(store_->stats().metadata_builds, 8u);

  // Evict and put the same tokens with other keys: the stale entries are found and rebuilt.
  ASSERT_TRUE(cache_->Evict("m", tenant_, {}).ok());
  kv = RandomBlocks(spec_, 6, rng_);
  ASSERT_TRUE(Put(tokens, kv).ok());
  a.source.tokens = tokens;
  auto fourth = store_->Select(a);
  ASSERT_TRUE(fourth.ok()) << fourth.status();
  EXPECT_FALSE(fourth->metadata_cached);
  EXPECT_EQ(store_->stats().metadata_stale, 6u);
  CheckSelection(*fourth, a, q, spec_.kv_heads, spec_.head_dim, 96, BlockKeys(spec_, kv, 0));
}

// A page-mode Select over a prefix it selected over before finds the layer's block entries in
// one lookup (a prefix view), as long as no block changed; views never keep an entry's bytes
// after the store let the entry go.
TEST_F(RetrievalTest, PrefixViewLooksUpTheLayerOnce) {
  std::vector<int32_t> tokens;
  std::vector<float> q;
  SelectArgs a = PutSixBlocksForBound(&tokens, &q);
  auto first = store_->Select(a);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(store_->stats().metadata_prefix_view_hits, 0u);
  EXPECT_EQ(store_->stats().metadata_hits, 6u);
  auto second = store_->Select(a);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(store_->stats().metadata_prefix_view_hits, 1u);
  EXPECT_EQ(store_->stats().metadata_hits, 12u);  // a view hit counts its blocks' entries
  EXPECT_TRUE(second->metadata_cached);
  EXPECT_EQ(second->indices, first->indices);
  a.mode = Mode::kBoundThenExact;
  auto third = store_->Select(a);
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(store_->stats().metadata_prefix_view_hits, 2u);
  // Another layer has its own view.
  a.layer = 2;
  ASSERT_TRUE(store_->Select(a).ok());
  EXPECT_EQ(store_->stats().metadata_prefix_view_hits, 2u);
  ASSERT_TRUE(store_->Select(a).ok());
  EXPECT_EQ(store_->stats().metadata_prefix_view_hits, 3u);

  // Evicted, the blocks' entries go, and no view holds their bytes.
  auto lookup = cache_->Lookup("m", tenant_, tokens);
  ASSERT_TRUE(lookup.ok());
  std::weak_ptr<const std::string> entry = store_->CachedPageMeta(lookup->blocks[3].hash, 1);
  ASSERT_FALSE(entry.expired());
  ASSERT_TRUE(cache_->Evict("m", tenant_, {}).ok());
  EXPECT_TRUE(entry.expired());
  // The same tokens put again with other keys: new serials, so the view is not used, and the
  // selection follows the new keys.
  const std::string kv = RandomBlocks(spec_, 6, rng_);
  ASSERT_TRUE(Put(tokens, kv).ok());
  a.layer = 1;
  a.mode = Mode::kBound;
  auto fourth = store_->Select(a);
  ASSERT_TRUE(fourth.ok()) << fourth.status();
  EXPECT_EQ(store_->stats().metadata_prefix_view_hits, 3u);
  CheckSelection(*fourth, a, q, spec_.kv_heads, spec_.head_dim, 96, BlockKeys(spec_, kv, 1));
}

// A prefix view's own bytes count against the metadata capacity: kept where they fit, freed with
// the view; a store with no room left for them keeps no view.
TEST_F(RetrievalTest, PrefixViewsCountAgainstTheMetadataCapacity) {
  std::vector<int32_t> tokens;
  std::vector<float> q;
  const SelectArgs a = PutSixBlocksForBound(&tokens, &q);
  const uint64_t entries = store_->stats().metadata_bytes;  // every layer's, built by the Put
  ASSERT_GT(entries, 0u);
  ASSERT_TRUE(store_->Select(a).ok());
  const uint64_t with_view = store_->stats().metadata_bytes;
  EXPECT_GE(with_view, entries + 6 * 40);  // a serial, a held entry, a pointer, a name a block
  EXPECT_LE(with_view, entries + 6 * 40 + 256);
  // The view goes with its blocks' entries, and its bytes with it.
  ASSERT_TRUE(cache_->Evict("m", tenant_, {}).ok());
  EXPECT_EQ(store_->stats().metadata_bytes, 0u);

  RetrievalStore::Options o;
  o.metadata_capacity_bytes = entries;  // room for the entries alone
  MakeStore(o);
  ASSERT_TRUE(Put(tokens, RandomBlocks(spec_, 6, rng_)).ok());
  ASSERT_EQ(store_->stats().metadata_bytes, entries);
  ASSERT_TRUE(store_->Select(a).ok());
  ASSERT_TRUE(store_->Select(a).ok());
  EXPECT_EQ(store_->stats().metadata_prefix_view_hits, 0u);
  EXPECT_EQ(store_->stats().metadata_bytes, entries);
  EXPECT_EQ(store_->stats().metadata_evictions, 0u);
}

// A prefix named by its last block's hash selects what its tokens do; an earlier block's hash
// names the shorter prefix; kept selections gather through the chain.
// Prepare + Run (the batch path of SelectBatch) answers each item as Select does, a kept item
// included; a prepared selection runs once, a null one is INVALID_ARGUMENT, and the source is let
// go once it ran (its blocks can be evicted).
TEST_F(RetrievalTest, PreparedBatchEqualsSelectsAndRunsOnce) {
  std::vector<int32_t> a_tokens, b_tokens;
  PutRandom(5, &a_tokens);
  PutRandom(9, &b_tokens);
  std::vector<std::vector<float>> qs;
  std::vector<SelectArgs> args;
  for (int i = 0; i < 6; ++i) {
    qs.push_back(RandomQueries(4, spec_.head_dim, rng_));
    SelectArgs a = PrefixArgs(i % 2 ? a_tokens : b_tokens, qs.back(), 4);
    a.mode = static_cast<Mode>(i % 3);
    a.reduction = static_cast<topk::GqaReduction>((i / 2) % 3);
    a.k = 10 + i;
    a.layer = i % spec_.layers;
    a.n_sink = 1;
    a.n_local = 3;
    a.want_scores = i % 2 == 0;
    a.want_mass = i == 1;
    a.keep = i == 4;
    args.push_back(std::move(a));
  }
  std::vector<std::shared_ptr<RetrievalStore::PreparedSelect>> prepared;
  for (const SelectArgs& a : args) {
    auto p = store_->Prepare(a);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_GT(RetrievalStore::OutputBytes(**p), 0u);
    prepared.push_back(*std::move(p));
  }
  const uint64_t selects = store_->stats().selects;
  std::vector<absl::StatusOr<SelectOutput>> outs = store_->Run(prepared);
  ASSERT_EQ(outs.size(), args.size());
  EXPECT_EQ(store_->stats().selects, selects + args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    ASSERT_TRUE(outs[i].ok()) << "item " << i << ": " << outs[i].status();
    SelectArgs alone = args[i];
    alone.keep = false;
    auto want = store_->Select(alone);
    ASSERT_TRUE(want.ok()) << want.status();
    EXPECT_EQ(outs[i]->indices, want->indices) << "item " << i;
    EXPECT_EQ(outs[i]->counts, want->counts) << "item " << i;
    EXPECT_EQ(outs[i]->scores.size(), want->scores.size()) << "item " << i;
    for (size_t j = 0; j < want->scores.size(); ++j) {
      EXPECT_TRUE(outs[i]->scores[j] == want->scores[j] ||
                  (std::isnan(outs[i]->scores[j]) && std::isnan(want->scores[j])))
          << "item " << i << " slot " << j;
    }
    EXPECT_EQ(outs[i]->mass, want->mass) << "item " << i;
    EXPECT_EQ(outs[i]->selection_id.empty(), i != 4) << "item " << i;
  }
  EXPECT_TRUE(store_->Gather(outs[4]->selection_id, 0).ok());

  // Run twice, the same one twice in a batch, a null one.
  std::vector<absl::StatusOr<SelectOutput>> again = store_->Run({prepared[0]});
  EXPECT_EQ(again[0].status().code(), absl::StatusCode::kFailedPrecondition);
  auto fresh = store_->Prepare(args[1]);
  ASSERT_TRUE(fresh.ok());
  std::vector<absl::StatusOr<SelectOutput>> twice = store_->Run({*fresh, *fresh, nullptr});
  EXPECT_TRUE(twice[0].ok()) << twice[0].status();
  EXPECT_EQ(twice[1].status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(twice[2].status().code(), absl::StatusCode::kInvalidArgument);
  // The prepared selections still held here hold no blocks: everything can be evicted.
  EXPECT_EQ(cache_->Evict("m", tenant_, a_tokens).value_or(0), 5u);
  EXPECT_EQ(cache_->Evict("m", tenant_, b_tokens).value_or(0), 9u);
  // And one dropped without running lets its source go too.
  std::vector<int32_t> c_tokens;
  PutRandom(3, &c_tokens);
  SelectArgs c_args = PrefixArgs(c_tokens, qs[0], 4);  // borrowed by the prepared selection
  c_args.k = 8;
  auto unrun = store_->Prepare(c_args);
  ASSERT_TRUE(unrun.ok()) << unrun.status();
  unrun->reset();
  EXPECT_EQ(cache_->Evict("m", tenant_, c_tokens).value_or(0), 3u);
}

TEST_F(RetrievalTest, PrefixByLastBlockEqualsByTokens) {
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(7, &tokens);
  auto lookup = cache_->Lookup("m", tenant_, tokens);
  ASSERT_TRUE(lookup.ok());
  const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    for (int64_t last : {6, 3}) {
      SelectArgs by_tokens =
          PrefixArgs(std::vector<int32_t>(tokens.begin(), tokens.begin() + (last + 1) * 16), q, 4);
      by_tokens.mode = mode;
      by_tokens.k = 20;
      by_tokens.layer = 2;
      by_tokens.want_scores = true;
      SelectArgs by_hash = by_tokens;
      by_hash.source.tokens.clear();
      by_hash.source.tenant = "ignored";
      by_hash.source.last_block = lookup->blocks[last].hash;
      auto a = store_->Select(by_tokens);
      auto b = store_->Select(by_hash);
      const std::string what = absl::StrCat(ModeName(mode), " last ", last);
      ASSERT_TRUE(a.ok()) << what << ": " << a.status();
      ASSERT_TRUE(b.ok()) << what << ": " << b.status();
      EXPECT_EQ(b->num_tokens, (last + 1) * 16) << what;
      EXPECT_EQ(b->indices, a->indices) << what;
      EXPECT_EQ(b->scores, a->scores) << what;
      CheckSelection(*b, by_hash, q, spec_.kv_heads, spec_.head_dim, (last + 1) * 16,
                     BlockKeys(spec_, kv, 2));
    }
  }
  // Kept, then gathered at another layer: the stored bytes of the selected tokens.
  SelectArgs k = PrefixArgs({}, q, 4);
  k.source.last_block = lookup->blocks[6].hash;
  k.k = 10;
  k.keep = true;
  auto kept = store_->Select(k);
  ASSERT_TRUE(kept.ok()) << kept.status();
  auto gathered = store_->Gather(kept->selection_id, 0);
  ASSERT_TRUE(gathered.ok()) << gathered.status();
  CheckGathered(*gathered, kept->indices, kept->counts, kept->rows, kept->capacity, spec_.kv_heads,
                spec_.head_dim, spec_.dtype, BlockKeys(spec_, kv, 0, 0),
                BlockKeys(spec_, kv, 0, 1));
  // Held once for every layer: the same bytes as gathering layer by layer; while held, the blocks
  // survive an eviction, and once released a gather is NOT_FOUND.
  auto sel = store_->FindSelection(kept->selection_id);
  ASSERT_TRUE(sel.ok());
  auto held = store_->HoldSource(**sel);
  ASSERT_TRUE(held.ok()) << held.status();
  for (int layer = 0; layer < spec_.layers; ++layer) {
    std::string a((*sel)->layer_bytes(), '\x11'), b((*sel)->layer_bytes(), '\x22');
    ASSERT_TRUE(store_->GatherLayer(**sel, layer, a.data()).ok());
    ASSERT_TRUE(store_->GatherLayer(**sel, **held, layer, b.data()).ok());
    EXPECT_EQ(a, b) << "layer " << layer;
  }
  std::string out((*sel)->layer_bytes(), '\0');
  EXPECT_EQ(store_->GatherLayer(**sel, **held, spec_.layers, out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(cache_->Evict("m", tenant_, {}).ok());
  ASSERT_TRUE(store_->GatherLayer(**sel, **held, 1, out.data()).ok());
  CheckGathered(out, kept->indices, kept->counts, kept->rows, kept->capacity, spec_.kv_heads,
                spec_.head_dim, spec_.dtype, BlockKeys(spec_, kv, 1, 0),
                BlockKeys(spec_, kv, 1, 1));
  held->reset();
  ASSERT_TRUE(cache_->Evict("m", tenant_, {}).ok());
  EXPECT_EQ(store_->GatherLayer(**sel, 1, out.data()).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->HoldSource(**sel).status().code(), absl::StatusCode::kNotFound);
  // Unknown block: NOT_FOUND.
  k.source.last_block = BlockHash();
  k.keep = false;
  EXPECT_EQ(store_->Select(k).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(RetrievalTest, MetadataStoreIsBounded) {
  RetrievalStore::Options o;
  // One block's metadata of a layer: 2 heads x 1 page x 128 x 2 bytes = 512 bytes.
  o.metadata_capacity_bytes = 4 * 512;
  o.build_metadata_on_put = false;
  MakeStore(o);
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(10, &tokens);
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.mode = Mode::kBoundThenExact;
  a.k = 20;
  auto out = store_->Select(a);
  ASSERT_TRUE(out.ok()) << out.status();
  CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, 160, BlockKeys(spec_, kv, 0));
  const RetrievalStore::Stats s = store_->stats();
  EXPECT_EQ(s.metadata_entries, 4u);
  EXPECT_EQ(s.metadata_bytes, 4u * 512);
  EXPECT_EQ(s.metadata_evictions, 6u);
}

// Blocks put with keys rotated at another position than their place are re-rotated first: the
// selection sees what Get at the block's position returns.
TEST_F(RetrievalTest, PrefixStoredAtAnotherPositionIsRerotated) {
  std::vector<int32_t> tokens = Tokens(4 * spec_.block_tokens);
  const std::string kv = RandomBlocks(spec_, 4, rng_);
  ASSERT_TRUE(Put(tokens, kv, /*rotated_at=*/1000).ok());
  auto handle = cache_->AcquirePrefix("m", tenant_, tokens, 0);
  ASSERT_TRUE(handle.ok());
  std::string moved(4 * BlockBytes(spec_), '\0');
  for (size_t b = 0; b < 4; ++b) {
    ASSERT_TRUE(
        handle->CopyBlock(b, moved.data() + b * BlockBytes(spec_), handle->blocks()[b].position)
            .ok());
  }
  ASSERT_NE(moved, kv);
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.k = 10;
  a.gather = true;
  auto out = store_->Select(a);
  ASSERT_TRUE(out.ok()) << out.status();
  CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, 64, BlockKeys(spec_, moved, 0));
  CheckGathered(out->gathered, out->indices, out->counts, out->rows, out->capacity, spec_.kv_heads,
                spec_.head_dim, spec_.dtype, BlockKeys(spec_, moved, 0, 0),
                BlockKeys(spec_, moved, 0, 1));
}

// ----------------------------------------------------------------------------------------------
// Metadata on write: built in bulk when a Put stores a block (KvCache BlockObserver).

// The metadata built on Put equals token-by-token appends over the stored keys, bit for bit, for
// every layer; a page-mode Select after the Put builds nothing; evicting the blocks drops it.
TEST_F(RetrievalTest, MetadataBuiltOnPutEqualsAppendsAndIsUsedBySelect) {
  // 12 blocks: a Put of 8 or more hands its blocks to the observers on several threads.
  constexpr int kBlocks = 12;
  for (int bt : {16, 32}) {
    Init(bt, DType::kBF16);
    std::vector<int32_t> tokens;
    const std::string kv = PutRandom(kBlocks, &tokens);
    RetrievalStore::Stats s0 = store_->stats();
    EXPECT_EQ(s0.metadata_put_builds, uint64_t{kBlocks} * spec_.layers) << bt;
    EXPECT_EQ(s0.metadata_entries, uint64_t{kBlocks} * spec_.layers) << bt;
    auto lookup = cache_->Lookup("m", tenant_, tokens);
    ASSERT_TRUE(lookup.ok());
    ASSERT_EQ(lookup->blocks.size(), size_t{kBlocks});
    const int64_t ppb = bt / 16, width = 2 * spec_.head_dim;
    for (size_t b = 0; b < kBlocks; ++b) {
      for (int layer = 0; layer < spec_.layers; ++layer) {
        auto meta = store_->CachedPageMeta(lookup->blocks[b].hash, layer);
        ASSERT_NE(meta, nullptr) << "block " << b << " layer " << layer;
        // Token-by-token appends over the block's keys as stored.
        const char* keys = kv.data() + b * BlockBytes(spec_) +
                           2 * static_cast<size_t>(layer) * spec_.kv_heads * bt * spec_.head_dim *
                               DTypeSize(spec_.dtype);
        std::string appended(meta->size(), '\x55');
        for (int64_t t = 0; t < bt; ++t) {
          const absl::Status st = topk::AppendPageMetaCpu(
              topk::DenseMatrix<const void*>(keys, spec_.dtype, bt, spec_.head_dim),
              topk::PageMetaShape{spec_.kv_heads, spec_.head_dim, t + 1}, t,
              topk::DenseMatrix<void*>(appended.data(), spec_.dtype, ppb, width));
          ASSERT_TRUE(st.ok()) << st;
        }
        EXPECT_EQ(*meta, appended) << "block " << b << " layer " << layer;
      }
    }
    const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
    for (Mode mode : {Mode::kBound, Mode::kBoundThenExact}) {
      for (int layer = 0; layer < spec_.layers; ++layer) {
        SelectArgs a = PrefixArgs(tokens, q, 4);
        a.mode = mode;
        a.layer = layer;
        a.k = 24;
        a.n_sink = 1;
        a.n_local = 3;
        auto out = store_->Select(a);
        ASSERT_TRUE(out.ok()) << out.status();
        EXPECT_TRUE(out->metadata_cached);
        CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, kBlocks * bt,
                       BlockKeys(spec_, kv, layer));
      }
    }
    const RetrievalStore::Stats s1 = store_->stats();
    EXPECT_EQ(s1.metadata_builds, 0u) << "Select built metadata lazily";
    EXPECT_EQ(s1.metadata_hits, 2u * spec_.layers * kBlocks);
    // Evicted blocks take their metadata with them.
    auto evicted = cache_->Evict("m", tenant_, tokens);
    ASSERT_TRUE(evicted.ok());
    EXPECT_EQ(*evicted, uint64_t{kBlocks});
    EXPECT_EQ(store_->stats().metadata_entries, 0u);
    EXPECT_EQ(store_->CachedPageMeta(lookup->blocks[0].hash, 0), nullptr);
  }
}

// Re-Put after an eviction with other keys: the new Put's metadata replaces the old (also without
// the fingerprint check); blocks stored at another position are re-rotated for the selection and
// their metadata is derived from the re-rotated keys; a store without the hook builds lazily.
TEST_F(RetrievalTest, MetadataOnPutFollowsRePutAndRerotation) {
  RetrievalStore::Options o;
  o.verify_metadata = false;
  MakeStore(o);
  std::vector<int32_t> tokens;
  PutRandom(4, &tokens);
  ASSERT_TRUE(cache_->Evict("m", tenant_, tokens).ok());
  const std::string kv = RandomBlocks(spec_, 4, rng_);
  ASSERT_TRUE(Put(tokens, kv).ok());
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.mode = Mode::kBound;
  a.k = 16;
  auto out = store_->Select(a);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_TRUE(out->metadata_cached);
  CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, 64, BlockKeys(spec_, kv, 0));

  // Stored at position 1000, selected at 0..: nothing built on Put, derived from re-rotated keys.
  std::vector<int32_t> other = Tokens(4 * spec_.block_tokens);
  const std::string kv2 = RandomBlocks(spec_, 4, rng_);
  const uint64_t put_builds = store_->stats().metadata_put_builds;
  ASSERT_TRUE(Put(other, kv2, /*rotated_at=*/1000).ok());
  EXPECT_EQ(store_->stats().metadata_put_builds, put_builds);
  auto handle = cache_->AcquirePrefix("m", tenant_, other, 0);
  ASSERT_TRUE(handle.ok());
  std::string moved(4 * BlockBytes(spec_), '\0');
  for (size_t b = 0; b < 4; ++b) {
    ASSERT_TRUE(
        handle->CopyBlock(b, moved.data() + b * BlockBytes(spec_), handle->blocks()[b].position)
            .ok());
  }
  SelectArgs a2 = PrefixArgs(other, q, 2);
  a2.mode = Mode::kBound;
  a2.k = 16;
  auto out2 = store_->Select(a2);
  ASSERT_TRUE(out2.ok()) << out2.status();
  EXPECT_FALSE(out2->metadata_cached);
  CheckSelection(*out2, a2, q, spec_.kv_heads, spec_.head_dim, 64, BlockKeys(spec_, moved, 0));

  // Without the hook: the same selection, built on first use.
  RetrievalStore::Options lazy;
  lazy.build_metadata_on_put = false;
  MakeStore(lazy);
  std::vector<int32_t> third;
  PutRandom(3, &third);
  EXPECT_EQ(store_->stats().metadata_put_builds, 0u);
  SelectArgs a3 = PrefixArgs(third, q, 2);
  a3.mode = Mode::kBound;
  a3.k = 16;
  auto out3 = store_->Select(a3);
  ASSERT_TRUE(out3.ok()) << out3.status();
  EXPECT_FALSE(out3->metadata_cached);
  EXPECT_EQ(store_->stats().metadata_builds, 3u);
}

// ----------------------------------------------------------------------------------------------
// Sessions: keys as the session reads them now; metadata re-derived after an edit moves keys.

TEST_F(RetrievalTest, SessionSelectionFollowsEdits) {
  const int64_t n0 = 12 * spec_.block_tokens;
  OpenSessionArgs open;
  open.model = "m";
  open.tokens = Tokens(n0);
  const std::string kv = RandomBlocks(spec_, 12, rng_);
  auto opened = sessions_->Open(open, kv);
  ASSERT_TRUE(opened.ok()) << opened.status();
  const std::string id = opened->id;
  const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);

  auto select = [&](Mode mode, bool keep) {
    SelectArgs a = SessionArgs(id, 1, q, mode, 20);
    a.n_sink = 2;
    a.n_local = 5;
    a.want_scores = true;
    a.keep = keep;
    return std::make_pair(a, store_->Select(a));
  };
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    auto [a, out] = select(mode, false);
    ASSERT_TRUE(out.ok()) << out.status();
    int64_t n = 0;
    const std::string layer = SessionLayer(id, 1, &n);
    ASSERT_EQ(n, n0);
    CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, n, RangeKeys(spec_, layer, n));
  }
  EXPECT_EQ(store_->stats().metadata_session_pages_built, 12u);  // 192 tokens
  auto [kept_args, kept] = select(Mode::kBound, true);
  ASSERT_TRUE(kept.ok());
  EXPECT_TRUE(kept->metadata_cached);
  int64_t n_before = 0;
  const std::string before_l2 = SessionLayer(id, 2, &n_before);

  // Insert 7 tokens at 30 and fill them: every later key moves by 7 positions.
  auto edit = sessions_->Edit(id, {EditOp::Insert(30, Tokens(7))});
  ASSERT_TRUE(edit.ok()) << edit.status();
  {
    // Holes: FAILED_PRECONDITION until filled.
    SelectArgs a = kept_args;
    a.keep = false;
    EXPECT_EQ(store_->Select(a).status().code(), absl::StatusCode::kFailedPrecondition);
  }
  FillArgs fill;
  fill.range = TokenRange{30, 37};
  ASSERT_TRUE(sessions_->Fill(id, fill, RandomRange(7)).ok());
  const uint64_t stale_before = store_->stats().metadata_stale;
  for (Mode mode : {Mode::kBound, Mode::kBoundThenExact, Mode::kExact}) {
    auto [a, out] = select(mode, false);
    ASSERT_TRUE(out.ok()) << out.status();
    int64_t n = 0;
    const std::string layer = SessionLayer(id, 1, &n);
    ASSERT_EQ(n, n0 + 7);
    EXPECT_EQ(out->num_tokens, n0 + 7);
    CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, n, RangeKeys(spec_, layer, n));
    if (mode == Mode::kBound) {
      EXPECT_FALSE(out->metadata_cached);
    }
  }
  EXPECT_EQ(store_->stats().metadata_stale, stale_before + 1);
  // Page 0 (tokens 0-15) kept; page 1 (holding token 30) and every later one built: 12 of 13.
  EXPECT_EQ(store_->stats().metadata_session_pages_built, 24u);
  {
    // Gathered by the Select itself: the moved keys re-rotated, the values with them (a Select
    // without gather materialises the session's keys alone).
    SelectArgs a = kept_args;
    a.keep = false;
    a.mode = Mode::kExact;
    a.gather = true;
    auto out = store_->Select(a);
    ASSERT_TRUE(out.ok()) << out.status();
    int64_t n = 0;
    const std::string layer = SessionLayer(id, 1, &n);
    CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, n, RangeKeys(spec_, layer, n));
    CheckGathered(out->gathered, out->indices, out->counts, out->rows, out->capacity,
                  spec_.kv_heads, spec_.head_dim, spec_.dtype, RangeKeys(spec_, layer, n, 0),
                  RangeKeys(spec_, layer, n, 1));
  }

  // The kept selection still gathers the document as it was selected over.
  auto g = store_->Gather(kept->selection_id, 2);
  ASSERT_TRUE(g.ok()) << g.status();
  CheckGathered(*g, kept->indices, kept->counts, kept->rows, kept->capacity, spec_.kv_heads,
                spec_.head_dim, spec_.dtype, RangeKeys(spec_, before_l2, n_before, 0),
                RangeKeys(spec_, before_l2, n_before, 1));
  // Even after the session is closed.
  ASSERT_TRUE(sessions_->Close(id).ok());
  EXPECT_TRUE(store_->Gather(kept->selection_id, 0).ok());
  EXPECT_EQ(select(Mode::kExact, false).second.status().code(), absl::StatusCode::kNotFound);
}

// Decode: each append rebuilds the one page it changes (the others' metadata is kept under their
// names), and the selection stays that of the keys as they are now. Blocks of 16 tokens read the
// page's keys where they are (SessionReader::LayerKeyPages), blocks of 8 through
// SessionReader::WriteLayerTokens.
class SessionAppendTest : public RetrievalTest, public ::testing::WithParamInterface<int> {
 protected:
  void SetUp() override { Init(GetParam(), DType::kBF16); }
};

TEST_P(SessionAppendTest, AppendsRebuildOnlyTheirPage) {
  const int64_t n0 = 100;  // 7 pages, the last of 4 tokens
  const std::string id = OpenRandomSession(n0);
  ASSERT_FALSE(id.empty());
  const int group = 2;
  const std::vector<float> q = RandomQueries(spec_.kv_heads * group, spec_.head_dim, rng_);
  auto bound = [&](bool want_cached, uint64_t want_pages_built) {
    const SelectArgs a = SessionArgs(id, 1, q, Mode::kBound, 16);  // one page a row
    auto out = store_->Select(a);
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(out->metadata_cached, want_cached);
    EXPECT_EQ(store_->stats().metadata_session_pages_built, want_pages_built);
    int64_t n = 0;
    const std::string layer = SessionLayer(id, 1, &n);
    CheckSelection(*out, a, q, spec_.kv_heads, spec_.head_dim, n, RangeKeys(spec_, layer, n));
  };
  bound(false, 7);
  bound(true, 7);
  // Appends of 3 tokens (a decode step's Fill; 8 of them stay below the session's compaction,
  // which copies every chunk and so renames every page once).
  const int64_t m = 3;
  for (int step = 0; step < 8; ++step) {
    const int64_t len = n0 + step * m;
    ASSERT_TRUE(sessions_->Edit(id, {EditOp::Insert(len, Tokens(m))}).ok());
    // The last new token's key at layer 1 is a needle for every query head of its group: its
    // page must win, which it does only if that page's metadata was rebuilt.
    std::string kv = RandomRange(m);
    const KvStrides strides = RangeStrides(spec_, m);
    for (int h = 0; h < spec_.kv_heads; ++h) {
      for (int d = 0; d < spec_.head_dim; ++d) {
        float sum = 0.0f;
        for (int g = 0; g < group; ++g) sum += q[(h * group + g) * spec_.head_dim + d];
        const int64_t at = strides.layer + h * strides.head + (m - 1) * strides.token + d;
        StoreFromFloat(kv.data(), at, spec_.dtype, 4.0f * sum);
      }
    }
    FillArgs fill;
    fill.range = TokenRange{len, len + m};
    ASSERT_TRUE(sessions_->Fill(id, fill, kv).ok());
    // Tokens [100, 124): no append spans pages 6 (96-111) and 7.
    bound(false, 7 + step + 1);
  }
  bound(true, 15);
}

INSTANTIATE_TEST_SUITE_P(BlockTokens, SessionAppendTest, ::testing::Values(16, 8));

// Random edits (inserts, deletes, replaces, stale ranges refilled, appends; the session compacts
// itself on the way): after each, the metadata a store keeps incrementally (only renamed pages
// rebuilt) equals, byte for byte, what a fresh store builds from the whole document.
TEST_F(RetrievalTest, IncrementalSessionMetadataEqualsAFreshBuild) {
  const std::string id = OpenRandomSession(300);
  ASSERT_FALSE(id.empty());
  const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
  auto bound = [&](RetrievalStore* store) {
    return store->Select(SessionArgs(id, 2, q, Mode::kBound, 32)).status();
  };
  std::mt19937_64 rng(0x5e55);
  uint64_t all_pages = 0;
  for (int step = 0; step < 60; ++step) {
    auto info = sessions_->Info(id);
    ASSERT_TRUE(info.ok());
    const int64_t len = info->length;
    const int64_t a = static_cast<int64_t>(rng() % (len + 1));
    const int64_t b = std::min(len, a + static_cast<int64_t>(rng() % 40));
    const int64_t n_ins = static_cast<int64_t>(rng() % 40);
    std::vector<EditOp> ops;
    EditOptions options;
    switch (rng() % 5) {
      case 0:
        ops.push_back(EditOp::Insert(a, Tokens(n_ins)));
        break;
      case 1:
        if (len > 50) ops.push_back(EditOp::Delete(a, b));
        break;
      case 2:
        ops.push_back(EditOp::Replace(a, b, Tokens(n_ins)));
        break;
      case 3:
        ops.push_back(EditOp::Insert(len, Tokens(1 + n_ins % 3)));  // decode
        break;
      default:
        if (b > a) options.stale.push_back(TokenRange{a, b});
        break;
    }
    auto edit = sessions_->Edit(id, ops, options);
    ASSERT_TRUE(edit.ok()) << "step " << step << ": " << edit.status();
    for (const TokenRange& f : edit->fill) {
      FillArgs fill;
      fill.range = f;
      ASSERT_TRUE(sessions_->Fill(id, fill, RandomRange(f.size())).ok()) << "step " << step;
    }
    ASSERT_TRUE(bound(store_.get()).ok()) << "step " << step;
    auto fresh = RetrievalStore::Create(cache_.get(), sessions_.get(), RetrievalStore::Options());
    ASSERT_TRUE(fresh.ok());
    ASSERT_TRUE(bound(fresh->get()).ok()) << "step " << step;
    auto now = sessions_->Info(id);
    ASSERT_TRUE(now.ok());
    const int64_t pages = topk::NumPages(now->length);
    auto kept = store_->CachedSessionPageMeta(id, 2, pages, spec_.kv_heads);
    auto built = (*fresh)->CachedSessionPageMeta(id, 2, pages, spec_.kv_heads);
    ASSERT_TRUE(kept.has_value() && built.has_value()) << "step " << step;
    ASSERT_TRUE(*kept == *built) << "step " << step << ": the kept metadata differs";
    all_pages += (*fresh)->stats().metadata_session_pages_built;
  }
  // The fresh stores built every page of every step; the kept store far fewer.
  const uint64_t kept_pages = store_->stats().metadata_session_pages_built;
  std::printf("[ pages built: kept %llu, fresh %llu ]\n",
              static_cast<unsigned long long>(kept_pages),
              static_cast<unsigned long long>(all_pages));
  EXPECT_LT(kept_pages, all_pages / 2);
}

// Selects from several threads while the session grows: every Select answers (a token awaiting its
// Fill is FAILED_PRECONDITION), and what the store keeps at the end equals a fresh build.
TEST_F(RetrievalTest, ConcurrentSessionSelectsWhileAppending) {
  const std::string id = OpenRandomSession(500);
  ASSERT_FALSE(id.empty());
  const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
  auto args = [&](Mode mode) { return SessionArgs(id, 1, q, mode, 24); };
  std::atomic<bool> done{false};
  std::atomic<int> answered{0}, failed{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&, t] {
      while (!done.load()) {
        auto out = store_->Select(args(t % 2 == 0 ? Mode::kBound : Mode::kBoundThenExact));
        if (out.ok() || out.status().code() == absl::StatusCode::kFailedPrecondition) {
          ++answered;
        } else {
          ++failed;
          ADD_FAILURE() << out.status();
        }
      }
    });
  }
  // The session grows once the readers run: on a busy machine they may start late, and the
  // appends must not all be over before the first Select (seen on a 2-core VM).
  for (int i = 0; i < 1000 && answered.load() + failed.load() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  for (int step = 0; step < 40; ++step) {
    auto info = sessions_->Info(id);
    ASSERT_TRUE(info.ok());
    InsertAndFill(id, info->length, 3);
  }
  done = true;
  for (std::thread& r : readers) r.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_GT(answered.load(), 0);
  ASSERT_TRUE(store_->Select(args(Mode::kBound)).ok());
  auto fresh = RetrievalStore::Create(cache_.get(), sessions_.get(), RetrievalStore::Options());
  ASSERT_TRUE(fresh.ok());
  ASSERT_TRUE((*fresh)->Select(args(Mode::kBound)).ok());
  const int64_t pages = topk::NumPages(500 + 40 * 3);
  auto kept = store_->CachedSessionPageMeta(id, 1, pages, spec_.kv_heads);
  auto built = (*fresh)->CachedSessionPageMeta(id, 1, pages, spec_.kv_heads);
  ASSERT_TRUE(kept.has_value() && built.has_value());
  EXPECT_TRUE(*kept == *built);
}

// ----------------------------------------------------------------------------------------------
// Errors

TEST_F(RetrievalTest, BadRequestsGetTheRightCodes) {
  std::vector<int32_t> tokens;
  PutRandom(4, &tokens);
  const std::vector<float> q = RandomQueries(4, spec_.head_dim, rng_);
  auto code = [&](const SelectArgs& a) { return store_->Select(a).status().code(); };
  const SelectArgs good = [&] {
    SelectArgs a = PrefixArgs(tokens, q, 4);
    a.k = 8;
    return a;
  }();
  ASSERT_TRUE(store_->Select(good).ok());

  SelectArgs a = good;
  a.source.model = "nope";
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);
  a = good;
  a.source.tokens = Tokens(64);  // nothing cached
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);
  a.source.tokens = std::vector<int32_t>(tokens.begin(), tokens.begin() + 15);  // < one block
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);
  a = good;
  a.source.tenant = "other";
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);
  a = good;
  a.source.session_id = "no-such-session";
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);

  for (int layer : {-1, 3, 100}) {
    a = good;
    a.layer = layer;
    EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument) << layer;
  }
  for (int64_t k : {0, -5}) {
    a = good;
    a.k = k;
    EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument) << k;
  }
  a = good;
  a.n_sink = -1;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.query_heads = 3;  // not a multiple of 2 KV heads
  a.queries = absl::string_view(good.queries.data(), 3 * 64 * 4);
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.query_heads = 0;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.queries = good.queries.substr(4);  // one float short
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.query_dtype = DType::kBF16;  // the bytes of fp32 queries read as bf16: twice as many
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.candidate_tokens = 3;  // < k
  a.mode = Mode::kBoundThenExact;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);

  std::vector<float> nan_q = q;
  nan_q[77] = std::numeric_limits<float>::quiet_NaN();
  a = good;
  a.queries = Bytes(nan_q);
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    a.mode = mode;
    auto s = store_->Select(a).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("NaN"));
  }

  // Gathered K/V over the limit: 2 x 4 rows x 64 tokens x 64 x 2 bytes = 65536 per layer.
  RetrievalStore::Options small;
  small.max_gather_bytes = 65535;
  MakeStore(small);
  a = good;
  a.k = 64;
  a.reduction = GqaReduction::kPerQueryHead;
  EXPECT_TRUE(store_->Select(a).ok());
  a.gather = true;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a.gather = false;
  a.keep = true;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a.reduction = GqaReduction::kMax;  // 2 rows: half the bytes
  EXPECT_TRUE(store_->Select(a).ok());

  // Pre-RoPE blocks cannot be scored against post-RoPE queries.
  std::vector<int32_t> pre = Tokens(16);
  ASSERT_TRUE(Put(pre, RandomBlocks(spec_, 1, rng_), std::nullopt, /*pre_rope=*/true).ok());
  a = good;
  a.source.tokens = pre;
  EXPECT_EQ(code(a), absl::StatusCode::kFailedPrecondition);
}

TEST_F(RetrievalTest, UnsupportedHeadDimIsInvalidArgument) {
  ModelSpec s = spec_;
  s.head_dim = 32;
  s.rope.head_dim = 32;
  ASSERT_TRUE(cache_->RegisterModel(s, "small").ok());
  const std::vector<int32_t> tokens = Tokens(16);
  PutOptions p;
  p.model = "small";
  p.tokens = tokens;
  auto w = cache_->BeginPut(std::move(p));
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE((*w)->Write(RandomBlocks(s, 1, rng_)).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  const std::vector<float> q(2 * 32, 1.0f);
  SelectArgs a;
  a.source.model = "small";
  a.source.tokens = tokens;
  a.query_heads = 2;
  a.queries = Bytes(q);
  a.k = 4;
  const absl::Status st = store_->Select(a).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), ::testing::HasSubstr("head_dim 32"));
}

TEST_F(RetrievalTest, KeptSelectionsExpireAndAreBounded) {
  RetrievalStore::Options o;
  o.selection_ttl = absl::Seconds(5);
  o.max_selections = 2;
  MakeStore(o);
  std::vector<int32_t> tokens;
  PutRandom(3, &tokens);
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.k = 4;
  a.keep = true;
  auto s1 = store_->Select(a);
  ASSERT_TRUE(s1.ok());
  EXPECT_EQ(store_->Gather("sel-nope", 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Gather(s1->selection_id, 3).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Gather(s1->selection_id, -1).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Used at 4 s: alive at 8 s; unused past 5 s: gone.
  now_ += absl::Seconds(4);
  EXPECT_TRUE(store_->Gather(s1->selection_id, 1).ok());
  now_ += absl::Seconds(4);
  EXPECT_TRUE(store_->Gather(s1->selection_id, 1).ok());
  now_ += absl::Seconds(6);
  EXPECT_EQ(store_->Gather(s1->selection_id, 1).status().code(), absl::StatusCode::kNotFound);

  // Bounded: a third selection drops the least recently used.
  auto s2 = store_->Select(a);
  now_ += absl::Seconds(1);
  auto s3 = store_->Select(a);
  now_ += absl::Seconds(1);
  ASSERT_TRUE(s2.ok() && s3.ok());
  EXPECT_TRUE(store_->FindSelection(s2->selection_id).ok());  // s2 now more recent than s3
  now_ += absl::Seconds(1);
  auto s4 = store_->Select(a);
  ASSERT_TRUE(s4.ok());
  EXPECT_EQ(store_->stats().selections, 2u);
  EXPECT_TRUE(store_->FindSelection(s2->selection_id).ok());
  EXPECT_EQ(store_->FindSelection(s3->selection_id).status().code(), absl::StatusCode::kNotFound);
  // Release.
  EXPECT_TRUE(store_->Release(s4->selection_id).ok());
  EXPECT_EQ(store_->Release(s4->selection_id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Gather(s4->selection_id, 0).status().code(), absl::StatusCode::kNotFound);
}

// The cache stays free to evict a kept selection's prefix: Gather then says NOT_FOUND.
TEST_F(RetrievalTest, GatherAfterEvictionIsNotFound) {
  std::vector<int32_t> tokens;
  PutRandom(3, &tokens);
  const std::vector<float> q = RandomQueries(2, spec_.head_dim, rng_);
  SelectArgs a = PrefixArgs(tokens, q, 2);
  a.k = 4;
  a.keep = true;
  auto s = store_->Select(a);
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE(store_->Gather(s->selection_id, 2).ok());
  auto evicted = cache_->Evict("m", tenant_, tokens);
  ASSERT_TRUE(evicted.ok());
  ASSERT_EQ(*evicted, 3u);
  EXPECT_EQ(store_->Gather(s->selection_id, 2).status().code(), absl::StatusCode::kNotFound);
  // Only the first block back: still not the blocks the selection covers.
  ASSERT_TRUE(
      Put(std::vector<int32_t>(tokens.begin(), tokens.begin() + 16), RandomBlocks(spec_, 1, rng_))
          .ok());
  EXPECT_EQ(store_->Gather(s->selection_id, 2).status().code(), absl::StatusCode::kNotFound);
}

TEST(RetrievalStoreCreateTest, RejectsBadOptions) {
  EXPECT_EQ(RetrievalStore::Create(nullptr, nullptr, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto cache = KvCache::Create(KvCache::Options());
  ASSERT_TRUE(cache.ok());
  RetrievalStore::Options o;
  o.max_selections = 0;
  EXPECT_EQ(RetrievalStore::Create(cache->get(), nullptr, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o = RetrievalStore::Options();
  o.selection_ttl = absl::ZeroDuration();
  EXPECT_EQ(RetrievalStore::Create(cache->get(), nullptr, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Without a session store, session sources are FAILED_PRECONDITION.
  auto store = RetrievalStore::Create(cache->get(), nullptr, {});
  ASSERT_TRUE(store.ok());
  SelectArgs a;
  a.source.session_id = "s";
  a.query_heads = 1;
  a.k = 1;
  EXPECT_EQ((*store)->Select(a).status().code(), absl::StatusCode::kFailedPrecondition);
}

// --retrieval_device values, and a store on a device where there is none (the GPU path itself:
// tests/gpu/retrieval_gpu_test.cc).
TEST(RetrievalStoreCreateTest, DeviceOption) {
  EXPECT_EQ(*ResolveRetrievalDevice("cpu", 0), -1);
  EXPECT_EQ(*ResolveRetrievalDevice("gpu", 1), 1);
  EXPECT_EQ(*ResolveRetrievalDevice("auto", 0), RetrievalGpuBuilt() && GpuAvailable() ? 0 : -1);
  EXPECT_EQ(ResolveRetrievalDevice("cuda", 0).status().code(), absl::StatusCode::kInvalidArgument);
  auto cache = KvCache::Create(KvCache::Options());
  ASSERT_TRUE(cache.ok());
  auto cpu = RetrievalStore::Create(cache->get(), nullptr, {});
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ((*cpu)->device(), -1);
  RetrievalStore::Options o;
  o.device = 0;
  auto gpu = RetrievalStore::Create(cache->get(), nullptr, o);
  if (RetrievalGpuBuilt() && GpuAvailable()) {
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ((*gpu)->device(), 0);
  } else {
    EXPECT_EQ(gpu.status().code(), absl::StatusCode::kUnavailable) << gpu.status();
  }
  o.device = 1 << 20;
  EXPECT_FALSE(RetrievalStore::Create(cache->get(), nullptr, o).ok());
}

}  // namespace
}  // namespace ropekv
