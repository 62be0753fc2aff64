// The GPU path of RetrievalStore::Select (Options::device = 0, topk::SelectCuda on copies of the
// keys and page metadata) against the CPU path (device -1, SelectCpu, itself checked against fp64
// in tests/unit/cache/retrieval_test.cc), over the same cache and the same requests: prefixes of
// 16-token blocks (blocked keys and metadata) and of 8-token blocks (pages straddle blocks: dense
// metadata), sessions (dense keys), bf16 and f32 keys, f32 and bf16 queries, the three modes, the
// three GQA reductions, with and without scores and captured mass, rows short enough for one block
// and long enough for the multi-block selection. The indices must be equal (random keys: no ties;
// a near-tie that fp32 vs fp64 accumulation may order differently is accepted only for exact
// scores, where it is checked to be one against an fp64 score computed here), scores within 1e-3
// relative, mass within 1e-4, padding -1 / NaN. Also: RetrievalGpu alone on strided and padded host
// views (vLLM-style [N][heads][d], padded rows) against SelectCpu, its arena reused, and a shape
// the CUDA path lacks falling back to the CPU. Skips itself without a GPU.
#include "cache/retrieval_gpu.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <iostream>
#include <iterator>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/gpu_tier.h"
#include "cache/kv_cache.h"
#include "cache/retrieval.h"
#include "cache/session.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"
#include "tests/unit/cache/block_layout.h"

namespace ropekv {
namespace {

using topk::GqaReduction;
using topk::Mode;

// Keys of one layer as fp64: key(head, token, column).
using KeyFn = std::function<double(int, int64_t, int)>;

std::string ModeName(Mode m) {
  return m == Mode::kExact ? "Exact" : m == Mode::kBound ? "Bound" : "BoundThenExact";
}
std::string ReductionName(GqaReduction r) {
  return r == GqaReduction::kMax ? "Max" : r == GqaReduction::kSum ? "Sum" : "PerQueryHead";
}

// Random bytes of `elems` elements of `dtype`, normal(0, 1) rounded to the dtype.
std::string RandomElems(uint64_t elems, DType dtype, std::mt19937_64& rng) {
  std::string out(elems * DTypeSize(dtype), '\0');
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint64_t i = 0; i < elems; ++i) StoreFromFloat(out.data(), i, dtype, normal(rng));
  return out;
}

using testing::BlockIndex;

KeyFn BlockKeys(const ModelSpec& s, const std::string& blocks, int layer) {
  return [&s, &blocks, layer](int h, int64_t t, int c) {
    return static_cast<double>(
        LoadAsFloat(blocks.data(), BlockIndex(s, layer, 0, h, t, c), s.dtype));
  };
}

// Keys of a layer in range layout [k|v][kv_head][n][head_dim] (SessionReader::WriteLayer).
KeyFn RangeKeys(const ModelSpec& s, const std::string& layer, int64_t n) {
  return [&s, &layer, n](int h, int64_t t, int c) {
    const size_t i = (static_cast<size_t>(h) * n + t) * s.head_dim + c;
    return static_cast<double>(LoadAsFloat(layer.data(), i, s.dtype));
  };
}

// The fp64 score of `token` in row `row`, reduced as the row is.
double RowScore(const SelectArgs& a, const std::string& queries, int kv_heads, int head_dim,
                const KeyFn& key, int64_t row, int64_t token) {
  const int group = a.query_heads / kv_heads;
  auto head = [&](int h) {
    double acc = 0;
    for (int c = 0; c < head_dim; ++c) {
      acc += double{LoadAsFloat(queries.data(), static_cast<size_t>(h) * head_dim + c,
                                a.query_dtype)} *
             key(h / group, token, c);
    }
    return acc;
  };
  if (a.reduction == GqaReduction::kPerQueryHead) return head(static_cast<int>(row));
  double v = a.reduction == GqaReduction::kMax ? -INFINITY : 0.0;
  for (int j = 0; j < group; ++j) {
    const double x = head(static_cast<int>(row) * group + j);
    v = a.reduction == GqaReduction::kMax ? std::max(v, x) : v + x;
  }
  return v;
}

bool SameFloat(float got, float want, double rel) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(double{got} - want) <= rel * std::max(1.0, std::fabs(double{want}));
}

// GPU output vs CPU output of the same request. Returns the rows where a near-tie was accepted.
int ExpectSameSelection(const SelectOutput& gpu, const SelectOutput& cpu, const SelectArgs& a,
                        const std::string& queries, int kv_heads, int head_dim, const KeyFn& key,
                        const std::string& what) {
  EXPECT_EQ(gpu.num_tokens, cpu.num_tokens) << what;
  EXPECT_EQ(gpu.rows, cpu.rows) << what;
  EXPECT_EQ(gpu.capacity, cpu.capacity) << what;
  EXPECT_EQ(gpu.scores.size(), cpu.scores.size()) << what;
  EXPECT_EQ(gpu.mass.size(), cpu.mass.size()) << what;
  if (gpu.rows != cpu.rows || gpu.capacity != cpu.capacity) return 0;
  int ties = 0;
  for (int64_t r = 0; r < cpu.rows; ++r) {
    const std::string row_what = absl::StrCat(what, " row ", r);
    const int32_t* gi = gpu.indices.data() + r * gpu.capacity;
    const int32_t* ci = cpu.indices.data() + r * cpu.capacity;
    // Padding of the GPU's output (the device arena is not cleared between calls).
    for (int64_t j = gpu.counts[r]; j < gpu.capacity; ++j) {
      EXPECT_EQ(gi[j], -1) << row_what << " slot " << j;
      if (!gpu.scores.empty()) {
        EXPECT_TRUE(std::isnan(gpu.scores[r * gpu.capacity + j])) << row_what << " slot " << j;
      }
    }
    const bool same = gpu.counts[r] == cpu.counts[r] && std::equal(ci, ci + cpu.counts[r], gi);
    if (!same) {
      // Accepted only as a near-tie of exact scores: every token in one selection and not the
      // other has (nearly) the same fp64 score.
      std::set<int32_t> g(gi, gi + gpu.counts[r]), c(ci, ci + cpu.counts[r]);
      std::vector<int32_t> diff;
      std::set_symmetric_difference(g.begin(), g.end(), c.begin(), c.end(),
                                    std::back_inserter(diff));
      double lo = INFINITY, hi = -INFINITY;
      std::string listed;
      for (int32_t t : diff) {
        const double s = RowScore(a, queries, kv_heads, head_dim, key, r, t);
        lo = std::min(lo, s);
        hi = std::max(hi, s);
        absl::StrAppend(&listed, " ", t, (g.count(t) ? "(gpu)" : "(cpu)"), "=", s);
      }
      const bool near_tie = a.mode != Mode::kBound && gpu.counts[r] == cpu.counts[r] &&
                            hi - lo <= 1e-4 * std::max(1.0, std::fabs(hi));
      EXPECT_TRUE(near_tie) << row_what << ": selections differ:" << listed;
      if (!near_tie) return ties;
      ++ties;
      continue;
    }
    for (int64_t j = 0; j < cpu.counts[r] && !cpu.scores.empty(); ++j) {
      const float want = cpu.scores[r * cpu.capacity + j];
      const float got = gpu.scores[r * gpu.capacity + j];
      EXPECT_TRUE(SameFloat(got, want, 1e-3))
          << row_what << " score of token " << ci[j] << ": gpu " << got << " cpu " << want;
    }
    if (!cpu.mass.empty()) {
      EXPECT_NEAR(gpu.mass[r], cpu.mass[r], 1e-4) << row_what << " mass";
    }
  }
  return ties;
}

class RetrievalGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  }

  void Init(int block_tokens, DType dtype, int head_dim = 128, int kv_heads = 4,
            SessionDevice session_device = SessionDevice::kCpu,
            uint64_t gpu_metadata_capacity = 1ull << 30, uint32_t gpu_tier_blocks = 0) {
    gpu_.reset();  // before their cache goes
    cpu_.reset();
    sessions_.reset();
    spec_ = ModelSpec();
    spec_.layers = 2;
    spec_.kv_heads = kv_heads;
    spec_.head_dim = head_dim;
    spec_.dtype = dtype;
    spec_.block_tokens = block_tokens;
    spec_.rope.head_dim = head_dim;
    spec_.rope.theta = 500000;
    KvCache::Options o;
    o.background_maintenance = false;
    o.host_capacity_bytes = 1ull << 30;
    if (gpu_tier_blocks > 0) {
      // Puts land in a GPU tier of that many block slots on device 0 too (pageable host tier).
      GpuTier::Options g;
      g.chunk_bytes = SlotAllocator::SlotSize(BlockBytes(spec_));  // a block a chunk
      g.capacity_bytes = g.chunk_bytes * gpu_tier_blocks;
      auto tier = GpuTier::Create(g);
      ASSERT_TRUE(tier.ok()) << tier.status();
      o.gpu = *std::move(tier);
      o.policy.write_tier = WriteTier::kGpu;
    }
    auto cache = KvCache::Create(std::move(o));
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    auto reg = cache_->RegisterModel(spec_, "m");
    ASSERT_TRUE(reg.ok()) << reg.status();
    SessionStore::Options so;
    so.device = session_device;
    auto sessions = SessionStore::Create(cache_.get(), so);
    ASSERT_TRUE(sessions.ok()) << sessions.status();
    sessions_ = *std::move(sessions);
    RetrievalStore::Options co;
    auto cpu = RetrievalStore::Create(cache_.get(), sessions_.get(), co);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    cpu_ = *std::move(cpu);
    RetrievalStore::Options go;
    go.device = 0;
    go.gpu_metadata_capacity_bytes = gpu_metadata_capacity;
    auto gpu = RetrievalStore::Create(cache_.get(), sessions_.get(), go);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = *std::move(gpu);
    ASSERT_EQ(cpu_->device(), -1);
    ASSERT_EQ(gpu_->device(), 0);
  }

  std::vector<int32_t> Tokens(int64_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng_() % 50000);
    return t;
  }

  // Puts `blocks` random blocks; returns their bytes, tokens in *tokens.
  std::string PutRandom(int64_t blocks, std::vector<int32_t>* tokens) {
    *tokens = Tokens(blocks * spec_.block_tokens);
    std::string kv =
        RandomElems(BlockBytes(spec_) / DTypeSize(spec_.dtype) * blocks, spec_.dtype, rng_);
    PutOptions p;
    p.model = "m";
    p.tenant = "t";
    p.tokens = *tokens;
    auto w = cache_->BeginPut(std::move(p));
    EXPECT_TRUE(w.ok()) << w.status();
    if (!w.ok()) return kv;
    EXPECT_TRUE((*w)->Write(kv).ok());
    EXPECT_TRUE((*w)->Finish().ok());
    return kv;
  }

  // Opens a session of `n` random tokens with random KV; returns its id.
  std::string OpenRandomSession(int64_t n) {
    OpenSessionArgs open;
    open.model = "m";
    open.tokens = Tokens(n);
    const int64_t blocks = (n + spec_.block_tokens - 1) / spec_.block_tokens;
    const std::string kv =
        RandomElems(BlockBytes(spec_) / DTypeSize(spec_.dtype) * blocks, spec_.dtype, rng_);
    auto opened = sessions_->Open(open, kv);
    EXPECT_TRUE(opened.ok()) << opened.status();
    return opened.ok() ? opened->id : std::string();
  }

  // Inserts n tokens at `at` into session `id` and fills them with random KV.
  void InsertAndFill(const std::string& id, int64_t at, int64_t n) {
    ASSERT_TRUE(sessions_->Edit(id, {EditOp::Insert(at, Tokens(n))}).ok());
    FillArgs fill;
    fill.range = TokenRange{at, at + n};
    const std::string kv =
        RandomElems(RangeBytes(spec_, n) / DTypeSize(spec_.dtype), spec_.dtype, rng_);
    ASSERT_TRUE(sessions_->Fill(id, fill, kv).ok());
  }

  // One layer of session `id` as the reader writes it (K then V); its tokens in *n.
  std::string SessionLayer(const std::string& id, int layer, int64_t* n) {
    auto reader = sessions_->Read(id, std::nullopt);
    EXPECT_TRUE(reader.ok()) << reader.status();
    if (!reader.ok()) return "";
    *n = reader->range().size();
    std::string out(reader->layer_bytes(), '\0');
    EXPECT_TRUE(reader->WriteLayer(layer, out.data()).ok());
    return out;
  }

  // A Select of k tokens over layer 1 of session `id` with 8 query heads (mode and queries the
  // caller's).
  static SelectArgs SessionArgs(const std::string& id, int64_t k) {
    SelectArgs a;
    a.source.session_id = id;
    a.layer = 1;
    a.query_heads = 8;
    a.k = k;
    return a;
  }

  // A Select over the prefix PutRandom stored for `tokens`.
  static SelectArgs PrefixArgs(const std::vector<int32_t>& tokens) {
    SelectArgs a;
    a.source.model = "m";
    a.source.tenant = "t";
    a.source.tokens = tokens;
    return a;
  }

  // The same at layer 1 with 8 query heads, k tokens, 2 sink and 16 local ones.
  static SelectArgs PrefixArgs(const std::vector<int32_t>& tokens, int64_t k) {
    SelectArgs a = PrefixArgs(tokens);
    a.layer = 1;
    a.query_heads = 8;
    a.k = k;
    a.n_sink = 2;
    a.n_local = 16;
    return a;
  }

  // Runs `a` on both stores; checks GPU == CPU. Counts the GPU selects.
  void Compare(const SelectArgs& a, const std::string& queries, const KeyFn& key,
               const std::string& what) {
    const uint64_t gpu_before = gpu_->stats().gpu_selects;
    auto cpu = cpu_->Select(a);
    auto gpu = gpu_->Select(a);
    ASSERT_TRUE(cpu.ok()) << what << ": " << cpu.status();
    ASSERT_TRUE(gpu.ok()) << what << ": " << gpu.status();
    EXPECT_EQ(gpu_->stats().gpu_selects, gpu_before + 1) << what;
    ties_ += ExpectSameSelection(*gpu, *cpu, a, queries, spec_.kv_heads, spec_.head_dim, key, what);
    ++compared_;
  }

  void TearDown() override {
    if (compared_ > 0) {
      std::cout << "[ compared " << compared_ << " selections; near-ties accepted in " << ties_
                << " rows ]\n";
    }
    if (cpu_ != nullptr) {
      EXPECT_EQ(cpu_->stats().gpu_selects, 0u);
    }
    if (gpu_ != nullptr) {
      EXPECT_EQ(gpu_->stats().gpu_fallbacks, expected_fallbacks_);
    }
  }

  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<SessionStore> sessions_;
  std::unique_ptr<RetrievalStore> cpu_;
  std::unique_ptr<RetrievalStore> gpu_;
  std::mt19937_64 rng_{0x6e1ec7};
  int compared_ = 0;
  int ties_ = 0;
  uint64_t expected_fallbacks_ = 0;
};

