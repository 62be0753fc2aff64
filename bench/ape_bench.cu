// Benchmark of the APE merge kernel (kernels/ape) on a Llama-3-8B-shaped layer: 32 q heads,
// 8 KV heads, head_dim 128, bf16; a 2K-token prefix, 8 contexts of 1K tokens, a 64-token question.
//   prefill: the 64 question tokens attend (causal among themselves) to prefix + contexts.
//   decode:  one token after the question attends to prefix + contexts + question + itself.
// Self-contained: generates its inputs, checks the result once against the CPU reference
// (ApeAttentionCpu, fp64), times with cudaEvents after warm-up (median over batches of calls),
// rotating through several input sets so that K/V come from HBM, not L2 (40 MiB per set).
// Prints a table and one JSON line. The same attention done by PyTorch (SDPA twice plus the
// merge) is bench/torch/ape_torch.py.
//
// Usage: ape_bench [--batches N] [--calls N] [--sets N] [--no-check]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/ape/ape.h"

namespace ropekv {
namespace {

#define BENCH_CUDA(expr)                                                                  \
  do {                                                                                    \
    cudaError_t err_ = (expr);                                                            \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s: %s (%s:%d)\n", #expr, cudaGetErrorString(err_), __FILE__, \
                   __LINE__);                                                             \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

constexpr int kQHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kPrefix = 2048;
constexpr int kContexts = 8;
constexpr int kContextLen = 1024;
constexpr int kQuestion = 64;
constexpr float kT = 0.5f;
constexpr float kS = 0.9f;

struct Options {
  int batches = 50;  // timed batches; the median batch gives the figure
  int calls = 10;    // calls per batch (one event pair per batch)
  int sets = 4;      // input sets rotated through (each ~40 MiB > H100's 50 MiB L2 / 2)
  bool check = true;
};

// One segment on host (bf16 bits) and device, packed [kv_heads][tokens][head_dim].
struct Seg {
  std::vector<uint16_t> k, v;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t tokens = 0;
};

void FillSeg(Seg& s, int64_t tokens, std::mt19937& rng, bool keep_host) {
  const size_t n = static_cast<size_t>(kKvHeads) * tokens * kHeadDim;
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<uint16_t> k(n), v(n);
  for (size_t i = 0; i < n; ++i) k[i] = FloatToBFloat16(dist(rng));
  for (size_t i = 0; i < n; ++i) v[i] = FloatToBFloat16(dist(rng));
  s.tokens = tokens;
  BENCH_CUDA(cudaMalloc(&s.dk, n * 2));
  BENCH_CUDA(cudaMalloc(&s.dv, n * 2));
  BENCH_CUDA(cudaMemcpy(s.dk, k.data(), n * 2, cudaMemcpyHostToDevice));
  BENCH_CUDA(cudaMemcpy(s.dv, v.data(), n * 2, cudaMemcpyHostToDevice));
  if (keep_host) {
    s.k = std::move(k);
    s.v = std::move(v);
  }
}

KvSegment View(const Seg& s, bool device) {
  KvSegment v;
  v.k = device ? s.dk : static_cast<const void*>(s.k.data());
  v.v = device ? s.dv : static_cast<const void*>(s.v.data());
  v.tokens = s.tokens;
  return v;
}

// A set of inputs: prefix, contexts, question keys (+ 1 decode token), queries.
struct InputSet {
  Seg prefix, question, decode_token;
  std::vector<Seg> contexts;
  std::vector<uint16_t> q_host;  // [kQuestion][kQHeads][kHeadDim]
  void* dq = nullptr;
};

void MakeSet(InputSet& set, uint32_t seed, bool keep_host) {
  std::mt19937 rng(seed);
  FillSeg(set.prefix, kPrefix, rng, keep_host);
  set.contexts.resize(kContexts);
  for (Seg& c : set.contexts) FillSeg(c, kContextLen, rng, keep_host);
  FillSeg(set.question, kQuestion, rng, keep_host);
  FillSeg(set.decode_token, 1, rng, keep_host);
  const size_t nq = static_cast<size_t>(kQuestion) * kQHeads * kHeadDim;
  std::normal_distribution<float> dist(0.0f, 1.0f);
  set.q_host.resize(nq);
  for (auto& x : set.q_host) x = FloatToBFloat16(dist(rng));
  BENCH_CUDA(cudaMalloc(&set.dq, nq * 2));
  BENCH_CUDA(cudaMemcpy(set.dq, set.q_host.data(), nq * 2, cudaMemcpyHostToDevice));
}

// Segment views of one scenario (decode or prefill) for one set.
struct Views {
  std::vector<KvSegment> context, other;
};

Views MakeViews(const InputSet& set, bool decode, bool device) {
  Views v;
  for (const Seg& c : set.contexts) v.context.push_back(View(c, device));
  v.other.push_back(View(set.prefix, device));
  v.other.push_back(View(set.question, device));
  if (decode) v.other.push_back(View(set.decode_token, device));
  return v;
}

ApeArgs Args(const Views& v, const void* q, int n, void* out, float* lse) {
  ApeArgs a;
  a.shape.num_queries = n;
  a.shape.q_heads = kQHeads;
  a.shape.kv_heads = kKvHeads;
  a.shape.head_dim = kHeadDim;
  a.shape.q_dtype = DType::kBF16;
  a.shape.kv_dtype = DType::kBF16;
  a.shape.out_dtype = DType::kBF16;
  a.temperature = kT;
  a.scale = kS;
  a.q = q;
  a.context = v.context;
  a.other = v.other;
  a.out = out;
  a.lse = lse;
  return a;
}

// CPU reference, one thread per KV head (each runs ApeAttentionCpu on its GQA group).
std::vector<float> CpuReference(const InputSet& set, bool decode, int n) {
  const int group = kQHeads / kKvHeads;
  std::vector<float> out(static_cast<size_t>(n) * kQHeads * kHeadDim);
  std::vector<std::thread> threads;
  std::vector<absl::Status> status(kKvHeads);
  for (int hk = 0; hk < kKvHeads; ++hk) {
    threads.emplace_back([&, hk] {
      Views v = MakeViews(set, decode, /*device=*/false);
      for (auto* list : {&v.context, &v.other}) {
        for (KvSegment& s : *list) {
          const size_t off = static_cast<size_t>(hk) * s.tokens * kHeadDim;
          s.k = static_cast<const uint16_t*>(s.k) + off;
          s.v = static_cast<const uint16_t*>(s.v) + off;
          s.head_stride = s.tokens * kHeadDim;  // one head; stride unused
        }
      }
      std::vector<float> part(static_cast<size_t>(n) * group * kHeadDim);
      // Decode uses the question's first query row as its query.
      ApeArgs a = Args(v, set.q_host.data() + static_cast<size_t>(hk) * group * kHeadDim, n,
                       part.data(), nullptr);
      a.shape.q_heads = group;
      a.shape.kv_heads = 1;
      a.shape.out_dtype = DType::kF32;
      a.q_head_stride = kHeadDim;
      a.q_token_stride = static_cast<int64_t>(kQHeads) * kHeadDim;
      status[hk].Update(ApeAttentionCpu(a));
      for (int i = 0; i < n; ++i) {
        for (int g = 0; g < group; ++g) {
          std::memcpy(&out[((static_cast<size_t>(i) * kQHeads) + hk * group + g) * kHeadDim],
                      &part[(static_cast<size_t>(i) * group + g) * kHeadDim],
                      kHeadDim * sizeof(float));
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const absl::Status& st : status) {
    if (!st.ok()) {
      std::fprintf(stderr, "cpu reference: %s\n", std::string(st.message()).c_str());
      std::exit(1);
    }
  }
  return out;
}

struct Result {
  std::string scenario, kernel;
  double us_median = 0, us_min = 0, us_max = 0, gbps = 0, tflops = 0, max_err = -1;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Result Run(const Options& opt, std::vector<InputSet>& sets, bool decode, ApeCudaOptions::Kernel k,
           const std::string& kernel_name, const std::vector<float>* ref) {
  const int n = decode ? 1 : kQuestion;
  const size_t out_elems = static_cast<size_t>(n) * kQHeads * kHeadDim;
  void* out = nullptr;
  float* lse = nullptr;
  BENCH_CUDA(cudaMalloc(&out, out_elems * 2));
  BENCH_CUDA(cudaMalloc(&lse, static_cast<size_t>(n) * kQHeads * 4));
  ApeCudaOptions o;
  o.kernel = k;
  std::vector<Views> views;
  for (const InputSet& s : sets) views.push_back(MakeViews(s, decode, /*device=*/true));
  // The decode query is row 0 of the question's queries.
  absl::StatusOr<size_t> ws_bytes =
      ApeCudaWorkspaceBytes(Args(views[0], sets[0].dq, n, out, lse), o);
  if (!ws_bytes.ok()) {
    std::fprintf(stderr, "%s\n", std::string(ws_bytes.status().message()).c_str());
    std::exit(1);
  }
  void* ws = nullptr;
  BENCH_CUDA(cudaMalloc(&ws, *ws_bytes));
  cudaStream_t stream;
  BENCH_CUDA(cudaStreamCreate(&stream));
  auto call = [&](int set) {
    const absl::Status st =
        ApeAttentionCuda(Args(views[set], sets[set].dq, n, out, lse), ws, *ws_bytes, stream, o);
    if (!st.ok()) {
      std::fprintf(stderr, "ApeAttentionCuda: %s\n", std::string(st.message()).c_str());
      std::exit(1);
    }
  };

  Result r;
  r.scenario = decode ? "decode (1 token)" : "prefill (64 tokens)";
  r.kernel = kernel_name;
  if (ref != nullptr) {
    BENCH_CUDA(cudaMemset(out, 0xff, out_elems * 2));
    call(0);
    BENCH_CUDA(cudaStreamSynchronize(stream));
    std::vector<uint16_t> got(out_elems);
    BENCH_CUDA(cudaMemcpy(got.data(), out, out_elems * 2, cudaMemcpyDeviceToHost));
    double err = 0;
    for (size_t i = 0; i < out_elems; ++i) {
      const double e = std::fabs(BFloat16ToFloat(got[i]) - (*ref)[i]);
      err = std::isnan(e) ? INFINITY : std::max(err, e);
    }
    r.max_err = err;
  }
  for (int i = 0; i < 20; ++i) call(i % sets.size());
  BENCH_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  std::vector<double> per_call;
  int set = 0;
  for (int b = 0; b < opt.batches; ++b) {
    BENCH_CUDA(cudaEventRecord(start, stream));
    for (int c = 0; c < opt.calls; ++c) {
      call(set);
      set = (set + 1) % static_cast<int>(sets.size());
    }
    BENCH_CUDA(cudaEventRecord(stop, stream));
    BENCH_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
    per_call.push_back(ms * 1000.0 / opt.calls);
  }
  r.us_median = Median(per_call);
  r.us_min = *std::min_element(per_call.begin(), per_call.end());
  r.us_max = *std::max_element(per_call.begin(), per_call.end());
  const double keys = kPrefix + kContexts * kContextLen + kQuestion + (decode ? 1 : 0);
  const double kv_bytes = 2.0 * keys * kKvHeads * kHeadDim * 2;  // K and V, bf16
  r.gbps = kv_bytes / (r.us_median * 1e-6) / 1e9;
  // 2 matmuls (QK, PV) x 2 flops per MAC over the visible keys (causal part halved).
  const double visible = decode ? keys : keys - kQuestion + (kQuestion + 1) / 2.0;
  r.tflops = 4.0 * n * kQHeads * visible * kHeadDim / (r.us_median * 1e-6) / 1e12;
  BENCH_CUDA(cudaEventDestroy(start));
  BENCH_CUDA(cudaEventDestroy(stop));
  BENCH_CUDA(cudaStreamDestroy(stream));
  BENCH_CUDA(cudaFree(ws));
  BENCH_CUDA(cudaFree(out));
  BENCH_CUDA(cudaFree(lse));
  return r;
}

// Device-to-device copy of one set's K/V bytes (decode scenario): the memory-bandwidth floor.
Result CopyFloor(const Options& opt, std::vector<InputSet>& sets) {
  const double keys = kPrefix + kContexts * kContextLen + kQuestion + 1;
  const size_t bytes = static_cast<size_t>(2 * keys * kKvHeads * kHeadDim * 2);
  void* src = nullptr;
  void* dst = nullptr;
  BENCH_CUDA(cudaMalloc(&src, bytes * 4));
  BENCH_CUDA(cudaMalloc(&dst, bytes));
  BENCH_CUDA(cudaMemset(src, 1, bytes * 4));
  cudaEvent_t start, stop;
  BENCH_CUDA(cudaEventCreate(&start));
  BENCH_CUDA(cudaEventCreate(&stop));
  for (int i = 0; i < 10; ++i)
    BENCH_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice));
  std::vector<double> per_call;
  for (int b = 0; b < opt.batches; ++b) {
    BENCH_CUDA(cudaEventRecord(start));
    for (int c = 0; c < opt.calls; ++c) {
      BENCH_CUDA(cudaMemcpyAsync(dst, static_cast<char*>(src) + (c % 4) * bytes, bytes,
                                 cudaMemcpyDeviceToDevice));
    }
    BENCH_CUDA(cudaEventRecord(stop));
    BENCH_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
    per_call.push_back(ms * 1000.0 / opt.calls);
  }
  Result r;
  r.scenario = "copy K/V bytes once (D2D)";
  r.kernel = "cudaMemcpy";
  r.us_median = Median(per_call);
  r.us_min = *std::min_element(per_call.begin(), per_call.end());
  r.us_max = *std::max_element(per_call.begin(), per_call.end());
  r.gbps = 2.0 * bytes / (r.us_median * 1e-6) / 1e9;  // read + write
  BENCH_CUDA(cudaFree(src));
  BENCH_CUDA(cudaFree(dst));
  return r;
}

int Main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--batches" && i + 1 < argc) {
      opt.batches = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--calls" && i + 1 < argc) {
      opt.calls = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--sets" && i + 1 < argc) {
      opt.sets = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--no-check") {
      opt.check = false;
    } else {
      std::fprintf(stderr, "usage: %s [--batches N] [--calls N] [--sets N] [--no-check]\n",
                   argv[0]);
      return 2;
    }
  }
  int device = 0;
  BENCH_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop;
  BENCH_CUDA(cudaGetDeviceProperties(&prop, device));

  std::vector<InputSet> sets(opt.sets);
  for (int s = 0; s < opt.sets; ++s) MakeSet(sets[s], 42 + s, /*keep_host=*/s == 0 && opt.check);
  std::vector<float> ref_decode, ref_prefill;
  if (opt.check) {
    std::fprintf(stderr, "computing the CPU reference...\n");
    ref_decode = CpuReference(sets[0], /*decode=*/true, 1);
    ref_prefill = CpuReference(sets[0], /*decode=*/false, kQuestion);
  }

  using K = ApeCudaOptions::Kernel;
  std::vector<Result> results;
  for (bool decode : {true, false}) {
    const std::vector<float>* ref = opt.check ? (decode ? &ref_decode : &ref_prefill) : nullptr;
    results.push_back(Run(opt, sets, decode, K::kAuto, "ropekv auto", ref));
    results.push_back(Run(opt, sets, decode, K::kGeneric, "ropekv generic", ref));
    results.push_back(Run(opt, sets, decode, K::kTensorCore, "ropekv tensor-core", ref));
  }
  results.push_back(CopyFloor(opt, sets));

  std::printf(
      "APE merge, Llama-3-8B-shaped layer: %d q heads, %d KV heads, d %d, bf16; prefix %d, "
      "%d contexts x %d, question %d; T %.2f S %.2f\n",
      kQHeads, kKvHeads, kHeadDim, kPrefix, kContexts, kContextLen, kQuestion, kT, kS);
  std::printf("device: %s (%d SMs); %d input sets rotated; median of %d batches x %d calls\n\n",
              prop.name, prop.multiProcessorCount, opt.sets, opt.batches, opt.calls);
  std::printf("| %-26s | %-19s | %9s | %9s | %9s | %8s | %7s | %9s |\n", "scenario", "kernel",
              "median us", "min us", "max us", "KV GB/s", "TFLOP/s", "max |err|");
  std::printf(
      "|%s|%s|%s|%s|%s|%s|%s|%s|\n", std::string(28, '-').c_str(), std::string(21, '-').c_str(),
      std::string(11, '-').c_str(), std::string(11, '-').c_str(), std::string(11, '-').c_str(),
      std::string(10, '-').c_str(), std::string(9, '-').c_str(), std::string(11, '-').c_str());
  std::string json =
      absl::StrCat("{\"bench\":\"ape\",\"device\":\"", prop.name, "\",\"q_heads\":", kQHeads,
                   ",\"kv_heads\":", kKvHeads, ",\"head_dim\":", kHeadDim, ",\"prefix\":", kPrefix,
                   ",\"contexts\":", kContexts, ",\"context_len\":", kContextLen,
                   ",\"question\":", kQuestion, ",\"results\":[");
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const std::string err = r.max_err < 0 ? "-" : absl::StrCat(r.max_err);
    std::printf("| %-26s | %-19s | %9.2f | %9.2f | %9.2f | %8.0f | %7.1f | %9s |\n",
                r.scenario.c_str(), r.kernel.c_str(), r.us_median, r.us_min, r.us_max, r.gbps,
                r.tflops, err.c_str());
    absl::StrAppend(
        &json, i ? "," : "", "{\"scenario\":\"", r.scenario, "\",\"kernel\":\"", r.kernel,
        "\",\"us_median\":", r.us_median, ",\"us_min\":", r.us_min, ",\"us_max\":", r.us_max,
        ",\"kv_gbps\":", r.gbps, ",\"tflops\":", r.tflops, ",\"max_abs_err\":",
        r.max_err < 0 || std::isinf(r.max_err) ? std::string("null") : absl::StrCat(r.max_err),
        "}");
  }
  absl::StrAppend(&json, "]}");
  std::printf("\n%s\n", json.c_str());
  bool bad = false;
  for (const Result& r : results) bad |= r.max_err > 0.05 || std::isinf(r.max_err);
  if (bad)
    std::fprintf(stderr, "ERROR: a kernel disagrees with the CPU reference (max |err| > 0.05)\n");
  return bad ? 1 : 0;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) { return ropekv::Main(argc, argv); }
