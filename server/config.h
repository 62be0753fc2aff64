// The daemon's configuration: embedded defaults, overridden by a YAML file (--config, see
// server/config_file.h), overridden by flags.
#ifndef ROPEKV_SERVER_CONFIG_H_
#define ROPEKV_SERVER_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "cache/allocator.h"
#include "cache/disk_tier.h"
#include "cache/tier_policy.h"

namespace ropekv {

struct ServerConfig {
  std::string listen = "127.0.0.1:50051";  // HOST:PORT; port 0 picks a free port
  std::string data_dir = "./data";         // created if missing
  uint64_t host_capacity_bytes = 2ull << 30;
  uint64_t max_block_bytes = 64ull << 20;    // largest block a model may have
  uint64_t max_message_bytes = 64ull << 20;  // gRPC send/receive limit
  uint64_t chunk_bytes = 4ull << 20;         // bulk bytes per streamed message (< max message)
  std::string port_file;                     // if set, the bound port is written there
  // Worker threads of the KVCache service: a Put's writes and commit, Get, Compose, Lookup,
  // Evict, Pin and RegisterModel run there, so that disk reads and synced writes never hold a
  // gRPC thread.
  int kvcache_threads = 4;
  // The prompt memo (cache/hash.h): prompts whose block hashes are remembered (0: none), and
  // their tokens in all.
  uint64_t prompt_memo_prompts = 16;
  uint64_t prompt_memo_tokens = 4u << 20;

  // Tiers (docs/tiers.md).
  std::string gpu_mode = "auto";  // GPU tier: auto (when a GPU is present), on (required), off
  uint64_t gpu_capacity_bytes = 4ull << 30;  // GPU arena
  uint64_t gpu_chunk_bytes = 64ull << 20;    // GPU arena chunk (largest block on the GPU)
  int gpu_device = 0;                        // CUDA device ordinal
  std::string host_pinned = "auto";          // pinned host memory: auto (with a GPU tier), on, off
  // Freed host slots kept mapped for reuse, at most (kKeepAll: up to the capacity; 0: none).
  uint64_t host_keep_freed_bytes = kKeepAll;
  // Kept slots go back to the system once the host tier has allocated and freed nothing for this
  // long (zero: never).
  absl::Duration host_trim_idle = absl::ZeroDuration();
  bool disk_enabled = true;  // disk tier (RocksDB)
  std::string disk_path;     // RocksDB folder; empty: <data_dir>/rocksdb
  uint64_t disk_capacity_bytes = 64ull << 30;
  uint64_t disk_segment_bytes = 0;  // segment file size; 0: capacity / 256 in [64 MiB, 4 GiB]
  Durability disk_durability = Durability::kSync;  // when a disk write is acknowledged
  TierPolicy policy;                               // write tier, watermarks, model limits
};

// Bounds of an explicit disk segment size: below 1 MiB a tier of gigabytes would keep thousands of
// files open; above 64 GiB compaction would rewrite tens of gigabytes to reclaim one file.
inline constexpr uint64_t kMinDiskSegmentBytes = 1ull << 20;
inline constexpr uint64_t kMaxDiskSegmentBytes = 64ull << 30;

// Parses sizes such as "2GiB", "512MiB", "64k", "1048576" (binary multiples; k/K, m/M, g/G, t/T
// with an optional "iB" or "B"). INVALID_ARGUMENT otherwise.
absl::StatusOr<uint64_t> ParseSize(absl::string_view text);

// INVALID_ARGUMENT when fields contradict each other (chunk over message size, zero capacity,
// watermarks out of order, write tier disk without a disk tier, unknown gpu_mode/host_pinned).
absl::Status ValidateConfig(const ServerConfig& config);

}  // namespace ropekv

#endif  // ROPEKV_SERVER_CONFIG_H_
