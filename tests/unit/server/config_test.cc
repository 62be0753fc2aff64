#include "server/config.h"

#include "gtest/gtest.h"

namespace ropekv {
namespace {

TEST(ConfigTest, ParsesSizes) {
  EXPECT_EQ(*ParseSize("2GiB"), 2ull << 30);
  EXPECT_EQ(*ParseSize("512MiB"), 512ull << 20);
  EXPECT_EQ(*ParseSize("64k"), 64ull << 10);
  EXPECT_EQ(*ParseSize("1048576"), 1048576ull);
  EXPECT_EQ(*ParseSize(" 3 G "), 3ull << 30);
  EXPECT_EQ(ParseSize("lots").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseSize("5 parsecs").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseSize("99999999999999T").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConfigTest, ChunkMustFitInAMessage) {
  ServerConfig c;
  EXPECT_TRUE(ValidateConfig(c).ok());
  c.chunk_bytes = c.max_message_bytes;
  EXPECT_EQ(ValidateConfig(c).code(), absl::StatusCode::kInvalidArgument);
  c = ServerConfig();
  c.host_capacity_bytes = 0;
  EXPECT_EQ(ValidateConfig(c).code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConfigTest, DiskSegmentSizeIsDerivedOrInRange) {
  ServerConfig c;
  for (uint64_t bytes :
       {uint64_t{0}, kMinDiskSegmentBytes, uint64_t{256} << 20, kMaxDiskSegmentBytes}) {
    c.disk_segment_bytes = bytes;
    EXPECT_TRUE(ValidateConfig(c).ok()) << bytes;
  }
  for (uint64_t bytes : {kMinDiskSegmentBytes - 1, kMaxDiskSegmentBytes + 1}) {
    c.disk_segment_bytes = bytes;
    const absl::Status s = ValidateConfig(c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bytes;
    EXPECT_NE(s.message().find("disk_segment_size"), absl::string_view::npos) << s;
  }
}

TEST(ConfigTest, KvcacheThreadsInRange) {
  ServerConfig c;
  for (int threads : {1, 4, 256}) {
    c.kvcache_threads = threads;
    EXPECT_TRUE(ValidateConfig(c).ok()) << threads;
  }
  for (int threads : {0, -1, 257}) {
    c.kvcache_threads = threads;
    EXPECT_EQ(ValidateConfig(c).code(), absl::StatusCode::kInvalidArgument) << threads;
  }
}

}  // namespace
}  // namespace ropekv
