// CPU emulation of the CUDA subset used by kernels/topk/topk.cu, for run_emulated.sh: one
// cooperative fiber per CUDA thread (ucontext + _setjmp/_longjmp), blocks run one after another,
// __shared__ = static (one block at a time), __syncthreads and warp shuffles are barriers that
// yield, cp.async copies are deferred until cp.async.wait_group. A verification tool, not a GPU.
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/common/dtype.h"

struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
struct uint2 {
  uint32_t x, y;
};
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

struct __half {
  uint16_t x;
};
struct __half2 {
  __half a, b;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline float __half2float(__half h) { return ropekv::HalfToFloat(h.x); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.a), __half2float(h.b)}; }
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int __popc(uint32_t x) { return __builtin_popcount(x); }
inline int __ffs(uint32_t x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __clz(uint32_t x) { return x == 0 ? 32 : __builtin_clz(x); }

template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  return a < b ? a : b;
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

#include <ucontext.h>

#include <csetjmp>
namespace emu {

// Cooperative fibers: every CUDA thread of a block is a fiber of one OS thread; barriers yield.
struct PendingCopy {
  void* dst;
  const void* src;
};
struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  char* stack = nullptr;
  unsigned tid = 0;
  bool done = false;
  std::vector<std::vector<PendingCopy>> groups;
  std::vector<PendingCopy> open;
};
struct Barrier {
  unsigned expected = 0, arrived = 0, generation = 0;
};
struct BlockCtx {
  std::vector<Fiber> fibers;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;
  unsigned char* dyn_smem = nullptr;
  unsigned threads = 0;
  ucontext_t sched;
  jmp_buf sched_jb;
  Fiber* cur = nullptr;
  const std::function<void()>* fn = nullptr;
};

inline dim3 tl_thread, tl_block;
inline dim3 g_grid, g_block_dim;
inline BlockCtx* g_ctx = nullptr;
inline uint64_t g_progress = 0;

inline void Yield() {
  if (!_setjmp(g_ctx->cur->jb)) _longjmp(g_ctx->sched_jb, 1);
}

inline void Arrive(Barrier& b) {
  const unsigned gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    ++g_progress;
    return;
  }
  while (b.generation == gen) Yield();
}
inline void Drop(Barrier& b) {
  --b.expected;
  ++g_progress;
  if (b.expected > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void CpAsync(void* dst, const void* src) { g_ctx->cur->open.push_back({dst, src}); }
inline void CpCommit() {
  Fiber* f = g_ctx->cur;
  f->groups.push_back(std::move(f->open));
  f->open.clear();
}
inline void CpWait(int n) {
  Fiber* f = g_ctx->cur;
  while (static_cast<int>(f->groups.size()) > n) {
    for (auto& c : f->groups.front()) std::memcpy(c.dst, c.src, 16);
    f->groups.erase(f->groups.begin());
  }
}

inline void FiberMain() {
  BlockCtx* ctx = g_ctx;
  (*ctx->fn)();
  Fiber* f = ctx->cur;
  CpWait(0);
  f->done = true;
  Drop(ctx->warp_barriers[f->tid / 32]);
  Drop(ctx->block_barrier);
  _longjmp(ctx->sched_jb, 1);
}

inline char* StackFor(unsigned t) {
  static std::vector<char*> pool;
  while (pool.size() <= t) pool.push_back(static_cast<char*>(std::malloc(128 * 1024)));
  return pool[t];
}

// Runs fn for every thread of every block.
inline void Launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& fn) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x > 1024) {
    std::fprintf(stderr, "emu: bad block %u\n", block.x);
    std::abort();
  }
  g_grid = grid;
  g_block_dim = block;
  std::vector<unsigned char> dyn(smem + 16);
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockCtx ctx;
        ctx.threads = block.x;
        ctx.fn = &fn;
        ctx.block_barrier.expected = block.x;
        const unsigned warps = (block.x + 31) / 32;
        ctx.warp_barriers.resize(warps);
        for (unsigned w = 0; w < warps; ++w)
          ctx.warp_barriers[w].expected = std::min(32u, block.x - w * 32);
        ctx.exchange.assign(block.x, 0);
        if (bx + by + bz == 0) {
          for (size_t i = 0; i < dyn.size(); ++i) dyn[i] = static_cast<unsigned char>(i * 131 + 7);
        }
        ctx.dyn_smem = dyn.data();
        ctx.fibers.resize(block.x);
        g_ctx = &ctx;
        tl_block = dim3(bx, by, bz);
        for (unsigned t = 0; t < block.x; ++t) {
          Fiber& f = ctx.fibers[t];
          f.tid = t;
          f.stack = StackFor(t);
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack;
          f.ctx.uc_stack.ss_size = 128 * 1024;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, FiberMain, 0);
        }
        unsigned alive = block.x;
        while (alive > 0) {
          const uint64_t before = g_progress;
          alive = 0;
          for (unsigned t = 0; t < block.x; ++t) {
            Fiber& f = ctx.fibers[t];
            if (f.done) continue;
            ctx.cur = &f;
            tl_thread = dim3(t, 0, 0);
            if (!_setjmp(ctx.sched_jb)) {
              if (!f.started) {
                f.started = true;
                swapcontext(&ctx.sched, &f.ctx);
              } else {
                _longjmp(f.jb, 1);
              }
            }
            if (!f.done) ++alive;
          }
          if (alive > 0 && g_progress == before) {
            std::fprintf(stderr, "emu: deadlock in block (%u,%u,%u)\n", bx, by, bz);
            std::abort();
          }
        }
        g_ctx = nullptr;
      }
    }
  }
}

