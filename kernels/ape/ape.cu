// CUDA APE merge, flash-decoding style.
//
// The keys of both groups are cut into splits ("items") of split_tokens keys of one segment. One
// thread block handles one (item, KV head, tile of query rows), where a query row is one
// (query token, q head of the KV head's GQA group), so a K/V tile read from memory serves every q
// head that shares it. A block runs an online softmax over its split and writes a normalised
// partial output and its lse to the workspace. One combine kernel then merges, per query row, the
// context group's splits into (o_c, lse_c), the other group's into (o_o, lse_o), and applies the
// APE weights softmax([S*T*lse_c, lse_o]) in fp32.
//
// Two split kernels: a CUDA-core one for every dtype and head_dim (decode: few rows per KV head,
// memory bound), and an mma.sync (m16n8k16) one for f16/bf16 with many rows per KV head
// (prefill), FlashAttention-2 style: 4 warps x 16 query rows, S = Q.K^T and O += P.V on tensor
// cores, P kept in registers. Launch configuration is chosen in MakePlan only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/ape/ape.h"
#include "kernels/common/cuda_check.h"

namespace ropekv {
namespace {

constexpr int kThreads = 128;  // every kernel: 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kMmaRows = 64;     // query rows per block of the tensor-core kernel
constexpr int kMmaTile = 64;     // keys per shared-memory tile of the tensor-core kernel
constexpr int kMaxItems = 4096;  // splits are made larger rather than exceed this (plus segments)
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.442695040888963407f;

// One segment of keys as the kernels see it.
struct SegDesc {
  const void* k;         // [kv_heads][tokens][head_dim], strided
  const void* v;         // [kv_heads][tokens][head_dim], strided
  int64_t head_stride;   // elements
  int64_t token_stride;  // elements
  int32_t tokens;
  int32_t item_begin;    // its first split
  int32_t other_offset;  // index of its first key in the other group; -1: context group
  int32_t unused;
};

// Everything a split kernel reads; passed by value (__grid_constant__), so no host->device copy.
struct SplitParams {
  SegDesc seg[kApeCudaMaxSegments];  // context segments first, then other; no empty ones
  const void* q;                     // [num_queries][q_heads][head_dim], strided
  float* ws_o;                       // [num_items][num_queries * q_heads][head_dim]
  float* ws_lse;                     // [num_items][num_queries * q_heads], natural log
  int64_t q_token_stride;            // elements
  int64_t q_head_stride;             // elements
  int32_t num_segments;
  int32_t num_items;
  int32_t split_tokens;
  int32_t num_queries;
  int32_t q_heads;
  int32_t group;             // q_heads / kv_heads
  int32_t other_tokens;      // L_o
  int32_t q_dtype;           // DType
  float scale_log2_context;  // log2(e) / (sqrt(d) * T)
  float scale_log2_other;    // log2(e) / sqrt(d)
};
static_assert(sizeof(SplitParams) <= 4000, "kernel parameters must stay under 4 KiB");

struct CombineParams {
  const float* ws_o;    // [num_items][nq_rows][head_dim]
  const float* ws_lse;  // [num_items][nq_rows]
  void* out;            // [num_queries][q_heads][head_dim], out_dtype
  float* lse;           // [num_queries][q_heads] or nullptr
  int32_t num_items;
  int32_t num_context_items;  // items [0, num_context_items) are the context group's
  int32_t nq_rows;            // num_queries * q_heads
  int32_t head_dim;
  int32_t out_dtype;  // DType
  float st;           // S * T
};

// ---------------------------------------------------------------------------------------------
// Device helpers.

template <typename T>
__device__ __forceinline__ float ToFloat(T x);
template <>
__device__ __forceinline__ float ToFloat<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float ToFloat<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float ToFloat<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

// Two adjacent elements as floats.
__device__ __forceinline__ float2 ToFloat2(const float* p) {
  return *reinterpret_cast<const float2*>(p);
}
__device__ __forceinline__ float2 ToFloat2(const __half* p) {
  return __half22float2(*reinterpret_cast<const __half2*>(p));
}
__device__ __forceinline__ float2 ToFloat2(const __nv_bfloat16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

__device__ __forceinline__ float LoadAny(const void* p, int64_t i, int dtype) {
  switch (dtype) {
    case static_cast<int>(DType::kF32):
      return static_cast<const float*>(p)[i];
    case static_cast<int>(DType::kF16):
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}

__device__ __forceinline__ void StoreAny(void* p, int64_t i, int dtype, float v) {
  switch (dtype) {
    case static_cast<int>(DType::kF32):
      static_cast<float*>(p)[i] = v;
      return;
    case static_cast<int>(DType::kF16):
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      return;
    default:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      return;
  }
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The segment holding split `item` (segments are in item order).
__device__ __forceinline__ const SegDesc& FindSegment(const SplitParams& p, int item) {
  int s = 0;
  while (s + 1 < p.num_segments && p.seg[s + 1].item_begin <= item) ++s;
  return p.seg[s];
}

// Last segment-local key of an other-group segment that query i sees.
__device__ __forceinline__ int CausalLimit(const SplitParams& p, const SegDesc& sg, int i) {
  return p.other_tokens - p.num_queries + i - sg.other_offset;
}

// ---------------------------------------------------------------------------------------------
// CUDA-core split kernel.

// Keys per shared-memory tile: about 16 KiB of keys.
template <typename KV, int HD>
constexpr int GenericTile() {
  return HD * sizeof(KV) <= 256 ? 64 : (HD * sizeof(KV) <= 512 ? 32 : 16);
}

template <typename KV, int HD, int ROWS>
constexpr size_t GenericSmemBytes() {
  constexpr int kTile = GenericTile<KV, HD>();
  constexpr int kVec = 16 / sizeof(KV);
  return static_cast<size_t>(kTile) * (HD + kVec + HD) * sizeof(KV) +
         (static_cast<size_t>(ROWS) * HD + ROWS * kTile + 4 * ROWS) * sizeof(float);
}

// \tparam KV   element type of keys and values (float, __half, __nv_bfloat16)
// \tparam HD   head_dim
// \tparam ROWS query rows per block
// \tparam TILE keys per shared-memory tile
// Grid: (num_items, kv_heads, ceil(num_queries * group / ROWS)); kThreads threads.
template <typename KV, int HD, int ROWS, int TILE>
__global__ void __launch_bounds__(kThreads) ApeSplitKernel(const __grid_constant__ SplitParams p) {
  constexpr int kVec = 16 / sizeof(KV);  // elements per 16-byte vector
  constexpr int kVecsPerRow = HD / kVec;
  constexpr int kKPitch = HD + kVec;     // 16-byte pad: key rows fall in different banks
  constexpr int kPairs = ROWS * HD / 2;  // outputs are owned in pairs of adjacent dims
  constexpr int kPairsPerThread = (kPairs + kThreads - 1) / kThreads;
  static_assert(HD % kVec == 0 && kVec % 4 == 0, "head_dim must fill 16-byte vectors");
  static_assert(TILE % 4 == 0, "tiles are read 4 keys at a time");

  extern __shared__ __align__(16) unsigned char smem[];
  KV* k_s = reinterpret_cast<KV*>(smem);                   // [TILE][kKPitch]
  KV* v_s = k_s + TILE * kKPitch;                          // [TILE][HD]
  float* q_s = reinterpret_cast<float*>(v_s + TILE * HD);  // [ROWS][HD]
  float* s_s = q_s + ROWS * HD;                            // [ROWS][TILE] scores, then weights
  float* m_s = s_s + ROWS * TILE;                          // [ROWS] running max (log2 units)
  float* l_s = m_s + ROWS;                                 // [ROWS] running sum
  float* alpha_s = l_s + ROWS;                             // [ROWS] rescale of this tile
  int* lim_s = reinterpret_cast<int*>(alpha_s + ROWS);     // [ROWS] last visible local key

  const int item = blockIdx.x;
  const int hk = blockIdx.y;
  const int row0 = blockIdx.z * ROWS;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int rows_total = p.num_queries * p.group;
  const int nq_rows = p.num_queries * p.q_heads;

  const SegDesc& sg = FindSegment(p, item);
  const bool is_context = sg.other_offset < 0;
  const float scale_log2 = is_context ? p.scale_log2_context : p.scale_log2_other;
  const int key_begin = (item - sg.item_begin) * p.split_tokens;
  int key_end = min(key_begin + p.split_tokens, sg.tokens);
  if (!is_context) {
    const int last_row = min(row0 + ROWS, rows_total) - 1;
    key_end = min(key_end, CausalLimit(p, sg, last_row / p.group) + 1);
  }

  for (int idx = tid; idx < ROWS * HD; idx += kThreads) {
    const int r = idx / HD;
    const int e = idx % HD;
    const int row = row0 + r;
    float qv = 0.0f;
    if (row < rows_total) {
      const int i = row / p.group;
      const int h = hk * p.group + row % p.group;
      qv = LoadAny(p.q, i * p.q_token_stride + h * p.q_head_stride + e, p.q_dtype);
    }
    q_s[idx] = qv;
  }
  if (tid < ROWS) {
    const int row = row0 + tid;
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
    lim_s[tid] =
        row >= rows_total ? -1 : (is_context ? INT_MAX : CausalLimit(p, sg, row / p.group));
  }
  float2 acc[kPairsPerThread];
#pragma unroll
  for (int j = 0; j < kPairsPerThread; ++j) acc[j] = make_float2(0.0f, 0.0f);
  const KV* kg = static_cast<const KV*>(sg.k) + hk * sg.head_stride;
  const KV* vg = static_cast<const KV*>(sg.v) + hk * sg.head_stride;
  __syncthreads();

  for (int kt = key_begin; kt < key_end; kt += TILE) {
    const int nk = min(TILE, key_end - kt);
    // K and V tiles; rows past nk are zeros so that 0 * V stays 0.
    for (int idx = tid; idx < TILE * kVecsPerRow; idx += kThreads) {
      const int key = idx / kVecsPerRow;
      const int c = idx % kVecsPerRow;
      uint4 kv4 = make_uint4(0, 0, 0, 0);
      uint4 vv4 = make_uint4(0, 0, 0, 0);
      if (key < nk) {
        const int64_t off = static_cast<int64_t>(kt + key) * sg.token_stride + c * kVec;
        kv4 = __ldg(reinterpret_cast<const uint4*>(kg + off));
        vv4 = __ldg(reinterpret_cast<const uint4*>(vg + off));
      }
      *reinterpret_cast<uint4*>(k_s + key * kKPitch + c * kVec) = kv4;
      *reinterpret_cast<uint4*>(v_s + key * HD + c * kVec) = vv4;
    }
    __syncthreads();

    // Scores in log2 units; invisible keys -inf.
    for (int idx = tid; idx < ROWS * TILE; idx += kThreads) {
      const int r = idx / TILE;
      const int key = idx % TILE;
      float s = -INFINITY;
      if (key < nk && kt + key <= lim_s[r]) {
        const float4* qr = reinterpret_cast<const float4*>(q_s + r * HD);
        const KV* kr = k_s + key * kKPitch;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < kVecsPerRow; ++c) {
          const uint4 raw = *reinterpret_cast<const uint4*>(kr + c * kVec);
          const KV* ke = reinterpret_cast<const KV*>(&raw);
#pragma unroll
          for (int e4 = 0; e4 < kVec / 4; ++e4) {
            const float4 qv = qr[(c * kVec) / 4 + e4];
            dot = fmaf(qv.x, ToFloat(ke[4 * e4 + 0]), dot);
            dot = fmaf(qv.y, ToFloat(ke[4 * e4 + 1]), dot);
            dot = fmaf(qv.z, ToFloat(ke[4 * e4 + 2]), dot);
            dot = fmaf(qv.w, ToFloat(ke[4 * e4 + 3]), dot);
          }
        }
        s = dot * scale_log2;
      }
      s_s[idx] = s;
    }
    __syncthreads();

    // Online softmax, one warp per row.
    for (int r = warp; r < ROWS; r += kWarps) {
      float* sr = s_s + r * TILE;
      float mx = -INFINITY;
      for (int key = lane; key < TILE; key += 32) mx = fmaxf(mx, sr[key]);
      mx = WarpMax(mx);
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      float sum = 0.0f;
      for (int key = lane; key < TILE; key += 32) {
        const float w = exp2f(sr[key] - m_use);
        sr[key] = w;
        sum += w;
      }
      sum = WarpSum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();

    // O = O * alpha + P.V over the whole tile (weights past nk are 0, those V rows zeros).
#pragma unroll
    for (int j = 0; j < kPairsPerThread; ++j) {
      const int idx = tid + j * kThreads;
      if (kPairs % kThreads != 0 && idx >= kPairs) break;
      const int r = idx / (HD / 2);
      const int e = 2 * (idx % (HD / 2));
      const float4* pr = reinterpret_cast<const float4*>(s_s + r * TILE);
      const float alpha = alpha_s[r];
      float2 a = make_float2(acc[j].x * alpha, acc[j].y * alpha);
#pragma unroll 4
      for (int k4 = 0; k4 < TILE / 4; ++k4) {
        const float4 w = pr[k4];
        const float2 v0 = ToFloat2(v_s + (4 * k4 + 0) * HD + e);
        const float2 v1 = ToFloat2(v_s + (4 * k4 + 1) * HD + e);
        const float2 v2 = ToFloat2(v_s + (4 * k4 + 2) * HD + e);
        const float2 v3 = ToFloat2(v_s + (4 * k4 + 3) * HD + e);
        a.x = fmaf(w.x, v0.x, a.x);
        a.y = fmaf(w.x, v0.y, a.y);
        a.x = fmaf(w.y, v1.x, a.x);
        a.y = fmaf(w.y, v1.y, a.y);
        a.x = fmaf(w.z, v2.x, a.x);
        a.y = fmaf(w.z, v2.y, a.y);
        a.x = fmaf(w.w, v3.x, a.x);
        a.y = fmaf(w.w, v3.y, a.y);
      }
      acc[j] = a;
    }
    __syncthreads();
  }

#pragma unroll
  for (int j = 0; j < kPairsPerThread; ++j) {
    const int idx = tid + j * kThreads;
    if (kPairs % kThreads != 0 && idx >= kPairs) break;
    const int r = idx / (HD / 2);
    const int e = 2 * (idx % (HD / 2));
    const int row = row0 + r;
    if (row >= rows_total) continue;
    const int qrow = (row / p.group) * p.q_heads + hk * p.group + row % p.group;
    const float l = l_s[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    *reinterpret_cast<float2*>(p.ws_o + (static_cast<int64_t>(item) * nq_rows + qrow) * HD + e) =
        make_float2(acc[j].x * inv, acc[j].y * inv);
  }
  if (tid < ROWS && row0 + tid < rows_total) {
    const int row = row0 + tid;
    const int qrow = (row / p.group) * p.q_heads + hk * p.group + row % p.group;
    const float l = l_s[tid];
    p.ws_lse[static_cast<int64_t>(item) * nq_rows + qrow] =
        l > 0.0f ? (m_s[tid] + log2f(l)) * kLn2 : -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core split kernel (sm_80+): mma.sync.m16n8k16, f32 accumulation.

__device__ __forceinline__ uint16_t Bits(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t Bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

// Two floats rounded to T, `lo` in the low half (the lower column of an mma fragment).
template <typename T>
__device__ __forceinline__ uint32_t PackFloats(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t PackFloats<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t PackFloats<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// c[16x8] += a[16x16] . b[16x8]; fragments in the PTX ISA's m16n8k16 layouts.
template <typename T>
__device__ __forceinline__ void Mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void Mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8x8 b16 matrices, transposed: the B fragments of two n-tiles from row-major V rows.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem_row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem));
#endif
}

__device__ __forceinline__ void CpAsyncCommit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <int HD>
constexpr size_t MmaSmemBytes(size_t elem) {
  return 4 * static_cast<size_t>(kMmaTile) * (HD + 8) * elem;  // 2 stages x (K, V)
}

// \tparam T  element type of q, keys and values (__half or __nv_bfloat16)
// \tparam HD head_dim (64, 96 or 128)
// Grid: (num_items, kv_heads, ceil(num_queries * group / kMmaRows)); kThreads threads; warp w
// owns query rows row0 + 16w .. row0 + 16w + 15 of its KV head.
template <typename T, int HD>
__global__ void __launch_bounds__(kThreads)
    ApeSplitMmaKernel(const __grid_constant__ SplitParams p) {
  constexpr int kPitch = HD + 8;   // elements; 16-byte pad keeps ldmatrix conflict-free
  constexpr int kChunks = HD / 8;  // 16-byte chunks per key row
  constexpr int kNTiles = kMmaTile / 8;
  static_assert(HD % 16 == 0, "head_dim must be a multiple of 16");
  // Two stages of K and V tiles: the next tile loads (cp.async) while this one is computed.
  extern __shared__ __align__(16) unsigned char mma_smem[];
  T* kv_s = reinterpret_cast<T*>(mma_smem);  // [2 stages][k|v][kMmaTile][kPitch]

  const int item = blockIdx.x;
  const int hk = blockIdx.y;
  const int row0 = blockIdx.z * kMmaRows;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;  // fragment row (groupID)
  const int tq = lane & 3;  // fragment column pair (threadID_in_group)
  const int rows_total = p.num_queries * p.group;
  const int nq_rows = p.num_queries * p.q_heads;

  const SegDesc& sg = FindSegment(p, item);
  const bool is_context = sg.other_offset < 0;
  const float scale_log2 = is_context ? p.scale_log2_context : p.scale_log2_other;
  const int key_begin = (item - sg.item_begin) * p.split_tokens;
  int key_end = min(key_begin + p.split_tokens, sg.tokens);
  if (!is_context) {
    const int last_row = min(row0 + kMmaRows, rows_total) - 1;
    key_end = min(key_end, CausalLimit(p, sg, last_row / p.group) + 1);
  }

  // This thread's two rows: g and g + 8 of its warp's 16.
  int rows[2];
  bool ok[2];
  int lim[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    rows[hh] = row0 + warp * 16 + g + hh * 8;
    ok[hh] = rows[hh] < rows_total;
    lim[hh] = !ok[hh] ? -1 : (is_context ? INT_MAX : CausalLimit(p, sg, rows[hh] / p.group));
  }

  // Q as A fragments: qf[kc] covers columns kc*16 .. kc*16 + 15.
  const T* q = static_cast<const T*>(p.q);
  auto q_pair = [&](int hh, int col) -> uint32_t {
    if (!ok[hh]) return 0u;
    const int i = rows[hh] / p.group;
    const int h = hk * p.group + rows[hh] % p.group;
    const T* src = q + i * p.q_token_stride + h * p.q_head_stride + col;
    return static_cast<uint32_t>(Bits(src[0])) | (static_cast<uint32_t>(Bits(src[1])) << 16);
  };
  uint32_t qf[HD / 16][4];
#pragma unroll
  for (int kc = 0; kc < HD / 16; ++kc) {
    qf[kc][0] = q_pair(0, kc * 16 + tq * 2);
    qf[kc][1] = q_pair(1, kc * 16 + tq * 2);
    qf[kc][2] = q_pair(0, kc * 16 + 8 + tq * 2);
    qf[kc][3] = q_pair(1, kc * 16 + 8 + tq * 2);
  }

  float o_acc[HD / 8][4];
#pragma unroll
  for (int n = 0; n < HD / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.0f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.0f, 0.0f};  // this thread's partial sums; the quad is summed at the end
  const T* kg = static_cast<const T*>(sg.k) + hk * sg.head_stride;
  const T* vg = static_cast<const T*>(sg.v) + hk * sg.head_stride;

  // Starts loading the tile of keys kt.. into stage st; rows past the split are zeros so that
  // 0 * V stays 0.
  auto load_tile = [&](int kt, int st) {
    const int nk = min(kMmaTile, key_end - kt);
    T* kb = kv_s + (2 * st) * kMmaTile * kPitch;
    T* vb = kb + kMmaTile * kPitch;
    for (int idx = tid; idx < kMmaTile * kChunks; idx += kThreads) {
      const int key = idx / kChunks;
      const int c = idx % kChunks;
      T* kd = kb + key * kPitch + c * 8;
      T* vd = vb + key * kPitch + c * 8;
      if (key < nk) {
        const int64_t off = static_cast<int64_t>(kt + key) * sg.token_stride + c * 8;
        CpAsync16(kd, kg + off);
        CpAsync16(vd, vg + off);
      } else {
        *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
      }
    }
    CpAsyncCommit();
  };

  int stage = 0;
  if (key_begin < key_end) load_tile(key_begin, 0);
  for (int kt = key_begin; kt < key_end; kt += kMmaTile) {
    const int nk = min(kMmaTile, key_end - kt);
    if (kt + kMmaTile < key_end) {
      load_tile(kt + kMmaTile, stage ^ 1);  // that stage was released by the last barrier
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const T* k_s = kv_s + (2 * stage) * kMmaTile * kPitch;  // [kMmaTile][kPitch]
    const T* v_s = k_s + kMmaTile * kPitch;                 // [kMmaTile][kPitch]

    // S = Q.K^T for 64 keys: n-tile nt holds keys nt*8 .. nt*8 + 7.
    float s[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
      const T* krow = k_s + (nt * 8 + g) * kPitch + tq * 2;
#pragma unroll
      for (int kc = 0; kc < HD / 16; ++kc) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kc * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kc * 16 + 8);
        Mma16816<T>(s[nt], qf[kc], b0, b1);
      }
    }

    // Scale to log2 units, mask, online softmax. Elements 0,1: row g; 2,3: row g + 8.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = nt * 8 + tq * 2 + (e & 1);
        const int hh = e >> 1;
        const bool visible = key < nk && kt + key <= lim[hh];
        s[nt][e] = visible ? s[nt][e] * scale_log2 : -INFINITY;
        mx[hh] = fmaxf(mx[hh], s[nt][e]);
      }
    }
    float m_use[2];
    float alpha[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 1));
      mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffffu, mx[hh], 2));
      const float m_new = fmaxf(m_run[hh], mx[hh]);
      m_use[hh] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[hh] = exp2f(m_run[hh] - m_use[hh]);
      m_run[hh] = m_new;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hh = e >> 1;
        s[nt][e] = exp2f(s[nt][e] - m_use[hh]);
        sum[hh] += s[nt][e];
      }
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) l_run[hh] = l_run[hh] * alpha[hh] + sum[hh];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      o_acc[n][0] *= alpha[0];
      o_acc[n][1] *= alpha[0];
      o_acc[n][2] *= alpha[1];
      o_acc[n][3] *= alpha[1];
    }

    // O += P.V: the C fragments of n-tiles 2j, 2j+1 are the A fragment of keys 16j .. 16j + 15.
    const int vkey = (lane & 7) + ((lane >> 3) & 1) * 8;
    const int vcol = (lane >> 4) * 8;
