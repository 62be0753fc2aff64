// `ropekv bench`: put/get throughput of 2 MiB blocks and lookup latency over the daemon's gRPC API
// from this (second) process, and optionally the same payloads against a Redis server in the same
// run (a plain RESP client: SET/GET of the same 2 MiB values, EXISTS for latency).
#ifndef ROPEKV_CLIENTS_CLI_BENCH_H_
#define ROPEKV_CLIENTS_CLI_BENCH_H_

#include <string>

#include "absl/status/status.h"
#include "clients/cpp/client.h"

namespace ropekv::cli {

struct BenchOptions {
  uint32_t blocks = 256;          // 2 MiB blocks stored and read back (512 MiB)
  uint32_t blocks_per_put = 16;   // blocks per Put / Get call (32 MiB)
  uint32_t lookups = 2000;        // Lookup calls timed
  uint32_t lookup_tokens = 4096;  // prompt length of each Lookup
  std::string redis;              // HOST:PORT of a Redis server to compare with; empty = none
};

// Prints a table and a JSON line to stdout.
absl::Status RunBench(client::Client& client, const BenchOptions& options);

}  // namespace ropekv::cli

#endif  // ROPEKV_CLIENTS_CLI_BENCH_H_
