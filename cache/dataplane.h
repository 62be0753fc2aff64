// Data-plane copies: Get, Put, Compose and session Read with a registered buffer
// (cache/buffer_registry.h) in place of streamed bytes. The daemon copies — and re-rotates —
// straight between its tiers and the buffer: a Get's blocks go through ReadHandle::CopyBlock into
// the mapped region, a prompt's layers through ComposedPrompt::WriteLayer /
// SessionReader::WriteLayer, a Put's bytes from the region into the PutWriter. For a GPU buffer the
// same producers fill pinned staging that is copied to the device (cache/cuda_ipc.h) — except Get
// and Compose, which copy the blocks as stored straight from the host tier to the device (DMA from
// pinned memory) and re-rotate the keys there, in place, in one launch of the CUDA kernel
// (kernels/rope/rerotate_cuda.h; head dims it does not support take the staging path).
//
// Paged buffers (PagedLayout, cache/buffer_registry.h): Get and Put name pages by block ids
// (BufferRange::block_ids) and each block moves between its block layout and its page in every
// layer's K and V pool in one RerotateCopy job: on the CPU for shared memory, by the CUDA kernel
// (through device scratch) for a GPU buffer.
//
// Copies into shared memory may run on several threads (`copy_threads`: blocks or layers split
// among them); copies to a GPU buffer run on the caller's thread.
//
// Layouts are those of the streaming calls: block layout for Get and Put
// ([block][layer][k|v][kv_head][block_tokens][head_dim]), prompt layout for Compose and Read
// ([layer][k|v][kv_head][tokens][head_dim]). Only [dst.offset, dst.offset + bytes) is written.
//
// Thread safety: the functions are thread-safe (the cache, the store and the registry are).
#ifndef ROPEKV_CACHE_DATAPLANE_H_
#define ROPEKV_CACHE_DATAPLANE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/buffer_registry.h"
#include "cache/compose.h"
#include "cache/kv_cache.h"
#include "cache/retrieval.h"
#include "cache/session.h"

