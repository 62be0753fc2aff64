// CUDA version of kernels/topk. One pipeline for every mode (docs/retrieval.md has the picture):
//
//   TcScoreKernel      bf16 rows of keys (exact q.k) or page metadata ([q+, q-].[M; m]) -> fp32
//                      row values on tensor cores, tiles streamed straight into registers, all
//                      query heads of the GQA group from one read (+ the first radix histogram,
//                      or each 16-row tile's largest key for ChunkSelectKernel)
//   ScoreTilesKernel   the same on CUDA cores (f16/f32 rows, LSE partials of the captured mass)
//   SmallSelectKernel  rows of <= 16384 elements (e.g. the pages of 128K tokens): the whole
//                      selection of a row in one block, on chip
//   ChunkSelectKernel  longer exact rows scored on tensor cores (k <= 1024): one block a row
//                      takes the k largest tile maxima, then the top k of those tiles' tokens
//   RangeKernel        long page rows: each row's key range, so the radix digits spread them
//   HistKernel         11-bit histogram of the top digit of each value's order key (fused
//                      into the scorer for exact kMax / kSum when it costs no occupancy)
//   FilterKernel       threshold filtering: every block finds the threshold digit from the
//                      histogram, emits what lies above, keeps what lies on it as candidates; the
//                      last block of a row to finish resolves the candidates digit by digit
//                      (score bits, then inverted index bits: ties go to the lower index) and
//                      writes the row: bitmap of chosen tokens | sink | local -> ascending
//                      indices
//   CandScoreKernel    (bound-then-exact) exact scores of the candidate pages' tokens
//   RescoreKernel      scores of the chosen tokens (page modes) and the captured softmax mass
//
// No host synchronisation anywhere: counts live in device memory, grids are sized from shapes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "absl/strings/str_cat.h"
#include "kernels/common/cuda_check.h"
#include "kernels/topk/topk.h"
#include "kernels/topk/topk_internal.h"
#include "kernels/topk/topk_math.h"

namespace ropekv {
namespace topk {
namespace {

using internal::kRadixBins;
using internal::kScoreThreads;
using internal::kScoreWarps;
using internal::kSegBytes;

constexpr int kStages = 3;        // cp.async pipeline depth of ScoreTilesKernel
constexpr int kSelThreads = 512;  // HistKernel, FilterKernel
constexpr int kSelItems = 8;      // elements per thread per pass of a selection block
constexpr int kSelChunk = kSelThreads * kSelItems;  // elements per selection block
static_assert(kSelChunk == internal::kSelChunkElems && kSelItems == 8,
              "SplitWriteKernel: a thread's kSelItems elements are two float4 in one bitmap word");
constexpr int kResolveItems = 4;            // candidates per thread per pass of the last block
constexpr int kListThreads = 256;           // CandScoreKernel, RescoreKernel, GatherKernel
constexpr int kQuerySmemBytes = 96 * 1024;  // queries of one scoring block
constexpr float kInf = __builtin_huge_valf();

// Returns the status of `expr` unless it is OK (no reassignment of an absl::Status: nvcc warns
// about the discarded result of its operator=).
#define ROPEKV_TOPK_RETURN_IF_ERROR(...)               \
  do {                                                 \
    const ::absl::Status _topk_status = (__VA_ARGS__); \
    if (!_topk_status.ok()) return _topk_status;       \
  } while (0)

// Programmatic dependent launch (sm_90): a kernel launched by LaunchDependent may start its blocks
// while the kernel before it in the stream drains, once every block of that one has called
// AllowDependents (or exited); it calls WaitForPrevious before reading that kernel's results,
// which returns when the previous grid has completed and its memory is visible.
__device__ __forceinline__ void AllowDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WaitForPrevious() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
template <typename... Params, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                            cudaStream_t stream, Args... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  // {gridDim, blockDim, dynamicSmemBytes, stream, attrs, numAttrs}
  const cudaLaunchConfig_t config = {grid, block, smem, stream, attr, 1};
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// ---------------------------------------------------------------------------------------------
// Device-side views and element access.

// A MatrixView with strides in bytes.
struct DevView {
  const char* base = nullptr;
  const char* const* blocks = nullptr;  // [num_blocks]
  int64_t rows_per_block = 1;
  int64_t head_stride = 0;  // bytes
  int64_t row_stride = 0;   // bytes
};

template <typename Ptr>
DevView ToDev(const BasicMatrixView<Ptr>& v) {
  const int64_t es = static_cast<int64_t>(DTypeSize(v.dtype));
  DevView d;
  d.base = static_cast<const char*>(v.base);
  d.blocks = reinterpret_cast<const char* const*>(v.blocks);
  d.rows_per_block = v.blocks != nullptr ? v.rows_per_block : 1;
  d.head_stride = v.head_stride * es;
  d.row_stride = v.row_stride * es;
  return d;
}

__device__ __forceinline__ const char* RowPtr(const DevView& v, int64_t head, int64_t row) {
  if (v.blocks == nullptr) return v.base + head * v.head_stride + row * v.row_stride;
  // Rows < 2^31: 32-bit division is enough and much cheaper.
  const uint32_t b = static_cast<uint32_t>(row) / static_cast<uint32_t>(v.rows_per_block);
  const int64_t r = row - static_cast<int64_t>(b) * v.rows_per_block;
  return v.blocks[b] + head * v.head_stride + r * v.row_stride;
}

// Element types: 16 bytes -> kPer16 floats. \tparam T float, __half or __nv_bfloat16.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kPer16 = 4;
  __device__ static void Convert(const uint4& v, float* x) {
    x[0] = __uint_as_float(v.x);
    x[1] = __uint_as_float(v.y);
    x[2] = __uint_as_float(v.z);
    x[3] = __uint_as_float(v.w);
  }
  __device__ static float Load(const char* p, int i) {
    return reinterpret_cast<const float*>(p)[i];
  }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kPer16 = 8;
  __device__ static void Convert(const uint4& v, float* x) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static float Load(const char* p, int i) {
    return __uint_as_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
  }
};
template <>
struct Elem<__half> {
  static constexpr int kPer16 = 8;
  __device__ static void Convert(const uint4& v, float* x) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 f = __half22float2(h);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  }
  __device__ static float Load(const char* p, int i) {
    return __half2float(reinterpret_cast<const __half*>(p)[i]);
  }
};

// Reads 16 bytes of elements of T at p (aligned to sizeof(T)) as floats.
template <typename T>
__device__ __forceinline__ void LoadChunk(const char* p, float* x) {
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    Elem<T>::Convert(*reinterpret_cast<const uint4*>(p), x);
  } else {
#pragma unroll
    for (int e = 0; e < Elem<T>::kPer16; ++e) x[e] = Elem<T>::Load(p, e);
  }
}

__device__ __forceinline__ float LoadQuery(const void* q, int64_t i, DType t) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(q)[i];
    case DType::kF16:
      return __half2float(static_cast<const __half*>(q)[i]);
    case DType::kBF16:
      return __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(q)[i]) << 16);
  }
  return 0.0f;
}

// cp.async of 16 bytes global -> shared; falls back to element copies when the source is not
// 16-byte aligned (element alignment `esize` is required).
__device__ __forceinline__ void CopyChunk16(void* smem_dst, const char* src, int esize) {
  if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src) : "memory");
  } else if (esize == 4) {
    uint32_t* d = static_cast<uint32_t*>(smem_dst);
    for (int i = 0; i < 4; ++i) d[i] = reinterpret_cast<const uint32_t*>(src)[i];
  } else {
    uint16_t* d = static_cast<uint16_t*>(smem_dst);
    for (int i = 0; i < 8; ++i) d[i] = reinterpret_cast<const uint16_t*>(src)[i];
  }
}
__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Scoring: exact q.k over key rows, or the Quest bound over metadata rows.

enum class SrcKind : int {
  kPlain = 0,   // element e of a row: scores[row][e]
  kTokens = 1,  // tokens; sink and local tokens excluded
  kPages = 2,   // pages; pages whose tokens are all sink/local excluded
  kSlots = 3,   // candidate slot j: token pages[row][j / 16] * 16 + j % 16 (bound-then-exact)
};

// Whether element e of a row is excluded from selection (key 0): sink/local tokens, or pages
// whose tokens are all sink/local.
__device__ __forceinline__ bool Excluded(SrcKind kind, int64_t e, int64_t n, int64_t n_sink,
                                         int64_t n_local) {
  if (kind == SrcKind::kTokens) return internal::IsPinned(e, n, n_sink, n_local);
  if (kind == SrcKind::kPages) return internal::PageAllPinned(e, n, n_sink, n_local);
  return false;
}

struct ScoreParams {
  DevView rows;         // keys (rows = tokens, width D) or metadata (rows = pages, width 2D)
  const void* queries;  // [query_heads][D]
  DType qtype;
  int d;       // head_dim
  int width;   // D or 2D
  bool bound;  // [q+, q-] . [M; m]; NaN -> +inf (else NaN -> -inf)
  int kv_heads;
  int group;            // query heads per KV head
  int heads_per_block;  // query heads of one block (the whole group unless kPerQueryHead)
  int head_groups;      // ceil(group / heads_per_block)
  GqaReduction red;
  int64_t len;  // rows per head
  float* out;   // [out_rows][len]; null: LSE only
  float2* lse;  // [query_heads][lse_parts] (max, sum exp) per (tile, warp); may be null
  int64_t lse_parts;
  float lse_scale;
  int64_t n_tiles;
  int64_t tiles_per_block;
  // Fused first radix histogram (reductions kMax/kSum only): hist0[kv head][kRadixBins] of the
  // order keys the selection will see (hist_kind says which elements are excluded); may be null.
  uint32_t* hist0;
  SrcKind hist_kind;
  int64_t n, n_sink, n_local;
};

// Shape of the staging of one row type (see internal::ScoreTileRows).
struct TileShape {
  int seg_bytes, tpr, tile_rows, seg_chunks, slot_bytes, seg_elems, q_seg_stride, q_stride;
};
__host__ __device__ inline TileShape MakeTileShape(int width, int esize) {
  TileShape s;
  const int row_bytes = width * esize;
  s.seg_bytes = row_bytes < kSegBytes ? row_bytes : kSegBytes;
  s.tpr = row_bytes / s.seg_bytes;
  s.tile_rows = kScoreThreads / s.tpr;
  s.seg_chunks = s.seg_bytes / 16;
  s.slot_bytes = s.seg_bytes + 16;  // +16: 8 consecutive slots hit 8 different bank groups
  s.seg_elems = s.seg_bytes / esize;
  s.q_seg_stride = s.seg_elems + 4;
  s.q_stride = s.tpr * s.q_seg_stride;
  return s;
}

