#include "cache/buffer_registry.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>
#include <mutex>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cache/cuda_ipc.h"
#include "cache/parallel.h"

namespace ropekv {
namespace {

constexpr size_t kMaxBufferName = 128;
constexpr size_t kMaxShmName = 250;  // after the '/': NAME_MAX (255) less room for a prefix
constexpr uint32_t kGuardSlots = 1024;

// ---------------------------------------------------------------------------------------------
// SIGBUS guard over registered shared-memory mappings (see the header). The table is read by the
// signal handler without locks: a slot is live while `begin` is non-zero; it is published with
// `end` first and retired with `begin` first. Slots are handed out under g_guard_mu.

struct GuardSlot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<uint32_t> faults{0};
};

GuardSlot g_guard[kGuardSlots];
std::mutex g_guard_mu;
bool g_guard_used[kGuardSlots];  // guarded by g_guard_mu
struct sigaction g_previous_sigbus;
uintptr_t g_page_bytes = 4096;
std::once_flag g_guard_installed;

void OnSigbus(int sig, siginfo_t* info, void* context) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (GuardSlot& slot : g_guard) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    if (begin == 0 || addr < begin || addr >= slot.end.load(std::memory_order_acquire)) continue;
    // The client shrank the object under a copy. An anonymous page in place of the missing one
    // lets the faulting instruction finish; the lease sees the fault count and fails the copy.
    // (mmap is a plain system call here; it takes no lock that the interrupted code could hold.)
    void* page = reinterpret_cast<void*>(addr & ~(g_page_bytes - 1));
    if (mmap(page, g_page_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
             -1, 0) != MAP_FAILED) {
      slot.faults.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    break;
  }
  // Not ours: what would have happened without the guard.
  if (g_previous_sigbus.sa_flags & SA_SIGINFO) {
    if (g_previous_sigbus.sa_sigaction != nullptr) {
      g_previous_sigbus.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous_sigbus.sa_handler != SIG_DFL && g_previous_sigbus.sa_handler != SIG_IGN) {
    g_previous_sigbus.sa_handler(sig);
    return;
  }
  // Default action: restore it; returning re-executes the access, which faults again and ends the
  // process as it would have.
  signal(SIGBUS, SIG_DFL);
}

void InstallGuard() {
  std::call_once(g_guard_installed, [] {
    const long page = sysconf(_SC_PAGESIZE);
    if (page > 0) g_page_bytes = static_cast<uintptr_t>(page);
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = OnSigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_previous_sigbus);
  });
}

// A slot covering [begin, begin + bytes), or -1 when the table is full.
int AddGuard(void* begin, uint64_t bytes) {
  InstallGuard();
  std::lock_guard<std::mutex> lock(g_guard_mu);
  for (uint32_t i = 0; i < kGuardSlots; ++i) {
    if (g_guard_used[i]) continue;
    g_guard_used[i] = true;
    GuardSlot& s = g_guard[i];
    s.faults.store(0, std::memory_order_release);
    s.end.store(reinterpret_cast<uintptr_t>(begin) + bytes, std::memory_order_release);
    s.begin.store(reinterpret_cast<uintptr_t>(begin), std::memory_order_release);
    return static_cast<int>(i);
  }
  return -1;
}

void RemoveGuard(int slot) {
  if (slot < 0) return;
  std::lock_guard<std::mutex> lock(g_guard_mu);
  g_guard[slot].begin.store(0, std::memory_order_release);
  g_guard[slot].end.store(0, std::memory_order_release);
  g_guard_used[slot] = false;
}

uint32_t GuardFaults(int slot) {
  return slot < 0 ? 0 : g_guard[slot].faults.load(std::memory_order_acquire);
}