// The request grid over one source: modes x reductions x (outputs) x query dtype.
void RunGrid(const SelectArgs& base, int head_dim, const KeyFn& key, std::mt19937_64& rng,
             const std::function<void(const SelectArgs&, const std::string&, const KeyFn&,
                                      const std::string&)>& compare) {
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
      for (int outputs = 0; outputs < 2; ++outputs) {
        for (DType qt : {DType::kF32, DType::kBF16}) {
          if (qt == DType::kBF16 && outputs == 1) continue;
          SelectArgs a = base;
          a.mode = mode;
          a.reduction = red;
          a.want_scores = outputs == 1;
          a.want_mass = outputs == 1;
          a.query_dtype = qt;
          const std::string q =
              RandomElems(static_cast<uint64_t>(a.query_heads) * head_dim, qt, rng);
          a.queries = q;
          compare(a, q, key,
                  absl::StrCat(ModeName(mode), "/", ReductionName(red), "/",
                               outputs ? "scores+mass" : "indices", "/q ", DTypeName(qt)));
        }
      }
    }
  }
}

using GridParam = std::tuple<int, DType>;  // block_tokens, dtype

class RetrievalGpuGridTest : public RetrievalGpuTest,
                             public ::testing::WithParamInterface<GridParam> {};

TEST_P(RetrievalGpuGridTest, PrefixGpuEqualsCpu) {
  Init(std::get<0>(GetParam()), std::get<1>(GetParam()));
  const int64_t n = 992;  // 62 pages
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(n / spec_.block_tokens, &tokens);
  SelectArgs base = PrefixArgs(tokens);
  base.query_heads = 16;  // 4 per KV head
  base.k = 64;
  base.n_sink = 4;
  base.n_local = 16;
  for (int layer : {0, 1}) {
    base.layer = layer;
    RunGrid(
        base, spec_.head_dim, BlockKeys(spec_, kv, layer), rng_,
        [&](const SelectArgs& a, const std::string& q, const KeyFn& key, const std::string& what) {
          Compare(a, q, key, absl::StrCat("layer ", layer, " ", what));
        });
  }
  EXPECT_GT(gpu_->stats().gpu_selects, 0u);
}

INSTANTIATE_TEST_SUITE_P(BlocksDtypes, RetrievalGpuGridTest,
                         ::testing::Combine(::testing::Values(16, 8),
                                            ::testing::Values(DType::kBF16, DType::kF32)),
                         [](const ::testing::TestParamInfo<GridParam>& info) {
                           return absl::StrCat("Block", std::get<0>(info.param), "_",
                                               DTypeName(std::get<1>(info.param)));
                         });

TEST_F(RetrievalGpuTest, SessionGpuEqualsCpu) {
  Init(16, DType::kBF16, /*head_dim=*/64, /*kv_heads=*/2);
  const int64_t n = 40 * 16 + 5;  // a partial last page
  const std::string id = OpenRandomSession(n);
  ASSERT_FALSE(id.empty());
  int64_t m = 0;
  const std::string layer = SessionLayer(id, 1, &m);
  ASSERT_EQ(m, n);
  SelectArgs base = SessionArgs(id, 40);
  base.n_sink = 1;
  base.n_local = 7;
  RunGrid(base, spec_.head_dim, RangeKeys(spec_, layer, n), rng_,
          [&](const SelectArgs& a, const std::string& q, const KeyFn& key,
              const std::string& what) { Compare(a, q, key, "session " + what); });
}

// A session in GPU memory: every mode selects over its keys where they are
// (SessionReader::LayerOnDevice, no host copy), after an edit that moved keys; gathers go through
// the host.
TEST_F(RetrievalGpuTest, DeviceSessionSelectsOverItsKeysInPlace) {
  Init(16, DType::kBF16, /*head_dim=*/128, /*kv_heads=*/2, SessionDevice::kGpu);
  const std::string id = OpenRandomSession(30 * 16 + 9);
  ASSERT_FALSE(id.empty());
  // Delete 5 tokens at 40: every later key moves (re-rotated on the device).
  ASSERT_TRUE(sessions_->Edit(id, {EditOp::Delete(40, 45)}).ok());
  auto reader = sessions_->Read(id, std::nullopt);
  ASSERT_TRUE(reader.ok()) << reader.status();
  ASSERT_TRUE(reader->on_gpu());
  int64_t m = 0;
  const std::string layer = SessionLayer(id, 1, &m);
  SelectArgs base = SessionArgs(id, 50);
  base.n_sink = 2;
  base.n_local = 6;
  base.gather = true;
  RunGrid(
      base, spec_.head_dim, RangeKeys(spec_, layer, m), rng_,
      [&](const SelectArgs& a, const std::string& q, const KeyFn& key, const std::string& what) {
        auto gpu_out = gpu_->Select(a);
        ASSERT_TRUE(gpu_out.ok()) << gpu_out.status();
        Compare(a, q, key, "device session " + what);
        // The gathered K/V are the host session's layer at the selected tokens.
        const SelectOutput& o = *gpu_out;
        const size_t row = spec_.head_dim * DTypeSize(spec_.dtype);
        const size_t half = o.rows * o.capacity * row;
        ASSERT_EQ(o.gathered.size(), 2 * half);
        const int64_t group = o.rows / spec_.kv_heads;
        for (int64_t r = 0; r < o.rows; ++r) {
          for (int64_t j = 0; j < o.counts[r]; ++j) {
            const int64_t t = o.indices[r * o.capacity + j];
            for (int kv = 0; kv < 2; ++kv) {
              const char* want = layer.data() + ((kv * spec_.kv_heads + r / group) * m + t) * row;
              const char* got = o.gathered.data() + kv * half + (r * o.capacity + j) * row;
              ASSERT_EQ(0, std::memcmp(want, got, row))
                  << what << ": row " << r << " entry " << j << (kv ? " value" : " key");
            }
          }
        }
      });
}