// \tparam T element type of the rows. \tparam GC query heads accumulated per pass.
template <typename T, int GC>
__global__ void __launch_bounds__(kScoreThreads) ScoreTilesKernel(const ScoreParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  constexpr int kE = Elem<T>::kPer16;
  const TileShape ts = MakeTileShape(p.width, sizeof(T));
  const int tid = threadIdx.x;
  const int kvh = blockIdx.y / p.head_groups;
  const int h_begin = (blockIdx.y % p.head_groups) * p.heads_per_block;
  const int hb = min(p.heads_per_block, p.group - h_begin);
  const int q0 = kvh * p.group + h_begin;  // first query head of this block
  unsigned char* stages = smem;
  float* q_s = reinterpret_cast<float*>(smem + kStages * kScoreThreads * ts.slot_bytes);
  uint32_t* hist_s = reinterpret_cast<uint32_t*>(q_s + p.heads_per_block * ts.q_stride);
  if (p.hist0 != nullptr) {
    for (int i = tid; i < kRadixBins; i += kScoreThreads) hist_s[i] = 0;
  }

  // Queries of this block, [hb][q_stride] with a 4-float pad per segment.
  for (int i = tid; i < hb * p.width; i += kScoreThreads) {
    const int g = i / p.width, c = i % p.width;
    float v;
    if (!p.bound) {
      v = LoadQuery(p.queries, static_cast<int64_t>(q0 + g) * p.d + c, p.qtype);
    } else {
      const int dd = c < p.d ? c : c - p.d;
      const float x = LoadQuery(p.queries, static_cast<int64_t>(q0 + g) * p.d + dd, p.qtype);
      v = c < p.d ? fmaxf(x, 0.0f) : fminf(x, 0.0f);
    }
    q_s[g * ts.q_stride + (c / ts.seg_elems) * ts.q_seg_stride + c % ts.seg_elems] = v;
  }

  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * p.tiles_per_block;
  const int64_t tile_end = min(p.n_tiles, tile_begin + p.tiles_per_block);
  const int n_items = tile_end > tile_begin ? static_cast<int>(tile_end - tile_begin) : 0;

  auto load_tile = [&](int item, int stage) {
    const int64_t tile = tile_begin + item;
    unsigned char* dst_stage = stages + stage * kScoreThreads * ts.slot_bytes;
    const int total = kScoreThreads * ts.seg_chunks;
    for (int i = tid; i < total; i += kScoreThreads) {
      const int slot = i / ts.seg_chunks, sub = i % ts.seg_chunks;
      const int64_t row = tile * ts.tile_rows + slot / ts.tpr;
      if (row >= p.len) continue;
      const char* src = RowPtr(p.rows, kvh, row) + (slot % ts.tpr) * ts.seg_bytes + sub * 16;
      CopyChunk16(dst_stage + slot * ts.slot_bytes + sub * 16, src, sizeof(T));
    }
  };

  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_items) load_tile(s, s);
    CpAsyncCommit();
  }
  const int seg = tid % ts.tpr;
  const int lane = tid & 31, warp = tid >> 5;
  for (int it = 0; it < n_items; ++it) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();
    {
      const int next = it + kStages - 1;
      if (next < n_items) load_tile(next, next % kStages);
      CpAsyncCommit();
    }
    const int64_t tile = tile_begin + it;
    const int64_t row = tile * ts.tile_rows + tid / ts.tpr;
    const bool valid = row < p.len;
    const unsigned char* mine =
        stages + (it % kStages) * kScoreThreads * ts.slot_bytes + tid * ts.slot_bytes;
    const float* q_seg = q_s + seg * ts.q_seg_stride;
    float red = p.red == GqaReduction::kMax ? -kInf : 0.0f;
    for (int g0 = 0; g0 < hb; g0 += GC) {
      float acc[GC];
#pragma unroll
      for (int g = 0; g < GC; ++g) acc[g] = 0.0f;
      for (int c = 0; c < ts.seg_chunks; ++c) {
        float x[kE];
        Elem<T>::Convert(*reinterpret_cast<const uint4*>(mine + c * 16), x);
#pragma unroll
        for (int g = 0; g < GC; ++g) {
          if (g0 + g < hb) {
            const float* qg = q_seg + (g0 + g) * ts.q_stride + c * kE;
#pragma unroll
            for (int e = 0; e < kE; e += 4) {
              const float4 qv = *reinterpret_cast<const float4*>(qg + e);
              acc[g] = fmaf(qv.x, x[e], acc[g]);
              acc[g] = fmaf(qv.y, x[e + 1], acc[g]);
              acc[g] = fmaf(qv.z, x[e + 2], acc[g]);
              acc[g] = fmaf(qv.w, x[e + 3], acc[g]);
            }
          }
        }
      }
      for (int off = 1; off < ts.tpr; off <<= 1) {
#pragma unroll
        for (int g = 0; g < GC; ++g) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
      }
#pragma unroll
      for (int g = 0; g < GC; ++g) {
        if (g0 + g >= hb) continue;
        float s = acc[g];
        if (s != s) s = p.bound ? kInf : -kInf;
        const int h = q0 + g0 + g;
        if (p.lse != nullptr) {
          // (max, sum exp) of scale * s over this warp's valid rows (one lane per row).
          const bool counted = valid && seg == 0;
          const float v = counted ? s * p.lse_scale : -kInf;
          float m = v;
          for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
          float z = (counted && m != -kInf) ? expf(v - m) : 0.0f;
          for (int off = 16; off > 0; off >>= 1) z += __shfl_xor_sync(0xffffffffu, z, off);
          if (lane == 0) {
            p.lse[static_cast<int64_t>(h) * p.lse_parts + tile * kScoreWarps + warp] =
                make_float2(m, z);
          }
        }
        if (p.red == GqaReduction::kPerQueryHead) {
          if (valid && seg == 0 && p.out != nullptr)
            p.out[static_cast<int64_t>(h) * p.len + row] = s;
        } else if (p.red == GqaReduction::kMax) {
          red = fmaxf(red, s);
        } else {
          red += s;
        }
      }
    }
    if (p.red != GqaReduction::kPerQueryHead && valid && seg == 0) {
      if (red != red) red = p.bound ? kInf : -kInf;
      if (p.out != nullptr) p.out[static_cast<int64_t>(kvh) * p.len + row] = red;
      if (p.hist0 != nullptr) {
        const uint32_t key =
            Excluded(p.hist_kind, row, p.n, p.n_sink, p.n_local) ? 0u : internal::OrderKey(red);
        atomicAdd(&hist_s[key >> 21], 1u);
      }
    }
  }
  CpAsyncWait<0>();
  if (p.hist0 != nullptr) {
    __syncthreads();
    for (int i = tid; i < kRadixBins; i += kScoreThreads) {
      if (hist_s[i] != 0)
        atomicAdd(&p.hist0[static_cast<int64_t>(kvh) * kRadixBins + i], hist_s[i]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Scoring on tensor cores (bf16 rows: keys, or page metadata [M; m]).
//
// Every warp streams 16-row tiles of one KV head straight from global memory into registers (no
// shared-memory staging, no block barriers) and scores each tile against 8 query heads per
// mma.sync m16n8k16 (bf16 x bf16 -> fp32). Lane (g, t) of the warp (g = lane / 4,
// t = lane % 4) loads 16-byte chunks t, t + 4, t + 8, ... of rows g and g + 8 of the tile: one
// warp-wide load covers 64 contiguous bytes of each of 8 rows, so every 32-byte sector fetched is
// used, and the chunk a lane holds is already its A fragment once the dot product's k order is
// permuted (q.k does not depend on the order of the columns, as long as the queries use the same
// one): k-step s = (chunk pair, half) takes elements 4h..4h+3 of the lane's chunk 8 * (s / 4) +
// 4 * ((s / 2) % 2) + t. The query heads' B fragments are built once per block into shared
// memory in that order. A warp loads its next tile as soon as the registers of the current one
// are consumed; the bytes in flight a SM are set by the resident warps (72 registers a thread at
// W = 128: 28 warps a SM; two tiles in flight a warp, 16 warps, was slower: 98.7 vs 97.2 µs at
// 32 heads / 128K on the H100, and so were contiguous runs of tiles per warp). The warps
// of a head take its tiles round-robin (warp i: tiles i, i + warps, ...), so at any moment they
// read one window of memory together, as a streaming copy does.
//
// A key tile is read from memory once for every query head of its GQA group. fp32 / f16 queries
// are split into three bf16 parts q = hi + mid + lo (8 + 8 + 8 significant bits: every fp32 of
// normal range exactly), each multiplied with the same A fragment into the same accumulator;
// bf16 queries need one part. bf16 products are exact and sums are fp32, so scores match the
// CUDA-core path to fp32 rounding. A score that comes out non-finite (an inf or NaN input, where
// inf * 0 of a zero split part could make a NaN the plain dot product does not) is recomputed
// with fp32 FMAs over the row, so inf / NaN handling is that of ScoreTilesKernel.

constexpr int kTcThreads = 128;             // 4 independent warps
constexpr int kTcTileRows = 16;             // rows of one warp tile (the mma's M)
constexpr int kTcChunkTiles = 4;            // n-tiles (8 query heads each) per accumulator pass
constexpr int kTcInFlightPerSm = 64 << 10;  // bytes of keys a memory-bound scorer keeps in flight
// Peak DRAM bandwidth (bytes/s) past which the memory-bound scorer's loads fetch 128-byte spans
// into the L2 instead of 256: between the H100 SXM's HBM3 (3.35 TB/s) and the H200's HBM3e (4.9).
constexpr double kTcFetch128Bandwidth = 4.0e12;

// n-tiles an accumulator pass takes: all of one or two, else kTcChunkTiles; the query fragments
// are padded to a multiple of it.
__host__ __device__ constexpr int TcPassTiles(int n_tiles8) {
  return n_tiles8 <= 2 ? n_tiles8 : kTcChunkTiles;
}
__host__ __device__ constexpr int TcPaddedTiles(int n_tiles8) {
  return (n_tiles8 + TcPassTiles(n_tiles8) - 1) / TcPassTiles(n_tiles8) * TcPassTiles(n_tiles8);
}

struct TcParams {
  DevView rows;         // keys (rows = tokens, width d) or metadata (rows = pages, width 2d), bf16
  const void* queries;  // [query_heads][d]
  DType qtype;
  int d;
  bool bound;             // [q+, q-] . [M; m]; NaN -> +inf (else NaN -> -inf)
  int group;              // query heads per KV head (all in one block)
  int n_tiles8;           // ceil(group / 8): mma n-tiles
  int kv_heads_for_grid;  // grid.y
  GqaReduction red;
  int64_t len;      // rows per head
  float* out;       // [out_rows][len]
  int64_t n_tiles;  // 16-row tiles per head
  uint32_t* hist0;  // [kv_heads][kRadixBins] fused first radix histogram (kMax / kSum); or null
  // [out rows][n_tiles]: per 16-row tile, the largest order key of the row's values that take
  // part (0: none), for ChunkSelectKernel; or null.
  uint32_t* chunk_keys;
  SrcKind hist_kind;  // which rows are excluded from hist0 and chunk_keys
  int64_t n, n_sink, n_local;
};

// D += A * B, m16n8k16, A row-major bf16 (4 registers), B column-major bf16 (2), D fp32 (4).
__device__ __forceinline__ void MmaBf16(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Warpgroup MMA (Hopper, sm_90a), for scorers of kTcChunkTiles n-tiles a pass: the block's four
// warps issue one wgmma.mma_async m64n32k16 together where mma.sync took four m16n8k16 and four
// shared-memory loads of B fragments a warp. A comes from each warp's registers (warp w: rows
// 16w..16w+15 of the 64, in the m16n8k16 A fragment layout, so a warp's own tile), B (the
// query fragments) from shared memory through a descriptor, and D has the m16n8k16 accumulator
// layout per 8 columns: acc[j] is n-tile j, as for MmaBf16.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr bool kTcWarpgroupMma = true;
#else
constexpr bool kTcWarpgroupMma = false;
#endif
// B of one wgmma (16 k x 32 query heads, bf16) in the descriptor's no-swizzle K-major layout:
// 8 x 8 core matrices of 128 contiguous bytes (8 heads x 16 bytes); the second k half 128 bytes
// on (leading byte offset), the next 8 heads 256 bytes on (stride byte offset).
constexpr int kWgmmaBBytes = 32 * 16 * 2;
__device__ __forceinline__ uint64_t WgmmaDesc(const void* smem_b) {
  const uint64_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_b));
  return ((addr & 0x3ffff) >> 4) | (uint64_t{128 >> 4} << 16) | (uint64_t{256 >> 4} << 32);
}
__device__ __forceinline__ void WgmmaFence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void WgmmaCommitAndWait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#endif
}
// D += A * B for 32 query heads: c[j][e] as MmaBf16's c for n-tile j.
[[maybe_unused]] __device__ __forceinline__ void WgmmaBf16N32(float (&c)[4][4], const uint32_t* a,
                                                              uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, 1, 1, 1, "
      "0;\n"
      : "+f"(c[0][0]), "+f"(c[0][1]), "+f"(c[0][2]), "+f"(c[0][3]), "+f"(c[1][0]), "+f"(c[1][1]),
        "+f"(c[1][2]), "+f"(c[1][3]), "+f"(c[2][0]), "+f"(c[2][1]), "+f"(c[2][2]), "+f"(c[2][3]),
        "+f"(c[3][0]), "+f"(c[3][1]), "+f"(c[3][2]), "+f"(c[3][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
#endif
}
// Orders the reads of c after the wait (the compiler sees no data flow from the wait to c).
[[maybe_unused]] __device__ __forceinline__ void WgmmaFenceOperands(float (&c)[4][4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(c[j][e])::"memory");
  }
}

// Element c of the query row of head qh as the rows see it: q (exact) or [q+, q-] (bound).
__device__ __forceinline__ float TcQuery(const TcParams& p, int qh, int c) {
  if (!p.bound) return LoadQuery(p.queries, static_cast<int64_t>(qh) * p.d + c, p.qtype);
  const int dd = c < p.d ? c : c - p.d;
  const float x = LoadQuery(p.queries, static_cast<int64_t>(qh) * p.d + dd, p.qtype);
  return c < p.d ? fmaxf(x, 0.0f) : fminf(x, 0.0f);
}

// Part `part` (0 = hi, 1 = mid, 2 = lo) of the bf16 split of v, as bits. A non-finite v is all
// in its first part.
__device__ __forceinline__ uint32_t SplitPart(float v, int part) {
  float r = v;
  for (int i = 0; i < part; ++i) {
    if (r != r || r - r != 0.0f) return 0u;
    r -= internal::Widen16(DType::kBF16, internal::Rne16(DType::kBF16, r));
  }
  return internal::Rne16(DType::kBF16, r);
}

// q.row in fp32 FMAs, element by element (the fallback for non-finite scores).
__device__ float TcScalarDot(const TcParams& p, int qh, const char* row, int width) {
  float acc = 0.0f;
  for (int c = 0; c < width; ++c) {
    acc = fmaf(TcQuery(p, qh, c), Elem<__nv_bfloat16>::Load(row, c), acc);
  }
  return acc;
}

// Column of the first of the 4 elements that k-step `ks` takes from lane quad position `tig`
// (see the top of this section): the same for the keys (A) and the queries (B).
__host__ __device__ constexpr int TcColumn(int ks, int tig) {
  return 8 * ((ks / 4) * 8 + ((ks / 2) % 2) * 4 + tig) + 4 * (ks % 2);
}

// Loads 16 bytes at `src` (a row of p.rows, or null past the end: zeros), streaming: no L1
// allocation (unless L1), and the L2 fetches the whole L2B-byte span around it (the neighbouring
// chunks of the row are read by the next loads of the warp). Rows that are not 16-byte aligned are
// read element by element. 256 bytes is best on HBM3 (H100: 4% faster than no hint, RESULTS run
// 5), 128 on HBM3e (H200: the 32-head scorer at 128K 81.0 -> 74.4-74.8 µs, run 29); see
// kTcFetch128Bandwidth. With L1 (H200, reduced exact rows) a warp's second load of each 128-byte
// line (it reads 64 bytes of 8 rows' lines at a time) hits the L1 instead of asking the L2.
template <int L2B, bool L1>
__device__ __forceinline__ uint4 TcLoadAligned(const char* src) {
  static_assert(L2B == 128 || L2B == 256, "an L2 fetch size of the ld instruction");
  static_assert(L2B == 128 || !L1, "L1-allocating loads are used with 128-byte fetches only");
  uint4 v;
  if constexpr (L2B == 256) {
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(src));
  } else if constexpr (L1) {
    asm volatile("ld.global.nc.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(src));
  } else {
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(src));
  }
  return v;
}
template <int L2B, bool L1>
__device__ __forceinline__ uint4 TcLoad(const char* src) {
  if (src == nullptr) return make_uint4(0u, 0u, 0u, 0u);
  if ((reinterpret_cast<uintptr_t>(src) & 15u) == 0) return TcLoadAligned<L2B, L1>(src);
  uint32_t w[4];
  for (int i = 0; i < 4; ++i) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(src) + 2 * i;
    w[i] = static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// \tparam W row width in elements (64..512). \tparam P bf16 parts per query element (1 or 3).
// \tparam NTC n-tiles per accumulator pass (TcPassTiles: 1, 2 or kTcChunkTiles). \tparam CK writes
// p.chunk_keys: kChunkKeysNone, kChunkKeysReduced or kChunkKeysPerHead (a template parameter: the
// code, even when skipped, cost the bound scorer 3% and changed the exact scorer's registers).
constexpr int kChunkKeysNone = 0;
constexpr int kChunkKeysReduced = 1;  // kMax / kSum rows
constexpr int kChunkKeysPerHead = 2;  // kPerQueryHead rows

// Scorers of several n-tiles (more than 8 query heads a KV head) over rows of at most 128
// elements are declared for 4 blocks an SM: ptxas then gives them 86-90 registers and no spills,
// instead of 75-80 with up to 32 bytes of spills in three of the six variants. 512 query heads,
// against the default (RESULTS run 13): scores at 128K 176.4 -> 171 µs, exact k 256 201 -> 190.5,
// per-query-head 385 -> 357; at 32K exact 2-4% and per-query-head 5-6% faster; at 4K
// per-query-head 2-3% faster but exact ~1-1.7 µs slower (22.7 -> 24.4 at k 4096) although the
// scorer alone is faster: most likely the selection's 1024-thread block now finds an SM's
// registers free only when fewer scorer blocks remain there. Scorers of one n-tile keep the
// default: with the hint they took more registers and exact at 32 heads / 128K was 0.4 µs slower.
template <int W, int P, int NTC, int CK, int L2B, bool L1>
__global__ void __launch_bounds__(kTcThreads, (W <= 128 && NTC != 1) ? 4 : 0)
    TcScoreKernel(const TcParams p) {
  constexpr int kSteps = W / 16;  // mma k-steps per row
  constexpr int kPairs = W / 64;  // chunk pairs a lane loads per row (two chunks of 8 columns)
  // Warpgroup MMA for passes of kTcChunkTiles n-tiles where the architecture has it: the four
  // warps then take their tiles in step (every wgmma is issued by all of them).
  constexpr bool kWg = kTcWarpgroupMma && NTC == kTcChunkTiles && W <= 128;
  static_assert(kTcChunkTiles * 8 * 16 * 2 == kWgmmaBBytes, "a pass is one m64n32k16 B");
  extern __shared__ __align__(16) unsigned char smem[];
  // [n-tile][k-step][part][lane] B fragments, n-tiles padded to a multiple of NTC with zeros
  // (the mma of a pass then needs no per-n-tile branch, which made ptxas add a WARPSYNC to each).
  uint2* qf = reinterpret_cast<uint2*>(smem);
  const int nt_total = p.n_tiles8;
  const int nt_pad = TcPaddedTiles(nt_total);
  uint32_t* hist_s = reinterpret_cast<uint32_t*>(qf + nt_pad * kSteps * P * 32);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int kvh = blockIdx.y;
  const int q0 = kvh * p.group;
  AllowDependents();  // the one-block selection's blocks take SMs as this grid drains
  if (p.hist0 != nullptr) {
    for (int i = tid; i < kRadixBins; i += kTcThreads) hist_s[i] = 0;
  }
  // bf16 queries (one part): the 4 consecutive elements of a fragment in one 8-byte load. For
  // the bound with passes of several n-tiles (the 64-element fragments of 512 heads take 32
  // iterations a thread) the group's query rows are staged in shared memory first, all copies in
  // flight at once, so that the build waits for one round trip to memory, not one per unrolled
  // iteration: most of the 512-head page bound's stalls were on those loads (RESULTS run 26; for
  // exact rows the staging was level, and the extra shared memory delayed the selection).
  const bool q_bf16 = P == 1 && p.qtype == DType::kBF16 && p.d % 4 == 0 &&
                      (reinterpret_cast<uintptr_t>(p.queries) & 7u) == 0;
  // (The other scorers keep their code as it was: a shared address computation cost the 32-head
  // page bound 2 µs.)
  const uint16_t* q_s = nullptr;
  if constexpr (NTC == kTcChunkTiles) {
    if (q_bf16 && p.bound) {
      uint16_t* dst = reinterpret_cast<uint16_t*>(hist_s + (p.hist0 != nullptr ? kRadixBins : 0));
      const uint16_t* src =
          static_cast<const uint16_t*>(p.queries) + static_cast<int64_t>(q0) * p.d;
      const int elems = p.group * p.d;
      for (int c = tid; c < elems / 8; c += kTcThreads) {
        CopyChunk16(dst + 8 * c, reinterpret_cast<const char*>(src + 8 * c), 2);
      }
      for (int e = elems / 8 * 8 + tid; e < elems; e += kTcThreads) dst[e] = src[e];
      CpAsyncCommit();
      CpAsyncWait<0>();
      __syncthreads();
      q_s = dst;
    }
  }
#pragma unroll 4
  for (int i = tid; i < nt_pad * kSteps * P * 32; i += kTcThreads) {
    const int l = i % 32;
    const int part = (i / 32) % P;
    const int ks = (i / (32 * P)) % kSteps;
    const int nt = i / (32 * P * kSteps);
    const int head = nt * 8 + (l >> 2);
    const int c0 = TcColumn(ks, l & 3);
    uint32_t w[2] = {0u, 0u};
    if (head < p.group && q_bf16) {
      // As TcQuery element by element: c0 .. c0 + 3 lie on one side of d (d % 4 == 0).
      const int dd = c0 < p.d ? c0 : c0 - p.d;
      const uint16_t* q = NTC == kTcChunkTiles && q_s != nullptr
                              ? q_s + head * p.d + dd
                              : static_cast<const uint16_t*>(p.queries) +
                                    static_cast<int64_t>(q0 + head) * p.d + dd;
      const uint2 raw = *reinterpret_cast<const uint2*>(q);
      w[0] = raw.x;
      w[1] = raw.y;
      if (p.bound) {
        // max(x, 0) / min(x, 0) of a bf16 is a bf16: its bits are the fp32 result's upper half.
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float x = __uint_as_float(((w[j >> 1] >> (16 * (j & 1))) & 0xffffu) << 16);
          const float y = c0 < p.d ? fmaxf(x, 0.0f) : fminf(x, 0.0f);
          w[j >> 1] = (w[j >> 1] & (0xffff0000u >> (16 * (j & 1)))) |
                      ((__float_as_uint(y) >> 16) << (16 * (j & 1)));
        }
      }
    } else if (head < p.group) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        w[j >> 1] |= SplitPart(TcQuery(p, q0 + head, c0 + j), part) << (16 * (j & 1));
      }
    }
    if (kWg) {
      // Pass nt / NTC's B for (ks, part); within it, head row l / 4 of n-tile nt % NTC: the
      // fragment's first two elements are k 2t, 2t + 1 of the step, its last two k 2t + 8, 2t + 9.
      char* b = reinterpret_cast<char*>(smem) +
                ((nt / NTC * kSteps + ks) * P + part) * kWgmmaBBytes + (nt % NTC) * 256 +
                (l >> 2) * 16 + (l & 3) * 4;
      *reinterpret_cast<uint32_t*>(b) = w[0];
      *reinterpret_cast<uint32_t*>(b + 128) = w[1];
    } else {
      qf[i] = make_uint2(w[0], w[1]);
    }
  }
  __syncthreads();

  const int64_t stride = static_cast<int64_t>(gridDim.x) * (kTcThreads / 32);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * (kTcThreads / 32) + warp;
  const int64_t end = p.n_tiles;
  // buf[pair][0..1]: chunks 8 * pair + tig and 8 * pair + 4 + tig of row g; [2..3]: of row g + 8.
  uint4 buf[kPairs][4];
  auto load = [&](int64_t tile, uint4(&b)[kPairs][4]) {
    const int64_t r0 = tile * kTcTileRows + g;
    const char* row_a = tile < end && r0 < p.len ? RowPtr(p.rows, kvh, r0) : nullptr;
    const char* row_b = tile < end && r0 + 8 < p.len ? RowPtr(p.rows, kvh, r0 + 8) : nullptr;
    // 16-byte aligned rows (the usual case) take no per-chunk alignment branches.
    if (__all_sync(0xffffffffu,
                   ((reinterpret_cast<uintptr_t>(row_a) | reinterpret_cast<uintptr_t>(row_b)) &
                    15u) == 0)) {
#pragma unroll
      for (int pr = 0; pr < kPairs; ++pr) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const char* row = j < 2 ? row_a : row_b;
          b[pr][j] = row == nullptr
                         ? make_uint4(0u, 0u, 0u, 0u)
                         : TcLoadAligned<L2B, L1>(row + (8 * pr + 4 * (j & 1) + tig) * 16);
        }
      }
      return;
    }
#pragma unroll
    for (int pr = 0; pr < kPairs; ++pr) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const char* row = j < 2 ? row_a : row_b;
        b[pr][j] =
            TcLoad<L2B, L1>(row == nullptr ? nullptr : row + (8 * pr + 4 * (j & 1) + tig) * 16);
      }
    }
  };
  load(first, buf);

  const bool per_head = p.red == GqaReduction::kPerQueryHead;
  const bool is_max = p.red == GqaReduction::kMax;
  const uint32_t opaque_zero = static_cast<uint32_t>(p.d) >> 31;  // 0, unknown to the compiler
  const uint64_t desc0 = kWg ? WgmmaDesc(smem) : 0u;
  // With warpgroup MMA every warp runs as many iterations as warp 0 (tiles past the end load
  // zeros and store nothing).
  for (int64_t tile = first; (kWg ? tile - warp : tile) < end; tile += stride) {
    const int64_t row0 = tile * kTcTileRows + g;
    // The tile's A fragments, built once for all passes (rebuilt at each use, they cost ptxas
    // three register moves an mma).
    uint32_t af[kSteps][4];
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const uint4& lo = buf[ks / 4][(ks / 2) % 2];
      const uint4& hi = buf[ks / 4][2 + (ks / 2) % 2];
      const uint32_t v[4] = {ks % 2 == 0 ? lo.x : lo.z, ks % 2 == 0 ? hi.x : hi.z,
                             ks % 2 == 0 ? lo.y : lo.w, ks % 2 == 0 ? hi.y : hi.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) af[ks][i] = NTC == 1 || kWg ? v[i] : v[i] | opaque_zero;
    }
    float red[2] = {is_max ? -kInf : 0.0f, is_max ? -kInf : 0.0f};
    for (int n0 = 0; n0 < nt_total; n0 += NTC) {
      float acc[NTC][4];
#pragma unroll
      for (int j = 0; j < NTC; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
      }
      if constexpr (kWg) {
        // The descriptor's address field counts 16-byte units.
        const uint64_t desc = desc0 + n0 / NTC * kSteps * P * (kWgmmaBBytes >> 4);
        WgmmaFence();
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
          for (int part = 0; part < P; ++part) {
            WgmmaBf16N32(acc, af[ks], desc + (ks * P + part) * (kWgmmaBBytes >> 4));
          }
        }
        WgmmaCommitAndWait();
        WgmmaFenceOperands(acc);
      } else {
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
          for (int j = 0; j < NTC; ++j) {
#pragma unroll
            for (int part = 0; part < P; ++part) {
              const uint2 bv = qf[(((n0 + j) * kSteps + ks) * P + part) * 32 + lane];
              const uint32_t b[2] = {bv.x, bv.y};
              MmaBf16(acc[j], af[ks], b);
            }
          }
        }
      }
      // acc[j][e]: row g (e < 2) or g + 8, query head (n0 + j) * 8 + 2 * tig + (e & 1).
      // Scores that came out non-finite are recomputed first, decided once a warp by one sum (an
      // inf or NaN makes it non-finite; finite scores whose sum overflows only take the slow
      // path), so that the common case is the store or the reduction alone: per-score checks
      // interleaved with the reduction were most of the scorer's instructions at 64 query heads a
      // KV head (RESULTS run 21).
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < NTC; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) sum += acc[j][e];
      }
      if (!__all_sync(0xffffffffu, sum - sum == 0.0f)) {
#pragma unroll
        for (int j = 0; j < NTC; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int head = (n0 + j) * 8 + 2 * tig + (e & 1);
            const int64_t row = row0 + 8 * (e >> 1);
            if (head >= p.group || row >= p.len) continue;
            float& s = acc[j][e];
            if (s - s != 0.0f) s = TcScalarDot(p, q0 + head, RowPtr(p.rows, kvh, row), W);
            if (s != s) s = p.bound ? kInf : -kInf;
          }
        }
      }
      // Rows past the end are reduced too (their results are never stored); heads past the group
      // (the padding) add the reduction's identity. One loop a reduction: a choice inside the
      // loop cost each score its branches and the per-head store's address arithmetic.
      if (per_head) {
#pragma unroll
        for (int j = 0; j < NTC; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int head = (n0 + j) * 8 + 2 * tig + (e & 1);
            const int64_t row = row0 + 8 * (e >> 1);
            if (head < p.group && row < p.len) {
              p.out[static_cast<int64_t>(q0 + head) * p.len + row] = acc[j][e];
            }
          }
        }
      } else {
        // whole: every head of the pass is real (no identity to substitute).
        auto reduce = [&](auto op, float identity, auto whole) {
#pragma unroll
          for (int j = 0; j < NTC; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const bool real = whole || (n0 + j) * 8 + 2 * tig + (e & 1) < p.group;
              red[e >> 1] = op(red[e >> 1], real ? acc[j][e] : identity);
            }
          }
        };
        const auto max = [](float x, float y) { return fmaxf(x, y); };
        if (is_max && (n0 + NTC) * 8 <= p.group) {
          reduce(max, -kInf, std::true_type{});
        } else if (is_max) {
          reduce(max, -kInf, std::false_type{});
        } else {
          reduce([](float x, float y) { return x + y; }, -0.0f, std::false_type{});
        }
      }
      if (CK == kChunkKeysPerHead) {
        // Each query head's tile maximum: rows g and g + 8 in the lane, then over the 8 lanes of
        // the same tig (the same two heads).
        const bool out_a = row0 >= p.len || Excluded(p.hist_kind, row0, p.n, p.n_sink, p.n_local);
        const bool out_b =
            row0 + 8 >= p.len || Excluded(p.hist_kind, row0 + 8, p.n, p.n_sink, p.n_local);
#pragma unroll
        for (int j = 0; j < NTC; ++j) {
          if (NTC > 1 && n0 + j >= nt_total) break;  // warp-uniform
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            uint32_t key = max(out_a ? 0u : internal::OrderKey(acc[j][c]),
                               out_b ? 0u : internal::OrderKey(acc[j][c + 2]));
#pragma unroll
            for (int off = 4; off < 32; off <<= 1) {
              key = max(key, __shfl_xor_sync(0xffffffffu, key, off));
            }
            const int head = (n0 + j) * 8 + 2 * tig + c;
            if (g == 0 && head < p.group && tile < end) {
              p.chunk_keys[static_cast<int64_t>(q0 + head) * p.n_tiles + tile] = key;
            }
          }
        }
      }
    }
    // The registers of this tile are free: load the next one.
    load(tile + stride, buf);
    if (!per_head) {
      uint32_t chunk_key = 0u;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
          const float o = __shfl_xor_sync(0xffffffffu, red[r], off);
          red[r] = is_max ? fmaxf(red[r], o) : red[r] + o;
        }
        const int64_t row = row0 + 8 * r;
        const bool mine = tig == 0 && row < p.len;
        float v = red[r];
        if (v != v) v = p.bound ? kInf : -kInf;
        if (mine) p.out[static_cast<int64_t>(kvh) * p.len + row] = v;
        if (CK == kChunkKeysReduced && mine &&
            !Excluded(p.hist_kind, row, p.n, p.n_sink, p.n_local)) {
          chunk_key = max(chunk_key, internal::OrderKey(v));
        }
        if (p.hist0 != nullptr) {
          // Neighbouring rows mostly share a bin: one shared atomic per distinct bin.
          const uint32_t bin = !mine ? 0xffffffffu
                                     : (Excluded(p.hist_kind, row, p.n, p.n_sink, p.n_local)
                                            ? 0u
                                            : internal::OrderKey(v)) >>
                                           21;
          const uint32_t peers = __match_any_sync(0xffffffffu, bin);
          if (mine && __ffs(peers) - 1 == lane) atomicAdd(&hist_s[bin], __popc(peers));
        }
      }
      if (CK == kChunkKeysReduced) {
        chunk_key = __reduce_max_sync(0xffffffffu, chunk_key);
        if (lane == 0 && tile < end) {
          p.chunk_keys[static_cast<int64_t>(kvh) * p.n_tiles + tile] = chunk_key;
        }
      }
    }
  }
  if (p.hist0 != nullptr) {
    __syncthreads();
    for (int i = tid; i < kRadixBins; i += kTcThreads) {
      if (hist_s[i] != 0)
        atomicAdd(&p.hist0[static_cast<int64_t>(kvh) * kRadixBins + i], hist_s[i]);
    }
  }
}

// Per-device attributes, read once.
struct DeviceInfo {
  int device = 0;
  int sms = 0;
  int smem_per_sm = 0;
  bool l2_fetch_128 = false;  // peak DRAM bandwidth past kTcFetch128Bandwidth
};
absl::StatusOr<DeviceInfo> GetDeviceInfo() {
  static std::atomic<int> cached_sms[64];
  static std::atomic<int> cached_smem[64];
  static std::atomic<bool> cached_fetch_128[64];
  DeviceInfo info;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&info.device));
  const int dev = info.device;
  if (dev >= 0 && dev < 64 && cached_sms[dev].load(std::memory_order_acquire) > 0) {
    info.sms = cached_sms[dev].load(std::memory_order_relaxed);
    info.smem_per_sm = cached_smem[dev].load(std::memory_order_relaxed);
    info.l2_fetch_128 = cached_fetch_128[dev].load(std::memory_order_relaxed);
    return info;
  }
  ROPEKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev));
  ROPEKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&info.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  // Peak DRAM bandwidth: two transfers a memory clock over the bus (an attribute the driver does
  // not give leaves the H100's choice).
  int mem_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev) == cudaSuccess &&
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev) == cudaSuccess) {
    info.l2_fetch_128 = 2.0 * mem_khz * 1e3 * bus_bits / 8 > kTcFetch128Bandwidth;
  } else {
    cudaGetLastError();
  }
  if (dev >= 0 && dev < 64) {
    cached_smem[dev].store(info.smem_per_sm, std::memory_order_relaxed);
    cached_fetch_128[dev].store(info.l2_fetch_128, std::memory_order_relaxed);
    cached_sms[dev].store(info.sms, std::memory_order_release);
  }
  return info;
}