absl::Status ErrnoStatus(int err, absl::string_view what) {
  std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    case EINVAL:
    case ENAMETOOLONG:
      return absl::InvalidArgumentError(msg);
    case EMFILE:
    case ENFILE:
    case ENOMEM:
      return absl::ResourceExhaustedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

bool LoopbackHost(absl::string_view host) {
  host = absl::StripPrefix(absl::StripSuffix(host, "]"), "[");
  if (absl::EqualsIgnoreCase(host, "localhost") || host == "::1") return true;
  // 127.0.0.0/8: four decimal octets, the first 127.
  std::vector<absl::string_view> octets = absl::StrSplit(host, '.');
  if (octets.size() != 4 || octets[0] != "127") return false;
  for (absl::string_view o : octets) {
    int v = 0;
    if (o.empty() || !absl::SimpleAtoi(o, &v) || v < 0 || v > 255) return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Policy and names

absl::StatusOr<bool> BuffersAllowed(absl::string_view mode, absl::string_view listen_address) {
  if (mode == "on") return true;
  if (mode == "off") return false;
  if (mode != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("allow_buffers must be auto, on or off, got \"", mode, "\""));
  }
  absl::string_view a = listen_address;
  if (absl::StartsWith(a, "unix:") || absl::StartsWith(a, "unix-abstract:")) return true;
  if (!absl::ConsumePrefix(&a, "ipv4:")) absl::ConsumePrefix(&a, "ipv6:");
  absl::string_view host = a;
  if (absl::StartsWith(a, "[")) {
    const size_t close = a.find(']');
    if (close == absl::string_view::npos) return false;
    host = a.substr(0, close + 1);
  } else if (const size_t colon = a.rfind(':'); colon != absl::string_view::npos) {
    host = a.substr(0, colon);
  }
  return LoopbackHost(host);
}

absl::Status ValidateBufferName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxBufferName) {
    return absl::InvalidArgumentError(
        absl::StrCat("a buffer name has 1 to ", kMaxBufferName, " characters, got ", name.size()));
  }
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    if (!absl::ascii_isalnum(c) && c != '.' && c != '_' && c != ':' && c != '-') {
      return absl::InvalidArgumentError(
          absl::StrCat("a buffer name is made of [A-Za-z0-9._:-], got byte 0x",
                       absl::Hex(static_cast<uint8_t>(c)), " at index ", i));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateShmName(absl::string_view shm_name) {
  if (shm_name.size() < 2 || shm_name[0] != '/') {
    return absl::InvalidArgumentError(absl::StrCat("a shared-memory name is '/' followed by 1 to ",
                                                   kMaxShmName, " characters, got \"",
                                                   absl::CHexEscape(shm_name.substr(0, 64)), "\""));
  }
  absl::string_view rest = shm_name.substr(1);
  if (rest.size() > kMaxShmName) {
    return absl::InvalidArgumentError(absl::StrCat("a shared-memory name has at most ", kMaxShmName,
                                                   " characters after '/', got ", rest.size()));
  }
  if (rest == "." || rest == "..") {
    return absl::InvalidArgumentError(
        absl::StrCat("\"/", rest, "\" is not a shared-memory object name"));
  }
  for (size_t i = 0; i < rest.size(); ++i) {
    const char c = rest[i];
    if (!absl::ascii_isalnum(c) && c != '.' && c != '_' && c != '-') {
      return absl::InvalidArgumentError(
          absl::StrCat("a shared-memory name is '/' then [A-Za-z0-9._-], got byte 0x",
                       absl::Hex(static_cast<uint8_t>(c)), " at index ", i + 1));
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Paged layouts

uint64_t PagedLayout::page_bytes() const {
  return static_cast<uint64_t>(spec.block_tokens) * spec.kv_heads * spec.head_dim *
         DTypeSize(spec.dtype);
}

uint64_t PagedLayout::bytes() const {
  return static_cast<uint64_t>(spec.layers) * 2 * num_blocks * page_bytes();
}

KvStrides PagedLayout::strides() const {
  const int64_t token = int64_t{spec.kv_heads} * spec.head_dim;
  const int64_t pool = int64_t{num_blocks} * spec.block_tokens * token;
  return KvStrides{2 * pool, pool, spec.head_dim, token};
}

absl::StatusOr<PagedLayout> MakePagedLayout(const RegisteredModel& model, uint32_t num_blocks) {
  if (num_blocks == 0 || num_blocks > (1u << 31)) {
    return absl::InvalidArgumentError(
        absl::StrCat("a paged layout has 1 to 2^31 blocks, got ", num_blocks));
  }
  PagedLayout p;
  p.model_id = model.id;
  p.spec = model.spec;
  p.num_blocks = num_blocks;
  // Model limits keep page_bytes under 2^43; the product of the rest must stay under 2^63.
  uint64_t bytes = 0;
  if (__builtin_mul_overflow(p.page_bytes(), uint64_t{num_blocks} * 2 * p.spec.layers, &bytes) ||
      bytes > (uint64_t{1} << 63)) {
    return absl::InvalidArgumentError(absl::StrCat("a paged layout of ", num_blocks,
                                                   " blocks of model ", model.id, " overflows"));
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Regions

struct BufferLease::Region {
  ~Region() {
    RemoveGuard(guard);
    if (map != nullptr) munmap(map, map_bytes);
    if (fd >= 0) close(fd);
  }

  std::string name;
  BufferKind kind = BufferKind::kShm;
  uint64_t size = 0;  // usable bytes
  // kShm: the object, its whole mapping, its SIGBUS guard slot.
  std::string shm_name;
  int fd = -1;
  uint8_t* map = nullptr;
  uint64_t map_bytes = 0;
  int guard = -1;
  // kCudaIpc.
  std::unique_ptr<CudaIpcBuffer> cuda;
  std::optional<PagedLayout> paged;  // fixed at registration
  // Guarded by the registry's mu_.
  int leases = 0;
  bool closing = false;
  uint64_t copies = 0;
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
};

absl::StatusOr<std::unique_ptr<BufferRegistry>> BufferRegistry::Create(Options options) {
  if (options.max_buffers == 0 || options.max_buffers > kGuardSlots) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_buffers must be in [1, ", kGuardSlots, "], got ", options.max_buffers));
  }
  return std::unique_ptr<BufferRegistry>(new BufferRegistry(std::move(options)));
}

BufferRegistry::~BufferRegistry() {
  absl::flat_hash_map<std::string, std::shared_ptr<BufferLease::Region>> buffers;
  {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](int* leases) { return *leases == 0; }, &leases_));
    buffers.swap(buffers_);
  }
  // The regions unmap as `buffers` goes.
}

absl::Status BufferRegistry::CheckRegistrable(absl::string_view name) const {
  if (!options_.allow) {
    return absl::FailedPreconditionError(
        absl::StrCat("buffer registration is not allowed: ", options_.off_reason));
  }
  if (auto s = ValidateBufferName(name); !s.ok()) return s;
  if (buffers_.contains(name) || pending_.contains(name)) {
    return absl::AlreadyExistsError(
        absl::StrCat("a buffer named \"", name, "\" is registered; unregister it first"));
  }
  if (buffers_.size() + pending_.size() >= options_.max_buffers) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "at most ", options_.max_buffers, " buffers may be registered, ", buffers_.size(), " are"));
  }
  return absl::OkStatus();
}

