// Content hashes that address blocks: SHA-256, stable across processes and versions.
//   prefix block:  H("ropekv.prefix.v1", model id, tenant, parent hash, tokens)
//   segment:       H("ropekv.segment.v1", model id, tenant, tokens)
// Every field is length-prefixed so that no two different inputs share an encoding.
#ifndef ROPEKV_CACHE_HASH_H_
#define ROPEKV_CACHE_HASH_H_

#include <array>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
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

// The hash of a position-independent segment.
BlockHash SegmentHash(absl::string_view model_id, absl::string_view tenant,
                      absl::Span<const int32_t> tokens);

// Lowercase hex SHA-256 of arbitrary bytes.
std::string Sha256Hex(absl::string_view bytes);

// Fast checksum of block bytes (XXH3 64-bit): detects corruption, not adversaries.
uint64_t BlockChecksum(const void* data, size_t size);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_HASH_H_