// Allows `kKernel` `smem` bytes of dynamic shared memory on the current device. The attribute is
// set once per (kernel, device, size) so that launches inside stream capture make no such call
// after the first use. Without it a block may have 48 KB of static plus dynamic shared memory,
// so it is set when the kernel's static shared memory (read once) and `smem` exceed that.
template <auto kKernel>
absl::Status EnsureSmem(size_t smem) {
  static const size_t static_bytes = [] {
    cudaFuncAttributes a{};
    return cudaFuncGetAttributes(&a, kKernel) == cudaSuccess ? a.sharedSizeBytes : size_t{48 << 10};
  }();
  if (smem + static_bytes <= size_t{48 << 10}) return absl::OkStatus();
  static std::atomic<int> allowed[64];
  int dev = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64 &&
      allowed[dev].load(std::memory_order_acquire) >= static_cast<int>(smem)) {
    return absl::OkStatus();
  }
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  if (dev >= 0 && dev < 64) {
    int cur = allowed[dev].load(std::memory_order_relaxed);
    while (cur < static_cast<int>(smem) &&
           !allowed[dev].compare_exchange_weak(cur, static_cast<int>(smem))) {
    }
  }
  return absl::OkStatus();
}

// Scoring blocks resident per SM, limited by shared memory (1 KB reserved per block; registers
// allow more at 128 threads).
int ScoreBlocksPerSm(const DeviceInfo& info, size_t smem) {
  return std::max(1, std::min(8, info.smem_per_sm / static_cast<int>(smem + 1024)));
}

template <typename T, int GC>
absl::Status LaunchScoreTiles(ScoreParams p, size_t smem, cudaStream_t stream,
                              const DeviceInfo& info) {
  ROPEKV_TOPK_RETURN_IF_ERROR(EnsureSmem<ScoreTilesKernel<T, GC>>(smem));
  const int per_sm = ScoreBlocksPerSm(info, smem);
  const int64_t y = static_cast<int64_t>(p.kv_heads) * p.head_groups;
  if (y > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA path scores at most 65535 (kv head, head group) pairs, got ", y));
  }
  const int64_t target = static_cast<int64_t>(info.sms) * per_sm;
  int64_t x = std::max<int64_t>(1, target / y);
  x = std::min<int64_t>(x, p.n_tiles);
  p.tiles_per_block = (p.n_tiles + x - 1) / x;
  x = (p.n_tiles + p.tiles_per_block - 1) / p.tiles_per_block;
  ScoreTilesKernel<T, GC>
      <<<dim3(static_cast<unsigned>(x), static_cast<unsigned>(y)), kScoreThreads, smem, stream>>>(
          p);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// Shared memory of TcScoreKernel: the query fragments, the histogram and, for the bound (rows of
// 2d elements) with bf16 queries (one part) and passes of several n-tiles, the group's query rows.
size_t TcSmem(int width, int parts, int n_tiles8, bool hist, int d) {
  const bool staged = parts == 1 && width == 2 * d && TcPassTiles(n_tiles8) == kTcChunkTiles;
  return static_cast<size_t>(TcPaddedTiles(n_tiles8)) * (width / 16) * parts * 32 * 8 +
         (hist ? kRadixBins * 4 : 0) + (staged ? static_cast<size_t>(n_tiles8) * 8 * d * 2 : 0);
}

// Resident blocks a SM of `kKernel` with `threads` threads and `smem` bytes of dynamic shared
// memory (registers, shared memory and threads all count), asked of the runtime once per
// (kernel, device, smem) and kept in a few lock-free slots (a kernel sees one or two sizes: with
// and without the histogram, per group size).
template <auto kKernel>
absl::StatusOr<int> BlocksPerSm(int threads, size_t smem) {
  constexpr int kSlots = 8;
  static std::atomic<uint64_t> slots[kSlots];  // device << 48 | smem << 8 | blocks; 0 = empty
  static std::atomic<int> next{0};
  int dev = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&dev));
  const uint64_t tag = (static_cast<uint64_t>(dev) << 48) | (static_cast<uint64_t>(smem) << 8);
  for (auto& slot : slots) {
    const uint64_t v = slot.load(std::memory_order_acquire);
    if (v != 0 && (v & ~uint64_t{255}) == tag) return static_cast<int>(v & 255);
  }
  ROPEKV_TOPK_RETURN_IF_ERROR(EnsureSmem<kKernel>(smem));
  int blocks = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kKernel, threads, smem));
  blocks = std::max(1, std::min(blocks, 255));
  slots[next.fetch_add(1, std::memory_order_relaxed) % kSlots].store(
      tag | static_cast<uint64_t>(blocks), std::memory_order_release);
  return blocks;
}

template <int W, int P, int NTC, int CK, int L2B = 256, bool L1 = false>
absl::Status LaunchTc(TcParams p, bool* hist, cudaStream_t stream, const DeviceInfo& info) {
  constexpr auto kKernel = TcScoreKernel<W, P, NTC, CK, L2B, L1>;
  const size_t smem_plain = TcSmem(W, P, p.n_tiles8, false, p.d);
  absl::StatusOr<int> per_sm = BlocksPerSm<kKernel>(kTcThreads, smem_plain);
  if (!per_sm.ok()) return per_sm.status();
  size_t smem = smem_plain;
  if (*hist) {
    // The histogram is fused only when its shared memory costs no block a SM (otherwise the
    // selection makes it from the scores, which L2 still holds).
    absl::StatusOr<int> with = BlocksPerSm<kKernel>(kTcThreads, smem + kRadixBins * 4);
    if (!with.ok()) return with.status();
    if (*with >= *per_sm) {
      smem += kRadixBins * 4;
    } else {
      p.hist0 = nullptr;
      *hist = false;
    }
  }
  ROPEKV_TOPK_RETURN_IF_ERROR(EnsureSmem<kKernel>(smem));
  const int64_t y = p.kv_heads_for_grid;
  constexpr int64_t kWarps = kTcThreads / 32;
  // A scorer of one n-tile (at most 8 query heads a KV head) is bound by the key read: it keeps
  // about kTcInFlightPerSm bytes of keys in flight a SM (a warp has one tile in flight), not as
  // many blocks as fit. More only queue on the DRAM, and each warp's last tile then waits longer
  // at the end of the grid (globaltimer stamps: warps of equal tile counts ended 62-93 µs into
  // the grid at 7 blocks a SM). 32 heads / 128K: 7 blocks 95.3 µs, 4 blocks 93.6 (exact k 256
  // 104.7 -> 102.3 µs), 3 slower in both variants tried; the bound's 256-wide rows take 2 blocks
  // (level at 128K, 1-2% faster at 1M tokens). RESULTS run 12.
  int blocks = *per_sm;
  if (p.n_tiles8 == 1) {
    constexpr int kFit = kTcInFlightPerSm / (kWarps * kTcTileRows * W * 2);
    blocks = std::min(blocks, std::max(kFit, 2));
  }
  // One wave of warps over all heads, and every warp the same number of tiles: the fewest blocks
  // that keep the tiles a warp of a full wave takes (8192 pages: 64 blocks a head of 2 tiles a
  // warp, not 82 of 1 or 2).
  const int64_t x_wave = std::max<int64_t>(1, static_cast<int64_t>(info.sms) * blocks / y);
  const int64_t per_warp = (p.n_tiles + x_wave * kWarps - 1) / (x_wave * kWarps);
  const int64_t x = std::max<int64_t>(1, (p.n_tiles + per_warp * kWarps - 1) / (per_warp * kWarps));
  kKernel<<<dim3(static_cast<unsigned>(x), static_cast<unsigned>(y)), kTcThreads, smem, stream>>>(
      p);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <int W, int CK>
absl::Status LaunchTcCk(const TcParams& p, int parts, bool* hist, cudaStream_t stream,
                        const DeviceInfo& info) {
  switch (TcPassTiles(p.n_tiles8)) {
    case 1:
      // The memory-bound scorer (bf16 queries, at most 8 query heads a KV head) fetches 128-byte
      // spans into the L2 on HBM3e, and for reduced exact rows allocates in L1 too (TcLoadAligned;
      // per-query-head rows and the page bound were slower so, RESULTS run 29).
      if (parts == 1 && info.l2_fetch_128) {
        return !p.bound && p.red != GqaReduction::kPerQueryHead
                   ? LaunchTc<W, 1, 1, CK, 128, true>(p, hist, stream, info)
                   : LaunchTc<W, 1, 1, CK, 128>(p, hist, stream, info);
      }
      return parts == 1 ? LaunchTc<W, 1, 1, CK>(p, hist, stream, info)
                        : LaunchTc<W, 3, 1, CK>(p, hist, stream, info);
    case 2:
      return parts == 1 ? LaunchTc<W, 1, 2, CK>(p, hist, stream, info)
                        : LaunchTc<W, 3, 2, CK>(p, hist, stream, info);
    default:
      return parts == 1 ? LaunchTc<W, 1, kTcChunkTiles, CK>(p, hist, stream, info)
                        : LaunchTc<W, 3, kTcChunkTiles, CK>(p, hist, stream, info);
  }
}

template <int W>
absl::Status LaunchTcW(const TcParams& p, int parts, bool* hist, cudaStream_t stream,
                       const DeviceInfo& info) {
  if (p.chunk_keys == nullptr) return LaunchTcCk<W, kChunkKeysNone>(p, parts, hist, stream, info);
  if (p.red == GqaReduction::kPerQueryHead) {
    return LaunchTcCk<W, kChunkKeysPerHead>(p, parts, hist, stream, info);
  }
  return LaunchTcCk<W, kChunkKeysReduced>(p, parts, hist, stream, info);
}

// What the scoring kernel may make for the selection that follows, besides the scores.
struct ScoreExtras {
  // In: the first radix histogram of the selection (kMax / kSum), fused when it costs no
  // occupancy.
  uint32_t* hist0 = nullptr;
  // In: per-tile maximum keys for ChunkSelectKernel (tensor-core scoring only).
  uint32_t* chunk_keys = nullptr;
  SrcKind kind = SrcKind::kPlain;  // which elements the selection excludes
  bool hist_done = false;          // out: hist0 was made
  bool chunks_done = false;        // out: chunk_keys were made
};

// Whether RunTcScore scores `view` (out set, no LSE partials) on tensor cores: bf16 rows of a
// supported width whose group's query fragments (and, with `hist`, a histogram) fit a block.
bool TcScores(const SelectRequest& req, const MatrixView& view, bool bound, bool hist,
              const DeviceInfo& info) {
  const int width = bound ? 2 * req.head_dim : req.head_dim;
  const int group = req.query_heads / req.kv_heads;
  const int parts = req.query_dtype == DType::kBF16 ? 1 : 3;
  return internal::TensorCoreScoring() && view.dtype == DType::kBF16 &&
         (width == 64 || width == 128 || width == 256 || width == 512) &&
         TcSmem(width, parts, (group + 7) / 8, hist, req.head_dim) + 1024 <=
             static_cast<size_t>(info.smem_per_sm) &&
         req.kv_heads <= 65535;
}

// Scores (or bounds) on tensor cores where TcScores says so; *launched tells whether it ran.
absl::Status RunTcScore(const SelectRequest& req, const MatrixView& view, bool bound, float* out,
                        cudaStream_t stream, ScoreExtras* extras, bool* launched,
                        const DeviceInfo& info) {
  *launched = false;
  const bool reduced = req.reduction != GqaReduction::kPerQueryHead;
  bool hist = extras != nullptr && extras->hist0 != nullptr && reduced;
  if (out == nullptr || !TcScores(req, view, bound, hist, info)) return absl::OkStatus();
  const int width = bound ? 2 * req.head_dim : req.head_dim;
  const int group = req.query_heads / req.kv_heads;
  const int parts = req.query_dtype == DType::kBF16 ? 1 : 3;
  TcParams p;
  p.n_tiles8 = (group + 7) / 8;
  p.rows = ToDev(view);
  p.queries = req.queries;
  p.qtype = req.query_dtype;
  p.d = req.head_dim;
  p.bound = bound;
  p.group = group;
  p.kv_heads_for_grid = req.kv_heads;
  p.red = req.reduction;
  p.len = bound ? NumPages(req.num_tokens) : req.num_tokens;
  p.out = out;
  p.n_tiles = (p.len + kTcTileRows - 1) / kTcTileRows;
  p.hist0 = hist ? extras->hist0 : nullptr;
  p.chunk_keys = extras != nullptr ? extras->chunk_keys : nullptr;
  p.hist_kind = extras != nullptr ? extras->kind : SrcKind::kPlain;
  p.n = req.num_tokens;
  p.n_sink = req.n_sink;
  p.n_local = req.n_local;
  auto launch = [&]() -> absl::Status {
    switch (width) {
      case 64:
        return LaunchTcW<64>(p, parts, &hist, stream, info);
      case 128:
        return LaunchTcW<128>(p, parts, &hist, stream, info);
      case 256:
        return LaunchTcW<256>(p, parts, &hist, stream, info);
      default:
        return LaunchTcW<512>(p, parts, &hist, stream, info);
    }
  };
  ROPEKV_TOPK_RETURN_IF_ERROR(launch());
  *launched = true;
  if (extras != nullptr) {
    extras->hist_done = hist;
    extras->chunks_done = p.chunk_keys != nullptr;
  }
  return absl::OkStatus();
}

// Scores (or bounds) of every row of `view` for the request's queries, into out[rows][len]
// and/or LSE partials, with what `extras` asks for where the scoring kernel makes it.
absl::Status RunScoreTiles(const SelectRequest& req, const MatrixView& view, bool bound, float* out,
                           float2* lse, int64_t lse_parts, cudaStream_t stream,
                           ScoreExtras* extras = nullptr) {
  if (extras != nullptr) extras->hist_done = extras->chunks_done = false;
  absl::StatusOr<DeviceInfo> info = GetDeviceInfo();
  if (!info.ok()) return info.status();
  if (lse == nullptr) {
    bool launched = false;
    ROPEKV_TOPK_RETURN_IF_ERROR(
        RunTcScore(req, view, bound, out, stream, extras, &launched, *info));
    if (launched) return absl::OkStatus();
  }
  const int width = bound ? 2 * req.head_dim : req.head_dim;
  const int esize = static_cast<int>(DTypeSize(view.dtype));
  const TileShape ts = MakeTileShape(width, esize);
  const int group = req.query_heads / req.kv_heads;
  const int max_heads = kQuerySmemBytes / (ts.q_stride * 4);
  if (req.reduction != GqaReduction::kPerQueryHead && group > max_heads) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the CUDA path reduces at most ", max_heads, " query heads per KV head at head_dim ",
        req.head_dim, (bound ? " (bound)" : ""), ", got ", group,
        "; use kPerQueryHead or the CPU path"));
  }
  ScoreParams p;
  p.rows = ToDev(view);
  p.queries = req.queries;
  p.qtype = req.query_dtype;
  p.d = req.head_dim;
  p.width = width;
  p.bound = bound;
  p.kv_heads = req.kv_heads;
  p.group = group;
  p.heads_per_block = std::min(group, max_heads);
  p.head_groups = (group + p.heads_per_block - 1) / p.heads_per_block;
  p.red = req.reduction;
  p.len = bound ? NumPages(req.num_tokens) : req.num_tokens;
  p.out = out;
  p.lse = lse;
  p.lse_parts = lse_parts;
  p.lse_scale = internal::SoftmaxScale(req);
  p.n_tiles = (p.len + ts.tile_rows - 1) / ts.tile_rows;
  p.tiles_per_block = 1;
  size_t smem = static_cast<size_t>(kStages) * kScoreThreads * ts.slot_bytes +
                static_cast<size_t>(p.heads_per_block) * ts.q_stride * 4;
  p.hist0 = nullptr;
  p.hist_kind = extras != nullptr ? extras->kind : SrcKind::kPlain;
  p.n = req.num_tokens;
  p.n_sink = req.n_sink;
  p.n_local = req.n_local;
  const size_t hist_smem = kRadixBins * 4;
  if (extras != nullptr && extras->hist0 != nullptr && out != nullptr &&
      req.reduction != GqaReduction::kPerQueryHead &&
      ScoreBlocksPerSm(*info, smem + hist_smem) >= ScoreBlocksPerSm(*info, smem)) {
    smem += hist_smem;
    p.hist0 = extras->hist0;
    extras->hist_done = true;
  }
  const int hpb = p.heads_per_block;
  const int gc = hpb >= 8 ? 8 : (hpb >= 4 ? 4 : (hpb >= 2 ? 2 : 1));
#define ROPEKV_TOPK_SCORE_GC(T)                              \
  switch (gc) {                                              \
    case 8:                                                  \
      return LaunchScoreTiles<T, 8>(p, smem, stream, *info); \
    case 4:                                                  \
      return LaunchScoreTiles<T, 4>(p, smem, stream, *info); \
    case 2:                                                  \
      return LaunchScoreTiles<T, 2>(p, smem, stream, *info); \
    default:                                                 \
      return LaunchScoreTiles<T, 1>(p, smem, stream, *info); \
  }
  switch (view.dtype) {
    case DType::kF32:
      ROPEKV_TOPK_SCORE_GC(float)
    case DType::kF16:
      ROPEKV_TOPK_SCORE_GC(__half)
    case DType::kBF16:
      ROPEKV_TOPK_SCORE_GC(__nv_bfloat16)
  }
#undef ROPEKV_TOPK_SCORE_GC
  return absl::InvalidArgumentError("unknown dtype");
}

// ---------------------------------------------------------------------------------------------
// Radix selection with threshold filtering.

struct SelSource {
  const float* scores = nullptr;  // [rows][len]
  int64_t len = 0;
  SrcKind kind = SrcKind::kPlain;
  int64_t n = 0, n_sink = 0, n_local = 0;
  const int32_t* pages = nullptr;           // kSlots: [rows][cand_pages]
  const uint32_t* page_counters = nullptr;  // kSlots: counters of the page selection
  int64_t cand_pages = 0;
  // Long page rows: the counters holding each row's largest key and largest ~key (RangeKernel).
  // A kernel reads its row's range once (WithRange) and KeyTie then spreads the keys of
  // [lo, hi] over all 32 bits, order kept: the bounds of one KV head's pages lie close together,
  // so their top 11 bits, the first radix digit, would put most pages in one bin.
  const uint32_t* range = nullptr;
  bool spread = false;
  uint32_t lo = 0;
  int shift = 0;
};

// Order key (0 = excluded) of element e with score v, for the sources whose element e is score e
// (all but kSlots).
__device__ __forceinline__ uint32_t DirectKey(const SelSource& s, int64_t e, float v) {
  switch (s.kind) {
    case SrcKind::kTokens:
      return internal::IsPinned(e, s.n, s.n_sink, s.n_local) ? 0u : internal::OrderKey(v);
    case SrcKind::kPages: {
      const uint32_t key =
          internal::PageAllPinned(e, s.n, s.n_sink, s.n_local) ? 0u : internal::OrderKey(v);
      return s.spread && key != 0u ? (key - s.lo + 1u) << s.shift : key;
    }
    default:
      return internal::OrderKey(v);
  }
}

// Order key (0 = excluded) and tie index of element e of `row`. Ties prefer a lower tie index;
// for emitted (non-excluded) elements the tie index is also what is emitted (token or page).
__device__ __forceinline__ void KeyTie(const SelSource& s, int64_t row, int64_t e, uint32_t* key,
                                       uint32_t* tie) {
  *tie = static_cast<uint32_t>(e);
  switch (s.kind) {
    case SrcKind::kPlain:
    case SrcKind::kTokens:
    case SrcKind::kPages:
      *key = DirectKey(s, e, s.scores[row * s.len + e]);
      return;
    case SrcKind::kSlots: {
      const int64_t pi = e >> 4;
      *key = 0u;
      const uint32_t listed =
          __ldcg(&s.page_counters[row * internal::kCountersPerRow + internal::kCounterAppended]);
      if (pi >= static_cast<int64_t>(listed) || pi >= s.cand_pages) return;
      const int64_t t =
          static_cast<int64_t>(__ldcg(&s.pages[row * s.cand_pages + pi])) * 16 + (e & 15);
      if (t >= s.n || internal::IsPinned(t, s.n, s.n_sink, s.n_local)) return;
      *tie = static_cast<uint32_t>(t);
      *key = internal::OrderKey(s.scores[row * s.len + e]);
      return;
    }
  }
}

// KeyTie of the elements base + j * kSelThreads + threadIdx.x (j < kSelItems; key 0 from end on)
// of one pass of a selection block. All scores are loaded before any is keyed, so that their
// latencies overlap: with the kind's switch between them, each load waited for the one before
// (ncu, 512 rows of 32K: a third of FilterKernel's stall samples).
__device__ __forceinline__ void KeyTieStep(const SelSource& s, int64_t row, int64_t base,
                                           int64_t end, uint32_t (&key)[kSelItems],
                                           uint32_t (&tie)[kSelItems]) {
  if (s.kind == SrcKind::kSlots) {
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const int64_t e = base + j * kSelThreads + threadIdx.x;
      uint32_t k = 0u, t = 0u;
      if (e < end) KeyTie(s, row, e, &k, &t);
      key[j] = k;
      tie[j] = t;
    }
    return;
  }
  float v[kSelItems];
#pragma unroll
  for (int j = 0; j < kSelItems; ++j) {
    const int64_t e = base + j * kSelThreads + threadIdx.x;
    v[j] = e < end ? s.scores[row * s.len + e] : 0.0f;
  }
#pragma unroll
  for (int j = 0; j < kSelItems; ++j) {
    const int64_t e = base + j * kSelThreads + threadIdx.x;
    tie[j] = static_cast<uint32_t>(e);
    key[j] = e < end ? DirectKey(s, e, v[j]) : 0u;
  }
}

// src with its row's key range read (a no-op without src.range). (key - lo + 1) << shift is
// order-preserving, non-zero, and fits 32 bits: key - lo + 1 <= hi - lo + 1 < 2^(32 - shift).
__device__ __forceinline__ SelSource WithRange(SelSource s, int64_t row) {
  if (s.range == nullptr) return s;
  const uint32_t* c = s.range + row * internal::kCountersPerRow;
  const uint32_t hi = __ldcg(&c[internal::kCounterMaxKey]);
  const uint32_t lo = ~__ldcg(&c[internal::kCounterMaxNotKey]);
  s.spread = hi >= lo;  // else no element takes part
  s.lo = lo;
  s.shift = s.spread ? __clz(hi - lo + 1u) : 0;
  return s;
}

