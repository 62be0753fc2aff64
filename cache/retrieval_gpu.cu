// RetrievalGpu with CUDA: host views packed into dense device buffers through two pinned staging
// buffers (memcpy of one while the other's copy runs), or keys in pinned blocks read in place; a
// grow-only device arena, one stream.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cache/retrieval_gpu.h"
#include "kernels/common/cuda_check.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace {

// Pinned staging: two buffers of this size.
constexpr uint64_t kStagingBytes = 8ull << 20;
// Alignment of every piece of the arena (SelectCuda's workspace needs 256 bytes).
constexpr uint64_t kAlign = 256;
// The arena grows in steps of at least this much, and by at least a quarter of its size, so that a
// sequence growing by a token per decode step does not reallocate at every step.
constexpr uint64_t kArenaGranule = 2ull << 20;

uint64_t AlignUp(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// Calls fn(src, bytes) for the contiguous host runs of rows [r0, r1) of head h of `v` (width
// elements a row), in row order. A run is as long as the view allows: a whole head of a packed
// buffer, a block's rows, or one row when rows are padded.
template <typename Fn>
absl::Status ForEachRowRun(const topk::MatrixView& v, int h, int64_t r0, int64_t r1, int64_t width,
                           Fn&& fn) {
  const uint64_t es = DTypeSize(v.dtype);
  const uint64_t row_bytes = static_cast<uint64_t>(width) * es;
  const bool packed_rows = v.row_stride == width;
  for (int64_t r = r0; r < r1;) {
    const char* first = nullptr;
    int64_t run = 0;  // rows from r that sit in one buffer
    if (v.blocks == nullptr) {
      first = static_cast<const char*>(v.base) + (h * v.head_stride + r * v.row_stride) * es;
      run = r1 - r;
    } else {
      const int64_t b = r / v.rows_per_block;
      const int64_t in = r % v.rows_per_block;
      first = static_cast<const char*>(v.blocks[b]) + (h * v.head_stride + in * v.row_stride) * es;
      run = std::min(r1 - r, v.rows_per_block - in);
    }
    if (packed_rows) {
      if (absl::Status s = fn(first, run * row_bytes); !s.ok()) return s;
    } else {
      for (int64_t i = 0; i < run; ++i) {
        if (absl::Status s = fn(first + i * v.row_stride * es, row_bytes); !s.ok()) return s;
      }
    }
    r += run;
  }
  return absl::OkStatus();
}

// The same for every head and all `rows` rows: the order of a dense [heads][rows][width] copy.
template <typename Fn>
absl::Status ForEachRun(const topk::MatrixView& v, int heads, int64_t rows, int64_t width,
                        Fn&& fn) {
  for (int h = 0; h < heads; ++h) {
    if (absl::Status s = ForEachRowRun(v, h, 0, rows, width, fn); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// Offsets of the arena's pieces, each kAlign-aligned, in the order they are placed.
struct Placer {
  uint64_t total = 0;
  uint64_t Place(uint64_t bytes) {
    const uint64_t at = total;
    total = AlignUp(total + bytes, kAlign);
    return at;
  }
};

// Whether every block of the blocked view `v` (`rows` rows) is memory `device` reads at the same
// address: page-locked host memory (cudaHostAlloc on a system with unified addressing: the
// daemon's pinned host tier), read over the bus, or memory of `device` itself (the GPU tier), so
// that SelectCuda reads the keys in place instead of a staged copy. A pointer the runtime does not
// know is pageable memory. With `one_pool` (every block from one pool of such memory, as the
// caller knows) the first and last blocks stand for the rest.
bool ReadableInPlace(const topk::MatrixView& v, int64_t rows, int device, bool one_pool) {
  if (v.blocks == nullptr) return false;
  const int64_t blocks = (rows + v.rows_per_block - 1) / v.rows_per_block;
  for (int64_t b = 0; b < blocks; b = one_pool && b < blocks - 1 ? blocks - 1 : b + 1) {
    cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, v.blocks[b]) != cudaSuccess) {
      cudaGetLastError();  // clears the error of an unknown pointer
      return false;
    }
    const bool host = a.type == cudaMemoryTypeHost && a.devicePointer == v.blocks[b];
    const bool here = a.type == cudaMemoryTypeDevice && a.device == device;
    if (!host && !here) return false;
  }
  return true;
}

// Whether the dense view `v` points into device memory of `device` (a GPU session's keys): then
// SelectCuda reads it where it is.
bool OnDevice(const topk::MatrixView& v, int device) {
  if (v.blocks != nullptr || v.base == nullptr) return false;
  cudaPointerAttributes a;
  if (cudaPointerGetAttributes(&a, v.base) != cudaSuccess) {
    cudaGetLastError();  // clears the error of an unknown pointer
    return false;
  }
  return a.type == cudaMemoryTypeDevice && a.device == device;
}

absl::Status Unsupported(const absl::Status& why) {
  return absl::UnavailableError(
      absl::StrCat("the CUDA path of Select does not take this request: ", why.message()));
}

}  // namespace

struct RetrievalGpu::Impl {
  ~Impl() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    cudaSetDevice(device);
    if (stream != nullptr) cudaStreamSynchronize(stream);
    if (arena != nullptr) cudaFree(arena);
    for (auto& [key, m] : metas) cudaFree(m.dev);
    for (int i = 0; i < 2; ++i) {
      if (staging[i] != nullptr) cudaFreeHost(staging[i]);
      if (staged[i] != nullptr) cudaEventDestroy(staged[i]);
    }
    if (stream != nullptr) cudaStreamDestroy(stream);
  }

  // An arena of at least `bytes` (contents not kept). RESOURCE_EXHAUSTED when the device has no
  // room; then the arena is empty.
  absl::Status Reserve(uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (bytes <= arena_bytes) return absl::OkStatus();
    if (arena != nullptr) {
      cudaFree(arena);  // the stream is idle: every call synchronizes it before returning
      arena = nullptr;
      arena_bytes = 0;
    }
    const uint64_t exact = AlignUp(bytes, kArenaGranule);
    const uint64_t grown = AlignUp(std::max(exact, bytes + bytes / 4), kArenaGranule);
    for (uint64_t size : {grown, exact}) {
      void* p = nullptr;
      const cudaError_t err = cudaMalloc(&p, size);
      if (err == cudaSuccess) {
        arena = static_cast<char*>(p);
        arena_bytes = size;
        return absl::OkStatus();
      }
      if (err != cudaErrorMemoryAllocation) {
        return CudaStatus(err, "cudaMalloc", __FILE__, __LINE__);
      }
      cudaGetLastError();  // an out-of-memory error is not sticky; keep later checks clean
    }
    return absl::ResourceExhaustedError(
        absl::StrCat("cudaMalloc of ", exact, " bytes on CUDA device ", device,
                     " for a Select (keys, page metadata, queries, outputs and workspace): out of "
                     "device memory"));
  }

  // The pinned staging buffers and their events, made on first use.
  absl::Status InitStaging() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (staging[1] != nullptr) return absl::OkStatus();
    for (int i = 0; i < 2; ++i) {
      if (staging[i] == nullptr) {
        const cudaError_t err = cudaHostAlloc(reinterpret_cast<void**>(&staging[i]), kStagingBytes,
                                              cudaHostAllocPortable);
        if (err != cudaSuccess) {
          cudaGetLastError();
          staging[i] = nullptr;
          return absl::ResourceExhaustedError(
              absl::StrCat("cudaHostAlloc of ", kStagingBytes,
                           " bytes of pinned staging for Select: ", cudaGetErrorString(err)));
        }
      }
      if (staged[i] == nullptr) {
        ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&staged[i], cudaEventDisableTiming));
      }
    }
    return absl::OkStatus();
  }

  // Page metadata kept on the device across calls under its RetrievalGpu::MetaName key: the
  // request's pages at rows [0, pages) of [heads][cap_pages][width], unit i's bytes named names[i].
  struct DeviceMeta {
    char* dev = nullptr;
    uint64_t bytes = 0;
    int heads = 0;
    int64_t width = 0;
    DType dtype = DType::kBF16;
    int64_t cap_pages = 0;
    int64_t pages_per_unit = 1;
    std::vector<uint64_t> names;  // of the units on the device; fewer: the rest not there yet
    std::list<std::string>::iterator lru;
  };

  void DropMeta(absl::node_hash_map<std::string, DeviceMeta>::iterator it)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    cudaFree(it->second.dev);  // the stream is idle: every call synchronizes it before returning
    meta_bytes -= it->second.bytes;
    meta_lru.erase(it->second.lru);
    metas.erase(it);
  }

  // The device copy of `name`'s metadata for a request of `pages` pages, made (or remade, for
  // another shape or more pages than it holds) room permitting; null when it is not kept (too
  // large, no device memory, or room only by dropping a copy in `in_use`: a batch's earlier items
  // read those).
  DeviceMeta* MetaFor(const RetrievalGpu::MetaName& name, int heads, int64_t pages, int64_t width,
                      DType dtype, const absl::flat_hash_set<std::string>& in_use)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const int64_t ppu = name.pages_per_unit;
    const int64_t units = (pages + ppu - 1) / ppu;
    if (ppu < 1 || static_cast<int64_t>(name.names.size()) != units) return nullptr;
    auto it = metas.find(name.key);
    if (it != metas.end() &&
        (it->second.heads != heads || it->second.width != width || it->second.dtype != dtype ||
         it->second.pages_per_unit != ppu || it->second.cap_pages < pages)) {
      if (in_use.contains(name.key)) return nullptr;
      DropMeta(it);
      it = metas.end();
    }
    if (it == metas.end()) {
      // Room for a quarter more pages: a session growing by decode steps keeps its copy.
      const int64_t cap = (pages + pages / 4 + ppu) / ppu * ppu;
      const uint64_t bytes = static_cast<uint64_t>(heads) * cap * width * DTypeSize(dtype);
      if (bytes > meta_capacity) return nullptr;
      while (meta_bytes + bytes > meta_capacity) {
        if (in_use.contains(meta_lru.back())) return nullptr;
        DropMeta(metas.find(meta_lru.back()));
      }
      void* p = nullptr;
      if (cudaMalloc(&p, bytes) != cudaSuccess) {
        cudaGetLastError();  // an out-of-memory error is not sticky
        return nullptr;
      }
      meta_lru.push_front(std::string(name.key));
      meta_bytes += bytes;
      it = metas
               .emplace(std::string(name.key), DeviceMeta{static_cast<char*>(p),
                                                          bytes,
                                                          heads,
                                                          width,
                                                          dtype,
                                                          cap,
                                                          ppu,
                                                          {},
                                                          meta_lru.begin()})
               .first;
    } else {
      meta_lru.splice(meta_lru.begin(), meta_lru, it->second.lru);
    }
    return &it->second;
  }

  int device = 0;
  cudaStream_t stream = nullptr;
  absl::Mutex mu;
  uint64_t meta_capacity = 0;
  // Node-based: a batch holds pointers to its items' copies while it makes others.
  absl::node_hash_map<std::string, DeviceMeta> metas ABSL_GUARDED_BY(mu);
  std::list<std::string> meta_lru ABSL_GUARDED_BY(mu);  // front = most recent
  uint64_t meta_bytes ABSL_GUARDED_BY(mu) = 0;
  uint64_t meta_pages_uploaded ABSL_GUARDED_BY(mu) = 0;
  char* arena ABSL_GUARDED_BY(mu) = nullptr;  // device
  uint64_t arena_bytes ABSL_GUARDED_BY(mu) = 0;
  uint64_t keys_in_place ABSL_GUARDED_BY(mu) = 0;                  // Selects that read them so
  char* staging[2] ABSL_GUARDED_BY(mu) = {nullptr, nullptr};       // pinned host
  cudaEvent_t staged[2] ABSL_GUARDED_BY(mu) = {nullptr, nullptr};  // staging[i]'s copy is done
};

