#include "cache/dataplane.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/functional/function_ref.h"
#include "absl/strings/str_cat.h"
#include "cache/cuda_ipc.h"
#include "cache/parallel.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rerotate_cuda.h"

namespace ropekv {
namespace {

// Device scratch of a paged copy to or from a GPU buffer: blocks move through it in chunks.
constexpr uint64_t kPagedScratchBytes = 64ull << 20;

// Whether keys of this model can be re-rotated on the GPU (else a GPU destination takes the
// CPU-and-staging path).
bool GpuRotates(const BufferLease& lease, const ModelSpec& spec) {
  return lease.transfer() != nullptr && RerotateEngine::SupportedHeadDim(spec.head_dim);
}

// Where block i of a read goes: one rotation from where it was stored to `target` + i blocks
// (nullopt, or pre-RoPE keys: where it is).
int64_t TargetOf(const BlockInfo& b, size_t i, int block_tokens, std::optional<int64_t> target) {
  if (!target.has_value() || b.pre_rope) return b.rotated_at;
  return *target + static_cast<int64_t>(i) * block_tokens;
}

// Block i of `handle` into page `page` of the lease's paged layout; src is the block's bytes
// (host, or device scratch for a GPU buffer), dst the layout's first byte.
RerotateCopy PageJob(const ReadHandle& handle, size_t i, const void* src, void* dst, uint32_t page,
                     std::optional<int64_t> target, const PagedLayout& layout) {
  const ModelSpec& spec = handle.model().spec;
  const BlockInfo& b = handle.blocks()[i];
  return RerotateCopy{src,
                      BlockStrides(spec),
                      0,
                      dst,
                      layout.strides(),
                      int64_t{page} * spec.block_tokens,
                      spec.block_tokens,
                      b.rotated_at,
                      b.rope_table,
                      TargetOf(b, i, spec.block_tokens, target),
                      b.rope_table};
}

// Get into pages of a paged layout (the lease covers the whole layout).
absl::Status GetToPages(const ReadHandle& handle, BufferLease& lease,
                        const std::vector<uint32_t>& ids, std::optional<int64_t> target,
                        int copy_threads) {
  const ModelSpec& spec = handle.model().spec;
  const PagedLayout& layout = *lease.paged();
  const uint64_t bb = handle.block_bytes();
  const size_t n = handle.blocks().size();
  absl::Status s;
  if (CudaIpcTransfer* gpu = lease.transfer(); gpu != nullptr) {
    // Blocks as stored into device scratch (DMA from the pinned host tier), then one kernel
    // launch per chunk moves them into their pages, re-rotating keys on the way.
    const uint64_t chunk = std::max<uint64_t>(1, kPagedScratchBytes / bb);
    auto scratch = gpu->Scratch(std::min<uint64_t>(chunk, n) * bb);
    if (!scratch.ok()) return scratch.status();
    uint8_t* base = static_cast<uint8_t*>(*scratch);
    std::vector<RerotateCopy> jobs;
    for (size_t first = 0; s.ok() && first < n; first += chunk) {
      const size_t end = std::min<size_t>(n, first + chunk);
      jobs.clear();
      for (size_t i = first; s.ok() && i < end; ++i) {
        uint8_t* block = base + (i - first) * bb;
        s = gpu->Upload(block, handle.bytes(i).data(), bb);
        jobs.push_back(PageJob(handle, i, block, lease.device_data(), ids[i], target, layout));
      }
      if (s.ok()) s = gpu->Rerotate(layout.model_id, spec.rope, BlockGeometry(spec), jobs);
    }
  } else {
    s = ForEachParallel(n, copy_threads, [&](uint64_t i) {
      const RerotateCopy job =
          PageJob(handle, i, handle.bytes(i).data(), lease.host_data(), ids[i], target, layout);
      return RerotateCopyCpu(spec.rope, BlockGeometry(spec), absl::MakeConstSpan(&job, 1));
    });
  }
  if (s.ok()) lease.CountWritten(n * bb);
  absl::Status finished = lease.Finish();
  return s.ok() ? finished : s;
}

// Re-rotated Get into a GPU buffer, block layout: the blocks as stored by DMA straight from the
// host tier, then their keys re-rotated in place by one kernel launch.
absl::Status GetToGpuRerotated(const ReadHandle& handle, BufferLease& lease, int64_t target) {
  const ModelSpec& spec = handle.model().spec;
  const KvStrides strides = BlockStrides(spec);
  const uint64_t bb = handle.block_bytes();
  CudaIpcTransfer& gpu = *lease.transfer();
  std::vector<RerotateCopy> jobs;
  absl::Status s;
  for (size_t i = 0; s.ok() && i < handle.blocks().size(); ++i) {
    s = lease.Write(i * bb, handle.bytes(i).data(), bb);
    const BlockInfo& b = handle.blocks()[i];
    const int64_t to = TargetOf(b, i, spec.block_tokens, target);
    if (to == b.rotated_at) continue;
    void* block = static_cast<uint8_t*>(lease.device_data()) + i * bb;
    jobs.push_back(RerotateCopy{block, strides, 0, block, strides, 0, spec.block_tokens,
                                b.rotated_at, b.rope_table, to, b.rope_table,
                                /*keys_only=*/true});
  }
  if (s.ok()) s = gpu.Rerotate(handle.model().id, spec.rope, BlockGeometry(spec), jobs);
  absl::Status finished = lease.Finish();
  return s.ok() ? finished : s;
}

// Compose into a GPU buffer: each block piece as stored into its place of the prompt layout (one
// 2-D copy from the host tier: its rows are the [layer][k|v][kv_head] rows of the prompt), then
// every moved key re-rotated in place by one kernel launch. The parts are held again here (the
// ComposedPrompt holds them too, so they are the blocks it planned).
absl::Status ComposeToGpu(KvCache& cache, absl::string_view tenant,
                          const std::vector<ComposePart>& parts, const ComposedPrompt& prompt,
                          const RegisteredModel& model, BufferLease& lease) {
  const ModelSpec& spec = model.spec;
  const int64_t bt = spec.block_tokens, hd = spec.head_dim;
  const uint64_t es = DTypeSize(spec.dtype);
  const int64_t total = prompt.total_tokens();
  const KvStrides out{2 * spec.kv_heads * total * hd, spec.kv_heads * total * hd, total * hd, hd};
  const uint64_t rows = uint64_t{2} * spec.layers * spec.kv_heads;
  uint8_t* base = static_cast<uint8_t*>(lease.device_data());
  std::vector<ReadHandle> handles;  // the host bytes stay put until Finish
  std::vector<RerotateCopy> jobs;
  absl::Status s;
  int64_t at = 0;  // the part's first token in the prompt
  for (size_t p = 0; s.ok() && p < parts.size(); ++p) {
    const ComposePart& part = parts[p];
    auto handle = part.segment ? cache.AcquireSegment(model.id, tenant, part.tokens)
                               : cache.AcquirePrefix(model.id, tenant, part.tokens, 0);
    if (!handle.ok()) {
      s = handle.status();
      break;
    }
    if (handle->matched_tokens() != part.tokens.size()) {
      s = absl::InternalError(absl::StrCat("part ", p, " changed under Compose"));
      break;
    }
    for (size_t b = 0; s.ok() && b < handle->blocks().size(); ++b) {
      const BlockInfo& block = handle->blocks()[b];
      const int64_t offset = static_cast<int64_t>(b) * bt;
      const int64_t n = std::min<int64_t>(bt, static_cast<int64_t>(part.tokens.size()) - offset);
      s = lease.transfer()->Upload2D(base + (at + offset) * hd * es, total * hd * es,
                                     handle->bytes(b).data(), bt * hd * es, n * hd * es, rows);
      const int64_t to = prompt.parts()[p].position + offset;
      if (block.pre_rope || block.rotated_at == to) continue;
      jobs.push_back(RerotateCopy{base, out, at + offset, base, out, at + offset, n,
                                  block.rotated_at, block.rope_table, to, block.rope_table,
                                  /*keys_only=*/true});
    }
    at += static_cast<int64_t>(part.tokens.size());
    handles.push_back(*std::move(handle));
  }
  if (s.ok()) s = lease.transfer()->Rerotate(model.id, spec.rope, BlockGeometry(spec), jobs);
  if (s.ok()) lease.CountWritten(static_cast<uint64_t>(spec.layers) * prompt.layer_bytes());
  absl::Status finished = lease.Finish();  // before `handles` go: copies read their bytes
  return s.ok() ? finished : s;
}

// a * b, or INVALID_ARGUMENT when it does not fit in 64 bits.
absl::StatusOr<uint64_t> Product(uint64_t a, uint64_t b, absl::string_view what) {
  uint64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", a, " x ", b, " bytes overflow"));
  }
  return out;
}

// Put from pages of a paged layout: each page gathered back into block layout (bit for bit), then
// handed to the writer. `ids` must name one page per block of the Put.
absl::Status PutFromPages(const RegisteredModel& model, const std::vector<uint32_t>& ids,
                          BufferLease& lease, PutWriter& writer) {
  const ModelSpec& spec = model.spec;
  const PagedLayout& layout = *lease.paged();
  const uint64_t bb = BlockBytes(spec);
  const uint64_t n = writer.expected_bytes() / bb;
  if (ids.size() != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("the Put has ", n, " blocks, got ", ids.size(), " block ids"));
  }
  auto job = [&](size_t i, const void* pages, void* block) {
    return RerotateCopy{pages,
                        layout.strides(),
                        int64_t{ids[i]} * spec.block_tokens,
                        block,
                        BlockStrides(spec),
                        0,
                        spec.block_tokens,
                        0,
                        0,
                        0,
                        0};
  };
  absl::Status s;
  if (CudaIpcTransfer* gpu = lease.transfer(); gpu != nullptr) {
    const uint64_t chunk = std::max<uint64_t>(1, kPagedScratchBytes / bb);
    auto scratch = gpu->Scratch(std::min<uint64_t>(chunk, n) * bb);
    if (!scratch.ok()) return scratch.status();
    uint8_t* base = static_cast<uint8_t*>(*scratch);
    std::vector<RerotateCopy> jobs;
    for (uint64_t first = 0; s.ok() && first < n; first += chunk) {
      const uint64_t end = std::min(n, first + chunk);
      jobs.clear();
      for (uint64_t i = first; i < end; ++i) {
        jobs.push_back(job(i, lease.device_data(), base + (i - first) * bb));
      }
      s = gpu->Rerotate(model.id, spec.rope, BlockGeometry(spec), jobs);
      if (s.ok()) {
        s = gpu->Download(base, (end - first) * bb, [&](const void* p) {
          return writer.Write(absl::string_view(static_cast<const char*>(p), (end - first) * bb));
        });
      }
    }
  } else {
    std::vector<uint8_t> block(bb);
    for (uint64_t i = 0; s.ok() && i < n; ++i) {
      const RerotateCopy j = job(i, lease.host_data(), block.data());
      s = RerotateCopyCpu(spec.rope, BlockGeometry(spec), absl::MakeConstSpan(&j, 1));
      if (s.ok()) {
        s = writer.Write(absl::string_view(reinterpret_cast<const char*>(block.data()), bb));
      }
    }
  }
  if (s.ok()) lease.CountRead(n * bb);
  return s;
}

}  // namespace