enum class SinkKind : int {
  kMarkToken = 0,  // set bit t of the row's bitmap
  kMarkPage = 1,   // set the 16 bits of page p
  kAppend = 2,     // append p to the row's list
};

struct SelSink {
  SinkKind kind = SinkKind::kMarkToken;
  uint32_t* bitmap = nullptr;  // [rows][words]
  int64_t words = 0;
  int32_t* list = nullptr;       // [rows][list_cap]
  uint32_t* counters = nullptr;  // [rows][4]; entry 2 counts the list
  int64_t list_cap = 0;
};

__device__ __forceinline__ void Emit(const SelSink& s, int64_t row, uint32_t target) {
  switch (s.kind) {
    case SinkKind::kMarkToken:
      atomicOr(&s.bitmap[row * s.words + (target >> 5)], 1u << (target & 31u));
      return;
    case SinkKind::kMarkPage:
      atomicOr(&s.bitmap[row * s.words + (target >> 1)], 0xffffu << (16u * (target & 1u)));
      return;
    case SinkKind::kAppend: {
      const uint32_t pos =
          atomicAdd(&s.counters[row * internal::kCountersPerRow + internal::kCounterAppended], 1u);
      if (pos < s.list_cap) s.list[row * s.list_cap + pos] = static_cast<int32_t>(target);
      return;
    }
  }
}

struct SelWs {
  uint32_t* hist0;     // [rows][kRadixBins]
  uint32_t* hist1;     // [rows][kRadixBins]
  uint32_t* counters;  // [rows][internal::kCountersPerRow]
  uint32_t* cand;      // [rows][len]
  uint32_t* blocks;    // [rows][block_stride]: split / floor selections' per-block counts
  int64_t block_stride;
};

// Digit p of the composite (key, ~tie): 11 + 11 + 10 bits of key, then of ~tie.
__device__ __forceinline__ uint32_t Digit(int p, uint32_t key, uint32_t tie) {
  const uint32_t v = p < 3 ? key : ~tie;
  switch (p % 3) {
    case 0:
      return v >> 21;
    case 1:
      return (v >> 10) & 2047u;
    default:
      return v & 1023u;
  }
}
__device__ __forceinline__ int DigitBins(int p) { return p % 3 == 2 ? 1024 : 2048; }

// The largest and smallest key of each row (src.range's counters, zeroed before), by blocks of
// `chunk` elements.
__global__ void __launch_bounds__(kSelThreads)
    RangeKernel(const SelSource src, uint32_t* counters, int64_t chunk) {
  const int64_t row = blockIdx.y;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(src.len, begin + chunk);
  uint32_t hi = 0u, not_lo = 0u;
  for (int64_t base = begin; base < end; base += kSelThreads * kSelItems) {
    uint32_t key[kSelItems], tie[kSelItems];
    KeyTieStep(src, row, base, end, key, tie);
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      if (key[j] != 0u) {
        hi = max(hi, key[j]);
        not_lo = max(not_lo, ~key[j]);
      }
    }
  }
  hi = __reduce_max_sync(0xffffffffu, hi);
  not_lo = __reduce_max_sync(0xffffffffu, not_lo);
  if ((threadIdx.x & 31) == 0 && hi != 0u) {
    atomicMax(&counters[row * internal::kCountersPerRow + internal::kCounterMaxKey], hi);
    atomicMax(&counters[row * internal::kCountersPerRow + internal::kCounterMaxNotKey], not_lo);
  }
}

__global__ void __launch_bounds__(kSelThreads) HistKernel(const SelSource src_in,
                                                          uint32_t* hist0,  // [rows][kRadixBins]
                                                          int64_t chunk) {
  __shared__ uint32_t h[kRadixBins];
  for (int i = threadIdx.x; i < kRadixBins; i += kSelThreads) h[i] = 0;
  __syncthreads();
  const int64_t row = blockIdx.y;
  const SelSource src = WithRange(src_in, row);
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(src.len, begin + chunk);
  for (int64_t base = begin; base < end; base += kSelThreads * kSelItems) {
    uint32_t key[kSelItems], tie[kSelItems];
    KeyTieStep(src, row, base, end, key, tie);
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      if (base + j * kSelThreads + threadIdx.x < end) atomicAdd(&h[key[j] >> 21], 1u);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRadixBins; i += kSelThreads) {
    if (h[i] != 0) atomicAdd(&hist0[row * kRadixBins + i], h[i]);
  }
}

using SelScan = cub::BlockScan<uint32_t, kSelThreads>;

struct Threshold {
  uint32_t bin;
  uint32_t gt;        // elements in higher bins
  uint32_t eq;        // elements in the bin
  uint32_t take_all;  // gt + eq == k: the whole bin is selected
};

// Finds the bin b holding the k-th largest element of `hist` (shared, nbins <= 2048): fewer than
// k elements above it, at least k from it up. Block-wide; result in *out (shared).
__device__ void FindThreshold(const uint32_t* hist, int nbins, uint32_t k,
                              SelScan::TempStorage& scan, Threshold* out) {
  const int tid = threadIdx.x;
  uint32_t c[4];
  uint32_t sum = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int b = nbins - 1 - (tid * 4 + j);
    c[j] = b >= 0 ? hist[b] : 0u;
    sum += c[j];
  }
  uint32_t above = 0;
  if (tid == 0) *out = Threshold{0u, 0u, 0u, 1u};  // only if the histogram holds < k elements
  __syncthreads();
  SelScan(scan).ExclusiveSum(sum, above);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int b = nbins - 1 - (tid * 4 + j);
    if (b >= 0 && above < k && above + c[j] >= k) {
      *out = Threshold{static_cast<uint32_t>(b), above, c[j], above + c[j] == k ? 1u : 0u};
    }
    above += c[j];
  }
  __syncthreads();
}

// Bitmap -> ascending indices, with sink and local tokens.

struct CompactArgs {
  int32_t* indices = nullptr;  // [rows][cap]; null: the selection feeds another stage
  int32_t* counts = nullptr;   // [rows]; may be null
  int64_t cap = 0;
  int64_t n = 0, n_sink = 0, n_local = 0;  // bits >= n are ignored
  const float* row_scores = nullptr;       // [rows][n]: scores copied for chosen tokens
  float* out_scores = nullptr;             // [rows][cap]; unused slots NaN; may be null
};

__device__ __forceinline__ uint32_t RangeMask(int64_t w, int64_t lo, int64_t hi) {
  const int64_t a = max(lo, w * 32), b = min(hi, w * 32 + 32);
  if (a >= b) return 0u;
  const int n = static_cast<int>(b - a);
  const uint32_t m = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
  return m << static_cast<int>(a - w * 32);
}

// Writes row `row` of the output from its bitmap (complete: every block of the row is done).
__device__ void CompactRow(const uint32_t* bitmap, int64_t words, const CompactArgs& o, int64_t row,
                           SelScan::TempStorage& scan) {
  const int64_t per = (words + kSelThreads - 1) / kSelThreads;
  const int64_t w0 = threadIdx.x * per;
  const int64_t w1 = min(words, w0 + per);
  // Interior words (no sink or local token, all tokens < n) are the bitmap word itself.
  const int64_t free_lo = o.n_sink, free_hi = o.n - o.n_local;
  auto word = [&](int64_t w) {
    const uint32_t chosen = __ldcg(&bitmap[row * words + w]);
    if (w * 32 >= free_lo && w * 32 + 32 <= free_hi) return chosen;
    const uint32_t pinned = RangeMask(w, 0, o.n_sink) | RangeMask(w, o.n - o.n_local, o.n);
    return (chosen | pinned) & RangeMask(w, 0, o.n);
  };
  // Words in batches of independent loads: this runs in one block after the rest of the
  // selection, so its latency chain is the selection's tail. The first batch (the only one up to
  // kBatch * kSelThreads words: 128K tokens) stays in registers for the writing pass.
  constexpr int kBatch = 8;
  uint32_t first[kBatch];
#pragma unroll
  for (int j = 0; j < kBatch; ++j) first[j] = w0 + j < w1 ? word(w0 + j) : 0u;
  uint32_t mine = 0;
#pragma unroll
  for (int j = 0; j < kBatch; ++j) mine += __popc(first[j]);
  for (int64_t w = w0 + kBatch; w < w1; w += kBatch) {
    uint32_t v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) v[j] = w + j < w1 ? word(w + j) : 0u;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) mine += __popc(v[j]);
  }
  uint32_t start = 0, total = 0;
  SelScan(scan).ExclusiveSum(mine, start, total);
  for (int64_t wb = w0; wb < w1; wb += kBatch) {
    uint32_t v[kBatch];
#pragma unroll
    for (int j = 0; j < kBatch; ++j) v[j] = wb == w0 ? first[j] : (wb + j < w1 ? word(wb + j) : 0u);
    for (int j = 0; j < kBatch; ++j) {
      uint32_t m = v[j];
      while (m != 0) {
        const int b = __ffs(m) - 1;
        m &= m - 1;
        const int64_t t = (wb + j) * 32 + b;
        if (start < o.cap) {
          o.indices[row * o.cap + start] = static_cast<int32_t>(t);
          if (o.out_scores != nullptr && o.row_scores != nullptr) {
            o.out_scores[row * o.cap + start] = o.row_scores[row * o.n + t];
          }
        }
        ++start;
      }
    }
  }
  const int64_t count = static_cast<int64_t>(total) < o.cap ? static_cast<int64_t>(total) : o.cap;
  for (int64_t j = count + threadIdx.x; j < o.cap; j += kSelThreads) {
    o.indices[row * o.cap + j] = -1;
    if (o.out_scores != nullptr) o.out_scores[row * o.cap + j] = __uint_as_float(0x7fc00000u);
  }
  if (threadIdx.x == 0 && o.counts != nullptr) o.counts[row] = static_cast<int32_t>(count);
}

// Candidates slot(j), j < kResolveItems, of a row's list: their elements, order keys and tie
// indices (key and tie 0 past n_cand); every index is loaded before any score, so that the loads
// overlap.
template <typename Slot>
__device__ __forceinline__ void CandidateKeys(const SelSource& src, int64_t row,
                                              const uint32_t* cand, uint32_t n_cand, Slot slot,
                                              uint32_t (&e)[kResolveItems],
                                              uint32_t (&key)[kResolveItems],
                                              uint32_t (&tie)[kResolveItems]) {
#pragma unroll
  for (int j = 0; j < kResolveItems; ++j) {
    const uint32_t i = slot(j);
    e[j] = i < n_cand ? __ldcg(&cand[i]) : 0u;
  }
#pragma unroll
  for (int j = 0; j < kResolveItems; ++j) {
    key[j] = 0;
    tie[j] = 0;
    if (slot(j) < n_cand) KeyTie(src, row, e[j], &key[j], &tie[j]);
  }
}

// The last block's part of FilterKernel: candidates -> digit by digit until resolved.
__device__ void ResolveCandidates(const SelSource& src, const SelSink& sink, const SelWs& ws,
                                  uint32_t k_rem, int64_t row, uint32_t* hist_a, uint32_t* hist_b,
                                  SelScan::TempStorage& scan, Threshold* thr_s) {
  const int tid = threadIdx.x;
  const int64_t len = src.len;

  uint32_t n_cand =
      __ldcg(&ws.counters[row * internal::kCountersPerRow + internal::kCounterCandidates]);
  for (int i = tid; i < kRadixBins; i += kSelThreads) {
    hist_a[i] = __ldcg(&ws.hist1[row * kRadixBins + i]);
  }
  uint32_t* cur = hist_a;
  uint32_t* nxt = hist_b;
  uint32_t* cand = ws.cand + row * len;
  for (int p = 1; p < 6; ++p) {
    for (int i = tid; i < kRadixBins; i += kSelThreads) nxt[i] = 0;
    __syncthreads();
    FindThreshold(cur, DigitBins(p), k_rem, scan, thr_s);
    const Threshold t = *thr_s;
    // One ordered pass over the candidates, compacting the survivors in place: a thread takes
    // kResolveItems consecutive candidates, loads them all, then decides.
    uint32_t kept_total = 0;
    for (uint32_t base = 0; base < n_cand; base += kSelThreads * kResolveItems) {
      uint32_t e[kResolveItems], key[kResolveItems], tie[kResolveItems];
      bool keep[kResolveItems];
      uint32_t n_keep = 0;
      CandidateKeys(
          src, row, cand, n_cand, [&](int j) { return base + tid * kResolveItems + j; }, e, key,
          tie);
#pragma unroll
      for (int j = 0; j < kResolveItems; ++j) {
        keep[j] = false;
        if (base + tid * kResolveItems + j >= n_cand) continue;
        const uint32_t d = Digit(p, key[j], tie[j]);
        if (key[j] != 0 && (d > t.bin || (d == t.bin && t.take_all))) {
          Emit(sink, row, tie[j]);
        } else if (d == t.bin && !t.take_all) {
          keep[j] = true;
          ++n_keep;
          if (p < 5) atomicAdd(&nxt[Digit(p + 1, key[j], tie[j])], 1u);
        }
      }
      uint32_t rank = 0, kept = 0;
      SelScan(scan).ExclusiveSum(n_keep, rank, kept);
#pragma unroll
      for (int j = 0; j < kResolveItems; ++j) {
        if (keep[j]) cand[kept_total + rank++] = e[j];
      }
      kept_total += kept;
      __syncthreads();
    }
    if (t.take_all || p == 5) break;
    n_cand = kept_total;
    k_rem -= t.gt;
    uint32_t* tmp = cur;
    cur = nxt;
    nxt = tmp;
    __syncthreads();
  }
}

// One block's threshold-filter pass over [begin, end) of `row` for the first digit's threshold t0:
// elements above it are emitted (EMIT) or counted (the thread's count is returned); those on it
// become candidates (appended to the row's list, their second digit counted in hist_b, shared);
// those below are dropped. Excluded elements (key 0) are never emitted or counted.
template <bool EMIT>
__device__ uint32_t FilterPass(const SelSource& src, const SelSink& sink, const SelWs& ws,
                               int64_t row, int64_t begin, int64_t end, const Threshold& t0,
                               uint32_t* hist_b) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  uint32_t above = 0;
  for (int64_t base = begin; base < end; base += kSelThreads * kSelItems) {
    uint32_t key[kSelItems], tie[kSelItems];
    KeyTieStep(src, row, base, end, key, tie);
    uint32_t masks[kSelItems];
    uint32_t n_keep = 0;
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      const int64_t e = base + j * kSelThreads + tid;
      bool keep = false;
      if (e < end) {
        const uint32_t d = key[j] >> 21;
        if (key[j] != 0 && (d > t0.bin || (d == t0.bin && t0.take_all))) {
          if constexpr (EMIT) {
            Emit(sink, row, tie[j]);
          } else {
            ++above;
          }
        } else if (d == t0.bin && !t0.take_all) {
          keep = true;
          atomicAdd(&hist_b[(key[j] >> 10) & 2047u], 1u);
        }
      }
      masks[j] = __ballot_sync(0xffffffffu, keep);
      n_keep += __popc(masks[j]);
    }
    // Warp-aggregated append to the candidate list: one atomic for all items of the warp.
    if (n_keep != 0) {
      uint32_t pos = 0;
      if (lane == 0)
        pos = atomicAdd(
            &ws.counters[row * internal::kCountersPerRow + internal::kCounterCandidates], n_keep);
      pos = __shfl_sync(0xffffffffu, pos, 0);
#pragma unroll
      for (int j = 0; j < kSelItems; ++j) {
        if (masks[j] & (1u << lane)) {
          ws.cand[row * src.len + pos + __popc(masks[j] & ((1u << lane) - 1u))] =
              static_cast<uint32_t>(base + j * kSelThreads + tid);
        }
        pos += __popc(masks[j]);
      }
    }
  }
  return above;
}

// Loads row `row`'s first histogram into hist (shared) and finds the first digit's threshold.
__device__ Threshold FirstThreshold(const SelWs& ws, int64_t row, uint32_t k_sel, uint32_t* hist,
                                    SelScan::TempStorage& scan, Threshold* thr_s) {
  for (int i = threadIdx.x; i < kRadixBins; i += kSelThreads) {
    hist[i] = __ldcg(&ws.hist0[row * kRadixBins + i]);
  }
  __syncthreads();
  FindThreshold(hist, kRadixBins, k_sel, scan, thr_s);
  return *thr_s;
}

// Threshold filtering of one row chunk per block; the last block of a row resolves the rest and,
// with `out.indices`, writes the row's output.
__global__ void __launch_bounds__(kSelThreads)
    FilterKernel(const SelSource src_in, const SelSink sink, const SelWs ws, uint32_t k_sel,
                 int64_t chunk, const CompactArgs out) {
  __shared__ uint32_t hist_a[kRadixBins];
  __shared__ uint32_t hist_b[kRadixBins];
  __shared__ SelScan::TempStorage scan;
  __shared__ Threshold thr;
  __shared__ int is_last;
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.y;
  WaitForPrevious();  // the scores and histogram (launched by LaunchDependent)
  const SelSource src = WithRange(src_in, row);
  const int64_t len = src.len;

  for (int i = tid; i < kRadixBins; i += kSelThreads) hist_b[i] = 0;
  const Threshold t0 = FirstThreshold(ws, row, k_sel, hist_a, scan, &thr);
  const int64_t begin = blockIdx.x * chunk;
  FilterPass<true>(src, sink, ws, row, begin, min(len, begin + chunk), t0, hist_b);
  __syncthreads();
  if (!t0.take_all) {
    for (int i = tid; i < kRadixBins; i += kSelThreads) {
      if (hist_b[i] != 0) atomicAdd(&ws.hist1[row * kRadixBins + i], hist_b[i]);
    }
  }
  // The last block of the row to get here finishes the row.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const uint32_t ticket =
        atomicAdd(&ws.counters[row * internal::kCountersPerRow + internal::kCounterFinished], 1u);
    is_last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  if (!t0.take_all) {
    ResolveCandidates(src, sink, ws, k_sel - t0.gt, row, hist_a, hist_b, scan, &thr);
  }
  if (out.indices != nullptr) {
    __syncthreads();
    __threadfence();
    CompactRow(sink.bitmap, sink.words, out, row, scan);
  }
}

// ---------------------------------------------------------------------------------------------
// The split selection: FilterKernel's exact token rows in three grids. There, the last block of a
// row resolves the candidates and compacts the row's bitmap alone, ~17 of the ~26 µs it adds
// after the scorer at 8 rows of 128K tokens and k 4096 (RESULTS run 13). Here every block of the
// row writes its own part of the output:
// SplitFilterKernel   every block: the first digit's threshold; counts its elements above it;
//                     those on it become candidates (list + second-digit histogram, FilterPass)
// SplitResolveKernel  one block a row: the second digit's threshold; candidates above it are
//                     chosen, those on it (a few unless keys tie: at most kTieRankCap) ranked by
//                     (key, lower token) in shared memory, else ResolveCandidates digit by digit;
//                     chosen candidates are marked in the bitmap. Then each filter block's offset
//                     in the output row: a scan of its count above the threshold plus its marked
//                     candidates
// SplitWriteKernel    every block: re-keys its elements (from L2) and writes the chosen ones (above
//                     the threshold digit, or marked) at its offset, in token order by one block
//                     scan; the row's first block writes the sink tokens, its last the local
//                     tokens, the padding and the count
// Bit for bit FilterKernel's output (tested: SplitSelectionEqualsFilterPath).

constexpr int kTieRankCap = 256;       // candidates on the second digit ranked in shared memory
constexpr int kSplitMaxBlocks = 1024;  // blocks of a row (SelChunk: at most ~1023)
// A row of one block is resolved and written by that block in FilterKernel, with no hand-off.
constexpr int kSplitMinBlocks = 2;

__global__ void __launch_bounds__(kSelThreads)
    SplitFilterKernel(const SelSource src, const SelWs ws, uint32_t k_sel, int64_t chunk) {
  __shared__ uint32_t hist_a[kRadixBins];
  __shared__ uint32_t hist_b[kRadixBins];
  __shared__ SelScan::TempStorage scan;
  __shared__ Threshold thr;
  __shared__ uint32_t warp_above[kSelThreads / 32];
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.y;
  WaitForPrevious();  // the scores and histogram
  AllowDependents();  // SplitResolveKernel's blocks may take their SMs now

  for (int i = tid; i < kRadixBins; i += kSelThreads) hist_b[i] = 0;
  const Threshold t0 = FirstThreshold(ws, row, k_sel, hist_a, scan, &thr);
  if (blockIdx.x == 0 && tid == 0) {
    uint32_t* c = ws.counters + row * internal::kCountersPerRow;
    c[internal::kCounterThreshold] = t0.bin | (t0.take_all << 16);
    c[internal::kCounterAbove] = t0.gt;
  }
  const int64_t begin = blockIdx.x * chunk;
  uint32_t above =
      FilterPass<false>(src, SelSink{}, ws, row, begin, min(src.len, begin + chunk), t0, hist_b);
  above = __reduce_add_sync(0xffffffffu, above);
  if ((tid & 31) == 0) warp_above[tid >> 5] = above;
  __syncthreads();
  if (tid < 32) {
    uint32_t v = tid < kSelThreads / 32 ? warp_above[tid] : 0u;
    v = __reduce_add_sync(0xffffffffu, v);
    if (tid == 0) ws.blocks[row * ws.block_stride + blockIdx.x] = v;
  }
  if (!t0.take_all) {
    for (int i = tid; i < kRadixBins; i += kSelThreads) {
      if (hist_b[i] != 0) atomicAdd(&ws.hist1[row * kRadixBins + i], hist_b[i]);
    }
  }
}

