#include "cache/parallel.h"

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"

namespace ropekv {

absl::Status ForEachParallel(uint64_t units, int threads,
                             absl::FunctionRef<absl::Status(uint64_t i)> fn) {
  absl::Status status;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  absl::Mutex mu;
  auto work = [&] {
    for (uint64_t i; !failed.load(std::memory_order_relaxed) && (i = next++) < units;) {
      absl::Status s = fn(i);
      if (!s.ok()) {
        absl::MutexLock lock(&mu);
        if (status.ok()) status = s;
        failed = true;
      }
    }
  };
  const uint64_t n = std::clamp<uint64_t>(static_cast<uint64_t>(std::max(threads, 1)), 1,
                                          std::max<uint64_t>(units, 1));
  std::vector<std::thread> helpers;
  helpers.reserve(n - 1);
  for (uint64_t t = 1; t < n; ++t) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
  return status;
}

int DefaultParallelThreads() {
  return std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8);
}

}  // namespace ropekv
