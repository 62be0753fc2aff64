// GPU tests of kernels/topk: the CUDA path against the CPU path and the fp64 reference (index
// sets up to ties, scores within fp32 tolerance), poisoned outputs, lengths up to 1M, adversarial
// values, page metadata bit for bit, gather, and CUDA graph capture. Skipped without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/topk/topk.h"
#include "kernels/topk/topk_internal.h"
#include "tests/unit/kernels/topk/topk_test_util.h"

namespace ropekv {
namespace topk {
namespace {

using testing_util::ExpectTopKUpToTies;
using testing_util::Problem;
using testing_util::RefTopK;
using testing_util::Row;
using testing_util::ScoreTol;

#define CUDA_OK(expr)                                                      \
  do {                                                                     \
    const cudaError_t _e = (expr);                                         \
    ASSERT_EQ(_e, cudaSuccess) << #expr << ": " << cudaGetErrorString(_e); \
  } while (0)

// Device memory of n bytes, freed on destruction.
class DevBuf {
 public:
  explicit DevBuf(size_t bytes) : bytes_(std::max<size_t>(bytes, 1)) {
    if (cudaMalloc(&p_, bytes_) != cudaSuccess) p_ = nullptr;
  }
  ~DevBuf() { cudaFree(p_); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  void* get() const { return p_; }
  size_t size() const { return bytes_; }
  void Upload(const void* src, size_t n) { cudaMemcpy(p_, src, n, cudaMemcpyHostToDevice); }
  template <typename T>
  std::vector<T> Download(size_t count) const {
    std::vector<T> v(count);
    cudaMemcpy(v.data(), p_, count * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }

 private:
  void* p_ = nullptr;
  size_t bytes_;
};

constexpr uint8_t kPoison = 0x7e;  // 0x7e7e7e7e: neither -1 nor a plausible index; 8.4e37 float

struct Output {
  int64_t rows = 0, cap = 0;
  std::vector<int32_t> indices, counts;
  std::vector<float> scores, mass;
};

// A problem's inputs on the device and the request over them.
struct OnDevice {
  std::unique_ptr<DevBuf> keys, queries, meta;
  explicit OnDevice(const Problem& p) {
    keys = std::make_unique<DevBuf>(p.keys.bytes.size());
    keys->Upload(p.keys.data(), p.keys.bytes.size());
    queries = std::make_unique<DevBuf>(p.queries.bytes.size());
    queries->Upload(p.queries.data(), p.queries.bytes.size());
    if (!p.meta.bytes.empty()) {
      meta = std::make_unique<DevBuf>(p.meta.bytes.size());
      meta->Upload(p.meta.data(), p.meta.bytes.size());
    }
  }
  SelectRequest Retarget(SelectRequest r) const {
    r.queries = queries->get();
    r.keys.base = keys->get();
    if (meta != nullptr) r.page_meta.base = meta->get();
    return r;
  }
};

absl::Status RunCpu(const SelectRequest& req, bool want_scores, bool want_mass, Output* o) {
  o->rows = SelectRows(req);
  o->cap = SelectCapacity(req);
  o->indices.assign(o->rows * o->cap, -7);
  o->counts.assign(o->rows, -7);
  o->scores.assign(o->rows * o->cap, 0.0f);
  o->mass.assign(o->rows, 0.0f);
  SelectResult r;
  r.indices = o->indices.data();
  r.counts = o->counts.data();
  r.scores = want_scores ? o->scores.data() : nullptr;
  r.mass = want_mass ? o->mass.data() : nullptr;
  return SelectCpu(req, r);
}

// Runs SelectCuda on poisoned outputs; `graph` runs it through a captured CUDA graph.
// Switches a selection path off for its scope (internal::Set*Selection).
class PathOff {
 public:
  explicit PathOff(void (*set_path)(bool)) : set_path_(set_path) { set_path_(false); }
  ~PathOff() { set_path_(true); }
  PathOff(const PathOff&) = delete;
  PathOff& operator=(const PathOff&) = delete;

 private:
  void (*set_path_)(bool);
};

absl::Status RunGpu(const SelectRequest& dreq, bool want_scores, bool want_mass, Output* o,
                    bool graph = false) {
  o->rows = SelectRows(dreq);
  o->cap = SelectCapacity(dreq);
  const size_t ni = o->rows * o->cap;
  DevBuf idx(ni * 4), cnt(o->rows * 4), sc(ni * 4), ms(o->rows * 4);
  cudaMemset(idx.get(), kPoison, idx.size());
  cudaMemset(cnt.get(), kPoison, cnt.size());
  cudaMemset(sc.get(), kPoison, sc.size());
  cudaMemset(ms.get(), kPoison, ms.size());
  SelectResult r;
  r.indices = static_cast<int32_t*>(idx.get());
  r.counts = static_cast<int32_t*>(cnt.get());
  r.scores = want_scores ? static_cast<float*>(sc.get()) : nullptr;
  r.mass = want_mass ? static_cast<float*>(ms.get()) : nullptr;
  absl::StatusOr<size_t> wsb = SelectWorkspaceBytes(dreq, want_mass);
  if (!wsb.ok()) return wsb.status();
  DevBuf ws(*wsb);
  cudaMemset(ws.get(), kPoison, ws.size());  // the workspace needs no initialisation
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  absl::Status s;
  if (graph) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
    s = SelectCuda(dreq, r, ws.get(), ws.size(), stream);
    const cudaError_t end = cudaStreamEndCapture(stream, &g);
    if (s.ok() && end != cudaSuccess) {
      s = absl::InternalError(absl::StrCat("capture: ", cudaGetErrorString(end)));
    }
    if (s.ok()) {
      if (cudaGraphInstantiate(&ge, g, 0) != cudaSuccess) {
        s = absl::InternalError("graph instantiate failed");
      } else {
        // Twice: a replay must not depend on state left by the previous one.
        cudaGraphLaunch(ge, stream);
        cudaGraphLaunch(ge, stream);
        cudaGraphExecDestroy(ge);
      }
      cudaGraphDestroy(g);
    }
  } else {
    s = SelectCuda(dreq, r, ws.get(), ws.size(), stream);
  }
  const cudaError_t e = cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  if (!s.ok()) return s;
  if (e != cudaSuccess) return absl::InternalError(cudaGetErrorString(e));
  o->indices = idx.Download<int32_t>(ni);
  o->counts = cnt.Download<int32_t>(o->rows);
  o->scores = sc.Download<float>(ni);
  o->mass = ms.Download<float>(o->rows);
  return absl::OkStatus();
}

bool Pinned(int64_t t, int64_t n, int64_t ns, int64_t nl) { return t < ns || t >= n - nl; }

// Shape of one GPU output row: counts in range, ascending, pinned tokens present, -1 padding,
// NaN scores in unused slots. Returns the non-pinned tokens.
std::vector<int64_t> CheckRow(const Output& o, int64_t r, int64_t n, int64_t ns, int64_t nl,
                              bool scores, const std::string& what) {
  EXPECT_GE(o.counts[r], 0) << what;
  EXPECT_LE(o.counts[r], o.cap) << what;
  std::vector<int64_t> v = Row(o.indices, o.counts, o.cap, r);
  std::vector<int64_t> free;
  for (size_t j = 0; j < v.size(); ++j) {
    EXPECT_TRUE(v[j] >= 0 && v[j] < n) << what << " slot " << j << " = " << v[j];
    if (j > 0) {
      EXPECT_LT(v[j - 1], v[j]) << what << " slot " << j;
    }
    if (!Pinned(v[j], n, ns, nl)) free.push_back(v[j]);
  }
  const std::set<int64_t> s(v.begin(), v.end());
  for (int64_t t = 0; t < std::min(n, ns); ++t) EXPECT_TRUE(s.count(t)) << what << " sink " << t;
  for (int64_t t = std::max<int64_t>(0, n - nl); t < n; ++t) {
    EXPECT_TRUE(s.count(t)) << what << " local " << t;
  }
  for (int64_t j = std::max(0, o.counts[r]); j < o.cap; ++j) {
    EXPECT_EQ(o.indices[r * o.cap + j], -1) << what << " padding " << j;
    if (scores) {
      EXPECT_TRUE(std::isnan(o.scores[r * o.cap + j])) << what << " score pad " << j;
    }
  }
  return free;
}

// Checks a GPU selection against the fp64 reference (and the CPU path's counts and mass).
void CheckAgainstReference(const Problem& p, const SelectRequest& req, const Output& gpu,
                           const Output& cpu, bool scores, bool mass, const std::string& what) {
  const int64_t n = p.n, ns = req.n_sink, nl = req.n_local;
  ASSERT_EQ(gpu.rows, cpu.rows);
  ASSERT_EQ(gpu.cap, cpu.cap);
  for (int64_t r = 0; r < gpu.rows; ++r) {
    const std::string w = absl::StrCat(what, " row ", r);
    const std::vector<int64_t> free = CheckRow(gpu, r, n, ns, nl, scores, w);
    std::vector<double> score(n);
    for (int64_t t = 0; t < n; ++t) score[t] = p.RowScore(req.reduction, r, t);
    const double tol = ScoreTol(score, 2e-5);
    if (req.mode == Mode::kExact) {
      ASSERT_EQ(gpu.counts[r], cpu.counts[r]) << w;
      std::vector<bool> eligible(n);
      for (int64_t t = 0; t < n; ++t) eligible[t] = !Pinned(t, n, ns, nl);
      ExpectTopKUpToTies(free, score, eligible, req.k, tol, w);
    } else {
      // Pages: compare the chosen page set up to ties of the fp64 bound.
      const int64_t pages = p.pages();
      std::vector<double> bound(pages);
      std::vector<bool> page_ok(pages);
      for (int64_t q = 0; q < pages; ++q) {
        bound[q] = p.RowBound(req.reduction, r, q);
        bool any = false;
        for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) any |= !Pinned(t, n, ns, nl);
        page_ok[q] = any;
      }
      const double btol = ScoreTol(bound, 2e-5);
      if (req.mode == Mode::kBound) {
        std::set<int64_t> chosen;
        for (int64_t t : free) chosen.insert(t / 16);
        for (int64_t q : chosen) {  // whole pages
          for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) {
            EXPECT_TRUE(std::binary_search(free.begin(), free.end(), t) || Pinned(t, n, ns, nl))
                << w << " page " << q << " token " << t;
          }
        }
        ExpectTopKUpToTies(std::vector<int64_t>(chosen.begin(), chosen.end()), bound, page_ok,
                           NumPages(req.k), btol, w + " pages");
      } else {
        // Bound-then-exact: k tokens (or all candidates), each from a page whose bound is within
        // tolerance of the top candidate_pages; and no token of a page that is surely a
        // candidate beats the weakest chosen token by more than the tolerance.
        const int64_t cpages =
            std::min(NumPages(req.candidate_tokens == 0 ? 4 * req.k : req.candidate_tokens), pages);
        const std::vector<int64_t> top = RefTopK(bound, page_ok, cpages);
        double cth = std::numeric_limits<double>::infinity();
        for (int64_t q : top) cth = std::min(cth, bound[q]);
        ASSERT_EQ(gpu.counts[r], cpu.counts[r]) << w;
        double weakest = std::numeric_limits<double>::infinity();
        for (int64_t t : free) {
          EXPECT_GE(bound[t / 16], cth - btol) << w << " token " << t;
          weakest = std::min(weakest, score[t]);
        }
        const std::set<int64_t> fs(free.begin(), free.end());
        for (int64_t q = 0; q < pages; ++q) {
          if (!page_ok[q] || bound[q] <= cth + btol) continue;
          for (int64_t t = q * 16; t < std::min(n, q * 16 + 16); ++t) {
            if (Pinned(t, n, ns, nl) || fs.count(t)) continue;
            EXPECT_LE(score[t], weakest + tol) << w << " missed " << t;
          }
        }
      }
    }
    if (scores) {
      for (int64_t j = 0; j < gpu.counts[r]; ++j) {
        const int64_t t = gpu.indices[r * gpu.cap + j];
        if (t < 0 || t >= n) continue;
        EXPECT_NEAR(gpu.scores[r * gpu.cap + j], score[t], tol) << w << " score of " << t;
      }
    }
    if (mass) {
      EXPECT_NEAR(gpu.mass[r], cpu.mass[r], 1e-4) << w << " mass";
    }
  }
}

class TopkGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no GPU";
  }
};

