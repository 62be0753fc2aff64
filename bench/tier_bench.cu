// tier_bench: host <-> GPU moves of blocks through the GPU tier's API (GpuTier::CopyIn/CopyOut on
// pinned host slots from the pinned allocator) against the pinned cudaMemcpy bandwidth of the
// same card, measured in the same run.
//
//   tier_bench [--block_mib 2] [--blocks 512] [--reps 20] [--device 0]
//
// Rows (median of --reps after 3 warm-up runs; every row is timed on the host clock from the
// first enqueue to the completed wait, so all rows pay the same synchronization):
//   cudaMemcpy H2D/D2H 1 copy     one cudaMemcpyAsync of all bytes, contiguous pinned <-> device
//   cudaMemcpy H2D/D2H per block  one cudaMemcpyAsync per block (same buffers), one sync
//   tier CopyIn/CopyOut batch=N   one GpuTier batch of all blocks, Wait
//   tier CopyIn/CopyOut batch=8   batches of 8 blocks, each waited before the next
//   tier CopyIn batch=1           one block per batch, each waited (the latency-bound case)
// The ratio column is against the 1-copy cudaMemcpy of the same direction (target >= 0.80 for
// the batch=N rows). The bytes are checked once: random blocks go in, come back out into
// poisoned buffers, and must match bit for bit. Prints a table and one JSON line.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "cache/gpu_tier.h"
#include "cache/pinned_allocator.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

#define CHECK_CUDA(expr)                                                                           \
  do {                                                                                             \
    const cudaError_t e = (expr);                                                                  \
    if (e != cudaSuccess) {                                                                        \
      std::fprintf(stderr, "tier_bench: %s: %s (%s:%d)\n", #expr, cudaGetErrorString(e), __FILE__, \
                   __LINE__);                                                                      \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

template <typename T>
T Check(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "tier_bench: %s: %s\n", what, std::string(v.status().message()).c_str());
    std::exit(1);
  }
  return *std::move(v);
}

