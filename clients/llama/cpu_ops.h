// fp32 CPU building blocks of the reference frontend: a register-blocked matmul, RMSNorm,
// SwiGLU and causal attention for one head, with a small fork-join helper for 2+ cores.
//
// The kernels are plain C++ (GCC vector extensions for the matmul's register tile, an AVX2 + FMA
// build of it chosen at run time), so the same source is the reference and the fast path.
// Accumulation is fp32, in order over the reduced dimension.
#ifndef ROPEKV_CLIENTS_LLAMA_CPU_OPS_H_
#define ROPEKV_CLIENTS_LLAMA_CPU_OPS_H_

#include <cstdint>
#include <functional>

namespace ropekv {
namespace llama {

// Runs fn(begin, end) over [0, count) split into at most `threads` contiguous chunks, the first
// on the calling thread. Blocks until all are done.
void ParallelFor(int64_t count, int threads, const std::function<void(int64_t, int64_t)>& fn);

// y [n][out] (row stride ldy) = x [n][in] (row stride ldx) . w [in][out] (row stride ldw).
// Single-threaded; callers split rows or columns.
void Gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t n, int64_t in,
          int64_t out, float* y, int64_t ldy);

// The portable build of Gemm (what Gemm runs on CPUs without AVX2 + FMA), for tests.
void GemmPortable(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t n, int64_t in,
                  int64_t out, float* y, int64_t ldy);

// out [n][dim] = x [n][dim] / sqrt(mean(x^2) + eps) * w [dim]  (HF LlamaRMSNorm in fp32).
void RmsNormRows(const float* x, const float* w, int64_t n, int64_t dim, float eps, float* out);

// gate_up [n][2 * inter] (gate then up per row) -> h [n][inter] = silu(gate) * up.
void SwiGlu(const float* gate_up, int64_t n, int64_t inter, float* h);

// Causal attention of one query head over keys [0, kv_len):
//   q   [n][d]        queries (post-RoPE, row stride ldq); query i sees keys [0, past + i + 1)
//   kt  [d][kv_len]   keys transposed (row stride kv_len)
//   v   [kv_len][d]   values
//   out [n][d]        (row stride ldo)
// with kv_len >= past + n, scores scaled by `scale`, softmax in fp32.
void CausalAttentionHead(const float* q, int64_t ldq, int64_t n, int64_t past, const float* kt,
                         int64_t kv_len, const float* v, int d, float scale, float* out,
                         int64_t ldo);

}  // namespace llama
}  // namespace ropekv

#endif  // ROPEKV_CLIENTS_LLAMA_CPU_OPS_H_