struct GridCase {
  DType key_type;
  int d;
  int64_t n;
  int64_t k;
};

class SelectGpuGridTest : public ::testing::TestWithParam<GridCase> {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no GPU";
  }
};

TEST_P(SelectGpuGridTest, EqualsCpuUpToTies) {
  const GridCase c = GetParam();
  Problem p(2, 8, c.d, c.n, c.key_type, DType::kBF16, 500 + c.n + c.k + c.d);
  p.BuildMeta(DType::kBF16);
  OnDevice dev(p);
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
      SelectRequest req = p.Request(mode, red, c.k);
      req.n_sink = c.n > 100 ? 4 : 1;
      req.n_local = c.n > 100 ? 64 : 2;
      const bool mass = c.n <= 200000;
      Output cpu, gpu;
      ASSERT_TRUE(RunCpu(req, true, mass, &cpu).ok());
      const absl::Status s = RunGpu(dev.Retarget(req), true, mass, &gpu);
      ASSERT_TRUE(s.ok()) << s;
      CheckAgainstReference(
          p, req, gpu, cpu, true, mass,
          absl::StrCat("mode ", static_cast<int>(mode), " red ", static_cast<int>(red)));
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

std::vector<GridCase> GridCases() {
  std::vector<GridCase> v;
  for (int64_t n :
       {int64_t{1}, int64_t{63}, int64_t{64}, int64_t{65}, int64_t{4099}, int64_t{131072}}) {
    for (int64_t k : {int64_t{1}, int64_t{64}, int64_t{4096}, int64_t{200000}}) {
      v.push_back({DType::kBF16, 128, n, k});
    }
  }
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    for (int d : {64, 128, 256}) v.push_back({t, d, 5000 + d, 100});
  }
  return v;
}

