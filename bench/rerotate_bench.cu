// Re-rotate-and-copy on the GPU against cudaMemcpyAsync device-to-device of the same bytes, in one
// run. Shape: a 32K-token Llama-3-8B KV cache (32 layers x 8 KV heads x 128 dims, bf16, RoPE
// theta 500000). Cases:
//   kv_copy      K+V (4 GiB) re-rotated into a second buffer, one job of 32768 tokens
//   kv_blocks    the same bytes as 2048 stored blocks of 16 tokens, each its own job and delta
//   k_copy       keys only (2 GiB, the "key cache" of DESIGN.md), one job
//   k_inplace    keys only, in place (src == dst)
//   identity     K+V with from == to (the pure copy path of the kernel)
// Each is timed against a D2D memcpy of the same number of bytes (for k_*: 32 contiguous 64 MiB
// key slabs, i.e. cudaMemcpyAsync per layer). Bytes moved = read + write. Median of --reps runs
// after warm-up, cudaEvent timing. The result of every case is checked once against the CPU
// reference (RerotateCopyCpu) on sampled tokens (first, middle and last 128 of the cache).
//
// Usage: rerotate_bench [--tokens N] [--reps R] [--mode engine|exact]
// Prints a table and one JSON line (prefix "JSON ").
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "kernels/common/dtype.h"
#include "kernels/rope/rerotate_cuda.h"
#include "kernels/rope/rope.h"