#pragma unroll
    for (int j = 0; j < kMmaTile / 16; ++j) {
      const uint32_t a[4] = {PackFloats<T>(s[2 * j][0], s[2 * j][1]),
                             PackFloats<T>(s[2 * j][2], s[2 * j][3]),
                             PackFloats<T>(s[2 * j + 1][0], s[2 * j + 1][1]),
                             PackFloats<T>(s[2 * j + 1][2], s[2 * j + 1][3])};
      const T* vrow = v_s + (j * 16 + vkey) * kPitch + vcol;
#pragma unroll
      for (int dn = 0; dn < HD / 16; ++dn) {
        uint32_t b[4];
        LdMatrixX4Trans(b, vrow + dn * 16);
        Mma16816<T>(o_acc[2 * dn], a, b[0], b[1]);
        Mma16816<T>(o_acc[2 * dn + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();
    stage ^= 1;
  }

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    float l = l_run[hh];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (!ok[hh]) continue;
    const int qrow = (rows[hh] / p.group) * p.q_heads + hk * p.group + rows[hh] % p.group;
    float* dst = p.ws_o + (static_cast<int64_t>(item) * nq_rows + qrow) * HD + tq * 2;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      *reinterpret_cast<float2*>(dst + n * 8) =
          make_float2(o_acc[n][hh * 2] * inv, o_acc[n][hh * 2 + 1] * inv);
    }
    if (tq == 0) {
      p.ws_lse[static_cast<int64_t>(item) * nq_rows + qrow] =
          l > 0.0f ? (m_run[hh] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Combine: per query row, merge the splits of each group, then the APE weights (fp32).
// Grid: nq_rows blocks of kThreads; dynamic shared memory: num_items floats.

__device__ __forceinline__ float BlockReduceMax(float v, float* red) {
  v = WarpMax(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kWarps; ++w) r = fmaxf(r, red[w]);
  __syncthreads();
  return r;
}

__device__ __forceinline__ float BlockReduceSum(float v, float* red) {
  v = WarpSum(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = 0.0f;
  for (int w = 0; w < kWarps; ++w) r += red[w];
  __syncthreads();
  return r;
}

__global__ void __launch_bounds__(kThreads)
    ApeCombineKernel(const __grid_constant__ CombineParams c) {
  extern __shared__ float w_s[];  // [num_items] weight of each split within its group
  __shared__ float red[kWarps];
  const int qrow = blockIdx.x;
  const int tid = threadIdx.x;
  const int nci = c.num_context_items;

  float mc = -INFINITY;
  float mo = -INFINITY;
  for (int it = tid; it < c.num_items; it += kThreads) {
    const float l = c.ws_lse[static_cast<int64_t>(it) * c.nq_rows + qrow];
    if (it < nci) {
      mc = fmaxf(mc, l);
    } else {
      mo = fmaxf(mo, l);
    }
  }
  mc = BlockReduceMax(mc, red);
  mo = BlockReduceMax(mo, red);
  float sc = 0.0f;
  float so = 0.0f;
  for (int it = tid; it < c.num_items; it += kThreads) {
    const float l = c.ws_lse[static_cast<int64_t>(it) * c.nq_rows + qrow];
    const float m = it < nci ? mc : mo;
    const float w = l == -INFINITY ? 0.0f : expf(l - m);
    w_s[it] = w;
    if (it < nci) {
      sc += w;
    } else {
      so += w;
    }
  }
  sc = BlockReduceSum(sc, red);  // its barrier also publishes w_s
  so = BlockReduceSum(so, red);

  const float lse_c = sc > 0.0f ? mc + logf(sc) : -INFINITY;
  const float lse_o = so > 0.0f ? mo + logf(so) : -INFINITY;
  const float a = lse_c == -INFINITY ? -INFINITY : c.st * lse_c;
  const float mm = fmaxf(a, lse_o);
  const float wc = a == -INFINITY ? 0.0f : expf(a - mm);
  const float wo = lse_o == -INFINITY ? 0.0f : expf(lse_o - mm);
  const float z = wc + wo;
  const float fc = sc > 0.0f ? wc / (z * sc) : 0.0f;
  const float fo = so > 0.0f ? wo / (z * so) : 0.0f;
  for (int d = tid; d < c.head_dim; d += kThreads) {
    float acc_c = 0.0f;
    float acc_o = 0.0f;
    for (int it = 0; it < c.num_items; ++it) {
      const float o = c.ws_o[(static_cast<int64_t>(it) * c.nq_rows + qrow) * c.head_dim + d];
      if (it < nci) {
        acc_c = fmaf(w_s[it], o, acc_c);
      } else {
        acc_o = fmaf(w_s[it], o, acc_o);
      }
    }
    StoreAny(c.out, static_cast<int64_t>(qrow) * c.head_dim + d, c.out_dtype,
             fc * acc_c + fo * acc_o);
  }
  if (tid == 0 && c.lse != nullptr) c.lse[qrow] = mm + logf(z);
}

// ---------------------------------------------------------------------------------------------
// Host side: the plan (split size, kernel, workspace) and the launches.

struct Plan {
  SplitParams split;
  CombineParams combine;
  bool tensor_core = false;
  int rows_per_block = 0;
  int row_tiles = 0;
  size_t ws_o_bytes = 0;
  size_t workspace_bytes = 0;
};

size_t RoundUp(size_t x, size_t m) { return (x + m - 1) / m * m; }

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

absl::StatusOr<Plan> MakePlan(const ApeArgs& args, const ApeCudaOptions& options) {
  if (absl::Status st = ValidateApeArgs(args); !st.ok()) return st;
  const AttentionShape& s = args.shape;
  const int hd = s.head_dim;
  if (hd != 64 && hd != 96 && hd != 128 && hd != 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("ape cuda: head_dim must be 64, 96, 128 or 256, got ", hd));
  }
  const size_t elem = DTypeSize(s.kv_dtype);
  int device = 0;
  int sms = 0;
  int cc_major = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  ROPEKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device));

  Plan plan;
  const int group = s.q_heads / s.kv_heads;
  const int64_t rows_total = static_cast<int64_t>(s.num_queries) * group;
  const bool tc_ok = s.q_dtype == s.kv_dtype &&
                     (s.kv_dtype == DType::kF16 || s.kv_dtype == DType::kBF16) &&
                     (hd == 64 || hd == 96 || hd == 128) && cc_major >= 8;
  switch (options.kernel) {
    case ApeCudaOptions::Kernel::kTensorCore:
      if (!tc_ok) {
        return absl::InvalidArgumentError(absl::StrCat(
            "ape cuda: the tensor-core kernel needs q and kv of one dtype in {f16, bf16}, "
            "head_dim 64/96/128 and sm_80+; got q ",
            DTypeName(s.q_dtype), ", kv ", DTypeName(s.kv_dtype), ", head_dim ", hd, ", sm_",
            cc_major, "x"));
      }
      plan.tensor_core = true;
      break;
    case ApeCudaOptions::Kernel::kGeneric:
      plan.tensor_core = false;
      break;
    default:
      plan.tensor_core = tc_ok && rows_total >= 32;
      break;
  }
  plan.rows_per_block =
      plan.tensor_core ? kMmaRows : (rows_total <= 4 ? 4 : (rows_total <= 8 ? 8 : 16));
  const int64_t row_tiles = (rows_total + plan.rows_per_block - 1) / plan.rows_per_block;
  if (row_tiles > 65535 || s.kv_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ape cuda: at most 65535 KV heads and row tiles, got ", s.kv_heads, " KV heads and ",
        row_tiles, " tiles of ", plan.rows_per_block, " query rows"));
  }
  plan.row_tiles = static_cast<int>(row_tiles);

  // Segments: alignment and count.
  int num_segments = 0;
  int64_t total_tokens = 0;
  for (int group_index = 0; group_index < 2; ++group_index) {
    const absl::Span<const KvSegment> segs = group_index == 0 ? args.context : args.other;
    const char* name = group_index == 0 ? "context" : "other";
    for (size_t i = 0; i < segs.size(); ++i) {
      const KvSegment& g = segs[i];
      if (g.tokens == 0) continue;
      const int64_t ts = g.token_stride > 0 ? g.token_stride : hd;
      const int64_t hs = g.head_stride > 0 ? g.head_stride : g.tokens * hd;
      if (!Aligned16(g.k) || !Aligned16(g.v) || (ts * elem) % 16 != 0 || (hs * elem) % 16 != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("ape cuda: ", name, "[", i,
                         "] k, v and strides must be 16-byte aligned, got token_stride ", ts,
                         ", head_stride ", hs, " elements of ", elem, " bytes"));
      }
      ++num_segments;
      total_tokens += g.tokens;
    }
  }
  if (num_segments > kApeCudaMaxSegments) {
    return absl::InvalidArgumentError(absl::StrCat("ape cuda: at most ", kApeCudaMaxSegments,
                                                   " non-empty segments, got ", num_segments));
  }

  // Split size: enough blocks to fill the device about four times over, but splits long enough
  // that the partial outputs (one row of head_dim floats per query row and split) stay small
  // beside the K/V they summarise, and at most about kMaxItems splits.
  int64_t split = options.split_tokens;
  if (split < 0 || split % 64 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ape cuda: split_tokens must be 0 (auto) or a positive multiple of 64, got ", split));
  }
  if (split == 0) {
    const int64_t blocks_per_item = static_cast<int64_t>(s.kv_heads) * row_tiles;
    const int64_t target_blocks = 4 * static_cast<int64_t>(std::max(sms, 1));
    split = (total_tokens * blocks_per_item + target_blocks - 1) / target_blocks;
    split = std::max<int64_t>(split, std::min<int64_t>(4 * rows_total, 4096));
    split = std::max<int64_t>(split, (total_tokens + kMaxItems - 1) / kMaxItems);
    split = std::max<int64_t>(64, static_cast<int64_t>(RoundUp(split, 64)));
  }
  split = std::min<int64_t>(split, int64_t{1} << 30);

  SplitParams& sp = plan.split;
  std::memset(&sp, 0, sizeof(sp));
  int items = 0;
  int context_items = 0;
  int64_t other_offset = 0;
  for (int group_index = 0; group_index < 2; ++group_index) {
    const absl::Span<const KvSegment> segs = group_index == 0 ? args.context : args.other;
    for (const KvSegment& g : segs) {
      if (g.tokens == 0) continue;
      SegDesc& d = sp.seg[sp.num_segments++];
      d.k = g.k;
      d.v = g.v;
      d.token_stride = g.token_stride > 0 ? g.token_stride : hd;
      d.head_stride = g.head_stride > 0 ? g.head_stride : g.tokens * hd;
      d.tokens = static_cast<int32_t>(g.tokens);
      d.item_begin = items;
      d.other_offset = group_index == 0 ? -1 : static_cast<int32_t>(other_offset);
      if (group_index == 1) other_offset += g.tokens;
      items += static_cast<int>((g.tokens + split - 1) / split);
    }
    if (group_index == 0) context_items = items;
  }
  const int64_t nq_rows = static_cast<int64_t>(s.num_queries) * s.q_heads;
  sp.q = args.q;
  sp.q_token_stride = args.q_token_stride > 0 ? args.q_token_stride : s.q_heads * hd;
  sp.q_head_stride = args.q_head_stride > 0 ? args.q_head_stride : hd;
  sp.num_items = items;
  sp.split_tokens = static_cast<int32_t>(split);
  sp.num_queries = s.num_queries;
  sp.q_heads = s.q_heads;
  sp.group = group;
  sp.other_tokens = static_cast<int32_t>(other_offset);
  sp.q_dtype = static_cast<int32_t>(s.q_dtype);
  sp.scale_log2_other = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(hd)));
  sp.scale_log2_context = static_cast<float>(
      kLog2e / (std::sqrt(static_cast<double>(hd)) * static_cast<double>(args.temperature)));

  plan.ws_o_bytes = RoundUp(static_cast<size_t>(items) * nq_rows * hd * sizeof(float), 256);
  plan.workspace_bytes = plan.ws_o_bytes + RoundUp(static_cast<size_t>(items) * nq_rows * 4, 256);
  if (static_cast<size_t>(items) * sizeof(float) > 48 * 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ape cuda: too many splits for the combine step: ", items, " (split_tokens ", split, ")"));
  }

  CombineParams& cp = plan.combine;
  cp.out = args.out;
  cp.lse = args.lse;
  cp.num_items = items;
  cp.num_context_items = context_items;
  cp.nq_rows = static_cast<int32_t>(nq_rows);
  cp.head_dim = hd;
  cp.out_dtype = static_cast<int32_t>(s.out_dtype);
  cp.st = args.scale * args.temperature;
  return plan;
}