namespace {

// Host bytes -> device bytes through the two pinned staging buffers: a full buffer's copy is
// enqueued and the other buffer is filled while it runs (once its own previous copy is done).
// Begin(dst) starts a new destination (what is staged for the previous one is enqueued first);
// Finish() enqueues the rest. The caller synchronizes the stream.
class Uploader {
 public:
  explicit Uploader(RetrievalGpu::Impl* impl) : impl_(impl) {}

  absl::Status Begin(char* dst) {
    if (absl::Status s = Flush(); !s.ok()) return s;
    dst_ = dst;
    offset_ = 0;
    return absl::OkStatus();
  }

  absl::Status Add(const char* src, uint64_t n) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    while (n > 0) {
      if (fill_ == kStagingBytes) {
        if (absl::Status s = Flush(); !s.ok()) return s;
      }
      if (fill_ == 0) {
        // This buffer may still be the source of its previous copy.
        ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(impl_->staged[cur_]));
      }
      const uint64_t take = std::min(n, kStagingBytes - fill_);
      std::memcpy(impl_->staging[cur_] + fill_, src, take);
      fill_ += take;
      src += take;
      n -= take;
    }
    return absl::OkStatus();
  }

  absl::Status Finish() { return Flush(); }

 private:
  absl::Status Flush() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    if (fill_ == 0) return absl::OkStatus();
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst_ + offset_, impl_->staging[cur_], fill_,
                                                cudaMemcpyHostToDevice, impl_->stream));
    ROPEKV_CUDA_RETURN_IF_ERROR(cudaEventRecord(impl_->staged[cur_], impl_->stream));
    offset_ += fill_;
    fill_ = 0;
    cur_ ^= 1;
    return absl::OkStatus();
  }

  RetrievalGpu::Impl* impl_;
  char* dst_ = nullptr;
  uint64_t offset_ = 0;  // bytes of dst_ enqueued
  uint64_t fill_ = 0;    // bytes in staging[cur_]
  int cur_ = 0;
};

