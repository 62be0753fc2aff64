// Benchmark: Get of a Llama-3-8B-shaped KV cache into a client's buffer — by gRPC bytes, by a
// registered shared-memory region, and (CUDA build with a GPU) by a registered GPU buffer shared
// through CUDA IPC — against memcpy / cudaMemcpy of the same bytes, all in one run.
//
// It starts its own ropekvd (--ropekvd, default the one built beside it; host tier sized to the
// cache, disk tier off), stores the cache once from shared memory (PutFromBuffer), checks every
// path's bytes once against the generated pattern (destinations poisoned first), then times each
// path: median of --reps after --warmup, wall clock around the call (the daemon's copy included;
// the CUDA path's daemon-side stream sync included). Rows are printed (flushed) as they are
// measured, progress goes to stderr with timestamps; a JSON line ends the run.
//
// CUDA rows: GetToBuffer into a cudaMalloc'd buffer of this process registered by IPC handle, as
// stored and re-rotated (the daemon's GPU kernel), and into a paged pool by block ids; baselines
// cudaMemcpy H2D from pinned and pageable memory and D2D of the same bytes.
//
//   dataplane_bench [--tokens 32768] [--reps 5] [--slow_reps 1] [--rerotate] [--cuda auto|on|off]
//                   [--clients N] [--streams S] [--daemon_flags="--kvcache_threads=1 ..."]
//
// --clients N adds a row: N clients, each its own connection and buffer, doing a gRPC Get of the
// whole cache at once (wall time until the last has its bytes; aggregate GB/s). --streams S adds
// one: one client's Get of the cache as S block ranges over S connections (GetArgs::streams).
// --daemon_flags passes more flags to the daemon it starts.
//
// Memory: the daemon holds the cache (tokens/16 x 2 MiB), the client a shared region, a host
// buffer and (GPU) a pinned buffer of the same size (4x the cache in all; 16 GiB at 32K tokens),
// and two device buffers of the cache's size; --clients N adds N host buffers of the cache's size.
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
#include "absl/strings/str_split.h"
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
ABSL_FLAG(int32_t, reps, 5, "timed repetitions per path (median reported)");
ABSL_FLAG(int32_t, warmup, 2, "untimed repetitions first");
ABSL_FLAG(int32_t, slow_reps, 1,
          "timed repetitions of the CPU re-rotation rows (seconds each at 32K tokens)");
ABSL_FLAG(bool, rerotate, true, "also time Gets re-rotated to a new position");
ABSL_FLAG(std::string, cuda, "auto", "CUDA IPC rows: auto (when a GPU is present), on, off");
ABSL_FLAG(int32_t, clients, 0,
          "also time this many clients (each its own connection and buffer) doing a gRPC Get of "
          "the whole cache at once; 0: not");
ABSL_FLAG(int32_t, streams, 0,
          "also time one client's Get as this many block ranges over as many connections");
ABSL_FLAG(std::string, daemon_flags, "",
          "more ropekvd flags, space-separated (e.g. --kvcache_threads=1)");

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
    for (absl::string_view f :
         absl::StrSplit(absl::GetFlag(FLAGS_daemon_flags), ' ', absl::SkipEmpty())) {
      args.emplace_back(f);
    }
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

const Clock::time_point g_start = Clock::now();