template <typename KV, int HD, int ROWS>
absl::Status LaunchGeneric(const SplitParams& p, dim3 grid, cudaStream_t stream) {
  constexpr int kTile = GenericTile<KV, HD>();
  constexpr size_t kSmem = GenericSmemBytes<KV, HD, ROWS>();
  auto* kernel = &ApeSplitKernel<KV, HD, ROWS, kTile>;
  if (kSmem > 48 * 1024) {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  }
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <typename KV, int HD>
absl::Status LaunchGenericRows(int rows, const SplitParams& p, dim3 grid, cudaStream_t stream) {
  switch (rows) {
    case 4:
      return LaunchGeneric<KV, HD, 4>(p, grid, stream);
    case 8:
      return LaunchGeneric<KV, HD, 8>(p, grid, stream);
    default:
      return LaunchGeneric<KV, HD, 16>(p, grid, stream);
  }
}

template <typename KV>
absl::Status LaunchGenericDim(int hd, int rows, const SplitParams& p, dim3 grid,
                              cudaStream_t stream) {
  switch (hd) {
    case 64:
      return LaunchGenericRows<KV, 64>(rows, p, grid, stream);
    case 96:
      return LaunchGenericRows<KV, 96>(rows, p, grid, stream);
    case 128:
      return LaunchGenericRows<KV, 128>(rows, p, grid, stream);
    default:
      return LaunchGenericRows<KV, 256>(rows, p, grid, stream);
  }
}

template <typename T, int HD>
absl::Status LaunchMmaDim(const SplitParams& p, dim3 grid, cudaStream_t stream) {
  constexpr size_t kSmem = MmaSmemBytes<HD>(sizeof(T));
  auto* kernel = &ApeSplitMmaKernel<T, HD>;
  if (kSmem > 48 * 1024) {
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
  }
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <typename T>
absl::Status LaunchMma(int hd, const SplitParams& p, dim3 grid, cudaStream_t stream) {
  switch (hd) {
    case 64:
      return LaunchMmaDim<T, 64>(p, grid, stream);
    case 96:
      return LaunchMmaDim<T, 96>(p, grid, stream);
    default:
      return LaunchMmaDim<T, 128>(p, grid, stream);
  }
}

absl::Status LaunchSplit(const Plan& plan, const ApeArgs& args, const SplitParams& sp,
                         cudaStream_t stream) {
  const dim3 grid(sp.num_items, args.shape.kv_heads, plan.row_tiles);
  const int hd = args.shape.head_dim;
  if (plan.tensor_core) {
    if (args.shape.kv_dtype == DType::kF16) return LaunchMma<__half>(hd, sp, grid, stream);
    return LaunchMma<__nv_bfloat16>(hd, sp, grid, stream);
  }
  switch (args.shape.kv_dtype) {
    case DType::kF32:
      return LaunchGenericDim<float>(hd, plan.rows_per_block, sp, grid, stream);
    case DType::kF16:
      return LaunchGenericDim<__half>(hd, plan.rows_per_block, sp, grid, stream);
    case DType::kBF16:
      break;
  }
  return LaunchGenericDim<__nv_bfloat16>(hd, plan.rows_per_block, sp, grid, stream);
}

absl::Status Launch(const Plan& plan, const ApeArgs& args, void* workspace, cudaStream_t stream) {
  SplitParams sp = plan.split;
  CombineParams cp = plan.combine;
  char* ws = static_cast<char*>(workspace);
  sp.ws_o = reinterpret_cast<float*>(ws);
  sp.ws_lse = reinterpret_cast<float*>(ws + plan.ws_o_bytes);
  cp.ws_o = sp.ws_o;
  cp.ws_lse = sp.ws_lse;
  if (absl::Status st = LaunchSplit(plan, args, sp, stream); !st.ok()) return st;
  ApeCombineKernel<<<cp.nq_rows, kThreads, cp.num_items * sizeof(float), stream>>>(cp);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<size_t> ApeCudaWorkspaceBytes(const ApeArgs& args, const ApeCudaOptions& options) {
  absl::StatusOr<Plan> plan = MakePlan(args, options);
  if (!plan.ok()) return plan.status();
  return plan->workspace_bytes;
}

absl::Status ApeAttentionCuda(const ApeArgs& args, void* workspace, size_t workspace_bytes,
                              CUstream_st* stream, const ApeCudaOptions& options) {
  absl::StatusOr<Plan> plan = MakePlan(args, options);
  if (!plan.ok()) return plan.status();
  if (workspace != nullptr) {
    if (workspace_bytes < plan->workspace_bytes || !Aligned16(workspace)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ape cuda: workspace must be 16-byte aligned and hold ", plan->workspace_bytes,
          " bytes, got ", workspace_bytes, " bytes at ", reinterpret_cast<uintptr_t>(workspace)));
    }
    return Launch(*plan, args, workspace, stream);
  }
  void* owned = nullptr;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&owned, plan->workspace_bytes, stream));
  const absl::Status st = Launch(*plan, args, owned, stream);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaFreeAsync(owned, stream));
  return st;
}

}  // namespace ropekv
