#include "cache/allocator.h"

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"

namespace ropekv {
namespace {

constexpr size_t kAlign = 4096;

size_t RoundUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

class AlignedAllocator final : public Allocator {
 public:
  void* Allocate(size_t bytes) override { return std::aligned_alloc(kAlign, RoundUp(bytes)); }
  void Free(void* p, size_t) override { std::free(p); }
};

class KeepingAllocator final : public Allocator {
 public:
  KeepingAllocator(std::unique_ptr<Allocator> raw, uint64_t limit, uint64_t keep_limit)
      : raw_(std::move(raw)), limit_(limit), keep_limit_(keep_limit) {}

  ~KeepingAllocator() override {
    absl::MutexLock lock(&mu_);
    for (auto& [size, list] : kept_) {
      for (void* p : list) raw_->Free(p, size);
    }
  }

  bool device_readable() const override { return raw_->device_readable(); }

  uint64_t kept_bytes() const override {
    absl::MutexLock lock(&mu_);
    return kept_bytes_;
  }

  uint64_t ReleaseKeptIfIdle(std::chrono::steady_clock::duration idle,
                             std::chrono::steady_clock::time_point now) override {
    std::vector<std::pair<void*, size_t>> release;
    {
      absl::MutexLock lock(&mu_);
      if (kept_bytes_ == 0 || now - last_use_ < idle) return 0;
      for (auto& [size, list] : kept_) {
        for (void* p : list) release.emplace_back(p, size);
      }
      kept_.clear();
      kept_bytes_ = 0;
    }
    uint64_t bytes = 0;
    for (const auto& [p, size] : release) {
      raw_->Free(p, size);
      bytes += size;
    }
    return bytes;
  }

  void* Allocate(size_t bytes) override {
    std::vector<std::pair<void*, size_t>> release;
    {
      absl::MutexLock lock(&mu_);
      last_use_ = std::chrono::steady_clock::now();
      auto it = kept_.find(bytes);
      if (it != kept_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        kept_bytes_ -= bytes;
        live_bytes_ += bytes;
        return p;
      }
      for (auto k = kept_.begin(); k != kept_.end() && live_bytes_ + kept_bytes_ + bytes > limit_;
           ++k) {
        while (!k->second.empty() && live_bytes_ + kept_bytes_ + bytes > limit_) {
          release.emplace_back(k->second.back(), k->first);
          k->second.pop_back();
          kept_bytes_ -= k->first;
        }
      }
      if (live_bytes_ + kept_bytes_ + bytes > limit_) return nullptr;
      live_bytes_ += bytes;  // reserved before the (possibly slow) calls below, outside the lock
    }
    for (const auto& [p, size] : release) raw_->Free(p, size);
    void* p = raw_->Allocate(bytes);
    if (p == nullptr) {
      absl::MutexLock lock(&mu_);
      live_bytes_ -= bytes;
    }
    return p;
  }

  void Free(void* p, size_t bytes) override {
    if (p == nullptr) return;
    {
      absl::MutexLock lock(&mu_);
      last_use_ = std::chrono::steady_clock::now();
      live_bytes_ -= bytes;
      if (kept_bytes_ + bytes <= keep_limit_) {
        kept_[bytes].push_back(p);  // live + kept is unchanged, so still within the limit
        kept_bytes_ += bytes;
        return;
      }
    }
    raw_->Free(p, bytes);  // past the keep limit: back to the system, outside the lock
  }

 private:
  const std::unique_ptr<Allocator> raw_;
  const uint64_t limit_;
  const uint64_t keep_limit_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<size_t, std::vector<void*>> kept_ ABSL_GUARDED_BY(mu_);
  uint64_t kept_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t live_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  std::chrono::steady_clock::time_point last_use_ ABSL_GUARDED_BY(mu_) =
      std::chrono::steady_clock::now();
};

}  // namespace

KeptReleaser::KeptReleaser(Allocator* allocator, absl::Duration idle) {
  if (allocator == nullptr || idle <= absl::ZeroDuration()) return;
  const auto period = absl::ToChronoNanoseconds(idle);
  const absl::Duration check = std::min(idle / 4, absl::Seconds(1));
  thread_ = std::thread([this, allocator, period, check] {
    absl::MutexLock lock(&mu_);
    while (!mu_.AwaitWithTimeout(absl::Condition(&stop_), check)) {
      allocator->ReleaseKeptIfIdle(period, std::chrono::steady_clock::now());
    }
  });
}

KeptReleaser::~KeptReleaser() {
  if (!thread_.joinable()) return;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

std::unique_ptr<Allocator> NewAlignedAllocator() { return std::make_unique<AlignedAllocator>(); }

std::unique_ptr<Allocator> NewKeepingAllocator(std::unique_ptr<Allocator> raw, uint64_t limit_bytes,
                                               uint64_t keep_limit_bytes) {
  return std::make_unique<KeepingAllocator>(std::move(raw), limit_bytes, keep_limit_bytes);
}

}  // namespace ropekv
