// CUDA re-rotate-and-copy (see rerotate_cuda.h).
//
// Work decomposition: every job's token range is cut into tiles; a thread block owns one tile of
// one job and one chunk of its (layer, head) rows, and is either a ROTATE block (keys of a job
// whose position or table changes) or a COPY block (values, and keys of identity jobs). In a
// ROTATE block each thread owns one (token, unit) for the whole chunk: a unit is a pair of vectors
// (NeoX: dims [u*VE, u*VE+VE) and the same +rotary_dim/2) or one vector (GPT-J: VE/2 interleaved
// pairs; pass-through dims). The thread computes the combined rotation (cos, sin) of its pairs
// once (fp64 sincos of the fp32-angle difference, rope_math.h) and reuses it for every (layer,
// head) row of the chunk, so the loop body is loads, a few fp32 fmas and stores. Loads and stores
// are 16-byte vectors (streaming cache hints) when alignment allows, unrolled kUnroll rows deep
// so enough bytes are in flight to saturate HBM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "kernels/common/cuda_check.h"
#include "kernels/rope/rerotate_cuda.h"
#include "kernels/rope/rope_internal.h"
#include "kernels/rope/rope_math.h"

namespace ropekv {
namespace {

// Launch configuration, chosen here only.
constexpr int kThreads = 256;   // threads per block
constexpr int kUnroll = 4;      // rows in flight per thread (ROTATE: two vectors per row)
constexpr int kCopyUnroll = 8;  // rows in flight per thread (COPY: one vector per row)
// Blocks aimed at per SM before (layer, head) rows are split across blocks.
constexpr int kTargetBlocksPerSm = 32;
// Fewest rows a block streams when rows are split (amortizes the sincos of its coefficients).
constexpr int kMinRowsPerBlock = 8;

// One job as the kernel sees it (uploaded with the launch).
struct DevJob {
  const void* src;  // [layers][2][kv_heads][tokens][head_dim] through src strides (elements)
  void* dst;        // likewise through dst strides
  int64_t src_layer, src_kv, src_head, src_token;
  int64_t dst_layer, dst_kv, dst_head, dst_token;
  int64_t src_token0, dst_token0, n_tokens;
  int64_t from_pos, to_pos;
  int64_t block_begin;    // first block of this job in the grid
  int32_t from_table;     // offset (floats) of the from table in the table blob
  int32_t to_table;       // offset of the to table (== from_table iff same table id)
  int32_t rot_tiles;      // ROTATE tiles (0 for identity jobs)
  int32_t copy_tiles;     // COPY tiles per copied part
  int32_t copy_parts;     // parts copied plainly: K (identity only), V (unless keys_only)
  int32_t first_copy_kv;  // kv index of the first copied part (0: K, 1: V)
};

struct LaunchParams {
  const DevJob* jobs;   // [num_jobs], sorted by block_begin
  const float* tables;  // table blob: inv_freq tables, rotary_dim/2 floats each
  int num_jobs;
  int layers, heads, head_dim, rotary_dim;
  int rot_units;   // rotary units per key row
  int pass_units;  // pass-through units per key row
  int rot_tile;    // tokens per ROTATE block
  int copy_units;  // vectors per row
  int copy_tile;   // tokens per COPY block
  int lh_chunks;   // chunks the layers*heads rows are split into
  int lh_per_chunk;
  int exact;  // RerotateMode::kExact
};

template <int kBytes>
struct VecOf;
template <>
struct VecOf<16> {
  using type = uint4;
};
template <>
struct VecOf<8> {
  using type = uint2;
};
template <>
struct VecOf<4> {
  using type = unsigned int;
};
template <>
struct VecOf<2> {
  using type = unsigned short;
};

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Streaming (evict-first) vector load/store: every byte is touched once.
template <typename V>
__device__ __forceinline__ V LoadVec(const void* p) {
  return __ldcs(static_cast<const V*>(p));
}
template <typename V>
__device__ __forceinline__ void StoreVec(void* p, V v) {
  __stcs(static_cast<V*>(p), v);
}

template <typename T, int VE, typename V>
__device__ __forceinline__ void Unpack(const V& v, float (&f)[VE]) {
  T e[VE];
  memcpy(e, &v, sizeof(V));
#pragma unroll
  for (int k = 0; k < VE; ++k) f[k] = ToFloat(e[k]);
}
template <typename T, int VE, typename V>
__device__ __forceinline__ V Pack(const float (&f)[VE]) {
  T e[VE];
#pragma unroll
  for (int k = 0; k < VE; ++k) e[k] = FromFloat<T>(f[k]);
  V v;
  memcpy(&v, e, sizeof(V));
  return v;
}

// Finds the job owning `block` (jobs sorted by block_begin, each with >= 1 block).
__device__ __forceinline__ int FindJob(const DevJob* jobs, int num_jobs, int64_t block) {
  int lo = 0, hi = num_jobs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (jobs[mid].block_begin <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Rows [lh_begin, lh_end) of the layers*heads rows of one chunk.
__device__ __forceinline__ void ChunkRows(const LaunchParams& p, int64_t chunk, int* lh_begin,
                                          int* lh_end) {
  *lh_begin = static_cast<int>(chunk) * p.lh_per_chunk;
  *lh_end = min(*lh_begin + p.lh_per_chunk, p.layers * p.heads);
}

// \tparam T element type (float, __half, __nv_bfloat16)
// \tparam kVecBytes bytes per vector load/store (16, 8, 4, 2)
// \tparam kGptj pair layout (false: NeoX rotate_half, true: GPT-J interleaved)
template <typename T, int kVecBytes, bool kGptj>
__device__ __forceinline__ void RotateBlock(const LaunchParams& p, const DevJob& job,
                                            int64_t local) {
  using V = typename VecOf<kVecBytes>::type;
  constexpr int VE = kVecBytes / static_cast<int>(sizeof(T));
  constexpr int NP = kGptj ? VE / 2 : VE;  // pairs per unit
  const int units = p.rot_units + p.pass_units;
  const int t_local = threadIdx.x / units;
  const int u = threadIdx.x - t_local * units;
  if (t_local >= p.rot_tile) return;
  const int64_t tile = local / p.lh_chunks;
  const int64_t t = tile * p.rot_tile + t_local;
  if (t >= job.n_tokens) return;
  int lh_begin, lh_end;
  ChunkRows(p, local - tile * p.lh_chunks, &lh_begin, &lh_end);

  const bool rot = u < p.rot_units;
  const int half = p.rotary_dim / 2;
  int off_a, off_b = 0;
  if (rot) {
    off_a = u * VE;
    off_b = half + u * VE;
  } else {
    off_a = p.rotary_dim + (u - p.rot_units) * VE;
  }
  rope_internal::RotCoeff coeff[NP];
  if (rot) {
    const bool same_table = job.from_table == job.to_table;
    const int f0 = kGptj ? u * NP : u * VE;
#pragma unroll
    for (int k = 0; k < NP; ++k) {
      coeff[k] = rope_internal::RotationCoeffs(p.exact != 0, same_table, job.from_pos + t,
                                               p.tables[job.from_table + f0 + k], job.to_pos + t,
                                               p.tables[job.to_table + f0 + k]);
    }
  }
  // Key rows of token t: [layers][heads] at these bases, plus layer/head strides.
  const T* src = static_cast<const T*>(job.src) + (job.src_token0 + t) * job.src_token;
  T* dst = static_cast<T*>(job.dst) + (job.dst_token0 + t) * job.dst_token;
  int layer = lh_begin / p.heads, head = lh_begin - (lh_begin / p.heads) * p.heads;
  for (int lh = lh_begin; lh < lh_end; lh += kUnroll) {
    V a[kUnroll], b[kUnroll];
    int64_t so[kUnroll], dof[kUnroll];
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      if (lh + r < lh_end) {
        so[r] = layer * job.src_layer + head * job.src_head;
        dof[r] = layer * job.dst_layer + head * job.dst_head;
        a[r] = LoadVec<V>(src + so[r] + off_a);
        if (!kGptj && rot) b[r] = LoadVec<V>(src + so[r] + off_b);
        if (++head == p.heads) {
          head = 0;
          ++layer;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kUnroll; ++r) {
      if (lh + r < lh_end) {
        if (rot) {
          float fa[VE];
          Unpack<T, VE>(a[r], fa);
          if constexpr (kGptj) {
            float y[VE];
#pragma unroll
            for (int k = 0; k < NP; ++k) {
              rope_internal::RotatePair(coeff[k], fa[2 * k], fa[2 * k + 1], &y[2 * k],
                                        &y[2 * k + 1]);
            }
            StoreVec<V>(dst + dof[r] + off_a, Pack<T, VE, V>(y));
          } else {
            float fb[VE], ya[VE], yb[VE];
            Unpack<T, VE>(b[r], fb);
#pragma unroll
            for (int k = 0; k < VE; ++k) {
              rope_internal::RotatePair(coeff[k], fa[k], fb[k], &ya[k], &yb[k]);
            }
            StoreVec<V>(dst + dof[r] + off_a, Pack<T, VE, V>(ya));
            StoreVec<V>(dst + dof[r] + off_b, Pack<T, VE, V>(yb));
          }
        } else {
          StoreVec<V>(dst + dof[r] + off_a, a[r]);
        }
      }
    }
  }
}

template <typename T, int kVecBytes>
__device__ __forceinline__ void CopyBlock(const LaunchParams& p, const DevJob& job, int64_t local) {
  using V = typename VecOf<kVecBytes>::type;
  constexpr int VE = kVecBytes / static_cast<int>(sizeof(T));
  const int t_local = threadIdx.x / p.copy_units;
  const int u = threadIdx.x - t_local * p.copy_units;
  if (t_local >= p.copy_tile) return;
  const int64_t per_part = static_cast<int64_t>(job.copy_tiles) * p.lh_chunks;
  const int part = static_cast<int>(local / per_part);
  const int64_t rem = local - part * per_part;
  const int64_t tile = rem / p.lh_chunks;
  const int64_t t = tile * p.copy_tile + t_local;
  if (t >= job.n_tokens) return;
  int lh_begin, lh_end;
  ChunkRows(p, rem - tile * p.lh_chunks, &lh_begin, &lh_end);
  const int kv = job.first_copy_kv + part;
  const T* src = static_cast<const T*>(job.src) + kv * job.src_kv +
                 (job.src_token0 + t) * job.src_token + u * VE;
  T* dst =
      static_cast<T*>(job.dst) + kv * job.dst_kv + (job.dst_token0 + t) * job.dst_token + u * VE;
  int layer = lh_begin / p.heads, head = lh_begin - (lh_begin / p.heads) * p.heads;
  for (int lh = lh_begin; lh < lh_end; lh += kCopyUnroll) {
    V a[kCopyUnroll];
    int64_t dof[kCopyUnroll];
#pragma unroll
    for (int r = 0; r < kCopyUnroll; ++r) {
      if (lh + r < lh_end) {
        a[r] = LoadVec<V>(src + layer * job.src_layer + head * job.src_head);
        dof[r] = layer * job.dst_layer + head * job.dst_head;
        if (++head == p.heads) {
          head = 0;
          ++layer;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kCopyUnroll; ++r) {
      if (lh + r < lh_end) StoreVec<V>(dst + dof[r], a[r]);
    }
  }
}

// \tparam T element type; \tparam kVecBytes vector width; \tparam kGptj pair layout.
template <typename T, int kVecBytes, bool kGptj>
__global__ void __launch_bounds__(kThreads) RerotateCopyKernel(const LaunchParams p) {
  const int64_t block = blockIdx.x;
  const DevJob job = p.jobs[FindJob(p.jobs, p.num_jobs, block)];
  const int64_t local = block - job.block_begin;
  const int64_t rot_blocks = static_cast<int64_t>(job.rot_tiles) * p.lh_chunks;
  if (local < rot_blocks) {
    RotateBlock<T, kVecBytes, kGptj>(p, job, local);
  } else {
    CopyBlock<T, kVecBytes>(p, job, local - rot_blocks);
  }
}

template <typename T, int kVecBytes>
cudaError_t LaunchWidth(bool gptj, const LaunchParams& p, int64_t blocks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(blocks));
  if (gptj) {
    if constexpr (kVecBytes / sizeof(T) >= 2) {
      RerotateCopyKernel<T, kVecBytes, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      return cudaErrorInvalidValue;  // excluded by ChooseVecBytes
    }
  } else {
    RerotateCopyKernel<T, kVecBytes, false><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchTyped(int vec_bytes, bool gptj, const LaunchParams& p, int64_t blocks,
                        cudaStream_t stream) {
  switch (vec_bytes) {
    case 16:
      return LaunchWidth<T, 16>(gptj, p, blocks, stream);
    case 8:
      return LaunchWidth<T, 8>(gptj, p, blocks, stream);
    case 4:
      return LaunchWidth<T, 4>(gptj, p, blocks, stream);
    case 2:
      if constexpr (sizeof(T) == 2) return LaunchWidth<T, 2>(gptj, p, blocks, stream);
      break;
  }
  return cudaErrorInvalidValue;
}

bool Aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Widest vector (bytes) every job's pointers and strides allow and the pair layout can use;
// 0 if none.
int ChooseVecBytes(const RopeSpec& spec, const KvGeometry& g, absl::Span<const RerotateCopy> jobs,
                   bool any_rotation) {
  const int es = static_cast<int>(DTypeSize(g.dtype));
  const int rotary = RotaryDim(spec);
  for (int w : {16, 8, 4, 2}) {
    if (w < es) continue;
    const int ve = w / es;
    if (g.head_dim % ve != 0) continue;
    if (any_rotation) {
      if (spec.layout == PairLayout::kNeox && (rotary / 2) % ve != 0) continue;
      if (spec.layout == PairLayout::kGptj && (ve % 2 != 0 || rotary % ve != 0)) continue;
    }
    bool ok = true;
    for (const RerotateCopy& j : jobs) {
      if (j.n_tokens == 0) continue;
      const KvStrides& s = j.src_strides;
      const KvStrides& d = j.dst_strides;
      for (int64_t stride : {s.layer, s.kv, s.head, s.token, d.layer, d.kv, d.head, d.token}) {
        ok = ok && (stride * es) % w == 0;
      }
      ok = ok && Aligned(j.src, w) && Aligned(j.dst, w);
    }
    if (ok) return w;
  }
  return 0;
}

}  // namespace

struct RerotateEngine::Impl {
  // A pinned staging buffer and its device twin; reusable once `done` has completed.
  struct Slot {
    void* host = nullptr;
    void* device = nullptr;
    size_t capacity = 0;
    cudaEvent_t done = nullptr;
    bool in_flight = false;
  };

  int device = 0;
  int num_sms = 0;
  absl::Mutex mu;
  absl::flat_hash_map<RopeTableId, std::vector<float>> tables ABSL_GUARDED_BY(mu);
  std::vector<std::unique_ptr<Slot>> slots ABSL_GUARDED_BY(mu);

  ~Impl() {
    for (auto& slot : slots) {
      // Destruction waits for outstanding launches that still read the slot.
      if (slot->done != nullptr) {
        cudaEventSynchronize(slot->done);
        cudaEventDestroy(slot->done);
      }
      if (slot->host != nullptr) cudaFreeHost(slot->host);
      if (slot->device != nullptr) cudaFree(slot->device);
    }
  }

  // A free slot of at least `bytes`, allocating one when every slot is busy or too small.
  absl::StatusOr<Slot*> AcquireSlot(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    for (auto& slot : slots) {
      if (slot->capacity < bytes) continue;
      if (slot->in_flight) {
        const cudaError_t q = cudaEventQuery(slot->done);
        if (q == cudaErrorNotReady) continue;
        ROPEKV_CUDA_RETURN_IF_ERROR(q);
        slot->in_flight = false;
      }
      return slot.get();
    }
    auto slot = std::make_unique<Slot>();
    size_t capacity = size_t{64} << 10;
    while (capacity < bytes) capacity *= 2;
    slot->capacity = capacity;
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaMallocHost(&slot->host, slot->capacity));
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaMalloc(&slot->device, slot->capacity));
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&slot->done, cudaEventDisableTiming));
    slots.push_back(std::move(slot));
    return slots.back().get();
  }

  const std::vector<float>& Table(const RopeSpec& spec, RopeTableId id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    auto it = tables.find(id);
    if (it == tables.end()) it = tables.emplace(id, InvFreq(spec, id)).first;
    return it->second;
  }
};

RerotateEngine::RerotateEngine(const RopeSpec& spec, std::unique_ptr<Impl> impl)
    : spec_(spec), impl_(std::move(impl)) {}

RerotateEngine::~RerotateEngine() = default;

absl::StatusOr<std::unique_ptr<RerotateEngine>> RerotateEngine::Create(const RopeSpec& spec) {
  if (absl::Status s = ValidateRopeSpec(spec); !s.ok()) return s;
  if (!SupportedHeadDim(spec.head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CUDA re-rotation supports head_dim 64, 80, 96, 128, 256, got ", spec.head_dim));
  }
  auto impl = std::make_unique<Impl>();
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&impl->device));
  ROPEKV_CUDA_RETURN_IF_ERROR(
      cudaDeviceGetAttribute(&impl->num_sms, cudaDevAttrMultiProcessorCount, impl->device));
  {
    absl::MutexLock lock(&impl->mu);
    impl->Table(spec, kBaseTable);  // the table every static model uses, built once
  }
  return std::unique_ptr<RerotateEngine>(new RerotateEngine(spec, std::move(impl)));
}

absl::Status RerotateEngine::RerotateCopyCuda(const KvGeometry& geometry,
                                              absl::Span<const RerotateCopy> jobs,
                                              RerotateMode mode, cudaStream_t stream) {
  if (absl::Status s = rope_internal::ValidateJobs(spec_, geometry, jobs); !s.ok()) return s;
  if (!SupportedHeadDim(geometry.head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CUDA re-rotation supports head_dim 64, 80, 96, 128, 256, got ", geometry.head_dim));
  }
  if (static_cast<int64_t>(geometry.layers) * geometry.kv_heads > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("layers * kv_heads must be <= 2^30, got ",
                                                   int64_t{geometry.layers} * geometry.kv_heads));
  }
  int current = -1;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
  if (current != impl_->device) {
    return absl::FailedPreconditionError(absl::StrCat(
        "RerotateEngine was created on device ", impl_->device, ", current device is ", current));
  }

  bool any_rotation = false;
  for (const RerotateCopy& j : jobs) {
    if (j.n_tokens > 0 && !(j.from_pos == j.to_pos && j.from_table == j.to_table)) {
      any_rotation = true;
    }
  }
  const int vec_bytes = ChooseVecBytes(spec_, geometry, jobs, any_rotation);
  if (vec_bytes == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rerotate jobs are misaligned: pointers and strides (bytes) must be multiples of ",
        spec_.layout == PairLayout::kGptj ? 2 * DTypeSize(geometry.dtype)
                                          : DTypeSize(geometry.dtype),
        " for ", DTypeName(geometry.dtype), " ",
        spec_.layout == PairLayout::kGptj ? "GPT-J" : "NeoX", " rotary_dim ", RotaryDim(spec_)));
  }
  const int es = static_cast<int>(DTypeSize(geometry.dtype));
  const int ve = vec_bytes / es;
  const int rotary = RotaryDim(spec_);

