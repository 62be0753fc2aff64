#include "clients/llama/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ropekv {
namespace llama {

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvCacheOptions& options) {
  if (options.num_layers <= 0 || options.num_kv_heads <= 0 || options.head_dim <= 0 ||
      options.block_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KvCache: num_layers, num_kv_heads, head_dim and block_tokens must be positive, got ",
        options.num_layers, ", ", options.num_kv_heads, ", ", options.head_dim, ", ",
        options.block_tokens));
  }
  auto cache = std::unique_ptr<KvCache>(new KvCache(options));
  cache->elem_ = DTypeSize(options.dtype);
  return cache;
}

int64_t KvCache::TokensInBlock(int64_t b) const {
  const int64_t bt = options_.block_tokens;
  return std::min<int64_t>(bt, tokens() - b * bt);
}

size_t KvCache::BytesFor(int64_t n) const {
  return static_cast<size_t>(options_.num_layers) * 2 * options_.num_kv_heads *
         static_cast<size_t>(n) * options_.head_dim * elem_;
}

size_t KvCache::Offset(int layer, int kv, int head, int64_t slot) const {
  const size_t row = ((static_cast<size_t>(layer) * 2 + kv) * options_.num_kv_heads + head) *
                         options_.block_tokens +
                     static_cast<size_t>(slot);
  return row * options_.head_dim * elem_;
}

absl::Span<const uint8_t> KvCache::BlockData(int64_t b) const {
  return absl::MakeConstSpan(blocks_[static_cast<size_t>(b)]);
}

void KvCache::GrowTo(int64_t n) {
  const int64_t bt = options_.block_tokens;
  const int64_t want_blocks = (n + bt - 1) / bt;
  while (static_cast<int64_t>(blocks_.size()) < want_blocks) {
    blocks_.emplace_back(BlockBytes(), uint8_t{0});
  }
}

