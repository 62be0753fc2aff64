// Editor sessions (PIE) through the real gRPC API: a ropekvd process on a free loopback port, the
// C++ SessionClient, and the tiny reference transformer of the unit tests as the frontend.
#include "cache/session.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cache/kv_cache.h"
#include "clients/cpp/client.h"
#include "clients/cpp/session_client.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon.h"
#include "tests/unit/cache/tiny_transformer.h"

namespace ropekv {
namespace {

using client::Client;
using client::DeleteOp;
using client::InsertOp;
using client::Range;
using client::ReplaceOp;
using client::SessionClient;
using testing::SliceTokens;
using testing::TinyConfig;
using testing::TinyTransformer;
using testing::ToBlocks;

v1::ModelSpec ToProto(const ModelSpec& s) {
  v1::ModelSpec p;
  p.set_layers(s.layers);
  p.set_kv_heads(s.kv_heads);
  p.set_head_dim(s.head_dim);
  p.set_dtype(s.dtype == DType::kBF16  ? v1::DTYPE_BF16
              : s.dtype == DType::kF16 ? v1::DTYPE_F16
                                       : v1::DTYPE_F32);
  p.set_block_tokens(s.block_tokens);
  p.mutable_rope()->set_theta(s.rope.theta);
  return p;
}

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, int64_t n) {
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 1000);
  return t;
}

// Applies ops (coordinates before the edit, left to right with cumulative Δ) to tokens.
void ApplyOps(const std::vector<EditOp>& ops, std::vector<int32_t>* tokens) {
  int64_t delta = 0;
  for (const EditOp& op : ops) {
    tokens->erase(tokens->begin() + op.start + delta, tokens->begin() + op.end + delta);
    tokens->insert(tokens->begin() + op.start + delta, op.tokens.begin(), op.tokens.end());
    delta += static_cast<int64_t>(op.tokens.size()) - (op.end - op.start);
  }
}

v1::EditOp ToProto(const EditOp& op) {
  switch (op.kind) {
    case EditOp::Kind::kInsert:
      return InsertOp(op.start, op.tokens);
    case EditOp::Kind::kDelete:
      return DeleteOp(op.start, op.end);
    case EditOp::Kind::kReplace:
      break;
  }
  return ReplaceOp(op.start, op.end, op.tokens);
}

class SessionServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    TinyConfig c;
    c.layers = 2;
    c.dtype = DType::kBF16;
    model_ = std::make_unique<TinyTransformer>(c, 0x1e57);
    spec_ = model_->spec();
    // Small chunks on both sides: every Open, Fill and Read spans many messages.
    daemon_ = std::make_unique<testing::Daemon>(
        std::vector<std::string>{"--session_max=3", "--chunk_size=5000"});
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    o.chunk_bytes = 7000;
    auto kv = Client::Connect(o);
    ASSERT_TRUE(kv.ok());
    kv_ = *std::move(kv);
    auto sessions = SessionClient::Connect(o);
    ASSERT_TRUE(sessions.ok());
    sessions_ = *std::move(sessions);
    ASSERT_TRUE(kv_->Health().ok());
    auto reg = kv_->RegisterModel(ToProto(spec_), "tiny");
    ASSERT_TRUE(reg.ok()) << reg.status();

    // The same operations on an in-process store give the expected bytes.
    auto cache = KvCache::Create(KvCache::Options());
    ASSERT_TRUE(cache.ok());
    cache_ = *std::move(cache);
    ASSERT_TRUE(cache_->RegisterModel(spec_, "tiny").ok());
    auto store = SessionStore::Create(cache_.get(), SessionStore::Options());
    ASSERT_TRUE(store.ok());
    store_ = *std::move(store);
  }

  std::string Str(const std::vector<uint8_t>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size());
  }

  std::unique_ptr<TinyTransformer> model_;
  ModelSpec spec_;
  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> kv_;
  std::unique_ptr<SessionClient> sessions_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<SessionStore> store_;
  std::mt19937_64 rng_{0x5e55107};
};