// Packs the view (heads x rows x width) into dense device memory at dst.
absl::Status UploadView(Uploader& up, const topk::MatrixView& v, int heads, int64_t rows,
                        int64_t width, char* dst) {
  if (absl::Status s = up.Begin(dst); !s.ok()) return s;
  return ForEachRun(v, heads, rows, width,
                    [&](const char* src, uint64_t n) { return up.Add(src, n); });
}

// One item of a batch: what it reads, and where its pieces lie in the arena (byte offsets).
struct ItemPlan {
  absl::Status status;  // not OK: the item is not run
  bool reads_keys = false;
  bool reads_meta = false;
  bool keys_on_device = false;  // dense keys in device memory, read there
  bool keys_in_place = false;   // blocks the device reads: only their list is copied
  bool staged_keys = false;     // copied, dense, to the batch's shared key region
  RetrievalGpu::Impl::DeviceMeta* dm = nullptr;  // the metadata's kept device copy
  uint64_t workspace_bytes = 0;
  uint64_t key_list = 0, key_list_bytes = 0;  // inputs
  uint64_t queries = 0, query_bytes = 0;
  uint64_t indices = 0, index_bytes = 0;  // outputs
  uint64_t counts = 0, count_bytes = 0;
  uint64_t scores = 0, score_bytes = 0;
  uint64_t mass = 0, mass_bytes = 0;