__global__ void __launch_bounds__(kSelThreads)
    SplitResolveKernel(const SelSource src, const SelSink sink, const SelWs ws, uint32_t k_sel,
                       int64_t chunk, int bpr) {
  __shared__ uint32_t hist_a[kRadixBins];
  __shared__ uint32_t hist_b[kRadixBins];
  __shared__ SelScan::TempStorage scan;
  __shared__ Threshold thr;
  __shared__ uint32_t tie_key[kTieRankCap];
  __shared__ uint32_t tie_tok[kTieRankCap];
  __shared__ uint32_t n_tie;
  __shared__ uint32_t marked[kSplitMaxBlocks];  // chosen candidates per filter block
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  uint32_t* bitmap = sink.bitmap + row * sink.words;
  auto mark = [&](uint32_t e) {
    atomicOr(&bitmap[e >> 5], 1u << (e & 31u));
    atomicAdd(&marked[e / chunk], 1u);
  };
  WaitForPrevious();  // the filter's counts, candidates and second histogram
  AllowDependents();

  for (int b = tid; b < bpr; b += kSelThreads) marked[b] = 0;
  if (tid == 0) n_tie = 0;
  const uint32_t* c = ws.counters + row * internal::kCountersPerRow;
  if (((__ldcg(&c[internal::kCounterThreshold]) >> 16) & 1u) == 0u) {
    const uint32_t k_rem = k_sel - __ldcg(&c[internal::kCounterAbove]);
    for (int i = tid; i < kRadixBins; i += kSelThreads) {
      hist_b[i] = __ldcg(&ws.hist1[row * kRadixBins + i]);
    }
    __syncthreads();
    FindThreshold(hist_b, kRadixBins, k_rem, scan, &thr);
    const Threshold t1 = thr;
    const uint32_t n_cand =
        __ldcg(&ws.counters[row * internal::kCountersPerRow + internal::kCounterCandidates]);
    if (t1.take_all || t1.eq <= kTieRankCap) {
      // One pass over the candidates, kResolveItems a thread, all loaded before any is keyed.
      const uint32_t* cand = ws.cand + row * src.len;
      for (uint32_t base = 0; base < n_cand; base += kSelThreads * kResolveItems) {
        uint32_t e[kResolveItems], key_of[kResolveItems], tie[kResolveItems];
        CandidateKeys(
            src, row, cand, n_cand, [&](int j) { return base + j * kSelThreads + tid; }, e, key_of,
            tie);
#pragma unroll
        for (int j = 0; j < kResolveItems; ++j) {
          if (base + j * kSelThreads + tid >= n_cand) continue;
          const uint32_t key = key_of[j];
          const uint32_t d = (key >> 10) & 2047u;
          if (key != 0u && (d > t1.bin || (d == t1.bin && t1.take_all))) {
            mark(tie[j]);
          } else if (d == t1.bin && !t1.take_all) {
            const uint32_t slot = atomicAdd(&n_tie, 1u);
            tie_key[slot] = key;
            tie_tok[slot] = tie[j];
          }
        }
      }
      __syncthreads();
      if (!t1.take_all) {
        // Rank of each on the second digit among them: larger key, or equal key and lower token.
        const uint32_t need = k_rem - t1.gt;
        const uint32_t m = n_tie;
        for (uint32_t i = tid; i < m; i += kSelThreads) {
          const uint32_t ki = tie_key[i], ti = tie_tok[i];
          uint32_t rank = 0;
          for (uint32_t j = 0; j < m; ++j) {
            const uint32_t kj = tie_key[j];
            rank += kj > ki || (kj == ki && tie_tok[j] < ti);
          }
          if (rank < need && ki != 0u) mark(ti);
        }
      }
    } else {
      // Many keys share the first 22 bits: the filter path's last-block resolve, then the marks
      // counted per filter block from the bitmap.
      ResolveCandidates(src, sink, ws, k_rem, row, hist_a, hist_b, scan, &thr);
      __syncthreads();
      for (int64_t w = tid; w < sink.words; w += kSelThreads) {
        const int c = __popc(bitmap[w]);
        if (c != 0) atomicAdd(&marked[w * 32 / chunk], static_cast<uint32_t>(c));
      }
    }
  }
  __syncthreads();
  // Output offsets of the filter blocks (relative to the first chosen slot), in batches.
  uint32_t* blocks = ws.blocks + row * ws.block_stride;
  uint32_t carry = 0;
  for (int b0 = 0; b0 < bpr; b0 += kSelThreads) {
    const int b = b0 + tid;
    const uint32_t c = b < bpr ? __ldcg(&blocks[b]) + marked[b] : 0u;
    uint32_t at = 0, total = 0;
    SelScan(scan).ExclusiveSum(c, at, total);
    if (b < bpr) blocks[b] = carry + at;
    carry += total;
    __syncthreads();
  }
  if (tid == 0) ws.counters[row * internal::kCountersPerRow + internal::kCounterChosen] = carry;
}

// The kSelItems scores from e0 of a row (0 from end on): two 16-byte loads where aligned.
__device__ __forceinline__ void LoadSelRun(const float* scores, int64_t e0, int64_t end,
                                           float (&v)[kSelItems]) {
  if (e0 + kSelItems <= end && reinterpret_cast<uintptr_t>(scores + e0) % 16 == 0) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(scores + e0));
    const float4 b = __ldcg(reinterpret_cast<const float4*>(scores + e0) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < kSelItems; ++j) v[j] = e0 + j < end ? scores[e0 + j] : 0.0f;
}

// The chosen elements of [begin, end) of a row in token order, block-wide: a thread takes
// kSelItems consecutive elements a step (begin is a multiple of kSelChunk, so they share one
// bitmap word), take(e0, v) gives the mask of those chosen among e0 .. e0 + kSelItems - 1 (scores
// v), and emit(i, e, v) receives the range's i-th chosen element. Returns how many.
template <typename Take, typename Emit>
__device__ uint32_t CompactRange(const float* scores, int64_t begin, int64_t end,
                                 SelScan::TempStorage& scan, Take take, Emit emit) {
  uint32_t at = 0;
  for (int64_t base = begin; base < end; base += kSelThreads * kSelItems) {
    const int64_t e0 = base + threadIdx.x * kSelItems;
    float v[kSelItems];
    LoadSelRun(scores, e0, end, v);
    const uint32_t mask = take(e0, v);
    uint32_t start = 0, total = 0;
    SelScan(scan).ExclusiveSum(static_cast<uint32_t>(__popc(mask)), start, total);
#pragma unroll
    for (int j = 0; j < kSelItems; ++j) {
      if (mask & (1u << j)) emit(at + start++, e0 + j, v[j]);
    }
    at += total;
    __syncthreads();
  }
  return at;
}

__global__ void __launch_bounds__(kSelThreads)
    SplitWriteKernel(const SelSource src, const SelSink sink, const SelWs ws, int64_t chunk,
                     const CompactArgs out) {
  __shared__ SelScan::TempStorage scan;
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.y;
  WaitForPrevious();  // the resolve's marks, offsets and threshold

  const uint32_t* c = ws.counters + row * internal::kCountersPerRow;
  const uint32_t thr = __ldcg(&c[internal::kCounterThreshold]);
  const uint32_t bin = thr & 0xffffu;
  const bool take_all = (thr >> 16) != 0u;
  const int64_t chosen = __ldcg(&c[internal::kCounterChosen]);
  // Sink tokens [0, n_s), chosen ones, local tokens [lo_local, n): ascending, each once.
  const int64_t n_s = min(out.n_sink, out.n);
  const int64_t lo_local = max(n_s, out.n - out.n_local);
  const bool with_scores = out.out_scores != nullptr && out.row_scores != nullptr;
  int32_t* indices = out.indices + row * out.cap;
  auto put = [&](int64_t slot, int64_t t, float v) {
    if (slot < out.cap) {
      indices[slot] = static_cast<int32_t>(t);
      if (with_scores) out.out_scores[row * out.cap + slot] = v;
    }
  };

  // This block's chosen elements: above the threshold digit, or on it and marked.
  const int64_t first = n_s + __ldcg(&ws.blocks[row * ws.block_stride + blockIdx.x]);
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(src.len, begin + chunk);
  CompactRange(
      src.scores + row * src.len, begin, end, scan,
      [&](int64_t e0, const float(&v)[kSelItems]) {
        const uint32_t word =
            !take_all && e0 < end ? __ldcg(&sink.bitmap[row * sink.words + (e0 >> 5)]) : 0u;
        uint32_t take = 0;
#pragma unroll
        for (int j = 0; j < kSelItems; ++j) {
          const int64_t e = e0 + j;
          if (e >= end) continue;
          const uint32_t key = DirectKey(src, e, v[j]);
          const uint32_t d = key >> 21;
          if (key != 0u &&
              (d > bin || (d == bin && (take_all || ((word >> (e & 31)) & 1u) != 0u)))) {
            take |= 1u << j;
          }
        }
        return take;
      },
      [&](uint32_t i, int64_t e, float v) { put(first + i, e, v); });
  if (blockIdx.x == 0) {
    for (int64_t t = tid; t < n_s; t += kSelThreads) {
      put(t, t, with_scores ? out.row_scores[row * out.n + t] : 0.0f);
    }
  }
  if (blockIdx.x == gridDim.x - 1) {
    const int64_t first_local = n_s + chosen;
    for (int64_t t = lo_local + tid; t < out.n; t += kSelThreads) {
      put(first_local + (t - lo_local), t, with_scores ? out.row_scores[row * out.n + t] : 0.0f);
    }
    const int64_t total = first_local + (out.n - lo_local);
    const int64_t count = total < out.cap ? total : out.cap;
    for (int64_t j = count + tid; j < out.cap; j += kSelThreads) {
      indices[j] = -1;
      if (out.out_scores != nullptr)
        out.out_scores[row * out.cap + j] = __uint_as_float(0x7fc00000u);
    }
    if (tid == 0 && out.counts != nullptr) out.counts[row] = static_cast<int32_t>(count);
  }
}

// ---------------------------------------------------------------------------------------------
// Short rows (len <= kSmallMaxLen, e.g. the pages of 128K tokens): the whole selection of a row
// in one block, on chip. One block is one SM issuing four warp instructions a cycle, so this
// kernel is bound by its instruction count and by its longest dependent chain, not by memory
// (`%globaltimer` probes on the H100, 8192 pages: every step costs 0.4-2 µs):
// - each thread holds a run of PER consecutive elements in registers (PER a compile-time power
//   of two), loaded 16 bytes at a time where the row allows; all index arithmetic is 32-bit;
// - the row's minimum and maximum key fix the bits every key shares, so the radix passes (8-bit
//   digits, shared-memory histograms) start at the first bit that differs: fewer passes, and the
//   first one does not pile every atomic onto one bin; where an 8-bit first pass would leave more
//   than 32 keys on its threshold bin, the first pass takes 11 bits (BlockTopK's WIDE);
// - once at most 32 keys remain on the threshold prefix, one warp ranks them (key, then lower
//   index) instead of the remaining passes;
// - ties on the threshold key go to the lower index through a block scan, run only when the
//   threshold key has more elements than the selection still needs; otherwise every key at or
//   above the threshold is taken in a loop of its own;
// - block scans are warp shuffles, one barrier and __reduce_add_sync (SmallExclusiveSum);
// - a block scan places the chosen elements' tokens in the ascending output and each chosen
//   element in a shared-memory slot; the block then writes the output in one coalesced pass, the
//   sink and local tokens in the same pass (PutRow, as the chunk selections). (A warp writing the
//   runs of its lanes one after another took 7.6 µs for a local window of 64 single tokens.)
// No global workspace, no memset, no last-block hand-off.

static_assert(kPageTokens == 16, "SmallSelectKernel shifts by log2(kPageTokens)");
constexpr int kSmallThreads = 1024;
constexpr int kSmallMaxPer = 16;
constexpr int64_t kSmallMaxLen = kSmallThreads * kSmallMaxPer;
static_assert(kSmallThreads == 1024, "SmallExclusiveSum: 32 warps");
constexpr int64_t kWideFirstPassMinK = 64;

// Shared memory of SmallExclusiveSum.
struct SmallScanSmem {
  uint32_t warp_total[32];
};

// The inclusive prefix sum of v over the lanes of a full warp.
__device__ __forceinline__ uint32_t WarpInclusiveSum(uint32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t o = __shfl_sync(0xffffffffu, v, lane >= off ? lane - off : 0);
    if (lane >= off) v += o;
  }
  return v;
}

// Exclusive prefix sum of v over the block of kSmallThreads (and the block's total): warp scans by
// shuffles, one barrier, then each warp adds the totals of the warps before it in one
// __reduce_add_sync. (CUB's BlockScan took ~0.3 µs more a call here, raking; more still with warp
// scans.) Two calls on the same shared memory need a barrier between them.
__device__ __forceinline__ uint32_t SmallExclusiveSum(uint32_t v, SmallScanSmem& s,
                                                      uint32_t& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t incl = WarpInclusiveSum(v);
  if (lane == 31) s.warp_total[warp] = incl;
  __syncthreads();
  const uint32_t t = s.warp_total[lane];
  total = __reduce_add_sync(0xffffffffu, t);
  return __reduce_add_sync(0xffffffffu, lane < warp ? t : 0u) + incl - v;
}

// Writes value(j) for each position j this thread took (bit j of `take`) to dst, in the block's
// position order (a block scan), and returns how many the block took. dst is read after a barrier.
template <int PER, typename Value>
__device__ __forceinline__ uint32_t PackTaken(uint32_t take, SmallScanSmem& scan, uint32_t* dst,
                                              Value value) {
  uint32_t count = 0;
  uint32_t at = SmallExclusiveSum(static_cast<uint32_t>(__popc(take)), scan, count);
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    if ((take >> j) & 1u) dst[at++] = value(j);
  }
  return count;
}

// v = row[at .. at + PER) (0 from len on), 16 bytes at a time when `vec` says the row's base is
// 16-byte aligned and len and `at` are multiples of 4.
template <int PER>
__device__ __forceinline__ void LoadRun(const float* row, int at, int len, bool vec,
                                        float (&v)[PER]) {
  if (PER % 4 == 0 && vec) {
#pragma unroll
    for (int j = 0; j < PER; j += 4) {
      const float4 x = at + j < len ? *reinterpret_cast<const float4*>(row + at + j)
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      v[j] = x.x;
      v[j + 1] = x.y;
      v[j + 2] = x.z;
      v[j + 3] = x.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < PER; ++j) v[j] = at + j < len ? row[at + j] : 0.0f;
  }
}

// Shared memory of BlockTopK.
struct TopKSmem {
  SmallScanSmem scan;
  uint32_t hist[2][256];
  uint32_t wide[2048], wsum[32];  // the 11-bit first pass (WIDE)
  uint32_t nz[32], hi[32], lo[32];
  uint32_t digit, above, on, count;
  uint32_t ck[32], ci[32];  // the last candidates: keys, positions
};

// The k_sel largest of the block's keys (0: takes no part), larger key first, then lower
// position; thread tid holds positions tid * PER .. tid * PER + PER - 1 (PER * kSmallThreads
// covers them). Block-wide; two calls on the same shared memory need a barrier between them.
// \tparam EARLY it may stop early: as soon as at most max_keep (>= k_sel) keys are at or above a
// radix prefix it takes all of them.
// \tparam WIDE the first radix pass takes 11 bits (2048 bins, a scan in two levels) instead of 8:
// one barrier more, but where the 8-bit pass leaves more than 32 keys on the threshold bin (a
// large k_sel over thousands of keys) it saves the second pass.
struct BlockTake {
  uint32_t take;   // the thread's take mask: bit j, position tid * PER + j chosen
  uint32_t floor;  // no key below it is chosen, and at least min(k_sel, keys) keys are >= it
};
template <int PER, bool EARLY = false, bool WIDE = false>
__device__ BlockTake BlockTopK(const uint32_t (&key)[PER], uint32_t k_sel, TopKSmem& sm,
                               uint32_t max_keep = 0) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int e0 = tid * PER;
  // Count, maximum and minimum of the keys that take part.
  uint32_t nz = 0, hi = 0u, lo = 0xffffffffu;
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    nz += key[j] != 0u ? 1u : 0u;
    hi = max(hi, key[j]);
    lo = min(lo, key[j] != 0u ? key[j] : 0xffffffffu);
  }
  nz = __reduce_add_sync(0xffffffffu, nz);
  hi = __reduce_max_sync(0xffffffffu, hi);
  lo = __reduce_min_sync(0xffffffffu, lo);
  if (lane == 0) {
    sm.nz[warp] = nz;
    sm.hi[warp] = hi;
    sm.lo[warp] = lo;
  }
  if (WIDE) {
    sm.wide[tid] = 0u;
    sm.wide[tid + kSmallThreads] = 0u;
  } else if (tid < 256) {
    sm.hist[0][tid] = 0u;
  }
  if (tid == 0) sm.count = 0u;
  __syncthreads();
  const uint32_t total = __reduce_add_sync(0xffffffffu, sm.nz[lane]);
  hi = __reduce_max_sync(0xffffffffu, sm.hi[lane]);
  lo = __reduce_min_sync(0xffffffffu, sm.lo[lane]);
  uint32_t k_rem = min(k_sel, total);
  const bool all = k_rem == total || (EARLY && total <= max_keep);  // every element that takes part
  // The threshold key (above it chosen; on it the k_rem lowest indices) and how many have it.
  uint32_t prefix = hi, on = total;
  bool early = false;  // stopped at max_keep: every key >= prefix chosen
  if (!all && hi != lo) {
    const int top = 31 - __clz(hi ^ lo);  // the highest bit that differs
    uint32_t mask = ~((2u << top) - 1u);  // the bits above it, which every key shares
    prefix = hi & mask;
    for (int h = top, pass = 0; h >= 0; ++pass) {
      const bool wide = WIDE && pass == 0;
      const int l = max(h - (wide ? 10 : 7), 0);
      const uint32_t dmask = (2u << (h - l)) - 1u;
      uint32_t* bins = wide ? sm.wide : sm.hist[pass & 1];
      // The other buffer's last reader (warp 0's scan) finished before the last barrier.
      if (tid < 256) sm.hist[(pass + 1) & 1][tid] = 0u;
#pragma unroll
      for (int j = 0; j < PER; ++j) {
        if (key[j] != 0u && (key[j] & mask) == prefix) atomicAdd(&bins[(key[j] >> l) & dmask], 1u);
      }
      __syncthreads();
      if (wide) {
        // Warp w sums the 64 bins 2047 - 64 w .. 1984 - 64 w; warp 0 finds the group, then the bin.
        const int top_bin = 2047 - 64 * warp - 2 * lane;
        const uint32_t wsum = __reduce_add_sync(0xffffffffu, bins[top_bin] + bins[top_bin - 1]);
        if (lane == 0) sm.wsum[warp] = wsum;
        __syncthreads();
        if (warp == 0) {
          const uint32_t g = sm.wsum[lane];
          const uint32_t incl = WarpInclusiveSum(g);
          const int grp = __ffs(__ballot_sync(0xffffffffu, incl >= k_rem)) - 1;
          const uint32_t before_grp = __shfl_sync(0xffffffffu, incl - g, grp);
          const int b = 2047 - 64 * grp - 2 * lane;
          const uint32_t c0 = bins[b], c1 = bins[b - 1];
          const uint32_t in2 = WarpInclusiveSum(c0 + c1);
          const uint32_t acc = before_grp + in2 - c0 - c1;
          if (acc < k_rem && acc + c0 + c1 >= k_rem) {
            const bool first = acc + c0 >= k_rem;
            sm.digit = static_cast<uint32_t>(first ? b : b - 1);
            sm.above = first ? acc : acc + c0;
            sm.on = first ? c0 : c1;
          }
        }
      } else if (warp == 0) {
        // Lane l holds bins 255 - 8l .. 248 - 8l (from the top); inclusive scan over lanes.
        uint32_t c[8];
        uint32_t sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          c[j] = bins[255 - 8 * lane - j];
          sum += c[j];
        }
        const uint32_t incl = WarpInclusiveSum(sum);
        uint32_t acc = incl - sum;
        if (acc < k_rem && incl >= k_rem) {
          for (int j = 0; j < 8; ++j) {
            if (acc + c[j] >= k_rem) {
              sm.digit = static_cast<uint32_t>(255 - 8 * lane - j);
              sm.above = acc;
              sm.on = c[j];
              break;
            }
            acc += c[j];
          }
        }
      }
      __syncthreads();
      k_rem -= sm.above;
      on = sm.on;
      prefix |= sm.digit << l;
      mask |= dmask << l;
      h = l - 1;
      if (EARLY && min(k_sel, total) - k_rem + on <= max_keep) {
        early = true;
        break;
      }
      if (l > 0 && on <= 32) {
        // At most 32 keys left on the prefix: one warp ranks them (larger key first, then lower
        // index) instead of the remaining passes.
#pragma unroll
        for (int j = 0; j < PER; ++j) {
          if (key[j] != 0u && (key[j] & mask) == prefix) {
            const uint32_t at = atomicAdd(&sm.count, 1u);
            sm.ck[at] = key[j];
            sm.ci[at] = static_cast<uint32_t>(e0 + j);
          }
        }
        __syncthreads();
        if (warp == 0) {
          const bool valid = static_cast<uint32_t>(lane) < on;
          const uint32_t kl = valid ? sm.ck[lane] : 0u, il = valid ? sm.ci[lane] : 0xffffffffu;
          uint32_t before = 0;
#pragma unroll
          for (int m = 0; m < 32; ++m) {
            const uint32_t km = __shfl_sync(0xffffffffu, kl, m);
            const uint32_t im = __shfl_sync(0xffffffffu, il, m);
            before += static_cast<uint32_t>(m) < on && (km > kl || (km == kl && im < il)) ? 1u : 0u;
          }
          const uint32_t hit = __ballot_sync(0xffffffffu, valid && before == k_rem - 1);
          const uint32_t thr = __shfl_sync(0xffffffffu, kl, __ffs(hit) - 1);
          const uint32_t gt = __popc(__ballot_sync(0xffffffffu, valid && kl > thr));
          const uint32_t eqc = __popc(__ballot_sync(0xffffffffu, valid && kl == thr));
          if (lane == 0) {
            sm.digit = thr;
            sm.above = gt;
            sm.on = eqc;
          }
        }
        __syncthreads();
        prefix = sm.digit;
        k_rem -= sm.above;
        on = sm.on;
        break;
      }
    }
  }
  const uint32_t floor = all ? 1u : prefix;
  uint32_t take = 0;
  if (!all && !early && on > k_rem) {
    // Not every key on the threshold is taken: the k_rem lowest positions among them.
    uint32_t eq = 0, all_eq = 0;
#pragma unroll
    for (int j = 0; j < PER; ++j) eq += key[j] == prefix ? 1u : 0u;
    uint32_t rank = SmallExclusiveSum(eq, sm.scan, all_eq);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const bool t = key[j] > prefix || (key[j] == prefix && rank++ < k_rem);
      take |= t ? 1u << j : 0u;
    }
  } else {
    // Every key at or above the floor (the common case, kept apart: the loop above, interleaved
    // with it, cost 1.2 µs at 8 keys a thread).
#pragma unroll
    for (int j = 0; j < PER; ++j) take |= key[j] >= floor ? 1u << j : 0u;
  }
  return BlockTake{take, floor};
}

