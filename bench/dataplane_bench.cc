// Benchmark: Get of a Llama-3-8B-shaped KV cache into a client's buffer — by gRPC bytes, by a
// registered shared-memory region, and (CUDA build with a GPU) by a registered GPU buffer shared
// through CUDA IPC — against memcpy / cudaMemcpy of the same bytes, all in one run.
//
// It starts its own ropekvd (--ropekvd, default the one built beside it; host tier sized to the
// cache, disk tier off), stores the cache once from shared memory (PutFromBuffer), checks every
// path's bytes once against the generated pattern (destinations poisoned first), then times each
// path: median of --reps after --warmup, wall clock around the call (the daemon's copy included;
// the CUDA path's daemon-side stream sync included). A table and one JSON line.
//
//   dataplane_bench [--tokens 32768] [--reps 10] [--rerotate] [--cuda auto|on|off]
//
// Memory: the daemon holds the cache (tokens/16 x 2 MiB), the client a shared region and a
// host buffer of the same size (3x the cache in all; 12 GiB at 32K tokens).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "clients/cpp/client.h"
#include "clients/cpp/dataplane_client.h"

#ifdef ROPEKV_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef ROPEKVD_PATH
#define ROPEKVD_PATH "ropekvd"
#endif

ABSL_FLAG(std::string, ropekvd, "",
          "ropekvd binary to start; default $ROPEKVD, else ropekvd beside this binary, else the "
          "one of the build");
ABSL_FLAG(int32_t, tokens, 32768, "tokens of the cache (a multiple of --block_tokens)");
ABSL_FLAG(int32_t, layers, 32, "layers");
ABSL_FLAG(int32_t, kv_heads, 8, "KV heads");
ABSL_FLAG(int32_t, head_dim, 128, "head dim");
ABSL_FLAG(int32_t, block_tokens, 16, "tokens per block");
ABSL_FLAG(int32_t, reps, 10, "timed repetitions per path (median reported)");
ABSL_FLAG(int32_t, warmup, 2, "untimed repetitions first");
ABSL_FLAG(bool, rerotate, true, "also time Gets re-rotated to a new position");
ABSL_FLAG(std::string, cuda, "auto", "CUDA IPC rows: auto (when a GPU is present), on, off");

