// disk_bench: the disk tier's write and read throughput against plain file I/O of the same bytes
// on the same disk.
//
//   disk_bench [--dir DIR] [--block_kib 2048] [--blocks 256] [--batch 8] [--reps 3]
//
// Rows (median of --reps runs, each on a fresh folder):
//   file write+fsync once     write() the bytes sequentially into one file, one fsync at the end
//   file write+fsync/batch    the same, fsync after every --batch blocks (the ack of `sync`)
//   disk tier put (memory)    DiskTier::PutBlocks of --batch blocks per call, durability memory,
//                             then a Flush (segment files synced, metadata flushed)
//   disk tier put (sync)      the same, durability sync (segment and WAL fsync'ed per call)
//   disk tier put, full       the sync put into a tier of half the bytes' capacity: once it is
//                             full, random stored blocks are deleted to make room before each
//                             put (a cache evicting), so segments (1/16 of the capacity)
//                             fragment and the background
//                             compaction moves their live blocks meanwhile; also prints the
//                             blocks it moved per block put (the write amplification)
//   file read                 pread() the file back sequentially (page cache warm)
//   disk tier read            DiskTier::ReadBlock of every block, random order, checksums verified
//   disk tier read, batched   one DiskTier::ReadBlocks of every block (4 threads), random order
// Reads come from the OS page cache (dropping it needs root); they measure the tier's overhead
// (a lookup, the copy out of the page cache, XXH3), not the device. Prints a table and one JSON
// line.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cache/disk_tier.h"

