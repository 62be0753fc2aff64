// BufferRegistry: memory of a client that the daemon copies KV into and out of — the data plane of
// DESIGN.md ("RegisterBuffer"). A client registers a buffer once and later calls address it by
// name and range instead of sending bytes through protobuf (cache/dataplane.h runs those copies).
//
// Two kinds of buffer:
// - POSIX shared memory the client created (shm_open + ftruncate). The registry opens it
//   read/write (never creates it), maps it with the size fstat reports — not the size the client
//   claims — and uses the first `size` bytes, which must fit in it.
// - a GPU buffer of the frontend shared by its CUDA IPC handle (cache/cuda_ipc.h): where the build
//   has CUDA and a GPU is present, UNAVAILABLE otherwise.
//
// Every copy holds a BufferLease on [offset, offset + bytes) of one buffer; ranges are checked
// (overflow included) before a lease exists, and a lease only writes inside its range, so a bad
// offset is INVALID_ARGUMENT, never a stray write. Unregister waits for the leases in flight.
//
// A buffer may be registered with a paged layout (PagedLayout: a vLLM-style KV pool of one model);
// calls then address it by page ids (BufferRange::block_ids) instead of an offset, and every id is
// checked before a lease exists.
//
// A client could shrink its shared-memory object (ftruncate) while the daemon copies into it;
// touching a page past the new end raises SIGBUS, which would kill the daemon and every other
// client's cache. Two defences: every lease re-checks the object's size (fstat) when it is taken,
// and a process-wide SIGBUS handler, installed with the first shm registration, maps an anonymous
// page over a faulting page of a registered mapping (the copy then finishes harmlessly into that
// page) and marks the buffer damaged: the lease ends FAILED_PRECONDITION and the buffer refuses
// further leases until it is registered again. A SIGBUS anywhere else goes to the previous handler
// (or the default action).
//
// Thread safety: every method of BufferRegistry is thread-safe. A BufferLease is used by one thread
// at a time.
#ifndef ROPEKV_CACHE_BUFFER_REGISTRY_H_
#define ROPEKV_CACHE_BUFFER_REGISTRY_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "cache/model_registry.h"

namespace ropekv {

class CudaIpcBuffer;
class CudaIpcTransfer;

enum class BufferKind : uint8_t { kShm = 1, kCudaIpc = 2 };

// Whether buffer registration is allowed, from a mode and the address the daemon listens on:
// "on" -> true, "off" -> false, "auto" -> true only for loopback listeners (127.0.0.0/8,
// localhost, [::1], unix: sockets). INVALID_ARGUMENT for another mode.
absl::StatusOr<bool> BuffersAllowed(absl::string_view mode, absl::string_view listen_address);

// OK when `name` can name a registered buffer: 1-128 characters of [A-Za-z0-9._:-]; else
// INVALID_ARGUMENT saying which character or length is wrong.
absl::Status ValidateBufferName(absl::string_view name);
// OK for a POSIX shared-memory name this registry opens: '/' then 1-250 of [A-Za-z0-9._-] (no
// other '/'), not "/." or "/.."; else INVALID_ARGUMENT.
absl::Status ValidateShmName(absl::string_view shm_name);

// A vLLM-style paged KV pool laid over a registered buffer (docs/dataplane.md, "Paged pools").
// For layer l and c = 0 (K) or 1 (V) there is a pool of `num_blocks` pages; page p of pool (l, c)
// starts at byte ((l * 2 + c) * num_blocks + p) * page_bytes() of the buffer and holds
// [block_tokens][kv_heads][head_dim] elements of the model's dtype: the bytes of a C-contiguous
// tensor [layers][2][num_blocks][block_tokens][kv_heads][head_dim]. One page holds one block.
struct PagedLayout {
  ModelId model_id;
  ModelSpec spec;  // the model's shape: layers, kv_heads, head_dim, dtype, block_tokens
  uint32_t num_blocks = 0;

