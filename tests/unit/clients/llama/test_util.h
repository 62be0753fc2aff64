// Helpers shared by the reference frontend's tests: temp dirs, file writing, the repo paths.
#ifndef ROPEKV_TESTS_UNIT_CLIENTS_LLAMA_TEST_UTIL_H_
#define ROPEKV_TESTS_UNIT_CLIENTS_LLAMA_TEST_UTIL_H_

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace ropekv {
namespace llama {
namespace testing_util {

// A fresh empty directory under the test temp dir.
inline std::string MakeTempDir(absl::string_view tag) {
  static std::atomic<int> counter{0};
  const std::string dir =
      absl::StrCat(::testing::TempDir(), "/ropekv_llama_", getpid(), "_", tag, "_", counter++);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

inline void WriteFile(const std::string& path, absl::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

// Root of the source tree (compile definition), where tests/data lives.
inline std::string SourceDir() { return ROPEKV_SOURCE_DIR; }
inline std::string ModelDir() { return SourceDir() + "/tests/data/models/code-byte-9m"; }

}  // namespace testing_util
}  // namespace llama
}  // namespace ropekv

#endif  // ROPEKV_TESTS_UNIT_CLIENTS_LLAMA_TEST_UTIL_H_