INSTANTIATE_TEST_SUITE_P(Shapes, SelectGpuGridTest, ::testing::ValuesIn(GridCases()),
                         [](const ::testing::TestParamInfo<GridCase>& info) {
                           return absl::StrCat(DTypeName(info.param.key_type), "_d", info.param.d,
                                               "_n", info.param.n, "_k", info.param.k);
                         });

// The first one-block selection of the process at 48 KB of dynamic shared memory (the pages of
// 128K tokens): static + dynamic memory exceed the default 48 KB, so the kernel's attribute must
// be raised (a launch failure otherwise). First in the file so that no earlier test raised it.
TEST_F(TopkGpuTest, PagesOf128KTokensOnFirstUse) {
  const int64_t n = 131072;
  Problem p(1, 2, 64, n, DType::kBF16, DType::kBF16, 940);
  p.BuildMeta(DType::kBF16);
  OnDevice dev(p);
  SelectRequest req = p.Request(Mode::kBound, GqaReduction::kMax, 256);
  req.n_sink = 4;
  req.n_local = 64;
  Output cpu, gpu;
  ASSERT_TRUE(RunCpu(req, true, false, &cpu).ok());
  const absl::Status s = RunGpu(dev.Retarget(req), true, false, &gpu);
  ASSERT_TRUE(s.ok()) << s;
  CheckAgainstReference(p, req, gpu, cpu, true, false, "pages of 128K tokens");
}

TEST_F(TopkGpuTest, OneMillionTokens) {
  const int64_t n = int64_t{1} << 20;
  Problem p(2, 8, 128, n, DType::kBF16, DType::kBF16, 900);
  p.BuildMeta(DType::kBF16);
  OnDevice dev(p);
  for (Mode mode : {Mode::kExact, Mode::kBound}) {
    for (int64_t k : {64, 4096}) {
      SelectRequest req = p.Request(mode, GqaReduction::kMax, k);
      req.n_sink = 4;
      req.n_local = 256;
      Output cpu, gpu;
      ASSERT_TRUE(RunCpu(req, false, false, &cpu).ok());
      const absl::Status s = RunGpu(dev.Retarget(req), true, false, &gpu);
      ASSERT_TRUE(s.ok()) << s;
      CheckAgainstReference(p, req, gpu, cpu, true, false, absl::StrCat("1M k ", k));
    }
  }
}

TEST_F(TopkGpuTest, GraphCaptureReplaysGiveTheSameSelection) {
  const int64_t n = 100000;
  Problem p(8, 32, 128, n, DType::kBF16, DType::kBF16, 901);
  p.BuildMeta(DType::kBF16);
  OnDevice dev(p);
  // The request run plainly and captured in a graph: the same output, and the CPU's up to ties.
  auto expect_graph_equal = [&](Mode mode, int64_t k, bool want_mass, const std::string& what) {
    SelectRequest req = p.Request(mode, GqaReduction::kMax, k);
    req.n_sink = 4;
    req.n_local = 64;
    Output cpu, plain, graph;
    ASSERT_TRUE(RunCpu(req, true, want_mass, &cpu).ok()) << what;
    ASSERT_TRUE(RunGpu(dev.Retarget(req), true, want_mass, &plain).ok()) << what;
    const absl::Status s = RunGpu(dev.Retarget(req), true, want_mass, &graph, /*graph=*/true);
    ASSERT_TRUE(s.ok()) << what << ": " << s;
    EXPECT_EQ(graph.indices, plain.indices) << what;
    EXPECT_EQ(graph.counts, plain.counts) << what;
    CheckAgainstReference(p, req, graph, cpu, true, want_mass, what);
  };
  for (Mode mode : {Mode::kExact, Mode::kBound, Mode::kBoundThenExact}) {
    expect_graph_equal(mode, 512, true, absl::StrCat("graph, mode ", static_cast<int>(mode)));
  }
  // Exact rows without the captured mass and k 3000 (at most half of the 6250 tiles, more than
  // the chunk selection takes) go to the floor selection, or with it off to the split selection:
  // three grids each, no workspace memset.
  for (bool floor : {true, false}) {
    std::optional<PathOff> floor_off;
    if (!floor) floor_off.emplace(internal::SetFloorSelection);
    const internal::SelectionPathCounts before = internal::SelectionPaths();
    expect_graph_equal(Mode::kExact, 3000, false, floor ? "graph, floor" : "graph, split");
    const internal::SelectionPathCounts after = internal::SelectionPaths();
    EXPECT_EQ(floor ? after.floor - before.floor : after.split - before.split, 2u);
  }
}