// Open, a multi-place edit, Fill of the ranges the edit names, Read: the daemon's bytes equal the
// library's; layer-0 keys are within 2 ulp of a full re-encode of the edited file, values exact.
TEST_F(SessionServiceTest, EditFillReadMatchesReencode) {
  std::vector<int32_t> tokens = RandomTokens(rng_, 75);
  const std::vector<uint8_t> kv = model_->Encode(tokens);
  const std::vector<uint8_t> blocks = ToBlocks(spec_, kv, 75);
  client::OpenArgs open;
  open.model = "tiny";
  open.tokens = tokens;
  auto opened = sessions_->Open(open, blocks);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->length(), 75);
  const std::string id = opened->session_id();
  OpenSessionArgs local_open;
  local_open.model = "tiny";
  local_open.tokens = tokens;
  auto local = store_->Open(local_open, Str(blocks));
  ASSERT_TRUE(local.ok());

  const std::vector<EditOp> ops = {EditOp::Insert(0, {1, 2, 3}), EditOp::Delete(10, 14),
                                   EditOp::Replace(30, 31, {4, 5, 6, 7, 8, 9}),
                                   EditOp::Insert(75, {10})};
  std::vector<v1::EditOp> wire;
  for (const EditOp& op : ops) wire.push_back(ToProto(op));
  auto edit = sessions_->Edit(id, wire);
  ASSERT_TRUE(edit.ok()) << edit.status();
  ASSERT_TRUE(store_->Edit(local->id, ops).ok());
  ApplyOps(ops, &tokens);
  const int64_t n = static_cast<int64_t>(tokens.size());
  EXPECT_EQ(edit->length(), n);
  EXPECT_EQ(edit->version(), 1u);
  ASSERT_EQ(edit->fill_size(), 3);
  EXPECT_EQ(edit->fill(0).start(), 0);
  EXPECT_EQ(edit->fill(0).end(), 3);

  // Tokens awaiting Fill cannot be read.
  EXPECT_EQ(sessions_->Read(id).status().code(), absl::StatusCode::kFailedPrecondition);

  const std::vector<uint8_t> full = model_->Encode(tokens);
  for (const v1::TokenRange& r : edit->fill()) {
    const std::vector<uint8_t> part = SliceTokens(spec_, full, n, r.start(), r.end());
    auto f = sessions_->Fill(id, r, part);
    ASSERT_TRUE(f.ok()) << f.status();
    FillArgs fa;
    fa.range = TokenRange{r.start(), r.end()};
    ASSERT_TRUE(store_->Fill(local->id, fa, Str(part)).ok());
  }
  auto read = sessions_->Read(id);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->header.length(), n);
  EXPECT_EQ(read->header.range().end(), n);
  ASSERT_EQ(read->data.size(), RangeBytes(spec_, n));
  auto reader = store_->Read(local->id, std::nullopt);
  ASSERT_TRUE(reader.ok());
  std::vector<uint8_t> want(reader->bytes(), 0xFF);
  ASSERT_TRUE(reader->WriteAll(want.data()).ok());
  EXPECT_TRUE(read->data == want) << "daemon and library differ";

  // Layer 0 against the full re-encode.
  const int D = spec_.head_dim;
  double worst = 0;
  for (int h = 0; h < spec_.kv_heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      const size_t row = (static_cast<size_t>(h) * n + t) * D;
      for (int k = 0; k < D / 2; ++k) {
        const double g1 = LoadAsFloat(read->data.data(), row + k, spec_.dtype);
        const double g2 = LoadAsFloat(read->data.data(), row + k + D / 2, spec_.dtype);
        const double w1 = LoadAsFloat(full.data(), row + k, spec_.dtype);
        const double w2 = LoadAsFloat(full.data(), row + k + D / 2, spec_.dtype);
        const double ulp = UlpOf(
            spec_.dtype, std::max({std::fabs(g1), std::fabs(g2), std::fabs(w1), std::fabs(w2)}));
        worst = std::max(worst, std::max(std::fabs(g1 - w1), std::fabs(g2 - w2)) / ulp);
      }
    }
  }
  EXPECT_LE(worst, 2.0);
  const size_t vbytes = static_cast<size_t>(spec_.kv_heads) * n * D * 2;
  EXPECT_EQ(std::memcmp(read->data.data() + vbytes, full.data() + vbytes, vbytes), 0);

  // A range, into a caller's buffer; a buffer too small is OUT_OF_RANGE.
  std::vector<uint8_t> dst(RangeBytes(spec_, 20));
  auto header = sessions_->ReadInto(id, Range(5, 25), absl::MakeSpan(dst));
  ASSERT_TRUE(header.ok()) << header.status();
  EXPECT_EQ(header->total_bytes(), dst.size());
  auto part = store_->Read(local->id, TokenRange{5, 25});
  ASSERT_TRUE(part.ok());
  std::vector<uint8_t> part_want(part->bytes());
  ASSERT_TRUE(part->WriteAll(part_want.data()).ok());
  EXPECT_TRUE(dst == part_want);
  std::vector<uint8_t> small(100);
  EXPECT_EQ(sessions_->ReadInto(id, Range(5, 25), absl::MakeSpan(small)).status().code(),
            absl::StatusCode::kOutOfRange);

  auto info = sessions_->Info(id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(std::vector<int32_t>(info->tokens().begin(), info->tokens().end()), tokens);
  EXPECT_EQ(info->fill_size(), 0);
}

