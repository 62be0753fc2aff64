// APE (Adaptive Parallel Encoding) attention merge, and the plain softmax attention beside it.
//
// A prompt of parallel contexts is a shared prefix P at positions 0..|P|-1, contexts C_1..C_m each
// encoded on its own at positions |P|.., and query tokens after them. APE attends from each query
// token to two groups of keys and merges the two results:
//   (o_c, lse_c) = softmax attention over the context group, scale 1/(sqrt(d)*T)
//   (o_o, lse_o) = softmax attention over the other keys (prefix, earlier query tokens, the query
//                  token's own key; causal among query tokens), scale 1/sqrt(d)
//   (w_c, w_o)   = softmax([S*T*lse_c, lse_o])
//   o            = w_c*o_c + w_o*o_o                                    (all of it in fp32)
// where lse = log(sum_j exp(score_j)) over the group's scaled scores. With T = S = 1 this is
// exactly full softmax attention over all keys of both groups.
//
// Three implementations: ApeAttentionCpu (the reference: plain loops, fp64 accumulation; also the
// daemon's CPU path), ApeAttentionCuda (flash-decoding: keys split over thread blocks, per-split
// (o, lse), one combine kernel applying the APE weights), and AttentionCpu (plain full softmax
// attention, the check for T = S = 1). Queries may be one token (decode) or n tokens (prefill),
// with grouped-query attention: q head h reads KV head h / (q_heads / kv_heads).
#ifndef ROPEKV_KERNELS_APE_APE_H_
#define ROPEKV_KERNELS_APE_APE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/common/dtype.h"

// The CUDA runtime's stream type is `CUstream_st*` (cudaStream_t); declared here so this header
// needs no CUDA headers. Pass a cudaStream_t as is; nullptr is the legacy default stream.
struct CUstream_st;

