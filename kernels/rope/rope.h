// RoPE for ropekv: every rope_type Hugging Face transformers implements for decoder LLMs, the
// frequency tables exactly as HF computes them (fp32), fresh rotation as the frontend does it, and
// the core operation of the daemon: re-rotate-and-copy of cached keys from the position (and
// table) they were rotated at to a new one, in ONE rotation with fp32 arithmetic and one rounding.
//
// This header has no CUDA types; the CPU functions here are the reference and the daemon's CPU
// path. The CUDA version lives in kernels/rope/rerotate_cuda.h. See docs/rope.md.
#ifndef ROPEKV_KERNELS_ROPE_ROPE_H_
#define ROPEKV_KERNELS_ROPE_ROPE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "kernels/common/dtype.h"

namespace ropekv {

// HF `rope_type` (config.rope_scaling["rope_type"]).
enum class RopeType : uint8_t {
  kDefault = 0,   // "default": theta^(-2i/d)
  kLinear = 1,    // "linear": Position Interpolation, inv_freq / factor
  kDynamic = 2,   // "dynamic": NTK-aware, base grows with the sequence length (length-dependent)
  kLlama3 = 3,    // "llama3": wavelength-banded scaling
  kYarn = 4,      // "yarn": ramp between interpolation and extrapolation, attention_factor
  kLongRope = 5,  // "longrope": per-pair short/long factors (length-dependent), attention_factor
};

// Which dimensions form a rotated pair.
enum class PairLayout : uint8_t {
  kNeox = 0,  // rotate_half (Llama, Mistral, Qwen, ...): pairs (i, i + rotary_dim/2)
  kGptj = 1,  // rotate_every_two (GPT-J, ...): interleaved pairs (2i, 2i+1)
};

// A model's rotary position embedding, as in its HF config. Validate with ValidateRopeSpec.
struct RopeSpec {
  // rope_scaling["rope_type"]; kDefault when the config has no rope_scaling.
  RopeType type = RopeType::kDefault;
  // config.rope_theta (the base).
  double theta = 10000.0;
  // Dimension of one attention head (> 0, even).
  int head_dim = 0;
  // Rotated dimensions (HF: int(head_dim * partial_rotary_factor)); 0 means head_dim. Even,
  // <= head_dim. Dimensions [rotary_dim, head_dim) pass through unchanged.
  int rotary_dim = 0;
  // Pair layout of the rotated dimensions.
  PairLayout layout = PairLayout::kNeox;
  // rope_scaling["factor"] (s): linear, dynamic, llama3, yarn, longrope. > 0.
  double factor = 1.0;
  // config.max_position_embeddings: dynamic's L_max (required there); longrope's and yarn's
  // target length where HF derives the factor from max / original (0 = absent).
  int64_t max_position_embeddings = 0;
  // original_max_position_embeddings (L_o): llama3 (required), longrope (0 = use
  // max_position_embeddings, as HF does), yarn (0 = absent from rope_scaling).
  int64_t original_max_position_embeddings = 0;
  // llama3: rope_scaling["low_freq_factor"], ["high_freq_factor"] (low < high).
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  // yarn: rope_scaling["beta_fast"], ["beta_slow"].
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  // yarn: rope_scaling["mscale"], ["mscale_all_dim"] (0 = absent). When both are set,
  // attention_factor = get_mscale(s, mscale) / get_mscale(s, mscale_all_dim).
  double mscale = 0.0;
  double mscale_all_dim = 0.0;
  // yarn: rope_scaling["truncate"] (floor/ceil the correction range).
  bool truncate = true;
  // rope_scaling["attention_factor"]: explicit override for yarn and longrope (0 = derived as HF
  // does). Must be 0 for other types.
  double attention_factor = 0.0;
  // longrope: rope_scaling["short_factor"], ["long_factor"], rotary_dim/2 entries each (> 0).
  std::vector<double> short_factor;
  std::vector<double> long_factor;
};

// Rotary dims of a spec (rotary_dim, or head_dim when rotary_dim is 0).
int RotaryDim(const RopeSpec& spec);

// "default", "linear", "dynamic", "llama3", "yarn", "longrope" (HF's rope_type strings).
const char* RopeTypeName(RopeType type);

// OK, or INVALID_ARGUMENT naming the field with expected vs got ("rope.rotary_dim must be even
// and <= head_dim 128, got 130").
absl::Status ValidateRopeSpec(const RopeSpec& spec);

// Which frequency table rotated a key. Static types: 0 always. Dynamic NTK: the seq_len the table
// was built for (HF builds it from max(position)+1 of the batch when that exceeds what it has
// cached; it resets to the base table when a batch is shorter than max_position_embeddings
// again); every seq_len <= max_position_embeddings canonicalizes to 0 (the base table). LongRoPE:
// kLongRopeShortTable (seq_len <= L_o) or kLongRopeLongTable.
using RopeTableId = int64_t;
inline constexpr RopeTableId kBaseTable = 0;
inline constexpr RopeTableId kLongRopeShortTable = 0;
inline constexpr RopeTableId kLongRopeLongTable = 1;

// The canonical table id HF would use for a forward pass whose largest position is seq_len - 1
// (equal tables have equal ids). Precondition: ValidateRopeSpec(spec).ok().
RopeTableId RopeTableFor(const RopeSpec& spec, int64_t seq_len);

// OK if `table` is a canonical id of this spec (RopeTableFor could return it), else
// INVALID_ARGUMENT.
absl::Status ValidateRopeTable(const RopeSpec& spec, RopeTableId table);

// The inverse frequencies of a table, rotary_dim/2 entries, in fp32 exactly as HF computes them
// (see docs/rope.md for the arithmetic and the residual differences). Precondition: the spec and
// table are valid (otherwise returns an empty vector).
std::vector<float> InvFreq(const RopeSpec& spec, RopeTableId table);

// The same frequencies computed in fp64 from the closed form (for references and tests).
std::vector<double> InvFreq64(const RopeSpec& spec, RopeTableId table);

// The factor HF multiplies cos and sin with (yarn, longrope; 1 for the other types). Keys that
// the frontend stored already contain it; re-rotation never applies it again.
float AttentionFactor(const RopeSpec& spec);

// How a re-rotation computes its angle.
enum class RerotateMode : uint8_t {
  // Default: k' = T(p')·T(p)ᵀ·k with the fp32 angles fl32(fl32(p)·inv_freq) of the engine's
  // tables, i.e. exactly the angle the frontend itself would have used at p'.
  kEngine = 0,
  // The angle p'·θ' − p·θ of the fp32 frequencies computed in fp64 (reduced mod 2π by sincos):
  // the mathematically exact move, independent of fp32 angle rounding.
  kExact = 1,
};

// Fresh rotation as the frontend does it (HF apply_rotary_pos_emb, including attention_factor,
// cos/sin of the fp32 angle in fp32, products and sum in fp32), rounded once to `dtype`.
// x: [n][heads][head_dim] of dtype, rotated in place; positions: [n] (>= 0).
// Errors: INVALID_ARGUMENT for an invalid spec/table, n < 0, heads <= 0, null pointers or a
// negative position. For tests and the reference model.
absl::Status ApplyRopeCpu(const RopeSpec& spec, RopeTableId table, DType dtype, int64_t n,
                          int heads, void* x, const int64_t* positions);

// Where K/V element (layer, kv /*0=K,1=V*/, head, token, dim) of a region sits:
// base + layer*layer + kv*kv + head*head + token*token + dim, in elements (dim contiguous).
// A stored block [layer][k|v][kv_head][token][head_dim] of T tokens has
// {2*H*T*D, H*T*D, T*D, D}.
struct KvStrides {
  int64_t layer = 0;
  int64_t kv = 0;
  int64_t head = 0;
  int64_t token = 0;
};

// Shape of a model's KV cache.
struct KvGeometry {
  int layers = 0;
  int kv_heads = 0;
  int head_dim = 0;  // must equal the RopeSpec's head_dim
  DType dtype = DType::kBF16;
};

// One run of consecutive tokens copied (and re-rotated) from src to dst.
struct RerotateCopy {
  const void* src = nullptr;  // region base, elements addressed with src_strides
  KvStrides src_strides;
  int64_t src_token = 0;  // first token copied
  void* dst = nullptr;    // region base, elements addressed with dst_strides
  KvStrides dst_strides;
  int64_t dst_token = 0;
  int64_t n_tokens = 0;        // >= 0
  int64_t from_pos = 0;        // position src_token's key was rotated at (>= 0)
  RopeTableId from_table = 0;  // table it was rotated with
  int64_t to_pos = 0;          // position dst_token's key must have (>= 0)
  RopeTableId to_table = 0;    // table it must be rotated with at dst
  bool keys_only = false;      // copy (and re-rotate) K only; dst's V is left untouched
};

// Copies every job's K and V; keys' rotary dims are re-rotated from (from_pos+t, from_table) to
// (to_pos+t, to_table) in ONE rotation with fp32 arithmetic and one rounding; values and
// pass-through dims are copied bit-exact. from == to (same position and table) copies bit-exact.
// Jobs must not overlap in dst (src and dst may be the same buffer only if the regions are
// identical: in place). Errors: INVALID_ARGUMENT for an invalid spec, geometry (head_dim differs
// from the spec's, non-positive sizes), table, null pointer, negative count, position or token
// index. Nothing is written unless every job is valid. Thread-compatible (no shared state).
absl::Status RerotateCopyCpu(const RopeSpec& spec, const KvGeometry& geometry,
                             absl::Span<const RerotateCopy> jobs,
                             RerotateMode mode = RerotateMode::kEngine);

}  // namespace ropekv

#endif  // ROPEKV_KERNELS_ROPE_ROPE_H_