  uint64_t page_bytes() const;
  uint64_t bytes() const;  // every pool: layers * 2 * num_blocks * page_bytes()
  // Element strides of the pools (RerotateCopy): token t of page p is token p * block_tokens + t.
  KvStrides strides() const;
};

// The layout of `num_blocks` pages of `model`. INVALID_ARGUMENT for 0 pages or past 2^31, or a
// size past 2^63 bytes.
absl::StatusOr<PagedLayout> MakePagedLayout(const RegisteredModel& model, uint32_t num_blocks);

// What the registry knows of a buffer (for ListBuffers).
struct BufferInfo {
  std::string name;
  BufferKind kind = BufferKind::kShm;
  uint64_t size = 0;          // usable bytes
  std::string shm_name;       // kShm
  uint64_t mapped_bytes = 0;  // kShm: the object's size at registration; kCudaIpc: allocation
  int device = -1;            // kCudaIpc
  uint32_t copies_in_flight = 0;
  uint64_t copies = 0;         // leases taken
  uint64_t bytes_written = 0;  // by Produce
  uint64_t bytes_read = 0;     // by Consume
  std::optional<PagedLayout> paged;
};

// Where a copy reads or writes: [offset, offset + length) of a registered buffer, or, for a buffer
// with a paged layout, the pages `block_ids` (block i of the call in page block_ids[i]; offset and
// length then stay 0).
struct BufferRange {
  std::string buffer;
  uint64_t offset = 0;
  uint64_t length = 0;  // 0 = to the end of the buffer
  std::vector<uint32_t> block_ids;
};

class BufferRegistry;

// A hold on `size()` bytes of a registered buffer for one copy. The buffer stays mapped (Unregister
// waits) until the lease is destroyed. Offsets `at` are relative to the start of the lease.
class BufferLease {
 public:
  ~BufferLease();
  BufferLease(const BufferLease&) = delete;
  BufferLease& operator=(const BufferLease&) = delete;

  BufferKind kind() const;
  uint64_t size() const { return size_; }
  // The leased bytes in this process (shared memory), nullptr for a GPU buffer.
  uint8_t* host_data() const { return host_; }

  // Writes bytes [at, at + n) of the lease with what `fill` produces: in place for shared memory
  // (fill writes the mapped region itself), through a pinned staging buffer for a GPU buffer.
  // INVALID_ARGUMENT when [at, at + n) leaves the lease (nothing is written); fill's own errors as
  // they are.
  absl::Status Produce(uint64_t at, uint64_t n, absl::FunctionRef<absl::Status(void* dst)> fill);
  // Writes `units` units of `unit_bytes` each at [0, units * unit_bytes) of the lease, unit i
  // produced by fill(i, dst) — for shared memory in place, by up to `threads` threads at once (fill
  // must then be safe to call concurrently for different units); for a GPU buffer one at a time
  // through Produce. Then Finish. The first error (of fill, or INVALID_ARGUMENT when the units
  // leave the lease) is returned; units after it may not be written.
  absl::Status ProduceParallel(uint64_t units, uint64_t unit_bytes, int threads,
                               absl::FunctionRef<absl::Status(uint64_t i, void* dst)> fill);
  // Writes n bytes from `src` at [at, at + n) of the lease: a memcpy into shared memory, a copy
  // without staging to a GPU buffer (src must then stay valid and unchanged until Finish).
  // INVALID_ARGUMENT when the range leaves the lease.
  absl::Status Write(uint64_t at, const void* src, uint64_t n);
  // Hands bytes [at, at + n) of the lease to `use` (in place, or a staged copy of device bytes).
  absl::Status Consume(uint64_t at, uint64_t n,
                       absl::FunctionRef<absl::Status(const void* src)> use);
  // For copies that address the leased bytes themselves (paged layouts, kernels on a GPU buffer):
  // the device transfer of a GPU buffer (nullptr for shared memory), the device address of the
  // lease's first byte (nullptr for shared memory), the buffer's paged layout (nullptr without
  // one), and the counters such copies report. The caller keeps inside [0, size()).
  CudaIpcTransfer* transfer() const { return transfer_.get(); }
  void* device_data() const;
  // The CUDA device of a GPU buffer; -1 for shared memory.
  int device() const;
  const PagedLayout* paged() const;
  void CountWritten(uint64_t n) { written_ += n; }
  void CountRead(uint64_t n) { read_ += n; }

  // Ends the copy: waits for device copies in flight. FAILED_PRECONDITION when the shared-memory
  // object shrank under the copy (what was read is garbage, what was written is lost); a CUDA
  // error as INTERNAL. Call once; a second call answers the first call's status.
  absl::Status Finish();

 private:
  friend class BufferRegistry;
  struct Region;
  BufferLease(BufferRegistry* registry, std::shared_ptr<Region> region, uint64_t offset,
              uint64_t size);
  absl::Status CheckPiece(uint64_t at, uint64_t n) const;

  BufferRegistry* registry_;
  std::shared_ptr<Region> region_;
  uint64_t offset_;  // in the buffer
  uint64_t size_;
  uint8_t* host_ = nullptr;
  std::unique_ptr<CudaIpcTransfer> transfer_;
  uint64_t written_ = 0;
  uint64_t read_ = 0;
  bool finished_ = false;
  absl::Status finish_status_;
};

class BufferRegistry {
 public:
  struct Options {
    // Registration allowed at all (the daemon resolves --allow_buffers with BuffersAllowed).
    // Off: RegisterShm / RegisterCudaIpc answer FAILED_PRECONDITION.
    bool allow = false;
    // Most buffers registered at once; more -> RESOURCE_EXHAUSTED.
    uint32_t max_buffers = 64;
    // Why registration is off, for the error message (e.g. "--allow_buffers=auto and ropekvd
    // listens on 0.0.0.0:50051, not loopback").
    std::string off_reason = "buffer registration is off";
  };