namespace ropekv {
namespace {

using Clock = std::chrono::steady_clock;

[[noreturn]] void Die(const std::string& why) {
  std::cerr << "dataplane_bench: " << why << "\n";
  std::exit(1);
}

#define CHECK_OK(expr)                                                    \
  do {                                                                    \
    const auto& _s = (expr);                                              \
    if (!_s.ok()) Die(absl::StrCat(#expr, ": ", _s.status().ToString())); \
  } while (0)

#ifdef ROPEKV_WITH_CUDA
#define CUDA_CHECK(expr)                                                           \
  do {                                                                             \
    cudaError_t _e = (expr);                                                       \
    if (_e != cudaSuccess) Die(absl::StrCat(#expr, ": ", cudaGetErrorString(_e))); \
  } while (0)
#endif

// A ropekvd child process on a free loopback port.
class Daemon {
 public:
  Daemon(const std::string& binary, uint64_t host_bytes) {
    dir_ = absl::StrCat("/tmp/ropekv-dataplane-bench-", getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    const std::string port_file = dir_ + "/port";
    std::vector<std::string> args = {binary,
                                     "--listen=127.0.0.1:0",
                                     "--data_dir=" + dir_,
                                     "--port_file=" + port_file,
                                     absl::StrCat("--host_capacity=", host_bytes),
                                     "--disk_enabled=false",
                                     "--allow_buffers=on"};
    pid_ = fork();
    if (pid_ == 0) {
      const int log = open((dir_ + "/log").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (log >= 0) {
        dup2(log, 1);
        dup2(log, 2);
      }
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const auto deadline = Clock::now() + std::chrono::seconds(60);
    while (Clock::now() < deadline) {
      std::ifstream in(port_file);
      if (in >> port_ && port_ > 0) return;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) Die("ropekvd exited; see " + dir_ + "/log");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    Die("ropekvd did not start within 60 s");
  }
  ~Daemon() {
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    std::filesystem::remove_all(dir_);
  }
  std::string address() const { return absl::StrCat("127.0.0.1:", port_); }

 private:
  std::string dir_;
  int pid_ = -1;
  int port_ = 0;
};

// The cache's bytes: 16 random blocks tiled, each block's first 8 bytes its index (a misplaced
// block fails the check). bf16 bits kept finite (re-rotation reads them as numbers).
class Pattern {
 public:
  Pattern(uint64_t block_bytes) : bb_(block_bytes), base_(16 * block_bytes) {
    std::mt19937_64 rng(42);
    for (size_t i = 0; i < base_.size(); ++i) {
      base_[i] = static_cast<uint8_t>(i % 2 ? (rng() & 0x3F) : rng());
    }
  }
  void Fill(uint64_t block, uint8_t* dst) const {
    std::memcpy(dst, base_.data() + (block % 16) * bb_, bb_);
    std::memcpy(dst, &block, 8);
  }
  // Index of the first block of `blocks` at `p` that differs, or -1.
  int64_t FirstMismatch(const uint8_t* p, uint64_t blocks) const {
    std::vector<uint8_t> want(bb_);
    for (uint64_t b = 0; b < blocks; ++b) {
      Fill(b, want.data());
      if (std::memcmp(p + b * bb_, want.data(), bb_) != 0) return static_cast<int64_t>(b);
    }
    return -1;
  }

 private:
  uint64_t bb_;
  std::vector<uint8_t> base_;
};

std::string DaemonBinary() {
  if (std::string flag = absl::GetFlag(FLAGS_ropekvd); !flag.empty()) return flag;
  if (const char* env = std::getenv("ROPEKVD"); env != nullptr && *env != '\0') return env;
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec && std::filesystem::exists(self.parent_path() / "ropekvd", ec)) {
    return (self.parent_path() / "ropekvd").string();
  }
  return ROPEKVD_PATH;
}

double MedianMs(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// Runs fn warmup + reps times; the median of the timed runs in ms.
double Time(const std::function<void()>& fn, int reps, int warmup) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = Clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  return MedianMs(ms);
}

struct Row {
  std::string name;
  std::string key;
  double ms = 0;
  std::string baseline;  // "memcpy" or "cudaMemcpy"
};

int Main() {
  const int tokens = absl::GetFlag(FLAGS_tokens);
  const int bt = absl::GetFlag(FLAGS_block_tokens);
  if (tokens <= 0 || tokens % bt != 0)
    Die("--tokens must be a positive multiple of --block_tokens");
  const int reps = absl::GetFlag(FLAGS_reps), warmup = absl::GetFlag(FLAGS_warmup);

  v1::ModelSpec spec;
  spec.set_layers(absl::GetFlag(FLAGS_layers));
  spec.set_kv_heads(absl::GetFlag(FLAGS_kv_heads));
  spec.set_head_dim(absl::GetFlag(FLAGS_head_dim));
  spec.set_dtype(v1::DTYPE_BF16);
  spec.set_block_tokens(bt);
  v1::RopeSpec* rope = spec.mutable_rope();
  rope->set_type(v1::ROPE_TYPE_LLAMA3);
  rope->set_theta(500000);
  rope->set_factor(8);
  rope->set_original_max_position_embeddings(8192);
  const uint64_t blocks = tokens / bt;
  const uint64_t bb = client::KvShape::Of(spec, 1).BlockBytes();
  const uint64_t total = blocks * bb;

  Daemon daemon(DaemonBinary(), total + total / 8 + (64ull << 20));
  client::Client::Options o;
  o.address = daemon.address();
  o.timeout = absl::Minutes(10);
  auto kv = client::Client::Connect(o);
  CHECK_OK(kv);
  auto dp = client::DataPlaneClient::Connect(o);
  CHECK_OK(dp);
  CHECK_OK((*kv)->RegisterModel(spec, "bench-llama3-8b"));

  // The client's shared region; the cache is stored from it.
  Pattern pattern(bb);
  auto shm = client::SharedMemory::Create(absl::StrCat("/ropekv-bench-", getpid()), total);
  CHECK_OK(shm);
  uint8_t* region = (*shm)->data();
  for (uint64_t b = 0; b < blocks; ++b) pattern.Fill(b, region + b * bb);
  CHECK_OK((*dp)->RegisterShm("bench", (*shm)->name(), total));
  std::vector<int32_t> toks(tokens);
  std::mt19937 trng(7);
  for (auto& t : toks) t = static_cast<int32_t>(trng() % 128000);
  client::PutArgs put;
  put.model = "bench-llama3-8b";
  put.tokens = toks;
  const auto put0 = Clock::now();
  auto stored = (*dp)->PutFromBuffer(put, {"bench", 0, 0});
  CHECK_OK(stored);
  const double put_ms = std::chrono::duration<double, std::milli>(Clock::now() - put0).count();
  if (stored->blocks_stored() != blocks) Die("Put stored fewer blocks than sent");

  client::GetArgs get;
  get.model = put.model;
  get.tokens = toks;
  client::GetArgs moved = get;
  moved.target_position = 100000;
  std::vector<uint8_t> host(total);
  std::memset(host.data(), 0xFF, total);  // pages touched before timing

  // Checks, once: every path's bytes against the pattern, destinations poisoned first.
  bool ok = true;
  std::memset(region, 0xFF, total);
  auto g = (*dp)->GetToBuffer(get, {"bench", 0, 0});
  CHECK_OK(g);
  if (g->bytes_written() != total || pattern.FirstMismatch(region, blocks) >= 0) {
    ok = false;
    std::cerr << "shared-memory Get: wrong bytes\n";
  }
  auto gh = (*kv)->GetInto(get, absl::MakeSpan(host));
  CHECK_OK(gh);
  if (pattern.FirstMismatch(host.data(), blocks) >= 0) {
    ok = false;
    std::cerr << "gRPC Get: wrong bytes\n";
  }
  // Re-rotated: both paths must give the same bytes.
  if (absl::GetFlag(FLAGS_rerotate)) {
    CHECK_OK((*dp)->GetToBuffer(moved, {"bench", 0, 0}));
    CHECK_OK((*kv)->GetInto(moved, absl::MakeSpan(host)));
    if (std::memcmp(region, host.data(), total) != 0) {
      ok = false;
      std::cerr << "re-rotated Get: shared memory and gRPC differ\n";
    }
  }

  std::vector<Row> rows;
  const uint8_t* src = region;
  rows.push_back({"memcpy of the same bytes (host)", "memcpy",
                  Time([&] { std::memcpy(host.data(), src, total); }, reps, warmup), "memcpy"});
  // The daemon splits a shared-memory copy among up to 8 threads (one per core): the same here.
  const int copy_threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
  rows.push_back({absl::StrCat("memcpy, ", copy_threads, " threads (host)"), "memcpy_threads",
                  Time(
                      [&] {
                        std::vector<std::thread> threads;
                        const uint64_t per = (blocks + copy_threads - 1) / copy_threads * bb;
                        for (int t = 0; t < copy_threads; ++t) {
                          const uint64_t begin = std::min<uint64_t>(t * per, total);
                          const uint64_t end = std::min<uint64_t>(begin + per, total);
                          threads.emplace_back([&, begin, end] {
                            std::memcpy(host.data() + begin, src + begin, end - begin);
                          });
                        }
                        for (auto& th : threads) th.join();
                      },
                      reps, warmup),
                  "memcpy"});
  rows.push_back({"gRPC Get into a buffer", "grpc_get",
                  Time([&] { CHECK_OK((*kv)->GetInto(get, absl::MakeSpan(host))); }, reps, warmup),
                  "memcpy"});
  rows.push_back({"shared-memory Get (GetToBuffer)", "shm_get",
                  Time(
                      [&] {
                        CHECK_OK((*dp)->GetToBuffer(get, {"bench", 0, 0}));
                      },
                      reps, warmup),
                  "memcpy"});
  if (absl::GetFlag(FLAGS_rerotate)) {
    rows.push_back(
        {"gRPC Get, re-rotated", "grpc_get_rerotated",
         Time([&] { CHECK_OK((*kv)->GetInto(moved, absl::MakeSpan(host))); }, reps, warmup),
         "memcpy"});
    rows.push_back({"shared-memory Get, re-rotated", "shm_get_rerotated",
                    Time(
                        [&] {
                          CHECK_OK((*dp)->GetToBuffer(moved, {"bench", 0, 0}));
                        },
                        reps, warmup),
                    "memcpy"});
  }

  std::string gpu_name;
#ifdef ROPEKV_WITH_CUDA
  int devices = 0;
  const bool have_gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  cudaGetLastError();
  const std::string cuda_mode = absl::GetFlag(FLAGS_cuda);
  if (cuda_mode == "on" && !have_gpu) Die("--cuda=on but no GPU is present");
  if (have_gpu && cuda_mode != "off") {
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    gpu_name = prop.name;
    CUDA_CHECK(cudaSetDevice(0));
    void* d_dst = nullptr;
    CUDA_CHECK(cudaMalloc(&d_dst, total));
    cudaIpcMemHandle_t handle;
    CUDA_CHECK(cudaIpcGetMemHandle(&handle, d_dst));
    CHECK_OK((*dp)->RegisterCudaIpc(
        "gpu", 0, std::string(reinterpret_cast<const char*>(&handle), sizeof(handle)), 0, total));
    CUDA_CHECK(cudaMemset(d_dst, 0xFF, total));
    CUDA_CHECK(cudaDeviceSynchronize());
    CHECK_OK((*dp)->GetToBuffer(get, {"gpu", 0, 0}));
    CUDA_CHECK(cudaMemcpy(host.data(), d_dst, total, cudaMemcpyDeviceToHost));
    if (pattern.FirstMismatch(host.data(), blocks) >= 0) {
      ok = false;
      std::cerr << "CUDA IPC Get: wrong bytes\n";
    }
    void* pinned = nullptr;
    CUDA_CHECK(cudaHostAlloc(&pinned, total, cudaHostAllocDefault));
    std::memcpy(pinned, region, total);
    rows.push_back(
        {"cudaMemcpy H2D from pinned memory", "cuda_memcpy_pinned",
         Time([&] { CUDA_CHECK(cudaMemcpy(d_dst, pinned, total, cudaMemcpyHostToDevice)); }, reps,
              warmup),
         "cudaMemcpy"});
    rows.push_back(
        {"cudaMemcpy H2D from pageable memory", "cuda_memcpy_pageable",
         Time([&] { CUDA_CHECK(cudaMemcpy(d_dst, region, total, cudaMemcpyHostToDevice)); }, reps,
              warmup),
         "cudaMemcpy"});
    rows.push_back({"CUDA IPC Get (GetToBuffer)", "cuda_ipc_get",
                    Time(
                        [&] {
                          CHECK_OK((*dp)->GetToBuffer(get, {"gpu", 0, 0}));
                        },
                        reps, warmup),
                    "cudaMemcpy"});
    if (absl::GetFlag(FLAGS_rerotate)) {
      CHECK_OK((*dp)->GetToBuffer(moved, {"gpu", 0, 0}));
      CUDA_CHECK(cudaMemcpy(pinned, d_dst, total, cudaMemcpyDeviceToHost));
      CHECK_OK((*dp)->GetToBuffer(moved, {"bench", 0, 0}));
      if (std::memcmp(pinned, region, total) != 0) {
        ok = false;
        std::cerr << "re-rotated CUDA IPC Get differs from the shared-memory one\n";
      }
      rows.push_back({"CUDA IPC Get, re-rotated", "cuda_ipc_get_rerotated",
                      Time(
                          [&] {
                            CHECK_OK((*dp)->GetToBuffer(moved, {"gpu", 0, 0}));
                          },
                          reps, warmup),
                      "cudaMemcpy"});
    }
    CHECK_OK((*dp)->Unregister("gpu"));
    CUDA_CHECK(cudaFreeHost(pinned));
    CUDA_CHECK(cudaFree(d_dst));
  }
#endif
  CHECK_OK((*dp)->Unregister("bench"));

  double memcpy_ms = 0, cuda_ms = 0, grpc_ms = 0, shm_ms = 0;
  for (const Row& r : rows) {
    if (r.key == "memcpy") memcpy_ms = r.ms;
    if (r.key == "cuda_memcpy_pinned") cuda_ms = r.ms;
    if (r.key == "grpc_get") grpc_ms = r.ms;
    if (r.key == "shm_get") shm_ms = r.ms;
  }
  char host_name[256] = {0};
  gethostname(host_name, sizeof(host_name) - 1);
  std::printf(
      "Get of %d tokens = %llu blocks x %.2f MiB = %.3f GiB (%d layers, %d kv heads, head_dim %d, "
      "bf16); median of %d after %d warm-up; %s%s%s\n",
      tokens, static_cast<unsigned long long>(blocks), bb / 1048576.0, total / 1073741824.0,
      spec.layers(), spec.kv_heads(), spec.head_dim(), reps, warmup, host_name,
      gpu_name.empty() ? "" : "; GPU ", gpu_name.c_str());
  std::printf("%-38s %10s %8s %12s\n", "path", "ms", "GB/s", "x baseline");
  std::string json =
      absl::StrCat("{\"bench\":\"dataplane_get\",\"tokens\":", tokens, ",\"blocks\":", blocks,
                   ",\"block_bytes\":", bb, ",\"bytes\":", total, ",\"reps\":", reps,
                   ",\"put_ms\":", put_ms, ",\"bytes_match\":", ok ? "true" : "false",
                   ",\"host\":\"", host_name, "\",\"gpu\":\"", gpu_name, "\"");
  for (const Row& r : rows) {
    const double base = r.baseline == "memcpy" ? memcpy_ms : cuda_ms;
    std::printf("%-38s %10.2f %8.2f %12.2f\n", r.name.c_str(), r.ms, total / r.ms / 1e6,
                base > 0 ? r.ms / base : 0.0);
    absl::StrAppend(&json, ",\"", r.key, "_ms\":", absl::StrFormat("%.3f", r.ms));
  }
  if (grpc_ms > 0 && shm_ms > 0) {
    std::printf("shared memory vs gRPC bytes: %.2fx faster (target >= 3x)\n", grpc_ms / shm_ms);
    absl::StrAppend(&json,
                    ",\"shm_speedup_over_grpc\":", absl::StrFormat("%.3f", grpc_ms / shm_ms));
  }
  absl::StrAppend(&json, "}");
  std::printf("%s\n", json.c_str());
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ropekv::Main();
}