namespace ropekv {

// One run of cached tokens of every KV head, keys and values alike: element (h, t, d) of keys is
// static_cast<const T*>(k)[h * head_stride + t * token_stride + d] with T the KV dtype; values
// the same with v. head_dim is contiguous. Strides are in elements; 0 means packed
// ([kv_heads][tokens][head_dim]: head_stride = tokens * head_dim, token_stride = head_dim).
// A vLLM-style [tokens][kv_heads][head_dim] buffer is head_stride = head_dim,
// token_stride = kv_heads * head_dim.
struct KvSegment {
  const void* k = nullptr;  // [kv_heads][tokens][head_dim], strides below
  const void* v = nullptr;  // [kv_heads][tokens][head_dim], strides below
  int64_t tokens = 0;
  int64_t head_stride = 0;
  int64_t token_stride = 0;
};

// Shapes and element types shared by both attentions.
struct AttentionShape {
  // Query tokens n: 1 = decode, more = prefill (causal among themselves).
  int32_t num_queries = 1;
  // Query heads; a multiple of kv_heads.
  int32_t q_heads = 0;
  // KV heads; q head h reads KV head h / (q_heads / kv_heads).
  int32_t kv_heads = 0;
  // CPU: 1..1024. CUDA: 64, 96, 128 or 256.
  int32_t head_dim = 0;
  // Element type of q.
  DType q_dtype = DType::kBF16;
  // Element type of every key and value.
  DType kv_dtype = DType::kBF16;
  // Element type of the output (rounded once, to nearest even).
  DType out_dtype = DType::kF32;
};

// Arguments of the APE merge.
//
// Visibility: query i (0-based of n) sees every key of the context group and the keys
// 0..L_o - n + i of the other group (L_o = total tokens of `other`): the last n keys of `other`
// are the n query tokens' own keys, in order. So `other` is the prefix, then any earlier query or
// generated tokens, then the current query tokens.
struct ApeArgs {
  AttentionShape shape;
  // APE temperature T (> 0): the context group's scores are scaled by 1/(sqrt(d)*T).
  float temperature = 1.0f;
  // APE scale S (> 0): the context group's merge logit is S*T*lse_c.
  float scale = 1.0f;
  // [num_queries][q_heads][head_dim], strides in elements; 0 = packed.
  const void* q = nullptr;
  int64_t q_token_stride = 0;
  int64_t q_head_stride = 0;
  // The parallel-context group, any number of segments (may be empty).
  absl::Span<const KvSegment> context;
  // Prefix, earlier query tokens, and last the n query tokens' own keys: at least n tokens.
  absl::Span<const KvSegment> other;
  // [num_queries][q_heads][head_dim] packed, shape.out_dtype.
  void* out = nullptr;
  // [num_queries][q_heads] or nullptr: natural-log sum of the merged weights,
  // log(exp(S*T*lse_c) + exp(lse_o)); equals full attention's lse when T = S = 1.
  float* lse = nullptr;
};

// Arguments of plain softmax attention over one list of keys.
struct AttentionArgs {
  AttentionShape shape;
  // Scores are q.k * softmax_scale; 0 means 1/sqrt(head_dim).
  double softmax_scale = 0.0;
  // [num_queries][q_heads][head_dim], strides in elements; 0 = packed.
  const void* q = nullptr;
  int64_t q_token_stride = 0;
  int64_t q_head_stride = 0;
  // All keys; query i sees keys 0..L - n + i (the last n are the queries' own, as in ApeArgs).
  absl::Span<const KvSegment> keys;
  // [num_queries][q_heads][head_dim] packed, shape.out_dtype.
  void* out = nullptr;
  // [num_queries][q_heads] or nullptr: log(sum_j exp(score_j)).
  float* lse = nullptr;
};

// Checks shapes, dtypes, pointers, strides and T, S of an APE call; INVALID_ARGUMENT naming the
// field, what was expected and what came. Does not read any buffer. Thread-safe.
absl::Status ValidateApeArgs(const ApeArgs& args);

// The APE merge on the CPU: plain loops, fp64 accumulation, one rounding to out_dtype. Reads host
// memory only. Returns INVALID_ARGUMENT as ValidateApeArgs; writes nothing then. Thread-safe for
// distinct outputs.
absl::Status ApeAttentionCpu(const ApeArgs& args);

// Full softmax attention on the CPU (fp64 accumulation): the reference APE reduces to at
// T = S = 1. INVALID_ARGUMENT on bad shapes (fewer keys than queries, ...). Thread-safe for
// distinct outputs.
absl::Status AttentionCpu(const AttentionArgs& args);

// Options of the CUDA path.
struct ApeCudaOptions {
  enum class Kernel : uint8_t {
    // Tensor cores for many query rows per KV head (prefill) when the dtypes allow, else generic.
    kAuto = 0,
    // CUDA-core split kernel: every dtype and head_dim.
    kGeneric = 1,
    // mma.sync kernel: kv_dtype == q_dtype in {f16, bf16}, head_dim 64/96/128, sm_80 or newer;
    // INVALID_ARGUMENT otherwise.
    kTensorCore = 2,
  };
  // Which split kernel runs.
  Kernel kernel = Kernel::kAuto;
  // Keys per split (a multiple of 64); 0 = chosen from the shape and the device's SM count.
  int32_t split_tokens = 0;
};

// Most KV segments (context + other) one CUDA call takes.
inline constexpr int kApeCudaMaxSegments = 64;

// Bytes of device workspace ApeAttentionCuda needs for `args` on the current device (the split
// plan depends on its SM count). INVALID_ARGUMENT as ApeAttentionCuda; UNIMPLEMENTED in builds
// without CUDA.
absl::StatusOr<size_t> ApeCudaWorkspaceBytes(const ApeArgs& args,
                                             const ApeCudaOptions& options = {});

// The APE merge on the current CUDA device, enqueued on `stream`; returns without waiting for it.
// Every pointer of `args` (q, keys, values, out, lse) is device memory. K/V pointers and strides
// must be 16-byte aligned (head_dim * element size is). `workspace` is device memory of at least
// ApeCudaWorkspaceBytes bytes, 16-byte aligned, used only by this call until it completes on
// `stream`; nullptr allocates and frees it on the stream (cudaMallocAsync). Errors:
// INVALID_ARGUMENT (as ValidateApeArgs, unsupported head_dim, misaligned pointers, more than
// kApeCudaMaxSegments segments, workspace too small), INTERNAL / RESOURCE_EXHAUSTED for CUDA
// errors, UNIMPLEMENTED in builds without CUDA. Thread-safe; no host synchronisation.
absl::Status ApeAttentionCuda(const ApeArgs& args, void* workspace, size_t workspace_bytes,
                              CUstream_st* stream, const ApeCudaOptions& options = {});

}  // namespace ropekv

#endif  // ROPEKV_KERNELS_APE_APE_H_
