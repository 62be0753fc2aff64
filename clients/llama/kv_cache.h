// The reference frontend's KV cache, kept in ropekv's block layout so that its bytes go to and
// come from the daemon unchanged.
//
// A block holds block_tokens consecutive tokens of all layers as
//   [layer][k|v][kv_head][token][head_dim]
// in the cache's dtype (fp32, fp16 or bf16); keys are post-RoPE. Every token also carries its
// token id and its position (the position its key was rotated at). Positions are explicit and
// need not be 0..n-1: after a PIE edit or a composed prompt they are what the daemon says. The
// attention of LlamaModel reads the stored (rounded) values, as a bf16 frontend would.
//
// Not thread-safe: one owner (a LlamaModel call or the test) at a time.
#ifndef ROPEKV_CLIENTS_LLAMA_KV_CACHE_H_
#define ROPEKV_CLIENTS_LLAMA_KV_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace llama {

struct KvCacheOptions {
  // Layers of the model (> 0).
  int num_layers = 0;
  // KV heads per layer (> 0).
  int num_kv_heads = 0;
  // Width of one head (> 0).
  int head_dim = 0;
  // Element type of stored K and V. K/V are rounded to it once when appended.
  DType dtype = DType::kF32;
  // Tokens per block (> 0); the last block may be partial.
  int block_tokens = 16;
};

class KvCache {
 public:
  // INVALID_ARGUMENT when a dimension is not positive.
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const KvCacheOptions& options);

  const KvCacheOptions& options() const { return options_; }
  // Tokens held.
  int64_t tokens() const { return static_cast<int64_t>(positions_.size()); }
  // ceil(tokens() / block_tokens).
  int64_t num_blocks() const { return static_cast<int64_t>(blocks_.size()); }
  // Tokens of block b: block_tokens, or fewer for the last block. Requires b < num_blocks().
  int64_t TokensInBlock(int64_t b) const;
  // Token ids and positions of every token, in order.
  absl::Span<const int32_t> token_ids() const { return token_ids_; }
  absl::Span<const int64_t> positions() const { return positions_; }

  // Bytes of the block-layout image of n tokens: layers * 2 * kv_heads * n * head_dim * dtype.
  size_t BytesFor(int64_t n) const;
  // Bytes of a full block, BytesFor(block_tokens).
  size_t BlockBytes() const { return BytesFor(options_.block_tokens); }

  // The stored bytes of block b, BlockBytes() long, layout
  // [layer][k|v][kv_head][block_tokens][head_dim]; in a partial last block the slots past
  // TokensInBlock(b) are zero. The span is valid until the cache is next modified.
  // Requires b < num_blocks().
  absl::Span<const uint8_t> BlockData(int64_t b) const;

  // Writes tokens [begin, end) into dst in block layout with end - begin tokens per head:
  //   dst: [layer][k|v][kv_head][end - begin][head_dim] of the cache dtype.
  // For a block-aligned range of block_tokens tokens this is exactly BlockData. Errors:
  // INVALID_ARGUMENT (range outside [0, tokens()], dst.size() != BytesFor(end - begin)).
  absl::Status ExportTokens(int64_t begin, int64_t end, absl::Span<uint8_t> dst) const;

  // Appends n = token_ids.size() tokens given as block-layout bytes
  //   src: [layer][k|v][kv_head][n][head_dim] of the cache dtype (e.g. read from the daemon),
  // with their token ids and positions. Errors: INVALID_ARGUMENT (sizes disagree:
  // positions.size() != n or src.size() != BytesFor(n)); the cache is unchanged then.
  absl::Status AppendBytes(absl::Span<const int32_t> token_ids, absl::Span<const int64_t> positions,
                           absl::Span<const uint8_t> src);

  // Appends n tokens (ids and positions) whose K/V are zero until written with WriteLayer.
  // Returns the index of the first new token. INVALID_ARGUMENT when the spans' sizes differ.
  absl::StatusOr<int64_t> Reserve(absl::Span<const int32_t> token_ids,
                                  absl::Span<const int64_t> positions);

  // Stores layer `layer`'s keys and values of tokens [first, first + n), rounded to the cache
  // dtype:
  //   k, v: [n][kv_heads][head_dim] fp32 (keys post-RoPE).
  // INVALID_ARGUMENT when the layer or the range is out of bounds or the spans are not
  // n * kv_heads * head_dim long.
  absl::Status WriteLayer(int layer, int64_t first, absl::Span<const float> k,
                          absl::Span<const float> v);

  // Reads the stored keys and values of one layer and KV head for tokens [begin, end) as fp32:
  //   k, v: [end - begin][head_dim].
  // Either output may be empty (not read). INVALID_ARGUMENT on a bad layer, head, range or size.
  absl::Status ReadHead(int layer, int kv_head, int64_t begin, int64_t end, absl::Span<float> k,
                        absl::Span<float> v) const;

  // Drops every token from n on (n <= tokens(); INVALID_ARGUMENT otherwise).
  absl::Status Truncate(int64_t n);
  void Clear() { (void)Truncate(0); }

  // The largest sequence length the model's RoPE table was built for while filling this cache
  // (HF's dynamic NTK table grows, never shrinks, with max(position) + 1). Managed by LlamaModel.
  int64_t rope_seq_len() const { return rope_seq_len_; }
  void set_rope_seq_len(int64_t n) { rope_seq_len_ = n; }

 private:
  explicit KvCache(const KvCacheOptions& options) : options_(options) {}

  // Byte offset of element (layer, kv (0 = k, 1 = v), head, slot) within a block.
  size_t Offset(int layer, int kv, int head, int64_t slot) const;
  void GrowTo(int64_t n);

  KvCacheOptions options_;
  size_t elem_ = 4;
  std::vector<std::vector<uint8_t>> blocks_;  // each BlockBytes() long
  std::vector<int32_t> token_ids_;
  std::vector<int64_t> positions_;
  int64_t rope_seq_len_ = 0;
};

}  // namespace llama
}  // namespace ropekv

#endif  // ROPEKV_CLIENTS_LLAMA_KV_CACHE_H_