absl::StatusOr<BufferInfo> BufferRegistry::RegisterShm(absl::string_view name,
                                                       absl::string_view shm_name, uint64_t size,
                                                       std::optional<PagedLayout> paged) {
  {
    absl::MutexLock lock(&mu_);
    if (auto s = CheckRegistrable(name); !s.ok()) return s;
    if (auto s = ValidateShmName(shm_name); !s.ok()) return s;
    pending_[name] = 1;
  }
  // Opening and mapping run outside the lock; the name stays reserved meanwhile.
  auto region = std::make_shared<BufferLease::Region>();
  region->name = std::string(name);
  region->kind = BufferKind::kShm;
  region->shm_name = std::string(shm_name);
  auto open = [&]() -> absl::Status {
    // O_NOFOLLOW: /dev/shm is shared by every user; a symlink planted there must not redirect us.
    region->fd = shm_open(region->shm_name.c_str(), O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0);
    if (region->fd < 0) {
      return ErrnoStatus(errno, absl::StrCat("shm_open(\"", shm_name, "\")"));
    }
    struct stat st;
    if (fstat(region->fd, &st) != 0) {
      return ErrnoStatus(errno, absl::StrCat("fstat of shared memory ", shm_name));
    }
    if (!S_ISREG(st.st_mode)) {
      return absl::InvalidArgumentError(
          absl::StrCat("shared memory ", shm_name, " is not a regular shared-memory object"));
    }
    const uint64_t real = static_cast<uint64_t>(st.st_size);
    if (real == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shared memory ", shm_name, " has 0 bytes; ftruncate it to its size before registering"));
    }
    if (size > real) {
      return absl::InvalidArgumentError(absl::StrCat("shared memory ", shm_name, " has ", real,
                                                     " bytes, the registration claims ", size));
    }
    if (real > static_cast<uint64_t>(std::numeric_limits<size_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat("shared memory ", shm_name, " is too large to map: ", real, " bytes"));
    }
    void* map = mmap(nullptr, real, PROT_READ | PROT_WRITE, MAP_SHARED, region->fd, 0);
    if (map == MAP_FAILED) {
      return ErrnoStatus(errno,
                         absl::StrCat("mmap of shared memory ", shm_name, " (", real, " bytes)"));
    }
    region->map = static_cast<uint8_t*>(map);
    region->map_bytes = real;
    region->size = size == 0 ? real : size;
    region->guard = AddGuard(map, real);
    if (region->guard < 0) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "no room to guard another shared-memory mapping (", kGuardSlots, " in this process)"));
    }
    return absl::OkStatus();
  };
  if (absl::Status s = open(); !s.ok()) {
    absl::MutexLock lock(&mu_);
    pending_.erase(name);
    return s;
  }
  return Insert(std::move(region), std::move(paged));
}

