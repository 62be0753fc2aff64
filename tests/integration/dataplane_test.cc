// The data plane through a real ropekvd on loopback: this test plays the client, creating POSIX
// shared memory, registering it, and comparing what the daemon writes there with what the gRPC
// bytes path (Get, Compose, Read — checked against fp64 references in their own tests) answers
// for the same request. Canaries (random bytes) surround every target range.
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "clients/cpp/client.h"
#include "clients/cpp/dataplane_client.h"
#include "clients/cpp/retrieval_client.h"
#include "clients/cpp/session_client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon.h"

namespace ropekv {
namespace {

using client::BufferRef;
using client::Client;
using client::DataPlaneClient;
using client::KvShape;
using client::KvView;
using client::SharedMemory;
using ::testing::HasSubstr;

// 4 layers, 2 KV heads, head_dim 64, bf16, 16-token blocks (32 KiB).
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

// Random finite bf16 values (exponent bits kept small: no NaN / Inf).
std::vector<uint8_t> Bytes(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(i % 2 ? (rng() & 0xBF) : rng());
  return b;
}

std::string UniqueShmName(const std::string& tag) {
  static std::atomic<int> counter{0};
  return absl::StrCat("/ropekv-it-", tag, "-", getpid(), "-", counter++);
}

class DataPlaneTest : public ::testing::Test {
 protected:
  void Start(std::vector<std::string> flags = {}) {
    daemon_ = std::make_unique<testing::Daemon>(std::move(flags));
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
    auto reg = client_->RegisterModel(Demo(), "demo");
    ASSERT_TRUE(reg.ok()) << reg.status();
    bb_ = KvShape::Of(Demo(), 1).BlockBytes();
  }
  void SetUp() override { Start(); }

  // A region of `size` random canary bytes, registered as `name`.
  SharedMemory* Shm(const std::string& name, uint64_t size) {
    auto shm = SharedMemory::Create(UniqueShmName(name), size);
    EXPECT_TRUE(shm.ok()) << shm.status();
    if (!shm.ok()) return nullptr;
    std::mt19937_64 rng(size);
    for (uint64_t i = 0; i < size; ++i) (*shm)->data()[i] = static_cast<uint8_t>(rng() | 1);
    auto info = dp_->RegisterShm(name, (*shm)->name(), size);
    EXPECT_TRUE(info.ok()) << info.status();
    snapshots_[name].assign((*shm)->data(), (*shm)->data() + size);
    shms_.push_back(*std::move(shm));
    return shms_.back().get();
  }
  // Whether every byte of `name`'s region outside [begin, end) is its canary.
  bool UnchangedOutside(const std::string& name, const SharedMemory* shm, uint64_t begin,
                        uint64_t end) {
    const std::vector<uint8_t>& s = snapshots_[name];
    return std::memcmp(shm->data(), s.data(), begin) == 0 &&
           std::memcmp(shm->data() + end, s.data() + end, s.size() - end) == 0;
  }