void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "tier_bench: %s: %s\n", what, std::string(s.message()).c_str());
    std::exit(1);
  }
}

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Main(int argc, char** argv) {
  uint64_t block_bytes = 2ull << 20;
  int blocks = 512;
  int reps = 20;
  int device = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    int64_t v = 0;
    if (!absl::SimpleAtoi(argv[i + 1], &v) || v < 0) {
      std::fprintf(stderr, "tier_bench: bad value for %s\n", k.c_str());
      return 2;
    }
    if (k == "--block_mib") {
      block_bytes = static_cast<uint64_t>(v) << 20;
    } else if (k == "--blocks") {
      blocks = static_cast<int>(v);
    } else if (k == "--reps") {
      reps = static_cast<int>(v);
    } else if (k == "--device") {
      device = static_cast<int>(v);
    } else {
      std::fprintf(stderr, "tier_bench: unknown flag %s\n", k.c_str());
      return 2;
    }
  }
  if (!GpuAvailable()) {
    std::fprintf(stderr, "tier_bench: no GPU\n");
    return 1;
  }
  if (block_bytes == 0 || blocks <= 0 || reps <= 0) {
    std::fprintf(stderr, "tier_bench: sizes must be positive\n");
    return 2;
  }
  const uint64_t total = block_bytes * blocks;
  CHECK_CUDA(cudaSetDevice(device));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));

  // The tier and its host slots, as the cache uses them.
  GpuTier::Options options;
  options.capacity_bytes = total;
  options.chunk_bytes = block_bytes;  // a block a chunk
  options.device = device;
  std::unique_ptr<GpuTier> tier = Check(GpuTier::Create(options), "GpuTier::Create");
  std::unique_ptr<Allocator> pinned = Check(NewPinnedAllocator(3 * total), "NewPinnedAllocator");
  std::vector<char*> host(blocks), back(blocks);
  std::vector<GpuMove> in(blocks), out(blocks);
  std::mt19937_64 rng(11);
  for (int i = 0; i < blocks; ++i) {
    host[i] = static_cast<char*>(pinned->Allocate(block_bytes));
    back[i] = static_cast<char*>(pinned->Allocate(block_bytes));
    if (host[i] == nullptr || back[i] == nullptr) {
      std::fprintf(stderr, "tier_bench: pinned allocation failed\n");
      return 1;
    }
    for (uint64_t j = 0; j < block_bytes; j += 8) {
      const uint64_t v = rng();
      std::memcpy(host[i] + j, &v, std::min<uint64_t>(8, block_bytes - j));
    }
    const GpuSlot slot = Check(tier->AllocateSlot(block_bytes), "AllocateSlot");
    in[i] = {slot, host[i], block_bytes};
    out[i] = {slot, back[i], block_bytes};
  }

  // Correctness, once: in, out into poisoned buffers, compare every byte.
  for (int i = 0; i < blocks; ++i) std::memset(back[i], 0xff, block_bytes);
  Check(tier->Wait(Check(tier->CopyIn(in), "CopyIn")), "Wait");
  Check(tier->Wait(Check(tier->CopyOut(out), "CopyOut")), "Wait");
  for (int i = 0; i < blocks; ++i) {
    if (std::memcmp(host[i], back[i], block_bytes) != 0) {
      std::fprintf(stderr, "tier_bench: block %d came back different\n", i);
      return 1;
    }
  }

  // The baseline's buffers: contiguous pinned host memory and device memory of the same size.
  char* h_contig = nullptr;  // [total] pinned
  char* d_contig = nullptr;  // [total] device
  CHECK_CUDA(cudaHostAlloc(&h_contig, total, cudaHostAllocPortable));
  CHECK_CUDA(cudaMalloc(&d_contig, total));
  std::memset(h_contig, 0x5a, total);
  cudaStream_t stream = nullptr;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  struct Row {
    std::string name;
    std::string key;
    int direction;  // 0: H2D, 1: D2H
    std::vector<double> secs;
  };
  std::vector<Row> rows;
  auto measure = [&](const std::string& name, const std::string& key, int direction,
                     const std::function<void()>& run) {
    Row r{name, key, direction, {}};
    for (int i = 0; i < 3; ++i) run();
    for (int i = 0; i < reps; ++i) {
      const double t0 = Now();
      run();
      r.secs.push_back(Now() - t0);
    }
    rows.push_back(std::move(r));
  };

  measure("cudaMemcpy H2D 1 copy", "memcpy_h2d", 0, [&] {
    CHECK_CUDA(cudaMemcpyAsync(d_contig, h_contig, total, cudaMemcpyHostToDevice, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
  });
  measure("cudaMemcpy D2H 1 copy", "memcpy_d2h", 1, [&] {
    CHECK_CUDA(cudaMemcpyAsync(h_contig, d_contig, total, cudaMemcpyDeviceToHost, stream));
    CHECK_CUDA(cudaStreamSynchronize(stream));
  });
  measure("cudaMemcpy H2D per block", "memcpy_h2d_blocks", 0, [&] {
    for (int i = 0; i < blocks; ++i) {
      CHECK_CUDA(cudaMemcpyAsync(d_contig + i * block_bytes, host[i], block_bytes,
                                 cudaMemcpyHostToDevice, stream));
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
  });
  measure("cudaMemcpy D2H per block", "memcpy_d2h_blocks", 1, [&] {
    for (int i = 0; i < blocks; ++i) {
      CHECK_CUDA(cudaMemcpyAsync(back[i], d_contig + i * block_bytes, block_bytes,
                                 cudaMemcpyDeviceToHost, stream));
    }
    CHECK_CUDA(cudaStreamSynchronize(stream));
  });
  const std::string all = absl::StrFormat("batch=%d", blocks);
  measure("tier CopyIn " + all, "tier_in_batch_all", 0,
          [&] { Check(tier->Wait(Check(tier->CopyIn(in), "CopyIn")), "Wait"); });
  measure("tier CopyOut " + all, "tier_out_batch_all", 1,
          [&] { Check(tier->Wait(Check(tier->CopyOut(out), "CopyOut")), "Wait"); });
  auto batched = [&](const std::vector<GpuMove>& moves, bool to_device, int batch) {
    for (int i = 0; i < blocks; i += batch) {
      const auto span = absl::MakeConstSpan(moves).subspan(i, std::min(batch, blocks - i));
      const auto t = to_device ? tier->CopyIn(span) : tier->CopyOut(span);
      Check(tier->Wait(Check(t, "Copy")), "Wait");
    }
  };
  measure("tier CopyIn batch=8", "tier_in_batch_8", 0, [&] { batched(in, true, 8); });
  measure("tier CopyOut batch=8", "tier_out_batch_8", 1, [&] { batched(out, false, 8); });
  measure("tier CopyIn batch=1", "tier_in_batch_1", 0, [&] { batched(in, true, 1); });
  measure("tier CopyOut batch=1", "tier_out_batch_1", 1, [&] { batched(out, false, 1); });

  const double base[2] = {total / Median(rows[0].secs), total / Median(rows[1].secs)};
  std::printf("tier_bench on %s: %d blocks of %.2f MiB (%.0f MiB), median of %d\n", prop.name,
              blocks, block_bytes / 1048576.0, total / 1048576.0, reps);
  std::printf("%-28s %10s %10s %8s\n", "case", "GB/s", "ms", "ratio");
  std::string json = absl::StrFormat(
      "{\"bench\":\"tier_bench\",\"device\":\"%s\",\"block_bytes\":%d,\"blocks\":%d,\"reps\":%d",
      prop.name, block_bytes, blocks, reps);
  // nvcc does not check absl::StrFormat's arguments at compile time: a mismatch formats nothing
  // (topk_bench's JSON lost its rows so, RESULTS run 17). Fail instead.
  bool formatted = !json.empty() && !all.empty();
  for (const Row& r : rows) {
    const double t = Median(r.secs);
    const double bw = total / t;
    std::printf("%-28s %10.2f %10.3f %8.3f\n", r.name.c_str(), bw / 1e9, t * 1e3,
                bw / base[r.direction]);
    const size_t before = json.size();
    absl::StrAppendFormat(&json, ",\"%s_gbs\":%.3f,\"%s_ratio\":%.4f", r.key, bw / 1e9, r.key,
                          bw / base[r.direction]);
    formatted = formatted && json.size() > before;
  }
  if (!formatted) {
    std::fprintf(stderr, "tier_bench: the JSON line does not match its format\n");
    return 1;
  }
  json += "}";
  std::printf("%s\n", json.c_str());

  CHECK_CUDA(cudaStreamDestroy(stream));
  CHECK_CUDA(cudaFree(d_contig));
  CHECK_CUDA(cudaFreeHost(h_contig));
  for (int i = 0; i < blocks; ++i) {
    pinned->Free(host[i], block_bytes);
    pinned->Free(back[i], block_bytes);
  }
  return 0;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) { return ropekv::Main(argc, argv); }