absl::StatusOr<GetToBufferResult> GetToBuffer(KvCache& cache, BufferRegistry& buffers,
                                              const GetToBufferArgs& args) {
  if (args.target_position.has_value() && *args.target_position < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("target_position must be >= 0, got ", *args.target_position));
  }
  const std::vector<uint32_t>& ids = args.dst.block_ids;
  uint32_t max_blocks = args.max_blocks;
  if (!ids.empty()) {  // one page per block: no more blocks than pages
    const uint32_t pages = static_cast<uint32_t>(std::min<size_t>(ids.size(), UINT32_MAX));
    max_blocks = max_blocks == 0 ? pages : std::min(max_blocks, pages);
  }
  auto handle = cache.AcquirePrefix(args.model, args.tenant, args.tokens, max_blocks);
  if (!handle.ok()) return handle.status();
  const uint64_t bb = handle->block_bytes();
  const size_t n = handle->blocks().size();
  auto bytes = Product(n, bb, "Get");
  if (!bytes.ok()) return bytes.status();
  auto lease = ids.empty() ? buffers.Acquire(args.dst, *bytes)
                           : buffers.AcquirePages(args.dst, handle->model().id);
  if (!lease.ok()) return lease.status();
  const int64_t block_tokens = handle->model().spec.block_tokens;
  absl::Status s;
  if (!ids.empty()) {
    s = GetToPages(*handle, **lease, ids, args.target_position, args.copy_threads);
  } else if (args.target_position.has_value() && GpuRotates(**lease, handle->model().spec)) {
    s = GetToGpuRerotated(*handle, **lease, *args.target_position);
  } else if (!args.target_position.has_value() && (*lease)->kind() == BufferKind::kCudaIpc) {
    // As stored, to a GPU buffer: DMA straight from the tier's (pinned) host copies, no staging.
    for (size_t i = 0; s.ok() && i < n; ++i) {
      s = (*lease)->Write(i * bb, handle->bytes(i).data(), bb);
    }
    absl::Status finished = (*lease)->Finish();
    if (s.ok()) s = finished;
  } else {
    // Shared memory (blocks split among copy_threads), or a re-rotated Get to a GPU buffer the
    // kernel cannot serve (rotated into pinned staging, then copied): one rotation from the
    // stored copy.
    s = (*lease)->ProduceParallel(n, bb, args.copy_threads, [&](uint64_t i, void* dst) {
      if (!args.target_position.has_value()) {
        std::memcpy(dst, handle->bytes(i).data(), bb);
        return absl::OkStatus();
      }
      return handle->CopyBlock(i, dst,
                               *args.target_position + static_cast<int64_t>(i) * block_tokens);
    });
  }
  if (!s.ok()) return s;
  GetToBufferResult r;
  r.matched_tokens = handle->matched_tokens();
  r.block_bytes = bb;
  r.blocks = handle->blocks();
  r.bytes_written = *bytes;
  return r;
}