absl::StatusOr<BufferInfo> BufferRegistry::RegisterCudaIpc(absl::string_view name, int device,
                                                           absl::string_view handle,
                                                           uint64_t offset, uint64_t size,
                                                           std::optional<PagedLayout> paged) {
  {
    absl::MutexLock lock(&mu_);
    if (auto s = CheckRegistrable(name); !s.ok()) return s;
    pending_[name] = 1;
  }
  auto buffer = CudaIpcBuffer::Open(device, handle, offset, size);
  if (!buffer.ok()) {
    absl::MutexLock lock(&mu_);
    pending_.erase(name);
    return buffer.status();
  }
  auto region = std::make_shared<BufferLease::Region>();
  region->name = std::string(name);
  region->kind = BufferKind::kCudaIpc;
  region->size = (*buffer)->size();
  region->map_bytes = (*buffer)->allocation_bytes();
  region->cuda = *std::move(buffer);
  return Insert(std::move(region), std::move(paged));
}

absl::StatusOr<BufferInfo> BufferRegistry::Insert(std::shared_ptr<BufferLease::Region> region,
                                                  std::optional<PagedLayout> paged) {
  absl::MutexLock lock(&mu_);
  pending_.erase(region->name);
  if (paged.has_value() && paged->bytes() > region->size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "a paged layout of ", paged->num_blocks, " blocks of model ", paged->model_id, " needs ",
        paged->bytes(), " bytes, buffer \"", region->name, "\" has ", region->size));
  }
  region->paged = std::move(paged);
  BufferInfo info = InfoOf(*region);
  buffers_[region->name] = std::move(region);
  return info;
}

BufferInfo BufferRegistry::InfoOf(const BufferLease::Region& r) {
  BufferInfo info;
  info.name = r.name;
  info.kind = r.kind;
  info.size = r.size;
  info.shm_name = r.shm_name;
  info.mapped_bytes = r.map_bytes;
  info.device = r.cuda ? r.cuda->device() : -1;
  info.copies_in_flight = static_cast<uint32_t>(r.leases);
  info.copies = r.copies;
  info.bytes_written = r.bytes_written;
  info.bytes_read = r.bytes_read;
  info.paged = r.paged;
  return info;
}

absl::StatusOr<uint32_t> BufferRegistry::Unregister(absl::string_view name) {
  std::shared_ptr<BufferLease::Region> region;
  uint32_t waited = 0;
  {
    absl::MutexLock lock(&mu_);
    auto it = buffers_.find(name);
    if (it == buffers_.end() || it->second->closing) {
      return absl::NotFoundError(absl::StrCat("no buffer named \"", name, "\" is registered"));
    }
    region = it->second;
    region->closing = true;
    waited = static_cast<uint32_t>(region->leases);
    mu_.Await(absl::Condition(
        +[](BufferLease::Region* r) { return r->leases == 0; }, region.get()));
    buffers_.erase(name);
  }
  region.reset();  // unmaps (outside the lock)
  return waited;
}

std::vector<BufferInfo> BufferRegistry::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<BufferInfo> out;
  out.reserve(buffers_.size());
  for (const auto& [name, region] : buffers_) out.push_back(InfoOf(*region));
  std::sort(out.begin(), out.end(),
            [](const BufferInfo& a, const BufferInfo& b) { return a.name < b.name; });
  return out;
}