  void PutBytes(const std::vector<int32_t>& tokens, const std::vector<uint8_t>& bytes,
                bool segment = false) {
    client::PutArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.segment = segment;
    const uint32_t blocks = static_cast<uint32_t>((tokens.size() + 15) / 16);
    auto r = client_->Put(a, KvView{bytes, KvShape::Of(Demo(), blocks)});
    ASSERT_TRUE(r.ok()) << r.status();
  }

  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> client_;
  std::unique_ptr<DataPlaneClient> dp_;
  std::vector<std::unique_ptr<SharedMemory>> shms_;
  std::map<std::string, std::vector<uint8_t>> snapshots_;
  uint64_t bb_ = 0;
};

TEST_F(DataPlaneTest, GetToShmEqualsGrpcGet) {
  const auto tokens = Tokens(1, 5 * 16);
  PutBytes(tokens, Bytes(2, 5 * bb_));
  SharedMemory* shm = Shm("get", 8 * bb_ + 1000);
  ASSERT_NE(shm, nullptr);
  for (std::optional<int64_t> target : {std::optional<int64_t>(), std::optional<int64_t>(1234)}) {
    client::GetArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.tokens.push_back(5);  // partial tail: 80 tokens match
    a.target_position = target;
    auto want = client_->Get(a);
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_EQ(want->header.blocks(), 5u);
    const uint64_t off = target ? 333 : 1;
    auto got = dp_->GetToBuffer(a, BufferRef{"get", off, 0});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->header().matched_tokens(), 80u);
    EXPECT_EQ(got->header().blocks(), 5u);
    EXPECT_EQ(got->header().block_bytes(), bb_);
    ASSERT_EQ(got->header().block_info_size(), 5);
    EXPECT_EQ(got->header().block_info(0).hash(), want->header.block_info(0).hash());
    EXPECT_EQ(got->bytes_written(), 5 * bb_);
    EXPECT_EQ(std::memcmp(shm->data() + off, want->data.data(), 5 * bb_), 0)
        << "target " << (target ? *target : -1);
    EXPECT_TRUE(UnchangedOutside("get", shm, off, off + 5 * bb_));
    std::memcpy(shm->data(), snapshots_["get"].data(), snapshots_["get"].size());  // reset
  }
  auto list = dp_->ListBuffers();
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(list->registration_allowed());
  ASSERT_EQ(list->buffers_size(), 1);
  EXPECT_EQ(list->buffers(0).name(), "get");
  EXPECT_EQ(list->buffers(0).kind(), v1::BUFFER_KIND_SHM);
  EXPECT_EQ(list->buffers(0).size(), 8 * bb_ + 1000);
  EXPECT_EQ(list->buffers(0).copies(), 2u);
  EXPECT_EQ(list->buffers(0).bytes_written(), 10 * bb_);
  EXPECT_EQ(list->buffers(0).copies_in_flight(), 0u);
}

TEST_F(DataPlaneTest, PutFromShmThenGrpcGetIsByteExact) {
  SharedMemory* shm = Shm("put", 6 * bb_);
  ASSERT_NE(shm, nullptr);
  const auto tokens = Tokens(3, 3 * 16);
  const auto bytes = Bytes(4, 3 * bb_);
  std::memcpy(shm->data() + 2 * bb_, bytes.data(), bytes.size());
  client::PutArgs p;
  p.model = "demo";
  p.tokens = tokens;
  auto put = dp_->PutFromBuffer(p, BufferRef{"put", 2 * bb_, 3 * bb_});
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->blocks_stored(), 3u);
  EXPECT_EQ(put->bytes_read(), 3 * bb_);
  ASSERT_EQ(put->block_hashes_size(), 3);
  client::GetArgs g;
  g.model = "demo";
  g.tokens = tokens;
  auto got = client_->Get(g);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->data, bytes);
  // A continuation chained to the last block, and a segment, from the same region.
  p.tokens = Tokens(5, 16);
  p.parent = put->block_hashes(2);
  ASSERT_TRUE(dp_->PutFromBuffer(p, BufferRef{"put", 0, 0}).ok());
  g.tokens = tokens;
  g.tokens.insert(g.tokens.end(), p.tokens.begin(), p.tokens.end());
  auto lookup = client_->Lookup("demo", "", g.tokens);
  ASSERT_TRUE(lookup.ok());
  EXPECT_EQ(lookup->matched_tokens(), 64u);
  client::PutArgs seg;
  seg.model = "demo";
  seg.tokens = Tokens(6, 21);  // 2 blocks, the last padded
  seg.segment = true;
  auto s = dp_->PutFromBuffer(seg, BufferRef{"put", bb_, 0});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->bytes_read(), 2 * bb_);
}