  LaunchParams p{};
  p.layers = geometry.layers;
  p.heads = geometry.kv_heads;
  p.head_dim = geometry.head_dim;
  p.rotary_dim = rotary;
  p.exact = mode == RerotateMode::kExact ? 1 : 0;
  p.rot_units =
      any_rotation ? (spec_.layout == PairLayout::kNeox ? rotary / 2 / ve : rotary / ve) : 0;
  p.pass_units = any_rotation ? (geometry.head_dim - rotary) / ve : 0;
  p.rot_tile = any_rotation ? std::max(1, kThreads / (p.rot_units + p.pass_units)) : 1;
  p.copy_units = geometry.head_dim / ve;
  p.copy_tile = std::max(1, kThreads / p.copy_units);

  absl::MutexLock lock(&impl_->mu);
  // Tables used by this launch, each once in the blob.
  absl::flat_hash_map<RopeTableId, int32_t> table_offset;
  std::vector<float> blob;
  auto offset_of = [&](RopeTableId id) {
    auto [it, inserted] = table_offset.emplace(id, static_cast<int32_t>(blob.size()));
    if (inserted) {
      const std::vector<float>& t = impl_->Table(spec_, id);
      blob.insert(blob.end(), t.begin(), t.end());
    }
    return it->second;
  };

