// BufferRegistry: the policy, names, registration of shared memory (real objects made here, as a
// client makes them), range checks with canaries, leases, unregister waiting for copies, and the
// guard against a client that shrinks its region under a copy.
#include "cache/buffer_registry.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cache/cuda_ipc.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

using ::testing::HasSubstr;

// A shared-memory object made by "the client" (this test), mapped here too so that the test sees
// what the registry wrote. Filled with random bytes (never zeros) so that any write shows.
class ClientShm {
 public:
  explicit ClientShm(uint64_t size) : size_(size) {
    static std::atomic<int> counter{0};
    name_ = absl::StrCat("/ropekv-unit-", getpid(), "-", counter++);
    fd_ = shm_open(name_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd_, 0) << std::strerror(errno);
    if (size > 0) {
      EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(size)), 0);
      void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
      EXPECT_NE(p, MAP_FAILED);
      data_ = static_cast<uint8_t*>(p);
      std::mt19937_64 rng(size);
      for (uint64_t i = 0; i < size; ++i) data_[i] = static_cast<uint8_t>(rng() | 1);
      snapshot_.assign(data_, data_ + size);
    }
  }
  ~ClientShm() {
    if (data_ != nullptr) munmap(data_, size_);
    close(fd_);
    shm_unlink(name_.c_str());
  }
  const std::string& name() const { return name_; }
  uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  int fd() const { return fd_; }
  // The bytes as they were when made.
  const std::vector<uint8_t>& snapshot() const { return snapshot_; }
  bool Unchanged() const { return std::memcmp(data_, snapshot_.data(), size_) == 0; }
  // Whether every byte outside [begin, end) is as it was.
  bool UnchangedOutside(uint64_t begin, uint64_t end) const {
    return std::memcmp(data_, snapshot_.data(), begin) == 0 &&
           std::memcmp(data_ + end, snapshot_.data() + end, size_ - end) == 0;
  }

 private:
  std::string name_;
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  uint64_t size_;
  std::vector<uint8_t> snapshot_;
};

std::unique_ptr<BufferRegistry> Registry(bool allow = true, uint32_t max_buffers = 64) {
  BufferRegistry::Options o;
  o.allow = allow;
  o.max_buffers = max_buffers;
  o.off_reason = "the test said so";
  auto r = BufferRegistry::Create(std::move(o));
  EXPECT_TRUE(r.ok()) << r.status();
  return *std::move(r);
}

TEST(BuffersAllowedTest, ModesAndListeners) {
  struct Case {
    const char* mode;
    const char* listen;
    bool want;
  } cases[] = {
      {"on", "0.0.0.0:50051", true},           {"off", "127.0.0.1:50051", false},
      {"auto", "127.0.0.1:50051", true},       {"auto", "127.3.2.1:0", true},
      {"auto", "localhost:50051", true},       {"auto", "[::1]:50051", true},
      {"auto", "unix:/tmp/ropekv.sock", true}, {"auto", "ipv4:127.0.0.1:1", true},
      {"auto", "0.0.0.0:50051", false},        {"auto", "[::]:50051", false},
      {"auto", "10.0.0.7:50051", false},       {"auto", "127.0.0.1.evil.com:1", false},
      {"auto", "128.0.0.1:50051", false},      {"auto", "myhost:50051", false},
  };
  for (const Case& c : cases) {
    auto got = BuffersAllowed(c.mode, c.listen);
    ASSERT_TRUE(got.ok()) << c.mode << " " << c.listen << ": " << got.status();
    EXPECT_EQ(*got, c.want) << c.mode << " " << c.listen;
  }
  auto bad = BuffersAllowed("yes", "127.0.0.1:1");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("auto, on or off, got \"yes\""));
}