TEST_F(DataPlaneTest, ComposeToShmEqualsGrpcCompose) {
  const auto prefix = Tokens(7, 32);
  const auto doc = Tokens(8, 21);
  PutBytes(prefix, Bytes(9, 2 * bb_));
  PutBytes(doc, Bytes(10, 2 * bb_), /*segment=*/true);
  std::vector<v1::ComposePart> parts(3);
  parts[0].mutable_tokens()->Add(prefix.begin(), prefix.end());
  parts[1].mutable_tokens()->Add(doc.begin(), doc.end());
  parts[1].set_segment(true);
  parts[2].mutable_tokens()->Add(doc.begin(), doc.end());
  parts[2].set_segment(true);
  parts[2].set_target_position(4000);
  auto want = client_->Compose("demo", "", parts);
  ASSERT_TRUE(want.ok()) << want.status();
  SharedMemory* shm = Shm("compose", want->data.size() + 4096);
  ASSERT_NE(shm, nullptr);
  auto got = dp_->ComposeToBuffer("demo", "", parts, BufferRef{"compose", 4096, 0});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->header().total_tokens(), 74u);
  ASSERT_EQ(got->header().parts_size(), 3);
  EXPECT_EQ(got->header().parts(2).hit(), v1::HIT_REROTATED);
  EXPECT_EQ(got->layer_bytes() * 4, want->data.size());
  ASSERT_EQ(got->bytes_written(), want->data.size());
  EXPECT_EQ(std::memcmp(shm->data() + 4096, want->data.data(), want->data.size()), 0);
  EXPECT_TRUE(UnchangedOutside("compose", shm, 4096, 4096 + want->data.size()));
  // One byte short: refused, nothing written.
  std::memcpy(shm->data(), snapshots_["compose"].data(), snapshots_["compose"].size());
  auto small = dp_->ComposeToBuffer("demo", "", parts, BufferRef{"compose", 4097, 0});
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument) << small.status();
  EXPECT_TRUE(UnchangedOutside("compose", shm, 0, 0));
}

TEST_F(DataPlaneTest, ReadToShmEqualsSessionRead) {
  auto sessions = client::SessionClient::Connect({.address = daemon_->address()});
  ASSERT_TRUE(sessions.ok());
  client::OpenArgs open;
  open.model = "demo";
  open.tokens = Tokens(11, 40);
  open.base_position = 10;
  auto opened = (*sessions)->Open(open, Bytes(12, 3 * bb_));
  ASSERT_TRUE(opened.ok()) << opened.status();
  ASSERT_TRUE((*sessions)->Edit(opened->session_id(), {client::DeleteOp(3, 9)}).ok());
  auto want = (*sessions)->Read(opened->session_id(), client::Range(2, 30));
  ASSERT_TRUE(want.ok()) << want.status();
  SharedMemory* shm = Shm("read", want->data.size() + 100);
  ASSERT_NE(shm, nullptr);
  auto got = dp_->ReadToBuffer(opened->session_id(), client::Range(2, 30), std::nullopt,
                               BufferRef{"read", 50, 0});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->header().length(), 34);
  ASSERT_EQ(got->bytes_written(), want->data.size());
  EXPECT_EQ(std::memcmp(shm->data() + 50, want->data.data(), want->data.size()), 0);
  EXPECT_TRUE(UnchangedOutside("read", shm, 50, 50 + want->data.size()));
}