  std::vector<DevJob> dev_jobs;
  dev_jobs.reserve(jobs.size());
  int64_t base_blocks = 0;
  for (const RerotateCopy& j : jobs) {
    if (j.n_tokens == 0) continue;
    DevJob d{};
    d.src = j.src;
    d.dst = j.dst;
    d.src_layer = j.src_strides.layer;
    d.src_kv = j.src_strides.kv;
    d.src_head = j.src_strides.head;
    d.src_token = j.src_strides.token;
    d.dst_layer = j.dst_strides.layer;
    d.dst_kv = j.dst_strides.kv;
    d.dst_head = j.dst_strides.head;
    d.dst_token = j.dst_strides.token;
    d.src_token0 = j.src_token;
    d.dst_token0 = j.dst_token;
    d.n_tokens = j.n_tokens;
    d.from_pos = j.from_pos;
    d.to_pos = j.to_pos;
    const bool identity = j.from_pos == j.to_pos && j.from_table == j.to_table;
    if (!identity) {
      d.from_table = offset_of(j.from_table);
      d.to_table = offset_of(j.to_table);
    }
    const int64_t rot_tiles = identity ? 0 : (j.n_tokens + p.rot_tile - 1) / p.rot_tile;
    const int64_t copy_tiles = (j.n_tokens + p.copy_tile - 1) / p.copy_tile;
    d.rot_tiles = static_cast<int32_t>(rot_tiles);
    d.copy_tiles = static_cast<int32_t>(copy_tiles);
    d.copy_parts = (identity ? 1 : 0) + (j.keys_only ? 0 : 1);
    d.first_copy_kv = identity ? 0 : 1;
    if (rot_tiles > INT32_MAX || copy_tiles > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat("rerotate job of ", j.n_tokens, " tokens is too large for one launch"));
    }
    base_blocks += rot_tiles + d.copy_parts * copy_tiles;
    dev_jobs.push_back(d);
  }
  if (dev_jobs.empty()) return absl::OkStatus();

  // Split the layers*heads rows across blocks when there are too few token tiles to fill the GPU.
  const int rows = geometry.layers * geometry.kv_heads;
  const int64_t target = int64_t{impl_->num_sms} * kTargetBlocksPerSm;
  int64_t chunks = std::max<int64_t>(1, (target + base_blocks - 1) / base_blocks);
  chunks = std::min<int64_t>(chunks, std::max(1, rows / kMinRowsPerBlock));
  p.lh_per_chunk = static_cast<int>((rows + chunks - 1) / chunks);
  p.lh_chunks = (rows + p.lh_per_chunk - 1) / p.lh_per_chunk;

  int64_t blocks = 0;
  for (DevJob& d : dev_jobs) {
    d.block_begin = blocks;
    blocks +=
        (static_cast<int64_t>(d.rot_tiles) + int64_t{d.copy_parts} * d.copy_tiles) * p.lh_chunks;
  }
  if (blocks > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("rerotate launch needs ", blocks, " blocks, more than 2^31 - 1"));
  }
  p.num_jobs = static_cast<int>(dev_jobs.size());

  const size_t jobs_bytes = dev_jobs.size() * sizeof(DevJob);
  const size_t bytes = jobs_bytes + blob.size() * sizeof(float);
  absl::StatusOr<Impl::Slot*> slot_or = impl_->AcquireSlot(bytes);
  if (!slot_or.ok()) return slot_or.status();
  Impl::Slot* slot = *slot_or;
  std::memcpy(slot->host, dev_jobs.data(), jobs_bytes);
  if (!blob.empty()) {
    std::memcpy(static_cast<char*>(slot->host) + jobs_bytes, blob.data(),
                blob.size() * sizeof(float));
  }
  ROPEKV_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(slot->device, slot->host, bytes, cudaMemcpyHostToDevice, stream));
  p.jobs = static_cast<const DevJob*>(slot->device);
  p.tables = reinterpret_cast<const float*>(static_cast<const char*>(slot->device) + jobs_bytes);

  const bool gptj = spec_.layout == PairLayout::kGptj;
  cudaError_t err = cudaErrorInvalidValue;
  switch (geometry.dtype) {
    case DType::kF32:
      err = LaunchTyped<float>(vec_bytes, gptj, p, blocks, stream);
      break;
    case DType::kF16:
      err = LaunchTyped<__half>(vec_bytes, gptj, p, blocks, stream);
      break;
    case DType::kBF16:
      err = LaunchTyped<__nv_bfloat16>(vec_bytes, gptj, p, blocks, stream);
      break;
  }
  // Record even after a failed launch so the slot is not reused before its upload finished.
  const cudaError_t rec = cudaEventRecord(slot->done, stream);
  slot->in_flight = rec == cudaSuccess;
  ROPEKV_CUDA_RETURN_IF_ERROR(err);
  ROPEKV_CUDA_RETURN_IF_ERROR(rec);
  return absl::OkStatus();
}

}  // namespace ropekv
