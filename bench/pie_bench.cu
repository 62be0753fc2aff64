// ropekv's own share of a PIE edit on the GPU — the DAEMON's code path — against copying the
// moved K/V once with cudaMemcpy, in one run. Shape: a 32K-token file cached for a
// Llama-3-8B-shaped model (32 layers x 8 KV heads x 128 dims, bf16, llama3 RoPE theta 500000).
//
// The frontend keeps its KV in one device buffer [layer][k|v][kv_head][capacity][head_dim]
// (capacity = tokens + 64). The session is a GPU-resident SessionStore session
// (cache/session.h, device kGpu: 2048 chunks of 16 tokens in pooled device memory), opened from
// that buffer device to device (SessionStore::OpenFrom). One edit = a one-line edit: replace 10
// tokens at `at` by 16 (Δ = +6). ropekv's share, timed wall-clock end to end (median of --reps,
// after warm-up; each repetition edits a fresh Snapshot of the opened session, made untimed):
//   1. SessionStore::Edit (piece list only: no KV byte moves),
//   2. SessionStore::Read of the moved suffix [at + 16, n) + SessionReader::WriteToDevice into the
//      frontend's buffer at token offset at + 16: PlanRead and ONE launch of the rope kernel
//      (shift and re-rotation fused with the copy), synchronized — what DataPlane.ReadToBuffer
//      runs for a CUDA IPC buffer on the session's GPU.
// Baseline: one cudaMemcpyAsync device-to-device of the moved K/V bytes (contiguous) + sync.
// Target (DESIGN.md): edit + read <= 1.25x the copy. Also timed: FillFrom of the 16 new tokens
// from the buffer (device to device), which the frontend does after its next-token forward.
// The result is checked once against the CPU reference (RerotateCopyCpu from the original KV) on
// three windows of 64 tokens of the moved suffix (all layers, heads, K and V), and the tokens
// around the suffix must still hold their poison.
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

#include "cache/kv_cache.h"
#include "cache/model.h"
#include "cache/session.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rerotate_cuda.h"
#include "kernels/rope/rope.h"

namespace {

using ropekv::DType;
using ropekv::EditOp;
using ropekv::KvGeometry;
using ropekv::KvStrides;
using ropekv::ModelSpec;
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
  double moved_bytes = 0;   // K+V bytes of the moved suffix (each read once, written once)
  double edit_us = 0;       // SessionStore::Edit, wall clock
  double read_ms = 0;       // Read + WriteToDevice (plan + one launch + sync), wall clock
  double total_ms = 0;      // edit + read, wall clock, synchronized
  double fill_ms = 0;       // FillFrom of the 16 new tokens (device to device), wall clock
  double copy_ms = 0;       // cudaMemcpy of the moved bytes (cudaEvents)
  double copy_wall_ms = 0;  // the same, wall clock, synchronized
  int64_t checked = 0, not_bit_exact = 0;
  double worst_ulp = 0;
};

