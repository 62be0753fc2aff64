// Test helper: where an element sits in the daemon's block layout, for tests that build blocks by
// hand and read references out of them (retrieval_test, retrieval_gpu_test).
#ifndef ROPEKV_TESTS_UNIT_CACHE_BLOCK_LAYOUT_H_
#define ROPEKV_TESTS_UNIT_CACHE_BLOCK_LAYOUT_H_

#include <cstddef>
#include <cstdint>

#include "cache/model.h"

namespace ropekv {
namespace testing {

// Element (layer, kv, head, token, column) of consecutive blocks of
// [layer][k|v][kv_head][block_tokens][head_dim].
inline size_t BlockIndex(const ModelSpec& s, int layer, int kv, int head, int64_t t, int c) {
  const int64_t b = t / s.block_tokens;
  const int64_t tok = t % s.block_tokens;
  return ((((static_cast<size_t>(b) * s.layers + layer) * 2 + kv) * s.kv_heads + head) *
              s.block_tokens +
          tok) *
             s.head_dim +
         c;
}

}  // namespace testing
}  // namespace ropekv

#endif  // ROPEKV_TESTS_UNIT_CACHE_BLOCK_LAYOUT_H_