absl::StatusOr<std::unique_ptr<BufferLease>> BufferRegistry::Acquire(const BufferRange& range,
                                                                     uint64_t bytes) {
  if (!range.block_ids.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("this call addresses buffer \"", range.buffer,
                     "\" by offset; block ids are for Get and Put into paged layouts"));
  }
  std::shared_ptr<BufferLease::Region> region;
  {
    absl::MutexLock lock(&mu_);
    auto it = buffers_.find(range.buffer);
    if (it == buffers_.end()) {
      return absl::NotFoundError(
          absl::StrCat("no buffer named \"", range.buffer, "\" is registered"));
    }
    region = it->second;
    if (region->closing) {
      return absl::FailedPreconditionError(
          absl::StrCat("buffer \"", range.buffer, "\" is being unregistered"));
    }
    const uint64_t size = region->size;
    if (range.offset > size || range.length > size - range.offset) {
      return absl::InvalidArgumentError(absl::StrCat("range [", range.offset, ", +", range.length,
                                                     ") leaves buffer \"", range.buffer, "\" of ",
                                                     size, " bytes"));
    }
    const uint64_t room = range.length == 0 ? size - range.offset : range.length;
    if (bytes > room) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the answer needs ", bytes, " bytes at offset ", range.offset, " of buffer \"",
          range.buffer, "\", the range has room for ", room, " (buffer size ", size, ")"));
    }
    if (region->kind == BufferKind::kShm) {
      if (GuardFaults(region->guard) != 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("shared memory ", region->shm_name, " of buffer \"", range.buffer,
                         "\" shrank under a copy; register it again"));
      }
      struct stat st;
      if (fstat(region->fd, &st) != 0) {
        return ErrnoStatus(errno, absl::StrCat("fstat of shared memory ", region->shm_name));
      }
      if (static_cast<uint64_t>(st.st_size) < region->map_bytes) {
        return absl::FailedPreconditionError(
            absl::StrCat("shared memory ", region->shm_name, " of buffer \"", range.buffer,
                         "\" shrank to ", st.st_size, " bytes, below the ", region->map_bytes,
                         " it had when registered; register it again"));
      }
    }
    ++region->leases;
    ++region->copies;
    ++leases_;
  }
  auto lease = std::unique_ptr<BufferLease>(new BufferLease(this, region, range.offset, bytes));
  if (region->kind == BufferKind::kShm) {
    lease->host_ = region->map + range.offset;
  } else {
    auto transfer = region->cuda->BeginTransfer();
    if (!transfer.ok()) return transfer.status();  // the lease releases itself
    lease->transfer_ = *std::move(transfer);
  }
  return lease;
}

absl::StatusOr<std::unique_ptr<BufferLease>> BufferRegistry::AcquirePages(
    const BufferRange& range, absl::string_view model_id) {
  if (range.offset != 0 || range.length != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("pages of buffer \"", range.buffer, "\" are named by block ids; offset ",
                     range.offset, " and length ", range.length, " must be 0"));
  }
  BufferRange whole = range;
  whole.block_ids.clear();
  auto lease = Acquire(whole, 0);
  if (!lease.ok()) return lease.status();
  // The layout is fixed at registration: checked against this lease's own region.
  const PagedLayout* paged = (*lease)->paged();
  if (paged == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("buffer \"", range.buffer,
                     "\" has no paged layout; register it with one to address it by block ids"));
  }
  if (paged->model_id != model_id) {
    return absl::InvalidArgumentError(absl::StrCat("buffer \"", range.buffer,
                                                   "\" holds pages of model ", paged->model_id,
                                                   ", the call is for model ", model_id));
  }
  for (size_t i = 0; i < range.block_ids.size(); ++i) {
    if (range.block_ids[i] >= paged->num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat("block id ", range.block_ids[i], " (index ", i,
                                                     ") out of range [0, ", paged->num_blocks,
                                                     ") of buffer \"", range.buffer, "\""));
    }
  }
  // Two blocks in one page would overwrite each other.
  std::vector<uint32_t> sorted = range.block_ids;
  std::sort(sorted.begin(), sorted.end());
  if (auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end()) {
    return absl::InvalidArgumentError(absl::StrCat("block id ", *dup, " is given twice"));
  }
  (*lease)->size_ = paged->bytes();  // <= the buffer's size, checked at registration
  return lease;
}

