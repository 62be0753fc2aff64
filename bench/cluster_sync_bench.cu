// cluster_sync_bench: what a barrier costs inside one block and across a thread-block cluster,
// and what one radix pass of the one-block selections (BlockTopK) costs on one SM against the
// same pass spread over a cluster of 8 blocks whose histograms are summed through distributed
// shared memory. It decided that the chunk selection stays one block a row (bench/RESULTS.md,
// run 9). sm_90 or later.
//
//   cluster_sync_bench
//
// Prints cycles (clock64 of thread 0, the slowest block) per iteration.

#include <cooperative_groups.h>

#include <cstdint>
#include <cstdio>

namespace cg = cooperative_groups;

namespace ropekv {
namespace {

constexpr int kClusterBlocks = 8;
constexpr int kBins = 256;

__global__ void BlockSyncLoop(long long* out, int iters) {
  __syncthreads();
  const long long t0 = clock64();
  for (int i = 0; i < iters; ++i) __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = (clock64() - t0) / iters;
}

__global__ void __cluster_dims__(kClusterBlocks, 1, 1) ClusterSyncLoop(long long* out, int iters) {
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const long long t0 = clock64();
  for (int i = 0; i < iters; ++i) cluster.sync();
  if (threadIdx.x == 0) out[blockIdx.x] = (clock64() - t0) / iters;
}

// Keys spread over the bins, as a radix pass over distinct scores sees them.
__device__ uint32_t Key(int j) {
  return threadIdx.x * 2654435761u + static_cast<uint32_t>(j) * 40503u + blockIdx.x * 7u;
}

// The warp-0 part of a pass: an inclusive scan over 8 bins a lane, result to *digit.
__device__ void ScanBins(const uint32_t* bins, uint32_t* digit) {
  if (threadIdx.x >= 32) return;
  const int lane = threadIdx.x;
  uint32_t c = 0;
  for (int j = 0; j < 8; ++j) c += bins[lane * 8 + j];
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t o = __shfl_up_sync(0xffffffffu, c, off);
    if (lane >= off) c += o;
  }
  if (lane == 31) *digit = c;
}

// Iteration `it` of a pass: clears the other of the two histograms (its last readers finished
// before the caller's last barrier) and adds the thread's PER keys to this one, which it returns.
template <int PER>
__device__ uint32_t* AddKeys(uint32_t (&hist)[2][kBins], int it) {
  uint32_t* bins = hist[it & 1];
  if (threadIdx.x < kBins) hist[(it + 1) & 1][threadIdx.x] = 0;
  for (int j = 0; j < PER; ++j) atomicAdd(&bins[(Key(j) + it) % kBins], 1u);
  return bins;
}

// One block: PER keys a thread into a shared histogram, a barrier, warp 0 scans, a barrier.
template <int PER>
__global__ void BlockPass(long long* out, int iters) {
  __shared__ uint32_t hist[2][kBins];
  __shared__ uint32_t digit;
  if (threadIdx.x < kBins) hist[0][threadIdx.x] = 0;
  __syncthreads();
  uint32_t acc = 0;
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    uint32_t* bins = AddKeys<PER>(hist, it);
    __syncthreads();
    ScanBins(bins, &digit);
    __syncthreads();
    acc += digit;
  }
  if (threadIdx.x == 0) out[blockIdx.x] = (clock64() - t0) / iters + (acc == 1u ? 1 : 0);
}

// A cluster of 8 blocks: each its share of the keys into its own histogram, a cluster barrier,
// every block sums the 8 histograms through distributed shared memory, a barrier, warp 0 scans,
// a barrier.
template <int PER>
__global__ void __cluster_dims__(kClusterBlocks, 1, 1) ClusterPass(long long* out, int iters) {
  __shared__ uint32_t hist[2][kBins];
  __shared__ uint32_t total[kBins];
  __shared__ uint32_t digit;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x < kBins) hist[0][threadIdx.x] = 0;
  cluster.sync();
  uint32_t acc = 0;
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    // The other histogram's last remote readers finished before the last cluster barrier.
    uint32_t* bins = AddKeys<PER>(hist, it);
    cluster.sync();
    if (threadIdx.x < kBins) {
      uint32_t sum = 0;
      for (int r = 0; r < kClusterBlocks; ++r) sum += cluster.map_shared_rank(bins, r)[threadIdx.x];
      total[threadIdx.x] = sum;
    }
    __syncthreads();
    ScanBins(total, &digit);
    __syncthreads();
    acc += digit;
  }
  if (threadIdx.x == 0) out[blockIdx.x] = (clock64() - t0) / iters + (acc == 1u ? 1 : 0);
  cluster.sync();
}

int Main() {
  constexpr int kMaxBlocks = 64;
  long long* d = nullptr;
  long long h[kMaxBlocks];
  if (cudaMalloc(&d, sizeof(h)) != cudaSuccess) {
    std::fprintf(stderr, "cluster_sync_bench: no GPU\n");
    return 1;
  }
  auto show = [&](const char* what, int threads, int blocks) {
    const cudaError_t e = cudaDeviceSynchronize();
    cudaMemcpy(h, d, blocks * sizeof(long long), cudaMemcpyDeviceToHost);
    long long worst = 0;
    for (int i = 0; i < blocks; ++i) worst = h[i] > worst ? h[i] : worst;
    std::printf("%-44s %5d threads  %s  %lld cycles\n", what, threads,
                e == cudaSuccess ? "ok" : cudaGetErrorString(e), worst);
  };
  for (int threads : {256, 512, 1024}) {
    BlockSyncLoop<<<kMaxBlocks, threads>>>(d, 1000);
    show("__syncthreads", threads, kMaxBlocks);
    ClusterSyncLoop<<<kMaxBlocks, threads>>>(d, 1000);
    show("cluster.sync (8 blocks)", threads, kMaxBlocks);
  }
  // 8192 keys a row: one block, or 8 blocks of a cluster.
  BlockPass<8><<<8, 1024>>>(d, 200);
  show("radix pass, one block, 8 keys a thread", 1024, 8);
  BlockPass<32><<<8, 256>>>(d, 200);
  show("radix pass, one block, 32 keys a thread", 256, 8);
  ClusterPass<1><<<kMaxBlocks, 1024>>>(d, 200);
  show("radix pass, cluster of 8, 1 key a thread", 1024, kMaxBlocks);
  ClusterPass<2><<<kMaxBlocks, 512>>>(d, 200);
  show("radix pass, cluster of 8, 2 keys a thread", 512, kMaxBlocks);
  ClusterPass<4><<<kMaxBlocks, 256>>>(d, 200);
  show("radix pass, cluster of 8, 4 keys a thread", 256, kMaxBlocks);
  cudaFree(d);
  return 0;
}

}  // namespace
}  // namespace ropekv

int main() { return ropekv::Main(); }