absl::StatusOr<PutFromBufferResult> PutFromBuffer(KvCache& cache, BufferRegistry& buffers,
                                                  PutOptions options, const BufferRange& src) {
  // Pieces of one block, so that a GPU buffer stages one block at a time.
  auto model = cache.ResolveModel(options.model);
  if (!model.ok()) return model.status();
  const uint64_t block_bytes = BlockBytes(model->spec);
  auto writer = cache.BeginPut(std::move(options));
  if (!writer.ok()) return writer.status();
  const uint64_t total = (*writer)->expected_bytes();
  auto lease =
      src.block_ids.empty() ? buffers.Acquire(src, total) : buffers.AcquirePages(src, model->id);
  if (!lease.ok()) return lease.status();
  absl::Status s;
  if (!src.block_ids.empty()) {
    s = PutFromPages(*model, src.block_ids, **lease, **writer);
  } else {
    const uint64_t step = (*lease)->kind() == BufferKind::kShm ? total : block_bytes;
    for (uint64_t at = 0; s.ok() && at < total; at += step) {
      const uint64_t n = std::min(step, total - at);
      s = (*lease)->Consume(at, n, [&](const void* p) {
        return (*writer)->Write(absl::string_view(static_cast<const char*>(p), n));
      });
    }
  }
  // The lease must end clean before the Put commits: bytes read from a region the client shrank
  // under the copy are not the client's.
  absl::Status finished = (*lease)->Finish();
  if (!s.ok()) return s;
  if (!finished.ok()) return finished;
  auto put = (*writer)->Finish();
  if (!put.ok()) return put.status();
  PutFromBufferResult r;
  r.put = *std::move(put);
  r.bytes_read = total;
  return r;
}