// Writes row `row` of the output in one pass of the block over its slots: the sink tokens, the
// `chosen` selected ones (middle(i): the i-th, from shared memory), the local tokens, -1 (score
// NaN) in the slots left, then the count; scores copied where out.row_scores is set. One loop:
// after a one-block selection this code runs once a block, and each separate loop (sink, middle,
// local, padding) cost its first warp 600-900 cycles (clock64 stamps, page mode), most likely
// instruction fetch; one score load a slot.
template <typename Middle>
__device__ __forceinline__ void PutRow(const CompactArgs& out, int64_t row, int chosen,
                                       Middle middle) {
  const int n = static_cast<int>(out.n), cap = static_cast<int>(out.cap);
  const int n_sink = static_cast<int>(min(out.n_sink, out.n));
  const int pin_lo = static_cast<int>(max(out.n_sink, out.n - out.n_local));
  const int loc_at = n_sink + chosen;
  const int count = min(loc_at + max(0, n - pin_lo), cap);
  int32_t* indices = out.indices + row * out.cap;
  float* scores = out.out_scores != nullptr ? out.out_scores + row * out.cap : nullptr;
  const float* row_scores = out.row_scores != nullptr ? out.row_scores + row * out.n : nullptr;
  for (int p = threadIdx.x; p < cap; p += blockDim.x) {
    const int t = p < n_sink   ? p
                  : p < loc_at ? middle(p - n_sink)
                  : p < count  ? pin_lo + (p - loc_at)
                               : -1;
    indices[p] = t;
    if (t < 0 && scores != nullptr) scores[p] = __uint_as_float(0x7fc00000u);
    if (t >= 0 && row_scores != nullptr && scores != nullptr) scores[p] = row_scores[t];
  }
  if (threadIdx.x == 0 && out.counts != nullptr) out.counts[row] = count;
}

// \tparam PER elements a thread (PER * kSmallThreads >= len).
// \param pages elements are pages of 16 tokens (kPages), else tokens (or plain elements).
// \tparam WIDE BlockTopK's 11-bit first pass.
template <int PER, bool WIDE>
__global__ void __launch_bounds__(kSmallThreads, 1)
    SmallSelectKernel(const SelSource src, uint32_t k_sel, bool pages, const CompactArgs out) {
  __shared__ TopKSmem sm;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* slot = reinterpret_cast<uint16_t*>(smem);  // min(k_sel, len) + 1: see below
  __shared__ SmallScanSmem scan_out;
  __shared__ uint32_t head;  // the middle's tokens of a chosen element that starts in the sink
  const int tid = threadIdx.x;
  if (tid == 0) head = 0;
  const int len = static_cast<int>(src.len);
  const int n_sink = static_cast<int>(min(out.n_sink, out.n));
  const int mid_hi = static_cast<int>(min(max(out.n_sink, out.n - out.n_local), out.n));
  const int unit_log2 = pages ? 4 : 0;  // kPageTokens == 16
  const int unit = 1 << unit_log2;
  // Elements that take part: [f_lo, f_hi) (the others hold only sink / local tokens).
  int f_lo = 0, f_hi = len;
  if (src.kind != SrcKind::kPlain) {
    const int free_lo = static_cast<int>(min(src.n_sink, src.n));
    const int free_hi = static_cast<int>(max(src.n - src.n_local, int64_t{0}));
    f_lo = free_lo >> unit_log2;
    f_hi = free_lo < free_hi ? (free_hi + unit - 1) >> unit_log2 : f_lo;
  }
  const int e0 = tid * PER;
  const float* scores = src.scores + blockIdx.x * src.len;
  WaitForPrevious();  // the scores (launched by LaunchDependent)
  float v[PER];
  LoadRun<PER>(scores, e0, len,
               len % 4 == 0 && (reinterpret_cast<uintptr_t>(src.scores) & 15u) == 0, v);
  uint32_t key[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    key[j] = e0 + j >= f_lo && e0 + j < f_hi ? internal::OrderKey(v[j]) : 0u;
  }
  const uint32_t take = BlockTopK<PER, false, WIDE>(key, k_sel, sm).take;

  // The output is the sink tokens, the middle (the chosen elements' tokens in [n_sink, mid_hi):
  // an element may straddle either end) and the local tokens. The middle goes through shared
  // memory, so that the block writes it in one coalesced pass: its positions are an exclusive sum
  // of the threads' token counts; a chosen element that starts in the sink leaves `head` tokens
  // at the front, and every other chosen element starts at a position p = head + unit * i and
  // takes slot p >> unit_log2 = i (i < k_sel).
  auto in_middle = [&](int e) {
    const int a = e << unit_log2;
    return max(0, min(a + unit, mid_hi) - max(a, n_sink));
  };
  const bool whole = e0 << unit_log2 >= n_sink && (e0 + PER) << unit_log2 <= mid_hi;
  uint32_t mine = 0;
  if (whole) {
    mine = static_cast<uint32_t>(__popc(take)) << unit_log2;
  } else {
#pragma unroll
    for (int j = 0; j < PER; ++j) mine += (take >> j) & 1u ? in_middle(e0 + j) : 0;
  }
  uint32_t chosen = 0;
  uint32_t at = SmallExclusiveSum(mine, scan_out, chosen);
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    if ((take >> j) & 1u) {
      const int e = e0 + j;
      if (e << unit_log2 < n_sink) {
        head = in_middle(e);
      } else {
        slot[at >> unit_log2] = static_cast<uint16_t>(e);
      }
      at += whole ? unit : in_middle(e);
    }
  }
  __syncthreads();
  const int h = static_cast<int>(head);
  PutRow(out, blockIdx.x, static_cast<int>(chosen), [&](int p) {
    const int d = p - h;  // h < unit: the offset in the element, for p >= h
    return p < h ? n_sink + p : slot[d >> unit_log2] << unit_log2 | (d & (unit - 1));
  });
}

// Launches SmallSelectKernel with the smallest PER that covers the row.
absl::Status LaunchSmallSelect(const SelSource& src, int64_t rows, int64_t k_sel, bool pages,
                               const CompactArgs& out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  const uint32_t k = static_cast<uint32_t>(k_sel);
  const int64_t per = (src.len + kSmallThreads - 1) / kSmallThreads;
  // The 11-bit first pass pays where the 8-bit one leaves more than 32 keys on the threshold bin
  // (at 8192 pages, k_sel 256 took two 8-bit passes and takes one 11-bit pass; k_sel 16 takes one
  // 8-bit pass); kWideFirstPassMinK lies between.
  const bool wide = k_sel >= kWideFirstPassMinK && per >= 8;
  const size_t slot_bytes = (std::min(k_sel, src.len) + 1) * sizeof(uint16_t);
  auto kernel = per <= 1   ? SmallSelectKernel<1, false>
                : per <= 2 ? SmallSelectKernel<2, false>
                : per <= 4 ? SmallSelectKernel<4, false>
                : per <= 8 ? (wide ? SmallSelectKernel<8, true> : SmallSelectKernel<8, false>)
                           : (wide ? SmallSelectKernel<16, true> : SmallSelectKernel<16, false>);
  // A dependent launch: the selection's blocks start as the scorer's SMs free up.
  ROPEKV_CUDA_RETURN_IF_ERROR(
      LaunchDependent(kernel, grid, dim3(kSmallThreads), slot_bytes, stream, src, k, pages, out));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Exact selection over long rows from tile maxima (ChunkSelectKernel): rows of more than
// kSmallMaxLen tokens scored on tensor cores (any reduction; a row is a KV head or, per query
// head, a query head). The scorer writes, per 16-token tile and row, the largest order key of its
// tokens that take part (0: none). One block a row then, on chip:
// 1. takes the k_sel largest chunks of `pool` tiles (chunk key, then lower chunk), or, where the
//    radix passes get there first, every chunk at or above a key T that at least k_sel chunks
//    reach, as long as step 2 holds them. Every token of the row's top k_sel lies in them: a
//    token outside ranks below each chosen chunk's maximum (a larger key, or the same key at a
//    lower index), and there are at least k_sel of those;
// 2. takes the top k_sel of the tokens of those chunks whose key is at least the k_sel-th chunk
//    key, or T (a token below it ranks below k_sel chunk maxima), laid out in token order, so
//    that ties go to the lower token as in the other paths;
// 3. writes the sink tokens, the selection and the local tokens, ascending.
// Two one-block selections (BlockTopK) over len / (16 pool) and k_sel * 16 pool keys replace the
// multi-block threshold filter over len.

static_assert(kSmallThreads == internal::kOneBlockThreads &&
                  kSmallMaxLen == internal::kOneBlockMaxKeys &&
                  kTcTileRows == internal::kScoreTileTokens,
              "internal::PlanChunkSelect plans for these kernels");
using internal::ChunkPlan;

// The keys of tiles t .. t + W - 1 (W 2 or 4, t a multiple of W; 0 past `tiles`), in one load
// where `vec` says the row is 4W-byte aligned.
template <int W>
__device__ __forceinline__ void LoadTileKeys(const uint32_t* ck, int t, int tiles, bool vec,
                                             uint32_t (&m)[W]) {
  if (vec && t + W - 1 < tiles) {
    if constexpr (W == 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(ck + t);
      m[0] = v.x;
      m[1] = v.y;
      m[2] = v.z;
      m[3] = v.w;
    } else {
      const uint2 v = *reinterpret_cast<const uint2*>(ck + t);
      m[0] = v.x;
      m[1] = v.y;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < W; ++i) m[i] = t + i < tiles ? ck[t + i] : 0u;
}

// The PER1 consecutive tile keys of thread tid from ck (one row's, `tiles` of them; 0 past the
// end), in 8- or 16-byte loads where vec2 / vec4 allow.
template <int PER1>
__device__ __forceinline__ void LoadTileRun(const uint32_t* ck, int tid, int tiles, bool vec2,
                                            bool vec4, uint32_t (&key1)[PER1]) {
  constexpr int kW = PER1 % 4 == 0 ? 4 : 2;
#pragma unroll
  for (int j = 0; j < PER1; j += kW) {
    uint32_t m[kW];
    LoadTileKeys<kW>(ck, tid * PER1 + j, tiles, kW == 4 ? vec4 : vec2, m);
#pragma unroll
    for (int i = 0; i < kW; ++i) key1[j + i] = m[i];
  }
}

// Step 1 of the chunk selections: the row's chunk keys into registers, then the chosen chunks
// (BlockTopK; EARLY: every chunk at or above a radix prefix once at most max_keep are), ascending
// into s_chunk. Returns how many, and BlockTake's floor.
struct ChosenChunks {
  uint32_t count, floor;
};
template <int PER1, bool EARLY>
__device__ ChosenChunks ChooseChunks(const uint32_t* chunk_keys, int64_t n_tiles, int pool,
                                     uint32_t k_sel, uint32_t max_keep, TopKSmem& sm,
                                     SmallScanSmem& scan, uint32_t* s_chunk) {
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int tiles = static_cast<int>(n_tiles);
  // A thread's PER1 chunks are PER1 * pool consecutive tiles, their keys read as independent
  // 16-byte loads (8-byte for pools of 2, or PER1 2 at pool 1; a round of PER1 of them, one a
  // chunk, for pools of 4 or more). Staging them in shared memory to pool them with shuffles cost
  // 2.5-3.4 µs at 128K; reading a thread's consecutive words there was an 8-way bank conflict.
  const uint32_t* ck = chunk_keys + row * n_tiles;
  const uintptr_t base = reinterpret_cast<uintptr_t>(chunk_keys);
  const bool vec2 = n_tiles % 2 == 0 && (base & 7u) == 0;
  const bool vec4 = n_tiles % 4 == 0 && (base & 15u) == 0;
  uint32_t key1[PER1];
  if (pool == 1) {
    LoadTileRun<PER1>(ck, tid, tiles, vec2, vec4, key1);
  } else {
#pragma unroll
    for (int j = 0; j < PER1; ++j) key1[j] = 0u;
    if (pool == 2) {
#pragma unroll
      for (int j = 0; j < PER1; ++j) {
        uint32_t m[2];
        LoadTileKeys<2>(ck, (tid * PER1 + j) * 2, tiles, vec2, m);
        key1[j] = max(m[0], m[1]);
      }
    } else {
      for (int q = 0; q < pool; q += 4) {
#pragma unroll
        for (int j = 0; j < PER1; ++j) {
          uint32_t m[4];
          LoadTileKeys<4>(ck, (tid * PER1 + j) * pool + q, tiles, vec4, m);
          key1[j] = max(key1[j], max(max(m[0], m[1]), max(m[2], m[3])));
        }
      }
    }
  }
  const BlockTake chosen = BlockTopK<PER1, EARLY, (PER1 >= 8)>(key1, k_sel, sm, max_keep);
  const uint32_t count = PackTaken<PER1>(
      chosen.take, scan, s_chunk, [&](int j) { return static_cast<uint32_t>(tid * PER1 + j); });
  __syncthreads();
  return ChosenChunks{count, chosen.floor};
}

// Step 2's run of a thread: the PER tokens from slot e0 of the chosen chunks' tokens laid end to
// end (one chunk: chunk_tokens is a power of two >= 16, e0 a multiple of PER <= 16), their keys
// where they take part (not pinned, at or above the floor), else 0. Returns the run's first token
// (out.n past the chosen chunks' tokens). vec: the score rows are 16-byte aligned.
template <int PER>
__device__ int ChosenTokenKeys(const float* row_scores, const uint32_t* s_chunk,
                               const ChosenChunks& chunks, int chunk_tokens, int e0,
                               const CompactArgs& out, bool vec, uint32_t (&key)[PER]) {
  const int n = static_cast<int>(out.n);
  const int c_at = e0 >> (__ffs(chunk_tokens) - 1);
  const int t0 = c_at < static_cast<int>(chunks.count)
                     ? static_cast<int>(s_chunk[c_at]) * chunk_tokens + (e0 & (chunk_tokens - 1))
                     : n;
  float v[PER];
  LoadRun<PER>(row_scores, t0, n, vec, v);  // t0 is a multiple of 4
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    const int t = t0 + j;
    const uint32_t k = internal::OrderKey(v[j]);
    key[j] = t < n && !internal::IsPinned(t, out.n, out.n_sink, out.n_local) && k >= chunks.floor
                 ? k
                 : 0u;
  }
  return t0;
}

// \tparam PER1 chunks a thread (step 1). \tparam PER2 tokens a thread (step 2). (One block an SM
// said outright: without it ptxas holds <2, 4> to 32 registers with 12 bytes of spills, two
// blocks an SM; that made 512 rows of 32K 5% faster and 32 rows 2-3 µs slower, RESULTS run 11.)
template <int PER1, int PER2>
__global__ void __launch_bounds__(kSmallThreads, 1)
    ChunkSelectKernel(const float* scores, const uint32_t* chunk_keys, int64_t n_tiles, int pool,
                      uint32_t k_sel, const CompactArgs out) {
  __shared__ TopKSmem sm;
  __shared__ SmallScanSmem scan_out;
  __shared__ uint32_t s_chunk[kSmallMaxLen / kTcTileRows];  // chosen chunks, ascending
  const int64_t row = blockIdx.x;
  const int chunk_tokens = pool * kTcTileRows;
  WaitForPrevious();  // the scores and chunk keys (launched by LaunchDependent)

  // 1. The chosen chunks.
  // Any chunks the second selection holds will do, as long as all chunks >= the floor are in.
  const uint32_t max_keep = static_cast<uint32_t>(PER2 * kSmallThreads / chunk_tokens);
  const ChosenChunks chunks =
      ChooseChunks<PER1, true>(chunk_keys, n_tiles, pool, k_sel, max_keep, sm, scan_out, s_chunk);

  // 2. The tokens of the chosen chunks.
  const bool vec = out.n % 4 == 0 && (reinterpret_cast<uintptr_t>(scores) & 15u) == 0;
  uint32_t key2[PER2];
  const int t0 = ChosenTokenKeys<PER2>(scores + row * out.n, s_chunk, chunks, chunk_tokens,
                                       threadIdx.x * PER2, out, vec, key2);
  const uint32_t take2 = BlockTopK<PER2>(key2, k_sel, sm).take;

  // 3. Sink tokens, the selection (in token order, through s_chunk: k_sel <= its 1024 entries,
  // free once BlockTopK has run), local tokens.
  const uint32_t chosen = PackTaken<PER2>(take2, scan_out, s_chunk,
                                          [&](int j) { return static_cast<uint32_t>(t0 + j); });
  __syncthreads();
  PutRow(out, row, static_cast<int>(chosen), [&](int p) { return static_cast<int>(s_chunk[p]); });
}

template <int PER1, int PER2>
absl::Status LaunchChunkKernel(const ChunkPlan& cp, const float* scores, const uint32_t* chunk_keys,
                               int64_t rows, int64_t n_tiles, uint32_t k_sel,
                               const CompactArgs& out, cudaStream_t stream) {
  // A dependent launch: the selection's blocks start as the scorer's SMs free up.
  ROPEKV_CUDA_RETURN_IF_ERROR(LaunchDependent(
      ChunkSelectKernel<PER1, PER2>, dim3(static_cast<unsigned>(rows)), dim3(kSmallThreads), 0,
      stream, scores, chunk_keys, n_tiles, cp.pool, k_sel, out));
  return absl::OkStatus();
}

template <int PER1>
absl::Status LaunchChunkPer2(const ChunkPlan& cp, const float* scores, const uint32_t* chunk_keys,
                             int64_t rows, int64_t n_tiles, uint32_t k_sel, const CompactArgs& out,
                             cudaStream_t stream) {
  switch (cp.per2) {
    case 4:
      return LaunchChunkKernel<PER1, 4>(cp, scores, chunk_keys, rows, n_tiles, k_sel, out, stream);
    case 8:
      return LaunchChunkKernel<PER1, 8>(cp, scores, chunk_keys, rows, n_tiles, k_sel, out, stream);
    default:
      return LaunchChunkKernel<PER1, 16>(cp, scores, chunk_keys, rows, n_tiles, k_sel, out, stream);
  }
}

// ---------------------------------------------------------------------------------------------
// Exact selection over long rows for larger k (ChunkRoundsKernel): where the chosen chunks' tokens
// exceed one block's registers (k_sel x 16 x pool > 16384; k_sel <= kRoundsMaxK and the chosen
// chunks at most a quarter of the row, or half with many rows or large groups:
// internal::PlanChunkSelect). One
// block a row:
// 1. the k_sel largest chunks exactly (ChooseChunks, as ChunkSelectKernel's step 1);
// 2. their tokens, streamed in rounds of kRoundTokens (a thread's run in one chunk): those at or
//    above the floor are appended to a candidate list in shared memory, in token order; before a
//    round that might not fit, the list keeps only its top k_sel (KeepTop: BlockTopK, compacted in
//    place, order kept). Ties go to the lower token as in the other paths: the list is in token
//    order, and BlockTopK prefers the lower position;
// 3. the list's top k_sel, with the sink and local tokens, ascending.
using internal::kRoundsMaxK;
constexpr int kRoundPer = 8;
constexpr int kRoundTokens = kRoundPer * kSmallThreads;
constexpr int kCandCap = static_cast<int>(kSmallMaxLen);  // BlockTopK's reach
static_assert(kRoundsMaxK + kRoundTokens <= kCandCap, "KeepTop must leave room for a round");

// Keeps the top k_sel of the `count` candidates (keys c_key, tokens c_tok), in their order, at the
// front of the list; returns how many. Block-wide.
// \tparam PER the list's slots a thread: count <= PER * kSmallThreads.
template <int PER = kSmallMaxPer>
__device__ uint32_t KeepTop(uint32_t* c_key, int32_t* c_tok, uint32_t count, uint32_t k_sel,
                            TopKSmem& sm, SmallScanSmem& scan) {
  const int e0 = threadIdx.x * PER;
  uint32_t key[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) key[j] = e0 + j < static_cast<int>(count) ? c_key[e0 + j] : 0u;
  const uint32_t take = BlockTopK<PER>(key, k_sel, sm).take;
  int32_t tok[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j) tok[j] = (take >> j) & 1u ? c_tok[e0 + j] : 0;
  // Every thread has read its entries before the scan's barrier; entries only move forward.
  uint32_t kept = 0;
  uint32_t at = SmallExclusiveSum(static_cast<uint32_t>(__popc(take)), scan, kept);
#pragma unroll
  for (int j = 0; j < PER; ++j) {
    if ((take >> j) & 1u) {
      c_key[at] = key[j];
      c_tok[at] = tok[j];
      ++at;
    }
  }
  __syncthreads();
  return kept;
}

// \tparam PER1 chunks a thread (step 1).
template <int PER1>
__global__ void __launch_bounds__(kSmallThreads)
    ChunkRoundsKernel(const float* scores, const uint32_t* chunk_keys, int64_t n_tiles, int pool,
                      uint32_t k_sel, const CompactArgs out) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* c_key = reinterpret_cast<uint32_t*>(smem);            // [kCandCap]
  int32_t* c_tok = reinterpret_cast<int32_t*>(c_key + kCandCap);  // [kCandCap]
  __shared__ TopKSmem sm;
  __shared__ SmallScanSmem scan_out;
  __shared__ uint32_t s_chunk[kRoundsMaxK];  // chosen chunks, ascending
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int chunk_tokens = pool * kTcTileRows;  // a power of two
  WaitForPrevious();  // the scores and chunk keys (launched by LaunchDependent)

  // 1. Exactly the k_sel largest chunks.
  const ChosenChunks chunks =
      ChooseChunks<PER1, false>(chunk_keys, n_tiles, pool, k_sel, 0, sm, scan_out, s_chunk);

  // 2. Their tokens at or above the floor, round by round.
  const int total = static_cast<int>(chunks.count) * chunk_tokens;
  const float* row_scores = scores + row * out.n;
  const bool vec = out.n % 4 == 0 && (reinterpret_cast<uintptr_t>(scores) & 15u) == 0;
  uint32_t count = 0;
  for (int base = 0; base < total; base += kRoundTokens) {
    if (count + kRoundTokens > kCandCap) count = KeepTop(c_key, c_tok, count, k_sel, sm, scan_out);
    uint32_t key[kRoundPer];
    const int t0 = ChosenTokenKeys<kRoundPer>(row_scores, s_chunk, chunks, chunk_tokens,
                                              base + tid * kRoundPer, out, vec, key);
    uint32_t mine = 0;
#pragma unroll
    for (int j = 0; j < kRoundPer; ++j) mine += key[j] != 0u ? 1u : 0u;
    uint32_t added = 0;
    uint32_t at = count + SmallExclusiveSum(mine, scan_out, added);
#pragma unroll
    for (int j = 0; j < kRoundPer; ++j) {
      if (key[j] != 0u) {
        c_key[at] = key[j];
        c_tok[at] = t0 + j;
        ++at;
      }
    }
    count += added;
    __syncthreads();
  }
  count = KeepTop(c_key, c_tok, count, k_sel, sm, scan_out);

  // 3. Sink tokens, the selection, local tokens.
  PutRow(out, row, static_cast<int>(count), [&](int p) { return c_tok[p]; });
}

