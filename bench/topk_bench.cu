// Benchmark of kernels/topk on one GPU: exact score + select, page mode (Quest bound + top-k) and
// bound-then-exact, against the time to read the keys once at the device-to-device copy
// bandwidth measured in the same run. Self-contained: generates bf16 keys and queries on the
// device, checks one configuration against the CPU reference, times with cudaEvents after
// warm-up (median of many repetitions, L2 flushed and left clean before each one), prints a table
// and a JSON line.
//
//   topk_bench [--quick] [--reps N] [--hq H] [--n N] [--k K] [--once] [--old_paths]
// --quick: 32 query heads at N = 128K only; --hq / --n / --k: one value instead of the list;
// --once: one exact and one page-mode Select per shape and nothing else (for a profiler).
// --old_paths: FilterKernel wherever the split or floor selection would run (old against new in
// one binary).
// Besides the whole selections, the table splits the exact pipeline: scoring alone on tensor
// cores (score_us) and on CUDA cores (score_cc, the path before the tensor-core scorer), a plain
// streaming read of the keys by a kernel (stream_us: the floor a scorer can reach), the
// page bound alone (bscore_us) and a plain streaming read of the page metadata (bstream_us: its
// floor), and the top-k alone over precomputed [8][N] scores (topk_us). exact_flr and exact_spl
// time the exact mode again without the chunk selection (ChunkSelectKernel): the floor selection
// (FloorKernel ..; rows of at most 256K tokens, k <= 4096 and at most half the tiles, else as
// exact_spl) and the split selection (SplitFilterKernel ..); exact_flt and bound_flt time the
// exact and page modes with the multi-block threshold filter whose last block finishes a row
// (FilterKernel), the path the others replace.
//
// Shapes: 8 KV heads, head_dim 128, bf16; query heads {8, 32, 512} x N {4K, 32K, 128K, 1M} x
// k {64, 256, 1024, 4096}; n_sink 4, n_local 64. Targets (issue 7, at 32 query heads, N = 128K):
// exact (kMax) <= 1.15x the key-read time, page mode <= 25 us.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "kernels/common/dtype.h"
#include "kernels/topk/topk.h"
#include "kernels/topk/topk_internal.h"