// A progress line on stderr (unbuffered), with the seconds since start: a run cut short still
// says how far it came.
void Progress(const std::string& what) {
  std::fprintf(stderr, "[%7.1f s] %s\n",
               std::chrono::duration<double>(Clock::now() - g_start).count(), what.c_str());
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

// The table, printed (and flushed) row by row as each path is measured.
class Table {
 public:
  explicit Table(uint64_t bytes) : bytes_(bytes) {
    std::printf("%-44s %10s %8s %12s\n", "path", "ms", "GB/s", "x baseline");
    std::fflush(stdout);
  }
  // Times fn and prints its row; `baseline` names an earlier row's key (empty: this row is one).
  double Row(const std::string& name, const std::string& key, const std::string& baseline,
             const std::function<void()>& fn, int reps, int warmup) {
    Progress("timing: " + name);
    const double ms = Time(fn, reps, warmup);
    double base = 0;
    for (const auto& [k, v] : rows_) {
      if (k == baseline) base = v;
    }
    rows_.emplace_back(key, ms);
    std::printf("%-44s %10.2f %8.2f %12s\n", name.c_str(), ms, bytes_ / ms / 1e6,
                base > 0 ? absl::StrFormat("%.2f", ms / base).c_str() : "1.00 (base)");
    std::fflush(stdout);
    return ms;
  }
  double Ms(const std::string& key) const {
    for (const auto& [k, v] : rows_) {
      if (k == key) return v;
    }
    return 0;
  }
  std::string Json() const {
    std::string out;
    for (const auto& [k, v] : rows_)
      absl::StrAppend(&out, ",\"", k, "_ms\":", absl::StrFormat("%.3f", v));
    return out;
  }

 private:
  uint64_t bytes_;
  std::vector<std::pair<std::string, double>> rows_;
};

int Main() {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // rows reach a pipe or file as they are printed
  const int tokens = absl::GetFlag(FLAGS_tokens);
  const int bt = absl::GetFlag(FLAGS_block_tokens);
  if (tokens <= 0 || tokens % bt != 0)
    Die("--tokens must be a positive multiple of --block_tokens");
  const int reps = absl::GetFlag(FLAGS_reps), warmup = absl::GetFlag(FLAGS_warmup);
  const int slow_reps = absl::GetFlag(FLAGS_slow_reps);

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

  char host_name[256] = {0};
  gethostname(host_name, sizeof(host_name) - 1);
  std::printf(
      "Get of %d tokens = %llu blocks x %.2f MiB = %.3f GiB (%d layers, %d kv heads, head_dim %d, "
      "bf16); median of %d after %d warm-up (CPU re-rotation rows: %d, no warm-up); %s\n",
      tokens, static_cast<unsigned long long>(blocks), bb / 1048576.0, total / 1073741824.0,
      spec.layers(), spec.kv_heads(), spec.head_dim(), reps, warmup, slow_reps, host_name);

  Progress("starting ropekvd");
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
  Progress("filling the shared region and storing the cache (PutFromBuffer)");
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
  Progress("checking the shared-memory and gRPC paths");
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
  // Re-rotated: both CPU paths must give the same bytes. `region` keeps them for the GPU check.
  const bool rerotate = absl::GetFlag(FLAGS_rerotate);
  if (rerotate) {
    CHECK_OK((*dp)->GetToBuffer(moved, {"bench", 0, 0}));
    CHECK_OK((*kv)->GetInto(moved, absl::MakeSpan(host)));
    if (std::memcmp(region, host.data(), total) != 0) {
      ok = false;
      std::cerr << "re-rotated Get: shared memory and gRPC differ\n";
    }
  }

  Table table(total);
  const uint8_t* src = region;
  table.Row(
      "memcpy of the same bytes (host)", "memcpy", "",
      [&] { std::memcpy(host.data(), src, total); }, reps, warmup);
  // The daemon splits a shared-memory copy among up to 8 threads (one per core): the same here.
  const int copy_threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
  table.Row(
      absl::StrCat("memcpy, ", copy_threads, " threads (host)"), "memcpy_threads", "memcpy",
      [&] {
        std::vector<std::thread> threads;
        const uint64_t per = (blocks + copy_threads - 1) / copy_threads * bb;
        for (int t = 0; t < copy_threads; ++t) {
          const uint64_t begin = std::min<uint64_t>(t * per, total);
          const uint64_t end = std::min<uint64_t>(begin + per, total);
          threads.emplace_back(
              [&, begin, end] { std::memcpy(host.data() + begin, src + begin, end - begin); });
        }
        for (auto& th : threads) th.join();
      },
      reps, warmup);
  table.Row(
      "gRPC Get into a buffer", "grpc_get", "memcpy",
      [&] { CHECK_OK((*kv)->GetInto(get, absl::MakeSpan(host))); }, reps, warmup);
  // One Get as block ranges over several connections of the client (GetArgs::streams).
  const int streams = absl::GetFlag(FLAGS_streams);
  if (streams > 1) {
    client::GetArgs ranged = get;
    ranged.streams = streams;
    std::memset(host.data(), 0xFF, total);
    CHECK_OK((*kv)->GetInto(ranged, absl::MakeSpan(host)));
    if (pattern.FirstMismatch(host.data(), blocks) >= 0) {
      ok = false;
      std::cerr << "gRPC Get over " << streams << " connections: wrong bytes\n";
    }
    table.Row(
        absl::StrCat("gRPC Get over ", streams, " connections"), "grpc_get_streams", "memcpy",
        [&] { CHECK_OK((*kv)->GetInto(ranged, absl::MakeSpan(host))); }, reps, warmup);
  }
  // Several clients at once, each its own connection and buffer: the daemon's gRPC Get serves them
  // on its pool (--kvcache_threads) and gRPC's threads. Wall time until the last has all bytes.
  const int clients = absl::GetFlag(FLAGS_clients);
  double clients_ms = 0;
  if (clients > 0) {
    std::vector<std::unique_ptr<client::Client>> conns;
    std::vector<std::vector<uint8_t>> bufs;
    for (int c = 0; c < clients; ++c) {
      auto conn = client::Client::Connect(o);
      CHECK_OK(conn);
      // Opened one by one before the clock starts: sixteen opened in the same instant by the
      // first Gets failed now and then on the H100 host (UNAVAILABLE, RESULTS run 18).
      if (absl::Status s = (*conn)->Health(); !s.ok()) Die(s.ToString());
      conns.push_back(*std::move(conn));
      bufs.emplace_back(total);
    }
    auto all_at_once = [&] {
      std::vector<std::thread> threads;
      for (int c = 0; c < clients; ++c) {
        threads.emplace_back([&, c] { CHECK_OK(conns[c]->GetInto(get, absl::MakeSpan(bufs[c]))); });
      }
      for (auto& t : threads) t.join();
    };
    std::vector<double> ms;
    for (int r = 0; r < warmup + reps; ++r) {
      const auto t0 = Clock::now();
      all_at_once();
      if (r >= warmup) {
        ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      }
    }
    std::sort(ms.begin(), ms.end());
    clients_ms = ms[ms.size() / 2];
    for (int c = 0; c < clients; ++c) {
      if (pattern.FirstMismatch(bufs[c].data(), blocks) >= 0) {
        std::printf("client %d: bytes differ\n", c);
        ok = false;
      }
    }
    std::printf("%-44s %10.2f %8.2f  (%d x %.3f GiB)\n",
                absl::StrCat("gRPC Get, ", clients, " clients at once").c_str(), clients_ms,
                clients * static_cast<double>(total) / clients_ms / 1e6, clients,
                total / 1073741824.0);
  }
  table.Row(
      "shared-memory Get (GetToBuffer)", "shm_get", "memcpy",
      [&] {
        CHECK_OK((*dp)->GetToBuffer(get, {"bench", 0, 0}));
      },
      reps, warmup);
  if (rerotate) {
    // CPU re-rotation (~0.5-1 GB/s a core): few repetitions, or 32K tokens take minutes.
    table.Row(
        "gRPC Get, re-rotated (CPU)", "grpc_get_rerotated", "memcpy",
        [&] { CHECK_OK((*kv)->GetInto(moved, absl::MakeSpan(host))); }, slow_reps, 0);
    table.Row(
        "shared-memory Get, re-rotated (CPU)", "shm_get_rerotated", "memcpy",
        [&] {
          CHECK_OK((*dp)->GetToBuffer(moved, {"bench", 0, 0}));
        },
        slow_reps, 0);
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
    Progress(absl::StrCat("GPU ", gpu_name, ": allocating and registering 2 x ", total,
                          " device bytes"));
    CUDA_CHECK(cudaSetDevice(0));
    void* d_dst = nullptr;
    CUDA_CHECK(cudaMalloc(&d_dst, total));
    cudaIpcMemHandle_t handle;
    CUDA_CHECK(cudaIpcGetMemHandle(&handle, d_dst));
    CHECK_OK((*dp)->RegisterCudaIpc(
        "gpu", 0, std::string(reinterpret_cast<const char*>(&handle), sizeof(handle)), 0, total));
    // A second device buffer: the D2D baseline's destination, then a paged pool of the model
    // ([layers][2][blocks][block_tokens][kv_heads][head_dim]).
    void* d_pool = nullptr;
    CUDA_CHECK(cudaMalloc(&d_pool, total));

    Progress("checking the CUDA IPC paths");
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
    if (rerotate) {
      // The GPU kernel's re-rotation against the CPU path's (in `region` since the check above):
      // within 1 ulp (bf16 words), nearly all equal.
      CHECK_OK((*dp)->GetToBuffer(moved, {"gpu", 0, 0}));
      CUDA_CHECK(cudaMemcpy(pinned, d_dst, total, cudaMemcpyDeviceToHost));
      uint64_t ulps = 0, worse = 0;
      const auto* a = static_cast<const int16_t*>(pinned);
      const auto* c = reinterpret_cast<const int16_t*>(region);
      for (uint64_t i = 0; i < total / 2; ++i) {
        if (a[i] == c[i]) continue;
        (std::abs(int{a[i]} - int{c[i]}) == 1 ? ulps : worse)++;
      }
      std::printf(
          "re-rotated CUDA IPC Get vs CPU path: %llu bf16 words differ by 1 ulp, %llu by "
          "more (of %llu)\n",
          static_cast<unsigned long long>(ulps), static_cast<unsigned long long>(worse),
          static_cast<unsigned long long>(total / 2));
      if (worse != 0) ok = false;
    }
    std::memcpy(pinned, region, total);
    table.Row(
        "cudaMemcpy H2D from pinned memory", "cuda_memcpy_pinned", "",
        [&] { CUDA_CHECK(cudaMemcpy(d_dst, pinned, total, cudaMemcpyHostToDevice)); }, reps,
        warmup);
    table.Row(
        "cudaMemcpy H2D from pageable memory", "cuda_memcpy_pageable", "cuda_memcpy_pinned",
        [&] { CUDA_CHECK(cudaMemcpy(d_dst, region, total, cudaMemcpyHostToDevice)); }, reps,
        warmup);
    table.Row(
        "cudaMemcpy D2D (device)", "cuda_memcpy_d2d", "cuda_memcpy_pinned",
        [&] {
          // A D2D cudaMemcpy may return before the copy ends: wait for it.
          CUDA_CHECK(cudaMemcpy(d_pool, d_dst, total, cudaMemcpyDeviceToDevice));
          CUDA_CHECK(cudaDeviceSynchronize());
        },
        reps, warmup);
    table.Row(
        "CUDA IPC Get (GetToBuffer)", "cuda_ipc_get", "cuda_memcpy_pinned",
        [&] {
          CHECK_OK((*dp)->GetToBuffer(get, {"gpu", 0, 0}));
        },
        reps, warmup);
    if (rerotate) {
      table.Row(
          "CUDA IPC Get, re-rotated (GPU kernel)", "cuda_ipc_get_rerotated", "cuda_memcpy_pinned",
          [&] {
            CHECK_OK((*dp)->GetToBuffer(moved, {"gpu", 0, 0}));
          },
          reps, warmup);
    }
    // The paged pool last: a frontend's pages handed out in a random order.
    Progress("registering the paged pool and checking it");
    CUDA_CHECK(cudaIpcGetMemHandle(&handle, d_pool));
    v1::PagedLayout layout;
    layout.set_model(put.model);
    layout.set_num_blocks(static_cast<uint32_t>(blocks));
    CHECK_OK((*dp)->RegisterCudaIpc(
        "pool", 0, std::string(reinterpret_cast<const char*>(&handle), sizeof(handle)), 0, total,
        layout));
    client::BufferRef pages{"pool", 0, 0, {}};
    for (uint32_t i = 0; i < blocks; ++i) pages.block_ids.push_back(i);
    std::shuffle(pages.block_ids.begin(), pages.block_ids.end(), std::mt19937(11));
    // Paged, as stored: a few blocks' pages against the pattern, element by element.
    CUDA_CHECK(cudaMemset(d_pool, 0xFF, total));
    CUDA_CHECK(cudaDeviceSynchronize());
    CHECK_OK((*dp)->GetToBuffer(get, pages));
    bool paged_ok = true;
    {
      const int H = spec.kv_heads(), D = spec.head_dim(), L = spec.layers();
      const uint64_t page_bytes = bb / (2 * L);
      std::vector<uint8_t> want(bb), page(page_bytes);
      for (uint64_t b : {uint64_t{0}, blocks / 2, blocks - 1}) {
        pattern.Fill(b, want.data());
        for (int l = 0; l < L && paged_ok; ++l)
          for (int c = 0; c < 2 && paged_ok; ++c) {
            const uint64_t at = ((uint64_t(l) * 2 + c) * blocks + pages.block_ids[b]) * page_bytes;
            CUDA_CHECK(cudaMemcpy(page.data(), static_cast<uint8_t*>(d_pool) + at, page_bytes,
                                  cudaMemcpyDeviceToHost));
            for (int t = 0; t < bt && paged_ok; ++t)
              for (int h = 0; h < H && paged_ok; ++h) {
                const uint8_t* w =
                    want.data() + ((((uint64_t(l) * 2 + c) * H + h) * bt + t) * D) * 2;
                if (std::memcmp(page.data() + (uint64_t(t) * H + h) * D * 2, w, D * 2) != 0) {
                  ok = paged_ok = false;
                  std::cerr << "paged CUDA IPC Get: wrong bytes in block " << b << "\n";
                }
              }
          }
      }
    }
    table.Row(
        "CUDA IPC Get into pages (block ids)", "cuda_ipc_get_paged", "cuda_memcpy_pinned",
        [&] { CHECK_OK((*dp)->GetToBuffer(get, pages)); }, reps, warmup);
    if (rerotate) {
      table.Row(
          "CUDA IPC Get into pages, re-rotated", "cuda_ipc_get_paged_rerotated",
          "cuda_memcpy_pinned", [&] { CHECK_OK((*dp)->GetToBuffer(moved, pages)); }, reps, warmup);
    }
    CHECK_OK((*dp)->Unregister("gpu"));
    CHECK_OK((*dp)->Unregister("pool"));
    CUDA_CHECK(cudaFreeHost(pinned));
    CUDA_CHECK(cudaFree(d_dst));
    CUDA_CHECK(cudaFree(d_pool));
  }
#endif
  // Puts of new tokens from the shared region, each evicting the one before (the host tier holds
  // ~1.1 caches): the daemon's copy into host slots that evictions freed.
  int32_t put_round = 0;
  table.Row(
      "shared-memory Put of new tokens, evicting", "shm_put", "memcpy",
      [&] {
        client::PutArgs fresh = put;
        fresh.tokens[0] = 128000 + ++put_round;  // block hashes are chained: every block is new
        auto s = (*dp)->PutFromBuffer(fresh, {"bench", 0, 0});
        CHECK_OK(s);
        if (s->blocks_stored() != blocks) Die("a Put of new tokens stored fewer blocks than sent");
      },
      reps, warmup);
  CHECK_OK((*dp)->Unregister("bench"));

  const double grpc_ms = table.Ms("grpc_get"), shm_ms = table.Ms("shm_get");
  std::string json =
      absl::StrCat("{\"bench\":\"dataplane_get\",\"tokens\":", tokens, ",\"blocks\":", blocks,
                   ",\"block_bytes\":", bb, ",\"bytes\":", total, ",\"reps\":", reps,
                   ",\"put_ms\":", put_ms, ",\"bytes_match\":", ok ? "true" : "false",
                   ",\"host\":\"", host_name, "\",\"gpu\":\"", gpu_name, "\"", table.Json());
  if (clients > 0) {
    absl::StrAppend(&json, ",\"clients\":", clients,
                    ",\"clients_get_ms\":", absl::StrFormat("%.3f", clients_ms),
                    ",\"daemon_flags\":\"", absl::GetFlag(FLAGS_daemon_flags), "\"");
  }
  if (grpc_ms > 0 && shm_ms > 0) {
    std::printf("shared memory vs gRPC bytes: %.2fx faster (target >= 3x)\n", grpc_ms / shm_ms);
    absl::StrAppend(&json,
                    ",\"shm_speedup_over_grpc\":", absl::StrFormat("%.3f", grpc_ms / shm_ms));
  }
  if (const double ipc = table.Ms("cuda_ipc_get"); ipc > 0 && grpc_ms > 0) {
    std::printf("CUDA IPC vs gRPC bytes: %.2fx faster\n", grpc_ms / ipc);
  }
  absl::StrAppend(&json, "}");
  std::printf("%s\n", json.c_str());
  Progress(ok ? "done, bytes checked" : "done, BYTES DIFFER (see above)");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  return ropekv::Main();
}
