// The reference frontend's forward pass with a replaceable attention, for the quality suite.
//
// clients/llama's LlamaModel::Prefill runs full causal attention. The quality suite also needs
// forward passes whose attention is something else: attention restricted to the tokens a top-k
// selection picked (kernels/topk), or APE's merge of a parallel-context group with the rest
// (kernels/ape). HookedForward computes exactly what Prefill computes (same weights, the same
// matmul, RMSNorm, SwiGLU and RoPE calls, in the same order) and lets an AttentionHook produce
// each layer's attention output of the new tokens. Without a hook it runs the frontend's own
// causal attention and equals Prefill bit for bit (tested in tests/integration/quality_test.cc).
//
// Thread safety: HookedForward is immutable after Create; concurrent Run calls need distinct
// caches and hooks.
#ifndef ROPEKV_BENCH_QUALITY_FORWARD_H_
#define ROPEKV_BENCH_QUALITY_FORWARD_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "clients/llama/kv_cache.h"
#include "clients/llama/llama_model.h"

namespace ropekv {
namespace quality {

// Everything one layer's attention may read, for the n new tokens of a Run.
struct AttentionInputs {
  int layer = 0;
  int64_t n = 0;      // new tokens (the queries)
  int64_t past = 0;   // tokens in the cache before them
  int64_t total = 0;  // past + n; query i is token past + i and sees keys [0, past + i]
  int heads = 0;      // query heads
  int kv_heads = 0;   // KV heads; query head h reads KV head h / (heads / kv_heads)
  int head_dim = 0;
  float scale = 0.0f;        // 1/sqrt(head_dim)
  const float* q = nullptr;  // [n][heads][head_dim], post-RoPE
  const float* k = nullptr;  // [kv_heads][total][head_dim], post-RoPE, as stored (rounded)
  const float* v = nullptr;  // [kv_heads][total][head_dim], as stored (rounded)
  // The cache the keys come from (this layer's K/V of the new tokens are already written).
  const llama::KvCache* cache = nullptr;
};

// Replaces the causal attention of a forward pass.
class AttentionHook {
 public:
  virtual ~AttentionHook() = default;
  // Writes the attention output of the n new tokens, before o_proj:
  //   out: [n][heads][head_dim] fp32.
  // An error aborts the Run (which then returns it, cache unchanged).
  virtual absl::Status Attend(const AttentionInputs& in, float* out) = 0;
};

class HookedForward {
 public:
  // Borrows `model` (must outlive this object) and keeps transposed copies of its weights.
  // INVALID_ARGUMENT for a null model.
  static absl::StatusOr<std::unique_ptr<HookedForward>> Create(const llama::LlamaModel* model);

  const llama::LlamaModel& model() const { return *model_; }

  // As LlamaModel::Prefill (single-threaded): runs tokens [n] at positions [n] after everything
  // in *cache, appends their K/V and returns the logits [n][vocab]; each layer's attention comes
  // from hook->Attend, or, with a null hook, from the frontend's causal attention. Errors:
  // INVALID_ARGUMENT (sizes differ, a token outside the vocabulary, a negative position, a cache
  // of another shape), and the hook's; the cache is unchanged then.
  absl::StatusOr<std::vector<float>> Run(absl::Span<const int32_t> tokens,
                                         absl::Span<const int64_t> positions, llama::KvCache* cache,
                                         AttentionHook* hook) const;

 private:
  explicit HookedForward(const llama::LlamaModel* model) : model_(model) {}

  const llama::LlamaModel* model_;
  // Transposed linear weights, [in][out], as LlamaModel keeps them.
  struct LayerT {
    std::vector<float> qkv;      // [hidden][(heads + 2 kv_heads) * head_dim]
    std::vector<float> o;        // [heads * head_dim][hidden]
    std::vector<float> gate_up;  // [hidden][2 * intermediate]
    std::vector<float> down;     // [intermediate][hidden]
  };
  std::vector<LayerT> layers_t_;
  std::vector<float> lm_head_t_;  // [hidden][vocab]
};

// Full causal attention over the stored keys in fp64 (plain loops): a second way to compute
// what the frontend computes, for tests and as the "full attention" arm of comparisons made
// with other fp64 hooks.
class FullAttentionHook : public AttentionHook {
 public:
  absl::Status Attend(const AttentionInputs& in, float* out) override;
};

}  // namespace quality
}  // namespace ropekv

#endif  // ROPEKV_BENCH_QUALITY_FORWARD_H_