namespace ropekv {
namespace {

struct Args {
  std::string dir;
  uint64_t block_bytes = 2ull << 20;
  int blocks = 256;
  int batch = 8;
  int reps = 3;
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

bool Fail(const std::string& what) {
  std::fprintf(stderr, "disk_bench: %s\n", what.c_str());
  std::exit(1);
  return false;
}

// Seconds to write `data` into one file, in block-sized write() calls, with an fsync after every
// `fsync_every` blocks (0: once at the end).
double FileWrite(const std::string& path, const std::vector<std::string>& data, int fsync_every) {
  const double t0 = Now();
  const int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  if (fd < 0) Fail("open " + path);
  for (size_t i = 0; i < data.size(); ++i) {
    size_t done = 0;
    while (done < data[i].size()) {
      const ssize_t n = ::write(fd, data[i].data() + done, data[i].size() - done);
      if (n <= 0) Fail("write " + path);
      done += n;
    }
    if (fsync_every > 0 && (i + 1) % fsync_every == 0) ::fsync(fd);
  }
  ::fsync(fd);
  ::close(fd);
  return Now() - t0;
}

double FileRead(const std::string& path, uint64_t block_bytes, int blocks) {
  std::string buf(block_bytes, '\0');
  const double t0 = Now();
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) Fail("open " + path);
  uint64_t sum = 0;
  for (int i = 0; i < blocks; ++i) {
    const ssize_t n = ::pread(fd, buf.data(), block_bytes, static_cast<off_t>(i) * block_bytes);
    if (n != static_cast<ssize_t>(block_bytes)) Fail("read " + path);
    sum += static_cast<uint8_t>(buf[i % block_bytes]);
  }
  ::close(fd);
  const double t = Now() - t0;
  if (sum == 0xffffffffffffull) std::printf(" ");  // keep the reads
  return t;
}

std::unique_ptr<DiskTier> OpenTier(const std::string& path, Durability d,
                                   uint64_t capacity = 1ull << 40, uint64_t segment_bytes = 0) {
  DiskTier::Options o;
  o.path = path;
  o.durability = d;
  o.capacity_bytes = capacity;
  o.segment_bytes = segment_bytes;
  auto t = DiskTier::Open(o);
  if (!t.ok()) Fail(std::string(t.status().message()));
  if (auto c = (*t)->Load(); !c.ok()) Fail(std::string(c.status().message()));
  return *std::move(t);
}

// The metadata of the bench's block i.
DiskBlockMeta MetaOf(const BlockHash& hash, size_t i, uint64_t bytes) {
  DiskBlockMeta m;
  m.hash = hash;
  m.model = "0123456789abcdef";
  m.position = static_cast<int64_t>(i) * 16;
  m.rotated_at = m.position;
  m.bytes = bytes;
  return m;
}

double TierPut(DiskTier& tier, const std::vector<std::string>& data,
               const std::vector<BlockHash>& hashes, int batch) {
  const double t0 = Now();
  std::vector<DiskTier::BlockWrite> writes;
  for (size_t i = 0; i < data.size(); ++i) {
    const DiskBlockMeta m = MetaOf(hashes[i], i, data[i].size());
    writes.push_back({m, data[i].data()});
    if (static_cast<int>(writes.size()) == batch || i + 1 == data.size()) {
      if (auto s = tier.PutBlocks(writes); !s.ok()) Fail(std::string(s.message()));
      writes.clear();
    }
  }
  // Until the bytes are synced, as the file rows end with fsync.
  if (auto s = tier.Flush(); !s.ok()) Fail(std::string(s.message()));
  return Now() - t0;
}

// TierPut into a tier that holds half the blocks, deleting random stored ones to make room.
double TierPutFull(DiskTier& tier, const std::vector<std::string>& data,
                   const std::vector<BlockHash>& hashes, int batch, std::mt19937_64& rng) {
  const double t0 = Now();
  std::vector<BlockHash> stored;
  std::vector<DiskTier::BlockWrite> writes;
  uint64_t batch_bytes = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    const DiskBlockMeta m = MetaOf(hashes[i], i, data[i].size());
    writes.push_back({m, data[i].data()});
    batch_bytes += m.bytes;
    if (static_cast<int>(writes.size()) < batch && i + 1 < data.size()) continue;
    // Room for the batch, as a cache makes it: random stored blocks go, in one delete.
    std::vector<BlockHash> doomed;
    uint64_t freed = 0;
    while (freed < batch_bytes && !tier.Fits(batch_bytes - freed) && !stored.empty()) {
      const size_t k = rng() % stored.size();
      doomed.push_back(stored[k]);
      freed += data[i].size();  // every block has the bench's size
      stored[k] = stored.back();
      stored.pop_back();
    }
    if (auto s = tier.DeleteBlocks(doomed); !s.ok()) Fail(std::string(s.message()));
    if (auto s = tier.PutBlocks(writes); !s.ok()) Fail(std::string(s.message()));
    for (const auto& w : writes) stored.push_back(w.meta.hash);
    writes.clear();
    batch_bytes = 0;
  }
  if (auto s = tier.Flush(); !s.ok()) Fail(std::string(s.message()));
  return Now() - t0;
}

double TierRead(DiskTier& tier, const std::vector<std::string>& data,
                const std::vector<BlockHash>& hashes, std::mt19937_64& rng) {
  std::vector<size_t> order(hashes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::string buf(data[0].size(), '\0');
  const double t0 = Now();
  for (size_t i : order) {
    if (auto s = tier.ReadBlock(hashes[i], buf.data(), buf.size()); !s.ok()) {
      Fail(std::string(s.message()));
    }
  }
  const double t = Now() - t0;
  // Checked once, outside the timing: the last block read is the right one.
  if (buf != data[order.back()]) Fail("read returned other bytes");
  return t;
}

double TierReadBatched(DiskTier& tier, const std::vector<std::string>& data,
                       const std::vector<BlockHash>& hashes, std::mt19937_64& rng) {
  std::vector<size_t> order(hashes.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<std::string> out(hashes.size(), std::string(data[0].size(), '\0'));
  std::vector<DiskTier::BlockRead> reads;
  for (size_t i : order) reads.push_back({hashes[i], out[i].data(), out[i].size()});
  std::vector<absl::Status> statuses(reads.size());
  const double t0 = Now();
  tier.ReadBlocks(reads, absl::MakeSpan(statuses));
  const double t = Now() - t0;
  for (size_t i = 0; i < statuses.size(); ++i) {
    if (!statuses[i].ok()) Fail(std::string(statuses[i].message()));
  }
  if (out != data) Fail("batched read returned other bytes");
  return t;
}

int Main(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const std::string v = argv[i + 1];
    int64_t n = 0;
    if (k == "--dir") {
      a.dir = v;
      continue;
    }
    if (!absl::SimpleAtoi(v, &n) || n <= 0) Fail("bad value for " + k + ": " + v);
    if (k == "--block_kib") {
      a.block_bytes = static_cast<uint64_t>(n) << 10;
    } else if (k == "--blocks") {
      a.blocks = static_cast<int>(n);
    } else if (k == "--batch") {
      a.batch = static_cast<int>(n);
    } else if (k == "--reps") {
      a.reps = static_cast<int>(n);
    } else {
      Fail("unknown flag " + k);
    }
  }
  if (a.dir.empty()) a.dir = absl::StrCat("/tmp/ropekv-disk-bench-", getpid());
  std::filesystem::remove_all(a.dir);
  std::filesystem::create_directories(a.dir);

  std::mt19937_64 rng(42);
  std::vector<std::string> data(a.blocks, std::string(a.block_bytes, '\0'));
  std::vector<BlockHash> hashes(a.blocks);
  for (int i = 0; i < a.blocks; ++i) {
    for (uint64_t j = 0; j < a.block_bytes; j += 8) {
      const uint64_t v = rng();
      std::memcpy(data[i].data() + j, &v, std::min<uint64_t>(8, a.block_bytes - j));
    }
    for (auto& b : hashes[i].bytes) b = static_cast<uint8_t>(rng());
  }
  const double total = static_cast<double>(a.block_bytes) * a.blocks;

  struct Row {
    std::string name;
    std::string key;
    std::vector<double> secs;
  };
  std::vector<Row> rows = {{"file write+fsync once", "file_write", {}},
                           {"file write+fsync/batch", "file_write_fsync_batch", {}},
                           {"disk tier put (memory)", "tier_put_memory", {}},
                           {"disk tier put (sync)", "tier_put_sync", {}},
                           {"disk tier put, full", "tier_put_full", {}},
                           {"file read", "file_read", {}},
                           {"disk tier read", "tier_read", {}},
                           {"disk tier read, batched", "tier_read_batched", {}}};
  std::vector<double> moved;  // blocks compaction moved per block put, "put, full"
  for (int r = 0; r < a.reps; ++r) {
    const std::string rep = absl::StrCat(a.dir, "/rep", r);
    std::filesystem::create_directories(rep);
    // Every case starts with no dirty pages of an earlier one (sync(2) between cases).
    ::sync();
    rows[0].secs.push_back(FileWrite(rep + "/plain", data, 0));
    ::sync();
    rows[1].secs.push_back(FileWrite(rep + "/plain2", data, a.batch));
    {
      auto tier = OpenTier(rep + "/memory", Durability::kMemory);
      ::sync();
      rows[2].secs.push_back(TierPut(*tier, data, hashes, a.batch));
    }
    {
      auto tier = OpenTier(rep + "/sync", Durability::kSync);
      ::sync();
      rows[3].secs.push_back(TierPut(*tier, data, hashes, a.batch));
      ::sync();
      rows[5].secs.push_back(FileRead(rep + "/plain", a.block_bytes, a.blocks));
      rows[6].secs.push_back(TierRead(*tier, data, hashes, rng));
      rows[7].secs.push_back(TierReadBatched(*tier, data, hashes, rng));
    }
    {
      // Segments of 1/16 of the capacity (the daemon's default is 1/256, at least 64 MiB).
      auto tier = OpenTier(rep + "/full", Durability::kSync, total / 2, total / 32);
      ::sync();
      rows[4].secs.push_back(TierPutFull(*tier, data, hashes, a.batch, rng));
      moved.push_back(static_cast<double>(tier->Counters().relocated) / a.blocks);
    }
    std::filesystem::remove_all(rep);
  }
  std::filesystem::remove_all(a.dir);

  const double base_write = total / Median(rows[0].secs);
  const double base_read = total / Median(rows[5].secs);
  std::printf("disk_bench: %d blocks of %llu KiB (%.0f MiB), %d blocks per put, median of %d\n",
              a.blocks, static_cast<unsigned long long>(a.block_bytes >> 10), total / (1 << 20),
              a.batch, a.reps);
  std::printf("%-26s %12s %10s\n", "case", "MiB/s", "vs file");
  std::string json = absl::StrFormat(
      "{\"bench\":\"disk_bench\",\"block_bytes\":%d,\"blocks\":%d,\"batch\":%d,\"reps\":%d",
      a.block_bytes, a.blocks, a.batch, a.reps);
  for (size_t i = 0; i < rows.size(); ++i) {
    const double mibs = total / Median(rows[i].secs) / (1 << 20);
    const double base = i < 5 ? base_write : base_read;
    std::printf("%-26s %12.1f %9.2fx\n", rows[i].name.c_str(), mibs,
                total / Median(rows[i].secs) / base);
    absl::StrAppendFormat(&json, ",\"%s_mib_s\":%.1f", rows[i].key, mibs);
  }
  std::printf("put, full: compaction moved %.2f blocks per block put (median)\n", Median(moved));
  absl::StrAppendFormat(&json, ",\"full_moved_per_put\":%.3f}", Median(moved));
  std::printf("%s\n", json.c_str());
  return 0;
}

}  // namespace
}  // namespace ropekv

int main(int argc, char** argv) { return ropekv::Main(argc, argv); }