namespace ropekv {

struct GetToBufferArgs {
  std::string model;  // id or name
  std::string tenant;
  std::vector<int32_t> tokens;  // the prompt; its longest cached prefix is copied
  uint32_t max_blocks = 0;      // 0 = all matched blocks (with dst.block_ids: at most as many)
  // Where the first token's key should sit (re-rotated in one rotation); nullopt: as stored.
  std::optional<int64_t> target_position;
  BufferRange dst;
  // Threads that copy (and re-rotate) blocks into shared memory at once; 1 = the caller only.
  int copy_threads = 1;
};

struct GetToBufferResult {
  uint32_t matched_tokens = 0;
  uint64_t block_bytes = 0;
  std::vector<BlockInfo> blocks;
  uint64_t bytes_written = 0;  // blocks.size() * block_bytes
};

// Copies the longest cached prefix into dst: block layout from dst.offset, or, when dst has
// block_ids, block i into page block_ids[i] of the buffer's paged layout (at most
// block_ids.size() blocks; the other pages are not touched). NOT_FOUND for an unknown model or
// buffer; INVALID_ARGUMENT for a negative target_position, a range that cannot hold the answer,
// or bad block ids (BufferRegistry::AcquirePages) — nothing written; FAILED_PRECONDITION when the
// buffer is being unregistered or its shared memory shrank; the cache's errors as
// KvCache::AcquirePrefix gives them. A miss writes nothing and is OK.
absl::StatusOr<GetToBufferResult> GetToBuffer(KvCache& cache, BufferRegistry& buffers,
                                              const GetToBufferArgs& args);

struct PutFromBufferResult {
  PutResult put;
  uint64_t bytes_read = 0;
};

// Stores the blocks of `options` with their bytes read from src (block layout, as Put), or, when
// src has block_ids, block i from page block_ids[i] of the buffer's paged layout.
// KvCache::BeginPut's and PutWriter's errors; NOT_FOUND for an unknown buffer; INVALID_ARGUMENT
// when src cannot hold the Put's bytes, for bad block ids, or when their count is not the Put's
// block count; FAILED_PRECONDITION when the buffer's shared memory shrank during the copy
// (nothing of the Put is stored).
absl::StatusOr<PutFromBufferResult> PutFromBuffer(KvCache& cache, BufferRegistry& buffers,
                                                  PutOptions options, const BufferRange& src);

struct ComposeToBufferResult {
  std::vector<ComposedPartInfo> parts;
  uint32_t total_tokens = 0;
  uint64_t layer_bytes = 0;
  uint64_t bytes_written = 0;  // layers * layer_bytes
};

// Compose (cache/compose.h) into dst, prompt layout. Compose's errors; the buffer errors as
// GetToBuffer (block ids: INVALID_ARGUMENT).
absl::StatusOr<ComposeToBufferResult> ComposeToBuffer(KvCache& cache, BufferRegistry& buffers,
                                                      absl::string_view model,
                                                      absl::string_view tenant,
                                                      const std::vector<ComposePart>& parts,
                                                      const BufferRange& dst, int copy_threads = 1);

// A frontend's KV cache over a buffer range: [layer][k|v][kv_head][capacity][head_dim] of the
// model's dtype from the range's first byte; a call reads or writes its tokens [token_offset,
// token_offset + n) only (docs/sessions.md, "Capacity layout").
struct TokenLayout {
  uint64_t capacity = 0;
  uint64_t token_offset = 0;
};

struct ReadToBufferResult {
  TokenRange range;
  int64_t document_length = 0;
  uint64_t version = 0;
  uint64_t layer_bytes = 0;
  uint64_t bytes_written = 0;
};

// SessionStore::Read of `range` (nullopt: the whole document) into dst, prompt layout over the
// range; with `layout`, at tokens [token_offset, token_offset + range) of a capacity layout that
// dst must hold whole (only the range's elements are written). A GPU session and a CUDA IPC buffer
// on its device: one fused shift + re-rotate launch, device to device (SessionReader::
// WriteToDevice); otherwise rotated where the session lives and copied (staged for a GPU buffer).
// SessionStore::Read's errors; INVALID_ARGUMENT for a capacity of 0 or token_offset + range past
// it; the buffer errors as GetToBuffer.
absl::StatusOr<ReadToBufferResult> ReadToBuffer(SessionStore& sessions, BufferRegistry& buffers,
                                                absl::string_view session_id,
                                                std::optional<TokenRange> range,
                                                std::optional<RopeTableId> to_table,
                                                const BufferRange& dst, int copy_threads = 1,
                                                std::optional<TokenLayout> layout = std::nullopt);

struct SessionFromBufferResult {
  SessionResult session;
  uint64_t bytes_read = 0;  // the tokens' bytes
  int device = -1;          // where the session's KV lives (SessionInfo::device)
};

// SessionStore::Open with the KV of args.tokens read from src: prompt layout of the tokens, or
// tokens [token_offset, token_offset + n) of `layout`. Device to device (one copy launch) when the
// session is on the GPU of a CUDA IPC buffer; else read in place (shared memory) or staged.
// BeginOpen's errors; INVALID_ARGUMENT for a bad layout (as ReadToBuffer) or args.tenant / from-
// cache use; the buffer errors as PutFromBuffer (a region that shrank: no session is made).
absl::StatusOr<SessionFromBufferResult> OpenFromBuffer(SessionStore& sessions,
                                                       BufferRegistry& buffers,
                                                       OpenSessionArgs args, const BufferRange& src,
                                                       std::optional<TokenLayout> layout);

// SessionStore::Fill of args.range with its KV read from src (layouts as OpenFromBuffer, n = the
// range's size). BeginFill's errors; the layout and buffer errors as OpenFromBuffer (a region that
// shrank during the copy leaves the range awaiting Fill again).
absl::StatusOr<SessionFromBufferResult> FillFromBuffer(SessionStore& sessions,
                                                       BufferRegistry& buffers,
                                                       absl::string_view session_id, FillArgs args,
                                                       const BufferRange& src,
                                                       std::optional<TokenLayout> layout);

struct GatherToBufferResult {
  int64_t rows = 0;             // of the selection (kv_heads, or query heads)
  int64_t capacity = 0;         // slots per row
  std::vector<int32_t> counts;  // [rows] selected tokens per row
  uint64_t layer_bytes = 0;     // [k|v][rows][capacity][head_dim] of one layer
  uint64_t bytes_written = 0;   // layers * layer_bytes
  DType dtype = DType::kBF16;   // the model's
  int head_dim = 0;
  bool on_device = false;  // gathered by a kernel from GPU-tier copies into a GPU buffer
};

// RetrievalStore::GatherLayer of the kept selection `selection_id` at every layer of `layers`
// (empty: all of the model's layers, in order) into dst: [layer][k|v][rows][capacity][head_dim]
// in the model's dtype, zeros after each row's count. NOT_FOUND for an unknown or expired
// selection, or when its prefix blocks were evicted; INVALID_ARGUMENT for a layer out of range
// (nothing written) or paged dst; the buffer errors as GetToBuffer. Into a GPU buffer, a prefix
// whose blocks all have GPU-tier copies on the buffer's device is gathered there by a kernel
// (on_device); anything else goes through host memory.
absl::StatusOr<GatherToBufferResult> GatherToBuffer(RetrievalStore& store, BufferRegistry& buffers,
                                                    absl::string_view selection_id,
                                                    std::vector<int> layers, const BufferRange& dst,
                                                    int copy_threads = 1);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_DATAPLANE_H_
