// ropekvd: the ropekv daemon. Starts with embedded defaults (host tier 2 GiB, RocksDB disk tier
// under --data_dir, GPU tier when a GPU is present); a YAML file (--config) overrides them, and
// flags override the file.
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/time/time.h"
#include "cache/allocator.h"
#include "cache/disk_tier.h"
#include "cache/gpu_tier.h"
#include "cache/kv_cache.h"
#include "cache/pinned_allocator.h"
#include "server/config.h"
#include "server/config_file.h"
#include "server/dataplane_service.h"
#include "server/kvcache_service.h"
#include "server/modules_service.h"
#include "server/retrieval_service.h"
#include "server/session_service.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "HOST:PORT to listen on (port 0: any free port)");
ABSL_FLAG(std::string, data_dir, "./data", "data folder (created if missing)");
ABSL_FLAG(std::string, host_capacity, "2GiB", "host tier capacity, e.g. 2GiB, 512MiB");
ABSL_FLAG(std::string, max_block_size, "64MiB", "largest block a registered model may have");
ABSL_FLAG(std::string, max_message_size, "64MiB", "gRPC maximum message size");
ABSL_FLAG(std::string, chunk_size, "4MiB", "bulk bytes per streamed message");
ABSL_FLAG(std::string, port_file, "", "if set, write the bound port to this file");
ABSL_FLAG(int32_t, kvcache_threads, 4,
          "worker threads of the KVCache service (Put commits, Get, Compose, Lookup, Evict, Pin: "
          "disk I/O off the gRPC threads)");
ABSL_FLAG(uint64_t, prompt_memo_prompts, 16,
          "prompts whose block hashes are remembered, so that one sent again or grown by decode "
          "steps hashes only its new blocks (0: none)");
ABSL_FLAG(uint64_t, prompt_memo_tokens, 4 << 20,
          "tokens of the remembered prompts in all (4 bytes a token, plus 32 a block)");
ABSL_FLAG(std::string, config, "",
          "YAML configuration file (see deploy/ropekvd.yaml); flags given here override it");
// Tiers (docs/tiers.md).
ABSL_FLAG(std::string, gpu_mode, "auto",
          "GPU tier: auto (when a GPU is present), on (fail without one), off");
ABSL_FLAG(std::string, gpu_capacity, "4GiB", "GPU tier arena size");
ABSL_FLAG(std::string, gpu_slot_size, "",
          "no longer used (GPU slots are sized to their blocks; --gpu_chunk_size bounds them): "
          "accepted so that older configurations start, with a warning");
ABSL_FLAG(std::string, gpu_chunk_size, "64MiB",
          "the GPU arena is cut into chunks of this size, each holding slots of one block size "
          "(larger blocks stay off the GPU)");
ABSL_FLAG(int32_t, gpu_device, 0, "CUDA device of the GPU tier");
ABSL_FLAG(std::string, host_pinned, "auto",
          "pinned (cudaHostAlloc) host tier: auto (with a GPU tier), on, off");
ABSL_FLAG(std::string, host_keep_freed, "all",
          "freed host slots kept mapped for reuse, at most this many bytes (all: up to the host "
          "capacity; 0: every freed slot goes back to the system at once)");
ABSL_FLAG(absl::Duration, host_trim_idle, absl::ZeroDuration(),
          "kept host slots go back to the system once the host tier has allocated and freed "
          "nothing for this long, e.g. 60s (0: never)");
ABSL_FLAG(bool, disk_enabled, true, "disk tier (RocksDB) on");
ABSL_FLAG(std::string, disk_path, "", "RocksDB folder of the disk tier (default DATA_DIR/rocksdb)");
ABSL_FLAG(std::string, disk_capacity, "64GiB", "disk tier capacity (live block bytes)");
ABSL_FLAG(std::string, disk_segment_size, "0",
          "size a disk segment file is filled to (0: disk_capacity / 256 within [64MiB, 4GiB])");
ABSL_FLAG(std::string, disk_durability, "sync",
          "when a disk write is acknowledged: sync (WAL fsync'ed) or memory (WAL written, not "
          "synced: survives kill -9, not power loss)");