// A GPU session's page metadata: built on the device when many pages change (opening, an insert
// near the start), from the changed pages read alone when few do (an append); the same bytes as
// the CPU store builds, and the same BOUND selections.
// A NaN key in a GPU session: its page metadata, built on the device (64 pages or more) or on the
// host, is refused with INVALID_ARGUMENT on both paths, as BuildPageMetaCpu refuses it.
TEST_F(RetrievalGpuTest, NanKeyInADeviceSessionIsRefusedOnBothPaths) {
  Init(16, DType::kBF16, /*head_dim=*/128, /*kv_heads=*/2, SessionDevice::kGpu);
  const int64_t n = 100 * 16;
  OpenSessionArgs open;
  open.model = "m";
  open.tokens = Tokens(n);
  std::string kv = RandomElems(BlockBytes(spec_) / DTypeSize(spec_.dtype) * 100, spec_.dtype, rng_);
  // Block 37, layer 1, K, kv head 1, its token 5, column 9: [layer][k|v][kv_head][token][d].
  const uint64_t elem = (((1 * 2 + 0) * 2 + 1) * 16 + 5) * 128 + 9;
  const uint16_t nan = 0x7fc0;
  std::memcpy(&kv[37 * BlockBytes(spec_) + elem * 2], &nan, 2);
  auto opened = sessions_->Open(open, kv);
  ASSERT_TRUE(opened.ok()) << opened.status();
  SelectArgs a = SessionArgs(opened->id, 64);
  a.mode = Mode::kBound;
  const std::string q = RandomElems(8 * spec_.head_dim, DType::kF32, rng_);
  a.queries = q;
  EXPECT_EQ(cpu_->Select(a).status().code(), absl::StatusCode::kInvalidArgument);
  const absl::Status gpu = gpu_->Select(a).status();
  EXPECT_EQ(gpu.code(), absl::StatusCode::kInvalidArgument) << gpu;
  EXPECT_EQ(gpu_->stats().gpu_fallbacks, 0u);
  // Layer 0 has no NaN: both answer.
  a.layer = 0;
  ASSERT_TRUE(cpu_->Select(a).ok());
  ASSERT_TRUE(gpu_->Select(a).ok());
}

TEST_F(RetrievalGpuTest, DeviceSessionMetadataEqualsTheCpus) {
  Init(16, DType::kBF16, /*head_dim=*/128, /*kv_heads=*/2, SessionDevice::kGpu);
  const std::string id = OpenRandomSession(200 * 16 + 5);  // 201 pages
  ASSERT_FALSE(id.empty());
  auto bound = [&](const std::string& what) {
    int64_t m = 0;
    const std::string layer = SessionLayer(id, 1, &m);
    SelectArgs a = SessionArgs(id, 64);
    a.mode = Mode::kBound;
    a.query_dtype = DType::kF32;
    const std::string q = RandomElems(8 * spec_.head_dim, DType::kF32, rng_);
    a.queries = q;
    Compare(a, q, RangeKeys(spec_, layer, m), what);
    const int64_t pages = topk::NumPages(m);
    auto cpu_meta = cpu_->CachedSessionPageMeta(id, 1, pages, spec_.kv_heads);
    auto gpu_meta = gpu_->CachedSessionPageMeta(id, 1, pages, spec_.kv_heads);
    ASSERT_TRUE(cpu_meta.has_value() && gpu_meta.has_value()) << what;
    EXPECT_TRUE(*cpu_meta == *gpu_meta) << what << ": page metadata differs";
  };
  bound("opened");
  EXPECT_EQ(gpu_->stats().metadata_session_pages_built, 201u);  // on the device
  // The device keeps its copy of the metadata: a repeated Select copies no page.
  EXPECT_EQ(gpu_->stats().gpu_metadata_pages_uploaded, 201u);
  bound("again");
  EXPECT_EQ(gpu_->stats().gpu_metadata_pages_uploaded, 201u);
  EXPECT_GT(gpu_->stats().gpu_metadata_bytes, 0u);
  // An insert at 20: every page from the second (tokens 16-31) on changes.
  InsertAndFill(id, 20, 1);
  bound("after an insert at 20");
  EXPECT_EQ(cpu_->stats().metadata_session_pages_built, 201u + 200u);
  EXPECT_EQ(gpu_->stats().metadata_session_pages_built, 201u + 201u);  // the layer, on the device
  EXPECT_EQ(gpu_->stats().gpu_metadata_pages_uploaded, 201u + 200u);   // page 0 kept its name
  auto info = sessions_->Info(id);
  ASSERT_TRUE(info.ok());
  InsertAndFill(id, info->length, 1);  // an append: the last page alone
  bound("after an append");
  EXPECT_EQ(cpu_->stats().metadata_session_pages_built, 201u + 200u + 1u);
  EXPECT_EQ(gpu_->stats().metadata_session_pages_built, 201u + 201u + 1u);
  EXPECT_EQ(gpu_->stats().gpu_metadata_pages_uploaded, 201u + 200u + 1u);
}

// A GPU session selected over from four threads on the GPU path while it grows: every Select
// answers, and the metadata kept at the end (on the host and, copied, on the device) equals the
// CPU store's.
TEST_F(RetrievalGpuTest, ConcurrentDeviceSessionSelectsWhileAppending) {
  Init(16, DType::kBF16, /*head_dim=*/128, /*kv_heads=*/2, SessionDevice::kGpu);
  const std::string id = OpenRandomSession(100 * 16);
  ASSERT_FALSE(id.empty());
  const std::string q = RandomElems(8 * spec_.head_dim, DType::kF32, rng_);
  auto args = [&](Mode mode) {
    SelectArgs a = SessionArgs(id, 64);
    a.mode = mode;
    a.query_dtype = DType::kF32;
    a.queries = q;
    return a;
  };
  std::atomic<bool> done{false};
  std::atomic<int> failed{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&, t] {
      while (!done.load()) {
        auto out = gpu_->Select(args(t % 2 == 0 ? Mode::kBound : Mode::kBoundThenExact));
        if (!out.ok() && out.status().code() != absl::StatusCode::kFailedPrecondition) {
          ++failed;
          ADD_FAILURE() << out.status();
        }
      }
    });
  }
  for (int step = 0; step < 30; ++step) {
    auto info = sessions_->Info(id);
    ASSERT_TRUE(info.ok());
    InsertAndFill(id, info->length, 2);
  }
  done = true;
  for (std::thread& r : readers) r.join();
  EXPECT_EQ(failed.load(), 0);
  int64_t m = 0;
  const std::string layer = SessionLayer(id, 1, &m);
  Compare(args(Mode::kBound), q, RangeKeys(spec_, layer, m), "after the appends");
  const int64_t pages = topk::NumPages(m);
  auto cpu_meta = cpu_->CachedSessionPageMeta(id, 1, pages, spec_.kv_heads);
  auto gpu_meta = gpu_->CachedSessionPageMeta(id, 1, pages, spec_.kv_heads);
  ASSERT_TRUE(cpu_meta.has_value() && gpu_meta.has_value());
  EXPECT_TRUE(*cpu_meta == *gpu_meta);
}

