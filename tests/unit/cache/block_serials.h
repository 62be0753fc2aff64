// Test helper: the serials (BlockInfo::serial) of a prompt's cached prefix blocks, for tests that
// check which store of a block a lookup sees (kv_cache_test, tier_test).
#ifndef ROPEKV_TESTS_UNIT_CACHE_BLOCK_SERIALS_H_
#define ROPEKV_TESTS_UNIT_CACHE_BLOCK_SERIALS_H_

#include <cstdint>
#include <vector>

#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "cache/kv_cache.h"
#include "gtest/gtest.h"

namespace ropekv {
namespace testing {

// The serials of the longest cached prefix of `tokens` (tenant ""), in block order; a failed
// lookup is a test failure and gives none.
inline std::vector<uint64_t> BlockSerials(KvCache& cache, absl::string_view model,
                                          absl::Span<const int32_t> tokens) {
  std::vector<uint64_t> out;
  auto l = cache.Lookup(model, "", tokens);
  EXPECT_TRUE(l.ok()) << l.status();
  if (l.ok()) {
    for (const BlockInfo& b : l->blocks) out.push_back(b.serial);
  }
  return out;
}

}  // namespace testing
}  // namespace ropekv

#endif  // ROPEKV_TESTS_UNIT_CACHE_BLOCK_SERIALS_H_
