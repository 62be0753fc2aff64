// ropekv's own share of a PIE edit on the GPU against copying the moved K/V once with cudaMemcpy,
// in one run. Shape: a 32K-token file cached for a Llama-3-8B-shaped model (32 layers x 8 KV heads
// x 128 dims, bf16, llama3 RoPE theta 500000), stored as a session: 2048 blocks of 16 tokens on
// the GPU, each a chunk of the session's piece list (cache/session.h).
//
// One edit = a one-line edit: replace 10 tokens at `at` by 16 (Δ = +6). ropekv's share, timed
// wall-clock end to end (median of --reps, after warm-up):
//   1. apply the edit to the piece list (PieceList::ApplyEdit: no KV byte moves),
//   2. Fill: take the 16 new tokens' KV from the frontend into a session block (cudaMemcpyAsync),
//   3. hand the KV over: PlanRead of the moved suffix into the frontend's cache buffer
//      [layer][k|v][kv_head][capacity][head_dim] at its new positions, run as ONE launch of the
//      rope CUDA kernel (RerotateEngine::RerotateCopyCuda, kernels/rope/rerotate_cuda.h): the
//      shift and the re-rotation are one fused pass over the moved bytes,
//   4. cudaStreamSynchronize.
// Baseline: one cudaMemcpyAsync device-to-device of the moved K/V bytes (contiguous), + sync.
// Target (DESIGN.md): total <= 1.25x the copy. The kernel alone is also timed with cudaEvents.
// The result is checked once against the CPU reference (RerotateCopyCpu) on three windows of 64
// tokens of the moved suffix (all layers, heads, K and V).
//
// Usage: pie_bench [--tokens N] [--reps R] [--at P ...]
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
#include <memory>
#include <string>
#include <vector>

#include "cache/model.h"
#include "cache/session.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rerotate_cuda.h"
#include "kernels/rope/rope.h"

namespace {

using ropekv::DType;
using ropekv::EditOp;
using ropekv::KvChunk;
using ropekv::KvGeometry;
using ropekv::KvStrides;
using ropekv::ModelSpec;
using ropekv::Piece;
using ropekv::PieceList;
using ropekv::RerotateCopy;
using ropekv::RerotateMode;
using ropekv::TokenRange;

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

constexpr int kLayers = 32, kHeads = 8, kDim = 128, kBlock = 16;
constexpr int kOld = 10, kNew = 16;  // the edit replaces 10 tokens by 16

// Random bf16 in +-[2^-4, 2) (never zero, never NaN), a function of the index (splitmix64).
// x: [n] bf16.
__global__ void FillRandom(uint16_t* x, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const uint16_t sign = static_cast<uint16_t>((z >> 8) & 1) << 15;
    const uint16_t exponent = static_cast<uint16_t>(123 + (z >> 16) % 5) << 7;
    x[i] = sign | exponent | static_cast<uint16_t>(z & 0x7f);
  }
}

void FillRandomOnDevice(void* x, size_t elems, uint64_t seed, cudaStream_t stream) {
  FillRandom<<<1024, 256, 0, stream>>>(static_cast<uint16_t*>(x), elems, seed);
  CHECK_CUDA(cudaGetLastError());
}