// Prefix metadata on the device: copied once, then only blocks whose entry changed; with no room
// for it (capacity 0) copied for every Select, the selections the same.
TEST_F(RetrievalGpuTest, PrefixMetadataStaysOnTheDevice) {
  for (uint64_t capacity : {uint64_t{1} << 30, uint64_t{0}}) {
    Init(16, DType::kBF16, /*head_dim=*/128, /*kv_heads=*/4, SessionDevice::kCpu, capacity);
    std::vector<int32_t> tokens;
    const std::string kv = PutRandom(300, &tokens);
    SelectArgs a = PrefixArgs(tokens, 64);
    const std::string what = absl::StrCat("capacity ", capacity);
    for (int rep = 0; rep < 3; ++rep) {
      for (Mode mode : {Mode::kBound, Mode::kBoundThenExact}) {
        a.mode = mode;
        const std::string q = RandomElems(8 * 128, DType::kF32, rng_);
        a.queries = q;
        Compare(a, q, BlockKeys(spec_, kv, 1), absl::StrCat(what, " ", ModeName(mode)));
      }
    }
    const RetrievalStore::Stats st = gpu_->stats();
    EXPECT_EQ(st.gpu_metadata_pages_uploaded, capacity > 0 ? 300u : 0u) << what;
    EXPECT_EQ(st.gpu_metadata_bytes > 0, capacity > 0) << what;
  }
}

// A prefix whose every block has a copy in the GPU tier (on the store's device) is selected over
// where it is: only the block pointers go to the device. Where a block has no GPU copy, the keys
// are copied as before. The selections equal the CPU's either way.
TEST_F(RetrievalGpuTest, PrefixInTheGpuTierIsReadThere) {
  Init(16, DType::kBF16, 128, 4, SessionDevice::kCpu, 1ull << 30, /*gpu_tier_blocks=*/48);
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(40, &tokens);
  ASSERT_EQ(cache_->Stats().tiers[1].tier, TierKind::kGpu);
  ASSERT_EQ(cache_->Stats().tiers[1].blocks, 40u);
  const SelectArgs base = PrefixArgs(tokens, 100);
  const KeyFn key = BlockKeys(spec_, kv, 1);
  uint64_t reads = 0, in_place = gpu_->stats().gpu_keys_in_place;
  RunGrid(base, spec_.head_dim, key, rng_,
          [&](const SelectArgs& a, const std::string& q, const KeyFn& k, const std::string& what) {
            Compare(a, q, k, what);
            // Page modes read keys for BOUND_THEN_EXACT, or for scores and mass.
            if (topk::SelectReadsKeys(a.mode, a.want_scores, a.want_mass)) ++reads;
            EXPECT_EQ(gpu_->stats().gpu_keys_in_place - in_place, reads) << what;
          });
  EXPECT_GT(reads, 0u);

  // A longer prompt of 56 blocks, in a GPU tier of 48 slots: copied, not read in place.
  const std::vector<int32_t> more = Tokens(16 * spec_.block_tokens);
  const std::string kv_more =
      RandomElems(BlockBytes(spec_) / DTypeSize(spec_.dtype) * 16, spec_.dtype, rng_);
  std::vector<int32_t> longer = tokens;
  longer.insert(longer.end(), more.begin(), more.end());
  {
    PutOptions p;
    p.model = "m";
    p.tenant = "t";
    p.tokens = more;
    p.parent = cache_->Lookup("m", "t", tokens)->blocks.back().hash;
    auto w = cache_->BeginPut(std::move(p));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Write(kv_more).ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }
  {
    auto held = cache_->AcquirePrefix("m", "t", longer, 0);
    ASSERT_TRUE(held.ok());
    ASSERT_EQ(held->blocks().size(), 56u);
    int on_gpu = 0;
    for (size_t b = 0; b < 56; ++b) on_gpu += held->device_bytes(b) != nullptr;
    EXPECT_EQ(on_gpu, 48);
  }
  SelectArgs a = PrefixArgs(longer);
  a.layer = 0;
  a.query_heads = 8;
  a.k = 64;
  a.mode = Mode::kExact;
  const std::string q = RandomElems(8 * 128, DType::kF32, rng_);
  a.queries = q;
  const uint64_t before = gpu_->stats().gpu_keys_in_place;
  std::string all_kv = kv;
  all_kv += kv_more;
  Compare(a, q, BlockKeys(spec_, all_kv, 0), "longer, partly in the GPU tier");
  EXPECT_EQ(gpu_->stats().gpu_keys_in_place, before);
}

// Rows longer than one block's shared memory (the multi-block selection), gather and keep.
TEST_F(RetrievalGpuTest, LongPrefixGpuEqualsCpu) {
  Init(16, DType::kBF16);
  const int64_t n = 20480;
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(n / spec_.block_tokens, &tokens);
  SelectArgs a = PrefixArgs(tokens);
  a.layer = 1;
  a.query_heads = 16;
  a.k = 256;
  a.n_sink = 4;
  a.n_local = 64;
  const std::string q = RandomElems(16 * 128, DType::kF32, rng_);
  a.queries = q;
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kPerQueryHead}) {
      a.mode = mode;
      a.reduction = red;
      a.want_scores = true;
      a.want_mass = mode == Mode::kExact;
      Compare(a, q, BlockKeys(spec_, kv, 1),
              absl::StrCat("N 20480 ", ModeName(mode), "/", ReductionName(red)));
    }
  }
  // Gather and keep stay on the CPU, over the GPU's selection.
  a.mode = Mode::kExact;
  a.reduction = GqaReduction::kMax;
  a.gather = true;
  a.keep = true;
  auto cpu = cpu_->Select(a);
  auto gpu = gpu_->Select(a);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  if (gpu->indices == cpu->indices) {
    EXPECT_EQ(gpu->gathered, cpu->gathered);
    auto g0 = gpu_->Gather(gpu->selection_id, 0);
    auto c0 = cpu_->Gather(cpu->selection_id, 0);
    ASSERT_TRUE(g0.ok()) << g0.status();
    ASSERT_TRUE(c0.ok()) << c0.status();
    EXPECT_EQ(*g0, *c0);
  }
}

// A group too large for the CUDA path's reductions (SelectCuda: INVALID_ARGUMENT) runs SelectCpu.
TEST_F(RetrievalGpuTest, ShapeWithoutCudaPathFallsBackToCpu) {
  Init(16, DType::kBF16, /*head_dim=*/128, /*kv_heads=*/1);
  std::vector<int32_t> tokens;
  const std::string kv = PutRandom(4, &tokens);
  SelectArgs a = PrefixArgs(tokens);
  a.query_heads = 512;
  a.k = 8;
  a.mode = Mode::kExact;
  a.reduction = GqaReduction::kMax;
  const std::string q = RandomElems(512 * 128, DType::kF32, rng_);
  a.queries = q;
  auto cpu = cpu_->Select(a);
  auto gpu = gpu_->Select(a);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  EXPECT_EQ(gpu->indices, cpu->indices);
  EXPECT_EQ(gpu->counts, cpu->counts);
  EXPECT_EQ(gpu_->stats().gpu_selects, 0u);
  expected_fallbacks_ = 1;
}

