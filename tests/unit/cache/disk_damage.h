// Test helper: damages a block's record in the disk tier's segment files, as a bad disk or a torn
// write would, for the tests of what the daemon does with it (disk_tier_test, tier_test,
// persistence_test).
#ifndef ROPEKV_TESTS_UNIT_CACHE_DISK_DAMAGE_H_
#define ROPEKV_TESTS_UNIT_CACHE_DISK_DAMAGE_H_

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <functional>
#include <string>

#include "cache/disk_tier.h"
#include "gtest/gtest.h"

namespace ropekv {
namespace testing {

// Reads the record (64-byte header and payload) of block `hash` from the closed disk tier at
// `path`, lets `change` rewrite it, and writes it back at its place; a shorter record truncates
// the segment file there. A null `change` deletes the block's metadata: the block vanishes.
inline void DamageDiskRecord(const std::string& path, const BlockHash& hash,
                             const std::function<void(std::string*)>& change) {
  DiskTier::Options o;
  o.path = path;
  o.background_compaction = false;
  auto tier = DiskTier::Open(o);
  ASSERT_TRUE(tier.ok()) << tier.status();
  ASSERT_TRUE((*tier)->Load().ok());
  if (change == nullptr) {
    ASSERT_TRUE((*tier)->DeleteBlocks({hash}).ok());
    return;
  }
  auto place = (*tier)->PlaceOf(hash);
  ASSERT_TRUE(place.ok()) << place.status();
  const std::string file = (*tier)->SegmentPath(place->segment);
  tier->reset();

  const int fd = ::open(file.c_str(), O_RDWR);
  ASSERT_GE(fd, 0) << file;
  std::string record(kDiskRecordHeaderBytes, '\0');
  ASSERT_EQ(::pread(fd, record.data(), record.size(), place->offset),
            static_cast<ssize_t>(record.size()));
  uint64_t payload = 0;
  for (int i = 0; i < 8; ++i) payload |= uint64_t{static_cast<uint8_t>(record[8 + i])} << (8 * i);
  record.resize(kDiskRecordHeaderBytes + payload);
  ASSERT_EQ(::pread(fd, record.data() + kDiskRecordHeaderBytes, payload,
                    place->offset + kDiskRecordHeaderBytes),
            static_cast<ssize_t>(payload));
  const size_t before = record.size();
  change(&record);
  ASSERT_EQ(::pwrite(fd, record.data(), record.size(), place->offset),
            static_cast<ssize_t>(record.size()));
  if (record.size() < before) {
    ASSERT_EQ(::ftruncate(fd, place->offset + record.size()), 0);
  }
  ::close(fd);
}

}  // namespace testing
}  // namespace ropekv

#endif  // ROPEKV_TESTS_UNIT_CACHE_DISK_DAMAGE_H_