  // The outputs (caller's host pointer, arena offset, bytes): those of `res` that are wanted.
  struct Output {
    void* dst;
    uint64_t offset, bytes;
  };
  std::vector<Output> Outputs(const topk::SelectResult& res) const {
    std::vector<Output> out;
    for (const Output& o :
         {Output{res.indices, indices, index_bytes}, Output{res.counts, counts, count_bytes},
          Output{res.scores, scores, score_bytes}, Output{res.mass, mass, mass_bytes}}) {
      if (o.dst != nullptr && o.bytes != 0) out.push_back(o);
    }
    return out;
  }
};

// Units of `dm` whose names differ from `names` (or that it lacks), as runs [u0, u1).
std::vector<std::pair<int64_t, int64_t>> StaleRuns(const RetrievalGpu::Impl::DeviceMeta& dm,
                                                   absl::Span<const uint64_t> names) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t u = 0; u < static_cast<int64_t>(names.size()); ++u) {
    if (u < static_cast<int64_t>(dm.names.size()) && dm.names[u] == names[u]) continue;
    if (!runs.empty() && runs.back().second == u) {
      runs.back().second = u + 1;
    } else {
      runs.emplace_back(u, u + 1);
    }
  }
  return runs;
}

}  // namespace

bool RetrievalGpuBuilt() { return true; }

