#include "cache/hash.h"

#include <openssl/sha.h>

#include <random>

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
  // The values themselves (computed 2026-11-27, before PrefixBlockHash kept per-thread state):
  // a chain, another model and tenant, then the first again.
  const BlockHash b = PrefixBlockHash("0123456789abcdef", "t", &h, tokens);
  const BlockHash c = PrefixBlockHash("fedcba9876543210", "", &b, tokens);
  EXPECT_EQ(h.Hex(), "455c2780e2e283b0e54ca756b119fc8e101f97754994e909adf921547d63a2ff");
  EXPECT_EQ(b.Hex(), "e567d6f4afe70171a3223dcbc46ca40c4ef57012bede37b363622311ce737786");
  EXPECT_EQ(c.Hex(), "067425391d9731336da98cb1de2e314d1fb3b080dc9b477fa0aac09d07a5a548");
  EXPECT_EQ(PrefixBlockHash("0123456789abcdef", "t", nullptr, tokens), h);
  // More than 256 tokens (the field's bytes on the heap).
  std::vector<int32_t> many(1000);
  for (size_t i = 0; i < many.size(); ++i) many[i] = static_cast<int32_t>(i * 7919);
  EXPECT_EQ(PrefixBlockHash("0123456789abcdef", "t", nullptr, many).Hex(),
            "a7f6c563bae75fb5c1a40819e156fb6240e812e44a3d3482735c39c93136e18c");
}

// PrefixBlockHash block by block: what the memo must give.
std::vector<BlockHash> Chain(absl::string_view model, absl::string_view tenant, size_t bt,
                             const std::vector<int32_t>& tokens) {
  std::vector<BlockHash> out;
  for (size_t i = 0; i + bt <= tokens.size(); i += bt) {
    out.push_back(PrefixBlockHash(model, tenant, out.empty() ? nullptr : &out.back(),
                                  absl::MakeConstSpan(tokens).subspan(i, bt)));
  }
  return out;
}

TEST(HashTest, PrefixHashMemoEqualsTheChain) {
  PrefixHashMemo::Options o;
  o.min_blocks = 4;
  o.max_prompts = 3;
  o.max_tokens = 16 * 80;
  PrefixHashMemo memo(o);
  std::mt19937 rng(11);
  auto random_tokens = [&](size_t n) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = static_cast<int32_t>(rng() % 50000);
    return t;
  };
  const std::vector<int32_t> a = random_tokens(16 * 20 + 5);  // a partial last block
  uint64_t reused = 0;
  auto check = [&](absl::string_view model, absl::string_view tenant, const std::vector<int32_t>& t,
                   uint64_t expect_reused, const char* what) {
    EXPECT_EQ(memo.Hashes(model, tenant, 16, t), Chain(model, tenant, 16, t)) << what;
    EXPECT_EQ(memo.reused_blocks() - reused, expect_reused) << what;
    reused = memo.reused_blocks();
  };
  check("m", "", a, 0, "first");
  check("m", "", a, 20, "again");
  // Grown by a decode step, then by a block and a half: the 20 shared blocks come from the memo.
  std::vector<int32_t> grown = a;
  grown.push_back(7);
  check("m", "", grown, 20, "one token more");
  for (int i = 0; i < 24; ++i) grown.push_back(static_cast<int32_t>(rng() % 50000));
  check("m", "", grown, 20, "a block and a half more");
  check("m", "", grown, 21, "the grown prompt again");  // it replaced the one it extends
  // An edit in block 9 (its fifth token): blocks 0-8 shared, the rest hashed again.
  std::vector<int32_t> edited = grown;
  edited[16 * 9 + 4] += 1;
  check("m", "", edited, 9, "edited");
  // Another tenant or model with the same tokens shares nothing (the chains differ).
  check("m", "t2", a, 0, "another tenant");
  check("m2", "", a, 0, "another model");
  // At most 3 prompts: the grown one (least recently used) is out, the edited one is in. A shorter
  // prompt than one remembered comes all from the memo; one below min_blocks does not use it.
  check("m", "", std::vector<int32_t>(grown.begin(), grown.begin() + 16 * 6), 6, "shorter");
  check("m", "", std::vector<int32_t>(grown.begin(), grown.begin() + 16 * 3), 0, "short");
  check("m", "", std::vector<int32_t>(grown.begin(), grown.begin() + 16 * 12), 9, "grown's start");
  // At most 1280 tokens: two prompts of 800 do not stay together; one of 1296 is never kept.
  const std::vector<int32_t> b = random_tokens(16 * 50), c = random_tokens(16 * 50);
  check("m", "", b, 0, "b");
  check("m", "", c, 0, "c");
  check("m", "", c, 50, "c again");
  check("m", "", b, 0, "b forgotten");
  const std::vector<int32_t> long_prompt = random_tokens(16 * 81);
  check("m", "", long_prompt, 0, "long");
  check("m", "", long_prompt, 0, "long again");
  // Blocks of 8 tokens over the same tokens: another chain.
  EXPECT_EQ(memo.Hashes("m", "", 8, a), Chain("m", "", 8, a));
}

TEST(HashTest, PrefixHashMemoOfNoPromptsRemembersNothing) {
  PrefixHashMemo::Options o;
  o.min_blocks = 1;
  o.max_prompts = 0;
  PrefixHashMemo memo(o);
  std::vector<int32_t> t(16 * 8);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<int32_t>(i * 7919 % 50000);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(memo.Hashes("m", "", 16, t), Chain("m", "", 16, t));
  EXPECT_EQ(memo.reused_blocks(), 0u);
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
