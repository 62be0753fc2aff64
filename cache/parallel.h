// Work split among a few threads started for the call: block copies, per-block metadata.
#ifndef ROPEKV_CACHE_PARALLEL_H_
#define ROPEKV_CACHE_PARALLEL_H_

#include <cstdint>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"

namespace ropekv {

// Runs fn(i) for i in [0, units), by up to `threads` threads at once (the caller's among them;
// fn must then be safe to call concurrently for different i), units taken in order by whichever
// thread is free; the first error stops the others and is returned. A thread costs ~50 us to
// start: give work of at least that much a thread.
absl::Status ForEachParallel(uint64_t units, int threads,
                             absl::FunctionRef<absl::Status(uint64_t i)> fn);

// Threads one call splits its work among by default: one a core, at most 8 (more did not copy
// faster on the hosts measured).
int DefaultParallelThreads();

}  // namespace ropekv

#endif  // ROPEKV_CACHE_PARALLEL_H_
