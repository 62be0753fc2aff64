// Sessions through the data plane with a real ropekvd on loopback (host sessions here; the GPU
// path is tests/gpu/session_gpu_test.cc): the client keeps a frontend-style KV cache in POSIX
// shared memory laid out [layer][k|v][kv_head][capacity][head_dim], opens a session from it
// (OpenFromBuffer), fills an edited range from it (FillFromBuffer) and reads the shifted suffix
// back into it at a token offset (ReadToBuffer with a layout). What lands there equals the gRPC
// Read of the same range (checked against fp64 references in the session tests); every byte
// outside the target tokens keeps its canary; bad layouts are INVALID_ARGUMENT with nothing
// written.
#include <atomic>
#include <cstring>
#include <random>

#include "absl/strings/str_cat.h"
#include "clients/cpp/client.h"
#include "clients/cpp/dataplane_client.h"
#include "clients/cpp/session_client.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon.h"

namespace ropekv {
namespace {

using client::BufferRef;
using client::Client;
using client::DataPlaneClient;
using client::SessionClient;
using client::SharedMemory;

constexpr int kLayers = 4, kHeads = 2, kDim = 64;
constexpr uint64_t kTokenBytes = kDim * 2;  // bf16
constexpr uint64_t kRows = 2 * kLayers * kHeads;

v1::ModelSpec Demo() {
  v1::ModelSpec s;
  s.set_layers(kLayers);
  s.set_kv_heads(kHeads);
  s.set_head_dim(kDim);
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

// Tokens [o, o + n) of every row of a capacity-C layout at `base`, packed in range layout.
std::vector<uint8_t> Gather(const uint8_t* base, uint64_t C, uint64_t o, uint64_t n) {
  std::vector<uint8_t> out(kRows * n * kTokenBytes);
  for (uint64_t r = 0; r < kRows; ++r) {
    std::memcpy(out.data() + r * n * kTokenBytes, base + (r * C + o) * kTokenBytes,
                n * kTokenBytes);
  }
  return out;
}

class SessionDataPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = std::make_unique<testing::Daemon>(std::vector<std::string>{});
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    auto c = Client::Connect(o);
    ASSERT_TRUE(c.ok());
    client_ = *std::move(c);
    ASSERT_TRUE(client_->Health().ok());
    auto dp = DataPlaneClient::Connect(o);
    ASSERT_TRUE(dp.ok());
    dp_ = *std::move(dp);
    auto s = SessionClient::Connect(o);
    ASSERT_TRUE(s.ok());
    sessions_ = *std::move(s);
    ASSERT_TRUE(client_->RegisterModel(Demo(), "demo").ok());
  }

  // A region of `size` random bytes (finite bf16: the exponent's top bit cleared), registered.
  SharedMemory* Shm(const std::string& name, uint64_t size) {
    static std::atomic<int> counter{0};
    auto shm = SharedMemory::Create(
        absl::StrCat("/ropekv-sdp-", name, "-", getpid(), "-", counter++), size);
    EXPECT_TRUE(shm.ok()) << shm.status();
    if (!shm.ok()) return nullptr;
    std::mt19937_64 rng(size + name.size());
    for (uint64_t i = 0; i < size; ++i) {
      (*shm)->data()[i] = static_cast<uint8_t>(i % 2 ? (rng() & 0xBF) : rng());
    }
    EXPECT_TRUE(dp_->RegisterShm(name, (*shm)->name(), size).ok());
    shms_.push_back(*std::move(shm));
    return shms_.back().get();
  }

  static v1::TokenLayout Layout(uint64_t capacity, uint64_t offset) {
    v1::TokenLayout l;
    l.set_capacity(capacity);
    l.set_token_offset(offset);
    return l;
  }

  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<DataPlaneClient> dp_;
  std::unique_ptr<SessionClient> sessions_;
  std::vector<std::unique_ptr<SharedMemory>> shms_;
};

TEST_F(SessionDataPlaneTest, OpenEditFillReadThroughACapacityLayout) {
  // The frontend's cache: capacity 96 tokens; the file (50 tokens) at [0, 50), positions 0..49.
  const uint64_t C = 96, n = 50;
  const uint64_t layout_bytes = kRows * C * kTokenBytes;
  SharedMemory* kv = Shm("kv", layout_bytes + 512);  // + canary after the layout
  ASSERT_NE(kv, nullptr);
  const std::vector<uint8_t> before(kv->data(), kv->data() + layout_bytes + 512);

  v1::OpenSessionHeader open;
  open.set_model("demo");
  const auto file = Tokens(1, n);
  open.mutable_tokens()->Add(file.begin(), file.end());
  auto opened = dp_->OpenFromBuffer(open, BufferRef{"kv"}, Layout(C, 0));
  ASSERT_TRUE(opened.ok()) << opened.status();
  const std::string id = opened->session().session_id();
  EXPECT_EQ(opened->session().length(), static_cast<int64_t>(n));
  EXPECT_EQ(opened->bytes_read(), kRows * n * kTokenBytes);
  EXPECT_EQ(opened->device(), -1);  // this daemon has no GPU sessions (or the test's CPU build)
  // The session holds exactly the layout's tokens [0, n) (read at their own positions: bit copy).
  auto whole = sessions_->Read(id);
  ASSERT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(whole->data, Gather(before.data(), C, 0, n));

  // Replace tokens [10, 13) by 5: Δ = +2; the new tokens' KV comes from the buffer's [60, 65).
  auto edit = sessions_->Edit(id, {client::ReplaceOp(10, 13, Tokens(2, 5))});
  ASSERT_TRUE(edit.ok()) << edit.status();
  ASSERT_EQ(edit->fill_size(), 1);
  v1::FillHeader fill;
  fill.set_session_id(id);
  *fill.mutable_range() = edit->fill(0);
  auto filled = dp_->FillFromBuffer(fill, BufferRef{"kv"}, Layout(C, 60));
  ASSERT_TRUE(filled.ok()) << filled.status();
  EXPECT_EQ(filled->fill().fill_size(), 0);
  EXPECT_EQ(filled->fill().length(), static_cast<int64_t>(n + 2));
  auto new_part = sessions_->Read(id, client::Range(10, 15));
  ASSERT_TRUE(new_part.ok());
  EXPECT_EQ(new_part->data, Gather(before.data(), C, 60, 5));
  // Nothing was written into the buffer by Open or Fill.
  EXPECT_EQ(0, std::memcmp(kv->data(), before.data(), before.size()));

  // The moved suffix [15, 52), keys re-rotated by Δ, into the buffer at its new offset 15.
  auto read =
      dp_->ReadToBuffer(id, client::Range(15, 52), std::nullopt, BufferRef{"kv"}, Layout(C, 15));
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->bytes_written(), kRows * 37 * kTokenBytes);
  auto want = sessions_->Read(id, client::Range(15, 52));
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(Gather(kv->data(), C, 15, 37), want->data);
  // Every byte outside tokens [15, 52) of the rows is untouched, the trailing canary too.
  for (uint64_t r = 0; r < kRows; ++r) {
    const uint64_t row = r * C * kTokenBytes;
    ASSERT_EQ(0, std::memcmp(kv->data() + row, before.data() + row, 15 * kTokenBytes)) << r;
    const uint64_t tail = row + 52 * kTokenBytes;
    ASSERT_EQ(0, std::memcmp(kv->data() + tail, before.data() + tail, (C - 52) * kTokenBytes)) << r;
  }
  ASSERT_EQ(0, std::memcmp(kv->data() + layout_bytes, before.data() + layout_bytes, 512));