// GatherBatchToBuffer: a decode batch's kept selections, each at its own offset of one region,
// equal Retrieval.Gather's bytes item by item; an unknown selection fails alone, writing nothing.
TEST_F(DataPlaneTest, GatherBatchToShmEqualsGather) {
  Client::Options o;
  o.address = daemon_->address();
  auto retrieval = client::RetrievalClient::Connect(o);
  ASSERT_TRUE(retrieval.ok());
  std::vector<std::string> ids;
  std::vector<std::vector<uint8_t>> wants;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint64_t p = 0; p < 3; ++p) {
    const std::vector<int32_t> tokens = Tokens(100 + p, 16 * (4 + p));
    PutBytes(tokens, Bytes(200 + p, (4 + p) * bb_));
    std::vector<float> q(4 * 64);
    for (float& x : q) x = normal(rng);
    client::SelectArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.query_heads = 4;
    a.queries = client::F32Bytes(q);
    a.k = 10;
    a.keep = true;
    auto sel = (*retrieval)->Select(a);
    ASSERT_TRUE(sel.ok()) << sel.status();
    ids.push_back(sel->header.selection_id());
    auto g = (*retrieval)->Gather(ids.back(), {2, 0});
    ASSERT_TRUE(g.ok()) << g.status();
    wants.push_back(g->data);
  }
  uint64_t total = 64;
  std::vector<DataPlaneClient::GatherItem> items;
  for (size_t i = 0; i < ids.size(); ++i) {
    items.push_back({ids[i], {2, 0}, BufferRef{"gather", total, 0}});
    total += wants[i].size();
  }
  items.insert(items.begin() + 1, {"sel-unknown", {0}, BufferRef{"gather", 0, 0}});
  SharedMemory* shm = Shm("gather", total + 64);
  ASSERT_NE(shm, nullptr);
  auto batch = dp_->GatherBatchToBuffer(items);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_EQ(batch->items_size(), 4);
  EXPECT_EQ(batch->items(1).code(), static_cast<int>(absl::StatusCode::kNotFound));
  uint64_t at = 64;
  for (int i : {0, 2, 3}) {
    const v1::GatherBatchToBufferItem& item = batch->items(i);
    const std::vector<uint8_t>& want = wants[i == 0 ? 0 : i - 1];
    ASSERT_EQ(item.code(), 0) << item.message();
    EXPECT_EQ(item.result().bytes_written(), want.size());
    EXPECT_EQ(std::memcmp(shm->data() + at, want.data(), want.size()), 0) << "item " << i;
    at += want.size();
  }
  EXPECT_TRUE(UnchangedOutside("gather", shm, 64, total));
  EXPECT_EQ(dp_->GatherBatchToBuffer({}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DataPlaneTest, BadRangesAreInvalidArgumentAndWriteNothing) {
  const auto tokens = Tokens(13, 2 * 16);
  PutBytes(tokens, Bytes(14, 2 * bb_));
  SharedMemory* shm = Shm("r", 3 * bb_);
  ASSERT_NE(shm, nullptr);
  client::GetArgs a;
  a.model = "demo";
  a.tokens = tokens;
  const uint64_t kMax = ~uint64_t{0};
  for (const BufferRef& dst :
       {BufferRef{"r", bb_ + 1, 0}, BufferRef{"r", 0, 2 * bb_ - 1}, BufferRef{"r", 3 * bb_ + 1, 0},
        BufferRef{"r", kMax, 2}, BufferRef{"r", 2, kMax}, BufferRef{"r", bb_, 2 * bb_ + 1}}) {
    auto got = dp_->GetToBuffer(a, dst);
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument)
        << dst.offset << " +" << dst.length << ": " << got.status();
  }
  client::PutArgs p;
  p.model = "demo";
  p.tokens = Tokens(15, 4 * 16);  // 4 blocks from a 3-block region
  EXPECT_EQ(dp_->PutFromBuffer(p, BufferRef{"r", 0, 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->Lookup("demo", "", p.tokens)->matched_tokens(), 0u);
  EXPECT_EQ(dp_->GetToBuffer(a, BufferRef{"nope", 0, 0}).status().code(),
            absl::StatusCode::kNotFound);
  a.target_position = -5;
  EXPECT_EQ(dp_->GetToBuffer(a, BufferRef{"r", 0, 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(UnchangedOutside("r", shm, 0, 0));
  // The edge is fine.
  a.target_position.reset();
  EXPECT_TRUE(dp_->GetToBuffer(a, BufferRef{"r", bb_, 0}).ok());
}

TEST_F(DataPlaneTest, BadRegistrationsAreRefused) {
  auto shm = SharedMemory::Create(UniqueShmName("reg"), 4096);
  ASSERT_TRUE(shm.ok()) << shm.status();
  EXPECT_EQ(dp_->RegisterShm("a", "no-slash").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dp_->RegisterShm("a", "/a/b").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dp_->RegisterShm("a", "/ropekv-it-missing-object").status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(dp_->RegisterShm("bad name", (*shm)->name()).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto over = dp_->RegisterShm("a", (*shm)->name(), 8192);
  EXPECT_EQ(over.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(over.status().message(), HasSubstr("has 4096 bytes, the registration claims 8192"));
  auto ok = dp_->RegisterShm("a", (*shm)->name());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->size(), 4096u);
  EXPECT_EQ(ok->mapped_bytes(), 4096u);
  EXPECT_EQ(dp_->RegisterShm("a", (*shm)->name()).status().code(),
            absl::StatusCode::kAlreadyExists);
  // No region at all.
  v1::RegisterBufferRequest req;
  req.set_name("empty");
  v1::RegisterBufferResponse resp;
  grpc::ClientContext ctx;
  EXPECT_EQ(dp_->stub()->RegisterBuffer(&ctx, req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // CUDA IPC: this daemon has no GPU (or a handle that is not one).
  auto cuda = dp_->RegisterCudaIpc("gpu", 0, std::string(64, '\x01'), 0, 0);
  EXPECT_THAT(cuda.status().code(), ::testing::AnyOf(absl::StatusCode::kUnavailable,
                                                     absl::StatusCode::kFailedPrecondition))
      << cuda.status();
  EXPECT_TRUE(dp_->Unregister("a").ok());
  EXPECT_EQ(dp_->Unregister("a").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(DataPlaneTest, RegistrationRefusedWhenNotAllowed) {
  auto shm = SharedMemory::Create(UniqueShmName("off"), 4096);
  ASSERT_TRUE(shm.ok());
  // Explicitly off.
  Start({"--allow_buffers=off"});
  auto r = dp_->RegisterShm("a", (*shm)->name());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("--allow_buffers=off"));
  EXPECT_FALSE(dp_->ListBuffers()->registration_allowed());
  // auto on a listener that is not loopback.
  Start({"--listen=0.0.0.0:0"});
  r = dp_->RegisterShm("a", (*shm)->name());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("not loopback"));
  // ... unless asked for.
  Start({"--listen=0.0.0.0:0", "--allow_buffers=on"});
  EXPECT_TRUE(dp_->RegisterShm("a", (*shm)->name()).ok());
}

// A large re-rotating Get is in flight when Unregister comes: Unregister waits for it, the Get
// completes with the right bytes, and later calls find no buffer.
TEST_F(DataPlaneTest, UnregisterWaitsForACopyInFlight) {
  v1::ModelSpec big;  // Llama-3-8B-shaped blocks of 2 MiB
  big.set_layers(32);
  big.set_kv_heads(8);
  big.set_head_dim(128);
  big.set_dtype(v1::DTYPE_BF16);
  big.set_block_tokens(16);
  big.mutable_rope()->set_theta(500000);
  ASSERT_TRUE(client_->RegisterModel(big, "big").ok());
  const uint64_t bb = KvShape::Of(big, 1).BlockBytes();
  const uint32_t blocks = 48;  // 96 MiB
  SharedMemory* shm = Shm("big", blocks * bb);
  ASSERT_NE(shm, nullptr);
  const auto bytes = Bytes(16, blocks * bb);
  std::memcpy(shm->data(), bytes.data(), bytes.size());
  client::PutArgs p;
  p.model = "big";
  p.tokens = Tokens(17, blocks * 16);
  ASSERT_TRUE(dp_->PutFromBuffer(p, BufferRef{"big", 0, 0}).ok());
  client::GetArgs g;
  g.model = "big";
  g.tokens = p.tokens;
  g.target_position = 100000;  // every key re-rotated: a long copy

  absl::StatusOr<v1::GetToBufferResponse> got;
  std::atomic<bool> get_done{false};
  std::thread getter([&] {
    got = dp_->GetToBuffer(g, BufferRef{"big", 0, 0});
    get_done = true;
  });
  // Wait until the daemon reports the copy in flight, then unregister.
  bool seen = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!seen && !get_done && std::chrono::steady_clock::now() < deadline) {
    auto list = dp_->ListBuffers();
    ASSERT_TRUE(list.ok());
    seen = list->buffers_size() == 1 && list->buffers(0).copies_in_flight() == 1;
  }
  ASSERT_TRUE(seen) << "the Get finished before it was seen in flight; make it longer";
  auto waited = dp_->Unregister("big");
  getter.join();
  ASSERT_TRUE(waited.ok()) << waited.status();
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*waited, 1u) << "Unregister did not wait for the copy";
  EXPECT_EQ(got->bytes_written(), blocks * bb);
  auto want = client_->Get(g);
  ASSERT_TRUE(want.ok());
  EXPECT_EQ(std::memcmp(shm->data(), want->data.data(), want->data.size()), 0);
  EXPECT_EQ(dp_->GetToBuffer(g, BufferRef{"big", 0, 0}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(dp_->ListBuffers()->buffers_size(), 0);
}

}  // namespace
}  // namespace ropekv