// NaN queries are INVALID_ARGUMENT before anything runs, on both paths.
TEST_F(RetrievalGpuTest, NanQueriesRejectedOnBothPaths) {
  Init(16, DType::kBF16);
  std::vector<int32_t> tokens;
  PutRandom(4, &tokens);
  SelectArgs a = PrefixArgs(tokens);
  a.query_heads = 4;
  a.k = 8;
  std::vector<float> q(4 * 128, 0.5f);
  q[130] = NAN;
  a.queries = absl::string_view(reinterpret_cast<const char*>(q.data()), q.size() * 4);
  EXPECT_EQ(gpu_->Select(a).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cpu_->Select(a).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu_->stats().gpu_selects, 0u);
}

// ----------------------------------------------------------------------------------------------
// The store's batch (Prepare on several threads, one Run): prefixes of two lengths and a session,
// the three modes, named metadata shared by two items, keep; each answer equals the CPU store's
// Select, and the batch counts as that many GPU selects.
TEST_F(RetrievalGpuTest, StoreBatchEqualsSelectsOneByOne) {
  Init(16, DType::kBF16, 128, 4);
  std::vector<int32_t> short_tokens, long_tokens;
  const std::string short_kv = PutRandom(20, &short_tokens);
  const std::string long_kv = PutRandom(90, &long_tokens);
  const std::string id = OpenRandomSession(16 * 33 + 9);
  ASSERT_FALSE(id.empty());
  int64_t m = 0;
  const std::string layer = SessionLayer(id, 1, &m);

  std::vector<SelectArgs> args;
  std::vector<std::string> queries;
  std::vector<KeyFn> keys;
  const Mode modes[] = {Mode::kExact, Mode::kBound, Mode::kBoundThenExact};
  for (int i = 0; i < 12; ++i) {
    SelectArgs a =
        i % 3 == 2 ? SessionArgs(id, 40) : PrefixArgs(i % 3 == 0 ? short_tokens : long_tokens, 64);
    a.layer = 1;
    a.query_heads = 8;
    a.mode = modes[(i / 3) % 3];
    a.reduction = static_cast<GqaReduction>((i + i / 3) % 3);
    a.want_scores = i % 2 == 0;
    a.want_mass = i % 4 == 1;
    a.keep = i == 5;
    a.n_sink = 1;
    a.n_local = 7;
    queries.push_back(RandomElems(8 * 128, DType::kF32, rng_));
    keys.push_back(i % 3 == 2 ? RangeKeys(spec_, layer, m)
                              : BlockKeys(spec_, i % 3 == 0 ? short_kv : long_kv, 1));
    args.push_back(std::move(a));
  }
  for (size_t i = 0; i < args.size(); ++i) args[i].queries = queries[i];

  std::vector<std::shared_ptr<RetrievalStore::PreparedSelect>> prepared(args.size());
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < args.size(); i += 3) {
        auto p = gpu_->Prepare(args[i]);
        ASSERT_TRUE(p.ok()) << p.status();
        prepared[i] = *std::move(p);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const uint64_t before = gpu_->stats().gpu_selects;
  std::vector<absl::StatusOr<SelectOutput>> outs = gpu_->Run(prepared);
  EXPECT_EQ(gpu_->stats().gpu_selects - before, args.size());
  ASSERT_EQ(outs.size(), args.size());
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string what = absl::StrCat("item ", i, " ", ModeName(args[i].mode), " ",
                                          ReductionName(args[i].reduction));
    ASSERT_TRUE(outs[i].ok()) << what << ": " << outs[i].status();
    SelectArgs alone = args[i];
    alone.keep = false;
    auto cpu = cpu_->Select(alone);
    ASSERT_TRUE(cpu.ok()) << what << ": " << cpu.status();
    ties_ += ExpectSameSelection(*outs[i], *cpu, args[i], queries[i], spec_.kv_heads,
                                 spec_.head_dim, keys[i], what);
    ++compared_;
    EXPECT_EQ(outs[i]->selection_id.empty(), i != 5) << what;
  }
  // A source that is not there fails in Prepare, before any GPU work.
  SelectArgs missing = args[0];
  missing.source.model = "nope";
  EXPECT_EQ(gpu_->Prepare(missing).status().code(), absl::StatusCode::kNotFound);
}

// RetrievalGpu alone: host views of every form are packed as SelectCpu reads them.

struct HostRequest {
  std::string keys, meta, queries;
  std::vector<std::string> key_blocks_bytes, meta_blocks_bytes;
  std::vector<const void*> key_blocks, meta_blocks;
  std::vector<void*> pinned;  // cudaHostAlloc'd key blocks (layout 2)
  topk::SelectRequest req;
  ~HostRequest() {
    for (void* p : pinned) cudaFreeHost(p);
  }
};

// Selection over `n` tokens of `heads` KV heads (d = 128, bf16) in a given key layout:
// 0 = vLLM-style [N][heads][d] (rows not packed), 1 = blocks of 48 tokens with padded rows
// (row_stride d + 8) and a partial last block, 2 = the same blocks in pinned memory (read in
// place by the device); page metadata dense with padded rows.
void MakeHostRequest(int layout, int heads, int64_t n, std::mt19937_64& rng, HostRequest* h) {
  const int d = 128;
  const DType dt = DType::kBF16;
  const size_t es = DTypeSize(dt);
  topk::SelectRequest& r = h->req;
  r.kv_heads = heads;
  r.query_heads = heads * 2;
  r.head_dim = d;
  r.num_tokens = n;
  r.query_dtype = DType::kF32;
  h->queries = RandomElems(static_cast<uint64_t>(r.query_heads) * d, DType::kF32, rng);
  r.queries = h->queries.data();
  if (layout == 0) {
    h->keys = RandomElems(static_cast<uint64_t>(n) * heads * d, dt, rng);
    r.keys.dtype = dt;
    r.keys.base = h->keys.data();
    r.keys.head_stride = d;
    r.keys.row_stride = static_cast<int64_t>(heads) * d;
  } else {
    const int64_t bt = 48;
    const int64_t stride = d + 8;
    const int64_t blocks = (n + bt - 1) / bt;
    for (int64_t b = 0; b < blocks; ++b) {
      h->key_blocks_bytes.push_back(
          RandomElems(static_cast<uint64_t>(heads) * bt * stride, dt, rng));
    }
    for (const std::string& s : h->key_blocks_bytes) {
      if (layout == 2) {
        void* p = nullptr;
        ASSERT_EQ(cudaHostAlloc(&p, s.size(), cudaHostAllocDefault), cudaSuccess);
        std::memcpy(p, s.data(), s.size());
        h->pinned.push_back(p);
        h->key_blocks.push_back(p);
      } else {
        h->key_blocks.push_back(s.data());
      }
    }
    r.keys.dtype = dt;
    r.keys.blocks = h->key_blocks.data();
    r.keys.rows_per_block = bt;
    r.keys.head_stride = bt * stride;
    r.keys.row_stride = stride;
  }
  // Page metadata built from the keys (dense), then copied into padded rows.
  const int64_t pages = topk::NumPages(n);
  std::string dense(static_cast<size_t>(heads) * pages * 2 * d * es, '\0');
  ASSERT_TRUE(topk::BuildPageMetaCpu(r.keys, topk::PageMetaShape{heads, d, n},
                                     topk::DenseMatrix<void*>(dense.data(), dt, pages, 2 * d))
                  .ok());
  const int64_t mstride = 2 * d + 16;
  h->meta.assign(static_cast<size_t>(heads) * pages * mstride * es, '\x7f');
  for (int64_t row = 0; row < heads * pages; ++row) {
    std::memcpy(h->meta.data() + row * mstride * es, dense.data() + row * 2 * d * es, 2 * d * es);
  }
  r.page_meta.dtype = dt;
  r.page_meta.base = h->meta.data();
  r.page_meta.head_stride = pages * mstride;
  r.page_meta.row_stride = mstride;
}