  // INVALID_ARGUMENT for max_buffers 0 or past 1024 (the SIGBUS guard's table).
  static absl::StatusOr<std::unique_ptr<BufferRegistry>> Create(Options options);
  // Waits for the leases in flight, then unmaps every buffer.
  ~BufferRegistry();

  bool allowed() const { return options_.allow; }

  // Registers the shared-memory object `shm_name` as buffer `name`, using its first `size` bytes
  // (0: all of it). FAILED_PRECONDITION when registration is off; INVALID_ARGUMENT for a malformed
  // name, an object that is not a regular file, an empty object, or `size` past the object's real
  // size; NOT_FOUND when no such object exists; ALREADY_EXISTS when `name` is taken;
  // RESOURCE_EXHAUSTED at max_buffers; PERMISSION_DENIED when the daemon may not open it.
  // With `paged`, the buffer holds that paged layout from its first byte: INVALID_ARGUMENT when
  // the layout's bytes pass `size`.
  absl::StatusOr<BufferInfo> RegisterShm(absl::string_view name, absl::string_view shm_name,
                                         uint64_t size,
                                         std::optional<PagedLayout> paged = std::nullopt);
  // Registers a GPU buffer by CUDA IPC handle (CudaIpcBuffer::Open's arguments and errors), plus
  // FAILED_PRECONDITION when registration is off, ALREADY_EXISTS, RESOURCE_EXHAUSTED, and the
  // paged layout's INVALID_ARGUMENT as above.
  absl::StatusOr<BufferInfo> RegisterCudaIpc(absl::string_view name, int device,
                                             absl::string_view handle, uint64_t offset,
                                             uint64_t size,
                                             std::optional<PagedLayout> paged = std::nullopt);

  // Unregisters `name`: new leases are refused at once (FAILED_PRECONDITION), then it waits for
  // the leases in flight and unmaps the buffer. Returns how many leases it waited for. NOT_FOUND
  // for an unknown name (or one already being unregistered).
  absl::StatusOr<uint32_t> Unregister(absl::string_view name);

  // Every registered buffer, by name.
  std::vector<BufferInfo> List() const;

  // Leases [range.offset, range.offset + bytes) of a buffer for a copy of `bytes` bytes (0 is
  // allowed: the range is still checked). NOT_FOUND for an unknown buffer; INVALID_ARGUMENT when
  // range.offset + range.length passes the buffer's size or `bytes` passes the range (all sums
  // checked for overflow), naming the numbers; FAILED_PRECONDITION while the buffer is being
  // unregistered, or when its shared-memory object shrank below its registered size.
  // INVALID_ARGUMENT for a range with block_ids (those go to AcquirePages).
  absl::StatusOr<std::unique_ptr<BufferLease>> Acquire(const BufferRange& range, uint64_t bytes);
  // Leases the whole paged layout of a buffer for a copy of model `model_id` into or out of pages
  // range.block_ids (lease offsets are buffer offsets; lease->paged() is the layout). Acquire's
  // errors, plus INVALID_ARGUMENT when the buffer has no paged layout, the layout is of another
  // model, range.offset or range.length is not 0, or an id is out of [0, num_blocks) or repeated
  // (the message names the first bad id).
  absl::StatusOr<std::unique_ptr<BufferLease>> AcquirePages(const BufferRange& range,
                                                            absl::string_view model_id);

 private:
  friend class BufferLease;
  explicit BufferRegistry(Options options) : options_(std::move(options)) {}
  absl::Status CheckRegistrable(absl::string_view name) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::StatusOr<BufferInfo> Insert(std::shared_ptr<BufferLease::Region> region,
                                    std::optional<PagedLayout> paged);
  void Release(BufferLease& lease);
  static BufferInfo InfoOf(const BufferLease::Region& r);

  const Options options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<BufferLease::Region>> buffers_
      ABSL_GUARDED_BY(mu_);
  // Names reserved by a registration in progress (outside the lock: shm_open, cudaIpcOpen).
  absl::flat_hash_map<std::string, int> pending_ ABSL_GUARDED_BY(mu_);
  int leases_ ABSL_GUARDED_BY(mu_) = 0;  // all buffers
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_BUFFER_REGISTRY_H_