TEST_F(TopkGpuTest, AdversarialValues) {
  // All equal: the lowest indices, exactly as the CPU path (the final stage resolves 50000 ties).
  {
    const int64_t n = 50000;
    Problem p(1, 4, 64, n, DType::kBF16, DType::kF32, 902);
    for (int64_t t = 0; t < n; ++t) {
      for (int c = 0; c < 64; ++c) p.SetKey(0, t, c, 0.25f);
    }
    OnDevice dev(p);
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kPerQueryHead}) {
      for (int64_t k : {1, 777, 49999}) {
        SelectRequest req = p.Request(Mode::kExact, red, k);
        Output cpu, gpu;
        ASSERT_TRUE(RunCpu(req, false, false, &cpu).ok());
        ASSERT_TRUE(RunGpu(dev.Retarget(req), false, false, &gpu).ok());
        EXPECT_EQ(gpu.indices, cpu.indices) << "k " << k;
        EXPECT_EQ(gpu.counts, cpu.counts);
      }
    }
  }
  // bf16 ties at the boundary (q = e_0; column 0 from {1, 1.5, 2}): exact scores, exact result.
  {
    const int64_t n = 30011;
    Problem p(1, 1, 128, n, DType::kBF16, DType::kF32, 903);
    for (int c = 0; c < 128; ++c) p.queries.Set(c, c == 0 ? 1.0f : 0.0f);
    for (int64_t t = 0; t < n; ++t) p.SetKey(0, t, 0, 1.0f + 0.5f * static_cast<float>(t * 7 % 3));
    OnDevice dev(p);
    for (int64_t k : {1, 100, 10000, 15000, 30000}) {
      SelectRequest req = p.Request(Mode::kExact, GqaReduction::kMax, k);
      Output cpu, gpu;
      ASSERT_TRUE(RunCpu(req, true, false, &cpu).ok());
      ASSERT_TRUE(RunGpu(dev.Retarget(req), true, false, &gpu).ok());
      EXPECT_EQ(gpu.indices, cpu.indices) << "k " << k;
      EXPECT_EQ(gpu.scores, cpu.scores) << "k " << k;
    }
  }
  // -inf scores are selectable last; NaN in a key counts as -inf on the GPU (documented).
  {
    const int64_t n = 1000;
    Problem p(1, 1, 64, n, DType::kF32, DType::kF32, 904);
    for (int c = 0; c < 64; ++c) p.queries.Set(c, c == 0 ? 1.0f : 0.0f);
    for (int64_t t = 900; t < n; ++t) p.SetKey(0, t, 0, -std::numeric_limits<float>::infinity());
    p.SetKey(0, 5, 3, std::numeric_limits<float>::quiet_NaN());
    OnDevice dev(p);
    SelectRequest req = p.Request(Mode::kExact, GqaReduction::kMax, 950);
    Output gpu;
    ASSERT_TRUE(RunGpu(dev.Retarget(req), true, false, &gpu).ok());
    const std::vector<int64_t> v = Row(gpu.indices, gpu.counts, gpu.cap, 0);
    ASSERT_EQ(v.size(), 950u);
    // 899 finite tokens (all but 5), then the 51 lowest of the 101 tokens scoring -inf: 5 and
    // 900..949.
    std::vector<int64_t> want;
    for (int64_t t = 0; t < 950; ++t) want.push_back(t);
    EXPECT_EQ(v, want);
    EXPECT_EQ(gpu.scores[5], -std::numeric_limits<float>::infinity());
  }
}

// TopKCuda equals TopKCpu exactly, with the multi-block rows (len > 16384) selected both ways:
// split (SplitFilterKernel ..) and by FilterKernel. Row 3's scores are normal ones rounded to
// multiples of 1/64: at k 4096 some 140-190 tokens share the k-th score, which the split
// selection ranks in shared memory; row 1's five values leave more than it ranks there.
TEST_F(TopkGpuTest, TopKEqualsCpuExactlyOnTheSameScores) {
  for (int64_t len : {int64_t{1}, int64_t{1000}, int64_t{70000}, int64_t{1} << 20}) {
    const int64_t rows = 4;
    std::vector<float> s(rows * len);
    std::mt19937_64 rng(len);
    std::normal_distribution<float> dist;
    for (float& x : s) x = dist(rng);
    // Row 1: heavy ties; row 2: -inf tail; row 3: ties of a few hundred.
    for (int64_t i = 0; i < len; ++i) s[len + i] = static_cast<float>(i % 5);
    for (int64_t i = len / 2; i < len; ++i)
      s[2 * len + i] = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < len; ++i) s[3 * len + i] = std::round(s[3 * len + i] * 64.0f) / 64.0f;
    DevBuf ds(s.size() * 4);
    ds.Upload(s.data(), s.size() * 4);
    for (int64_t k : {int64_t{1}, int64_t{64}, int64_t{4096}, len}) {
      const int64_t keep = std::min(k, len);
      std::vector<int32_t> want(rows * keep);
      ASSERT_TRUE(TopKCpu(s.data(), rows, len, k, want.data()).ok());
      absl::StatusOr<size_t> wsb = TopKWorkspaceBytes(rows, len, k);
      ASSERT_TRUE(wsb.ok());
      for (bool split : {true, false}) {
        internal::SetSplitSelection(split);
        DevBuf ws(*wsb), out(rows * keep * 4);
        cudaMemset(out.get(), kPoison, out.size());
        const uint64_t splits = internal::SelectionPaths().split;
        const absl::Status st =
            TopKCuda(static_cast<const float*>(ds.get()), rows, len, k,
                     static_cast<int32_t*>(out.get()), ws.get(), ws.size(), nullptr);
        internal::SetSplitSelection(true);
        // Rows of more than 16384 elements (several blocks each) take the split selection.
        EXPECT_EQ(internal::SelectionPaths().split - splits, split && len > 16384 ? 1u : 0u);
        ASSERT_TRUE(st.ok()) << st;
        CUDA_OK(cudaDeviceSynchronize());
        EXPECT_EQ(out.Download<int32_t>(rows * keep), want)
            << "len " << len << " k " << k << " split " << split;
      }
    }
  }
}