TEST_F(RetrievalGpuTest, StridedAndBlockedHostViewsEqualSelectCpu) {
  auto gpu = RetrievalGpu::Create(0);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::mt19937_64 rng(7);
  uint64_t arena = 0;
  for (int layout : {0, 1, 2}) {
    HostRequest h;
    MakeHostRequest(layout, 3, 1000, rng, &h);
    for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
      topk::SelectRequest req = h.req;
      req.mode = mode;
      req.k = 50;
      req.n_sink = 2;
      req.n_local = 3;
      const int64_t rows = topk::SelectRows(req), cap = topk::SelectCapacity(req);
      std::vector<int32_t> ci(rows * cap, -7), gi(rows * cap, -7), cc(rows, -7), gc(rows, -7);
      std::vector<float> cs(rows * cap, 99.f), gs(rows * cap, 99.f), cm(rows, 99.f), gm(rows, 99.f);
      ASSERT_TRUE(topk::SelectCpu(req, {ci.data(), cc.data(), cs.data(), cm.data()}).ok());
      const uint64_t in_place = (*gpu)->keys_read_in_place();
      const absl::Status s = (*gpu)->Select(req, {gi.data(), gc.data(), gs.data(), gm.data()});
      ASSERT_TRUE(s.ok()) << s;
      const std::string what = absl::StrCat("layout ", layout, " ", ModeName(mode));
      // Every mode reads the keys here (scores and mass are wanted): pinned blocks in place.
      EXPECT_EQ((*gpu)->keys_read_in_place() - in_place, layout == 2 ? 1u : 0u) << what;
      EXPECT_EQ(gi, ci) << what;
      EXPECT_EQ(gc, cc) << what;
      for (size_t i = 0; i < cs.size(); ++i) {
        EXPECT_TRUE(SameFloat(gs[i], cs[i], 1e-3)) << what << " score " << i;
      }
      for (int64_t r = 0; r < rows; ++r) EXPECT_NEAR(gm[r], cm[r], 1e-4) << what << " mass";
      // The same request again, told that the keys are pinned blocks (only the first and last
      // are checked then; pageable blocks are still copied): the arena is reused as it is.
      if (arena == 0) arena = (*gpu)->arena_bytes();
      std::fill(gi.begin(), gi.end(), -7);
      const uint64_t in_place_before = (*gpu)->keys_read_in_place();
      ASSERT_TRUE((*gpu)
                      ->Select(req, {gi.data(), gc.data(), gs.data(), gm.data()}, nullptr,
                               /*keys_pinned=*/true)
                      .ok());
      EXPECT_EQ((*gpu)->keys_read_in_place() - in_place_before, layout == 2 ? 1u : 0u) << what;
      EXPECT_EQ(gi, ci) << what << " again";
    }
  }
  EXPECT_GT(arena, 0u);
  EXPECT_EQ((*gpu)->arena_bytes(), arena);  // every request here fits the first arena
  // A bad request is INVALID_ARGUMENT, as SelectCpu says.
  HostRequest h;
  MakeHostRequest(0, 2, 64, rng, &h);
  h.req.k = 0;
  std::vector<int32_t> idx(64);
  EXPECT_EQ((*gpu)->Select(h.req, {idx.data(), nullptr, nullptr, nullptr}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RetrievalGpu::Create(1 << 20).status().code(), absl::StatusCode::kInvalidArgument);
}

