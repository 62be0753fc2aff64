// Content hashes that address blocks: SHA-256, stable across processes and versions.
//   prefix block:  H("ropekv.prefix.v1", model id, tenant, parent hash, tokens)
//   segment:       H("ropekv.segment.v1", model id, tenant, tokens)
// Every field is length-prefixed so that no two different inputs share an encoding.
#ifndef ROPEKV_CACHE_HASH_H_
#define ROPEKV_CACHE_HASH_H_

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"

namespace ropekv {

struct BlockHash {
  std::array<uint8_t, 32> bytes{};

  bool operator==(const BlockHash& o) const { return bytes == o.bytes; }
  bool operator!=(const BlockHash& o) const { return bytes != o.bytes; }
  template <typename H>
  friend H AbslHashValue(H h, const BlockHash& b) {
    return H::combine_contiguous(std::move(h), b.bytes.data(), b.bytes.size());
  }
  // The raw 32 bytes as a string (wire form).
  std::string Raw() const { return std::string(bytes.begin(), bytes.end()); }
  // 64 hex digits.
  std::string Hex() const;
  // Parses the 32-byte wire form; anything else -> INVALID_ARGUMENT.
  static absl::StatusOr<BlockHash> FromRaw(absl::string_view raw);
};

// The hash of a prefix block whose predecessor is `parent` (nullptr for the first block).
BlockHash PrefixBlockHash(absl::string_view model_id, absl::string_view tenant,
                          const BlockHash* parent, absl::Span<const int32_t> tokens);

// The chain hashes of the full blocks of a prompt (parent of the first: none), remembered for the
// prompts hashed last, so that a prompt sent again, or grown by a few tokens (a decode loop that
// selects or looks up over the same prompt at every step), hashes only the blocks it does not
// share with one of them. A remembered prompt is compared token by token, never by a hash of its
// tokens: the result is always what PrefixBlockHash gives block by block. Thread-safe.
class PrefixHashMemo {
 public:
  struct Options {
    size_t max_prompts = 16;       // prompts remembered (least recently used out); 0: no memo
    size_t max_tokens = 4u << 20;  // tokens remembered in all (16 MiB, plus 32 bytes a block)
    size_t min_blocks = 64;        // shorter prompts are hashed without the memo
  };
  PrefixHashMemo() : PrefixHashMemo(Options()) {}
  explicit PrefixHashMemo(Options options) : options_(options) {}

  // PrefixBlockHash chained over the tokens.size() / block_tokens full blocks of `tokens`.
  std::vector<BlockHash> Hashes(absl::string_view model_id, absl::string_view tenant,
                                size_t block_tokens, absl::Span<const int32_t> tokens);

  // Blocks taken from the memo rather than hashed, since creation.
  uint64_t reused_blocks() const;

 private:
  struct Prompt {
    std::string model_id, tenant;
    size_t block_tokens = 0;
    std::vector<int32_t> tokens;  // the full blocks'
    std::vector<BlockHash> hashes;
    uint64_t used = 0;
  };
  const Options options_;
  mutable absl::Mutex mu_;
  std::vector<Prompt> prompts_ ABSL_GUARDED_BY(mu_);
  size_t tokens_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t clock_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t reused_ ABSL_GUARDED_BY(mu_) = 0;
};

// The hash of a position-independent segment.
BlockHash SegmentHash(absl::string_view model_id, absl::string_view tenant,
                      absl::Span<const int32_t> tokens);

// Lowercase hex SHA-256 of arbitrary bytes.
std::string Sha256Hex(absl::string_view bytes);

// Fast checksum of block bytes (XXH3 64-bit): detects corruption, not adversaries.
uint64_t BlockChecksum(const void* data, size_t size);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_HASH_H_
