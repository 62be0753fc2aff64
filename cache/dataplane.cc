#include "cache/dataplane.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace ropekv {
namespace {

// a * b, or INVALID_ARGUMENT when it does not fit in 64 bits.
absl::StatusOr<uint64_t> Product(uint64_t a, uint64_t b, absl::string_view what) {
  uint64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", a, " x ", b, " bytes overflow"));
  }
  return out;
}

}  // namespace

absl::StatusOr<GetToBufferResult> GetToBuffer(KvCache& cache, BufferRegistry& buffers,
                                              const GetToBufferArgs& args) {
  if (args.target_position.has_value() && *args.target_position < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("target_position must be >= 0, got ", *args.target_position));
  }
  auto handle = cache.AcquirePrefix(args.model, args.tenant, args.tokens, args.max_blocks);
  if (!handle.ok()) return handle.status();
  const uint64_t bb = handle->block_bytes();
  const size_t n = handle->blocks().size();
  auto bytes = Product(n, bb, "Get");
  if (!bytes.ok()) return bytes.status();
  auto lease = buffers.Acquire(args.dst, *bytes);
  if (!lease.ok()) return lease.status();
  const int64_t block_tokens = handle->model().spec.block_tokens;
  absl::Status s;
  if (!args.target_position.has_value() && (*lease)->kind() == BufferKind::kCudaIpc) {
    // As stored, to a GPU buffer: DMA straight from the tier's (pinned) host copies, no staging.
    for (size_t i = 0; s.ok() && i < n; ++i) {
      s = (*lease)->Write(i * bb, handle->bytes(i).data(), bb);
    }
    absl::Status finished = (*lease)->Finish();
    if (s.ok()) s = finished;
  } else {
    // Shared memory (blocks split among copy_threads), or a re-rotated Get to a GPU buffer
    // (rotated into pinned staging, then copied): one rotation from the stored copy.
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
  auto lease = buffers.Acquire(src, total);
  if (!lease.ok()) return lease.status();
  const uint64_t step = (*lease)->kind() == BufferKind::kShm ? total : block_bytes;
  absl::Status s;
  for (uint64_t at = 0; s.ok() && at < total; at += step) {
    const uint64_t n = std::min(step, total - at);
    s = (*lease)->Consume(at, n, [&](const void* p) {
      return (*writer)->Write(absl::string_view(static_cast<const char*>(p), n));
    });
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
  absl::Status s = (*lease)->ProduceParallel(
      prompt->layers(), layer_bytes, copy_threads,
      [&](uint64_t l, void* p) { return prompt->WriteLayer(static_cast<int>(l), p); });
  if (!s.ok()) return s;
  ComposeToBufferResult r;
  r.parts = prompt->parts();
  r.total_tokens = prompt->total_tokens();
  r.layer_bytes = layer_bytes;
  r.bytes_written = *bytes;
  return r;
}

absl::StatusOr<ReadToBufferResult> ReadToBuffer(SessionStore& sessions, BufferRegistry& buffers,
                                                absl::string_view session_id,
                                                std::optional<TokenRange> range,
                                                std::optional<RopeTableId> to_table,
                                                const BufferRange& dst, int copy_threads) {
  auto reader = sessions.Read(session_id, range, to_table);
  if (!reader.ok()) return reader.status();
  const uint64_t layer_bytes = reader->layer_bytes();
  auto bytes = Product(static_cast<uint64_t>(reader->layers()), layer_bytes, "Read");
  if (!bytes.ok()) return bytes.status();
  auto lease = buffers.Acquire(dst, *bytes);
  if (!lease.ok()) return lease.status();
  absl::Status s = (*lease)->ProduceParallel(
      reader->layers(), layer_bytes, copy_threads,
      [&](uint64_t l, void* p) { return reader->WriteLayer(static_cast<int>(l), p); });
  if (!s.ok()) return s;
  ReadToBufferResult r;
  r.range = reader->range();
  r.document_length = reader->document_length();
  r.version = reader->version();
  r.layer_bytes = layer_bytes;
  r.bytes_written = *bytes;
  return r;
}

}  // namespace ropekv