// SelectBatch over items of every kind in one call: keys staged from pageable memory (two layouts,
// taking turns in one region), read in place from pinned blocks, dense in device memory; page
// modes with named metadata (two items sharing one name) and unnamed; scores and mass on some; a
// bad item among them. Each item equals SelectCpu; the bad one alone fails.
TEST_F(RetrievalGpuTest, SelectBatchEqualsSelectCpuItemByItem) {
  auto gpu = RetrievalGpu::Create(0, /*meta_capacity_bytes=*/1 << 20);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::mt19937_64 rng(11);
  std::vector<std::unique_ptr<HostRequest>> hosts;
  for (int layout : {0, 1, 2}) {
    hosts.push_back(std::make_unique<HostRequest>());
    MakeHostRequest(layout, 3, 1000 + 77 * layout, rng, hosts.back().get());
  }
  // Layout 0's keys, dense [heads][N][d], in device memory.
  const topk::SelectRequest& dense_src = hosts[0]->req;
  const int64_t n0 = dense_src.num_tokens;
  std::string dense(3 * n0 * 128 * 2, '\0');
  for (int h = 0; h < 3; ++h) {
    for (int64_t t = 0; t < n0; ++t) {
      std::memcpy(dense.data() + (h * n0 + t) * 256,
                  static_cast<const char*>(dense_src.keys.base) +
                      (t * dense_src.keys.row_stride + h * dense_src.keys.head_stride) * 2,
                  256);
    }
  }
  void* dev = nullptr;
  ASSERT_EQ(cudaMalloc(&dev, dense.size()), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dev, dense.data(), dense.size(), cudaMemcpyHostToDevice), cudaSuccess);

  const uint64_t names_a[] = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<uint64_t> names_b(topk::NumPages(hosts[1]->req.num_tokens));
  std::iota(names_b.begin(), names_b.end(), 100);
  RetrievalGpu::MetaName meta_a{"a", absl::MakeConstSpan(names_a, 8), 8};  // 63 pages of layout 0
  RetrievalGpu::MetaName meta_b{"b", names_b, 1};

  struct Item {
    topk::SelectRequest req;
    const RetrievalGpu::MetaName* name = nullptr;
    bool scores = false, mass = false;
    std::vector<int32_t> ci, gi, cc, gc;
    std::vector<float> cs, gs, cm, gm;
  };
  std::vector<Item> items;
  auto add = [&](const topk::SelectRequest& base, Mode mode, GqaReduction red, int64_t k,
                 const RetrievalGpu::MetaName* name, bool scores, bool mass) {
    Item it;
    it.req = base;
    it.req.mode = mode;
    it.req.reduction = red;
    it.req.k = k;
    it.req.n_sink = 2;
    it.req.n_local = 5;
    it.name = name;
    it.scores = scores;
    it.mass = mass;
    items.push_back(std::move(it));
  };
  add(hosts[0]->req, Mode::kExact, GqaReduction::kMax, 40, nullptr, true, true);
  add(hosts[1]->req, Mode::kExact, GqaReduction::kSum, 64, nullptr, false, false);
  add(hosts[2]->req, Mode::kExact, GqaReduction::kPerQueryHead, 30, nullptr, true, false);
  add(hosts[0]->req, Mode::kBound, GqaReduction::kMax, 48, &meta_a, false, false);
  add(hosts[0]->req, Mode::kBoundThenExact, GqaReduction::kMax, 48, &meta_a, true, true);
  add(hosts[1]->req, Mode::kBoundThenExact, GqaReduction::kMax, 20, &meta_b, false, false);
  add(hosts[2]->req, Mode::kBound, GqaReduction::kSum, 33, nullptr, false, true);
  add(hosts[0]->req, Mode::kExact, GqaReduction::kMax, 0, nullptr, false, false);  // bad: k 0
  topk::SelectRequest on_device = hosts[0]->req;
  on_device.keys = topk::DenseMatrix<const void*>(dev, DType::kBF16, n0, 128);
  add(on_device, Mode::kExact, GqaReduction::kMax, 40, nullptr, false, false);
  const size_t bad = 7;

  std::vector<RetrievalGpu::BatchItem> batch;
  for (Item& it : items) {
    const int64_t rows = topk::SelectRows(it.req);
    const int64_t cap = it.req.k > 0 ? topk::SelectCapacity(it.req) : 1;
    it.ci.assign(rows * cap, -7);
    it.gi.assign(rows * cap, -7);
    it.cc.assign(rows, -7);
    it.gc.assign(rows, -7);
    it.cs.assign(rows * cap, 99.f);
    it.gs.assign(rows * cap, 99.f);
    it.cm.assign(rows, 99.f);
    it.gm.assign(rows, 99.f);
    RetrievalGpu::BatchItem b;
    b.req = it.req;
    b.result = {it.gi.data(), it.gc.data(), it.scores ? it.gs.data() : nullptr,
                it.mass ? it.gm.data() : nullptr};
    b.meta_name = it.name;
    batch.push_back(b);
  }
  const uint64_t in_place = (*gpu)->keys_read_in_place();
  for (int pass = 0; pass < 2; ++pass) {  // the second finds the named metadata on the device
    for (Item& it : items) std::fill(it.gi.begin(), it.gi.end(), -7);
    const std::vector<absl::Status> st = (*gpu)->SelectBatch(batch);
    ASSERT_EQ(st.size(), items.size());
    for (size_t i = 0; i < items.size(); ++i) {
      Item& it = items[i];
      const std::string what = absl::StrCat("pass ", pass, " item ", i, " ", ModeName(it.req.mode));
      if (i == bad) {
        EXPECT_EQ(st[i].code(), absl::StatusCode::kInvalidArgument) << what;
        EXPECT_EQ(it.gi, std::vector<int32_t>(it.gi.size(), -7)) << what << ": written";
        continue;
      }
      ASSERT_TRUE(st[i].ok()) << what << ": " << st[i];
      topk::SelectRequest cpu_req = it.req;
      if (i == items.size() - 1) cpu_req.keys = hosts[0]->req.keys;  // the device copy's source
      ASSERT_TRUE(
          topk::SelectCpu(cpu_req, {it.ci.data(), it.cc.data(), it.scores ? it.cs.data() : nullptr,
                                    it.mass ? it.cm.data() : nullptr})
              .ok())
          << what;
      EXPECT_EQ(it.gi, it.ci) << what;
      EXPECT_EQ(it.gc, it.cc) << what;
      for (size_t j = 0; it.scores && j < it.cs.size(); ++j) {
        EXPECT_TRUE(SameFloat(it.gs[j], it.cs[j], 1e-3)) << what << " score " << j;
      }
      for (size_t r = 0; it.mass && r < it.cm.size(); ++r) {
        EXPECT_NEAR(it.gm[r], it.cm[r], 1e-4) << what << " mass";
      }
    }
  }
  // Per pass: the pinned blocks (item 2, and item 6, whose mass reads the keys) and the device
  // keys (item 8).
  EXPECT_EQ((*gpu)->keys_read_in_place() - in_place, 6u);
  // The named metadata went up once: 63 pages of "a", once for its two items, and "b"'s.
  EXPECT_EQ((*gpu)->meta_pages_uploaded(),
            static_cast<uint64_t>(topk::NumPages(n0) + topk::NumPages(hosts[1]->req.num_tokens)));
  cudaFree(dev);
}

// Outputs past one staging buffer (8 MiB) come back item by item.
TEST_F(RetrievalGpuTest, SelectBatchWithLargeOutputs) {
  auto gpu = RetrievalGpu::Create(0);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::mt19937_64 rng(12);
  HostRequest h;
  MakeHostRequest(2, 4, 20000, rng, &h);
  topk::SelectRequest req = h.req;
  req.reduction = GqaReduction::kPerQueryHead;  // 8 rows
  req.k = 19000;
  const int64_t rows = topk::SelectRows(req), cap = topk::SelectCapacity(req);
  std::vector<int32_t> want(rows * cap);
  std::vector<float> want_scores(rows * cap);
  ASSERT_TRUE(topk::SelectCpu(req, {want.data(), nullptr, want_scores.data(), nullptr}).ok());
  const int items = 8;  // 8 x 8 rows x 19000 x 8 bytes: 9.7 MB of outputs
  std::vector<std::vector<int32_t>> idx(items, std::vector<int32_t>(rows * cap, -7));
  std::vector<std::vector<float>> sc(items, std::vector<float>(rows * cap, 99.f));
  std::vector<RetrievalGpu::BatchItem> batch(items);
  for (int i = 0; i < items; ++i) {
    batch[i].req = req;
    batch[i].result = {idx[i].data(), nullptr, sc[i].data(), nullptr};
  }
  const std::vector<absl::Status> st = (*gpu)->SelectBatch(batch);
  for (int i = 0; i < items; ++i) {
    ASSERT_TRUE(st[i].ok()) << st[i];
    EXPECT_EQ(idx[i], want) << "item " << i;
    int off = 0;
    for (size_t j = 0; j < want_scores.size(); ++j)
      off += !SameFloat(sc[i][j], want_scores[j], 1e-3);
    EXPECT_EQ(off, 0) << "item " << i;
  }
}

}  // namespace
}  // namespace ropekv