template <int PER1>
absl::Status LaunchChunkRounds(const float* scores, const uint32_t* chunk_keys, int64_t rows,
                               int64_t n_tiles, int pool, uint32_t k_sel, const CompactArgs& out,
                               cudaStream_t stream) {
  constexpr auto kKernel = ChunkRoundsKernel<PER1>;
  constexpr size_t kSmem = static_cast<size_t>(kCandCap) * 8;
  ROPEKV_TOPK_RETURN_IF_ERROR(EnsureSmem<kKernel>(kSmem));
  // A dependent launch: the selection's blocks start as the scorer's SMs free up.
  ROPEKV_CUDA_RETURN_IF_ERROR(LaunchDependent(kKernel, dim3(static_cast<unsigned>(rows)),
                                              dim3(kSmallThreads), kSmem, stream, scores,
                                              chunk_keys, n_tiles, pool, k_sel, out));
  return absl::OkStatus();
}

// Elements a block of one selection takes: kSelChunk, or a multiple of it where rows of that many
// would make more than kSelBlocks blocks (FilterKernel holds two blocks an SM: about two waves on
// an H100). A block's fixed cost (its shared histogram, the threshold scan, the hand-off to its
// row's last block) is paid per block: at 512 rows of 32K tokens and k 4096, 4096 blocks of one
// step took 61 + 233 µs (HistKernel + FilterKernel), 512 blocks of eight 51 + 172 µs.
constexpr int64_t kSelBlocks = 512;
int64_t SelChunk(int64_t len, int64_t rows) {
  const int64_t blocks = rows * ((len + kSelChunk - 1) / kSelChunk);
  return std::min(len, kSelChunk * std::max<int64_t>(1, blocks / kSelBlocks));
}

// ---------------------------------------------------------------------------------------------
// The floor selection: exact rows of 16K-256K tokens (at most kFloorMaxTiles tiles) scored on
// tensor cores with their tile maxima, for k up to kRoundsMaxK where the chunk selection does not
// apply (k 4096 at 128K tokens). The k-th largest tile maximum is a floor: k tiles hold a token at
// or above it, so the row's k-th largest token is too, and no chosen token lies below it. Three
// grids, no workspace to zero:
// FloorKernel        one block a row: the floor, BlockTopK over the row's tile keys
// FloorFilterKernel  every block (SelChunk's elements): its tokens at or above the floor, in token
//                    order by one block scan, to its own stretch of the candidate list, and their
//                    count
// FloorSelectKernel  one block a row: the row's candidates in token order (a block's stretch found
//                    by a search over the counts' prefix sums), rounds of kRoundTokens into a
//                    shared-memory list kept to its top k (KeepTop, as ChunkRoundsKernel); sink,
//                    selection and local tokens written by PutRow
// The candidates are the tokens at or above the floor: ~4% of a row at k 4096 over 8192 tiles of
// independent scores, one round; any number is correct (more rounds). Ties go to the lower token:
// the list is in token order and BlockTopK prefers the lower position.

template <int PER1>
__global__ void __launch_bounds__(kSmallThreads, 1)
    FloorKernel(const uint32_t* tile_keys, int64_t n_tiles, uint32_t k_sel, uint32_t* counters) {
  __shared__ TopKSmem sm;
  const int64_t row = blockIdx.x;
  WaitForPrevious();  // the tile keys
  AllowDependents();
  const uintptr_t base = reinterpret_cast<uintptr_t>(tile_keys);
  uint32_t key1[PER1];
  LoadTileRun<PER1>(tile_keys + row * n_tiles, threadIdx.x, static_cast<int>(n_tiles),
                    n_tiles % 2 == 0 && (base & 7u) == 0, n_tiles % 4 == 0 && (base & 15u) == 0,
                    key1);
  const BlockTake t = BlockTopK<PER1, false, (PER1 >= 8)>(key1, k_sel, sm);
  if (threadIdx.x == 0)
    counters[row * internal::kCountersPerRow + internal::kCounterFloor] = t.floor;
}

__global__ void __launch_bounds__(kSelThreads)
    FloorFilterKernel(const SelSource src, const SelWs ws, int64_t chunk) {
  __shared__ SelScan::TempStorage scan;
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.y;
  WaitForPrevious();  // the floor (and, before it, the scores)
  AllowDependents();
  const uint32_t floor =
      __ldcg(&ws.counters[row * internal::kCountersPerRow + internal::kCounterFloor]);
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(src.len, begin + chunk);
  uint32_t* cand = ws.cand + row * src.len + begin;
  const uint32_t at = CompactRange(
      src.scores + row * src.len, begin, end, scan,
      [&](int64_t e0, const float(&v)[kSelItems]) {
        uint32_t take = 0;
#pragma unroll
        for (int j = 0; j < kSelItems; ++j) {
          const uint32_t key = e0 + j < end ? DirectKey(src, e0 + j, v[j]) : 0u;
          if (key != 0u && key >= floor) take |= 1u << j;
        }
        return take;
      },
      [&](uint32_t i, int64_t e, float) { cand[i] = static_cast<uint32_t>(e); });
  if (tid == 0) ws.blocks[row * ws.block_stride + blockIdx.x] = at;
}

__global__ void __launch_bounds__(kSmallThreads)
    FloorSelectKernel(const float* scores, const SelWs ws, int bpr, int64_t chunk, uint32_t k_sel,
                      const CompactArgs out) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* c_key = reinterpret_cast<uint32_t*>(smem);            // [kCandCap]
  int32_t* c_tok = reinterpret_cast<int32_t*>(c_key + kCandCap);  // [kCandCap]
  __shared__ TopKSmem sm;
  __shared__ SmallScanSmem scan_out;
  __shared__ uint32_t s_start[kSplitMaxBlocks + 1];  // candidates before each filter block
  static_assert(kSplitMaxBlocks == kSmallThreads, "one filter block's count a thread");
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  WaitForPrevious();  // the candidates and their counts
  uint32_t total = 0;
  const uint32_t mine = tid < bpr ? __ldcg(&ws.blocks[row * ws.block_stride + tid]) : 0u;
  s_start[tid] = SmallExclusiveSum(mine, scan_out, total);
  if (tid == 0) s_start[bpr] = total;
  __syncthreads();

  const uint32_t* cand = ws.cand + row * out.n;
  const float* row_scores = scores + row * out.n;
  uint32_t count = 0;
  for (uint32_t base = 0; base < total; base += kRoundTokens) {
    if (count + kRoundTokens > kCandCap) count = KeepTop(c_key, c_tok, count, k_sel, sm, scan_out);
    // A thread's kRoundPer consecutive candidates: the filter block of the first by a binary
    // search over s_start, the next ones in it or a later one.
    const uint32_t p0 = base + tid * kRoundPer;
    int b = 0;
    for (int step = kSplitMaxBlocks / 2; step > 0; step >>= 1) {
      if (b + step < bpr && s_start[b + step] <= p0) b += step;
    }
    uint32_t tok[kRoundPer];
#pragma unroll
    for (int j = 0; j < kRoundPer; ++j) {
      const uint32_t p = p0 + j;
      while (b + 1 < bpr && s_start[b + 1] <= p) ++b;
      tok[j] = p < total ? __ldcg(&cand[b * chunk + (p - s_start[b])]) : 0u;
    }
#pragma unroll
    for (int j = 0; j < kRoundPer; ++j) {
      const uint32_t p = p0 + j;
      if (p < total) {
        c_key[count + (p - base)] = internal::OrderKey(row_scores[tok[j]]);
        c_tok[count + (p - base)] = static_cast<int32_t>(tok[j]);
      }
    }
    count += min(static_cast<uint32_t>(kRoundTokens), total - base);
    __syncthreads();
  }
  // One round's candidates (the common case) in half the slots a thread.
  count = count <= kRoundTokens ? KeepTop<kRoundPer>(c_key, c_tok, count, k_sel, sm, scan_out)
                                : KeepTop(c_key, c_tok, count, k_sel, sm, scan_out);
  PutRow(out, row, static_cast<int>(count), [&](int p) { return c_tok[p]; });
}

template <int PER1>
absl::Status LaunchFloorKernel(const uint32_t* tile_keys, int64_t rows, int64_t n_tiles,
                               uint32_t k_sel, uint32_t* counters, cudaStream_t stream) {
  ROPEKV_CUDA_RETURN_IF_ERROR(LaunchDependent(FloorKernel<PER1>, dim3(static_cast<unsigned>(rows)),
                                              dim3(kSmallThreads), 0, stream, tile_keys, n_tiles,
                                              k_sel, counters));
  return absl::OkStatus();
}

// Whether the floor selection takes exact rows of `len` tokens for k_sel: at most half of the
// row's tiles, so that the floor lies well above most tokens (at k 4096 over 2048 tiles every
// token is a candidate: 96.4 µs at 32 heads / 32K against the split selection's 54).
bool UseFloorSelect(int64_t len, int64_t k_sel) {
  const int64_t tiles = (len + kTcTileRows - 1) / kTcTileRows;
  return internal::FloorSelection() && len > kSmallMaxLen && tiles <= internal::kFloorMaxTiles &&
         k_sel <= kRoundsMaxK && 2 * k_sel <= tiles;
}

// Enqueues the floor selection over the scores and tile keys of a tensor-core scorer.
absl::Status LaunchFloorSelect(const SelSource& src, const SelWs& ws, const uint32_t* tile_keys,
                               int64_t rows, int64_t k_sel, const CompactArgs& out,
                               cudaStream_t stream) {
  const uint32_t k = static_cast<uint32_t>(k_sel);
  const int64_t n_tiles = (src.len + kTcTileRows - 1) / kTcTileRows;
  internal::CountSelection(internal::SelectionPath::kFloor);
  if (n_tiles <= 2 * kSmallThreads) {
    ROPEKV_TOPK_RETURN_IF_ERROR(
        LaunchFloorKernel<2>(tile_keys, rows, n_tiles, k, ws.counters, stream));
  } else if (n_tiles <= 4 * kSmallThreads) {
    ROPEKV_TOPK_RETURN_IF_ERROR(
        LaunchFloorKernel<4>(tile_keys, rows, n_tiles, k, ws.counters, stream));
  } else if (n_tiles <= 8 * kSmallThreads) {
    ROPEKV_TOPK_RETURN_IF_ERROR(
        LaunchFloorKernel<8>(tile_keys, rows, n_tiles, k, ws.counters, stream));
  } else {
    ROPEKV_TOPK_RETURN_IF_ERROR(
        LaunchFloorKernel<16>(tile_keys, rows, n_tiles, k, ws.counters, stream));
  }
  const int64_t chunk = SelChunk(src.len, rows);
  const int64_t bpr = (src.len + chunk - 1) / chunk;
  const dim3 grid(static_cast<unsigned>(bpr), static_cast<unsigned>(rows));
  ROPEKV_CUDA_RETURN_IF_ERROR(
      LaunchDependent(FloorFilterKernel, grid, dim3(kSelThreads), 0, stream, src, ws, chunk));
  constexpr size_t kSmem = static_cast<size_t>(kCandCap) * 8;
  ROPEKV_TOPK_RETURN_IF_ERROR(EnsureSmem<FloorSelectKernel>(kSmem));
  ROPEKV_CUDA_RETURN_IF_ERROR(LaunchDependent(FloorSelectKernel, dim3(static_cast<unsigned>(rows)),
                                              dim3(kSmallThreads), kSmem, stream, src.scores, ws,
                                              static_cast<int>(bpr), chunk, k, out));
  return absl::OkStatus();
}

// Enqueues ChunkSelectKernel or ChunkRoundsKernel (cp.rounds) for a plan internal::PlanChunkSelect
// made (cp.pool > 0).
absl::Status LaunchChunkSelect(const ChunkPlan& cp, const float* scores, const uint32_t* chunk_keys,
                               int64_t rows, int64_t len, int64_t k_sel, const CompactArgs& out,
                               cudaStream_t stream) {
  const uint32_t k = static_cast<uint32_t>(k_sel);
  const int64_t n_tiles = (len + kTcTileRows - 1) / kTcTileRows;
  internal::CountSelection(cp.rounds ? internal::SelectionPath::kRounds
                                     : internal::SelectionPath::kChunk);
  if (cp.rounds) {
    switch (cp.per1) {
      case 2:
        return LaunchChunkRounds<2>(scores, chunk_keys, rows, n_tiles, cp.pool, k, out, stream);
      case 4:
        return LaunchChunkRounds<4>(scores, chunk_keys, rows, n_tiles, cp.pool, k, out, stream);
      case 8:
        return LaunchChunkRounds<8>(scores, chunk_keys, rows, n_tiles, cp.pool, k, out, stream);
      default:
        return LaunchChunkRounds<16>(scores, chunk_keys, rows, n_tiles, cp.pool, k, out, stream);
    }
  }
  switch (cp.per1) {
    case 2:
      return LaunchChunkPer2<2>(cp, scores, chunk_keys, rows, n_tiles, k, out, stream);
    case 4:
      return LaunchChunkPer2<4>(cp, scores, chunk_keys, rows, n_tiles, k, out, stream);
    case 8:
      return LaunchChunkPer2<8>(cp, scores, chunk_keys, rows, n_tiles, k, out, stream);
    default:
      return LaunchChunkPer2<16>(cp, scores, chunk_keys, rows, n_tiles, k, out, stream);
  }
}

// Whether SmallSelectKernel takes this selection.
bool UseSmallSelect(const SelSource& src, const SelSink& sink, const CompactArgs& out) {
  return internal::SmallRowSelection() && src.len <= kSmallMaxLen && out.indices != nullptr &&
         (src.kind == SrcKind::kPlain || src.kind == SrcKind::kTokens ||
          src.kind == SrcKind::kPages) &&
         (sink.kind == SinkKind::kMarkToken || sink.kind == SinkKind::kMarkPage);
}

// Whether the split selection (SplitFilterKernel ..) takes this selection: token rows into an
// output (exact mode, TopKCuda) whose scores, if any, are the rows selected over.
bool UseSplitSelect(const SelSource& src, const SelSink& sink, const CompactArgs& out,
                    int64_t bpr) {
  return internal::SplitSelection() &&
         (src.kind == SrcKind::kPlain || src.kind == SrcKind::kTokens) &&
         sink.kind == SinkKind::kMarkToken && out.indices != nullptr && out.n == src.len &&
         (out.row_scores == nullptr || out.row_scores == src.scores) && bpr >= kSplitMinBlocks &&
         bpr <= kSplitMaxBlocks;
}