namespace ropekv {
namespace topk {
namespace {

#define BENCH_CUDA(expr)                                                                         \
  do {                                                                                           \
    const cudaError_t _e = (expr);                                                               \
    if (_e != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(_e)); \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)

#define BENCH_OK(expr)                                                                          \
  do {                                                                                          \
    const absl::Status _s = (expr);                                                             \
    if (!_s.ok()) {                                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, _s.ToString().c_str()); \
      std::exit(2);                                                                             \
    }                                                                                           \
  } while (0)

constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr int64_t kSink = 4;
constexpr int64_t kLocal = 64;

// N(0, 1) values rounded to bf16, from a counter-based hash (splitmix64 + Box-Muller).
__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__global__ void FillNormalBf16(uint16_t* out, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t h = Mix(seed * 0x100000001b3ull + static_cast<uint64_t>(i));
    const float u1 = (static_cast<float>(h >> 40) + 1.0f) * (1.0f / 16777217.0f);
    const float u2 = static_cast<float>((h >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    const float v = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
    uint32_t b = __float_as_uint(v);
    b += 0x7fffu + ((b >> 16) & 1u);
    out[i] = static_cast<uint16_t>(b >> 16);
  }
}

// Reads `n` 16-byte words (the second half of the L2 flush: see Timer).
__global__ void ReadAll(const uint4* p, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;  // keeps the loads
}

class Timer {
 public:
  Timer() {
    BENCH_CUDA(cudaEventCreate(&a_));
    BENCH_CUDA(cudaEventCreate(&b_));
    BENCH_CUDA(cudaMalloc(&flush_, kFlushBytes));
  }
  ~Timer() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
    cudaFree(flush_);
  }
  // Median microseconds of `reps` runs of fn on `stream` after `warm` untimed runs; the L2 cache
  // is overwritten before every run (outside the timed interval): a 256 MiB memset, then a read of
  // the same bytes, so that L2 holds clean lines (a memset alone leaves ~50 MB of dirty lines
  // whose write-back would be charged to the timed work; before a decode step's Select, the
  // previous kernels mostly read the KV cache).
  double MedianUs(const std::function<void()>& fn, cudaStream_t stream, int reps, int warm = 3) {
    for (int i = 0; i < warm; ++i) fn();
    std::vector<double> t;
    for (int i = 0; i < reps; ++i) {
      BENCH_CUDA(cudaMemsetAsync(flush_, i & 0xff, kFlushBytes, stream));
      ReadAll<<<1024, 256, 0, stream>>>(static_cast<const uint4*>(flush_), kFlushBytes / 16,
                                        static_cast<uint32_t*>(flush_));
      BENCH_CUDA(cudaGetLastError());
      BENCH_CUDA(cudaEventRecord(a_, stream));
      fn();
      BENCH_CUDA(cudaEventRecord(b_, stream));
      BENCH_CUDA(cudaEventSynchronize(b_));
      float ms = 0;
      BENCH_CUDA(cudaEventElapsedTime(&ms, a_, b_));
      t.push_back(ms * 1000.0);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }

 private:
  static constexpr size_t kFlushBytes = size_t{256} << 20;
  cudaEvent_t a_, b_;
  void* flush_ = nullptr;
};

struct DeviceInputs {
  int query_heads = 0;
  int64_t n = 0;
  uint16_t* keys = nullptr;     // [8][n][128] bf16
  uint16_t* meta = nullptr;     // [8][pages][256] bf16
  uint16_t* queries = nullptr;  // [query_heads][128] bf16
};

// Random bf16 keys and queries of one shape on the device, and their page metadata.
DeviceInputs MakeInputs(int hq, int64_t n, cudaStream_t stream) {
  DeviceInputs in;
  in.query_heads = hq;
  in.n = n;
  const size_t key_elems = static_cast<size_t>(kKvHeads) * n * kHeadDim;
  const int64_t pages = NumPages(n);
  BENCH_CUDA(cudaMalloc(&in.keys, key_elems * 2));
  BENCH_CUDA(cudaMalloc(&in.meta, static_cast<size_t>(kKvHeads) * pages * 256 * 2));
  BENCH_CUDA(cudaMalloc(&in.queries, static_cast<size_t>(hq) * kHeadDim * 2));
  FillNormalBf16<<<1024, 256, 0, stream>>>(in.keys, static_cast<int64_t>(key_elems), 1);
  FillNormalBf16<<<8, 256, 0, stream>>>(in.queries, static_cast<int64_t>(hq) * kHeadDim, 2 + hq);
  BENCH_CUDA(cudaGetLastError());
  BENCH_OK(BuildPageMetaCuda(DenseMatrix<const void*>(in.keys, DType::kBF16, n, kHeadDim),
                             PageMetaShape{kKvHeads, kHeadDim, n},
                             DenseMatrix<void*>(in.meta, DType::kBF16, pages, 2 * kHeadDim),
                             stream));
  BENCH_CUDA(cudaStreamSynchronize(stream));
  return in;
}

void FreeInputs(const DeviceInputs& in) {
  cudaFree(in.keys);
  cudaFree(in.meta);
  cudaFree(in.queries);
}

SelectRequest MakeRequest(const DeviceInputs& in, Mode mode, GqaReduction red, int64_t k) {
  SelectRequest r;
  r.kv_heads = kKvHeads;
  r.query_heads = in.query_heads;
  r.head_dim = kHeadDim;
  r.num_tokens = in.n;
  r.queries = in.queries;
  r.query_dtype = DType::kBF16;
  r.keys = DenseMatrix<const void*>(in.keys, DType::kBF16, in.n, kHeadDim);
  r.page_meta = DenseMatrix<const void*>(in.meta, DType::kBF16, NumPages(in.n), 2 * kHeadDim);
  r.mode = mode;
  r.reduction = red;
  r.k = k;
  r.n_sink = kSink;
  r.n_local = kLocal;
  return r;
}

// Device outputs and workspace for one request.
struct Run {
  int32_t* indices = nullptr;
  int32_t* counts = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  SelectRequest req;
  explicit Run(const SelectRequest& r) : req(r) {
    const size_t n = static_cast<size_t>(SelectRows(r) * SelectCapacity(r));
    BENCH_CUDA(cudaMalloc(&indices, n * 4));
    BENCH_CUDA(cudaMalloc(&counts, SelectRows(r) * 4));
    absl::StatusOr<size_t> b = SelectWorkspaceBytes(r, false);
    BENCH_OK(b.status());
    ws_bytes = *b;
    BENCH_CUDA(cudaMalloc(&ws, ws_bytes));
  }
  ~Run() {
    cudaFree(indices);
    cudaFree(counts);
    cudaFree(ws);
  }
  void Launch(cudaStream_t s) {
    SelectResult res;
    res.indices = indices;
    res.counts = counts;
    BENCH_OK(SelectCuda(req, res, ws, ws_bytes, s));
  }
};

double GraphUs(Timer& timer, Run& run, cudaStream_t stream, int reps) {
  cudaGraph_t g;
  cudaGraphExec_t ge;
  BENCH_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  run.Launch(stream);
  BENCH_CUDA(cudaStreamEndCapture(stream, &g));
  BENCH_CUDA(cudaGraphInstantiate(&ge, g, 0));
  const double us = timer.MedianUs([&] { BENCH_CUDA(cudaGraphLaunch(ge, stream)); }, stream, reps);
  cudaGraphExecDestroy(ge);
  cudaGraphDestroy(g);
  return us;
}

// Checks one configuration against the CPU path: the chosen tokens of every row are a top-k of
// the CPU's fp32 scores (or page bounds) up to ties within a tolerance. Returns an error text.
std::string CheckAgainstCpu(const DeviceInputs& in) {
  const int64_t n = in.n;
  const size_t key_elems = static_cast<size_t>(kKvHeads) * n * kHeadDim;
  const int64_t pages = NumPages(n);
  std::vector<uint16_t> keys(key_elems), meta(static_cast<size_t>(kKvHeads) * pages * 256),
      q(static_cast<size_t>(in.query_heads) * kHeadDim);
  BENCH_CUDA(cudaMemcpy(keys.data(), in.keys, keys.size() * 2, cudaMemcpyDeviceToHost));
  BENCH_CUDA(cudaMemcpy(meta.data(), in.meta, meta.size() * 2, cudaMemcpyDeviceToHost));
  BENCH_CUDA(cudaMemcpy(q.data(), in.queries, q.size() * 2, cudaMemcpyDeviceToHost));
  // The metadata built on the GPU equals the CPU's bit for bit.
  std::vector<uint16_t> cpu_meta(meta.size());
  BENCH_OK(BuildPageMetaCpu(DenseMatrix<const void*>(keys.data(), DType::kBF16, n, kHeadDim),
                            PageMetaShape{kKvHeads, kHeadDim, n},
                            DenseMatrix<void*>(cpu_meta.data(), DType::kBF16, pages, 256)));
  if (cpu_meta != meta) return "page metadata differs from the CPU's";
  for (Mode mode : {Mode::kExact, Mode::kBound}) {
    for (GqaReduction red : {GqaReduction::kMax, GqaReduction::kPerQueryHead}) {
      const int64_t k = 256;
      SelectRequest dreq = MakeRequest(in, mode, red, k);
      SelectRequest hreq = dreq;
      hreq.queries = q.data();
      hreq.keys.base = keys.data();
      hreq.page_meta.base = meta.data();
      const int64_t rows = SelectRows(hreq), cap = SelectCapacity(hreq);
      const int64_t len = mode == Mode::kExact ? n : pages;
      std::vector<float> v(rows * len);
      if (mode == Mode::kExact) {
        BENCH_OK(ScoreCpu(hreq, v.data()));
      } else {
        BENCH_OK(PageBoundCpu(hreq, v.data()));
      }
      Run run(dreq);
      run.Launch(nullptr);
      BENCH_CUDA(cudaDeviceSynchronize());
      std::vector<int32_t> idx(rows * cap), cnt(rows);
      BENCH_CUDA(cudaMemcpy(idx.data(), run.indices, idx.size() * 4, cudaMemcpyDeviceToHost));
      BENCH_CUDA(cudaMemcpy(cnt.data(), run.counts, cnt.size() * 4, cudaMemcpyDeviceToHost));
      for (int64_t r = 0; r < rows; ++r) {
        // Elements chosen besides the pinned tokens, as tokens or pages.
        std::vector<char> chosen(len, 0);
        for (int64_t j = 0; j < cnt[r]; ++j) {
          const int64_t t = idx[r * cap + j];
          if (t < 0 || t >= n || (j > 0 && t <= idx[r * cap + j - 1])) {
            return absl::StrCat("row ", r, ": bad or unsorted index ", t);
          }
          if (t < kSink || t >= n - kLocal) continue;
          chosen[mode == Mode::kExact ? t : t / 16] = 1;
        }
        std::vector<float> eligible;
        double max_abs = 1.0;
        for (int64_t e = 0; e < len; ++e) {
          const bool pinned = mode == Mode::kExact ? (e < kSink || e >= n - kLocal)
                                                   : (e * 16 + 15 < kSink || e * 16 >= n - kLocal);
          if (!pinned) eligible.push_back(v[r * len + e]);
          max_abs = std::max(max_abs, std::fabs(static_cast<double>(v[r * len + e])));
        }
        const int64_t want = mode == Mode::kExact ? k : NumPages(k);
        std::nth_element(eligible.begin(), eligible.begin() + (want - 1), eligible.end(),
                         std::greater<float>());
        const double kth = eligible[want - 1];
        const double tol = 2e-5 * max_abs;
        int64_t n_chosen = 0;
        for (int64_t e = 0; e < len; ++e) {
          const double x = v[r * len + e];
          if (chosen[e]) {
            ++n_chosen;
            if (x < kth - tol) return absl::StrCat("row ", r, ": chose ", e, " below the k-th");
          } else {
            const bool pinned = mode == Mode::kExact
                                    ? (e < kSink || e >= n - kLocal)
                                    : (e * 16 + 15 < kSink || e * 16 >= n - kLocal);
            if (!pinned && x > kth + tol) return absl::StrCat("row ", r, ": missed ", e);
          }
        }
        if (mode == Mode::kExact && n_chosen != want) {
          return absl::StrCat("row ", r, ": ", n_chosen, " chosen, want ", want);
        }
      }
    }
  }
  return "";
}

int Main(int argc, char** argv) {
  bool quick = false;
  int reps = 30;
  int only_hq = 0;
  int64_t only_n = 0;
  int64_t only_k = 0;
  bool once = false;
  bool old_paths = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--once") == 0) once = true;
    if (std::strcmp(argv[i], "--old_paths") == 0) old_paths = true;
    if (std::strcmp(argv[i], "--k") == 0 && i + 1 < argc) only_k = std::atoll(argv[++i]);
    if (std::strcmp(argv[i], "--quick") == 0) quick = true;
    if (std::strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = std::atoi(argv[++i]);
    if (std::strcmp(argv[i], "--hq") == 0 && i + 1 < argc) only_hq = std::atoi(argv[++i]);
    if (std::strcmp(argv[i], "--n") == 0 && i + 1 < argc) only_n = std::atoll(argv[++i]);
  }
  internal::SetSplitSelection(!old_paths);
  internal::SetFloorSelection(!old_paths);
  if (only_hq % kKvHeads != 0 || only_hq < 0 || only_n < 0) {
    std::fprintf(stderr, "--hq must be a multiple of %d, --n positive\n", kKvHeads);
    return 2;
  }
  cudaDeviceProp prop;
  BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Timer timer;

  // Device-to-device copy bandwidth (bytes read + written per second) over 1 GiB.
  double copy_bw = 0;
  {
    const size_t bytes = size_t{1} << 30;
    void *a, *b;
    BENCH_CUDA(cudaMalloc(&a, bytes));
    BENCH_CUDA(cudaMalloc(&b, bytes));
    BENCH_CUDA(cudaMemset(a, 1, bytes));
    const double us = timer.MedianUs(
        [&] { BENCH_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream)); }, stream,
        20);
    copy_bw = 2.0 * bytes / (us * 1e-6);
    cudaFree(a);
    cudaFree(b);
  }

