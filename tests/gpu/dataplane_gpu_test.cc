// CUDA IPC buffers through a real ropekvd (built with CUDA, on a machine with a GPU): this test
// plays the frontend, exporting a cudaMalloc'd buffer by cudaIpcGetMemHandle and registering it.
// What the daemon writes there equals what the gRPC bytes path answers for the same request
// (checked against fp64 references in its own tests); random canary bytes around every target
// range must survive; bad ranges and handles are refused. Skips itself without a GPU.
//
// The daemon binary: $ROPEKVD, else ../ropekvd beside this test's folder (the build tree's
// layout, also after the build folder is copied elsewhere), else the path known at build time.
#include <cuda_runtime_api.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "clients/cpp/client.h"
#include "clients/cpp/dataplane_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

using client::BufferRef;
using client::Client;
using client::DataPlaneClient;
using client::KvShape;
using client::KvView;

std::string DaemonBinary() {
  if (const char* env = std::getenv("ROPEKVD"); env != nullptr && *env != '\0') return env;
  std::error_code ec;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const auto beside = self.parent_path().parent_path() / "ropekvd";
    if (std::filesystem::exists(beside, ec)) return beside.string();
  }
  return ROPEKVD;
}

// ropekvd on a free loopback port, with a fresh data folder.
class Daemon {
 public:
  Daemon() {
    dir_ = "/tmp/ropekv-dataplane-gpu-" + std::to_string(getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    const std::string port_file = dir_ + "/port";
    std::vector<std::string> args = {DaemonBinary(), "--listen=127.0.0.1:0", "--data_dir=" + dir_,
                                     "--port_file=" + port_file, "--gpu_capacity=256MiB"};
    pid_ = fork();
    if (pid_ == 0) {
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(port_file);
      if (in >> port_ && port_ > 0) return;
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        ADD_FAILURE() << args[0] << " exited during start, status " << status;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ADD_FAILURE() << "ropekvd did not report its port within 60 s";
  }
  ~Daemon() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      int status = 0;
      waitpid(pid_, &status, 0);
    }
    std::filesystem::remove_all(dir_);
  }
  bool running() const { return pid_ > 0; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  std::string dir_;
  int pid_ = -1;
  int port_ = 0;
};

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

v1::ModelSpec Demo() {
  v1::ModelSpec s;
  s.set_layers(4);
  s.set_kv_heads(2);
  s.set_head_dim(64);
  s.set_dtype(v1::DTYPE_BF16);
  s.set_block_tokens(16);
  s.mutable_rope()->set_theta(10000);
  return s;
}

std::vector<int32_t> Tokens(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 32000);
  return t;
}

// Finite bf16 values.
std::vector<uint8_t> Bytes(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(i % 2 ? (rng() & 0xBF) : rng());
  return b;
}

class DataPlaneGpuTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kAlloc = 2 << 20;    // the frontend's allocation
  static constexpr uint64_t kOffset = 64 << 10;  // the registered buffer starts here in it

  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no GPU";
    daemon_ = std::make_unique<Daemon>();
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    client_ = *Client::Connect(o);
    dp_ = *DataPlaneClient::Connect(o);
    ASSERT_TRUE(client_->Health().ok());
    ASSERT_TRUE(client_->RegisterModel(Demo(), "demo").ok());
    bb_ = KvShape::Of(Demo(), 1).BlockBytes();
    ASSERT_CUDA(cudaSetDevice(0));
    ASSERT_CUDA(cudaMalloc(&dev_, kAlloc));
    canary_ = Bytes(99, kAlloc);
    ResetCanaries();
    cudaIpcMemHandle_t h;
    ASSERT_CUDA(cudaIpcGetMemHandle(&h, dev_));
    handle_.assign(reinterpret_cast<const char*>(&h), sizeof(h));
    auto info = dp_->RegisterCudaIpc("gpu", 0, handle_, kOffset, kAlloc - kOffset - 4096);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->kind(), v1::BUFFER_KIND_CUDA_IPC);
    EXPECT_EQ(info->size(), kAlloc - kOffset - 4096);
    EXPECT_GE(info->mapped_bytes(), kAlloc);  // the allocation's real extent, from the driver
  }

  void TearDown() override {
    if (dev_ != nullptr) {
      if (dp_ != nullptr) dp_->Unregister("gpu").IgnoreError();
      cudaFree(dev_);
    }
  }

  void ResetCanaries() {
    ASSERT_CUDA(cudaMemcpy(dev_, canary_.data(), kAlloc, cudaMemcpyHostToDevice));
  }
  std::vector<uint8_t> Device() {
    std::vector<uint8_t> out(kAlloc);
    EXPECT_EQ(cudaMemcpy(out.data(), dev_, kAlloc, cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }
  // Device bytes [kOffset + at, + want.size()) equal `want`, every other byte its canary.
  void ExpectWritten(uint64_t at, const std::vector<uint8_t>& want) {
    const std::vector<uint8_t> got = Device();
    const uint64_t begin = kOffset + at, end = begin + want.size();
    EXPECT_EQ(std::memcmp(got.data() + begin, want.data(), want.size()), 0);
    EXPECT_EQ(std::memcmp(got.data(), canary_.data(), begin), 0) << "bytes before the range";
    EXPECT_EQ(std::memcmp(got.data() + end, canary_.data() + end, kAlloc - end), 0)
        << "bytes after the range";
  }

  void PutBytes(const std::vector<int32_t>& tokens, const std::vector<uint8_t>& bytes,
                bool segment = false) {
    client::PutArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.segment = segment;
    const uint32_t blocks = static_cast<uint32_t>((tokens.size() + 15) / 16);
    ASSERT_TRUE(client_->Put(a, KvView{bytes, KvShape::Of(Demo(), blocks)}).ok());
  }

  std::unique_ptr<Daemon> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<DataPlaneClient> dp_;
  void* dev_ = nullptr;
  std::string handle_;
  std::vector<uint8_t> canary_;
  uint64_t bb_ = 0;
};

TEST_F(DataPlaneGpuTest, GetIntoGpuEqualsGrpcGet) {
  const auto tokens = Tokens(1, 5 * 16);
  PutBytes(tokens, Bytes(2, 5 * bb_));
  for (std::optional<int64_t> target : {std::optional<int64_t>(), std::optional<int64_t>(4321)}) {
    client::GetArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.target_position = target;
    auto want = client_->Get(a);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = dp_->GetToBuffer(a, BufferRef{"gpu", 1000, 0});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->header().blocks(), 5u);
    EXPECT_EQ(got->bytes_written(), 5 * bb_);
    ExpectWritten(1000, want->data);
    ResetCanaries();
  }
}