  // Without a layout: prompt layout of the range from the offset, as before.
  SharedMemory* flat = Shm("flat", kRows * 52 * kTokenBytes);
  ASSERT_NE(flat, nullptr);
  auto all = dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"flat"});
  ASSERT_TRUE(all.ok()) << all.status();
  auto all_want = sessions_->Read(id);
  ASSERT_TRUE(all_want.ok());
  EXPECT_EQ(0, std::memcmp(flat->data(), all_want->data.data(), all_want->data.size()));
}

TEST_F(SessionDataPlaneTest, BadLayoutsAreInvalidArgumentAndWriteNothing) {
  const uint64_t C = 32;
  const uint64_t layout_bytes = kRows * C * kTokenBytes;
  SharedMemory* kv = Shm("kv", layout_bytes);
  ASSERT_NE(kv, nullptr);
  v1::OpenSessionHeader open;
  open.set_model("demo");
  const auto file = Tokens(3, 20);
  open.mutable_tokens()->Add(file.begin(), file.end());
  auto opened = dp_->OpenFromBuffer(open, BufferRef{"kv"}, Layout(C, 0));
  ASSERT_TRUE(opened.ok()) << opened.status();
  const std::string id = opened->session().session_id();
  const std::vector<uint8_t> before(kv->data(), kv->data() + layout_bytes);

  auto code = [](const auto& r) { return r.status().code(); };
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  // Capacity 0; tokens past the capacity; a layout larger than the region; pages.
  EXPECT_EQ(code(dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"kv"}, Layout(0, 0))),
            kInvalid);
  EXPECT_EQ(code(dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"kv"}, Layout(C, 13))),
            kInvalid);
  EXPECT_EQ(
      code(dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"kv"}, Layout(C + 1, 0))),
      kInvalid);
  EXPECT_EQ(
      code(dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"kv", 16}, Layout(C, 0))),
      kInvalid);
  EXPECT_EQ(code(dp_->ReadToBuffer(id, std::nullopt, std::nullopt, BufferRef{"kv", 0, 0, {1}},
                                   Layout(C, 0))),
            kInvalid);
  EXPECT_EQ(0, std::memcmp(kv->data(), before.data(), before.size()));
  // Open: tokens past the capacity; from_cache; an unknown model.
  EXPECT_EQ(code(dp_->OpenFromBuffer(open, BufferRef{"kv"}, Layout(C, C - 19))), kInvalid);
  v1::OpenSessionHeader cached = open;
  cached.set_from_cache(true);
  EXPECT_EQ(code(dp_->OpenFromBuffer(cached, BufferRef{"kv"}, Layout(C, 0))), kInvalid);
  v1::OpenSessionHeader unknown = open;
  unknown.set_model("nope");
  EXPECT_EQ(code(dp_->OpenFromBuffer(unknown, BufferRef{"kv"}, Layout(C, 0))),
            absl::StatusCode::kNotFound);
  // Fill: a range outside the document leaves the session unchanged; an unknown session.
  v1::FillHeader fill;
  fill.set_session_id(id);
  *fill.mutable_range() = client::Range(15, 25);
  EXPECT_EQ(code(dp_->FillFromBuffer(fill, BufferRef{"kv"}, Layout(C, 0))), kInvalid);
  fill.set_session_id("s-unknown");
  *fill.mutable_range() = client::Range(0, 5);
  EXPECT_EQ(code(dp_->FillFromBuffer(fill, BufferRef{"kv"}, Layout(C, 0))),
            absl::StatusCode::kNotFound);
  auto info = sessions_->Info(id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->length(), 20);
  EXPECT_EQ(info->fill_size(), 0);
  EXPECT_EQ(0, std::memcmp(kv->data(), before.data(), before.size()));
}

}  // namespace
}  // namespace ropekv