absl::StatusOr<ComposeToBufferResult> ComposeToBuffer(KvCache& cache, BufferRegistry& buffers,
                                                      absl::string_view model,
                                                      absl::string_view tenant,
                                                      const std::vector<ComposePart>& parts,
                                                      const BufferRange& dst, int copy_threads) {
  auto prompt = Compose(cache, model, tenant, parts);
  if (!prompt.ok()) return prompt.status();
  const uint64_t layer_bytes = prompt->layer_bytes();
  auto bytes = Product(static_cast<uint64_t>(prompt->layers()), layer_bytes, "Compose");
  if (!bytes.ok()) return bytes.status();
  auto lease = buffers.Acquire(dst, *bytes);
  if (!lease.ok()) return lease.status();
  auto m = cache.ResolveModel(model);
  if (!m.ok()) return m.status();
  absl::Status s = GpuRotates(**lease, m->spec)
                       ? ComposeToGpu(cache, tenant, parts, *prompt, *m, **lease)
                       : (*lease)->ProduceParallel(
                             prompt->layers(), layer_bytes, copy_threads, [&](uint64_t l, void* p) {
                               return prompt->WriteLayer(static_cast<int>(l), p);
                             });
  if (!s.ok()) return s;
  ComposeToBufferResult r;
  r.parts = prompt->parts();
  r.total_tokens = prompt->total_tokens();
  r.layer_bytes = layer_bytes;
  r.bytes_written = *bytes;
  return r;
}

