// How fast can a kernel stream a buffer from HBM? Plain 16-byte loads (as TcScoreKernel reads its
// keys) against 1D bulk copies (cp.async.bulk) into per-warp shared-memory stages completing on
// mbarriers. A development experiment for issue 7 (RESULTS run 18), not part of the build:
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/experiments/read_floor.cu -o read_floor
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#define CK(x)                                                                     \
  do {                                                                            \
    cudaError_t e = (x);                                                          \
    if (e != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

// topk_bench's ReadAll and (below) the scorer's streaming load, copied so that this file builds
// alone and measures the same code.
__global__ void ReadAll(const uint4* p, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

__device__ __forceinline__ uint4 LoadStream(const uint4* src) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(src));
  return v;
}

// U independent 16-byte loads a thread in flight, streaming hints, grid-stride over U * threads.
template <int U>
__global__ void ReadUnrolled(const uint4* p, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += U * step) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      v[u] = i + u * step < n ? LoadStream(p + i + u * step) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Each warp owns S stages of C bytes and streams chunks w, w + warps, ... of the buffer; lane 0
// issues the bulk copies, all lanes read each chunk once it lands.
template <int S, int C>
__global__ void __launch_bounds__(128) ReadBulk(const char* p, int64_t chunks, uint32_t* sink) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) uint64_t bars[4][S];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned char* stage = smem + warp * S * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * 4;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * 4 + warp;
  if (lane == 0) {
    for (int s = 0; s < S; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(Smem(&bars[warp][s])));
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncwarp();
  auto issue = [&](int64_t chunk, int s) {
    if (chunk >= chunks) return;
    const uint32_t bar = Smem(&bars[warp][s]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(C)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
            "r"(Smem(stage + s * C)),
        "l"(p + chunk * C), "r"(C), "r"(bar)
        : "memory");
  };
  if (lane == 0) {
    for (int s = 0; s < S; ++s) issue(first + s * stride, s);
  }
  uint32_t acc = 0;
  int s = 0;
  uint32_t phase = 0;
  for (int64_t chunk = first; chunk < chunks; chunk += stride) {
    const uint32_t bar = Smem(&bars[warp][s]);
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{\n.reg .pred q;\nmbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2;\nselp.u32 %0, "
          "1, 0, q;\n}\n"
          : "=r"(done)
          : "r"(bar), "r"(phase)
          : "memory");
    }
    const uint4* src = reinterpret_cast<const uint4*>(stage + s * C);
#pragma unroll
    for (int i = lane; i < C / 16; i += 32) {
      const uint4 v = src[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncwarp();
    if (lane == 0) {
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      issue(chunk + S * stride, s);
    }
    if (++s == S) {
      s = 0;
      phase ^= 1u;
    }
  }
  if (acc == 0x9e3779b9u) sink[0] = acc;
}

template <typename F>
float MedianUs(F f, int reps) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  CK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a));
    f();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.0f);
  }
  CK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

template <int S, int C>
void Bulk(const char* p, int64_t bytes, uint32_t* sink, int sms, int per_sm, int reps) {
  const size_t smem = 4 * S * C;
  CK(cudaFuncSetAttribute(ReadBulk<S, C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          static_cast<int>(smem)));
  int fit = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, ReadBulk<S, C>, 128, smem));
  if (fit < per_sm) return;
  const int64_t chunks = bytes / C;
  const float us = MedianUs(
      [&] { ReadBulk<S, C><<<sms * per_sm, 128, smem>>>(p, chunks, sink); }, reps);
  std::printf("bulk stages %d chunk %5d B blocks/SM %d (in flight/SM %4d KB): %7.2f us  %6.0f GB/s\n",
              S, C, per_sm, 4 * per_sm * S * C / 1024, us, bytes / us / 1e3);
}

int main() {
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const int64_t bytes = int64_t{8} * 131072 * 128 * 2;  // 8 KV heads x 128K tokens x 128 bf16
  char* p = nullptr;
  uint32_t* sink = nullptr;
  char* q = nullptr;
  CK(cudaMalloc(&p, bytes));
  CK(cudaMalloc(&q, bytes));
  CK(cudaMalloc(&sink, 64));
  CK(cudaMemset(p, 0x5a, bytes));
  const int reps = 30;
  std::printf("%s, %d SMs, %.0f MB\n", prop.name, sms, bytes / 1e6);
  const float copy = MedianUs([&] { CK(cudaMemcpyAsync(q, p, bytes, cudaMemcpyDeviceToDevice)); }, reps);
  std::printf("D2D copy: %.2f us, %.0f GB/s (read + write); key read at it %.2f us\n", copy,
              2 * bytes / copy / 1e3, copy / 2);
  for (int pass = 0; pass < 2; ++pass) {
    const int64_t n = bytes / 16;
    std::printf("ReadAll 1024x256 (topk_bench stream_us): %.2f us\n",
                MedianUs([&] { ReadAll<<<1024, 256>>>(reinterpret_cast<uint4*>(p), n, sink); }, reps));
    for (int per_sm : {4, 8, 16}) {
      std::printf("unrolled 4, %2d x 256 a SM: %.2f us\n", per_sm,
                  MedianUs([&] { ReadUnrolled<4><<<sms * per_sm, 256>>>(reinterpret_cast<uint4*>(p), n, sink); }, reps));
      std::printf("unrolled 8, %2d x 256 a SM: %.2f us\n", per_sm,
                  MedianUs([&] { ReadUnrolled<8><<<sms * per_sm, 256>>>(reinterpret_cast<uint4*>(p), n, sink); }, reps));
    }
    for (int per_sm : {1, 2, 3, 4}) {
      Bulk<2, 4096>(p, bytes, sink, sms, per_sm, reps);
      Bulk<3, 4096>(p, bytes, sink, sms, per_sm, reps);
      Bulk<4, 4096>(p, bytes, sink, sms, per_sm, reps);
      Bulk<2, 8192>(p, bytes, sink, sms, per_sm, reps);
      Bulk<3, 8192>(p, bytes, sink, sms, per_sm, reps);
      Bulk<2, 16384>(p, bytes, sink, sms, per_sm, reps);
    }
  }
  return 0;
}