template <typename T>
T* DynSmem() {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(g_ctx->dyn_smem) + 15) & ~uintptr_t{15});
}

inline void SyncThreads() { Arrive(g_ctx->block_barrier); }

template <typename T>
T ShflXor(T v, int off) {
  const unsigned t = tl_thread.x;
  const unsigned w = t / 32, lane = t % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_ctx->exchange[t] = bits;
  Arrive(g_ctx->warp_barriers[w]);
  const uint64_t other = g_ctx->exchange[w * 32 + (lane ^ off)];
  Arrive(g_ctx->warp_barriers[w]);
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}
template <typename T>
T ShflIdx(T v, int src) {
  const unsigned t = tl_thread.x;
  const unsigned w = t / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g_ctx->exchange[t] = bits;
  Arrive(g_ctx->warp_barriers[w]);
  const uint64_t other = g_ctx->exchange[w * 32 + src];
  Arrive(g_ctx->warp_barriers[w]);
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}
inline uint32_t Ballot(bool p) {
  const unsigned t = tl_thread.x;
  const unsigned w = t / 32;
  g_ctx->exchange[t] = p ? 1 : 0;
  Arrive(g_ctx->warp_barriers[w]);
  uint32_t m = 0;
  for (unsigned l = 0; l < 32 && w * 32 + l < g_ctx->threads; ++l) {
    if (g_ctx->exchange[w * 32 + l]) m |= 1u << l;
  }
  Arrive(g_ctx->warp_barriers[w]);
  return m;
}

// __reduce_{add,min,max}_sync over the whole warp (unsigned), by butterfly.
template <typename F>
uint32_t ReduceXor(uint32_t v, F f) {
  for (int off = 16; off > 0; off >>= 1) v = f(v, ShflXor(v, off));
  return v;
}

// __match_any_sync over the whole warp: the lanes holding the same value.
inline uint32_t MatchAny(uint32_t v) {
  const unsigned t = tl_thread.x;
  const unsigned w = t / 32;
  g_ctx->exchange[t] = v;
  Arrive(g_ctx->warp_barriers[w]);
  uint32_t m = 0;
  for (unsigned l = 0; l < 32 && w * 32 + l < g_ctx->threads; ++l) {
    if (g_ctx->exchange[w * 32 + l] == v) m |= 1u << l;
  }
  Arrive(g_ctx->warp_barriers[w]);
  return m;
}

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling warp: every lane publishes its
// fragments (A: 4 registers, B: 2), then computes its 4 accumulators from the whole 16x16 A and
// 16x8 B (products exact, sum in double, added in fp32).
inline void MmaBf16(float* c, const uint32_t* a, const uint32_t* b) {
  static std::vector<uint32_t> x(1024 * 6);
  const unsigned t = tl_thread.x;
  const unsigned w = t / 32, lane = t % 32;
  for (int i = 0; i < 4; ++i) x[t * 6 + i] = a[i];
  for (int i = 0; i < 2; ++i) x[t * 6 + 4 + i] = b[i];
  Arrive(g_ctx->warp_barriers[w]);
  auto bf = [](uint32_t word, int hi) {
    const uint32_t bits = (hi ? (word >> 16) : (word & 0xffffu)) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return static_cast<double>(f);
  };
  // A(row, k): lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) + 2 * (k / 8), half k % 2.
  auto A = [&](int row, int k) {
    const unsigned l = w * 32 + (row % 8) * 4 + (k % 8) / 2;
    return bf(x[l * 6 + (row / 8) + 2 * (k / 8)], k % 2);
  };
  // B(k, n): lane n * 4 + (k % 8) / 2, register k / 8, half k % 2.
  auto B = [&](int k, int n) {
    const unsigned l = w * 32 + n * 4 + (k % 8) / 2;
    return bf(x[l * 6 + 4 + k / 8], k % 2);
  };
  const int g = static_cast<int>(lane / 4), tig = static_cast<int>(lane % 4);
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e < 2 ? 0 : 8), col = 2 * tig + (e & 1);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    out[e] = c[e] + static_cast<float>(acc);
  }
  Arrive(g_ctx->warp_barriers[w]);
  for (int e = 0; e < 4; ++e) c[e] = out[e];
}

}  // namespace emu