namespace {

// The capacity layout's strides, and the checks every session call makes of it: capacity >= 1,
// token_offset + n <= capacity. Bytes of the whole layout in *bytes.
absl::StatusOr<KvStrides> CheckLayout(const ModelSpec& spec, const TokenLayout& layout, int64_t n,
                                      uint64_t* bytes) {
  if (layout.capacity == 0 && n == 0) {  // no layout given and nothing to copy
    *bytes = 0;
    return RangeStrides(spec, 0);
  }
  if (layout.capacity == 0 || layout.capacity > (uint64_t{1} << 40)) {
    return absl::InvalidArgumentError(
        absl::StrCat("layout capacity must be in [1, 2^40] tokens, got ", layout.capacity));
  }
  if (layout.token_offset > layout.capacity ||
      static_cast<uint64_t>(n) > layout.capacity - layout.token_offset) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokens [", layout.token_offset, ", ", layout.token_offset, " + ", n,
                     ") do not fit a layout of capacity ", layout.capacity));
  }
  const uint64_t token_bytes = static_cast<uint64_t>(spec.head_dim) * DTypeSize(spec.dtype);
  auto row = Product(layout.capacity, token_bytes, "layout row");
  if (!row.ok()) return row.status();
  auto all = Product(*row, uint64_t{2} * spec.layers * spec.kv_heads, "layout");
  if (!all.ok()) return all.status();
  *bytes = *all;
  return RangeStrides(spec, static_cast<int64_t>(layout.capacity));
}

// Session calls address bytes of a buffer, not pages of a paged layout.
absl::Status NoPages(const BufferRange& range) {
  if (range.block_ids.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(
      "session calls address a buffer by offset and token layout, not by block ids (got ",
      range.block_ids.size(), ")"));
}

// The CUDA device of a registered GPU buffer (-1: shared memory or unknown).
int BufferDevice(BufferRegistry& buffers, absl::string_view name) {
  for (const BufferInfo& info : buffers.List()) {
    if (info.name == name) return info.kind == BufferKind::kCudaIpc ? info.device : -1;
  }
  return -1;
}

// Rows of a capacity layout: [layer][k|v][kv_head].
uint64_t LayoutRows(const ModelSpec& spec) { return uint64_t{2} * spec.layers * spec.kv_heads; }

// The n tokens from token_offset of a capacity layout in a lease, as a KvSource: in place for
// shared memory, device to device for a GPU buffer on `session_gpu` (>= 0), else gathered row by
// row from the GPU buffer into `staged` (prompt layout).
absl::StatusOr<KvSource> SourceOf(BufferLease& lease, const ModelSpec& spec,
                                  const TokenLayout& layout, const KvStrides& strides, int64_t n,
                                  int buffer_device, int session_gpu, std::vector<char>* staged) {
  if (lease.kind() == BufferKind::kShm) {
    return KvSource{lease.host_data(), strides, static_cast<int64_t>(layout.token_offset), -1};
  }
  if (session_gpu >= 0 && session_gpu == buffer_device) {
    return KvSource{lease.device_data(), strides, static_cast<int64_t>(layout.token_offset),
                    buffer_device};
  }
  const uint64_t tb = static_cast<uint64_t>(spec.head_dim) * DTypeSize(spec.dtype);
  const uint64_t want = static_cast<uint64_t>(n) * tb;
  staged->resize(LayoutRows(spec) * want);
  for (uint64_t r = 0; r < LayoutRows(spec) && want > 0; ++r) {
    const uint64_t at = (r * layout.capacity + layout.token_offset) * tb;
    if (auto s = lease.Consume(at, want,
                               [&](const void* p) {
                                 std::memcpy(staged->data() + r * want, p, want);
                                 return absl::OkStatus();
                               });
        !s.ok()) {
      return s;
    }
  }
  return KvSource{staged->data(), RangeStrides(spec, n), 0, -1};
}

}  // namespace

