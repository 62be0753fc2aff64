#include "server/config_file.h"

#include <fstream>

#include "absl/flags/flag.h"
#include "gtest/gtest.h"

ABSL_FLAG(std::string, cft_listen, "default", "test flag");
ABSL_FLAG(std::string, cft_gpu_capacity, "1GiB", "test flag");
ABSL_FLAG(int32_t, cft_gpu_device, 0, "test flag");
ABSL_FLAG(bool, cft_write_through, true, "test flag");
ABSL_FLAG(std::string, model_limits, "", "test flag with the daemon's name");

namespace ropekv {
namespace {

std::string Find(const std::vector<ConfigSetting>& s, const std::string& flag) {
  for (const ConfigSetting& c : s) {
    if (c.flag == flag) return c.value;
  }
  return "<absent>";
}

TEST(ConfigFileTest, FlattensSectionsIntoFlagNames) {
  auto s = ParseConfigYaml(R"(
listen: 0.0.0.0:1234
gpu:
  capacity: 8GiB
  device: 1
a:
  b:
    c: deep
hosts: [x, y, z]
)");
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->size(), 5u);
  EXPECT_EQ((*s)[0].flag, "listen");
  EXPECT_EQ((*s)[0].value, "0.0.0.0:1234");
  EXPECT_EQ(Find(*s, "gpu_capacity"), "8GiB");
  EXPECT_EQ(Find(*s, "gpu_device"), "1");
  EXPECT_EQ(Find(*s, "a_b_c"), "deep");
  EXPECT_EQ(Find(*s, "hosts"), "x,y,z");
  EXPECT_EQ((*s)[1].where, "gpu.capacity");
}

TEST(ConfigFileTest, ModelsBecomeModelLimits) {
  auto s = ParseConfigYaml(R"(
models:
  - name: llama
    host_capacity: 1GiB
    disk_capacity: 16GiB
  - name: 0123456789abcdef
    disk_capacity: 2GiB
)");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(Find(*s, "model_limits"), "llama=host:1GiB,disk:16GiB;0123456789abcdef=disk:2GiB");
  EXPECT_EQ(ParseConfigYaml("models:\n  - host_capacity: 1GiB\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfigYaml("models:\n  - name: x\n    gpu_capacity: 1GiB\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfigYaml("models: 3\n").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ConfigFileTest, BadYamlIsInvalidArgumentWithItsLine) {
  auto s = ParseConfigYaml("listen: a\ngpu:\n  capacity: [1, 2\n");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("line"), std::string::npos) << s.status();
  EXPECT_EQ(ParseConfigYaml("- a\n- b\n").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfigYaml("listen:\n").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseConfigYaml("gpu:\n  capacity: [[1]]\n").status().code(),
            absl::StatusCode::kInvalidArgument);
  auto empty = ParseConfigYaml("# nothing\n");
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST(ConfigFileTest, MissingFileIsNotFound) {
  EXPECT_EQ(ReadConfigFile("/nonexistent/ropekvd.yaml").status().code(),
            absl::StatusCode::kNotFound);
}

TEST(ConfigFileTest, CommandLineFlagsAreFound) {
  const char* argv[] = {"ropekvd",           "--listen=1", "-gpu_capacity", "4G",
                        "--nowrite_through", "--",         "--after"};
  auto names = FlagsOnCommandLine(7, argv);
  EXPECT_TRUE(names.contains("listen"));
  EXPECT_TRUE(names.contains("gpu_capacity"));
  EXPECT_TRUE(names.contains("write_through"));
  EXPECT_FALSE(names.contains("after"));
}

TEST(ConfigFileTest, AppliesToFlagsAndTheCommandLineWins) {
  auto s = ParseConfigYaml(R"(
cft_listen: from-file
cft:
  gpu:
    capacity: 8GiB
    device: 3
  write_through: false
models:
  - name: m
    host_capacity: 5MiB
)");
  ASSERT_TRUE(s.ok()) << s.status();
  absl::SetFlag(&FLAGS_cft_listen, "from-command-line");
  ASSERT_TRUE(ApplyConfigSettings(*s, {"cft_listen"}).ok());
  EXPECT_EQ(absl::GetFlag(FLAGS_cft_listen), "from-command-line");
  EXPECT_EQ(absl::GetFlag(FLAGS_cft_gpu_capacity), "8GiB");
  EXPECT_EQ(absl::GetFlag(FLAGS_cft_gpu_device), 3);
  EXPECT_FALSE(absl::GetFlag(FLAGS_cft_write_through));
  EXPECT_EQ(absl::GetFlag(FLAGS_model_limits), "m=host:5MiB");
}

TEST(ConfigFileTest, UnknownOrUnparsableSettingsChangeNothing) {
  absl::SetFlag(&FLAGS_cft_gpu_capacity, "1GiB");
  absl::SetFlag(&FLAGS_cft_gpu_device, 0);
  auto unknown = ParseConfigYaml("cft_gpu_capacity: 2GiB\ncft_gpu_capcity: 3GiB\n");
  ASSERT_TRUE(unknown.ok());
  const absl::Status s1 = ApplyConfigSettings(*unknown, {});
  EXPECT_EQ(s1.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s1.message().find("cft_gpu_capcity"), std::string::npos) << s1;
  EXPECT_EQ(absl::GetFlag(FLAGS_cft_gpu_capacity), "1GiB");

  auto bad = ParseConfigYaml("cft_gpu_capacity: 2GiB\ncft_gpu_device: three\n");
  ASSERT_TRUE(bad.ok());
  const absl::Status s2 = ApplyConfigSettings(*bad, {});
  EXPECT_EQ(s2.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s2.message().find("cft_gpu_device"), std::string::npos) << s2;
  EXPECT_EQ(absl::GetFlag(FLAGS_cft_gpu_capacity), "1GiB");  // rolled back
  EXPECT_EQ(absl::GetFlag(FLAGS_cft_gpu_device), 0);
}

TEST(ConfigFileTest, TheExampleConfigParses) {
  auto s = ReadConfigFile(ROPEKV_SOURCE_DIR "/deploy/ropekvd.yaml");
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(Find(*s, "host_capacity"), "2GiB");
  EXPECT_EQ(Find(*s, "disk_durability"), "sync");
  EXPECT_EQ(Find(*s, "gpu_chunk_size"), "64MiB");
  EXPECT_EQ(Find(*s, "write_tier"), "host");
  EXPECT_EQ(Find(*s, "retrieval_device"), "auto");
}

}  // namespace
}  // namespace ropekv