TEST_F(TopkGpuTest, ScoresAndBoundsMatchCpu) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    Problem p(2, 8, 128, 3001, t, DType::kF32, 905);
    p.BuildMeta(t);
    OnDevice dev(p);
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
      const SelectRequest req = p.Request(Mode::kExact, red, 1);
      const int64_t rows = SelectRows(req);
      std::vector<float> cs(rows * p.n), cb(rows * p.pages());
      ASSERT_TRUE(ScoreCpu(req, cs.data()).ok());
      ASSERT_TRUE(PageBoundCpu(req, cb.data()).ok());
      DevBuf gs(cs.size() * 4), gb(cb.size() * 4);
      cudaMemset(gs.get(), kPoison, gs.size());
      cudaMemset(gb.get(), kPoison, gb.size());
      ASSERT_TRUE(ScoreCuda(dev.Retarget(req), static_cast<float*>(gs.get()), nullptr).ok());
      ASSERT_TRUE(PageBoundCuda(dev.Retarget(req), static_cast<float*>(gb.get()), nullptr).ok());
      CUDA_OK(cudaDeviceSynchronize());
      const std::vector<float> s = gs.Download<float>(cs.size());
      const std::vector<float> b = gb.Download<float>(cb.size());
      for (size_t i = 0; i < cs.size(); ++i) {
        ASSERT_NEAR(s[i], cs[i], 1e-4 * std::max(1.0f, std::fabs(cs[i]))) << i;
      }
      for (size_t i = 0; i < cb.size(); ++i) {
        ASSERT_NEAR(b[i], cb[i], 1e-4 * std::max(1.0f, std::fabs(cb[i]))) << i;
      }
    }
  }
}

// The tensor-core scorer (bf16 rows) against the CPU's fp64 scores and the CUDA-core scorer:
// head_dim x query dtype (3-part split of f32 / f16 queries, 1 part for bf16) x group sizes
// (partial and several n-tiles) x reductions, lengths off the 64-row tile, exact and bound. 40 and
// 64 query heads at head_dim 128 take the warpgroup-MMA passes in sm_90a builds (a block's last
// warps then run past the end of the rows).
TEST_F(TopkGpuTest, TensorCoreScoresMatchCpuAndCudaCores) {
  struct Case {
    int d, hkv, hq;
    DType qt;
    int64_t n;
  };
  const std::vector<Case> cases = {
      {128, 2, 8, DType::kBF16, 1037}, {128, 2, 8, DType::kF32, 1037},
      {64, 1, 1, DType::kF16, 100},    {256, 2, 24, DType::kF32, 333},
      {128, 1, 64, DType::kBF16, 515}, {128, 1, 40, DType::kF32, 200},
  };
  for (const Case& c : cases) {
    Problem p(c.hkv, c.hq, c.d, c.n, DType::kBF16, c.qt, 910 + c.hq + c.d);
    // Larger magnitudes in some query columns so that the split's low parts matter.
    for (int h = 0; h < c.hq; ++h) p.queries.Set(h * c.d, 1000.0f + 0.123456f * h);
    p.BuildMeta(DType::kBF16);
    OnDevice dev(p);
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
      const SelectRequest req = p.Request(Mode::kExact, red, 1);
      const int64_t rows = SelectRows(req);
      for (bool bound : {false, true}) {
        const int64_t len = bound ? p.pages() : p.n;
        std::vector<float> cpu(rows * len);
        ASSERT_TRUE((bound ? PageBoundCpu(req, cpu.data()) : ScoreCpu(req, cpu.data())).ok());
        // 0: CUDA cores; 1: tensor cores.
        std::vector<float> got[2];
        for (int tc = 0; tc < 2; ++tc) {
          internal::SetTensorCoreScoring(tc == 1);
          DevBuf out(cpu.size() * 4);
          cudaMemset(out.get(), kPoison, out.size());
          const absl::Status st =
              bound ? PageBoundCuda(dev.Retarget(req), static_cast<float*>(out.get()), nullptr)
                    : ScoreCuda(dev.Retarget(req), static_cast<float*>(out.get()), nullptr);
          internal::SetTensorCoreScoring(true);
          ASSERT_TRUE(st.ok()) << st;
          CUDA_OK(cudaDeviceSynchronize());
          got[tc] = out.Download<float>(cpu.size());
        }
        for (size_t i = 0; i < cpu.size(); ++i) {
          // fp32 rounding of sums whose terms reach ~1000 (and ~4000 summed over a group).
          const double tol = 1e-5 * (4000.0 + std::fabs(static_cast<double>(cpu[i])));
          ASSERT_NEAR(got[1][i], cpu[i], tol)
              << "d " << c.d << " hq " << c.hq << " red " << static_cast<int>(red) << " bound "
              << bound << " i " << i;
          ASSERT_NEAR(got[1][i], got[0][i], tol) << "tc vs cuda cores " << i;
        }
      }
    }
  }
}