absl::StatusOr<ReadToBufferResult> ReadToBuffer(SessionStore& sessions, BufferRegistry& buffers,
                                                absl::string_view session_id,
                                                std::optional<TokenRange> range,
                                                std::optional<RopeTableId> to_table,
                                                const BufferRange& dst, int copy_threads,
                                                std::optional<TokenLayout> layout) {
  if (auto s = NoPages(dst); !s.ok()) return s;
  auto reader = sessions.Read(session_id, range, to_table);
  if (!reader.ok()) return reader.status();
  const uint64_t layer_bytes = reader->layer_bytes();
  auto bytes = Product(static_cast<uint64_t>(reader->layers()), layer_bytes, "Read");
  if (!bytes.ok()) return bytes.status();
  const int64_t n = reader->range().size();
  // Without a layout: the prompt layout of the range is a capacity layout of capacity n.
  const TokenLayout place = layout.value_or(TokenLayout{static_cast<uint64_t>(n), 0});
  uint64_t lease_bytes = 0;
  auto strides = CheckLayout(reader->spec(), place, n, &lease_bytes);
  if (!strides.ok()) return strides.status();
  auto lease = buffers.Acquire(dst, lease_bytes);
  if (!lease.ok()) return lease.status();
  const int device =
      (*lease)->kind() == BufferKind::kCudaIpc ? BufferDevice(buffers, dst.buffer) : -1;
  const int64_t o = static_cast<int64_t>(place.token_offset);
  absl::Status s;
  if (reader->on_gpu() && device >= 0 && device == reader->gpu_device()) {
    // The fused path: one launch shifts and re-rotates the range straight into the buffer.
    s = reader->WriteToDevice((*lease)->device_data(), *strides, o);
    if (s.ok()) (*lease)->CountWritten(*bytes);
    absl::Status finished = (*lease)->Finish();
    if (s.ok()) s = finished;
  } else if (!layout.has_value()) {
    s = (*lease)->ProduceParallel(
        reader->layers(), layer_bytes, copy_threads,
        [&](uint64_t l, void* p) { return reader->WriteLayer(static_cast<int>(l), p); });
  } else if ((*lease)->kind() == BufferKind::kShm) {
    // In place: only the range's elements of the mapped layout are written.
    s = reader->WriteAllToHost((*lease)->host_data(), *strides, o);
    if (s.ok()) (*lease)->CountWritten(*bytes);
    absl::Status finished = (*lease)->Finish();
    if (s.ok()) s = finished;
  } else {
    // A GPU buffer the session is not on: the range in prompt layout on the host, then each row
    // to its place (the bytes between rows are the frontend's and stay untouched).
    std::vector<char> host(*bytes);
    s = reader->WriteAll(host.data());
    const uint64_t row = *bytes / LayoutRows(reader->spec());
    const uint64_t token_bytes = n > 0 ? row / static_cast<uint64_t>(n) : 0;
    for (uint64_t r = 0; s.ok() && row > 0 && r < LayoutRows(reader->spec()); ++r) {
      s = (*lease)->Write((r * place.capacity + place.token_offset) * token_bytes,
                          host.data() + r * row, row);
    }
    absl::Status finished = (*lease)->Finish();  // before `host` goes
    if (s.ok()) s = finished;
  }
  if (!s.ok()) return s;
  ReadToBufferResult r;
  r.range = reader->range();
  r.document_length = reader->document_length();
  r.version = reader->version();
  r.layer_bytes = layer_bytes;
  r.bytes_written = *bytes;
  return r;
}

