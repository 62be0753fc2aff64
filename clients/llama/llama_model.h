// The reference frontend: a Llama-architecture forward pass on the CPU in fp32 (RMSNorm, GQA
// attention with RoPE through kernels/rope, SwiGLU MLP, final norm, lm_head) over Hugging Face
// safetensors weights, with its KV cache in ropekv's block layout (KvCache).
//
// It is what the tests, the examples and the quality suite use as "the frontend": it prefills
// tokens at explicit positions over whatever a KvCache already holds (its own earlier tokens, or
// KV read from the daemon after an edit, a composition or a re-rotation), so that reuse can be
// compared with a full re-encode on a real model.
//
//   auto model = LlamaModel::Load("tests/data/models/code-byte-9m");
//   auto cache = (*model)->NewCache(DType::kBF16);
//   auto logits = (*model)->Prefill(tokens, positions, cache->get());  // [n][vocab]
#ifndef ROPEKV_CLIENTS_LLAMA_LLAMA_MODEL_H_
#define ROPEKV_CLIENTS_LLAMA_LLAMA_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "clients/llama/kv_cache.h"
#include "clients/llama/llama_config.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace llama {

// fp32 weights in Hugging Face's layout (nn.Linear: [out_features][in_features], row-major).
struct LlamaWeights {
  struct Layer {
    std::vector<float> input_norm;      // [hidden]
    std::vector<float> q_proj;          // [heads * head_dim][hidden]
    std::vector<float> k_proj;          // [kv_heads * head_dim][hidden]
    std::vector<float> v_proj;          // [kv_heads * head_dim][hidden]
    std::vector<float> o_proj;          // [hidden][heads * head_dim]
    std::vector<float> post_attn_norm;  // [hidden]
    std::vector<float> gate_proj;       // [intermediate][hidden]
    std::vector<float> up_proj;         // [intermediate][hidden]
    std::vector<float> down_proj;       // [hidden][intermediate]
  };
  std::vector<float> embed_tokens;  // [vocab][hidden]
  std::vector<Layer> layers;
  std::vector<float> final_norm;  // [hidden]
  std::vector<float> lm_head;     // [vocab][hidden] (a copy of embed_tokens when tied)
};

// Intermediate tensors of one Prefill, for tests and analysis (each outer index is a layer).
struct ForwardTrace {
  // [layers + 1][n][hidden]: the embeddings, then each layer's output (before the final norm).
  std::vector<std::vector<float>> hidden;
  // [layers][n][heads][head_dim]: queries after RoPE.
  std::vector<std::vector<float>> queries;
  // [layers][n][kv_heads][head_dim]: keys after RoPE, before rounding to the cache dtype.
  std::vector<std::vector<float>> keys;
  // [layers][n][kv_heads][head_dim]: values before rounding to the cache dtype.
  std::vector<std::vector<float>> values;
  // [layers][n][heads][head_dim]: attention output per head, before o_proj.
  std::vector<std::vector<float>> attention;
};

class LlamaModel {
 public:
  struct Options {
    // Threads for matmuls and attention; 0 = std::thread::hardware_concurrency().
    int threads = 0;
  };

  // Loads dir/config.json and the safetensors weights (sharded with
  // model.safetensors.index.json, or model.safetensors), converting them to fp32. Errors:
  // NOT_FOUND (a file or tensor is missing, named), INVALID_ARGUMENT (a tensor's shape differs
  // from the config's: "tensor t has shape [..], expected [..]"), DATA_LOSS (truncated file),
  // UNIMPLEMENTED (a config this forward pass does not compute), and those of RopeSpecOf.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir,
                                                          const Options& options);
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir) {
    return Load(dir, Options());
  }

  // A model with random weights drawn from `seed` (deterministic): linear weights uniform in
  // +-1/sqrt(fan_in), embeddings uniform in +-1, norm weights 1 +- 0.1. INVALID_ARGUMENT for an
  // invalid config.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Random(const LlamaConfig& config,
                                                            uint64_t seed, const Options& options);
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Random(const LlamaConfig& config,
                                                            uint64_t seed) {
    return Random(config, seed, Options());
  }

  const LlamaConfig& config() const { return config_; }
  const RopeSpec& rope() const { return rope_; }
  const LlamaWeights& weights() const { return weights_; }

  // An empty cache shaped for this model (layers, KV heads, head_dim) in `dtype`.
  absl::StatusOr<std::unique_ptr<KvCache>> NewCache(DType dtype, int block_tokens = 16) const;

  // Runs tokens [n] at positions [n] after everything already in *cache: the new tokens attend
  // to every cached token and causally to each other (by order, whatever the positions say).
  // Appends their K (post-RoPE) and V, rounded to the cache dtype, to the cache; attention uses
  // the rounded values. Returns the logits [n][vocab] (fp32). When trace is non-null it is
  // overwritten with the intermediates of this call.
  // Errors: INVALID_ARGUMENT (sizes differ, a token outside [0, vocab), a negative position, a
  // cache of another shape); the cache is unchanged then. Thread-compatible: concurrent calls
  // need distinct caches (the model itself is immutable).
  absl::StatusOr<std::vector<float>> Prefill(absl::Span<const int32_t> tokens,
                                             absl::Span<const int64_t> positions, KvCache* cache,
                                             ForwardTrace* trace = nullptr) const;

  // Layer 0's keys of tokens at positions, post-RoPE, fp32: [n][kv_heads][head_dim]. They depend
  // on the token and its position only (no context), so a block's layer-0 keys identify where it
  // was rotated. Errors as Prefill.
  absl::StatusOr<std::vector<float>> Layer0Keys(absl::Span<const int32_t> tokens,
                                                absl::Span<const int64_t> positions) const;

 private:
  LlamaModel(const LlamaConfig& config, const RopeSpec& rope, const Options& options);

  absl::Status CheckInputs(absl::Span<const int32_t> tokens,
                           absl::Span<const int64_t> positions) const;
  // x [n][hidden] -> out [n][hidden]: RMSNorm with weight w [hidden].
  void RmsNorm(const float* x, const float* w, int64_t n, float* out) const;
  // Applies RoPE to x [n][heads][head_dim] in place.
  absl::Status Rope(int64_t n, int heads, float* x, const int64_t* positions,
                    int64_t seq_len) const;

  LlamaConfig config_;
  RopeSpec rope_;
  int threads_ = 1;
  LlamaWeights weights_;
  // Transposed copies of the linear weights for the matmul kernel ([in][out]).
  struct LayerT {
    std::vector<float> qkv;      // [hidden][(heads + 2 kv_heads) * head_dim]
    std::vector<float> o;        // [heads * head_dim][hidden]
    std::vector<float> gate_up;  // [hidden][2 * intermediate]
    std::vector<float> down;     // [intermediate][hidden]
  };
  std::vector<LayerT> layers_t_;
  std::vector<float> lm_head_t_;  // [hidden][vocab]
  void BuildTransposed();
};

// Matmul kernel of the frontend, exposed for tests and benchmarks:
//   y [n][out] = x [n][in] . wt [in][out]
// fp32 with fp32 accumulation over in (in order), split over `threads` threads.
void MatmulF32(const float* x, const float* wt, int64_t n, int64_t in, int64_t out, float* y,
               int threads);

}  // namespace llama
}  // namespace ropekv

#endif  // ROPEKV_CLIENTS_LLAMA_LLAMA_MODEL_H_