  const std::vector<int> hqs = only_hq > 0 ? std::vector<int>{only_hq}
                               : quick     ? std::vector<int>{32}
                                           : std::vector<int>{8, 32, 512};
  const std::vector<int64_t> ns = only_n > 0 ? std::vector<int64_t>{only_n}
                                  : quick
                                      ? std::vector<int64_t>{131072}
                                      : std::vector<int64_t>{4096, 32768, 131072, int64_t{1} << 20};
  // The CPU check runs once: on 32 query heads and N = 32K when in the lists, else the first.
  const int check_hq = std::find(hqs.begin(), hqs.end(), 32) != hqs.end() ? 32 : hqs[0];
  const int64_t check_n = std::find(ns.begin(), ns.end(), 32768) != ns.end() ? 32768 : ns[0];
  const std::vector<int64_t> ks =
      only_k > 0 ? std::vector<int64_t>{only_k} : std::vector<int64_t>{64, 256, 1024, 4096};
  if (once) {
    for (int hq : hqs) {
      for (int64_t n : ns) {
        const DeviceInputs in = MakeInputs(hq, n, stream);
        for (int64_t k : ks) {
          Run exact(MakeRequest(in, Mode::kExact, GqaReduction::kMax, k));
          Run bound(MakeRequest(in, Mode::kBound, GqaReduction::kMax, k));
          exact.Launch(stream);
          bound.Launch(stream);
          BENCH_CUDA(cudaStreamSynchronize(stream));
        }
        FreeInputs(in);
      }
    }
    return 0;
  }