TEST_F(SessionServiceTest, BadRequestsGetTheRightCodesAndChangeNothing) {
  const std::vector<int32_t> tokens = RandomTokens(rng_, 20);
  const std::vector<uint8_t> blocks = ToBlocks(spec_, model_->Encode(tokens), 20);
  client::OpenArgs open;
  open.model = "tiny";
  open.tokens = tokens;
  auto opened = sessions_->Open(open, blocks);
  ASSERT_TRUE(opened.ok());
  const std::string id = opened->session_id();
  auto before = sessions_->Info(id);
  ASSERT_TRUE(before.ok());
  auto kv_before = sessions_->Read(id);
  ASSERT_TRUE(kv_before.ok());

  const std::vector<std::vector<v1::EditOp>> bad = {
      {InsertOp(21, {1})},                     // past the end
      {DeleteOp(2, 8), ReplaceOp(5, 9, {1})},  // overlapping
      {DeleteOp(9, 10), InsertOp(3, {1})},     // not sorted
      {DeleteOp(4, 2)},                        // start > end
      {v1::EditOp()},                          // no op
  };
  for (const auto& ops : bad) {
    EXPECT_EQ(sessions_->Edit(id, ops).status().code(), absl::StatusCode::kInvalidArgument);
  }
  client::EditArgs stale;
  stale.stale = {Range(10, 30)};
  EXPECT_EQ(sessions_->Edit(id, {InsertOp(0, {1})}, stale).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sessions_->Edit("s-unknown", {InsertOp(0, {1})}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(sessions_->Read("s-unknown").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(sessions_->Fill("s-unknown", Range(0, 1), {}).status().code(),
            absl::StatusCode::kNotFound);
  // Fill bytes of the wrong size.
  EXPECT_EQ(sessions_->Fill(id, Range(0, 2), std::vector<uint8_t>(100)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(sessions_->Read(id, Range(3, 40)).status().code(), absl::StatusCode::kInvalidArgument);
  // Open: unknown model; wrong byte count.
  client::OpenArgs wrong = open;
  wrong.model = "nope";
  EXPECT_EQ(sessions_->Open(wrong, blocks).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(
      sessions_->Open(open, std::vector<uint8_t>(blocks.begin(), blocks.end() - 1)).status().code(),
      absl::StatusCode::kInvalidArgument);

  auto after = sessions_->Info(id);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->version(), before->version());
  EXPECT_EQ(after->length(), before->length());
  EXPECT_EQ(after->pieces(), before->pieces());
  auto kv_after = sessions_->Read(id);
  ASSERT_TRUE(kv_after.ok());
  EXPECT_TRUE(kv_after->data == kv_before->data);
}

TEST_F(SessionServiceTest, CapacitySnapshotAndClose) {
  const std::vector<int32_t> tokens = RandomTokens(rng_, 16);
  const std::vector<uint8_t> blocks = ToBlocks(spec_, model_->Encode(tokens), 16);
  client::OpenArgs open;
  open.model = "tiny";
  open.tokens = tokens;
  auto a = sessions_->Open(open, blocks);
  ASSERT_TRUE(a.ok());
  auto snap = sessions_->Snapshot(a->session_id());
  ASSERT_TRUE(snap.ok());
  ASSERT_TRUE(sessions_->Edit(snap->session_id(), {DeleteOp(0, 8)}).ok());
  auto orig = sessions_->Info(a->session_id());
  ASSERT_TRUE(orig.ok());
  EXPECT_EQ(orig->length(), 16);  // the snapshot's edit left the original alone
  ASSERT_TRUE(sessions_->Open(open, blocks).ok());
  // --session_max=3.
  EXPECT_EQ(sessions_->Open(open, blocks).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(sessions_->Snapshot(a->session_id()).status().code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(sessions_->Close(a->session_id()).ok());
  EXPECT_EQ(sessions_->Close(a->session_id()).code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(sessions_->Open(open, blocks).ok());
}

TEST_F(SessionServiceTest, OpenFromCachedPrefix) {
  // The file's first 16 tokens were Put by the frontend earlier (2 blocks).
  const std::vector<int32_t> tokens = RandomTokens(rng_, 21);
  const std::vector<uint8_t> kv = model_->Encode(tokens);
  client::PutArgs put;
  put.model = "tiny";
  put.tokens.assign(tokens.begin(), tokens.begin() + 16);
  const std::vector<uint8_t> prefix = ToBlocks(spec_, SliceTokens(spec_, kv, 21, 0, 16), 16);
  ASSERT_TRUE(kv_->Put(put, client::KvView{prefix, client::KvShape::Of(ToProto(spec_), 2)}).ok());
  client::OpenArgs open;
  open.model = "tiny";
  open.tokens = tokens;
  open.from_cache = true;
  auto opened = sessions_->Open(open, {});
  ASSERT_TRUE(opened.ok()) << opened.status();
  ASSERT_EQ(opened->fill_size(), 1);
  EXPECT_EQ(opened->fill(0).start(), 16);
  EXPECT_EQ(opened->fill(0).end(), 21);
  ASSERT_TRUE(
      sessions_->Fill(opened->session_id(), opened->fill(0), SliceTokens(spec_, kv, 21, 16, 21))
          .ok());
  auto read = sessions_->Read(opened->session_id());
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(read->data == kv);  // nothing moved: bit for bit
}

}  // namespace
}  // namespace ropekv