// Median wall-clock milliseconds of fn() over `reps` runs after 3 warm-up runs; `before` and
// `after` run around each, untimed.
double WallMsAround(const std::function<void()>& before, const std::function<void()>& fn,
                    const std::function<void()>& after, int reps) {
  std::vector<double> ms;
  for (int i = 0; i < reps + 3; ++i) {
    before();
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    after();
    if (i >= 3) ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

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
  const KvGeometry geometry = ropekv::BlockGeometry(spec);
  const size_t es = 2;
  const int64_t n_blocks = tokens / kBlock;
  const int64_t capacity = tokens + 64;  // the frontend's cache, room for the grown file
  const KvStrides buf_strides = ropekv::RangeStrides(spec, capacity);
  const size_t buf_bytes = ropekv::RangeBytes(spec, capacity);

  // The daemon's stores: a KvCache (models) and a GPU-resident SessionStore.
  auto cache_or = ropekv::KvCache::Create(ropekv::KvCache::Options());
  CHECK_OK(cache_or.status());
  auto& cache = *cache_or;
  CHECK_OK(cache->RegisterModel(spec, "llama-3-8b-shape").status());
  ropekv::SessionStore::Options so;
  so.device = ropekv::SessionDevice::kGpu;
  so.gpu_device = device;
  so.capacity_bytes = 3 * ropekv::RangeBytes(spec, tokens);
  auto store_or = ropekv::SessionStore::Create(cache.get(), so);
  CHECK_OK(store_or.status());
  ropekv::SessionStore& store = **store_or;

  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreate(&stream));
  void *buf = nullptr, *scratch = nullptr;
  CHECK_CUDA(cudaMalloc(&buf, buf_bytes));      // the frontend's KV cache
  CHECK_CUDA(cudaMalloc(&scratch, buf_bytes));  // the baseline copy's destination
  FillRandomOnDevice(buf, buf_bytes / es, 0x5eed, stream);
  CHECK_CUDA(cudaStreamSynchronize(stream));
  std::vector<uint16_t> host_buf(buf_bytes / es), host_out(buf_bytes / es);
  CHECK_CUDA(cudaMemcpy(host_buf.data(), buf, buf_bytes, cudaMemcpyDeviceToHost));

  // Open: the file's KV (tokens [0, n) of the buffer, keys at their positions), device to device.
  ropekv::OpenSessionArgs open;
  open.model = "llama-3-8b-shape";
  open.tokens.assign(static_cast<size_t>(tokens), 1);
  const auto t_open = std::chrono::steady_clock::now();
  auto opened = store.OpenFrom(open, ropekv::KvSource{buf, buf_strides, 0, device});
  CHECK_OK(opened.status());
  const double open_ms = std::chrono::duration<double, std::milli>(
                             std::chrono::steady_clock::now() - t_open)
                             .count();
  const std::string pristine = opened->id;

  std::vector<Result> results;
  for (const int64_t at : ats) {
    Result r;
    r.at = at;
    const std::vector<EditOp> ops = {EditOp::Replace(at, at + kOld, std::vector<int32_t>(kNew, 7))};
    const int64_t new_length = tokens - kOld + kNew;
    const TokenRange moved{at + kNew, new_length};
    r.moved_tokens = moved.size();
    r.moved_bytes = static_cast<double>(ropekv::RangeBytes(spec, moved.size()));

    std::string sid;
    auto fresh = [&] {
      auto snap = store.Snapshot(pristine);
      CHECK_OK(snap.status());
      sid = snap->id;
    };
    auto done = [&] { CHECK_OK(store.Close(sid)); };
    auto edit = [&] { CHECK_OK(store.Edit(sid, ops).status()); };
    auto read = [&] {
      auto reader = store.Read(sid, moved);
      CHECK_OK(reader.status());
      CHECK_OK(reader->WriteToDevice(buf, buf_strides, moved.start));
    };
    ropekv::FillArgs fill;
    fill.range = TokenRange{at, at + kNew};
    auto fill_new = [&] {
      CHECK_OK(store.FillFrom(sid, fill, ropekv::KvSource{buf, buf_strides, at, device}).status());
    };

    // Correctness once: poisoned buffer, then sampled windows against the CPU reference.
    fresh();
    CHECK_CUDA(cudaMemset(buf, 0xFF, buf_bytes));
    edit();
    read();
    done();
    CHECK_CUDA(cudaMemcpy(host_out.data(), buf, buf_bytes, cudaMemcpyDeviceToHost));
    std::vector<uint16_t> ref(buf_bytes / es, 0xFFFF);
    const int64_t windows[3] = {moved.start, moved.start + moved.size() / 2, moved.end - 64};
    std::vector<RerotateCopy> sample;
    for (int64_t lo : windows) {
      // Token t' of the edited file was token t' - (kNew - kOld) of the original, rotated there.
      const int64_t from = lo - (kNew - kOld);
      sample.push_back(RerotateCopy{host_buf.data(), buf_strides, from, ref.data(), buf_strides, lo,
                                    64, from, ropekv::kBaseTable, lo, ropekv::kBaseTable});
    }
    CHECK_OK(ropekv::RerotateCopyCpu(spec.rope, geometry, sample, RerotateMode::kEngine));
    for (int l = 0; l < kLayers; ++l) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int h = 0; h < kHeads; ++h) {
          const size_t row = l * buf_strides.layer + kv * buf_strides.kv + h * buf_strides.head;
          // The tokens just before and after the suffix are not the read's: still poison.
          for (int64_t t : {moved.start - 1, moved.end}) {
            for (int d = 0; d < kDim; ++d) {
              if (host_out[row + t * buf_strides.token + d] != 0xFFFF) {
                std::fprintf(stderr, "at %lld: token %lld outside the read was written\n",
                             static_cast<long long>(at), static_cast<long long>(t));
                return 1;
              }
            }
          }
          for (int64_t lo : windows) {
            for (int64_t t = lo; t < lo + 64; ++t) {
              for (int d = 0; d < kDim; ++d) {
                const size_t i = row + t * buf_strides.token + d;
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

    // Timing: the edit alone, the read alone, both (ropekv's share), the fill, the copy.
    r.edit_us = 1e3 * WallMsAround(fresh, edit, done, reps);
    r.read_ms = WallMsAround([&] { fresh(); edit(); }, read, done, reps);
    r.total_ms = WallMsAround(fresh, [&] { edit(); read(); }, done, reps);
    r.fill_ms = WallMsAround([&] { fresh(); edit(); }, fill_new, done, reps);
    const size_t moved_bytes = static_cast<size_t>(r.moved_bytes);
    r.copy_ms = EventMs(
        [&] {
          CHECK_CUDA(cudaMemcpyAsync(scratch, buf, moved_bytes, cudaMemcpyDeviceToDevice, stream));
        },
        stream, reps);
    r.copy_wall_ms = WallMs(
        [] {},
        [&] {
          CHECK_CUDA(cudaMemcpyAsync(scratch, buf, moved_bytes, cudaMemcpyDeviceToDevice, stream));
          CHECK_CUDA(cudaStreamSynchronize(stream));
        },
        reps);
    results.push_back(r);
  }

  std::printf(
      "pie_bench: %s, %d SMs; %d layers x %d KV heads x %d dims bf16, llama3 RoPE theta %.0f; "
      "%lld-token file, GPU session of %lld chunks of %d (opened from the buffer D2D in %.1f ms); "
      "edit = replace %d tokens by %d; median of %d\n",
      prop.name, prop.multiProcessorCount, kLayers, kHeads, kDim, spec.rope.theta,
      static_cast<long long>(tokens), static_cast<long long>(n_blocks), kBlock, open_ms, kOld,
      kNew, reps);
  std::printf("%8s %8s %9s %9s %9s %10s %9s %9s %9s %8s %12s\n", "edit at", "moved",
              "GiB (K+V)", "edit us", "read ms", "ropekv ms", "fill ms", "copy ms", "copy wall",
              "ratio", "bit-exact");
  std::string json = "{\"bench\":\"pie\",\"path\":\"SessionStore(gpu)\",\"device\":\"" +
                     std::string(prop.name) + "\",\"tokens\":" + std::to_string(tokens) +
                     ",\"layers\":32,\"kv_heads\":8,\"head_dim\":128,\"dtype\":\"bf16\","
                     "\"open_ms\":" + std::to_string(open_ms) +
                     ",\"target_ratio\":1.25,\"cases\":[";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    const double ratio = r.total_ms / r.copy_wall_ms;
    std::printf("%8lld %8lld %9.3f %9.1f %9.3f %10.3f %9.3f %9.3f %9.3f %7.2fx %6lld/%lld\n",
                static_cast<long long>(r.at), static_cast<long long>(r.moved_tokens),
                r.moved_bytes / (1 << 30), r.edit_us, r.read_ms, r.total_ms, r.fill_ms, r.copy_ms,
                r.copy_wall_ms, ratio, static_cast<long long>(r.checked - r.not_bit_exact),
                static_cast<long long>(r.checked));
    char line[768];
    std::snprintf(
        line, sizeof(line),
        "%s{\"edit_at\":%lld,\"moved_tokens\":%lld,\"moved_bytes\":%.0f,\"edit_us\":%.2f,"
        "\"read_ms\":%.4f,\"ropekv_ms\":%.4f,\"fill_ms\":%.4f,\"copy_ms\":%.4f,"
        "\"copy_wall_ms\":%.4f,\"ratio\":%.4f,\"read_gbps\":%.1f,\"copy_gbps\":%.1f,"
        "\"checked\":%lld,\"not_bit_exact\":%lld,\"worst_ulp\":%.3g}",
        i ? "," : "", static_cast<long long>(r.at), static_cast<long long>(r.moved_tokens),
        r.moved_bytes, r.edit_us, r.read_ms, r.total_ms, r.fill_ms, r.copy_ms, r.copy_wall_ms,
        ratio, 2 * r.moved_bytes / (r.read_ms * 1e6), 2 * r.moved_bytes / (r.copy_ms * 1e6),
        static_cast<long long>(r.checked), static_cast<long long>(r.not_bit_exact), r.worst_ulp);
    json += line;
  }
  json += "]}";
  std::printf("ratio = ropekv ms (edit + read, wall) / copy wall (target <= 1.25)\n");
  std::printf("JSON %s\n", json.c_str());
  CHECK_CUDA(cudaFree(buf));
  CHECK_CUDA(cudaFree(scratch));
  CHECK_CUDA(cudaStreamDestroy(stream));
  return 0;
}
