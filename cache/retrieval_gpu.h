// The GPU path of the daemon's Select (RetrievalStore::Options::device): runs a SelectRequest whose
// views point into host memory through topk::SelectCuda. The keys (when the mode reads them) and
// the page metadata (page modes) are packed into one dense device buffer each
// ([kv_heads][N][head_dim], [kv_heads][pages][2 * head_dim]), whatever the host view's form (one
// buffer or a list of blocks, any strides), through pinned double-buffered staging; the queries
// follow; SelectCuda runs with a workspace of SelectWorkspaceBytes; indices, counts, scores and
// mass come back. Keys in blocks of page-locked host memory the device can address (the daemon's
// pinned host tier) are not copied: SelectCuda reads them in place over the bus, given only the
// block pointers; keys already in this device's memory (a GPU session's layer, or blocks of the
// GPU tier) are read there.
// Built from retrieval_gpu.cu with CUDA; from retrieval_gpu_nocuda.cc without (Create answers
// UNAVAILABLE, so the store keeps SelectCpu). No CUDA types here.
//
// Device memory is one grow-only arena owned by the object: it grows to the largest request seen
// and is kept (a repeated Select of the same shape allocates nothing) until the object goes. Page
// metadata a request names (MetaName) is also kept on the device, up to `meta_capacity_bytes`
// (least recently used first out): a later request under the same name uploads only the units
// whose names changed (a session's renamed pages, a prefix's rebuilt blocks).
//
// SelectBatch runs many requests (a decode batch's sequences) as one: one upload of all their
// queries and key block lists, their kernels back to back on the stream, one download of all their
// outputs, one synchronisation (Select is a batch of one).
//
// Thread safety: thread-safe. One call at a time runs (the arena, the staging and the object's one
// CUDA stream are behind one mutex); others wait for it. Every call synchronizes its stream before
// it returns.
#ifndef ROPEKV_CACHE_RETRIEVAL_GPU_H_
#define ROPEKV_CACHE_RETRIEVAL_GPU_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kernels/topk/topk.h"

namespace ropekv {

// Whether this build has the CUDA path of Select.
bool RetrievalGpuBuilt();

class RetrievalGpu {
 public:
  // A RetrievalGpu on CUDA device `device` (its stream is made here; memory on first use).
  // UNAVAILABLE without CUDA or a usable GPU; INVALID_ARGUMENT for a device out of range.
  static absl::StatusOr<std::unique_ptr<RetrievalGpu>> Create(int device,
                                                              uint64_t meta_capacity_bytes = 0);

  // Names a request's page metadata so that its device copy outlives the call: `key` names the
  // metadata (a source and a layer); names[i] names the bytes of pages [i * pages_per_unit,
  // (i + 1) * pages_per_unit) (equal names, equal bytes; e.g. SessionReader::PageNames, or a
  // prefix block entry's serial). Views, not owned: they must live through the call.
  struct MetaName {
    absl::string_view key;
    absl::Span<const uint64_t> names;
    int64_t pages_per_unit = 1;
  };
  ~RetrievalGpu();
  RetrievalGpu(const RetrievalGpu&) = delete;
  RetrievalGpu& operator=(const RetrievalGpu&) = delete;

  int device() const { return device_; }

  // Runs `host_req` (queries, keys and page metadata in host memory, as for topk::SelectCpu) on
  // the device and writes `host_result` (host memory, as for SelectCpu; counts, scores and mass
  // may be null). Returns once the results are in host memory. GPU semantics (topk.h): fp32
  // accumulation; NaN in keys, scores or metadata is not checked (a NaN score counts as -inf, a
  // NaN page bound as +inf). Errors:
  // - INVALID_ARGUMENT: those of topk::ValidateSelectRequest (nothing is copied);
  // - UNAVAILABLE: a shape the CUDA path does not take (more than 65535 rows; too many query heads
  //   per KV head for kMax / kSum, see topk::SelectCuda), which SelectCpu does take;
  // - RESOURCE_EXHAUSTED: device (or pinned staging) memory for the request could not be
  //   allocated (the message says how many bytes);
  // - INTERNAL: another CUDA error.
  // On an error host_result may have been partly written.
  // With `meta_name` (page modes), the metadata is read from its device copy, made or updated first
  // (a request whose names do not cover its pages, or that does not fit, is copied as without).
  // `keys_from_one_pool`: the caller knows every key block comes from one pool of memory the
  // device reads at the same address (the pinned host tier: KvCache::host_device_readable; or the
  // GPU tier's arena on this device); only the first and last blocks are checked then, instead of
  // every one (a driver call each: ~0.2 us, 0.4 ms for the 2048 blocks of 32K tokens).
  absl::Status Select(const topk::SelectRequest& host_req, const topk::SelectResult& host_result,
                      const MetaName* meta_name = nullptr, bool keys_from_one_pool = false);

  // One request of SelectBatch: Select's arguments.
  struct BatchItem {
    topk::SelectRequest req;
    topk::SelectResult result;
    const MetaName* meta_name = nullptr;
    bool keys_from_one_pool = false;
  };
  // Runs every item as Select would, in one pass: statuses[i] is what Select(items[i]) answers. An
  // item's own error (a bad request, a shape the CUDA path lacks) fails that item alone; a CUDA
  // error, or no device memory for the batch's arena, fails every item not failed before. Device
  // memory: each item's queries, key block list and outputs, plus the largest item's workspace and
  // staged keys or metadata (items whose keys are staged from pageable memory take turns in one
  // region). Items naming the same metadata share its device copy.
  std::vector<absl::Status> SelectBatch(absl::Span<const BatchItem> items);

  // Builds the page metadata of keys in this device's memory (a dense view, e.g. a GPU session's
  // layer from SessionReader::LayerOnDevice) with topk::BuildPageMetaCuda, the same bits as
  // BuildPageMetaCpu, and writes it to `host_meta` ([kv_heads][pages][2 * head_dim] in the keys'
  // dtype). Returns once it is there. INVALID_ARGUMENT for a view not in this device's memory, a
  // bad shape, or a NaN key (as BuildPageMetaCpu); RESOURCE_EXHAUSTED without room; INTERNAL for
  // another CUDA error.
  absl::Status BuildPageMeta(const topk::MatrixView& device_keys, const topk::PageMetaShape& shape,
                             void* host_meta);

  // Bytes of device memory the arena holds now.
  uint64_t arena_bytes() const;
  // Selects whose keys were read in place (not copied): pinned host blocks, or device memory of
  // this device (a GPU session's keys).
  uint64_t keys_read_in_place() const;
  // Bytes of page metadata kept on the device, and pages of it copied there so far.
  uint64_t meta_bytes() const;
  uint64_t meta_pages_uploaded() const;

  struct Impl;

 private:
  RetrievalGpu(int device, std::unique_ptr<Impl> impl);

  const int device_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_RETRIEVAL_GPU_H_