absl::StatusOr<std::unique_ptr<RetrievalGpu>> RetrievalGpu::Create(int device,
                                                                   uint64_t meta_capacity_bytes) {
  if (!GpuAvailable()) return absl::UnavailableError("no usable CUDA device");
  int count = 0;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " out of range [0, ", count, ")"));
  }
  auto impl = std::make_unique<Impl>();
  impl->device = device;
  impl->meta_capacity = meta_capacity_bytes;
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking));
  return std::unique_ptr<RetrievalGpu>(new RetrievalGpu(device, std::move(impl)));
}

RetrievalGpu::RetrievalGpu(int device, std::unique_ptr<Impl> impl)
    : device_(device), impl_(std::move(impl)) {}

RetrievalGpu::~RetrievalGpu() = default;

uint64_t RetrievalGpu::arena_bytes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->arena_bytes;
}

uint64_t RetrievalGpu::keys_read_in_place() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->keys_in_place;
}

uint64_t RetrievalGpu::meta_bytes() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->meta_bytes;
}

uint64_t RetrievalGpu::meta_pages_uploaded() const {
  absl::MutexLock lock(&impl_->mu);
  return impl_->meta_pages_uploaded;
}

absl::Status RetrievalGpu::BuildPageMeta(const topk::MatrixView& device_keys,
                                         const topk::PageMetaShape& shape, void* host_meta) {
  if (!OnDevice(device_keys, device_)) {
    return absl::InvalidArgumentError(
        absl::StrCat("BuildPageMeta: the keys are not in the memory of CUDA device ", device_));
  }
  const int64_t pages = topk::NumPages(shape.num_tokens);
  const int64_t width = 2 * static_cast<int64_t>(shape.head_dim);
  const uint64_t bytes =
      static_cast<uint64_t>(shape.kv_heads) * pages * width * DTypeSize(device_keys.dtype);
  const uint64_t flag_at = AlignUp(bytes, kAlign);  // the kernel's NaN flag after the metadata
  absl::MutexLock lock(&impl_->mu);
  ROPEKV_CUDA_RETURN_IF_ERROR(cudaSetDevice(device_));
  if (absl::Status s = impl_->Reserve(flag_at + sizeof(int)); !s.ok()) return s;
  int* nan_seen = reinterpret_cast<int*>(impl_->arena + flag_at);
  int nan_host = 0;
  absl::Status status = CudaStatus(cudaMemsetAsync(nan_seen, 0, sizeof(int), impl_->stream),
                                   "cudaMemsetAsync", __FILE__, __LINE__);
  if (status.ok()) {
    status.Update(topk::BuildPageMetaCuda(
        device_keys, shape, topk::DenseMatrix<void*>(impl_->arena, device_keys.dtype, pages, width),
        impl_->stream, nan_seen));
  }
  if (status.ok()) {
    status.Update(CudaStatus(
        cudaMemcpyAsync(host_meta, impl_->arena, bytes, cudaMemcpyDeviceToHost, impl_->stream),
        "cudaMemcpyAsync", __FILE__, __LINE__));
    status.Update(CudaStatus(
        cudaMemcpyAsync(&nan_host, nan_seen, sizeof(int), cudaMemcpyDeviceToHost, impl_->stream),
        "cudaMemcpyAsync", __FILE__, __LINE__));
  }
  status.Update(CudaStatus(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize", __FILE__,
                           __LINE__));
  if (status.ok() && nan_host != 0) {
    return absl::InvalidArgumentError(
        "the keys hold NaN (page metadata needs finite or infinite keys, as on the CPU)");
  }
  return status;
}

absl::Status RetrievalGpu::Select(const topk::SelectRequest& host_req,
                                  const topk::SelectResult& host_result, const MetaName* meta_name,
                                  bool keys_from_one_pool) {
  BatchItem item;
  item.req = host_req;
  item.result = host_result;
  item.meta_name = meta_name;
  item.keys_from_one_pool = keys_from_one_pool;
  return SelectBatch(absl::MakeConstSpan(&item, 1))[0];
}