#define threadIdx (emu::tl_thread)
#define blockIdx (emu::tl_block)
#define blockDim (emu::g_block_dim)
#define gridDim (emu::g_grid)
#define __syncthreads() emu::SyncThreads()
#define __shfl_xor_sync(mask, v, off) emu::ShflXor((v), (off))
#define __shfl_sync(mask, v, src) emu::ShflIdx((v), (src))
#define __ballot_sync(mask, p) emu::Ballot(p)
#define __all_sync(mask, p) (emu::Ballot(p) == 0xffffffffu)  // full warps only
#define __any_sync(mask, p) (emu::Ballot(p) != 0u)
#define __reduce_add_sync(mask, v) emu::ReduceXor((v), [](uint32_t a, uint32_t b) { return a + b; })
#define __reduce_max_sync(mask, v) \
  emu::ReduceXor((v), [](uint32_t a, uint32_t b) { return a > b ? a : b; })
#define __reduce_min_sync(mask, v) \
  emu::ReduceXor((v), [](uint32_t a, uint32_t b) { return a < b ? a : b; })
#define __match_any_sync(mask, v) emu::MatchAny(v)
#define __syncwarp() emu::Arrive(emu::g_ctx->warp_barriers[emu::tl_thread.x / 32])
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)

template <typename T>
inline T __ldcg(const T* p) {
  return std::atomic_ref<T>(*const_cast<T*>(p)).load();
}
inline uint32_t atomicAdd(uint32_t* p, uint32_t v) {
  return std::atomic_ref<uint32_t>(*p).fetch_add(v);
}
inline uint32_t atomicOr(uint32_t* p, uint32_t v) {
  return std::atomic_ref<uint32_t>(*p).fetch_or(v);
}
inline int atomicOr(int* p, int v) { return std::atomic_ref<int>(*p).fetch_or(v); }
inline uint32_t atomicMax(uint32_t* p, uint32_t v) {
  std::atomic_ref<uint32_t> a(*p);
  uint32_t cur = a.load();
  while (cur < v && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
inline unsigned __cvta_generic_to_shared(const void*) { return 0; }

// CUB subset.
namespace cub {
template <typename T, int N>
struct BlockScan {
  struct TempStorage {
    T v[N];
    T total;
  };
  TempStorage& s;
  explicit BlockScan(TempStorage& t) : s(t) {}
  void ExclusiveSum(T in, T& out, T& agg) {
    s.v[threadIdx.x] = in;
    __syncthreads();
    T acc = T();
    for (unsigned i = 0; i < threadIdx.x; ++i) acc += s.v[i];
    T tot = T();
    for (int i = 0; i < N; ++i) tot += s.v[i];
    __syncthreads();
    out = acc;
    agg = tot;
  }
  void ExclusiveSum(T in, T& out) {
    T agg;
    ExclusiveSum(in, out, agg);
  }
};
template <typename T, int N>
struct BlockReduce {
  struct TempStorage {
    T v[N];
  };
  TempStorage& s;
  explicit BlockReduce(TempStorage& t) : s(t) {}
  template <typename Op>
  T Reduce(T in, Op op) {
    s.v[threadIdx.x] = in;
    __syncthreads();
    T r = s.v[0];
    if (threadIdx.x == 0) {
      for (int i = 1; i < N; ++i) r = op(r, s.v[i]);
    }
    __syncthreads();
    return r;
  }
  T Sum(T in) {
    return Reduce(in, [](T a, T b) { return a + b; });
  }
};
}  // namespace cub

// CUDA runtime subset.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorMemoryAllocation = 2,
  cudaErrorNoDevice = 100,
  cudaErrorInsufficientDriver = 35,
  cudaErrorInvalidValue = 1
};
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "ok" : "err"; }
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMemoryClockRate = 36,
  cudaDevAttrGlobalMemoryBusWidth = 37,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline int g_sms = 3;
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
// An H100 SXM's figures: 3 SMs (g_sms), its memory clock (kHz) and bus (bits), 228 KB of shared
// memory an SM.
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount:
      *v = g_sms;
      break;
    case cudaDevAttrMemoryClockRate:
      *v = 2619000;
      break;
    case cudaDevAttrGlobalMemoryBusWidth:
      *v = 5120;
      break;
    default:
      *v = 233472;
  }
  return cudaSuccess;
}
// The H100's figure for the tensor-core scorer (register-bound); the emulator runs blocks one by
// one.
template <typename F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) {
  *n = 4;
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int v) {
  return v <= 232448 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct cudaFuncAttributes {
  size_t sharedSizeBytes = 0;  // static shared memory: not modelled (the 48 KB limit is not)
};
template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, F) {
  *a = cudaFuncAttributes{};
  return cudaSuccess;
}

