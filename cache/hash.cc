#include "cache/hash.h"

#include <openssl/evp.h>
#include <xxhash.h>

#include <algorithm>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"

namespace ropekv {
namespace {

// A length-prefixed field: its size as 8 little-endian bytes, then its bytes.
void Field(EVP_MD_CTX* ctx, const void* data, uint64_t size) {
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(size >> (8 * i));
  EVP_DigestUpdate(ctx, len, sizeof(len));
  EVP_DigestUpdate(ctx, data, size);
}

// Tokens as a field of little-endian int32s regardless of the host, so hashes are stable across
// machines.
void TokensField(EVP_MD_CTX* ctx, absl::Span<const int32_t> tokens) {
  char small[4 * 256];
  std::string large;
  char* le = small;
  if (tokens.size() > 256) {
    large.resize(tokens.size() * 4);
    le = large.data();
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    const uint32_t t = static_cast<uint32_t>(tokens[i]);
    for (int b = 0; b < 4; ++b) le[4 * i + b] = static_cast<char>(t >> (8 * b));
  }
  Field(ctx, le, tokens.size() * 4);
}

// Incremental SHA-256 with length-prefixed fields.
class Sha256 {
 public:
  Sha256() : ctx_(EVP_MD_CTX_new()) { EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr); }
  ~Sha256() { EVP_MD_CTX_free(ctx_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Field(const void* data, uint64_t size) { ropekv::Field(ctx_, data, size); }
  void Field(absl::string_view s) { Field(s.data(), s.size()); }
  void Tokens(absl::Span<const int32_t> tokens) { TokensField(ctx_, tokens); }
  std::array<uint8_t, 32> Finish() {
    std::array<uint8_t, 32> out{};
    unsigned int n = 0;
    EVP_DigestFinal_ex(ctx_, out.data(), &n);
    return out;
  }

 private:
  EVP_MD_CTX* ctx_;
};

}  // namespace

std::string BlockHash::Hex() const {
  return absl::BytesToHexString(
      absl::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

absl::StatusOr<BlockHash> BlockHash::FromRaw(absl::string_view raw) {
  if (raw.size() != 32) {
    return absl::InvalidArgumentError(absl::StrCat("a block hash has 32 bytes, got ", raw.size()));
  }
  BlockHash h;
  std::copy(raw.begin(), raw.end(), h.bytes.begin());
  return h;
}

BlockHash PrefixBlockHash(absl::string_view model_id, absl::string_view tenant,
                          const BlockHash* parent, absl::Span<const int32_t> tokens) {
  // A prompt's chain hashes every block with the same first fields: the state after them is kept
  // per thread for the last (model, tenant) and copied for each block, and the contexts are
  // reused: a 2048-block chain 0.80 -> 0.33 ms on the 2-core VM (bench/RESULTS.md run 14).
  struct Contexts {
    Contexts() : base(EVP_MD_CTX_new()), work(EVP_MD_CTX_new()) {}
    ~Contexts() {
      EVP_MD_CTX_free(base);
      EVP_MD_CTX_free(work);
    }
    EVP_MD_CTX* base;
    EVP_MD_CTX* work;
    std::string model_id, tenant;
    bool ready = false;
  };
  thread_local Contexts c;
  if (!c.ready || c.model_id != model_id || c.tenant != tenant) {
    EVP_DigestInit_ex(c.base, EVP_sha256(), nullptr);
    constexpr absl::string_view kTag = "ropekv.prefix.v1";
    Field(c.base, kTag.data(), kTag.size());
    Field(c.base, model_id.data(), model_id.size());
    Field(c.base, tenant.data(), tenant.size());
    c.model_id.assign(model_id.data(), model_id.size());
    c.tenant.assign(tenant.data(), tenant.size());
    c.ready = true;
  }
  EVP_MD_CTX_copy_ex(c.work, c.base);
  if (parent != nullptr) {
    Field(c.work, parent->bytes.data(), parent->bytes.size());
  } else {
    Field(c.work, "", 0);
  }
  TokensField(c.work, tokens);
  BlockHash h;
  unsigned int n = 0;
  EVP_DigestFinal_ex(c.work, h.bytes.data(), &n);
  return h;
}

std::vector<BlockHash> PrefixHashMemo::Hashes(absl::string_view model_id, absl::string_view tenant,
                                              size_t block_tokens,
                                              absl::Span<const int32_t> tokens) {
  const size_t blocks = block_tokens == 0 ? 0 : tokens.size() / block_tokens;
  const size_t full = blocks * block_tokens;
  std::vector<BlockHash> hashes;
  hashes.reserve(blocks);
  const bool memo =
      options_.max_prompts > 0 && blocks >= options_.min_blocks && full <= options_.max_tokens;
  // Tokens of `tokens` that remembered prompt p shares from the start, in whole blocks' worth.
  auto shared = [&](const Prompt& p) -> size_t {
    if (p.block_tokens != block_tokens || p.model_id != model_id || p.tenant != tenant) return 0;
    const size_t n = std::min(p.tokens.size(), full);
    const size_t same =
        std::mismatch(p.tokens.begin(), p.tokens.begin() + n, tokens.begin()).first -
        p.tokens.begin();
    return same / block_tokens * block_tokens;
  };
  if (memo) {
    absl::MutexLock lock(&mu_);
    Prompt* best = nullptr;
    size_t best_tokens = 0;
    for (Prompt& p : prompts_) {
      if (const size_t s = shared(p); s > best_tokens) {
        best = &p;
        best_tokens = s;
      }
    }
    if (best != nullptr) {
      hashes.assign(best->hashes.begin(), best->hashes.begin() + best_tokens / block_tokens);
      best->used = ++clock_;
      reused_ += hashes.size();
    }
  }
  const size_t reused = hashes.size();
  for (size_t b = reused; b < blocks; ++b) {
    hashes.push_back(PrefixBlockHash(model_id, tenant, b == 0 ? nullptr : &hashes[b - 1],
                                     tokens.subspan(b * block_tokens, block_tokens)));
  }
  if (!memo || reused == blocks) return hashes;

  // Remember the prompt: in place of one it extends, else beside the others.
  absl::MutexLock lock(&mu_);
  Prompt* slot = nullptr;
  for (Prompt& p : prompts_) {
    const size_t s = shared(p);
    if (s == full) return hashes;  // remembered meanwhile, whole
    if (s == p.tokens.size()) slot = &p;
  }
  if (slot == nullptr) {
    prompts_.emplace_back();
    slot = &prompts_.back();
    slot->model_id.assign(model_id.data(), model_id.size());
    slot->tenant.assign(tenant.data(), tenant.size());
    slot->block_tokens = block_tokens;
  }
  tokens_ += full - slot->tokens.size();
  slot->tokens.assign(tokens.begin(), tokens.begin() + full);
  slot->hashes = hashes;
  slot->used = ++clock_;
  const uint64_t keep = slot->used;
  while (tokens_ > options_.max_tokens || prompts_.size() > options_.max_prompts) {
    auto victim = prompts_.end();
    for (auto it = prompts_.begin(); it != prompts_.end(); ++it) {
      if (it->used != keep && (victim == prompts_.end() || it->used < victim->used)) victim = it;
    }
    if (victim == prompts_.end()) break;
    tokens_ -= victim->tokens.size();
    prompts_.erase(victim);
  }
  return hashes;
}

uint64_t PrefixHashMemo::reused_blocks() const {
  absl::MutexLock lock(&mu_);
  return reused_;
}

BlockHash SegmentHash(absl::string_view model_id, absl::string_view tenant,
                      absl::Span<const int32_t> tokens) {
  Sha256 sha;
  sha.Field("ropekv.segment.v1");
  sha.Field(model_id);
  sha.Field(tenant);
  sha.Tokens(tokens);
  return BlockHash{sha.Finish()};
}

std::string Sha256Hex(absl::string_view bytes) {
  Sha256 sha;
  sha.Field(bytes);
  const auto d = sha.Finish();
  return absl::BytesToHexString(absl::string_view(reinterpret_cast<const char*>(d.data()), 32));
}

uint64_t BlockChecksum(const void* data, size_t size) { return XXH3_64bits(data, size); }

}  // namespace ropekv