ABSL_FLAG(std::string, write_tier, "host", "where Puts keep their blocks: gpu, host or disk");
ABSL_FLAG(bool, write_through, true, "Puts reach the disk tier before they are acknowledged");
ABSL_FLAG(bool, promote_on_read, true, "reads keep the host copies they make of disk blocks");
ABSL_FLAG(bool, gpu_promote_on_read, false, "reads also upload their blocks to the GPU tier");
ABSL_FLAG(double, high_watermark, 0.95, "fill fraction of a tier that starts demotion");
ABSL_FLAG(double, low_watermark, 0.85, "fill fraction where demotion stops");
ABSL_FLAG(std::string, model_limits, "",
          "per-model limits: NAME=host:SIZE,disk:SIZE;NAME2=host:SIZE (name or id)");

namespace ropekv {
namespace {

absl::StatusOr<ServerConfig> ConfigFromFlags() {
  ServerConfig c;
  c.listen = absl::GetFlag(FLAGS_listen);
  c.data_dir = absl::GetFlag(FLAGS_data_dir);
  c.port_file = absl::GetFlag(FLAGS_port_file);
  struct {
    std::string text;
    uint64_t* out;
  } sizes[] = {{absl::GetFlag(FLAGS_host_capacity), &c.host_capacity_bytes},
               {absl::GetFlag(FLAGS_max_block_size), &c.max_block_bytes},
               {absl::GetFlag(FLAGS_max_message_size), &c.max_message_bytes},
               {absl::GetFlag(FLAGS_chunk_size), &c.chunk_bytes}};
  for (auto& s : sizes) {
    auto v = ParseSize(s.text);
    if (!v.ok()) return v.status();
    *s.out = *v;
  }
  if (!absl::GetFlag(FLAGS_gpu_slot_size).empty()) {
    std::cerr << "ropekvd: --gpu_slot_size (gpu: slot_size) is no longer used: GPU slots are sized "
                 "to their blocks, in chunks of --gpu_chunk_size (gpu: chunk_size)\n";
  }
  c.gpu_mode = absl::GetFlag(FLAGS_gpu_mode);
  c.gpu_device = absl::GetFlag(FLAGS_gpu_device);
  c.kvcache_threads = absl::GetFlag(FLAGS_kvcache_threads);
  c.prompt_memo_prompts = absl::GetFlag(FLAGS_prompt_memo_prompts);
  c.prompt_memo_tokens = absl::GetFlag(FLAGS_prompt_memo_tokens);
  c.host_pinned = absl::GetFlag(FLAGS_host_pinned);
  if (const std::string keep = absl::GetFlag(FLAGS_host_keep_freed); keep != "all") {
    auto v = ParseSize(keep);
    if (!v.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("host_keep_freed: ", v.status().message(), " (or \"all\")"));
    }
    c.host_keep_freed_bytes = *v;
  }
  c.host_trim_idle = absl::GetFlag(FLAGS_host_trim_idle);
  c.disk_enabled = absl::GetFlag(FLAGS_disk_enabled);
  c.disk_path = absl::GetFlag(FLAGS_disk_path);
  struct {
    const char* name;
    std::string text;
    uint64_t* out;
  } tier_sizes[] = {
      {"gpu_capacity", absl::GetFlag(FLAGS_gpu_capacity), &c.gpu_capacity_bytes},
      {"gpu_chunk_size", absl::GetFlag(FLAGS_gpu_chunk_size), &c.gpu_chunk_bytes},
      {"disk_capacity", absl::GetFlag(FLAGS_disk_capacity), &c.disk_capacity_bytes},
      {"disk_segment_size", absl::GetFlag(FLAGS_disk_segment_size), &c.disk_segment_bytes}};
  for (auto& s : tier_sizes) {
    auto v = ParseSize(s.text);
    if (!v.ok())
      return absl::InvalidArgumentError(absl::StrCat(s.name, ": ", v.status().message()));
    *s.out = *v;
  }
  auto durability = ParseDurability(absl::GetFlag(FLAGS_disk_durability));
  if (!durability.ok()) return durability.status();
  c.disk_durability = *durability;
  auto write_tier = ParseWriteTier(absl::GetFlag(FLAGS_write_tier));
  if (!write_tier.ok()) return write_tier.status();
  c.policy.write_tier = *write_tier;
  c.policy.write_through = absl::GetFlag(FLAGS_write_through);
  c.policy.promote_on_read = absl::GetFlag(FLAGS_promote_on_read);
  c.policy.gpu_promote_on_read = absl::GetFlag(FLAGS_gpu_promote_on_read);
  c.policy.high_watermark = absl::GetFlag(FLAGS_high_watermark);
  c.policy.low_watermark = absl::GetFlag(FLAGS_low_watermark);
  auto limits = ParseModelLimits(absl::GetFlag(FLAGS_model_limits));
  if (!limits.ok()) return limits.status();
  c.policy.model_limits = *std::move(limits);
  if (auto s = ValidateConfig(c); !s.ok()) return s;
  return c;
}

// The tiers the configuration asks for. A GPU tier in mode auto that cannot be had is logged as
// absent and the daemon runs on; in mode on it is an error.
absl::Status BuildTiers(const ServerConfig& config, KvCache::Options* options,
                        std::string* summary) {
  if (config.gpu_mode != "off") {
    GpuTier::Options g;
    g.capacity_bytes = config.gpu_capacity_bytes;
    g.chunk_bytes = config.gpu_chunk_bytes;
    g.device = config.gpu_device;
    auto gpu = GpuTier::Create(g);
    if (gpu.ok()) {
      options->gpu = *std::move(gpu);
      absl::StrAppend(summary, "GPU tier ", options->gpu->capacity_bytes(), " bytes (chunks of ",
                      config.gpu_chunk_bytes, ") on device ", config.gpu_device);
    } else if (config.gpu_mode == "on") {
      return gpu.status();
    } else {
      absl::string_view why = gpu.status().message();
      absl::ConsumePrefix(&why, "GPU tier absent: ");
      absl::StrAppend(summary, "GPU tier absent (", why, ")");
    }
  } else {
    absl::StrAppend(summary, "GPU tier off");
  }
  const bool pinned =
      config.host_pinned == "on" || (config.host_pinned == "auto" && options->gpu != nullptr);
  if (pinned) {
    auto alloc = NewPinnedAllocator(config.host_capacity_bytes, config.host_keep_freed_bytes);
    if (!alloc.ok()) return alloc.status();
    options->host_allocator = *std::move(alloc);
  } else {
    options->host_allocator = NewKeepingAllocator(NewAlignedAllocator(), config.host_capacity_bytes,
                                                  config.host_keep_freed_bytes);
  }
  absl::StrAppend(summary, "; host tier ", config.host_capacity_bytes, " bytes",
                  pinned ? " (pinned)" : "");
  if (config.host_keep_freed_bytes != kKeepAll) {
    absl::StrAppend(summary, ", freed slots kept up to ", config.host_keep_freed_bytes, " bytes");
  }
  if (config.host_trim_idle > absl::ZeroDuration()) {
    absl::StrAppend(summary, ", kept slots returned after ",
                    absl::FormatDuration(config.host_trim_idle), " idle");
  }
  if (config.disk_enabled) {
    DiskTier::Options d;
    d.path = config.disk_path.empty()
                 ? (std::filesystem::path(config.data_dir) / "rocksdb").string()
                 : config.disk_path;
    d.capacity_bytes = config.disk_capacity_bytes;
    d.segment_bytes = config.disk_segment_bytes;
    d.durability = config.disk_durability;
    auto disk = DiskTier::Open(d);
    if (!disk.ok()) return disk.status();
    options->disk = *std::move(disk);
    absl::StrAppend(summary, "; disk tier ", d.capacity_bytes, " bytes at ", d.path,
                    " (durability ", DurabilityName(d.durability), ")");
  } else {
    absl::StrAppend(summary, "; disk tier off");
  }
  absl::StrAppend(summary, "; write tier ", WriteTierName(config.policy.write_tier),
                  config.policy.write_through && config.disk_enabled ? " + write-through" : "");
  return absl::OkStatus();
}

int Run(const ServerConfig& config) {
  std::error_code ec;
  std::filesystem::create_directories(config.data_dir, ec);
  if (ec) {
    std::cerr << "ropekvd: cannot create data folder " << config.data_dir << ": " << ec.message()
              << "\n";
    return 1;
  }
  KvCache::Options options;
  options.host_capacity_bytes = config.host_capacity_bytes;
  options.max_block_bytes = config.max_block_bytes;
  options.policy = config.policy;
  options.prompt_memo.max_prompts = config.prompt_memo_prompts;
  options.prompt_memo.max_tokens = config.prompt_memo_tokens;
  std::string tiers;
  if (auto s = BuildTiers(config, &options, &tiers); !s.ok()) {
    std::cerr << "ropekvd: " << s << "\n";
    return 1;
  }
  Allocator* host_allocator = options.host_allocator.get();  // owned by the cache
  auto cache = KvCache::Create(std::move(options));
  if (!cache.ok()) {
    std::cerr << "ropekvd: " << cache.status() << "\n";
    return 1;
  }
  KeptReleaser releaser(host_allocator, config.host_trim_idle);  // --host_trim_idle
  KvCacheService service(cache->get(), config);
  SessionService sessions(cache->get(), config);  // PIE editor sessions (--session_* flags)
  if (!sessions.status().ok()) {
    std::cerr << "ropekvd: " << sessions.status().message() << "\n";
    return 1;
  }

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(config.listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(static_cast<int>(config.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(config.max_message_bytes));
  builder.RegisterService(&service);
  builder.RegisterService(&sessions);
  ModulesService modules(cache->get(), config);  // Prompt Cache modules, APE contexts
  builder.RegisterService(&modules);
  // Registered buffers (shared memory, CUDA IPC): --allow_buffers, --max_buffers.
  DataPlaneService dataplane(cache->get(), sessions.store(), config);
  if (!dataplane.status().ok()) {
    std::cerr << "ropekvd: " << dataplane.status().message() << "\n";
    return 1;
  }
  builder.RegisterService(&dataplane);
  // Query-aware top-k Select / Gather over prefixes and sessions: --retrieval_* flags.
  RetrievalService retrieval(cache->get(), sessions.store(), config);
  if (!retrieval.status().ok()) {
    std::cerr << "ropekvd: " << retrieval.status().message() << "\n";
    return 1;
  }
  builder.RegisterService(&retrieval);
  dataplane.SetRetrieval(retrieval.store());  // GatherToBuffer
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || port == 0) {
    std::cerr << "ropekvd: cannot listen on " << config.listen << "\n";
    return 1;
  }
  if (!config.port_file.empty()) {
    std::ofstream(config.port_file + ".tmp") << port << "\n";
    std::filesystem::rename(config.port_file + ".tmp", config.port_file, ec);
  }
  const DiskLoad& found = (*cache)->disk_load();
  if (config.disk_enabled) {
    absl::StrAppend(&tiers, "; found on disk ", found.blocks, " blocks",
                    found.migrated_blocks > 0
                        ? absl::StrCat(" (", found.migrated_blocks,
                                       " migrated from the format before segments)")
                        : "",
                    found.dropped > 0 ? absl::StrCat(", ", found.dropped, " records dropped") : "");
  }
  std::cout << "ropekvd listening on port " << port << " (" << config.listen << "); data folder "
            << config.data_dir << "; " << tiers << "; " << dataplane.summary() << "; sessions "
            << (sessions.store()->gpu_device() >= 0
                    ? absl::StrCat("on GPU ", sessions.store()->gpu_device())
                    : std::string("in host memory"))
            << "; Select "
            << (retrieval.store()->device() >= 0
                    ? absl::StrCat("on GPU ", retrieval.store()->device())
                    : std::string("on the CPU"))
            << std::endl;

  // Wait for SIGINT/SIGTERM (blocked in every thread, taken here), then shut down cleanly.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  int sig = 0;
  sigwait(&signals, &sig);
  std::cout << "ropekvd: signal " << sig << ", shutting down" << std::endl;
  // In-flight calls get a moment to finish, then are cancelled: idle client channels must not
  // hold the exit up.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) {
  // Block the shutdown signals before any thread starts, so that only sigwait takes them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::SetProgramUsageMessage("ropekvd: the ropekv KV-cache daemon");
  absl::ParseCommandLine(argc, argv);
  if (const std::string file = absl::GetFlag(FLAGS_config); !file.empty()) {
    auto settings = ropekv::ReadConfigFile(file);
    absl::Status s = settings.ok() ? ropekv::ApplyConfigSettings(
                                         *settings, ropekv::FlagsOnCommandLine(argc, argv))
                                   : settings.status();
    if (!s.ok()) {
      std::cerr << "ropekvd: " << s.message() << "\n";
      return 2;
    }
  }
  auto config = ropekv::ConfigFromFlags();
  if (!config.ok()) {
    std::cerr << "ropekvd: " << config.status().message() << "\n";
    return 2;
  }
  return ropekv::Run(*config);
}