std::vector<absl::Status> RetrievalGpu::SelectBatch(absl::Span<const BatchItem> items) {
  const size_t n_items = items.size();
  std::vector<ItemPlan> plans(n_items);
  // What each item reads (as topk::ValidateSelectRequest): only that is copied. No lock needed.
  for (size_t i = 0; i < n_items; ++i) {
    const topk::SelectRequest& req = items[i].req;
    const topk::SelectResult& res = items[i].result;
    ItemPlan& p = plans[i];
    p.status.Update(topk::ValidateSelectRequest(req, res));
    if (!p.status.ok()) continue;
    absl::StatusOr<size_t> workspace = topk::SelectWorkspaceBytes(req, res.mass != nullptr);
    if (!workspace.ok()) {
      p.status.Update(workspace.status().code() == absl::StatusCode::kInvalidArgument
                          ? Unsupported(workspace.status())
                          : workspace.status());
      continue;
    }
    p.workspace_bytes = *workspace;
    p.reads_keys = topk::SelectReadsKeys(req.mode, res.scores != nullptr, res.mass != nullptr);
    p.reads_meta = req.mode != topk::Mode::kExact;
    // Keys in blocks the device reads (pinned host memory, or its own: the GPU tier) are read
    // where they are: only the block pointers go to the device. Dense keys in its memory are read
    // there. Anything else is staged.
    p.keys_on_device = p.reads_keys && OnDevice(req.keys, device_);
    p.keys_in_place =
        p.reads_keys && !p.keys_on_device &&
        ReadableInPlace(req.keys, req.num_tokens, device_, items[i].keys_from_one_pool);
    p.staged_keys = p.reads_keys && !p.keys_on_device && !p.keys_in_place;
  }

  std::vector<absl::Status> statuses(n_items);
  absl::MutexLock lock(&impl_->mu);
  // Fails every item still in the running.
  auto fail_all = [&](const absl::Status& why) {
    for (size_t i = 0; i < n_items; ++i) {
      statuses[i].Update(plans[i].status.ok() ? why : plans[i].status);
    }
    return statuses;
  };
  if (cudaError_t err = cudaSetDevice(device_); err != cudaSuccess) {
    return fail_all(CudaStatus(err, "cudaSetDevice", __FILE__, __LINE__));
  }

  // Named metadata: its device copy (shared by the items that name it).
  absl::flat_hash_set<std::string> in_use;
  for (size_t i = 0; i < n_items; ++i) {
    ItemPlan& p = plans[i];
    const MetaName* name = items[i].meta_name;
    if (!p.status.ok() || !p.reads_meta || name == nullptr) continue;
    const topk::SelectRequest& req = items[i].req;
    p.dm = impl_->MetaFor(*name, req.kv_heads, topk::NumPages(req.num_tokens), 2 * req.head_dim,
                          req.page_meta.dtype, in_use);
    if (p.dm != nullptr) in_use.insert(std::string(name->key));
  }

  // The arena: inputs (every item's key block list and queries, copied in one run), outputs
  // (every item's, copied back in one), then what the items use in turn: the staged keys, the
  // staged metadata, the workspace.
  Placer arena;
  uint64_t staged_key_bytes = 0, staged_meta_bytes = 0, workspace_bytes = 0;
  for (size_t i = 0; i < n_items; ++i) {
    ItemPlan& p = plans[i];
    if (!p.status.ok()) continue;
    const topk::SelectRequest& req = items[i].req;
    const uint64_t d = req.head_dim;
    if (p.keys_in_place) {
      const int64_t blocks =
          (req.num_tokens + req.keys.rows_per_block - 1) / req.keys.rows_per_block;
      p.key_list_bytes = static_cast<uint64_t>(blocks) * sizeof(void*);
      p.key_list = arena.Place(p.key_list_bytes);
    } else if (p.staged_keys) {
      staged_key_bytes =
          std::max(staged_key_bytes, req.kv_heads * req.num_tokens * d * DTypeSize(req.keys.dtype));
    }
    if (p.reads_meta && p.dm == nullptr) {
      staged_meta_bytes =
          std::max(staged_meta_bytes, req.kv_heads * topk::NumPages(req.num_tokens) * 2 * d *
                                          DTypeSize(req.page_meta.dtype));
    }
    p.query_bytes = req.query_heads * d * DTypeSize(req.query_dtype);
    p.queries = arena.Place(p.query_bytes);
    workspace_bytes = std::max<uint64_t>(workspace_bytes, p.workspace_bytes);
  }
  const uint64_t inputs_end = arena.total;
  for (size_t i = 0; i < n_items; ++i) {
    ItemPlan& p = plans[i];
    if (!p.status.ok()) continue;
    const topk::SelectRequest& req = items[i].req;
    const topk::SelectResult& res = items[i].result;
    const uint64_t rows = static_cast<uint64_t>(topk::SelectRows(req));
    const uint64_t capacity = static_cast<uint64_t>(topk::SelectCapacity(req));
    p.index_bytes = rows * capacity * sizeof(int32_t);
    p.indices = arena.Place(p.index_bytes);
    p.count_bytes = rows * sizeof(int32_t);
    p.counts = arena.Place(p.count_bytes);
    if (res.scores != nullptr) {
      p.score_bytes = rows * capacity * sizeof(float);
      p.scores = arena.Place(p.score_bytes);
    }
    if (res.mass != nullptr) {
      p.mass_bytes = rows * sizeof(float);
      p.mass = arena.Place(p.mass_bytes);
    }
  }
  const uint64_t outputs_end = arena.total;
  const uint64_t staged_keys = arena.Place(staged_key_bytes);
  const uint64_t staged_meta = arena.Place(staged_meta_bytes);
  const uint64_t workspace = arena.Place(workspace_bytes);
  if (absl::Status s = impl_->Reserve(arena.total); !s.ok()) return fail_all(s);
  if (absl::Status s = impl_->InitStaging(); !s.ok()) return fail_all(s);
  char* base = impl_->arena;
  // The outputs come back through the first staging buffer when they fit (one copy), else item by
  // item into the callers' memory.
  const uint64_t output_bytes = outputs_end - inputs_end;
  const bool download_staged = output_bytes <= kStagingBytes;

  // Whatever happens below, nothing of this call is in flight once it returns (the staging and
  // the arena are the next call's).
  absl::Status status = [&]() -> absl::Status {
    cudaStream_t st = impl_->stream;
    Uploader up(impl_.get());
    // The inputs, as one run of bytes: the gaps between pieces are zeros.
    static constexpr char kZeros[kAlign] = {};
    uint64_t at = 0;
    auto add_at = [&](uint64_t offset, const void* src, uint64_t n) -> absl::Status {
      if (absl::Status s = up.Add(kZeros, offset - at); !s.ok()) return s;
      at = offset + n;
      return up.Add(static_cast<const char*>(src), n);
    };
    if (absl::Status s = up.Begin(base); !s.ok()) return s;
    for (size_t i = 0; i < n_items; ++i) {
      const ItemPlan& p = plans[i];
      if (!p.status.ok()) continue;
      if (p.keys_in_place) {
        if (absl::Status s = add_at(p.key_list, items[i].req.keys.blocks, p.key_list_bytes);
            !s.ok()) {
          return s;
        }
      }
      if (absl::Status s = add_at(p.queries, items[i].req.queries, p.query_bytes); !s.ok()) {
        return s;
      }
    }
    if (absl::Status s = up.Finish(); !s.ok()) return s;

    for (size_t i = 0; i < n_items; ++i) {
      ItemPlan& p = plans[i];
      if (!p.status.ok()) continue;
      const topk::SelectRequest& host_req = items[i].req;
      const int heads = host_req.kv_heads;
      const int64_t n = host_req.num_tokens;
      const int64_t pages = topk::NumPages(n);
      const int64_t d = host_req.head_dim;
      topk::SelectRequest req = host_req;
      if (p.keys_in_place) {
        req.keys.blocks = reinterpret_cast<const void* const*>(base + p.key_list);
      } else if (p.staged_keys) {
        absl::Status s = UploadView(up, host_req.keys, heads, n, d, base + staged_keys);
        if (!s.ok()) return s;
        req.keys = topk::DenseMatrix<const void*>(base + staged_keys, host_req.keys.dtype, n, d);
      } else if (!p.keys_on_device) {
        req.keys = topk::MatrixView();
      }
      const uint64_t meta_row_bytes = 2 * d * DTypeSize(host_req.page_meta.dtype);
      if (p.dm != nullptr) {
        // The renamed units, head by head, to their rows of the device copy.
        const MetaName& name = *items[i].meta_name;
        const int64_t ppu = name.pages_per_unit;
        const std::vector<std::pair<int64_t, int64_t>> runs = StaleRuns(*p.dm, name.names);
        p.dm->names.clear();  // until every copy below is enqueued
        for (const auto& [u0, u1] : runs) {
          const int64_t r0 = u0 * ppu, r1 = std::min(u1 * ppu, pages);
          for (int h = 0; h < heads; ++h) {
            char* dst = p.dm->dev + (h * p.dm->cap_pages + r0) * meta_row_bytes;
            if (absl::Status s = up.Begin(dst); !s.ok()) return s;
            absl::Status s =
                ForEachRowRun(host_req.page_meta, h, r0, r1, 2 * d,
                              [&](const char* src, uint64_t bytes) { return up.Add(src, bytes); });
            if (!s.ok()) return s;
          }
          impl_->meta_pages_uploaded += r1 - r0;
        }
        p.dm->names.assign(name.names.begin(), name.names.end());
        req.page_meta =
            topk::DenseMatrix<const void*>(p.dm->dev, host_req.page_meta.dtype, pages, 2 * d);
        req.page_meta.head_stride = p.dm->cap_pages * 2 * d;
      } else if (p.reads_meta) {
        absl::Status s =
            UploadView(up, host_req.page_meta, heads, pages, 2 * d, base + staged_meta);
        if (!s.ok()) return s;
        req.page_meta = topk::DenseMatrix<const void*>(base + staged_meta, host_req.page_meta.dtype,
                                                       pages, 2 * d);
      } else {
        req.page_meta = topk::MatrixView();
      }
      if (absl::Status s = up.Finish(); !s.ok()) return s;
      req.queries = base + p.queries;

      topk::SelectResult result;
      result.indices = reinterpret_cast<int32_t*>(base + p.indices);
      result.counts = reinterpret_cast<int32_t*>(base + p.counts);
      if (p.score_bytes != 0) result.scores = reinterpret_cast<float*>(base + p.scores);
      if (p.mass_bytes != 0) result.mass = reinterpret_cast<float*>(base + p.mass);
      const absl::Status s = topk::SelectCuda(req, result, base + workspace, workspace_bytes, st);
      if (s.code() == absl::StatusCode::kInvalidArgument) {
        p.status.Update(Unsupported(s));  // nothing was launched for it
        continue;
      }
      if (!s.ok()) return s;
      if (p.keys_in_place || p.keys_on_device) ++impl_->keys_in_place;
    }

    if (download_staged) {
      if (output_bytes == 0) return absl::OkStatus();
      ROPEKV_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(impl_->staging[0], base + inputs_end,
                                                  output_bytes, cudaMemcpyDeviceToHost, st));
      return absl::OkStatus();
    }
    for (size_t i = 0; i < n_items; ++i) {
      if (!plans[i].status.ok()) continue;
      for (const ItemPlan::Output& o : plans[i].Outputs(items[i].result)) {
        ROPEKV_CUDA_RETURN_IF_ERROR(
            cudaMemcpyAsync(o.dst, base + o.offset, o.bytes, cudaMemcpyDeviceToHost, st));
      }
    }
    return absl::OkStatus();
  }();
  status.Update(CudaStatus(cudaStreamSynchronize(impl_->stream), "cudaStreamSynchronize", __FILE__,
                           __LINE__));
  if (!status.ok()) {
    // A copy may be half updated: drop the batch's.
    for (const std::string& key : in_use) {
      auto it = impl_->metas.find(key);
      if (it != impl_->metas.end()) impl_->DropMeta(it);
    }
    return fail_all(status);
  }
  for (size_t i = 0; i < n_items; ++i) {
    const ItemPlan& p = plans[i];
    statuses[i].Update(p.status);
    if (!p.status.ok() || !download_staged) continue;
    for (const ItemPlan::Output& o : p.Outputs(items[i].result)) {
      std::memcpy(o.dst, impl_->staging[0] + (o.offset - inputs_end), o.bytes);  // staged copy
    }
  }
  return statuses;
}

}  // namespace ropekv