// Enqueues one selection: the histogram (unless the scoring kernel made it) and the filter,
// which also writes the output rows when out.indices is set.
absl::Status RunSelection(const SelSource& src, const SelSink& sink, const SelWs& ws, int64_t rows,
                          int64_t k_sel, bool hist_done, const CompactArgs& out,
                          cudaStream_t stream) {
  const int64_t chunk = SelChunk(src.len, rows);
  const int64_t bpr = (src.len + chunk - 1) / chunk;
  if (rows > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA path selects over at most 65535 rows, got ", rows));
  }
  if (UseSmallSelect(src, sink, out)) {
    internal::CountSelection(internal::SelectionPath::kSmall);
    return LaunchSmallSelect(src, rows, k_sel, sink.kind == SinkKind::kMarkPage, out, stream);
  }
  const dim3 grid(static_cast<unsigned>(bpr), static_cast<unsigned>(rows));
  if (UseSplitSelect(src, sink, out, bpr)) {
    internal::CountSelection(internal::SelectionPath::kSplit);
    if (!hist_done) {
      HistKernel<<<grid, kSelThreads, 0, stream>>>(src, ws.hist0, chunk);
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    }
    const uint32_t k = static_cast<uint32_t>(k_sel);
    ROPEKV_CUDA_RETURN_IF_ERROR(
        LaunchDependent(SplitFilterKernel, grid, dim3(kSelThreads), 0, stream, src, ws, k, chunk));
    ROPEKV_CUDA_RETURN_IF_ERROR(LaunchDependent(SplitResolveKernel, dim3(grid.y), dim3(kSelThreads),
                                                0, stream, src, sink, ws, k, chunk,
                                                static_cast<int>(bpr)));
    ROPEKV_CUDA_RETURN_IF_ERROR(LaunchDependent(SplitWriteKernel, grid, dim3(kSelThreads), 0,
                                                stream, src, sink, ws, chunk, out));
    return absl::OkStatus();
  }
  SelSource s = src;
  if (src.kind == SrcKind::kPages) {
    // Page bounds: the first digit comes from the keys spread over their range (see SelSource).
    RangeKernel<<<grid, kSelThreads, 0, stream>>>(src, ws.counters, chunk);
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    s.range = ws.counters;
    hist_done = false;
  }
  if (!hist_done) {
    HistKernel<<<grid, kSelThreads, 0, stream>>>(s, ws.hist0, chunk);
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  internal::CountSelection(internal::SelectionPath::kFilter);
  ROPEKV_CUDA_RETURN_IF_ERROR(LaunchDependent(FilterKernel, grid, dim3(kSelThreads), 0, stream, s,
                                              sink, ws, static_cast<uint32_t>(k_sel), chunk, out));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Scores of listed tokens: a group of `lpt` lanes reads one key row (16 bytes per lane per
// step) and reduces with shuffles; the same code scores bound-then-exact candidates and the
// final selection, so a token's score is the same bits in both.

struct ListShape {
  int lpt;  // lanes per token
  int cpl;  // 16-byte chunks per lane
};
__host__ __device__ inline ListShape MakeListShape(int d, int esize) {
  const int chunks = d * esize / 16;
  ListShape s;
  s.lpt = chunks < 32 ? chunks : 32;
  s.cpl = chunks / s.lpt;
  return s;
}

// q.k of one token for the query vector q (shared, [d] floats); `row` may be null (then 0).
// All 32 lanes of the warp must call it.
template <typename T>
__device__ __forceinline__ float ListDot(const char* row, const float* q, int sub,
                                         const ListShape& ls) {
  constexpr int kE = Elem<T>::kPer16;
  float acc = 0.0f;
  if (row != nullptr) {
    for (int i = 0; i < ls.cpl; ++i) {
      const int c = sub + i * ls.lpt;
      float x[kE];
      LoadChunk<T>(row + c * 16, x);
#pragma unroll
      for (int e = 0; e < kE; ++e) acc = fmaf(q[c * kE + e], x[e], acc);
    }
  }
  for (int off = ls.lpt / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

struct ListParams {
  DevView keys;
  const void* queries;
  DType qtype;
  int d;
  int group;
  GqaReduction red;
  int64_t n;
};

// Query heads of output row `row`: [h0, h0 + hr), all reading KV head kvh.
__device__ __forceinline__ void RowHeads(const ListParams& p, int64_t row, int* kvh, int* h0,
                                         int* hr) {
  if (p.red == GqaReduction::kPerQueryHead) {
    *kvh = static_cast<int>(row / p.group);
    *h0 = static_cast<int>(row);
    *hr = 1;
  } else {
    *kvh = static_cast<int>(row);
    *h0 = static_cast<int>(row) * p.group;
    *hr = p.group;
  }
}

// Loads the row's queries into q_s [hr][d]; returns hr.
__device__ void LoadRowQueries(const ListParams& p, int h0, int hr, float* q_s) {
  for (int i = threadIdx.x; i < hr * p.d; i += blockDim.x) {
    q_s[i] = LoadQuery(p.queries, static_cast<int64_t>(h0) * p.d + i, p.qtype);
  }
  __syncthreads();
}

// Reduced score of token t (t < 0: a dummy, result unused). All lanes call it.
template <typename T>
__device__ float ListRowScore(const ListParams& p, int kvh, int hr, const float* q_s, int64_t t,
                              int sub, const ListShape& ls) {
  const char* r = t >= 0 ? RowPtr(p.keys, kvh, t) : nullptr;
  float red = p.red == GqaReduction::kSum ? 0.0f : -kInf;
  for (int g = 0; g < hr; ++g) {
    float s = ListDot<T>(r, q_s + g * p.d, sub, ls);
    if (s != s) s = -kInf;
    if (p.red == GqaReduction::kSum) {
      red += s;
    } else {
      red = fmaxf(red, s);  // kMax, or the single head of kPerQueryHead
    }
  }
  if (red != red) red = -kInf;
  return red;
}

// \tparam T key element type.
template <typename T>
__global__ void __launch_bounds__(kListThreads)
    CandScoreKernel(const ListParams p,
                    const int32_t* pages,           // [rows][cand_pages]
                    const uint32_t* page_counters,  // [rows][4]; entry 2 = pages listed
                    int64_t cand_pages,
                    float* scores2,  // [rows][cand_pages * 16]
                    int64_t chunk) {
  extern __shared__ __align__(16) float q_s[];
  const int64_t row = blockIdx.y;
  int kvh, h0, hr;
  RowHeads(p, row, &kvh, &h0, &hr);
  LoadRowQueries(p, h0, hr, q_s);
  const ListShape ls = MakeListShape(p.d, sizeof(T));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per_warp = 32 / ls.lpt;
  const int sub = lane % ls.lpt;
  const int64_t len2 = cand_pages * 16;
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(len2, begin + chunk);
  const uint32_t listed =
      __ldcg(&page_counters[row * internal::kCountersPerRow + internal::kCounterAppended]);
  for (int64_t base = begin + warp * per_warp; base < end;
       base += static_cast<int64_t>(kListThreads / 32) * per_warp) {
    const int64_t j = base + lane / ls.lpt;
    int64_t t = -1;
    if (j < end && (j >> 4) < static_cast<int64_t>(listed)) {
      t = static_cast<int64_t>(__ldcg(&pages[row * cand_pages + (j >> 4)])) * 16 + (j & 15);
      if (t >= p.n) t = -1;
    }
    const float s = ListRowScore<T>(p, kvh, hr, q_s, t, sub, ls);
    if (j < end && sub == 0) scores2[row * len2 + j] = s;
  }
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

using ListReduceD = cub::BlockReduce<double, kListThreads>;
using ListReduceF = cub::BlockReduce<float, kListThreads>;

// One block per row: scores of the chosen tokens (page modes) and the captured mass.
// \tparam T key element type.
template <typename T>
__global__ void __launch_bounds__(kListThreads)
    RescoreKernel(const ListParams p,
                  const int32_t* indices,  // [rows][cap], -1 after the row's count
                  int64_t cap,
                  float* out_scores,  // [rows][cap] or null
                  const float2* lse,  // [query_heads][lse_parts] (max, sum exp)
                  int64_t lse_parts, float scale,
                  float* mass) {  // [rows] or null
  extern __shared__ __align__(16) float q_s[];
  __shared__ union {
    ListReduceD::TempStorage d;
    ListReduceF::TempStorage f;
  } red_tmp;
  __shared__ float s_max;
  __shared__ double s_sum;
  const int64_t row = blockIdx.x;
  int kvh, h0, hr;
  RowHeads(p, row, &kvh, &h0, &hr);
  LoadRowQueries(p, h0, hr, q_s);
  const ListShape ls = MakeListShape(p.d, sizeof(T));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int per_warp = 32 / ls.lpt;
  const int sub = lane % ls.lpt;
  const int64_t step = static_cast<int64_t>(kListThreads / 32) * per_warp;

  if (out_scores != nullptr) {
    for (int64_t base = warp * per_warp; base < cap; base += step) {
      const int64_t j = base + lane / ls.lpt;
      const int64_t t = j < cap ? indices[row * cap + j] : -1;
      const float s = ListRowScore<T>(p, kvh, hr, q_s, t, sub, ls);
      if (t >= 0 && sub == 0) out_scores[row * cap + j] = s;
    }
  }
  if (mass == nullptr) return;
  float row_mass = 0.0f;
  for (int g = 0; g < hr; ++g) {
    const int64_t h = h0 + g;
    // Denominator from the partials: max, then the sum rescaled to it (fp64).
    float m = -kInf;
    for (int64_t i = threadIdx.x; i < lse_parts; i += kListThreads) {
      const float2 v = lse[h * lse_parts + i];
      if (v.y > 0.0f) m = fmaxf(m, v.x);
    }
    m = ListReduceF(red_tmp.f).Reduce(m, MaxOp());
    if (threadIdx.x == 0) s_max = m;
    __syncthreads();
    m = s_max;
    double z = 0.0;
    for (int64_t i = threadIdx.x; i < lse_parts; i += kListThreads) {
      const float2 v = lse[h * lse_parts + i];
      if (v.y > 0.0f) z += static_cast<double>(v.y) * exp(static_cast<double>(v.x) - m);
    }
    z = ListReduceD(red_tmp.d).Sum(z);
    if (threadIdx.x == 0) s_sum = z;
    __syncthreads();
    z = s_sum;
    // Numerator over the chosen tokens, with the same arithmetic as the scores.
    double num = 0.0;
    int64_t chosen = 0;
    for (int64_t base = warp * per_warp; base < cap; base += step) {
      const int64_t j = base + lane / ls.lpt;
      const int64_t t = j < cap ? indices[row * cap + j] : -1;
      const float s = ListDot<T>(t >= 0 ? RowPtr(p.keys, kvh, t) : nullptr, q_s + g * p.d, sub, ls);
      if (t >= 0 && sub == 0) {
        ++chosen;
        const float v = (s != s ? -kInf : s) * scale;
        if (v != -kInf) num += exp(static_cast<double>(v) - m);
      }
    }
    num = ListReduceD(red_tmp.d).Sum(num);
    __syncthreads();
    const double c = ListReduceD(red_tmp.d).Sum(static_cast<double>(chosen));
    if (threadIdx.x == 0) {
      // All scores -inf: every token weighs the same.
      const double mh = z > 0.0 ? num / z : c / static_cast<double>(p.n);
      row_mass += static_cast<float>(mh / hr);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) mass[row] = row_mass;
}

ListParams MakeListParams(const SelectRequest& req) {
  ListParams p;
  p.keys = ToDev(req.keys);
  p.queries = req.queries;
  p.qtype = req.query_dtype;
  p.d = req.head_dim;
  p.group = req.query_heads / req.kv_heads;
  p.red = req.reduction;
  p.n = req.num_tokens;
  return p;
}

size_t ListQuerySmem(const SelectRequest& req) {
  const int hr = req.reduction == GqaReduction::kPerQueryHead ? 1 : req.query_heads / req.kv_heads;
  return static_cast<size_t>(hr) * req.head_dim * 4;
}

template <typename T>
absl::Status LaunchCandScore(const SelectRequest& req, const internal::SelectPlan& plan, char* ws,
                             cudaStream_t stream) {
  const size_t smem = ListQuerySmem(req);
  ROPEKV_TOPK_RETURN_IF_ERROR(EnsureSmem<CandScoreKernel<T>>(smem));
  const int64_t chunk = 2048;
  const dim3 grid(static_cast<unsigned>((plan.len2 + chunk - 1) / chunk),
                  static_cast<unsigned>(plan.rows));
  CandScoreKernel<T><<<grid, kListThreads, smem, stream>>>(
      MakeListParams(req), reinterpret_cast<const int32_t*>(ws + plan.pages_list),
      reinterpret_cast<const uint32_t*>(ws + plan.sel.counters), plan.cand_pages,
      reinterpret_cast<float*>(ws + plan.scores2), chunk);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <typename T>
absl::Status LaunchRescore(const SelectRequest& req, const internal::SelectPlan& plan,
                           const SelectResult& result, char* ws, cudaStream_t stream) {
  const size_t smem = ListQuerySmem(req);
  ROPEKV_TOPK_RETURN_IF_ERROR(EnsureSmem<RescoreKernel<T>>(smem));
  float* scores = req.mode == Mode::kExact ? nullptr : result.scores;
  RescoreKernel<T><<<static_cast<unsigned>(plan.rows), kListThreads, smem, stream>>>(
      MakeListParams(req), result.indices, plan.capacity, scores,
      reinterpret_cast<const float2*>(ws + plan.lse), plan.lse_parts, internal::SoftmaxScale(req),
      result.mass);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

#define ROPEKV_TOPK_DISPATCH(dtype, FN, ...) \
  switch (dtype) {                           \
    case DType::kF32:                        \
      return FN<float>(__VA_ARGS__);         \
    case DType::kF16:                        \
      return FN<__half>(__VA_ARGS__);        \
    case DType::kBF16:                       \
      return FN<__nv_bfloat16>(__VA_ARGS__); \
  }                                          \
  return absl::InvalidArgumentError("unknown dtype")

absl::Status CandScore(const SelectRequest& req, const internal::SelectPlan& plan, char* ws,
                       cudaStream_t stream) {
  ROPEKV_TOPK_DISPATCH(req.keys.dtype, LaunchCandScore, req, plan, ws, stream);
}

absl::Status Rescore(const SelectRequest& req, const internal::SelectPlan& plan,
                     const SelectResult& result, char* ws, cudaStream_t stream) {
  ROPEKV_TOPK_DISPATCH(req.keys.dtype, LaunchRescore, req, plan, result, ws, stream);
}

SelWs MakeSelWs(char* ws, const internal::SelectionLayout& l) {
  SelWs s;
  s.hist0 = reinterpret_cast<uint32_t*>(ws + l.hist0);
  s.hist1 = reinterpret_cast<uint32_t*>(ws + l.hist1);
  s.counters = reinterpret_cast<uint32_t*>(ws + l.counters);
  s.cand = reinterpret_cast<uint32_t*>(ws + l.cand);
  s.blocks = reinterpret_cast<uint32_t*>(ws + l.blocks);
  s.block_stride = l.block_stride;
  return s;
}

absl::Status CheckWorkspace(const internal::SelectPlan& plan, void* workspace,
                            size_t workspace_bytes) {
  if (workspace == nullptr || workspace_bytes < plan.total) {
    return absl::FailedPreconditionError(
        absl::StrCat("workspace must hold ", plan.total, " bytes, got ", workspace_bytes));
  }
  if (reinterpret_cast<uintptr_t>(workspace) % 256 != 0) {
    return absl::FailedPreconditionError("workspace must be 256-byte aligned");
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Page metadata.

__device__ __forceinline__ float LoadAny(const char* p, int i, DType t) {
  switch (t) {
    case DType::kF32:
      return Elem<float>::Load(p, i);
    case DType::kF16:
      return Elem<__half>::Load(p, i);
    case DType::kBF16:
      return Elem<__nv_bfloat16>::Load(p, i);
  }
  return 0.0f;
}

// Stores v, exactly representable in t.
__device__ __forceinline__ void StoreExact(char* p, int i, DType t, float v) {
  if (t == DType::kF32) {
    reinterpret_cast<float*>(p)[i] = v;
  } else {
    reinterpret_cast<uint16_t*>(p)[i] = internal::Rne16(t, v);
  }
}

struct MetaParams {
  DevView keys;
  DType key_type;
  DevView meta;
  DType meta_type;
  int d;
  int64_t n;
  int64_t first_token;  // tokens before it are already in the metadata
  int64_t first_page;
  int* nan_seen;  // or null: set nonzero when a key holds NaN
};

// One block per (page, head), one thread per column.
__global__ void MetaKernel(const MetaParams p) {
  const int64_t page = p.first_page + blockIdx.x;
  const int h = blockIdx.y;
  const int c = threadIdx.x;
  const int64_t t0 = page * kPageTokens;
  const int64_t t1 = min(p.n, t0 + kPageTokens);
  const int64_t lo = max(t0, p.first_token);
  char* out = const_cast<char*>(RowPtr(p.meta, h, page));
  float hi_v = 0.0f, lo_v = 0.0f;
  bool have = false;
  if (t0 < p.first_token) {
    hi_v = LoadAny(out, c, p.meta_type);
    lo_v = LoadAny(out, p.d + c, p.meta_type);
    have = true;
  }
  for (int64_t t = lo; t < t1; ++t) {
    const float v = LoadAny(RowPtr(p.keys, h, t), c, p.key_type);
    if (v != v && p.nan_seen != nullptr) atomicOr(p.nan_seen, 1);
    const float up = internal::RoundOutward(p.meta_type, v, true);
    const float down = internal::RoundOutward(p.meta_type, v, false);
    // A NaN key is skipped unless it is all the page has.
    hi_v = (!have || hi_v != hi_v || up > hi_v) ? up : hi_v;
    lo_v = (!have || lo_v != lo_v || down < lo_v) ? down : lo_v;
    have = true;
  }
  StoreExact(out, c, p.meta_type, hi_v);
  StoreExact(out, p.d + c, p.meta_type, lo_v);
}

absl::Status RunMeta(const MatrixView& keys, const PageMetaShape& shape, int64_t first_token,
                     const MutableMatrixView& meta, cudaStream_t stream, int* nan_seen) {
  MetaParams p;
  p.nan_seen = nan_seen;
  p.keys = ToDev(keys);
  p.key_type = keys.dtype;
  p.meta = ToDev(meta);
  p.meta_type = meta.dtype;
  p.d = shape.head_dim;
  p.n = shape.num_tokens;
  p.first_token = first_token;
  p.first_page = first_token / kPageTokens;
  const int64_t pages = NumPages(shape.num_tokens) - p.first_page;
  if (pages > 0x7fffffff || shape.kv_heads > 65535) {
    return absl::InvalidArgumentError("too many pages or heads for one launch");
  }
  MetaKernel<<<dim3(static_cast<unsigned>(pages), static_cast<unsigned>(shape.kv_heads)),
               shape.head_dim, 0, stream>>>(p);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Gather.

struct GatherParams {
  DevView src;
  char* dst;               // [rows][cap][row_bytes]
  const int32_t* indices;  // [rows][cap]
  const int32_t* counts;   // [rows] or null
  int64_t cap;
  int64_t group;
  int64_t n;
  int row_bytes;
};

// One warp per entry.
__global__ void __launch_bounds__(kListThreads) GatherKernel(const GatherParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * (kListThreads / 32) + (threadIdx.x >> 5);
  const int64_t row = blockIdx.y;
  if (j >= p.cap) return;
  const int64_t count = p.counts != nullptr ? p.counts[row] : p.cap;
  const int64_t t = j < count ? p.indices[row * p.cap + j] : -1;
  char* d = p.dst + (row * p.cap + j) * p.row_bytes;
  const bool ok = t >= 0 && t < p.n;
  const char* s = ok ? RowPtr(p.src, row / p.group, t) : nullptr;
  const bool vec = ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(d)) & 15u) == 0;
  if (vec) {
    for (int c = lane; c < p.row_bytes / 16; c += 32) {
      reinterpret_cast<uint4*>(d)[c] =
          ok ? reinterpret_cast<const uint4*>(s)[c] : make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    for (int c = lane; c < p.row_bytes / 2; c += 32) {
      reinterpret_cast<uint16_t*>(d)[c] = ok ? reinterpret_cast<const uint16_t*>(s)[c] : 0;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public entry points.

absl::Status BuildPageMetaCuda(const MatrixView& keys, const PageMetaShape& shape,
                               const MutableMatrixView& meta, cudaStream_t stream, int* nan_seen) {
  ROPEKV_TOPK_RETURN_IF_ERROR(internal::ValidatePageMetaArgs(keys, shape, meta));
  return RunMeta(keys, shape, 0, meta, stream, nan_seen);
}

absl::Status AppendPageMetaCuda(const MatrixView& keys, const PageMetaShape& shape,
                                int64_t first_token, const MutableMatrixView& meta,
                                cudaStream_t stream) {
  ROPEKV_TOPK_RETURN_IF_ERROR(internal::ValidatePageMetaArgs(keys, shape, meta));
  if (first_token < 0 || first_token >= shape.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_token must be in [0, num_tokens = ", shape.num_tokens, "), got ", first_token));
  }
  return RunMeta(keys, shape, first_token, meta, stream, nullptr);
}

absl::Status ScoreCuda(const SelectRequest& req, float* out, cudaStream_t stream) {
  ROPEKV_TOPK_RETURN_IF_ERROR(internal::ValidateShape(req));
  if (req.queries == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("queries and out must be set");
  }
  ROPEKV_TOPK_RETURN_IF_ERROR(
      internal::ValidateView(req.keys, "keys", req.head_dim, req.num_tokens, req.kv_heads));
  return RunScoreTiles(req, req.keys, false, out, nullptr, 0, stream);
}

absl::Status PageBoundCuda(const SelectRequest& req, float* out, cudaStream_t stream) {
  ROPEKV_TOPK_RETURN_IF_ERROR(internal::ValidateShape(req));
  if (req.queries == nullptr || out == nullptr) {
    return absl::InvalidArgumentError("queries and out must be set");
  }
  ROPEKV_TOPK_RETURN_IF_ERROR(internal::ValidateView(req.page_meta, "page_meta", 2 * req.head_dim,
                                                     NumPages(req.num_tokens), req.kv_heads));
  return RunScoreTiles(req, req.page_meta, true, out, nullptr, 0, stream);
}

absl::Status TopKCuda(const float* scores, int64_t rows, int64_t len, int64_t k, int32_t* indices,
                      void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  absl::StatusOr<internal::SelectPlan> plan = internal::MakeTopKPlan(rows, len, k);
  if (!plan.ok()) return plan.status();
  if (scores == nullptr || indices == nullptr) {
    return absl::InvalidArgumentError("scores and indices must be set");
  }
  ROPEKV_TOPK_RETURN_IF_ERROR(CheckWorkspace(*plan, workspace, workspace_bytes));
  char* ws = static_cast<char*>(workspace);
  SelSource src;
  src.scores = scores;
  src.len = len;
  src.kind = SrcKind::kPlain;
  SelSink sink;
  sink.kind = SinkKind::kMarkToken;
  sink.bitmap = reinterpret_cast<uint32_t*>(ws + plan->bitmap);
  sink.words = plan->bitmap_words;
  CompactArgs out;
  out.indices = indices;
  out.cap = plan->capacity;
  out.n = len;
  if (!UseSmallSelect(src, sink, out)) {
    ROPEKV_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(ws + plan->zero_begin, 0, plan->zero_end - plan->zero_begin, stream));
  }
  return RunSelection(src, sink, MakeSelWs(ws, plan->sel), rows, plan->k_sel,
                      /*hist_done=*/false, out, stream);
}

absl::Status SelectCuda(const SelectRequest& req, const SelectResult& result, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  ROPEKV_TOPK_RETURN_IF_ERROR(ValidateSelectRequest(req, result));
  absl::StatusOr<internal::SelectPlan> plan_or =
      internal::MakeSelectPlan(req, result.mass != nullptr);
  if (!plan_or.ok()) return plan_or.status();
  const internal::SelectPlan& plan = *plan_or;
  ROPEKV_TOPK_RETURN_IF_ERROR(CheckWorkspace(plan, workspace, workspace_bytes));
  if (plan.rows > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA path selects over at most 65535 rows, got ", plan.rows));
  }
  char* ws = static_cast<char*>(workspace);
  float* scores = reinterpret_cast<float*>(ws + plan.scores);
  float2* lse = reinterpret_cast<float2*>(ws + plan.lse);
  const bool want_mass = result.mass != nullptr;
  absl::StatusOr<DeviceInfo> info = GetDeviceInfo();
  if (!info.ok()) return info.status();
  // A short row selected in one block (SmallSelectKernel) needs neither the zeroed workspace nor
  // the fused histogram; nor does a long exact row selected from the scorer's tile maxima
  // (ChunkSelectKernel).
  const bool small = req.mode != Mode::kBoundThenExact && internal::SmallRowSelection() &&
                     plan.len <= kSmallMaxLen;
  ChunkPlan chunked;
  const bool tc_exact = req.mode == Mode::kExact && !want_mass && plan.len > kSmallMaxLen &&
                        TcScores(req, req.keys, false, false, *info);
  if (tc_exact && internal::ChunkSelection()) {
    chunked =
        internal::PlanChunkSelect(plan.len, plan.k_sel, plan.rows, req.query_heads / req.kv_heads);
  }
  const bool floor = tc_exact && chunked.pool == 0 && UseFloorSelect(plan.len, plan.k_sel);
  auto zero_workspace = [&]() -> absl::Status {
    ROPEKV_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(ws + plan.zero_begin, 0, plan.zero_end - plan.zero_begin, stream));
    return absl::OkStatus();
  };
  if (!small && chunked.pool == 0 && !floor) ROPEKV_TOPK_RETURN_IF_ERROR(zero_workspace());

  // The output rows, written by the last selection.
  CompactArgs out;
  out.indices = result.indices;
  out.counts = result.counts;
  out.cap = plan.capacity;
  out.n = req.num_tokens;
  out.n_sink = req.n_sink;
  out.n_local = req.n_local;
  out.row_scores = req.mode == Mode::kExact ? scores : nullptr;
  out.out_scores = result.scores;
  const SelWs sel = MakeSelWs(ws, plan.sel);
  const SrcKind kind = req.mode == Mode::kExact ? SrcKind::kTokens : SrcKind::kPages;
  // What the first selection selects over: the scores or bounds step 1 writes.
  SelSource src;
  src.scores = scores;
  src.len = plan.len;
  src.kind = kind;
  src.n = req.num_tokens;
  src.n_sink = req.n_sink;
  src.n_local = req.n_local;

  // 1. Scores or bounds (with the first histogram or the tile maxima when they can be fused),
  // and the softmax denominators.
  ScoreExtras extras;
  extras.kind = kind;
  // (Long page rows take their histogram after RangeKernel: see RunSelection.)
  extras.hist0 =
      small || chunked.pool > 0 || floor || req.mode != Mode::kExact ? nullptr : sel.hist0;
  uint32_t* chunk_keys = chunked.pool > 0 || floor ? sel.cand : nullptr;
  extras.chunk_keys = chunk_keys;
  if (req.mode == Mode::kExact) {
    ROPEKV_TOPK_RETURN_IF_ERROR(RunScoreTiles(
        req, req.keys, false, scores, want_mass ? lse : nullptr, plan.lse_parts, stream, &extras));
    if (chunked.pool > 0 || floor) {
      if (extras.chunks_done) {
        return floor ? LaunchFloorSelect(src, sel, chunk_keys, plan.rows, plan.k_sel, out, stream)
                     : LaunchChunkSelect(chunked, scores, chunk_keys, plan.rows, plan.len,
                                         plan.k_sel, out, stream);
      }
      ROPEKV_TOPK_RETURN_IF_ERROR(zero_workspace());  // the filter path after all
    }
  } else {
    ROPEKV_TOPK_RETURN_IF_ERROR(
        RunScoreTiles(req, req.page_meta, true, scores, nullptr, 0, stream, &extras));
    if (want_mass) {
      ROPEKV_TOPK_RETURN_IF_ERROR(
          RunScoreTiles(req, req.keys, false, nullptr, lse, plan.lse_parts, stream));
    }
  }

  // 2. First selection: tokens, pages, or candidate pages.
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(ws + plan.bitmap);
  SelSink sink;
  sink.bitmap = bitmap;
  sink.words = plan.bitmap_words;
  switch (req.mode) {
    case Mode::kExact:
      sink.kind = SinkKind::kMarkToken;
      break;
    case Mode::kBound:
      sink.kind = SinkKind::kMarkPage;
      break;
    case Mode::kBoundThenExact:
      sink.kind = SinkKind::kAppend;
      sink.list = reinterpret_cast<int32_t*>(ws + plan.pages_list);
      sink.counters = sel.counters;
      sink.list_cap = plan.cand_pages;
      break;
  }
  ROPEKV_TOPK_RETURN_IF_ERROR(RunSelection(src, sink, sel, plan.rows, plan.k_sel, extras.hist_done,
                                           req.mode == Mode::kBoundThenExact ? CompactArgs{} : out,
                                           stream));

  // 3. Bound-then-exact: exact scores of the candidates, second selection.
  if (req.mode == Mode::kBoundThenExact) {
    ROPEKV_TOPK_RETURN_IF_ERROR(CandScore(req, plan, ws, stream));
    SelSource src2 = src;
    src2.scores = reinterpret_cast<const float*>(ws + plan.scores2);
    src2.len = plan.len2;
    src2.kind = SrcKind::kSlots;
    src2.pages = reinterpret_cast<const int32_t*>(ws + plan.pages_list);
    src2.page_counters = sel.counters;
    src2.cand_pages = plan.cand_pages;
    SelSink sink2;
    sink2.kind = SinkKind::kMarkToken;
    sink2.bitmap = bitmap;
    sink2.words = plan.bitmap_words;
    ROPEKV_TOPK_RETURN_IF_ERROR(RunSelection(src2, sink2, MakeSelWs(ws, plan.sel2), plan.rows,
                                             plan.k_sel2, /*hist_done=*/false, out, stream));
  }

  // 5. Scores of page modes, captured mass.
  if ((result.scores != nullptr && req.mode != Mode::kExact) || want_mass) {
    ROPEKV_TOPK_RETURN_IF_ERROR(Rescore(req, plan, result, ws, stream));
  }
  return absl::OkStatus();
}

absl::Status GatherCuda(const GatherRequest& req, cudaStream_t stream) {
  ROPEKV_TOPK_RETURN_IF_ERROR(internal::ValidateGather(req));
  if (req.capacity == 0) return absl::OkStatus();
  if (req.rows > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("the CUDA path gathers at most 65535 lists, got ", req.rows));
  }
  for (int which = 0; which < 2; ++which) {
    char* dst = static_cast<char*>(which == 0 ? req.dst_keys : req.dst_values);
    if (dst == nullptr) continue;
    const MatrixView& src = which == 0 ? req.keys : req.values;
    GatherParams p;
    p.src = ToDev(src);
    p.dst = dst;
    p.indices = req.indices;
    p.counts = req.counts;
    p.cap = req.capacity;
    p.group = req.rows / req.kv_heads;
    p.n = req.num_tokens;
    p.row_bytes = req.head_dim * static_cast<int>(DTypeSize(src.dtype));
    const dim3 grid(
        static_cast<unsigned>((req.capacity + kListThreads / 32 - 1) / (kListThreads / 32)),
        static_cast<unsigned>(req.rows));
    GatherKernel<<<grid, kListThreads, 0, stream>>>(p);
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace topk
}  // namespace ropekv