namespace {

using ropekv::DType;
using ropekv::KvGeometry;
using ropekv::KvStrides;
using ropekv::RerotateCopy;
using ropekv::RerotateMode;

#define CHECK_CUDA(expr)                                                                           \
  do {                                                                                             \
    cudaError_t _e = (expr);                                                                       \
    if (_e != cudaSuccess) {                                                                       \
      std::fprintf(stderr, "%s: %s (%s:%d)\n", #expr, cudaGetErrorString(_e), __FILE__, __LINE__); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

#define CHECK_OK(expr)                                                            \
  do {                                                                            \
    absl::Status _s = (expr);                                                     \
    if (!_s.ok()) {                                                               \
      std::fprintf(stderr, "%s: %s\n", #expr, std::string(_s.message()).c_str()); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

constexpr int kLayers = 32, kHeads = 8, kDim = 128;

// Median milliseconds of `reps` runs of fn on `stream` after 3 warm-up runs.
double TimeMs(const std::function<void()>& fn, cudaStream_t stream, int reps) {
  for (int i = 0; i < 3; ++i) fn();
  CHECK_CUDA(cudaStreamSynchronize(stream));
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(a, stream));
    fn();
    CHECK_CUDA(cudaEventRecord(b, stream));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Result {
  std::string name;
  double bytes;  // read + write
  double ms, copy_ms;
  int64_t checked, not_bit_exact;
  double worst_ulp;
};

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 32768;
  int reps = 30;
  RerotateMode mode = RerotateMode::kEngine;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc)
      tokens = std::atoll(argv[++i]);
    else if (a == "--reps" && i + 1 < argc)
      reps = std::atoi(argv[++i]);
    else if (a == "--mode" && i + 1 < argc)
      mode = std::string(argv[++i]) == "exact" ? RerotateMode::kExact : RerotateMode::kEngine;
    else {
      std::fprintf(stderr, "usage: %s [--tokens N] [--reps R] [--mode engine|exact]\n", argv[0]);
      return 2;
    }
  }
  if (tokens % 16 != 0 || tokens < 512) {
    std::fprintf(stderr, "--tokens must be a multiple of 16 and >= 512\n");
    return 2;
  }
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));

  ropekv::RopeSpec spec;
  spec.theta = 500000.0;
  spec.head_dim = kDim;
  auto engine_or = ropekv::RerotateEngine::Create(spec);
  CHECK_OK(engine_or.status());
  ropekv::RerotateEngine& engine = **engine_or;

  const DType dtype = DType::kBF16;
  const KvGeometry geometry{kLayers, kHeads, kDim, dtype};
  const size_t es = 2;
  const size_t elems = size_t{kLayers} * 2 * kHeads * tokens * kDim;
  const size_t bytes = elems * es;  // K+V
  const KvStrides cache{2 * kHeads * tokens * kDim, kHeads * tokens * kDim, tokens * kDim, kDim};

  // Source: random bf16 in +-[2^-4, 2) (never zero), made on the host once (splitmix64, fast).
  std::vector<uint16_t> host_src(elems);
  {
    uint64_t state = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < elems; ++i) {
      uint64_t z = (state += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      const uint16_t sign = static_cast<uint16_t>((z >> 8) & 1) << 15;
      const uint16_t exponent = static_cast<uint16_t>(123 + (z >> 16) % 5) << 7;
      host_src[i] = sign | exponent | static_cast<uint16_t>(z & 0x7f);
    }
  }
  void *src = nullptr, *dst = nullptr, *work = nullptr;
  CHECK_CUDA(cudaMalloc(&src, bytes));
  CHECK_CUDA(cudaMalloc(&dst, bytes));
  CHECK_CUDA(cudaMalloc(&work, bytes));
  CHECK_CUDA(cudaMemcpy(src, host_src.data(), bytes, cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));

  // Job sets.
  RerotateCopy one;
  one.src = src;
  one.dst = dst;
  one.src_strides = one.dst_strides = cache;
  one.n_tokens = tokens;
  one.from_pos = 1000;
  one.to_pos = 37;  // e.g. a prefix of 963 tokens deleted before the cached text
  std::vector<RerotateCopy> kv_copy = {one};
  std::vector<RerotateCopy> k_copy = {one};
  k_copy[0].keys_only = true;
  std::vector<RerotateCopy> k_inplace = k_copy;
  k_inplace[0].src = work;
  k_inplace[0].dst = work;
  std::vector<RerotateCopy> identity = {one};
  identity[0].to_pos = identity[0].from_pos;
  // Blocks: the source viewed as 2048 stored blocks of 16 tokens; every block is its own job with
  // its own rotated_at (its tokens were cached from different requests) and target.
  std::vector<RerotateCopy> blocks;
  for (int64_t b = 0; b < tokens / 16; ++b) {
    RerotateCopy j = one;
    j.src_token = j.dst_token = b * 16;
    j.n_tokens = 16;
    j.from_pos = (b * 7919) % 100000;
    j.to_pos = b * 16;
    blocks.push_back(j);
  }

  struct Case {
    std::string name;
    std::vector<RerotateCopy>* jobs;
    bool keys_only;
    bool in_place;
  };
  std::vector<Case> cases = {{"kv_copy", &kv_copy, false, false},
                             {"kv_blocks", &blocks, false, false},
                             {"k_copy", &k_copy, true, false},
                             {"k_inplace", &k_inplace, true, true},
                             {"identity", &identity, false, false}};

  std::vector<Result> results;
  std::vector<uint16_t> host_out(elems);
  for (const Case& c : cases) {
    // Correctness once, against the CPU reference on sampled tokens.
    if (c.in_place) CHECK_CUDA(cudaMemcpy(work, src, bytes, cudaMemcpyDeviceToDevice));
    CHECK_CUDA(cudaMemset(c.in_place ? work : dst, 0xFF, c.in_place ? 0 : bytes));
    CHECK_OK(engine.RerotateCopyCuda(geometry, *c.jobs, mode, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
    CHECK_CUDA(cudaMemcpy(host_out.data(), c.in_place ? work : dst, bytes, cudaMemcpyDeviceToHost));
    std::vector<uint16_t> ref(elems, 0xFFFF);
    std::vector<RerotateCopy> sample;
    for (const RerotateCopy& j : *c.jobs) {
      for (int64_t lo : {int64_t{0}, tokens / 2, tokens - 128}) {
        const int64_t a = std::max(lo, j.dst_token),
                      b = std::min(lo + 128, j.dst_token + j.n_tokens);
        if (a >= b) continue;
        RerotateCopy s = j;
        s.src = host_src.data();
        s.dst = ref.data();
        s.src_token = j.src_token + (a - j.dst_token);
        s.dst_token = a;
        s.n_tokens = b - a;
        s.from_pos = j.from_pos + (a - j.dst_token);
        s.to_pos = j.to_pos + (a - j.dst_token);
        sample.push_back(s);
      }
    }
    CHECK_OK(ropekv::RerotateCopyCpu(spec, geometry, sample, mode));
    int64_t checked = 0, not_exact = 0;
    double worst = 0;
    for (int l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < (c.keys_only ? 1 : 2); ++kv) {
        for (int h = 0; h < kHeads; ++h) {
          for (int64_t lo : {int64_t{0}, tokens / 2, tokens - 128}) {
            for (int64_t t = lo; t < lo + 128; ++t) {
              for (int d = 0; d < kDim; ++d) {
                const size_t i =
                    l * cache.layer + kv * cache.kv + h * cache.head + t * cache.token + d;
                ++checked;
                if (host_out[i] == ref[i]) continue;
                ++not_exact;
                const float g = ropekv::BFloat16ToFloat(host_out[i]);
                const float r = ropekv::BFloat16ToFloat(ref[i]);
                const double u =
                    std::isfinite(g) && std::isfinite(r)
                        ? std::fabs(g - r) /
                              ropekv::UlpOf(dtype, std::max(std::fabs(g), std::fabs(r)))
                        : 1e9;
                worst = std::max(worst, u);
              }
            }
          }
        }
      }
    }
    if (worst > 1.0) {
      std::fprintf(stderr, "%s: GPU result differs from the CPU reference by %.3g ulp\n",
                   c.name.c_str(), worst);
      return 1;
    }
    // Timing.
    const double ms = TimeMs(
        [&] { CHECK_OK(engine.RerotateCopyCuda(geometry, *c.jobs, mode, stream)); }, stream, reps);
    double copy_ms;
    double moved;
    if (c.keys_only) {
      // The same key bytes: one 64 MiB slab per layer (K of a layer is contiguous here).
      const size_t slab = size_t{kHeads} * tokens * kDim * es;
      copy_ms = TimeMs(
          [&] {
            for (int l = 0; l < kLayers; ++l) {
              const size_t off = l * cache.layer * es;
              CHECK_CUDA(cudaMemcpyAsync(static_cast<char*>(dst) + off,
                                         static_cast<char*>(src) + off, slab,
                                         cudaMemcpyDeviceToDevice, stream));
            }
          },
          stream, reps);
      moved = 2.0 * bytes / 2;  // read + write of the keys (half the cache)
    } else {
      copy_ms = TimeMs(
          [&] { CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream)); },
          stream, reps);
      moved = 2.0 * bytes;
    }
    results.push_back({c.name, moved, ms, copy_ms, checked, not_exact, worst});
  }

  std::printf(
      "rerotate_bench: %s, %d SMs; %d layers x %d KV heads x %d dims bf16, %lld tokens, "
      "theta %.0f, mode %s, median of %d\n",
      prop.name, prop.multiProcessorCount, kLayers, kHeads, kDim, static_cast<long long>(tokens),
      spec.theta, mode == RerotateMode::kExact ? "exact" : "engine", reps);
  std::printf("%-10s %10s %10s %10s %10s %10s %8s %14s\n", "case", "GiB moved", "ms", "GB/s",
              "copy ms", "copy GB/s", "ratio", "bit-exact");
  std::string json = "{\"bench\":\"rerotate\",\"device\":\"" + std::string(prop.name) +
                     "\",\"tokens\":" + std::to_string(tokens) + ",\"mode\":\"" +
                     (mode == RerotateMode::kExact ? "exact" : "engine") + "\",\"cases\":[";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const double gbs = r.bytes / (r.ms * 1e6), copy_gbs = r.bytes / (r.copy_ms * 1e6);
    std::printf("%-10s %10.3f %10.3f %10.1f %10.3f %10.1f %7.1f%% %7lld/%lld\n", r.name.c_str(),
                r.bytes / (1 << 30), r.ms, gbs, r.copy_ms, copy_gbs, 100.0 * r.copy_ms / r.ms,
                static_cast<long long>(r.checked - r.not_bit_exact),
                static_cast<long long>(r.checked));
    char buf[512];
    std::snprintf(buf, sizeof(buf),
                  "%s{\"case\":\"%s\",\"bytes_moved\":%.0f,\"ms\":%.4f,\"gbps\":%.1f,"
                  "\"copy_ms\":%.4f,\"copy_gbps\":%.1f,\"ratio_to_copy\":%.4f,"
                  "\"checked\":%lld,\"not_bit_exact\":%lld,\"worst_ulp\":%.3g}",
                  i ? "," : "", r.name.c_str(), r.bytes, r.ms, gbs, r.copy_ms, copy_gbs,
                  r.copy_ms / r.ms, static_cast<long long>(r.checked),
                  static_cast<long long>(r.not_bit_exact), r.worst_ulp);
    json += buf;
  }
  json += "]}";
  std::printf("JSON %s\n", json.c_str());
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  CHECK_CUDA(cudaFree(work));
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
