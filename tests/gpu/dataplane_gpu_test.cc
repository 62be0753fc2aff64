// CUDA IPC buffers through a real ropekvd (built with CUDA, on a machine with a GPU): this test
// plays the frontend, exporting a cudaMalloc'd buffer by cudaIpcGetMemHandle and registering it.
// What the daemon writes there equals what the gRPC bytes path answers for the same request
// (checked against fp64 references in its own tests): bit for bit as stored; keys re-rotated on the
// GPU by the CUDA kernel within 1 ulp of the CPU path (the kernel's documented bound; nearly all
// bit-equal). Random canary bytes around every target range must survive; bad ranges, handles and
// page ids are refused. Skips itself without a GPU.
//
// The daemon binary: $ROPEKVD (a packed run), else the build tree's (tests/integration/daemon.h).
#include <cuda_runtime_api.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "clients/cpp/client.h"
#include "clients/cpp/dataplane_client.h"
#include "clients/cpp/retrieval_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "tests/integration/daemon.h"

namespace ropekv {
namespace {

using client::BufferRef;
using client::Client;
using client::DataPlaneClient;
using client::KvShape;
using client::KvView;

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
    daemon_ = std::make_unique<testing::Daemon>(DaemonFlags());
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

  virtual std::vector<std::string> DaemonFlags() const { return {"--gpu_capacity=256MiB"}; }

