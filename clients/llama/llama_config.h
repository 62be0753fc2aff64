// The shape of a Llama-architecture model, read from a Hugging Face config.json (transformers'
// LlamaConfig, v4 and v5 spellings), and its RoPE as a ropekv::RopeSpec.
#ifndef ROPEKV_CLIENTS_LLAMA_LLAMA_CONFIG_H_
#define ROPEKV_CLIENTS_LLAMA_LLAMA_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace llama {

// RoPE parameters as Hugging Face writes them: transformers v5's "rope_parameters", or v4's
// top-level "rope_theta" plus "rope_scaling" (whose "type" is an old spelling of "rope_type").
// A field the config does not give keeps its default here (HF's default for that rope_type).
struct RopeParameters {
  // "default", "linear", "dynamic", "llama3", "yarn" or "longrope".
  std::string rope_type = "default";
  // Base of the frequencies.
  double theta = 10000.0;
  // Fraction of head_dim that is rotated (HF's partial_rotary_factor).
  double partial_rotary_factor = 1.0;
  // Scaling factor of linear, dynamic, llama3, yarn, longrope.
  double factor = 1.0;
  // Context length the model was pre-trained at (llama3, yarn, longrope); 0 = not given (HF
  // then uses max_position_embeddings).
  int64_t original_max_position_embeddings = 0;
  // llama3.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  // yarn.
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;          // 0 = not given
  double mscale_all_dim = 0.0;  // 0 = not given
  bool truncate = true;
  // yarn / longrope: multiplies cos and sin; 0 = not given (derived from factor as HF does).
  double attention_factor = 0.0;
  // longrope: per-frequency factors (rotary_dim / 2 each).
  std::vector<double> short_factor;
  std::vector<double> long_factor;
};

struct LlamaConfig {
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  // Per-head width; config.json may omit it (then hidden_size / num_attention_heads).
  int64_t head_dim = 0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 2048;
  RopeParameters rope;

  // Queries per KV head (GQA group size).
  int64_t group_size() const { return num_attention_heads / num_key_value_heads; }
};

// Checks that every dimension is positive, heads divide into KV heads, head_dim is even and the
// rotary dimension is a positive even number <= head_dim. INVALID_ARGUMENT naming the field.
absl::Status ValidateLlamaConfig(const LlamaConfig& config);

// Parses config.json text. Errors: INVALID_ARGUMENT (bad JSON, a field of the wrong type, an
// invalid shape), NOT_FOUND (a required field absent: hidden_size, intermediate_size,
// num_attention_heads, num_hidden_layers, vocab_size), UNIMPLEMENTED (what this forward pass does
// not compute: biases, an activation other than silu, a model_type other than llama, an unknown
// rope_type).
absl::StatusOr<LlamaConfig> ParseLlamaConfig(absl::string_view json_text);

// Reads and parses dir/config.json (NOT_FOUND when the file is absent).
absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& dir);

// The ropekv::RopeSpec of the model (NeoX rotate_half layout, as Llama uses). Errors:
// INVALID_ARGUMENT when the parameters do not make a valid spec.
absl::StatusOr<RopeSpec> RopeSpecOf(const LlamaConfig& config);

}  // namespace llama
}  // namespace ropekv

#endif  // ROPEKV_CLIENTS_LLAMA_LLAMA_CONFIG_H_