// Median milliseconds of `reps` runs of fn on `stream` (cudaEvents) after 3 warm-up runs.
double EventMs(const std::function<void()>& fn, cudaStream_t stream, int reps) {
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

// Median wall-clock milliseconds of `reps` runs of fn (which ends synchronized) after 3 warm-up
// runs; `reset` runs before each, untimed.
double WallMs(const std::function<void()>& reset, const std::function<void()>& fn, int reps) {
  for (int i = 0; i < 3; ++i) {
    reset();
    fn();
  }
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    reset();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Result {
  int64_t at = 0;
  int64_t moved_tokens = 0;
  double moved_bytes = 0;  // K+V bytes of the moved suffix (each read once, written once)
  size_t jobs = 0;
  double plan_us = 0;       // edit + fill bookkeeping + PlanRead, host
  double kernel_ms = 0;     // the rope kernel alone (cudaEvents)
  double total_ms = 0;      // ropekv's share, wall clock, synchronized
  double copy_ms = 0;       // cudaMemcpy of the moved bytes (cudaEvents)
  double copy_wall_ms = 0;  // the same, wall clock, synchronized
  int64_t checked = 0, not_bit_exact = 0;
  double worst_ulp = 0;
};

}  // namespace

int main(int argc, char** argv) {
  int64_t tokens = 32768;
  int reps = 30;
  std::vector<int64_t> ats;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc) {
      tokens = std::atoll(argv[++i]);
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else if (a == "--at" && i + 1 < argc) {
      ats.push_back(std::atoll(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: %s [--tokens N] [--reps R] [--at P ...]\n", argv[0]);
      return 2;
    }
  }
  if (tokens % kBlock != 0 || tokens < 1024) {
    std::fprintf(stderr, "--tokens must be a multiple of %d and >= 1024\n", kBlock);
    return 2;
  }
  if (ats.empty()) ats = {64, tokens / 2, tokens - 1024};  // top, middle, near the end
  for (int64_t at : ats) {
    if (at < 0 || at + kOld + 3 * 64 > tokens) {
      std::fprintf(stderr, "--at %lld leaves too short a suffix\n", static_cast<long long>(at));
      return 2;
    }
  }
  int device = 0;
  CHECK_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));

  ModelSpec spec;
  spec.layers = kLayers;
  spec.kv_heads = kHeads;
  spec.head_dim = kDim;
  spec.dtype = DType::kBF16;
  spec.block_tokens = kBlock;
  spec.rope.type = ropekv::RopeType::kLlama3;
  spec.rope.theta = 500000.0;
  spec.rope.head_dim = kDim;
  spec.rope.factor = 8.0;
  spec.rope.low_freq_factor = 1.0;
  spec.rope.high_freq_factor = 4.0;
  spec.rope.original_max_position_embeddings = 8192;
  spec.rope.max_position_embeddings = 131072;
  CHECK_OK(ropekv::ValidateModelSpec(spec));
  auto engine_or = ropekv::RerotateEngine::Create(spec.rope);
  CHECK_OK(engine_or.status());
  ropekv::RerotateEngine& engine = **engine_or;
  const KvGeometry geometry = ropekv::BlockGeometry(spec);
  const size_t es = 2;
  const uint64_t block_bytes = ropekv::BlockBytes(spec);  // 2 MiB
  const int64_t n_blocks = tokens / kBlock;
  const int64_t capacity = tokens + 64;  // the frontend's cache, room for the grown file
  const KvStrides dst_strides = ropekv::RangeStrides(spec, capacity);
  const size_t dst_bytes = ropekv::RangeBytes(spec, capacity);
  const size_t src_bytes = block_bytes * n_blocks;

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  void *src = nullptr, *dst = nullptr, *fill_src = nullptr, *fill_block = nullptr;
  CHECK_CUDA(cudaMalloc(&src, src_bytes));           // the session's blocks
  CHECK_CUDA(cudaMalloc(&dst, dst_bytes));           // the frontend's KV cache
  CHECK_CUDA(cudaMalloc(&fill_src, block_bytes));    // the new tokens' KV, made by the frontend
  CHECK_CUDA(cudaMalloc(&fill_block, block_bytes));  // the session block they are filled into
  FillRandomOnDevice(src, src_bytes / es, 0x5eed, stream);
  FillRandomOnDevice(fill_src, block_bytes / es, 0xf111, stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));

  // The session as opened: one piece per block, keys rotated at their positions 0..tokens-1.
  std::vector<Piece> pieces;
  for (int64_t b = 0; b < n_blocks; ++b) {
    auto chunk = std::make_shared<KvChunk>();
    chunk->data = static_cast<const char*>(src) + b * block_bytes;
    chunk->strides = ropekv::BlockStrides(spec);
    chunk->tokens = kBlock;
    pieces.push_back(Piece{chunk, 0, kBlock, b * kBlock, ropekv::kBaseTable});
  }
  const PieceList opened(pieces);
  auto fill_chunk = std::make_shared<KvChunk>();
  fill_chunk->data = fill_block;
  fill_chunk->strides = ropekv::BlockStrides(spec);
  fill_chunk->tokens = kBlock;

  std::vector<uint16_t> host_src(src_bytes / es), host_out;
  CHECK_CUDA(cudaMemcpy(host_src.data(), src, src_bytes, cudaMemcpyDeviceToHost));

  std::vector<Result> results;
  for (const int64_t at : ats) {
    Result r;
    r.at = at;
    const std::vector<EditOp> ops = {EditOp::Replace(at, at + kOld, std::vector<int32_t>(kNew, 7))};
    const int64_t new_length = tokens - kOld + kNew;
    const TokenRange moved{at + kNew, new_length};
    r.moved_tokens = moved.size();
    r.moved_bytes = static_cast<double>(ropekv::RangeBytes(spec, moved.size()));

    PieceList session;
    std::vector<RerotateCopy> jobs;
    // ropekv's share of one edit; ends synchronized.
    auto edit = [&](bool launch) {
      CHECK_OK(PieceList::ValidateEdit(session.length(), ops));
      session.ApplyEdit(ops);
      CHECK_CUDA(
          cudaMemcpyAsync(fill_block, fill_src, block_bytes, cudaMemcpyDeviceToDevice, stream));
      session.Splice(TokenRange{at, at + kNew},
                     {Piece{fill_chunk, 0, kNew, at, ropekv::kBaseTable}});
      auto planned =
          ropekv::PlanRead(session, moved, 0, ropekv::kBaseTable, dst, dst_strides, moved.start);
      CHECK_OK(planned.status());
      jobs = *std::move(planned);
      if (launch) {
        CHECK_OK(engine.RerotateCopyCuda(geometry, jobs, RerotateMode::kEngine, stream));
        CHECK_CUDA(cudaStreamSynchronize(stream));
      }
    };
    auto reset = [&] { session = opened; };

    // Correctness once: poisoned destination, then sampled windows against the CPU reference.
    reset();
    CHECK_CUDA(cudaMemset(dst, 0xFF, dst_bytes));
    edit(true);
    r.jobs = jobs.size();
    host_out.resize(dst_bytes / es);
    CHECK_CUDA(cudaMemcpy(host_out.data(), dst, dst_bytes, cudaMemcpyDeviceToHost));
    std::vector<uint16_t> ref(dst_bytes / es, 0xFFFF);
    const int64_t windows[3] = {moved.start, moved.start + moved.size() / 2, moved.end - 64};
    std::vector<RerotateCopy> sample;
    for (const RerotateCopy& j : jobs) {
      for (int64_t lo : windows) {
        const int64_t a = std::max(lo, j.dst_token),
                      b = std::min(lo + 64, j.dst_token + j.n_tokens);
        if (a >= b) continue;
        RerotateCopy s = j;
        // Host copies of the session's blocks (the new tokens' block is never in the suffix).
        s.src = host_src.data() + (static_cast<const char*>(j.src) - static_cast<char*>(src)) / es;
        s.dst = ref.data();
        s.src_token = j.src_token + (a - j.dst_token);
        s.dst_token = a;
        s.n_tokens = b - a;
        s.from_pos = j.from_pos + (a - j.dst_token);
        s.to_pos = j.to_pos + (a - j.dst_token);
        sample.push_back(s);
      }
    }
    CHECK_OK(ropekv::RerotateCopyCpu(spec.rope, geometry, sample, RerotateMode::kEngine));
    for (int l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int h = 0; h < kHeads; ++h) {
          for (int64_t lo : windows) {
            for (int64_t t = lo; t < lo + 64; ++t) {
              for (int d = 0; d < kDim; ++d) {
                const size_t i = l * dst_strides.layer + kv * dst_strides.kv +
                                 h * dst_strides.head + t * dst_strides.token + d;
                ++r.checked;
                if (host_out[i] == ref[i]) continue;
                ++r.not_bit_exact;
                const float g = ropekv::BFloat16ToFloat(host_out[i]);
                const float w = ropekv::BFloat16ToFloat(ref[i]);
                r.worst_ulp = std::max(
                    r.worst_ulp,
                    std::isfinite(g) && std::isfinite(w)
                        ? std::fabs(g - w) /
                              ropekv::UlpOf(DType::kBF16, std::max(std::fabs(g), std::fabs(w)))
                        : 1e9);
              }
            }
          }
        }
      }
    }
    if (r.worst_ulp > 1.0) {
      std::fprintf(stderr, "at %lld: GPU result differs from the CPU reference by %.3g ulp\n",
                   static_cast<long long>(at), r.worst_ulp);
      return 1;
    }

    // Timing: the host bookkeeping alone, the kernel alone, ropekv's whole share, the copy.
    {
      std::vector<double> us;
      for (int i = 0; i < reps; ++i) {
        reset();
        const auto t0 = std::chrono::steady_clock::now();
        edit(false);
        const auto t1 = std::chrono::steady_clock::now();
        us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        CHECK_CUDA(cudaStreamSynchronize(stream));
      }
      std::sort(us.begin(), us.end());
      r.plan_us = us[us.size() / 2];
    }
    r.kernel_ms = EventMs(
        [&] { CHECK_OK(engine.RerotateCopyCuda(geometry, jobs, RerotateMode::kEngine, stream)); },
        stream, reps);
    r.total_ms = WallMs(
        reset, [&] { edit(true); }, reps);
    const size_t moved_bytes = static_cast<size_t>(r.moved_bytes);
    r.copy_ms = EventMs(
        [&] {
          CHECK_CUDA(cudaMemcpyAsync(dst, src, moved_bytes, cudaMemcpyDeviceToDevice, stream));
        },
        stream, reps);
    r.copy_wall_ms = WallMs(
        [] {},
        [&] {
          CHECK_CUDA(cudaMemcpyAsync(dst, src, moved_bytes, cudaMemcpyDeviceToDevice, stream));
          CHECK_CUDA(cudaStreamSynchronize(stream));
        },
        reps);
    results.push_back(r);
  }

  std::printf(
      "pie_bench: %s, %d SMs; %d layers x %d KV heads x %d dims bf16, llama3 RoPE theta %.0f; "
      "%lld-token file in %lld blocks of %d; edit = replace %d tokens by %d; median of %d\n",
      prop.name, prop.multiProcessorCount, kLayers, kHeads, kDim, spec.rope.theta,
      static_cast<long long>(tokens), static_cast<long long>(n_blocks), kBlock, kOld, kNew, reps);
  std::printf("%8s %8s %9s %6s %9s %10s %10s %9s %9s %8s %8s %12s\n", "edit at", "moved",
              "GiB (K+V)", "jobs", "plan us", "kernel ms", "ropekv ms", "copy ms", "copy wall",
              "ratio", "kern/cp", "bit-exact");
  std::string json = "{\"bench\":\"pie\",\"device\":\"" + std::string(prop.name) +
                     "\",\"tokens\":" + std::to_string(tokens) +
                     ",\"layers\":32,\"kv_heads\":8,\"head_dim\":128,\"dtype\":\"bf16\","
                     "\"target_ratio\":1.25,\"cases\":[";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const double ratio = r.total_ms / r.copy_wall_ms;
    const double kratio = r.kernel_ms / r.copy_ms;
    std::printf("%8lld %8lld %9.3f %6zu %9.1f %10.3f %10.3f %9.3f %9.3f %7.2fx %7.2fx %6lld/%lld\n",
                static_cast<long long>(r.at), static_cast<long long>(r.moved_tokens),
                r.moved_bytes / (1 << 30), r.jobs, r.plan_us, r.kernel_ms, r.total_ms, r.copy_ms,
                r.copy_wall_ms, ratio, kratio, static_cast<long long>(r.checked - r.not_bit_exact),
                static_cast<long long>(r.checked));
    char buf[768];
    std::snprintf(
        buf, sizeof(buf),
        "%s{\"edit_at\":%lld,\"moved_tokens\":%lld,\"moved_bytes\":%.0f,\"jobs\":%zu,"
        "\"plan_us\":%.2f,\"kernel_ms\":%.4f,\"ropekv_ms\":%.4f,\"copy_ms\":%.4f,"
        "\"copy_wall_ms\":%.4f,\"ratio\":%.4f,\"kernel_ratio\":%.4f,\"kernel_gbps\":%.1f,"
        "\"copy_gbps\":%.1f,\"checked\":%lld,\"not_bit_exact\":%lld,\"worst_ulp\":%.3g}",
        i ? "," : "", static_cast<long long>(r.at), static_cast<long long>(r.moved_tokens),
        r.moved_bytes, r.jobs, r.plan_us, r.kernel_ms, r.total_ms, r.copy_ms, r.copy_wall_ms, ratio,
        kratio, 2 * r.moved_bytes / (r.kernel_ms * 1e6), 2 * r.moved_bytes / (r.copy_ms * 1e6),
        static_cast<long long>(r.checked), static_cast<long long>(r.not_bit_exact), r.worst_ulp);
    json += buf;
  }
  json += "]}";
  std::printf("ratio = ropekv ms / copy wall (target <= 1.25); kern/cp = kernel / copy (events)\n");
  std::printf("JSON %s\n", json.c_str());
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  CHECK_CUDA(cudaFree(fill_src));
  CHECK_CUDA(cudaFree(fill_block));
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