// Stream capture: operations recorded instead of run.
namespace emu {
inline bool g_capturing = false;
inline std::vector<std::function<void()>> g_captured;
inline void Enqueue(std::function<void()> op) {
  if (g_capturing) {
    g_captured.push_back(std::move(op));
  } else {
    op();
  }
}
}  // namespace emu
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  emu::Enqueue([=] { std::memset(p, v, n); });
  return cudaSuccess;
}

// CUDA runtime API used by the tests.
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal };
constexpr unsigned cudaStreamNonBlocking = 1;
typedef std::vector<std::function<void()>>* cudaGraph_t;
typedef std::vector<std::function<void()>>* cudaGraphExec_t;
inline cudaError_t cudaMalloc(void** p, size_t n) {
  *p = std::aligned_alloc(256, (n + 255) / 256 * 256);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t n) {
  return cudaMalloc(reinterpret_cast<void**>(p), n);
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = reinterpret_cast<cudaStream_t>(0x1234);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
  emu::g_capturing = true;
  emu::g_captured.clear();
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* g) {
  emu::g_capturing = false;
  *g = new std::vector<std::function<void()>>(emu::g_captured);
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* e, cudaGraph_t g, int) {
  *e = new std::vector<std::function<void()>>(*g);
  return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t) {
  for (auto& f : *e) f();
  return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}

struct cudaDeviceProp {
  char name[256];
  int multiProcessorCount;
};
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::strcpy(p->name, "emulated");
  p->multiProcessorCount = g_sms;
  return cudaSuccess;
}
typedef int* cudaEvent_t;
inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new int(0);
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) {
  *ms = 1.0f;
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  emu::Enqueue([=] { std::memcpy(d, s, n); });
  return cudaSuccess;
}
inline float cospif(float x) { return std::cos(3.14159265358979f * x); }

#define EMU_LAUNCH(grid, block, smem, stream, ...) \
  emu::Enqueue([=] { emu::Launch(dim3(grid), dim3(block), (smem), [=] { __VA_ARGS__; }); })

// cudaLaunchKernelEx: launch attributes (programmatic dependent launch) have no meaning here.
enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 3 };
struct cudaLaunchAttributeValue {
  unsigned programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {  // CUDA's field order (gridDim and blockDim are macros here)
  dim3 grid_dim, block_dim;
  size_t dynamic_smem_bytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned num_attrs;
};
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* c, void (*kernel)(P...), A... args) {
  const dim3 g = c->grid_dim, b = c->block_dim;
  const size_t smem = c->dynamic_smem_bytes;
  emu::Enqueue([=] { emu::Launch(g, b, smem, [=] { kernel(args...); }); });
  return cudaSuccess;
}

namespace ropekv {
inline absl::Status CudaStatus(cudaError_t err, const char* expr, const char* file, int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(expr, " failed (", file, ":", line, ")"));
}
}  // namespace ropekv
#define ROPEKV_CUDA_RETURN_IF_ERROR(expr)                                                         \
  do {                                                                                            \
    ::absl::Status _ropekv_cuda_status = ::ropekv::CudaStatus((expr), #expr, __FILE__, __LINE__); \
    if (!_ropekv_cuda_status.ok()) return _ropekv_cuda_status;                                    \
  } while (0)