void BufferRegistry::Release(BufferLease& lease) {
  absl::MutexLock lock(&mu_);
  BufferLease::Region& r = *lease.region_;
  --r.leases;
  r.bytes_written += lease.written_;
  r.bytes_read += lease.read_;
  --leases_;
}

// ---------------------------------------------------------------------------------------------
// Leases

BufferLease::BufferLease(BufferRegistry* registry, std::shared_ptr<Region> region, uint64_t offset,
                         uint64_t size)
    : registry_(registry), region_(std::move(region)), offset_(offset), size_(size) {}

BufferLease::~BufferLease() {
  if (transfer_ != nullptr && !finished_) transfer_->Finish().IgnoreError();
  transfer_.reset();
  registry_->Release(*this);
}

BufferKind BufferLease::kind() const { return region_->kind; }

void* BufferLease::device_data() const {
  return transfer_ != nullptr ? transfer_->DeviceAt(offset_) : nullptr;
}

int BufferLease::device() const { return region_->cuda != nullptr ? region_->cuda->device() : -1; }

const PagedLayout* BufferLease::paged() const {
  return region_->paged.has_value() ? &*region_->paged : nullptr;
}

absl::Status BufferLease::CheckPiece(uint64_t at, uint64_t n) const {
  if (at > size_ || n > size_ - at) {
    return absl::InvalidArgumentError(
        absl::StrCat("bytes [", at, ", +", n, ") leave the lease of ", size_, " bytes"));
  }
  if (finished_) return absl::FailedPreconditionError("the lease is finished");
  return absl::OkStatus();
}

absl::Status BufferLease::Produce(uint64_t at, uint64_t n,
                                  absl::FunctionRef<absl::Status(void* dst)> fill) {
  if (auto s = CheckPiece(at, n); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  absl::Status s =
      transfer_ != nullptr ? transfer_->Produce(offset_ + at, n, fill) : fill(host_ + at);
  if (s.ok()) written_ += n;
  return s;
}

absl::Status BufferLease::ProduceParallel(
    uint64_t units, uint64_t unit_bytes, int threads,
    absl::FunctionRef<absl::Status(uint64_t i, void* dst)> fill) {
  uint64_t total = 0;
  if (__builtin_mul_overflow(units, unit_bytes, &total) || total > size_) {
    return absl::InvalidArgumentError(absl::StrCat(units, " units of ", unit_bytes,
                                                   " bytes leave the lease of ", size_, " bytes"));
  }
  absl::Status status;
  if (transfer_ != nullptr || threads <= 1 || units <= 1) {
    for (uint64_t i = 0; status.ok() && i < units; ++i) {
      status = Produce(i * unit_bytes, unit_bytes, [&](void* dst) { return fill(i, dst); });
    }
  } else {
    if (finished_) return absl::FailedPreconditionError("the lease is finished");
    status = ForEachParallel(units, threads,
                             [&](uint64_t i) { return fill(i, host_ + i * unit_bytes); });
    if (status.ok()) written_ += total;
  }
  absl::Status finished = Finish();
  return status.ok() ? finished : status;
}

absl::Status BufferLease::Write(uint64_t at, const void* src, uint64_t n) {
  if (auto s = CheckPiece(at, n); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  if (transfer_ != nullptr) {
    if (auto s = transfer_->CopyIn(offset_ + at, src, n); !s.ok()) return s;
  } else {
    std::memcpy(host_ + at, src, n);
  }
  written_ += n;
  return absl::OkStatus();
}

absl::Status BufferLease::Consume(uint64_t at, uint64_t n,
                                  absl::FunctionRef<absl::Status(const void* src)> use) {
  if (auto s = CheckPiece(at, n); !s.ok()) return s;
  if (n == 0) return absl::OkStatus();
  absl::Status s =
      transfer_ != nullptr ? transfer_->Consume(offset_ + at, n, use) : use(host_ + at);
  if (s.ok()) read_ += n;
  return s;
}

absl::Status BufferLease::Finish() {
  if (finished_) return finish_status_;
  finished_ = true;
  if (transfer_ != nullptr) {
    finish_status_ = transfer_->Finish();
  } else if (GuardFaults(region_->guard) != 0) {
    finish_status_ = absl::FailedPreconditionError(
        absl::StrCat("shared memory ", region_->shm_name, " of buffer \"", region_->name,
                     "\" shrank during the copy (the client truncated it); the copy is void"));
  }
  return finish_status_;
}

}  // namespace ropekv