  // A kept exact selection (k 24, 4 query heads) over the 40-block prompt `tokens`, gathered into
  // the GPU buffer at all layers and at layers {3, 1}: the same bytes as the gRPC Gather, with
  // on_device as expected.
  void ExpectGatherIntoGpuEqualsGrpcGather(const std::vector<int32_t>& tokens, bool on_device) {
    Client::Options o;
    o.address = daemon_->address();
    auto retrieval = client::RetrievalClient::Connect(o);
    ASSERT_TRUE(retrieval.ok()) << retrieval.status();
    std::mt19937_64 rng(17);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> q(4 * 64);
    for (float& x : q) x = u(rng);
    client::SelectArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.query_heads = 4;
    a.queries = client::F32Bytes(q);
    a.k = 24;
    a.n_sink = 2;
    a.n_local = 8;
    a.keep = true;
    auto sel = (*retrieval)->Select(a);
    ASSERT_TRUE(sel.ok()) << sel.status();
    const std::string id = sel->header.selection_id();
    for (const std::vector<int32_t>& layers :
         {std::vector<int32_t>{}, std::vector<int32_t>{3, 1}}) {
      auto want =
          (*retrieval)->Gather(id, layers.empty() ? std::vector<int32_t>{0, 1, 2, 3} : layers);
      ASSERT_TRUE(want.ok()) << want.status();
      auto before = (*retrieval)->Stats();
      ASSERT_TRUE(before.ok()) << before.status();
      auto got = dp_->GatherToBuffer(id, layers, BufferRef{"gpu", 2048, 0});
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->on_device(), on_device);
      auto after = (*retrieval)->Stats();
      ASSERT_TRUE(after.ok()) << after.status();
      EXPECT_EQ(after->gathers() - before->gathers(), layers.empty() ? 4u : layers.size());
      EXPECT_EQ(got->bytes_written(), want->data.size());
      ExpectWritten(2048, want->data);
      ResetCanaries();
    }
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
  // Device bytes [kOffset + at, + want.size()) equal `want` (within 1 ulp where keys were
  // re-rotated: `rerotated`), every other byte its canary.
  void ExpectWritten(uint64_t at, const std::vector<uint8_t>& want, bool rerotated = false) {
    const std::vector<uint8_t> got = Device();
    const uint64_t begin = kOffset + at, end = begin + want.size();
    if (rerotated) {
      ExpectWithinUlp(got.data() + begin, want);
    } else {
      EXPECT_EQ(std::memcmp(got.data() + begin, want.data(), want.size()), 0);
    }
    EXPECT_EQ(std::memcmp(got.data(), canary_.data(), begin), 0) << "bytes before the range";
    EXPECT_EQ(std::memcmp(got.data() + end, canary_.data() + end, kAlloc - end), 0)
        << "bytes after the range";
  }
  // got equals want bf16 for bf16 (2-byte words), or differs by 1 ulp in at most 1 % of them.
  static void ExpectWithinUlp(const uint8_t* got, const std::vector<uint8_t>& want) {
    size_t ulps = 0;
    for (size_t i = 0; i + 1 < want.size(); i += 2) {
      int16_t g, w;
      std::memcpy(&g, got + i, 2);
      std::memcpy(&w, want.data() + i, 2);
      if (g == w) continue;
      ASSERT_EQ(std::abs(int{g} - int{w}), 1) << "bf16 word " << i / 2 << " differs by more "
                                              << "than 1 ulp: " << g << " vs " << w;
      ++ulps;
    }
    EXPECT_LE(ulps, want.size() / 200) << ulps << " words differ by 1 ulp";
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

  std::unique_ptr<testing::Daemon> daemon_;
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
    ExpectWritten(1000, want->data, target.has_value());
    ResetCanaries();
  }
}

// A prefix in host memory only: gathered there, then copied into the GPU buffer.
TEST_F(DataPlaneGpuTest, GatherIntoGpuThroughHostEqualsGrpcGather) {
  const auto tokens = Tokens(7, 40 * 16);
  PutBytes(tokens, Bytes(8, 40 * bb_));
  ExpectGatherIntoGpuEqualsGrpcGather(tokens, /*on_device=*/false);
}

// Puts keep a GPU-tier copy of every block (--write_tier=gpu).
class DataPlaneGpuTierTest : public DataPlaneGpuTest {
 protected:
  std::vector<std::string> DaemonFlags() const override {
    return {"--gpu_capacity=256MiB", "--write_tier=gpu"};
  }
};

// A prefix whose blocks all sit in the GPU tier on the buffer's device is gathered there by a
// kernel, straight into the buffer: the gRPC Gather's bytes (zeros after each row's count
// included), and nothing outside the range written.
TEST_F(DataPlaneGpuTierTest, GatherIntoGpuFromTheGpuTierEqualsGrpcGather) {
  const auto tokens = Tokens(9, 40 * 16);
  PutBytes(tokens, Bytes(10, 40 * bb_));
  ExpectGatherIntoGpuEqualsGrpcGather(tokens, /*on_device=*/true);
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
  ExpectWritten(64, want->data, /*rerotated=*/true);
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

// A Llama-3-shaped head (head_dim 128, llama3 frequencies) moved far: the GPU re-rotation of a
// Get equals the CPU path of the gRPC Get within 1 ulp.
TEST_F(DataPlaneGpuTest, RerotatedGetOfLlamaShapeEqualsCpuPath) {
  v1::ModelSpec spec;
  spec.set_layers(2);
  spec.set_kv_heads(8);
  spec.set_head_dim(128);
  spec.set_dtype(v1::DTYPE_BF16);
  spec.set_block_tokens(16);
  v1::RopeSpec* rope = spec.mutable_rope();
  rope->set_type(v1::ROPE_TYPE_LLAMA3);
  rope->set_theta(500000);
  rope->set_factor(8);
  rope->set_original_max_position_embeddings(8192);
  ASSERT_TRUE(client_->RegisterModel(spec, "llama").ok());
  const uint64_t bb = KvShape::Of(spec, 1).BlockBytes();
  const auto tokens = Tokens(21, 6 * 16);
  client::PutArgs p;
  p.model = "llama";
  p.tokens = tokens;
  p.rotated_at = 37;
  const auto bytes = Bytes(22, 6 * bb);
  ASSERT_TRUE(client_->Put(p, KvView{bytes, KvShape::Of(spec, 6)}).ok());
  for (int64_t target : {int64_t{0}, int64_t{100000}, int64_t{131000}}) {
    client::GetArgs a;
    a.model = "llama";
    a.tokens = tokens;
    a.target_position = target;
    auto want = client_->Get(a);
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_EQ(want->data.size(), 6 * bb);
    auto got = dp_->GetToBuffer(a, BufferRef{"gpu", 256, 0});
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectWritten(256, want->data, /*rerotated=*/true);
    ResetCanaries();
  }
}

// A paged pool of the frontend (vLLM-style) on the GPU: blocks land in the pages named, keys
// re-rotated; the image is built on the host from the gRPC answer with its own index formula.
TEST_F(DataPlaneGpuTest, PagedPoolGetAndPutByBlockIds) {
  constexpr uint32_t kPages = 6;
  const v1::ModelSpec spec = Demo();
  const int L = spec.layers(), H = spec.kv_heads(), D = spec.head_dim(), T = spec.block_tokens();
  const uint64_t pool_bytes = uint64_t{kPages} * bb_;
  void* pool = nullptr;
  ASSERT_CUDA(cudaMalloc(&pool, pool_bytes + 4096));
  const std::vector<uint8_t> canary = Bytes(31, pool_bytes + 4096);
  auto reset = [&] {
    ASSERT_CUDA(cudaMemcpy(pool, canary.data(), canary.size(), cudaMemcpyHostToDevice));
  };
  reset();
  auto read = [&] {
    std::vector<uint8_t> out(canary.size());
    EXPECT_EQ(cudaMemcpy(out.data(), pool, out.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  };
  cudaIpcMemHandle_t h;
  ASSERT_CUDA(cudaIpcGetMemHandle(&h, pool));
  v1::PagedLayout layout;
  layout.set_model("demo");
  layout.set_num_blocks(kPages);
  auto info = dp_->RegisterCudaIpc(
      "pool", 0, std::string(reinterpret_cast<const char*>(&h), sizeof(h)), 0, 0, layout);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->paged().num_blocks(), kPages);
  // Element (l, k|v, page, token, head, dim) of the pool, in bf16 words; (b, ...) of blocks.
  auto pool_word = [&](int l, int kv, uint32_t page, int t, int hh, int d) {
    return ((((size_t(l) * 2 + kv) * kPages + page) * T + t) * H + hh) * D + d;
  };
  auto block_word = [&](size_t b, int l, int kv, int t, int hh, int d) {
    return b * bb_ / 2 + (((size_t(l) * 2 + kv) * H + hh) * T + t) * D + d;
  };
  auto image = [&](const std::vector<uint8_t>& blocks, const std::vector<uint32_t>& ids) {
    std::vector<uint8_t> out = canary;
    for (size_t b = 0; b < ids.size(); ++b)
      for (int l = 0; l < L; ++l)
        for (int kv = 0; kv < 2; ++kv)
          for (int t = 0; t < T; ++t)
            for (int hh = 0; hh < H; ++hh)
              for (int d = 0; d < D; ++d) {
                std::memcpy(out.data() + 2 * pool_word(l, kv, ids[b], t, hh, d),
                            blocks.data() + 2 * block_word(b, l, kv, t, hh, d), 2);
              }
    return out;
  };

  const auto tokens = Tokens(32, 3 * 16);
  PutBytes(tokens, Bytes(33, 3 * bb_));
  const std::vector<uint32_t> ids = {4, 1, 3};
  for (std::optional<int64_t> target : {std::optional<int64_t>(), std::optional<int64_t>(777)}) {
    client::GetArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.target_position = target;
    auto want = client_->Get(a);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = dp_->GetToBuffer(a, BufferRef{"pool", 0, 0, ids});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->header().blocks(), 3u);
    const std::vector<uint8_t> expect = image(want->data, ids);
    const std::vector<uint8_t> now = read();
    if (!target.has_value()) {
      EXPECT_EQ(now, expect) << "as stored: bit for bit, other pages untouched";
    } else {
      ExpectWithinUlp(now.data(), expect);
    }
    reset();
  }

  // Put from pages 2 and 5, then the gRPC Get answers their blocks.
  const auto blocks = Bytes(34, 2 * bb_);
  const std::vector<uint8_t> pages = image(blocks, {2, 5});
  ASSERT_CUDA(cudaMemcpy(pool, pages.data(), pages.size(), cudaMemcpyHostToDevice));
  client::PutArgs p;
  p.model = "demo";
  p.tokens = Tokens(35, 2 * 16);
  auto put = dp_->PutFromBuffer(p, BufferRef{"pool", 0, 0, {2, 5}});
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->blocks_stored(), 2u);
  client::GetArgs g;
  g.model = "demo";
  g.tokens = p.tokens;
  auto back = client_->Get(g);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->data, blocks);

  // Bad ids: nothing written, nothing stored.
  reset();
  client::GetArgs a;
  a.model = "demo";
  a.tokens = tokens;
  for (const std::vector<uint32_t>& bad :
       {std::vector<uint32_t>{0, kPages}, std::vector<uint32_t>{2, 2, 3}}) {
    EXPECT_EQ(dp_->GetToBuffer(a, BufferRef{"pool", 0, 0, bad}).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(dp_->GetToBuffer(a, BufferRef{"gpu", 0, 0, {0}}).status().code(),
            absl::StatusCode::kInvalidArgument)
      << "a buffer without a paged layout";
  p.tokens = Tokens(36, 2 * 16);
  EXPECT_EQ(dp_->PutFromBuffer(p, BufferRef{"pool", 0, 0, {1}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(read(), canary);
  EXPECT_EQ(Device(), canary_);
  ASSERT_TRUE(dp_->Unregister("pool").ok());
  cudaFree(pool);
}

}  // namespace
}  // namespace ropekv