// Non-finite inputs on the tensor-core path: +-inf keys give +-inf scores (not the NaN that
// inf * 0 of a zero split part would make), NaN keys count as -inf, and the selection equals
// the CUDA-core path's; for one n-tile of query heads and for several (the fix-up then runs for
// the whole pass of a warp: 40 fp32 heads pad their last pass, 64 bf16 heads take two whole ones).
TEST_F(TopkGpuTest, TensorCoreNonFiniteKeysAsCudaCores) {
  const int64_t n = 700;
  const float inf = std::numeric_limits<float>::infinity();
  for (const auto& [hq, qt] :
       {std::pair{4, DType::kF32}, std::pair{40, DType::kF32}, std::pair{64, DType::kBF16}}) {
    Problem p(1, hq, 128, n, DType::kBF16, qt, 920 + hq);
    for (int h = 0; h < hq; ++h) {
      for (int c = 0; c < 128; ++c) p.queries.Set(h * 128 + c, c == 0 ? 1.0f : 0.25f);
    }
    for (int64_t t = 600; t < n; ++t) p.SetKey(0, t, 0, -inf);
    p.SetKey(0, 7, 0, inf);
    p.SetKey(0, 9, 3, std::numeric_limits<float>::quiet_NaN());
    OnDevice dev(p);
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kPerQueryHead}) {
      SelectRequest req = p.Request(Mode::kExact, red, 650);
      Output a, b;
      internal::SetTensorCoreScoring(false);
      const absl::Status s0 = RunGpu(dev.Retarget(req), true, false, &a);
      internal::SetTensorCoreScoring(true);
      ASSERT_TRUE(s0.ok()) << s0;
      ASSERT_TRUE(RunGpu(dev.Retarget(req), true, false, &b).ok());
      EXPECT_EQ(b.indices, a.indices) << "hq " << hq;
      EXPECT_EQ(b.counts, a.counts) << "hq " << hq;
      const std::vector<int64_t> v = Row(b.indices, b.counts, b.cap, 0);
      ASSERT_EQ(v.size(), 650u);
      EXPECT_EQ(v[7], 7);
      EXPECT_EQ(b.scores[7], inf) << "hq " << hq;
      EXPECT_EQ(b.scores[9], -inf) << "hq " << hq;
      for (size_t j = 0; j < v.size(); ++j) {
        if (b.scores[j] == a.scores[j]) continue;  // the infinities
        EXPECT_NEAR(b.scores[j], a.scores[j], 1e-4 * std::max(1.0f, std::fabs(a.scores[j])))
            << "hq " << hq << " slot " << j;
      }
    }
  }
}

// Runs `req` with a selection path switched off, then on (its default), and expects the same
// output bit for bit: indices, counts and scores.
void ExpectSameOnAndOff(void (*set_path)(bool), const SelectRequest& req, const std::string& what) {
  Output a, b;
  set_path(false);
  const absl::Status s0 = RunGpu(req, true, false, &a);
  set_path(true);
  ASSERT_TRUE(s0.ok()) << what << ": " << s0;
  const absl::Status s1 = RunGpu(req, true, false, &b);
  ASSERT_TRUE(s1.ok()) << what << ": " << s1;
  EXPECT_EQ(b.indices, a.indices) << what;
  EXPECT_EQ(b.counts, a.counts) << what;
  for (size_t i = 0; i < a.scores.size(); ++i) {
    if (std::isnan(a.scores[i]) && std::isnan(b.scores[i])) continue;
    ASSERT_EQ(b.scores[i], a.scores[i]) << what << " slot " << i;
  }
}

// Short rows selected in one block (SmallSelectKernel) give exactly what the multi-block
// threshold filter gives, ties included (bf16 keys quantised to few values make many). The
// filter path spreads page keys over their row's range (RangeKernel): ±inf keys on KV head 0 of
// the longest rows make that range span most of the 32 bits.
TEST_F(TopkGpuTest, SmallRowSelectionEqualsFilterPath) {
  const PathOff split_off(internal::SetSplitSelection);
  for (int64_t n : {int64_t{700}, int64_t{16384}, int64_t{200000}}) {
    const internal::SelectionPathCounts before = internal::SelectionPaths();
    Problem p(2, 8, 64, n, DType::kBF16, DType::kBF16, 930 + n);
    for (int64_t t = 0; t < n; t += 3) p.SetKey(1, t, 0, 2.0f);  // ties on KV head 1
    if (n > 16384) {
      // Page rows: the +inf keys put page 0 (sink tokens 0-2, then free ones) and the page that
      // holds both free and local tokens (n - 20 .. n - 18 free) among the chosen pages.
      const float inf = std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; t += 997) p.SetKey(0, t, 1, inf);
      p.SetKey(0, n - 20, 1, inf);
      for (int64_t t = 500; t < n; t += 991) p.SetKey(0, t, 2, -inf);
    }
    p.BuildMeta(DType::kBF16);
    OnDevice dev(p);
    for (Mode mode : {Mode::kExact, Mode::kBound}) {
      for (GqaReduction red :
           {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
        for (int64_t k : {int64_t{1}, int64_t{100}, int64_t{3000}}) {
          SelectRequest req = p.Request(mode, red, k);
          req.n_sink = 3;
          req.n_local = 17;
          ExpectSameOnAndOff(internal::SetSmallRowSelection, dev.Retarget(req),
                             absl::StrCat("n ", n, " mode ", static_cast<int>(mode), " red ",
                                          static_cast<int>(red), " k ", k));
        }
      }
    }
    const internal::SelectionPathCounts after = internal::SelectionPaths();
    EXPECT_GT(after.small - before.small, 0u) << "the one-block selection, n " << n;
    EXPECT_GT(after.filter, before.filter) << "the filter path, n " << n;
  }
}

// The long rows of the path-equality tests: 2 KV heads of 8 query heads, head_dim 64, bf16. KV
// head 1's keys are five multiples of one vector, so its scores take five values and the k-th
// lies in a tie of ~n / 5 tokens; KV head 0 has +inf keys every 997 tokens and -inf ones every 991
// from token 500.
Problem LongRowProblem(int64_t n, uint64_t seed) {
  const float inf = std::numeric_limits<float>::infinity();
  Problem p(2, 16, 64, n, DType::kBF16, DType::kBF16, seed);
  for (int64_t t = 0; t < n; ++t) {
    const float level = static_cast<float>((t * 7919) % 5);
    for (int c = 0; c < 64; ++c) p.SetKey(1, t, c, level * (c % 2 == 0 ? 0.25f : -0.125f));
  }
  for (int64_t t = 0; t < n; t += 997) p.SetKey(0, t, 1, inf);
  for (int64_t t = 500; t < n; t += 991) p.SetKey(0, t, 2, -inf);
  return p;
}