absl::Status KvCache::ExportTokens(int64_t begin, int64_t end, absl::Span<uint8_t> dst) const {
  if (begin < 0 || end < begin || end > tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::ExportTokens: range [", begin, ", ",
                                                   end, ") is not inside [0, ", tokens(), ")"));
  }
  const int64_t n = end - begin;
  if (dst.size() != BytesFor(n)) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::ExportTokens: ", n, " tokens need ",
                                                   BytesFor(n), " bytes, dst has ", dst.size()));
  }
  const size_t row = static_cast<size_t>(options_.head_dim) * elem_;
  const int64_t bt = options_.block_tokens;
  uint8_t* out = dst.data();
  for (int layer = 0; layer < options_.num_layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int h = 0; h < options_.num_kv_heads; ++h) {
        // Runs of consecutive tokens within one block are contiguous.
        for (int64_t t = begin; t < end;) {
          const int64_t b = t / bt, slot = t % bt;
          const int64_t run = std::min(end - t, bt - slot);
          std::memcpy(out, blocks_[b].data() + Offset(layer, kv, h, slot), run * row);
          out += run * row;
          t += run;
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status KvCache::AppendBytes(absl::Span<const int32_t> token_ids,
                                  absl::Span<const int64_t> positions,
                                  absl::Span<const uint8_t> src) {
  const int64_t n = static_cast<int64_t>(token_ids.size());
  if (positions.size() != token_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::AppendBytes: ", n, " token ids but ",
                                                   positions.size(), " positions"));
  }
  if (src.size() != BytesFor(n)) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::AppendBytes: ", n, " tokens need ",
                                                   BytesFor(n), " bytes, got ", src.size()));
  }
  const int64_t begin = tokens();
  const int64_t end = begin + n;
  GrowTo(end);
  token_ids_.insert(token_ids_.end(), token_ids.begin(), token_ids.end());
  positions_.insert(positions_.end(), positions.begin(), positions.end());
  const size_t row = static_cast<size_t>(options_.head_dim) * elem_;
  const int64_t bt = options_.block_tokens;
  const uint8_t* in = src.data();
  for (int layer = 0; layer < options_.num_layers; ++layer) {
    for (int kv = 0; kv < 2; ++kv) {
      for (int h = 0; h < options_.num_kv_heads; ++h) {
        for (int64_t t = begin; t < end;) {
          const int64_t b = t / bt, slot = t % bt;
          const int64_t run = std::min(end - t, bt - slot);
          std::memcpy(blocks_[b].data() + Offset(layer, kv, h, slot), in, run * row);
          in += run * row;
          t += run;
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> KvCache::Reserve(absl::Span<const int32_t> token_ids,
                                         absl::Span<const int64_t> positions) {
  if (positions.size() != token_ids.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KvCache::Reserve: ", token_ids.size(), " token ids but ", positions.size(), " positions"));
  }
  const int64_t first = tokens();
  GrowTo(first + static_cast<int64_t>(token_ids.size()));
  token_ids_.insert(token_ids_.end(), token_ids.begin(), token_ids.end());
  positions_.insert(positions_.end(), positions.begin(), positions.end());
  return first;
}

absl::Status KvCache::WriteLayer(int layer, int64_t first, absl::Span<const float> k,
                                 absl::Span<const float> v) {
  const int heads = options_.num_kv_heads, d = options_.head_dim;
  const int64_t per_token = static_cast<int64_t>(heads) * d;
  const int64_t n = per_token > 0 ? static_cast<int64_t>(k.size()) / per_token : 0;
  if (layer < 0 || layer >= options_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::WriteLayer: layer ", layer,
                                                   " is not in [0, ", options_.num_layers, ")"));
  }
  if (static_cast<int64_t>(k.size()) != n * per_token || v.size() != k.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvCache::WriteLayer: k and v must both hold n x ", heads, " x ", d,
                     " floats, got ", k.size(), " and ", v.size()));
  }
  if (first < 0 || first + n > tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::WriteLayer: tokens [", first, ", ",
                                                   first + n, ") are not inside [0, ", tokens(),
                                                   ")"));
  }
  const int64_t bt = options_.block_tokens;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = first + i;
    uint8_t* block = blocks_[t / bt].data();
    for (int h = 0; h < heads; ++h) {
      void* kd = block + Offset(layer, 0, h, t % bt);
      void* vd = block + Offset(layer, 1, h, t % bt);
      const float* ks = k.data() + (i * heads + h) * d;
      const float* vs = v.data() + (i * heads + h) * d;
      for (int c = 0; c < d; ++c) {
        StoreFromFloat(kd, c, options_.dtype, ks[c]);
        StoreFromFloat(vd, c, options_.dtype, vs[c]);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status KvCache::ReadHead(int layer, int kv_head, int64_t begin, int64_t end,
                               absl::Span<float> k, absl::Span<float> v) const {
  if (layer < 0 || layer >= options_.num_layers || kv_head < 0 ||
      kv_head >= options_.num_kv_heads) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvCache::ReadHead: layer ", layer, " / kv_head ", kv_head, " outside [0, ",
                     options_.num_layers, ") x [0, ", options_.num_kv_heads, ")"));
  }
  if (begin < 0 || end < begin || end > tokens()) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::ReadHead: range [", begin, ", ", end,
                                                   ") is not inside [0, ", tokens(), ")"));
  }
  const int d = options_.head_dim;
  const size_t want = static_cast<size_t>(end - begin) * d;
  if ((!k.empty() && k.size() != want) || (!v.empty() && v.size() != want)) {
    return absl::InvalidArgumentError(absl::StrCat("KvCache::ReadHead: outputs must hold ", want,
                                                   " floats, got ", k.size(), " and ", v.size()));
  }
  const int64_t bt = options_.block_tokens;
  for (int kv = 0; kv < 2; ++kv) {
    absl::Span<float> out = kv == 0 ? k : v;
    if (out.empty()) continue;
    for (int64_t t = begin; t < end; ++t) {
      const uint8_t* src = blocks_[t / bt].data() + Offset(layer, kv, kv_head, t % bt);
      float* dst = out.data() + (t - begin) * d;
      switch (options_.dtype) {
        case DType::kF32:
          std::memcpy(dst, src, static_cast<size_t>(d) * 4);
          break;
        case DType::kBF16:
        case DType::kF16:
          for (int c = 0; c < d; ++c) dst[c] = LoadAsFloat(src, c, options_.dtype);
          break;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status KvCache::Truncate(int64_t n) {
  if (n < 0 || n > tokens()) {
    return absl::InvalidArgumentError(
        absl::StrCat("KvCache::Truncate: ", n, " is not in [0, ", tokens(), "]"));
  }
  const int64_t bt = options_.block_tokens;
  token_ids_.resize(static_cast<size_t>(n));
  positions_.resize(static_cast<size_t>(n));
  blocks_.resize(static_cast<size_t>((n + bt - 1) / bt));
  if (n % bt != 0) {
    // Keep the invariant that unused slots of the last block are zero.
    const int64_t used = n % bt;
    const size_t row = static_cast<size_t>(options_.head_dim) * elem_;
    std::vector<uint8_t>& last = blocks_.back();
    for (int layer = 0; layer < options_.num_layers; ++layer) {
      for (int kv = 0; kv < 2; ++kv) {
        for (int h = 0; h < options_.num_kv_heads; ++h) {
          std::memset(last.data() + Offset(layer, kv, h, used), 0, (bt - used) * row);
        }
      }
    }
  }
  if (n == 0) rope_seq_len_ = 0;
  return absl::OkStatus();
}

}  // namespace llama
}  // namespace ropekv
