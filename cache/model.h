// Models: the shape of a model's KV cache (ModelSpec), its stable id, and the geometry of a
// block. A block holds block_tokens consecutive tokens of one model, all layers, laid out
// [layer][k|v][kv_head][token][head_dim] so that a head's keys are one contiguous matrix.
#ifndef ROPEKV_CACHE_MODEL_H_
#define ROPEKV_CACHE_MODEL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rope.h"

namespace ropekv {

// A model id: 16 lowercase hex digits of SHA-256 over the canonical encoding of the spec, so two
// frontends serving the same model (same shapes, dtype, RoPE) share caches across processes and
// versions.
using ModelId = std::string;

struct ModelSpec {
  int layers = 0;              // decoder layers
  int kv_heads = 0;            // key/value heads (GQA: fewer than query heads)
  int head_dim = 0;            // elements per head
  DType dtype = DType::kBF16;  // element type of stored K and V
  int block_tokens = 16;       // tokens per block
  RopeSpec rope;               // how keys were rotated; rope.head_dim mirrors head_dim
};

// Limits enforced by ValidateModelSpec (a request past them is INVALID_ARGUMENT).
inline constexpr int kMaxLayers = 1024;
inline constexpr int kMaxKvHeads = 1024;
inline constexpr int kMaxHeadDim = 1024;
inline constexpr int kMaxBlockTokens = 4096;

// OK, or INVALID_ARGUMENT naming the offending field with expected and given values.
absl::Status ValidateModelSpec(const ModelSpec& spec);

// Stable id of a (validated) spec.
ModelId ModelIdOf(const ModelSpec& spec);

// Bytes of one block: layers * 2 * kv_heads * block_tokens * head_dim * dtype size.
uint64_t BlockBytes(const ModelSpec& spec);

// Geometry of a stored block for the re-rotation kernels.
KvGeometry BlockGeometry(const ModelSpec& spec);
KvStrides BlockStrides(const ModelSpec& spec);

// The built-in demo model of the CLI: 4 layers, 2 KV heads, head_dim 64, bf16, 16-token blocks,
// default RoPE with theta 10000.
ModelSpec DemoModelSpec();

}  // namespace ropekv

#endif  // ROPEKV_CACHE_MODEL_H_