TEST(BufferNamesTest, BufferAndShmNames) {
  EXPECT_TRUE(ValidateBufferName("kv-pool_0:a.b").ok());
  EXPECT_TRUE(ValidateBufferName(std::string(128, 'a')).ok());
  for (const std::string& bad : {std::string(), std::string(129, 'a'), std::string("a b"),
                                 std::string("a/b"), std::string("a\0b", 3)}) {
    EXPECT_EQ(ValidateBufferName(bad).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_TRUE(ValidateShmName("/ropekv-0.x_y").ok());
  EXPECT_TRUE(ValidateShmName("/" + std::string(250, 'a')).ok());
  for (const std::string& bad :
       {std::string(), std::string("/"), std::string("noslash"), std::string("/a/b"),
        std::string("/."), std::string("/.."), std::string("//a"), std::string("/a b"),
        "/" + std::string(251, 'a'), std::string("/a\0b", 4)}) {
    EXPECT_EQ(ValidateShmName(bad).code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(BufferRegistryTest, CreateChecksOptions) {
  BufferRegistry::Options o;
  o.max_buffers = 0;
  EXPECT_EQ(BufferRegistry::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.max_buffers = 1025;
  EXPECT_EQ(BufferRegistry::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BufferRegistryTest, RefusedWhenNotAllowed) {
  ClientShm shm(4096);
  auto reg = Registry(/*allow=*/false);
  EXPECT_FALSE(reg->allowed());
  auto r = reg->RegisterShm("b", shm.name(), 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("the test said so"));
  auto c = reg->RegisterCudaIpc("c", 0, std::string(kCudaIpcHandleBytes, 'x'), 0, 0);
  EXPECT_EQ(c.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(reg->List().empty());
}

TEST(BufferRegistryTest, RegisterShmUsesTheRealSize) {
  ClientShm shm(3 * 4096 + 100);
  auto reg = Registry();
  auto all = reg->RegisterShm("all", shm.name(), 0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->kind, BufferKind::kShm);
  EXPECT_EQ(all->size, shm.size());
  EXPECT_EQ(all->mapped_bytes, shm.size());
  EXPECT_EQ(all->shm_name, shm.name());
  auto part = reg->RegisterShm("part", shm.name(), 5000);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(part->size, 5000u);
  EXPECT_EQ(part->mapped_bytes, shm.size());
  // A claim past the object's real size is refused, naming both.
  auto over = reg->RegisterShm("over", shm.name(), shm.size() + 1);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(over.status().message(),
              HasSubstr(absl::StrCat("has ", shm.size(), " bytes, the registration claims ",
                                     shm.size() + 1)));
  auto list = reg->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "all");
  EXPECT_EQ(list[1].name, "part");
  EXPECT_TRUE(shm.Unchanged());
}

TEST(BufferRegistryTest, RegisterShmErrors) {
  ClientShm shm(4096);
  ClientShm empty(0);
  auto reg = Registry(true, /*max_buffers=*/2);
  EXPECT_EQ(reg->RegisterShm("x", "/ropekv-unit-does-not-exist", 0).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(reg->RegisterShm("x", "no-slash", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(reg->RegisterShm("x", "/../../etc/passwd", 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(reg->RegisterShm("bad name", shm.name(), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto e = reg->RegisterShm("x", empty.name(), 0);
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(e.status().message(), HasSubstr("0 bytes"));
  ASSERT_TRUE(reg->RegisterShm("x", shm.name(), 0).ok());
  EXPECT_EQ(reg->RegisterShm("x", shm.name(), 0).status().code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(reg->RegisterShm("y", shm.name(), 0).ok());
  EXPECT_EQ(reg->RegisterShm("z", shm.name(), 0).status().code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(reg->Unregister("y").ok());
  EXPECT_TRUE(reg->RegisterShm("z", shm.name(), 0).ok());
  EXPECT_EQ(reg->Unregister("nope").status().code(), absl::StatusCode::kNotFound);
}

TEST(BufferRegistryTest, CudaIpcWithoutGpuIsUnavailable) {
  if (CudaIpcAvailable()) GTEST_SKIP() << "a GPU is present (tests/gpu covers CUDA IPC)";
  auto reg = Registry();
  auto r = reg->RegisterCudaIpc("gpu", 0, std::string(kCudaIpcHandleBytes, 'x'), 0, 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(r.status().message(), HasSubstr("shared memory"));
  // The name is free again.
  EXPECT_TRUE(reg->List().empty());
}

TEST(BufferRegistryTest, LeaseWritesOnlyItsRange) {
  ClientShm shm(64 * 1024);
  auto reg = Registry();
  ASSERT_TRUE(reg->RegisterShm("b", shm.name(), 0).ok());
  const uint64_t off = 12345, n = 7000;
  auto lease = reg->Acquire({"b", off, n}, n);
  ASSERT_TRUE(lease.ok()) << lease.status();
  EXPECT_EQ((*lease)->size(), n);
  EXPECT_NE((*lease)->host_data(), nullptr);  // the registry's own mapping of the object
  std::vector<uint8_t> want(n);
  std::mt19937_64 rng(7);
  for (auto& b : want) b = static_cast<uint8_t>(rng() | 0x80);
  // Two pieces, the second one first: offsets inside the lease are honoured.
  ASSERT_TRUE((*lease)
                  ->Produce(3000, n - 3000,
                            [&](void* dst) {
                              std::memcpy(dst, want.data() + 3000, n - 3000);
                              return absl::OkStatus();
                            })
                  .ok());
  ASSERT_TRUE((*lease)
                  ->Produce(0, 3000,
                            [&](void* dst) {
                              std::memcpy(dst, want.data(), 3000);
                              return absl::OkStatus();
                            })
                  .ok());
  // A piece past the lease is refused before fill runs.
  bool ran = false;
  auto past = (*lease)->Produce(n - 10, 11, [&](void*) {
    ran = true;
    return absl::OkStatus();
  });
  EXPECT_EQ(past.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ran);
  EXPECT_EQ((*lease)
                ->Produce(std::numeric_limits<uint64_t>::max(), 2,
                          [&](void*) {
                            ran = true;
                            return absl::OkStatus();
                          })
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ran);
  // Consume sees the bytes just written.
  std::vector<uint8_t> back(n);
  ASSERT_TRUE((*lease)
                  ->Consume(0, n,
                            [&](const void* src) {
                              std::memcpy(back.data(), src, n);
                              return absl::OkStatus();
                            })
                  .ok());
  EXPECT_EQ(back, want);
  EXPECT_TRUE((*lease)->Finish().ok());
  lease->reset();
  EXPECT_EQ(std::memcmp(shm.data() + off, want.data(), n), 0);
  EXPECT_TRUE(shm.UnchangedOutside(off, off + n));
  auto info = reg->List();
  ASSERT_EQ(info.size(), 1u);
  EXPECT_EQ(info[0].copies, 1u);
  EXPECT_EQ(info[0].bytes_written, n);
  EXPECT_EQ(info[0].bytes_read, n);
  EXPECT_EQ(info[0].copies_in_flight, 0u);
}

TEST(BufferRegistryTest, ProduceParallelWritesEveryUnitOnce) {
  ClientShm shm(1 << 20);
  auto reg = Registry();
  ASSERT_TRUE(reg->RegisterShm("b", shm.name(), 0).ok());
  const uint64_t off = 1000, units = 37, unit = 4099;
  for (int threads : {1, 3, 64}) {
    auto lease = reg->Acquire({"b", off, 0}, units * unit);
    ASSERT_TRUE(lease.ok());
    std::atomic<int> calls{0};
    ASSERT_TRUE((*lease)
                    ->ProduceParallel(units, unit, threads,
                                      [&](uint64_t i, void* dst) {
                                        ++calls;
                                        std::memset(dst, static_cast<int>(i + threads), unit);
                                        return absl::OkStatus();
                                      })
                    .ok());
    EXPECT_EQ(calls.load(), static_cast<int>(units));
    for (uint64_t i = 0; i < units; ++i) {
      ASSERT_EQ(shm.data()[off + i * unit], static_cast<uint8_t>(i + threads)) << i;
      ASSERT_EQ(shm.data()[off + i * unit + unit - 1], static_cast<uint8_t>(i + threads)) << i;
    }
    EXPECT_TRUE(shm.UnchangedOutside(off, off + units * unit));
  }
  // Past the lease: refused before any unit runs; an error of one unit is the answer.
  auto lease = reg->Acquire({"b", off, 0}, units * unit);
  ASSERT_TRUE(lease.ok());
  bool ran = false;
  EXPECT_EQ((*lease)
                ->ProduceParallel(units + 1, unit, 4,
                                  [&](uint64_t, void*) {
                                    ran = true;
                                    return absl::OkStatus();
                                  })
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ran);
  EXPECT_EQ((*lease)
                ->ProduceParallel(units, unit, 4,
                                  [&](uint64_t i, void*) {
                                    return i == 5 ? absl::DataLossError("unit 5")
                                                  : absl::OkStatus();
                                  })
                .code(),
            absl::StatusCode::kDataLoss);
}

TEST(BufferRegistryTest, BadRangesAreInvalidAndWriteNothing) {
  ClientShm shm(10000);
  auto reg = Registry();
  ASSERT_TRUE(reg->RegisterShm("b", shm.name(), 8000).ok());  // the last 2000 bytes are not ours
  const uint64_t kMax = std::numeric_limits<uint64_t>::max();
  struct Case {
    BufferRange range;
    uint64_t bytes;
  } cases[] = {
      {{"b", 8001, 0}, 0},     // offset past the end
      {{"b", 7000, 1001}, 1},  // range past the end
      {{"b", 7000, 0}, 1001},  // answer past the end
      {{"b", 0, 100}, 101},    // answer past the range
      {{"b", kMax, 2}, 1},     // offset + length overflows
      {{"b", 1, kMax}, 1},     // length overflows
      {{"b", 0, 0}, kMax},     // bytes huge
      {{"b", 8000, 0}, 1},     // nothing left at the end
  };
  for (const Case& c : cases) {
    auto lease = reg->Acquire(c.range, c.bytes);
    EXPECT_EQ(lease.status().code(), absl::StatusCode::kInvalidArgument)
        << c.range.offset << " +" << c.range.length << " bytes " << c.bytes;
  }
  // The edges are fine.
  EXPECT_TRUE(reg->Acquire({"b", 8000, 0}, 0).ok());
  EXPECT_TRUE(reg->Acquire({"b", 0, 8000}, 8000).ok());
  EXPECT_EQ(reg->Acquire({"nope", 0, 0}, 0).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(shm.Unchanged());
}

TEST(BufferRegistryTest, UnregisterWaitsForLeases) {
  ClientShm shm(1 << 20);
  auto reg = Registry();
  ASSERT_TRUE(reg->RegisterShm("b", shm.name(), 0).ok());
  auto lease = reg->Acquire({"b", 0, 0}, 4096);
  ASSERT_TRUE(lease.ok());
  EXPECT_EQ(reg->List()[0].copies_in_flight, 1u);
  std::atomic<bool> done{false};
  absl::StatusOr<uint32_t> waited;
  std::thread t([&] {
    waited = reg->Unregister("b");
    done = true;
  });
  // While it waits, the buffer refuses new leases and a second Unregister; the lease still writes
  // into the live mapping.
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_FALSE(done.load());
  EXPECT_EQ(reg->Acquire({"b", 0, 0}, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(reg->Unregister("b").status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE((*lease)
                  ->Produce(0, 4096,
                            [](void* dst) {
                              std::memset(dst, 0x5A, 4096);
                              return absl::OkStatus();
                            })
                  .ok());
  EXPECT_TRUE((*lease)->Finish().ok());
  EXPECT_FALSE(done.load());
  lease->reset();
  t.join();
  EXPECT_TRUE(done.load());
  ASSERT_TRUE(waited.ok());
  EXPECT_EQ(*waited, 1u);
  EXPECT_TRUE(reg->List().empty());
  EXPECT_EQ(reg->Acquire({"b", 0, 0}, 1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(shm.data()[0], 0x5A);
  EXPECT_EQ(shm.data()[4095], 0x5A);
  EXPECT_TRUE(shm.UnchangedOutside(0, 4096));
}

TEST(BufferRegistryTest, ShrunkRegionIsRefused) {
  ClientShm shm(8 * 4096);
  auto reg = Registry();
  ASSERT_TRUE(reg->RegisterShm("b", shm.name(), 4096).ok());
  ASSERT_EQ(ftruncate(shm.fd(), 4096), 0);
  auto lease = reg->Acquire({"b", 0, 0}, 1);
  EXPECT_EQ(lease.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(lease.status().message(), HasSubstr("shrank"));
}

// The client truncates its object while a lease is live: the copy faults (SIGBUS) into the guard,
// the process lives on, the lease ends FAILED_PRECONDITION and the buffer is refused afterwards.
TEST(BufferRegistryTest, TruncationDuringACopyIsSurvived) {
  const uint64_t size = 16 * 4096;
  ClientShm shm(size);
  auto reg = Registry();
  ASSERT_TRUE(reg->RegisterShm("b", shm.name(), 0).ok());
  auto lease = reg->Acquire({"b", 0, 0}, size);
  ASSERT_TRUE(lease.ok());
  ASSERT_EQ(ftruncate(shm.fd(), 4096), 0);  // pages 1.. are gone
  ASSERT_TRUE((*lease)
                  ->Produce(0, size,
                            [&](void* dst) {
                              std::memset(dst, 0x33, size);
                              return absl::OkStatus();
                            })
                  .ok());
  uint64_t sum = 0;
  ASSERT_TRUE((*lease)
                  ->Consume(0, size,
                            [&](const void* src) {
                              for (uint64_t i = 0; i < size; ++i) {
                                sum += static_cast<const uint8_t*>(src)[i];
                              }
                              return absl::OkStatus();
                            })
                  .ok());
  const absl::Status finished = (*lease)->Finish();
  EXPECT_EQ(finished.code(), absl::StatusCode::kFailedPrecondition) << finished;
  EXPECT_THAT(finished.message(), HasSubstr("shrank during the copy"));
  lease->reset();
  EXPECT_EQ(reg->Acquire({"b", 0, 0}, 1).status().code(), absl::StatusCode::kFailedPrecondition);
  // The page that still exists got the bytes; the registry can be cleaned up as usual.
  EXPECT_EQ(shm.data()[0], 0x33);
  EXPECT_TRUE(reg->Unregister("b").ok());
}

// A SIGBUS outside any registered mapping keeps its default meaning (the process dies).
TEST(BufferRegistryDeathTest, ForeignSigbusStillKills) {
  ClientShm shm(4096);
  auto reg = Registry();
  ASSERT_TRUE(reg->RegisterShm("b", shm.name(), 0).ok());  // installs the guard
  EXPECT_DEATH(
      {
        ClientShm other(2 * 4096);
        shm_unlink(other.name().c_str());  // the child dies before its destructor runs
        ASSERT_EQ(ftruncate(other.fd(), 0), 0);
        volatile uint8_t* p = other.data();
        p[4096] = 1;
      },
      "");
}

}  // namespace
}  // namespace ropekv