// Long exact rows scored on tensor cores are selected from the scorer's tile maxima
// (ChunkSelectKernel, and ChunkRoundsKernel where the chosen chunks' tokens exceed one block: k
// 1000 at 600003 tokens, and per query head, 16 rows, k 4096 at 131072 and 600003) and give
// exactly what the multi-block threshold filter gives: ties (KV head 1: every key is one of five
// multiples of one vector, so its scores take five values and the k-th lies in a tie of ~n / 5
// tokens, which fills the rounds' candidate list again and again), ±inf keys, lengths that are
// not a multiple of 16 or 4, chunks of 1 to 8 tiles, k up to the largest the chunk paths take, and
// sink / local windows that leave fewer free tokens than k.
TEST_F(TopkGpuTest, ChunkSelectionEqualsFilterPath) {
  const PathOff floor_off(internal::SetFloorSelection), split_off(internal::SetSplitSelection);
  for (int64_t n : {int64_t{16385}, int64_t{50001}, int64_t{131072}, int64_t{600003}}) {
    const internal::SelectionPathCounts before = internal::SelectionPaths();
    const Problem p = LongRowProblem(n, 960 + n);
    OnDevice dev(p);
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
      for (int64_t k : {int64_t{1}, int64_t{100}, int64_t{256}, int64_t{1000}, int64_t{4096}}) {
        for (int64_t n_local : {int64_t{17}, n - 40}) {
          SelectRequest req = p.Request(Mode::kExact, red, k);
          req.n_sink = 3;
          req.n_local = n_local;
          ExpectSameOnAndOff(internal::SetChunkSelection, dev.Retarget(req),
                             absl::StrCat("n ", n, " red ", static_cast<int>(red), " k ", k,
                                          " n_local ", n_local));
        }
      }
    }
    const internal::SelectionPathCounts after = internal::SelectionPaths();
    EXPECT_GT(after.chunk + after.rounds - before.chunk - before.rounds, 0u)
        << "the chunk selection, n " << n;
    EXPECT_GT(after.filter, before.filter) << "the filter path, n " << n;
  }
}

// Long exact rows that the chunk selection does not take give exactly what FilterKernel gives
// (whose last block resolves and writes a row alone) when selected in three grids by the split
// selection (SplitFilterKernel, SplitResolveKernel, SplitWriteKernel) and by the floor selection
// (FloorKernel, FloorFilterKernel, FloorSelectKernel; rows of at most 16384 tiles, k at most half
// of them). KV head 1's
// five score values put more tokens on the k-th score than the split selection ranks in shared
// memory (it resolves them digit by digit) and more tokens above the floor than one round of the
// floor selection holds; KV head 0 has ±inf keys; k up to 4096, all three reductions, and sink /
// local windows that leave fewer free tokens than k.
void ExpectLongRowPathEqualsFilterPath(void (*set_path)(bool),
                                       uint64_t internal::SelectionPathCounts::*taken,
                                       const std::vector<int64_t>& ns) {
  const PathOff chunk_off(internal::SetChunkSelection);
  for (int64_t n : ns) {
    const internal::SelectionPathCounts before = internal::SelectionPaths();
    const Problem p = LongRowProblem(n, 990 + n);
    OnDevice dev(p);
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kSum, GqaReduction::kPerQueryHead}) {
      for (int64_t k : {int64_t{1}, int64_t{100}, int64_t{1000}, int64_t{4096}}) {
        for (int64_t n_local : {int64_t{17}, n - 40}) {
          SelectRequest req = p.Request(Mode::kExact, red, k);
          req.n_sink = 3;
          req.n_local = n_local;
          ExpectSameOnAndOff(set_path, dev.Retarget(req),
                             absl::StrCat("n ", n, " red ", static_cast<int>(red), " k ", k,
                                          " n_local ", n_local));
        }
      }
    }
    // Each path ran (on) and so did the filter path it is compared with (off).
    const internal::SelectionPathCounts after = internal::SelectionPaths();
    EXPECT_GT(after.*taken, before.*taken) << "n " << n;
    EXPECT_GT(after.filter, before.filter) << "n " << n;
  }
}

TEST_F(TopkGpuTest, SplitSelectionEqualsFilterPath) {
  const PathOff floor_off(internal::SetFloorSelection);
  ExpectLongRowPathEqualsFilterPath(internal::SetSplitSelection,
                                    &internal::SelectionPathCounts::split, {16385, 131072, 600003});
}

TEST_F(TopkGpuTest, FloorSelectionEqualsFilterPath) {
  const PathOff split_off(internal::SetSplitSelection);
  ExpectLongRowPathEqualsFilterPath(internal::SetFloorSelection,
                                    &internal::SelectionPathCounts::floor, {16385, 50001, 262144});
}

TEST_F(TopkGpuTest, PageMetadataEqualsCpuBitForBit) {
  for (auto [kt, mt] :
       {std::make_pair(DType::kF32, DType::kBF16), std::make_pair(DType::kF32, DType::kF16),
        std::make_pair(DType::kBF16, DType::kBF16), std::make_pair(DType::kF16, DType::kF32)}) {
    const int64_t n = 16 * 300 + 9;
    Problem p(4, 4, 128, n, kt, DType::kF32, 906);
    p.BuildMeta(mt);
    OnDevice dev(p);
    const size_t mbytes = p.meta.bytes.size();
    const PageMetaShape shape{4, 128, n};
    // Bulk.
    DevBuf m1(mbytes);
    cudaMemset(m1.get(), kPoison, mbytes);
    const MatrixView kv = dev.Retarget(p.Request(Mode::kExact, GqaReduction::kMax, 1)).keys;
    ASSERT_TRUE(
        BuildPageMetaCuda(kv, shape, DenseMatrix<void*>(m1.get(), mt, p.pages(), 256), nullptr)
            .ok());
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_EQ(m1.Download<uint8_t>(mbytes), p.meta.bytes);
    // Appends in uneven chunks.
    DevBuf m2(mbytes);
    cudaMemset(m2.get(), kPoison, mbytes);
    for (int64_t t = 0; t < n;) {
      const int64_t len = std::min<int64_t>(n - t, 1 + (t * 13) % 41);
      ASSERT_TRUE(AppendPageMetaCuda(kv, PageMetaShape{4, 128, t + len}, t,
                                     DenseMatrix<void*>(m2.get(), mt, p.pages(), 256), nullptr)
                      .ok());
      t += len;
    }
    CUDA_OK(cudaDeviceSynchronize());
    EXPECT_EQ(m2.Download<uint8_t>(mbytes), p.meta.bytes);
  }
}