namespace {

// A session call's n tokens of KV read from `src` (layouts as OpenFromBuffer): leases the buffer,
// hands the source to `commit`, and `undo`es what it committed when the lease ends unclean (bytes
// read from a region the client shrank under the copy are not the client's).
absl::StatusOr<SessionFromBufferResult> FromBuffer(
    SessionStore& sessions, BufferRegistry& buffers, const ModelSpec& spec, const BufferRange& src,
    std::optional<TokenLayout> layout, int64_t n,
    absl::FunctionRef<absl::StatusOr<SessionResult>(const KvSource&)> commit,
    absl::FunctionRef<void(const SessionResult&)> undo) {
  const TokenLayout place = layout.value_or(TokenLayout{static_cast<uint64_t>(n), 0});
  uint64_t lease_bytes = 0;
  auto strides = CheckLayout(spec, place, n, &lease_bytes);
  if (!strides.ok()) return strides.status();
  auto lease = buffers.Acquire(src, lease_bytes);
  if (!lease.ok()) return lease.status();
  const int device =
      (*lease)->kind() == BufferKind::kCudaIpc ? BufferDevice(buffers, src.buffer) : -1;
  const int session_gpu = sessions.OnGpu(spec) ? sessions.gpu_device() : -1;
  std::vector<char> staged;
  auto source = SourceOf(**lease, spec, place, *strides, n, device, session_gpu, &staged);
  if (!source.ok()) return source.status();
  auto committed = commit(*source);
  const uint64_t bytes = RangeBytes(spec, n);
  if (committed.ok()) (*lease)->CountRead(bytes);
  absl::Status finished = (*lease)->Finish();
  if (!committed.ok()) return committed.status();
  if (!finished.ok()) {
    undo(*committed);
    return finished;
  }
  SessionFromBufferResult r;
  r.session = *std::move(committed);
  r.bytes_read = bytes;
  r.device = session_gpu;
  return r;
}

}  // namespace

absl::StatusOr<SessionFromBufferResult> OpenFromBuffer(SessionStore& sessions,
                                                       BufferRegistry& buffers,
                                                       OpenSessionArgs args, const BufferRange& src,
                                                       std::optional<TokenLayout> layout) {
  if (auto s = NoPages(src); !s.ok()) return s;
  auto spec = sessions.ModelSpecOf(args.model);
  if (!spec.ok()) return spec.status();
  if (!args.tenant.empty()) {
    return absl::InvalidArgumentError("OpenFromBuffer takes its KV from the buffer; no tenant");
  }
  const int64_t n = static_cast<int64_t>(args.tokens.size());
  return FromBuffer(
      sessions, buffers, *spec, src, layout, n,
      [&](const KvSource& kv) { return sessions.OpenFrom(std::move(args), kv); },
      [&](const SessionResult& opened) { sessions.Close(opened.id).IgnoreError(); });
}

absl::StatusOr<SessionFromBufferResult> FillFromBuffer(SessionStore& sessions,
                                                       BufferRegistry& buffers,
                                                       absl::string_view session_id, FillArgs args,
                                                       const BufferRange& src,
                                                       std::optional<TokenLayout> layout) {
  if (auto s = NoPages(src); !s.ok()) return s;
  auto spec = sessions.SessionSpec(session_id);
  if (!spec.ok()) return spec.status();
  const TokenRange range = args.range;
  return FromBuffer(
      sessions, buffers, *spec, src, layout, std::max<int64_t>(0, range.size()),
      [&](const KvSource& kv) { return sessions.FillFrom(session_id, std::move(args), kv); },
      [&](const SessionResult&) {
        // The range awaits Fill again.
        EditOptions stale;
        stale.stale.push_back(range);
        sessions.Edit(session_id, {}, stale).IgnoreError();
      });
}