TEST_F(DataPlaneGpuTest, PutFromGpuThenGrpcGet) {
  const auto bytes = Bytes(3, 3 * bb_);
  ASSERT_CUDA(cudaMemcpy(static_cast<uint8_t*>(dev_) + kOffset + 512, bytes.data(), bytes.size(),
                         cudaMemcpyHostToDevice));
  client::PutArgs p;
  p.model = "demo";
  p.tokens = Tokens(4, 3 * 16);
  auto put = dp_->PutFromBuffer(p, BufferRef{"gpu", 512, 0});
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->blocks_stored(), 3u);
  client::GetArgs g;
  g.model = "demo";
  g.tokens = p.tokens;
  auto got = client_->Get(g);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->data, bytes);
}

TEST_F(DataPlaneGpuTest, ComposeIntoGpuEqualsGrpcCompose) {
  const auto prefix = Tokens(5, 32);
  const auto doc = Tokens(6, 21);
  PutBytes(prefix, Bytes(7, 2 * bb_));
  PutBytes(doc, Bytes(8, 2 * bb_), /*segment=*/true);
  std::vector<v1::ComposePart> parts(2);
  parts[0].mutable_tokens()->Add(prefix.begin(), prefix.end());
  parts[1].mutable_tokens()->Add(doc.begin(), doc.end());
  parts[1].set_segment(true);
  parts[1].set_target_position(900);
  auto want = client_->Compose("demo", "", parts);
  ASSERT_TRUE(want.ok()) << want.status();
  auto got = dp_->ComposeToBuffer("demo", "", parts, BufferRef{"gpu", 64, 0});
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(got->bytes_written(), want->data.size());
  ExpectWritten(64, want->data);
}

TEST_F(DataPlaneGpuTest, BadRangesAndHandlesAreRefused) {
  const auto tokens = Tokens(9, 2 * 16);
  PutBytes(tokens, Bytes(10, 2 * bb_));
  const uint64_t size = kAlloc - kOffset - 4096;
  client::GetArgs a;
  a.model = "demo";
  a.tokens = tokens;
  for (const BufferRef& dst :
       {BufferRef{"gpu", size - 2 * bb_ + 1, 0}, BufferRef{"gpu", 0, 2 * bb_ - 1},
        BufferRef{"gpu", size + 1, 0}, BufferRef{"gpu", ~uint64_t{0}, 2}}) {
    EXPECT_EQ(dp_->GetToBuffer(a, dst).status().code(), absl::StatusCode::kInvalidArgument)
        << dst.offset << " +" << dst.length;
  }
  const std::vector<uint8_t> after = Device();
  EXPECT_EQ(after, canary_) << "a refused call wrote into the GPU buffer";
  // A range past the allocation's real extent.
  EXPECT_EQ(dp_->RegisterCudaIpc("past", 0, handle_, kOffset, kAlloc).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A handle of the wrong size, a device out of range, a handle that is no handle.
  EXPECT_EQ(dp_->RegisterCudaIpc("short", 0, handle_.substr(0, 10), 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dp_->RegisterCudaIpc("dev", 1000, handle_, 0, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dp_->RegisterCudaIpc("junk", 0, std::string(64, '\x5a'), 0, 0).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto list = dp_->ListBuffers();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->buffers_size(), 1);
  EXPECT_EQ(list->buffers(0).name(), "gpu");
}

}  // namespace
}  // namespace ropekv
