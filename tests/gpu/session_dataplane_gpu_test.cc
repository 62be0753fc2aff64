// Sessions through the data plane with a CUDA IPC buffer and a real ropekvd (built with CUDA, on a
// machine with a GPU): this test plays a transformers frontend whose KV cache is one cudaMalloc'd
// buffer [layer][k|v][kv_head][capacity][head_dim], registered by IPC handle. It opens a session
// from the buffer (device to device), edits it, reads the moved suffix back into the buffer at its
// new token offset (ReadToBuffer with a layout: for the daemon's GPU session, one fused launch),
// fills the new tokens from the buffer, and checks every step against the gRPC Read of the same
// session (itself checked against fp64 references) — bit for bit — with every byte outside the
// target tokens unchanged. The same with a daemon that keeps sessions in host memory
// (--session_device=cpu: rotated on the CPU, staged). Skips itself without a GPU.
//
// The daemon binary: $ROPEKVD (a packed run), else the build tree's (tests/integration/daemon.h).
#include <cuda_runtime_api.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "clients/cpp/client.h"
#include "clients/cpp/dataplane_client.h"
#include "clients/cpp/session_client.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "tests/integration/daemon.h"

namespace ropekv {
namespace {

using client::BufferRef;
using client::Client;
using client::DataPlaneClient;
using client::SessionClient;

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

constexpr int kLayers = 2, kHeads = 2, kDim = 128;  // head_dim the GPU kernel handles
constexpr uint64_t kTokenBytes = kDim * 2;
constexpr uint64_t kRows = 2 * kLayers * kHeads;
constexpr uint64_t kCapacity = 160;
constexpr uint64_t kLayoutBytes = kRows * kCapacity * kTokenBytes;
constexpr uint64_t kAlloc = kLayoutBytes + 4096;  // + a canary tail

v1::ModelSpec Model() {
  v1::ModelSpec s;
  s.set_layers(kLayers);
  s.set_kv_heads(kHeads);
  s.set_head_dim(kDim);
  s.set_dtype(v1::DTYPE_BF16);
  s.set_block_tokens(16);
  s.mutable_rope()->set_theta(500000);
  return s;
}

std::vector<int32_t> Tokens(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 32000);
  return t;
}

// Tokens [o, o + n) of every row of a capacity layout, packed (range layout).
std::vector<uint8_t> Gather(const std::vector<uint8_t>& layout, uint64_t o, uint64_t n) {
  std::vector<uint8_t> out(kRows * n * kTokenBytes);
  for (uint64_t r = 0; r < kRows; ++r) {
    std::memcpy(out.data() + r * n * kTokenBytes, layout.data() + (r * kCapacity + o) * kTokenBytes,
                n * kTokenBytes);
  }
  return out;
}

class SessionDataPlaneGpuTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no GPU";
    daemon_ = std::make_unique<testing::Daemon>(
        std::vector<std::string>{"--gpu_capacity=64MiB", "--disk_enabled=false", GetParam()});
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    client_ = *Client::Connect(o);
    dp_ = *DataPlaneClient::Connect(o);
    sessions_ = *SessionClient::Connect(o);
    ASSERT_TRUE(client_->Health().ok());
    ASSERT_TRUE(client_->RegisterModel(Model(), "m").ok());
    ASSERT_CUDA(cudaSetDevice(0));
    ASSERT_CUDA(cudaMalloc(&dev_, kAlloc));
    std::mt19937_64 rng(7);
    host_.resize(kAlloc);
    for (size_t i = 0; i < kAlloc; ++i) {
      host_[i] = static_cast<uint8_t>(i % 2 ? (rng() & 0xBF) : rng());  // finite bf16
    }
    ASSERT_CUDA(cudaMemcpy(dev_, host_.data(), kAlloc, cudaMemcpyHostToDevice));
    cudaIpcMemHandle_t h;
    ASSERT_CUDA(cudaIpcGetMemHandle(&h, dev_));
    const std::string handle(reinterpret_cast<const char*>(&h), sizeof(h));
    auto info = dp_->RegisterCudaIpc("kv", 0, handle, 0, kAlloc);
    ASSERT_TRUE(info.ok()) << info.status();
  }
  void TearDown() override {
    if (dp_ != nullptr) dp_->Unregister("kv").status().IgnoreError();
    if (dev_ != nullptr) cudaFree(dev_);
  }

  std::vector<uint8_t> Download() {
    std::vector<uint8_t> out(kAlloc);
    EXPECT_EQ(cudaMemcpy(out.data(), dev_, kAlloc, cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

  static v1::TokenLayout Layout(uint64_t offset, uint64_t capacity = kCapacity) {
    v1::TokenLayout l;
    l.set_capacity(capacity);
    l.set_token_offset(offset);
    return l;
  }

  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<DataPlaneClient> dp_;
  std::unique_ptr<SessionClient> sessions_;
  void* dev_ = nullptr;
  std::vector<uint8_t> host_;
};

TEST_P(SessionDataPlaneGpuTest, OpenEditReadFillThroughTheFrontendsBuffer) {
  const bool gpu_sessions = std::string(GetParam()) != "--session_device=cpu";
  const uint64_t n = 100;
  v1::OpenSessionHeader open;
  open.set_model("m");
  const auto file = Tokens(1, n);
  open.mutable_tokens()->Add(file.begin(), file.end());
  auto opened = dp_->OpenFromBuffer(open, BufferRef{"kv"}, Layout(0));
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->device(), gpu_sessions ? 0 : -1);
  const std::string id = opened->session().session_id();
  auto whole = sessions_->Read(id);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(whole->data, Gather(host_, 0, n));  // read where stored: bit for bit

  // A rewritten line: [20, 30) -> 16 tokens (Δ = +6).
  auto edit = sessions_->Edit(id, {client::ReplaceOp(20, 30, Tokens(2, 16))});
  ASSERT_TRUE(edit.ok());
  const std::vector<uint8_t> before = Download();
  auto read =
      dp_->ReadToBuffer(id, client::Range(36, n + 6), std::nullopt, BufferRef{"kv"}, Layout(36));
  ASSERT_TRUE(read.ok()) << read.status();
  const std::vector<uint8_t> after = Download();
  auto want = sessions_->Read(id, client::Range(36, n + 6));
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(Gather(after, 36, n - 30), want->data);
  EXPECT_NE(Gather(after, 36, n - 30), Gather(before, 36, n - 30));
  for (uint64_t r = 0; r < kRows; ++r) {
    const uint64_t row = r * kCapacity * kTokenBytes;
    ASSERT_EQ(0, std::memcmp(after.data() + row, before.data() + row, 36 * kTokenBytes)) << r;
    const uint64_t tail = row + (n + 6) * kTokenBytes;
    ASSERT_EQ(0, std::memcmp(after.data() + tail, before.data() + tail,
                             (kCapacity - n - 6) * kTokenBytes))
        << r;
  }
  ASSERT_EQ(0, std::memcmp(after.data() + kLayoutBytes, before.data() + kLayoutBytes, 4096));

  // The frontend computed the new tokens' KV into [20, 36) of its buffer; the session takes it.
  v1::FillHeader fill;
  fill.set_session_id(id);
  *fill.mutable_range() = client::Range(20, 36);
  auto filled = dp_->FillFromBuffer(fill, BufferRef{"kv"}, Layout(20));
  ASSERT_TRUE(filled.ok()) << filled.status();
  EXPECT_EQ(filled->fill().fill_size(), 0);
  auto got = sessions_->Read(id, client::Range(20, 36));
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->data, Gather(after, 20, 16));

  // A whole read without a layout lands in prompt layout at an offset; a layout that does not
  // fit is refused with nothing written.
  const uint64_t offset = kLayoutBytes - kRows * (n + 6) * kTokenBytes;
  ASSERT_TRUE(dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"kv", offset}).ok());
  auto all = sessions_->Read(id);
  ASSERT_TRUE(all.ok());
  std::vector<uint8_t> flat = Download();
  EXPECT_EQ(0, std::memcmp(flat.data() + offset, all->data.data(), all->data.size()));
  EXPECT_EQ(
      dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"kv"}, Layout(0, kCapacity + 16))
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Download(), flat);
}

INSTANTIATE_TEST_SUITE_P(Residency, SessionDataPlaneGpuTest,
                         ::testing::Values("--session_device=gpu", "--session_device=cpu"));

}  // namespace
}  // namespace ropekv