  std::string check = "skipped";
  std::string json_rows;
  std::printf("# topk_bench on %s (%d SMs), %s", prop.name, prop.multiProcessorCount, [] {
    const std::time_t t = std::time(nullptr);
    return std::asctime(std::gmtime(&t));
  }());
  std::printf("# D2D copy bandwidth (read + write): %.0f GB/s; key read time = key bytes / that\n",
              copy_bw / 1e9);
  std::printf(
      "# 8 KV heads, head_dim 128, bf16, n_sink %lld, n_local %lld, L2 flushed per run; "
      "times in us (median of %d)\n",
      static_cast<long long>(kSink), static_cast<long long>(kLocal), reps);
  std::printf(
      "%5s %8s %5s %8s %9s %9s %9s %9s %9s %10s %9s %9s %9s %6s %9s %9s %9s %9s %9s %9s %9s %9s\n",
      "hq", "N", "k", "keyMB", "read_us", "score_us", "stream_us", "score_cc", "bscore_us",
      "bstream_us", "topk_us", "exact_us", "exact_g", "ratio", "exact_flr", "exact_spl",
      "exact_flt", "pqh_us", "bound_us", "bound_g", "bound_flt", "bte_us");
  for (int hq : hqs) {
    for (int64_t n : ns) {
      const DeviceInputs in = MakeInputs(hq, n, stream);
      const size_t key_elems = static_cast<size_t>(kKvHeads) * n * kHeadDim;
      if (hq == check_hq && n == check_n) {
        check = CheckAgainstCpu(in);
        if (check.empty()) check = "ok";
        std::printf("# check against the CPU path (hq %d, N %lld): %s\n", hq,
                    static_cast<long long>(n), check.c_str());
      }
      const double key_bytes = static_cast<double>(key_elems) * 2;
      const double read_us = key_bytes / copy_bw * 1e6;
      float* score_out = nullptr;
      BENCH_CUDA(cudaMalloc(&score_out, static_cast<size_t>(kKvHeads) * n * 4));
      const SelectRequest score_req = MakeRequest(in, Mode::kExact, GqaReduction::kMax, 1);
      const double score_us =
          timer.MedianUs([&] { BENCH_OK(ScoreCuda(score_req, score_out, stream)); }, stream, reps);
      // A plain kernel reading `bytes` at p once: the floor of a scorer over them.
      auto stream_read_us = [&](const void* p, double bytes) {
        return timer.MedianUs(
            [&] {
              ReadAll<<<1024, 256, 0, stream>>>(static_cast<const uint4*>(p),
                                                static_cast<int64_t>(bytes) / 16,
                                                reinterpret_cast<uint32_t*>(score_out));
            },
            stream, reps);
      };
      const double stream_us = stream_read_us(in.keys, key_bytes);
      internal::SetTensorCoreScoring(false);
      const double score_cc_us =
          timer.MedianUs([&] { BENCH_OK(ScoreCuda(score_req, score_out, stream)); }, stream, reps);
      internal::SetTensorCoreScoring(true);
      const double bscore_us = timer.MedianUs(
          [&] { BENCH_OK(PageBoundCuda(score_req, score_out, stream)); }, stream, reps);
      const double meta_bytes = static_cast<double>(kKvHeads) * NumPages(n) * 2 * kHeadDim * 2;
      const double bstream_us = stream_read_us(in.meta, meta_bytes);
      BENCH_OK(ScoreCuda(score_req, score_out, stream));  // the scores topk_us selects from
      for (int64_t k : ks) {
        Run exact(MakeRequest(in, Mode::kExact, GqaReduction::kMax, k));
        Run pqh(MakeRequest(in, Mode::kExact, GqaReduction::kPerQueryHead, k));
        Run bound(MakeRequest(in, Mode::kBound, GqaReduction::kMax, k));
        Run bte(MakeRequest(in, Mode::kBoundThenExact, GqaReduction::kMax, k));
        const double exact_us = timer.MedianUs([&] { exact.Launch(stream); }, stream, reps);
        const double exact_g = GraphUs(timer, exact, stream, reps);
        // The exact mode without the chunk selection: the floor selection, the split selection,
        // and the multi-block threshold filter whose last block finishes a row.
        internal::SetChunkSelection(false);
        internal::SetFloorSelection(true);
        internal::SetSplitSelection(true);
        const double exact_floor_g = GraphUs(timer, exact, stream, reps);
        internal::SetFloorSelection(false);
        const double exact_split_g = GraphUs(timer, exact, stream, reps);
        internal::SetSplitSelection(false);
        const double exact_filter_g = GraphUs(timer, exact, stream, reps);
        internal::SetSplitSelection(!old_paths);
        internal::SetFloorSelection(!old_paths);
        internal::SetChunkSelection(true);
        const double pqh_us = timer.MedianUs([&] { pqh.Launch(stream); }, stream, reps);
        const double bound_us = timer.MedianUs([&] { bound.Launch(stream); }, stream, reps);
        const double bound_g = GraphUs(timer, bound, stream, reps);
        // The page mode with the multi-block threshold filter instead of the one-block selection.
        internal::SetSmallRowSelection(false);
        const double bound_filter_g = GraphUs(timer, bound, stream, reps);
        internal::SetSmallRowSelection(true);
        const double bte_us = timer.MedianUs([&] { bte.Launch(stream); }, stream, reps);
        // The top-k alone over the [8][N] scores the scoring run left (k of N, no pinning).
        double topk_us = 0;
        {
          const int64_t kk = std::min<int64_t>(k, n);
          absl::StatusOr<size_t> wsb = TopKWorkspaceBytes(kKvHeads, n, kk);
          BENCH_OK(wsb.status());
          void* tws = nullptr;
          int32_t* tidx = nullptr;
          BENCH_CUDA(cudaMalloc(&tws, *wsb));
          BENCH_CUDA(cudaMalloc(&tidx, static_cast<size_t>(kKvHeads) * kk * 4));
          topk_us = timer.MedianUs(
              [&] { BENCH_OK(TopKCuda(score_out, kKvHeads, n, kk, tidx, tws, *wsb, stream)); },
              stream, reps);
          cudaFree(tws);
          cudaFree(tidx);
        }
        std::printf(
            "%5d %8lld %5lld %8.1f %9.1f %9.1f %9.1f %9.1f %9.1f %10.1f %9.1f %9.1f %9.1f %6.2f "
            "%9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f %9.1f\n",
            hq, static_cast<long long>(n), static_cast<long long>(k), key_bytes / 1e6, read_us,
            score_us, stream_us, score_cc_us, bscore_us, bstream_us, topk_us, exact_us, exact_g,
            exact_g / read_us, exact_floor_g, exact_split_g, exact_filter_g, pqh_us, bound_us,
            bound_g, bound_filter_g, bte_us);
        std::fflush(stdout);
        // absl::StrFormat gives "" when its arguments do not match the format (no compile-time
        // check under nvcc): a row must never be lost silently.
        const std::string json_row = absl::StrFormat(
            "{\"query_heads\":%d,\"n\":%d,\"k\":%d,\"key_bytes\":%.0f,"
            "\"read_us\":%.2f,\"score_us\":%.2f,"
            "\"stream_read_us\":%.2f,"
            "\"score_cuda_cores_us\":%.2f,\"bound_score_us\":%.2f,"
            "\"bound_stream_read_us\":%.2f,"
            "\"topk_only_us\":%.2f,\"exact_us\":%.2f,"
            "\"exact_graph_us\":%.2f,\"exact_ratio\":%.3f,"
            "\"exact_floor_graph_us\":%.2f,"
            "\"exact_split_graph_us\":%.2f,"
            "\"exact_filter_graph_us\":%.2f,"
            "\"exact_pqh_us\":%.2f,\"bound_us\":%.2f,"
            "\"bound_graph_us\":%.2f,"
            "\"bound_filter_graph_us\":%.2f,\"bte_us\":%.2f}",
            hq, n, k, key_bytes, read_us, score_us, stream_us, score_cc_us, bscore_us, bstream_us,
            topk_us, exact_us, exact_g, exact_g / read_us, exact_floor_g, exact_split_g,
            exact_filter_g, pqh_us, bound_us, bound_g, bound_filter_g, bte_us);
        if (json_row.empty()) {
          std::fprintf(stderr, "topk_bench: the JSON row does not match its format\n");
          return 1;
        }
        absl::StrAppend(&json_rows, json_rows.empty() ? "" : ",", json_row);
      }
      cudaFree(score_out);
      FreeInputs(in);
    }
  }
  std::printf(
      "# ratio = exact (graph) / key read time. Targets at hq 32, N 131072: ratio <= 1.15, "
      "bound <= 25 us\n");
  std::printf(
      "{\"bench\":\"topk\",\"device\":\"%s\",\"copy_bw_GBps\":%.1f,\"check\":\"%s\","
      "\"rows\":[%s]}\n",
      prop.name, copy_bw / 1e9, check.c_str(), json_rows.c_str());
  cudaStreamDestroy(stream);
  return check == "ok" || check == "skipped" ? 0 : 1;
}

}  // namespace
}  // namespace topk
}  // namespace ropekv

int main(int argc, char** argv) { return ropekv::topk::Main(argc, argv); }