// GatherToBuffer into a GPU buffer from a prefix whose blocks all sit in the GPU tier on the
// buffer's device: one gather kernel a layer on the transfer's stream, from the blocks' device
// copies straight into the buffer (no host copy of the rows). The block addresses of every
// layer, the indices and the counts go to the device first, into one scratch allocation. False
// (nothing done) where the store cannot gather there (RetrievalStore::DeviceGatherRequest).
absl::StatusOr<bool> GatherOnDevice(RetrievalStore& store, const KeptSelection& sel,
                                    const RetrievalStore::HeldSource& held,
                                    const std::vector<int>& layers, BufferLease& lease) {
  CudaIpcTransfer* gpu = lease.transfer();
  if (gpu == nullptr || layers.empty()) return false;
  // The layers' requests differ only in their block addresses and destinations.
  topk::GatherRequest req;
  std::vector<const void*> keys, values;
  std::vector<const void*> planes;  // [layer][k|v][block]
  for (size_t i = 0; i < layers.size(); ++i) {
    auto ok = store.DeviceGatherRequest(sel, held, layers[i], lease.device(), &keys, &values, &req);
    if (!ok.ok()) return ok.status();
    if (!*ok) return false;
    planes.insert(planes.end(), keys.begin(), keys.end());
    planes.insert(planes.end(), values.begin(), values.end());
  }
  const size_t blocks = keys.size();
  const uint64_t plane_bytes = planes.size() * sizeof(void*);
  const uint64_t list_bytes = static_cast<uint64_t>(sel.rows()) * sel.capacity() * 4;
  const uint64_t count_bytes = static_cast<uint64_t>(sel.rows()) * 4;
  auto scratch = gpu->Scratch(plane_bytes + list_bytes + count_bytes);
  if (!scratch.ok()) return scratch.status();
  char* dev = static_cast<char*>(*scratch);
  const void* const* dev_planes = reinterpret_cast<const void* const*>(dev);
  const int32_t* dev_indices = reinterpret_cast<const int32_t*>(dev + plane_bytes);
  const int32_t* dev_counts = reinterpret_cast<const int32_t*>(dev + plane_bytes + list_bytes);
  if (auto s = gpu->Upload(dev, planes.data(), plane_bytes); !s.ok()) return s;
  if (auto s = gpu->Upload(dev + plane_bytes, sel.indices().data(), list_bytes); !s.ok()) return s;
  if (auto s = gpu->Upload(dev + plane_bytes + list_bytes, sel.counts().data(), count_bytes);
      !s.ok()) {
    return s;
  }
  const uint64_t layer_bytes = sel.layer_bytes();
  req.indices = dev_indices;
  req.counts = dev_counts;
  for (size_t i = 0; i < layers.size(); ++i) {
    req.keys.blocks = dev_planes + 2 * i * blocks;
    req.values.blocks = dev_planes + (2 * i + 1) * blocks;
    char* dst = static_cast<char*>(lease.device_data()) + i * layer_bytes;
    req.dst_keys = dst;
    req.dst_values = dst + layer_bytes / 2;
    if (auto s = gpu->Gather(req); !s.ok()) return s;
  }
  // The host vectors stay until the uploads are done.
  if (auto s = lease.Finish(); !s.ok()) return s;
  lease.CountWritten(layers.size() * layer_bytes);
  store.CountDeviceGathers(layers.size());
  return true;
}

absl::StatusOr<GatherToBufferResult> GatherToBuffer(RetrievalStore& store, BufferRegistry& buffers,
                                                    absl::string_view selection_id,
                                                    std::vector<int> layers, const BufferRange& dst,
                                                    int copy_threads) {
  if (auto s = NoPages(dst); !s.ok()) return s;
  auto selection = store.FindSelection(selection_id);
  if (!selection.ok()) return selection.status();
  const KeptSelection& sel = **selection;
  const int model_layers = sel.spec().layers;
  if (layers.empty()) {
    for (int l = 0; l < model_layers; ++l) layers.push_back(l);
  }
  for (int l : layers) {
    if (l < 0 || l >= model_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", l, " is out of range [0, ", model_layers, ")"));
    }
  }
  const uint64_t layer_bytes = sel.layer_bytes();
  auto bytes = Product(layers.size(), layer_bytes, "Gather");
  if (!bytes.ok()) return bytes.status();
  auto lease = buffers.Acquire(dst, *bytes);
  if (!lease.ok()) return lease.status();
  // The source held once for every layer (a prefix's blocks acquired once, not per layer).
  auto held = store.HoldSource(sel);
  if (!held.ok()) return held.status();
  auto on_device = GatherOnDevice(store, sel, **held, layers, **lease);
  if (!on_device.ok()) return on_device.status();
  if (!*on_device) {
    absl::Status s = (*lease)->ProduceParallel(
        layers.size(), layer_bytes, copy_threads,
        [&](uint64_t i, void* p) { return store.GatherLayer(sel, **held, layers[i], p); });
    if (!s.ok()) return s;
  }
  GatherToBufferResult r;
  r.on_device = *on_device;
  r.rows = sel.rows();
  r.capacity = sel.capacity();
  r.counts = sel.counts();
  r.layer_bytes = layer_bytes;
  r.bytes_written = *bytes;
  r.dtype = sel.spec().dtype;
  r.head_dim = sel.spec().head_dim;
  return r;
}

}  // namespace ropekv