TEST_F(TopkGpuTest, BlockedAndMisalignedKeysEqualDense) {
  const int64_t n = 2000, bt = 32;
  Problem p(2, 4, 128, n, DType::kBF16, DType::kBF16, 907);
  p.BuildMeta(DType::kBF16);
  OnDevice dev(p);
  // Blocked copy: block b holds [kv_heads][bt][d] (the last one partial).
  const int64_t nb = (n + bt - 1) / bt;
  std::vector<std::unique_ptr<DevBuf>> blocks;
  std::vector<const void*> ptrs;
  const uint16_t* keys = static_cast<const uint16_t*>(p.keys.data());
  for (int64_t b = 0; b < nb; ++b) {
    std::vector<uint16_t> host(2 * bt * 128, 0xffff);
    for (int h = 0; h < 2; ++h) {
      for (int64_t t = b * bt; t < std::min(n, (b + 1) * bt); ++t) {
        std::memcpy(&host[(h * bt + t - b * bt) * 128], &keys[(h * n + t) * 128], 256);
      }
    }
    blocks.push_back(std::make_unique<DevBuf>(host.size() * 2));
    blocks.back()->Upload(host.data(), host.size() * 2);
    ptrs.push_back(blocks.back()->get());
  }
  DevBuf ptr_dev(ptrs.size() * sizeof(void*));
  ptr_dev.Upload(ptrs.data(), ptrs.size() * sizeof(void*));
  // Misaligned copy: row stride 129 elements (258 bytes), so most rows are not 16-byte aligned.
  std::vector<uint16_t> odd(2 * n * 129, 0xffff);
  for (int h = 0; h < 2; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(&odd[(h * n + t) * 129], &keys[(h * n + t) * 128], 256);
    }
  }
  DevBuf odd_dev(odd.size() * 2);
  odd_dev.Upload(odd.data(), odd.size() * 2);
  for (Mode mode : {Mode::kExact, Mode::kBoundThenExact}) {
    const SelectRequest dense = dev.Retarget(p.Request(mode, GqaReduction::kMax, 100));
    SelectRequest blocked = dense;
    blocked.keys = BlockedMatrix<const void*>(static_cast<const void* const*>(ptr_dev.get()),
                                              DType::kBF16, bt, 128);
    SelectRequest misaligned = dense;
    misaligned.keys = DenseMatrix<const void*>(odd_dev.get(), DType::kBF16, n, 129);
    Output a, b, c;
    ASSERT_TRUE(RunGpu(dense, true, true, &a).ok());
    ASSERT_TRUE(RunGpu(blocked, true, true, &b).ok());
    ASSERT_TRUE(RunGpu(misaligned, true, true, &c).ok());
    EXPECT_EQ(a.indices, b.indices);
    EXPECT_EQ(a.scores, b.scores);
    EXPECT_EQ(a.indices, c.indices);
    EXPECT_EQ(a.scores, c.scores);
    EXPECT_NEAR(a.mass[0], b.mass[0], 1e-6);
  }
}

TEST_F(TopkGpuTest, GatherEqualsCpu) {
  const int64_t n = 5000, cap = 300;
  Problem p(4, 8, 128, n, DType::kBF16, DType::kF32, 908);
  testing_util::TypedBuffer values(DType::kBF16, static_cast<size_t>(4) * n * 128);
  testing_util::FillNormal(&values, 909);
  OnDevice dev(p);
  DevBuf vdev(values.bytes.size());
  vdev.Upload(values.data(), values.bytes.size());
  std::vector<int32_t> idx(8 * cap), counts(8);
  std::mt19937 rng(9);
  for (int r = 0; r < 8; ++r) {
    counts[r] = static_cast<int32_t>(rng() % (cap + 1));
    for (int j = 0; j < cap; ++j) idx[r * cap + j] = static_cast<int32_t>(rng() % n);
  }
  DevBuf di(idx.size() * 4), dc(counts.size() * 4);
  di.Upload(idx.data(), idx.size() * 4);
  dc.Upload(counts.data(), counts.size() * 4);
  const size_t out_elems = static_cast<size_t>(8) * cap * 128;
  std::vector<uint16_t> ck(out_elems), cv(out_elems);
  GatherRequest g;
  g.kv_heads = 4;
  g.head_dim = 128;
  g.num_tokens = n;
  g.rows = 8;
  g.capacity = cap;
  g.keys = p.KeyView();
  g.values = DenseMatrix<const void*>(values.data(), DType::kBF16, n, 128);
  g.indices = idx.data();
  g.counts = counts.data();
  g.dst_keys = ck.data();
  g.dst_values = cv.data();
  ASSERT_TRUE(GatherCpu(g).ok());
  DevBuf gk(out_elems * 2), gv(out_elems * 2);
  cudaMemset(gk.get(), kPoison, gk.size());
  cudaMemset(gv.get(), kPoison, gv.size());
  GatherRequest gd = g;
  gd.keys.base = dev.keys->get();
  gd.values.base = vdev.get();
  gd.indices = static_cast<const int32_t*>(di.get());
  gd.counts = static_cast<const int32_t*>(dc.get());
  gd.dst_keys = gk.get();
  gd.dst_values = gv.get();
  ASSERT_TRUE(GatherCuda(gd, nullptr).ok());
  CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(gk.Download<uint16_t>(out_elems), ck);
  EXPECT_EQ(gv.Download<uint16_t>(out_elems), cv);
}

TEST_F(TopkGpuTest, SmallWorkspaceIsFailedPrecondition) {
  Problem p(1, 1, 64, 100, DType::kBF16, DType::kF32, 910);
  OnDevice dev(p);
  const SelectRequest req = dev.Retarget(p.Request(Mode::kExact, GqaReduction::kMax, 5));
  DevBuf idx(4 * 5), ws(64);
  SelectResult r;
  r.indices = static_cast<int32_t*>(idx.get());
  EXPECT_EQ(SelectCuda(req, r, ws.get(), 64, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  SelectRequest bad = req;
  bad.head_dim = 80;
  EXPECT_EQ(SelectCuda(bad, r, ws.get(), 64, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace topk
}  // namespace ropekv
