// The daemon through its real gRPC API: a ropekvd process on a free loopback port, the C++ client.
#include <atomic>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "clients/cpp/client.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon.h"

namespace ropekv {
namespace {

using client::Client;
using client::KvShape;
using client::KvView;

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

std::vector<uint8_t> Bytes(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng() & 0x3f);  // small bf16 values, no NaNs
  return b;
}

class ServiceTest : public ::testing::Test {
 protected:
  void Start(std::vector<std::string> flags = {}) {
    daemon_ = std::make_unique<testing::Daemon>(std::move(flags));
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    o.chunk_bytes = 100000;  // force many chunks per Put
    auto c = Client::Connect(o);
    ASSERT_TRUE(c.ok());
    client_ = *std::move(c);
    ASSERT_TRUE(client_->Health().ok());
    auto reg = client_->RegisterModel(Demo(), "demo");
    ASSERT_TRUE(reg.ok()) << reg.status();
    model_id_ = reg->model_id();
    bb_ = KvShape::Of(Demo(), 1).BlockBytes();
  }
  void SetUp() override { Start(); }

  absl::StatusOr<v1::PutResponse> Put(const std::vector<int32_t>& tokens,
                                      const std::vector<uint8_t>& bytes, bool pin = false,
                                      Client* c = nullptr) {
    client::PutArgs a;
    a.model = "demo";
    a.tokens = tokens;
    a.pin = pin;
    return (c ? c : client_.get())
        ->Put(a, KvView{bytes, KvShape::Of(Demo(), static_cast<uint32_t>(tokens.size() / 16))});
  }
  // A Get of `tokens` from the demo model.
  static client::GetArgs Args(const std::vector<int32_t>& tokens) {
    client::GetArgs a;
    a.model = "demo";
    a.tokens = tokens;
    return a;
  }
  absl::StatusOr<client::GetResult> Get(const std::vector<int32_t>& tokens, Client* c = nullptr) {
    return (c ? c : client_.get())->Get(Args(tokens));
  }
  // Evicts the blocks of `tokens` once the daemon has let go of them (it ends a call on its side
  // asynchronously, after the client has the last byte or its cancel: on a loaded machine the
  // first Evict may still find them held, 1 run in ~10 of six suites at once). The count evicted.
  uint32_t EvictOnceLetGo(const std::vector<int32_t>& tokens) {
    uint32_t n = 0;
    for (int i = 0; i < 100 && n == 0; ++i) {
      auto e = client_->Evict("demo", "", tokens);
      EXPECT_TRUE(e.ok()) << e.status();
      if (!e.ok()) return 0;
      n = *e;
      if (n == 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return n;
  }

  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> client_;
  std::string model_id_;
  uint64_t bb_ = 0;
};

// The local ends of the established TCP connections in this network namespace to loopback port
// `port`, as the kernel lists them (/proc/net/tcp and tcp6: "sl local remote state ...", ports in
// hex, 01 = established).
std::set<std::string> ConnectionsTo(int port) {
  std::set<std::string> ends;
  for (const char* path : {"/proc/self/net/tcp", "/proc/self/net/tcp6"}) {
    std::ifstream in(path);
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::istringstream fields(line);
      std::string slot, local, remote, state;
      fields >> slot >> local >> remote >> state;
      const size_t colon = remote.rfind(':');
      if (colon != std::string::npos && state == "01" &&
          std::stoi(remote.substr(colon + 1), nullptr, 16) == port) {
        ends.insert(local);
      }
    }
  }
  return ends;
}

// Clients made to move bytes in parallel must not queue on one connection: gRPC shares one among
// all channels of a process with the same target and arguments unless told not to. (Counted as
// connections that were not there before, so that others closing meanwhile do not matter.)
TEST_F(ServiceTest, EachClientHasItsOwnConnection) {
  const std::string address = daemon_->address();
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  const std::set<std::string> before = ConnectionsTo(port);
  ASSERT_FALSE(before.empty());  // client_'s
  Client::Options o;
  o.address = address;
  auto a = Client::Connect(o);
  auto b = Client::Connect(o);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE((*a)->Health().ok());
  ASSERT_TRUE((*b)->Health().ok());
  int opened = 0;
  for (const std::string& end : ConnectionsTo(port)) opened += before.count(end) == 0 ? 1 : 0;
  EXPECT_EQ(opened, 2);
}

TEST_F(ServiceTest, PutLookupGetIsByteExact) {
  const auto tokens = Tokens(1, 6 * 16);
  const auto bytes = Bytes(2, 6 * bb_);
  auto put = Put(tokens, bytes);
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->blocks_stored(), 6u);
  EXPECT_EQ(put->block_hashes_size(), 6);
  auto prompt = tokens;
  prompt.push_back(5);
  auto look = client_->Lookup("demo", "", prompt);
  ASSERT_TRUE(look.ok());
  EXPECT_EQ(look->matched_tokens(), 96u);
  EXPECT_EQ(look->blocks(0).tier(), v1::TIER_HOST);
  auto got = Get(prompt);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->header.blocks(), 6u);
  EXPECT_EQ(got->data, bytes);
  // Into a caller's buffer, and a buffer too small is OUT_OF_RANGE.
  std::vector<uint8_t> dst(bytes.size());
  client::GetArgs a;
  a.model = model_id_;
  a.tokens = tokens;
  ASSERT_TRUE(client_->GetInto(a, absl::MakeSpan(dst)).ok());
  EXPECT_EQ(dst, bytes);
  std::vector<uint8_t> small(bb_);
  EXPECT_EQ(client_->GetInto(a, absl::MakeSpan(small)).status().code(),
            absl::StatusCode::kOutOfRange);
}

// first_block / max_blocks pick blocks of the longest cached prefix: the same bytes, infos and
// re-rotation (target_position is the prompt's first token's) as that stretch of the whole Get.
TEST_F(ServiceTest, BlockRangesAreStretchesOfTheWholeGet) {
  const auto tokens = Tokens(31, 10 * 16);
  const auto bytes = Bytes(32, 10 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  auto prompt = tokens;
  prompt[6 * 16 + 3] += 1;  // the longest cached prefix: 6 blocks
  auto look = client_->Lookup("demo", "", prompt);
  ASSERT_TRUE(look.ok());
  EXPECT_EQ(look->blocks_size(), 6);
  EXPECT_EQ(look->block_bytes(), bb_);
  for (const std::optional<int64_t> target :
       {std::optional<int64_t>(), std::optional<int64_t>(4096)}) {
    client::GetArgs a = Args(prompt);
    a.target_position = target;
    auto whole = client_->Get(a);
    ASSERT_TRUE(whole.ok()) << whole.status();
    ASSERT_EQ(whole->header.blocks(), 6u);
    if (target)
      ASSERT_NE(whole->data, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 6 * bb_));
    struct Range {
      uint32_t first, max, want;
    };
    for (const Range r : {Range{0, 0, 6}, Range{2, 0, 4}, Range{2, 3, 3}, Range{4, 9, 2},
                          Range{5, 1, 1}, Range{6, 0, 0}, Range{40, 2, 0}}) {
      SCOPED_TRACE(absl::StrCat("first ", r.first, " max ", r.max, target ? " moved" : ""));
      a.first_block = r.first;
      a.max_blocks = r.max;
      auto got = client_->Get(a);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->header.first_block(), r.first);
      ASSERT_EQ(got->header.blocks(), r.want);
      EXPECT_EQ(got->header.matched_tokens(), r.want * 16);
      const uint64_t from = uint64_t{std::min(r.first, 6u)} * bb_;
      EXPECT_TRUE(std::equal(got->data.begin(), got->data.end(), whole->data.begin() + from,
                             whole->data.begin() + from + r.want * bb_));
      ASSERT_EQ(got->header.block_info_size(), static_cast<int>(r.want));
      for (uint32_t i = 0; i < r.want; ++i) {
        EXPECT_EQ(got->header.block_info(i).hash(), whole->header.block_info(r.first + i).hash());
      }
    }
  }
}

// A Get over several connections: the prefix in block ranges read at once, the same answer as one
// stream, each range over a TCP connection of its own.
TEST_F(ServiceTest, AGetOverSeveralConnectionsEqualsOneStream) {
  const auto tokens = Tokens(33, 11 * 16);
  const auto bytes = Bytes(34, 11 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  client::GetArgs a = Args(tokens);
  a.target_position = 100;
  auto one = client_->Get(a);
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_EQ(one->header.blocks(), 11u);
  for (const uint32_t streams : {2u, 3u, 4u, 11u, 64u}) {
    for (const uint32_t first : {0u, 3u}) {
      SCOPED_TRACE(absl::StrCat(streams, " streams from block ", first));
      a.streams = streams;
      a.first_block = first;
      auto got = client_->Get(a);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(got->header.blocks(), 11 - first);
      EXPECT_EQ(got->header.first_block(), first);
      EXPECT_EQ(got->header.matched_tokens(), (11 - first) * 16);
      EXPECT_EQ(got->header.block_bytes(), bb_);
      EXPECT_TRUE(std::equal(got->data.begin(), got->data.end(), one->data.begin() + first * bb_,
                             one->data.end()));
      ASSERT_EQ(got->header.block_info_size(), static_cast<int>(11 - first));
      for (uint32_t i = 0; i < 11 - first; ++i) {
        EXPECT_EQ(got->header.block_info(i).hash(), one->header.block_info(first + i).hash());
      }
    }
  }
  // Into a caller's buffer; one too small is OUT_OF_RANGE before anything is written.
  a.first_block = 0;
  a.streams = 3;
  std::vector<uint8_t> dst(bytes.size(), 0xa5);
  auto into = client_->GetInto(a, absl::MakeSpan(dst));
  ASSERT_TRUE(into.ok()) << into.status();
  EXPECT_EQ(dst, one->data);
  std::vector<uint8_t> small(10 * bb_, 0xa5);
  EXPECT_EQ(client_->GetInto(a, absl::MakeSpan(small)).status().code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(small, std::vector<uint8_t>(10 * bb_, 0xa5));
  // A miss reads nothing, over one stream.
  a.tokens = Tokens(35, 4 * 16);
  auto miss = client_->Get(a);
  ASSERT_TRUE(miss.ok()) << miss.status();
  EXPECT_EQ(miss->header.blocks(), 0u);
  EXPECT_TRUE(miss->data.empty());

  // A fresh client's four streams come over four connections.
  const std::string address = daemon_->address();
  const int port = std::stoi(address.substr(address.rfind(':') + 1));
  const std::set<std::string> before = ConnectionsTo(port);
  Client::Options o;
  o.address = address;
  auto c = Client::Connect(o);
  ASSERT_TRUE(c.ok());
  a.tokens = tokens;
  a.streams = 4;
  auto four = (*c)->Get(a);
  ASSERT_TRUE(four.ok()) << four.status();
  EXPECT_EQ(four->data, one->data);
  int opened = 0;
  for (const std::string& end : ConnectionsTo(port)) opened += before.count(end) == 0 ? 1 : 0;
  EXPECT_EQ(opened, 4);
}

// A prompt of 64 blocks or more sent again takes its block hashes from the prompt memo (counted in
// Stats), unless --prompt_memo_prompts=0 turns the memo off; the answers are the same.
TEST_F(ServiceTest, PromptMemoIsCountedAndCanBeTurnedOff) {
  for (const bool off : {false, true}) {
    SCOPED_TRACE(off ? "off" : "on");
    if (off) Start({"--prompt_memo_prompts=0"});
    const auto tokens = Tokens(41, 64 * 16);
    ASSERT_TRUE(Put(tokens, Bytes(42, 64 * bb_)).ok());
    for (int i = 0; i < 2; ++i) {
      auto look = client_->Lookup("demo", "", tokens);
      ASSERT_TRUE(look.ok());
      EXPECT_EQ(look->matched_tokens(), 64u * 16);
    }
    auto stats = client_->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->prompt_blocks_reused(), off ? 0u : 128u);  // both Lookups after the Put
  }
}

TEST_F(ServiceTest, TwoRequestsShareASystemPrompt) {
  const auto system = Tokens(3, 4 * 16);
  auto a = system, b = system;
  for (int x : Tokens(4, 20)) a.push_back(x);
  for (int x : Tokens(5, 40)) b.push_back(x);
  const auto bytes = Bytes(6, 5 * bb_);
  ASSERT_TRUE(Put(std::vector<int32_t>(a.begin(), a.begin() + 80), bytes).ok());
  auto look = client_->Lookup("demo", "", b);
  ASSERT_TRUE(look.ok());
  EXPECT_EQ(look->matched_tokens(), 64u);
  auto got = Get(b);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->data, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 4 * bb_));
}

// The daemon sends a streamed response's bytes as slices of its blocks (or of the copy it made
// at a target position) without copying them into messages: messages of 1000 bytes cut every
// 32 KiB block at a different place and mostly hold the end of one block and the start of the
// next.
TEST_F(ServiceTest, StreamedMessagesCutBlocksAnywhere) {
  Start({"--chunk_size=1000"});
  const auto tokens = Tokens(11, 3 * 16);
  const auto bytes = Bytes(12, 3 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  auto got = Get(tokens);  // views of the stored blocks
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->data, bytes);
  client::GetArgs a = Args(tokens);
  a.target_position = 0;  // copies made for the call, at the position they were stored at
  auto same = client_->Get(a);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->data, bytes);
  // Composed prompts (made a layer at a time) too.
  auto composed = client_->Compose("demo", "", {[&] {
                                     v1::ComposePart p;
                                     p.mutable_tokens()->Add(tokens.begin(), tokens.end());
                                     return p;
                                   }()});
  ASSERT_TRUE(composed.ok()) << composed.status();
  // [layer][k|v][head][token][head_dim] of the blocks' [layer][k|v][head][block token][head_dim],
  // at the positions they were stored at.
  const v1::ModelSpec spec = Demo();
  const size_t row = spec.head_dim() * 2, bt = spec.block_tokens(), n = tokens.size();
  std::vector<uint8_t> want(bytes.size());
  for (size_t lkh = 0; lkh < size_t{spec.layers()} * 2 * spec.kv_heads(); ++lkh) {
    for (size_t t = 0; t < n; ++t) {
      std::memcpy(&want[(lkh * n + t) * row], &bytes[(t / bt) * bb_ + (lkh * bt + t % bt) * row],
                  row);
    }
  }
  EXPECT_EQ(composed->data, want);
}

// The daemon's messages are slices that hold their blocks; once a Get is over (read to its end,
// or given up by the client halfway) gRPC lets go of them and so does the daemon: the blocks,
// no longer being read, can be evicted.
TEST_F(ServiceTest, BlocksAreLetGoWhenAGetEnds) {
  Start({"--chunk_size=1000"});
  const auto tokens = Tokens(13, 3 * 16);
  const auto bytes = Bytes(14, 3 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  auto got = Get(tokens);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(EvictOnceLetGo(tokens), 3u);

  ASSERT_TRUE(Put(tokens, bytes).ok());
  {
    grpc::ClientContext ctx;
    v1::GetRequest req;
    req.set_model("demo");
    req.mutable_tokens()->Add(tokens.begin(), tokens.end());
    auto reader = client_->stub()->Get(&ctx, req);
    v1::GetResponse msg;
    ASSERT_TRUE(reader->Read(&msg));  // ~100 messages of 1000 bytes: the rest wait on the client
    ctx.TryCancel();
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_EQ(EvictOnceLetGo(tokens), 3u);
}

TEST_F(ServiceTest, GetAtATargetPositionReRotatesKeysOnly) {
  const auto tokens = Tokens(7, 16);
  const auto bytes = Bytes(8, bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  client::GetArgs a = Args(tokens);
  a.target_position = 0;
  auto same = client_->Get(a);
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(same->data, bytes);  // stored at 0: bit-identical
  a.target_position = 4096;
  auto moved = client_->Get(a);
  ASSERT_TRUE(moved.ok()) << moved.status();
  const size_t half = bb_ / 4 / 2;                                    // one layer's K (or V) bytes
  EXPECT_NE(std::memcmp(moved->data.data(), bytes.data(), half), 0);  // layer 0 keys moved
  EXPECT_EQ(std::memcmp(moved->data.data() + half, bytes.data() + half, half), 0);  // values not
  a.target_position = -1;
  EXPECT_EQ(client_->Get(a).status().code(), absl::StatusCode::kInvalidArgument);
  a.target_position = std::numeric_limits<int64_t>::max();
  a.first_block = ~0u;
  EXPECT_EQ(client_->Get(a).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ServiceTest, ComposeSegmentsAtNewPositions) {
  // A 20-token segment (2 blocks, the last padded) and a 32-token prefix.
  const auto seg = Tokens(30, 20);
  const auto seg_bytes = Bytes(31, 2 * bb_);
  client::PutArgs a;
  a.model = "demo";
  a.tokens = seg;
  a.segment = true;
  ASSERT_TRUE(client_->Put(a, KvView{seg_bytes, KvShape::Of(Demo(), 2)}).ok());
  const auto prefix = Tokens(32, 32);
  const auto prefix_bytes = Bytes(33, 2 * bb_);
  ASSERT_TRUE(Put(prefix, prefix_bytes).ok());
  auto look = client_->Lookup("demo", "", seg, /*segment=*/true);
  ASSERT_TRUE(look.ok());
  EXPECT_EQ(look->matched_tokens(), 20u);

  std::vector<v1::ComposePart> parts(2);
  parts[0].mutable_tokens()->Add(prefix.begin(), prefix.end());
  parts[1].mutable_tokens()->Add(seg.begin(), seg.end());
  parts[1].set_segment(true);
  auto r = client_->Compose("demo", "", parts);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->header.total_tokens(), 52u);
  ASSERT_EQ(r->header.parts_size(), 2);
  EXPECT_EQ(r->header.parts(0).hit(), v1::HIT_EXACT);
  EXPECT_EQ(r->header.parts(1).hit(), v1::HIT_REROTATED);
  EXPECT_EQ(r->header.parts(1).position(), 32);
  // [layer][k|v][head][52][64] bf16; values of the segment come back bit-exact.
  const size_t row = 64 * 2, total = 52;
  ASSERT_EQ(r->data.size(), 4 * 2 * 2 * total * row);
  const size_t block_row = 16 * row;  // one head's 16 tokens in a block
  for (int layer = 0; layer < 4; ++layer) {
    for (int h = 0; h < 2; ++h) {
      const size_t out_v = ((layer * 2 + 1) * 2 + h) * total * row;
      const size_t blk_v = ((layer * 2 + 1) * 2 + h) * block_row;
      // prefix tokens 0..15 (block 0), segment tokens 0..15 (its block 0) at prompt 32..47
      EXPECT_EQ(std::memcmp(r->data.data() + out_v, prefix_bytes.data() + blk_v, block_row), 0);
      EXPECT_EQ(std::memcmp(r->data.data() + out_v + 32 * row, seg_bytes.data() + blk_v, block_row),
                0);
      const size_t out_k = ((layer * 2) * 2 + h) * total * row;
      const size_t blk_k = ((layer * 2) * 2 + h) * block_row;
      EXPECT_EQ(std::memcmp(r->data.data() + out_k, prefix_bytes.data() + blk_k, block_row), 0);
      EXPECT_NE(std::memcmp(r->data.data() + out_k + 32 * row, seg_bytes.data() + blk_k, block_row),
                0);
    }
  }
  parts[1].set_segment(false);  // 20 tokens are no whole prefix
  EXPECT_EQ(client_->Compose("demo", "", parts).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ServiceTest, BadInputGetsTheRightCodeAndChangesNothing) {
  const auto tokens = Tokens(9, 32);
  const auto bytes = Bytes(10, 2 * bb_);
  ASSERT_TRUE(Put(tokens, bytes).ok());
  client::PutArgs a;
  a.model = "no-such-model";
  a.tokens = Tokens(11, 16);
  auto s = client_->Put(a, KvView{Bytes(12, bb_), KvShape::Of(Demo(), 1)});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound) << s.status();
  EXPECT_NE(s.status().message().find("no-such-model"), std::string::npos);
  // 15 tokens do not fill a 16-token block: the server says so (bypass the client's own check).
  {
    grpc::ClientContext ctx;
    v1::PutResponse resp;
    auto w = client_->stub()->Put(&ctx, &resp);
    v1::PutRequest req;
    req.mutable_header()->set_model("demo");
    for (int t : Tokens(13, 15)) req.mutable_header()->add_tokens(t);
    req.set_data(std::string(bb_, 'x'));
    w->Write(req);
    w->WritesDone();
    grpc::Status st = w->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find("block_tokens = 16"), std::string::npos)
        << st.error_message();
  }
  // Bytes that do not match the shape (one byte short).
  {
    grpc::ClientContext ctx;
    v1::PutResponse resp;
    auto w = client_->stub()->Put(&ctx, &resp);
    v1::PutRequest req;
    req.mutable_header()->set_model("demo");
    for (int t : Tokens(14, 16)) req.mutable_header()->add_tokens(t);
    req.set_data(std::string(bb_ - 1, 'x'));
    w->Write(req);
    w->WritesDone();
    grpc::Status st = w->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(st.error_message().find(std::to_string(bb_)), std::string::npos);
  }
  // Unspecified dtype; a block over the configured size.
  v1::ModelSpec bad = Demo();
  bad.set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(client_->RegisterModel(bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = Demo();
  bad.set_layers(4096);
  bad.set_kv_heads(64);
  EXPECT_EQ(client_->RegisterModel(bad).status().code(), absl::StatusCode::kInvalidArgument);
  // A name already taken by another spec.
  bad = Demo();
  bad.set_head_dim(128);
  EXPECT_EQ(client_->RegisterModel(bad, "demo").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(client_->Lookup("nope", "", tokens).status().code(), absl::StatusCode::kNotFound);
  // Nothing changed; still serving.
  auto got = Get(tokens);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->data, bytes);
  EXPECT_TRUE(client_->Health().ok());
}

TEST_F(ServiceTest, CapacityExhaustedWithEverythingPinned) {
  daemon_.reset();
  Start({"--host_capacity=" + std::to_string(4 * KvShape::Of(Demo(), 1).BlockBytes())});
  const auto pinned = Tokens(20, 64);
  const auto bytes = Bytes(21, 4 * bb_);
  ASSERT_TRUE(Put(pinned, bytes, /*pin=*/true).ok());
  auto full = Put(Tokens(22, 16), Bytes(23, bb_));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  auto got = Get(pinned);
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(got->data, bytes);
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_LE(stats->tiers(0).bytes_used(), stats->tiers(0).capacity_bytes());
  EXPECT_EQ(stats->tiers(0).pinned_blocks(), 4u);
}

// --host_keep_freed caps the freed host slots kept mapped for reuse: after an Evict, Stats' host
// reserved bytes are the kept ones (used is zero): all three blocks, none, or one.
TEST_F(ServiceTest, HostKeepFreedCapsTheSlotsKeptAfterEviction) {
  const auto tokens = Tokens(31, 3 * 16);
  const auto bytes = Bytes(32, 3 * bb_);
  for (const auto& [keep, kept] : {std::pair<std::string, uint64_t>{"all", 3 * bb_},
                                   {"0", 0},
                                   {std::to_string(bb_ + bb_ / 2), bb_}}) {
    daemon_.reset();
    Start({"--host_capacity=" + std::to_string(8 * bb_), "--disk_enabled=false",
           "--host_keep_freed=" + keep});
    ASSERT_TRUE(Put(tokens, bytes).ok());
    ASSERT_EQ(EvictOnceLetGo(tokens), 3u) << keep;
    auto stats = client_->Stats();
    ASSERT_TRUE(stats.ok());
    EXPECT_EQ(stats->tiers(0).bytes_used(), 0u) << keep;
    EXPECT_EQ(stats->tiers(0).reserved_bytes(), kept) << keep;
  }
}

// --host_trim_idle: the kept slots go back to the system once the host tier has been idle.
TEST_F(ServiceTest, HostTrimIdleReturnsKeptSlots) {
  daemon_.reset();
  Start({"--host_capacity=" + std::to_string(8 * bb_), "--disk_enabled=false",
         "--host_trim_idle=2s"});
  const auto tokens = Tokens(33, 2 * 16);
  ASSERT_TRUE(Put(tokens, Bytes(34, 2 * bb_)).ok());
  ASSERT_EQ(EvictOnceLetGo(tokens), 2u);
  auto kept = client_->Stats();
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ(kept->tiers(0).reserved_bytes(), 2 * bb_);  // kept, the tier not idle for 2 s yet
  uint64_t reserved = 1;
  for (int i = 0; i < 100 && reserved != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto stats = client_->Stats();
    ASSERT_TRUE(stats.ok());
    reserved = stats->tiers(0).reserved_bytes();
  }
  EXPECT_EQ(reserved, 0u);
}

TEST_F(ServiceTest, EvictionUnderPressureNeverReturnsAWrongBlock) {
  daemon_.reset();
  Start({"--host_capacity=" + std::to_string(8 * KvShape::Of(Demo(), 1).BlockBytes())});
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<uint8_t>> payloads;
  for (int i = 0; i < 24; ++i) {
    prompts.push_back(Tokens(100 + i, 32));
    payloads.push_back(Bytes(200 + i, 2 * bb_));
    ASSERT_TRUE(Put(prompts.back(), payloads.back()).ok());
  }
  int hits = 0;
  for (int i = 0; i < 24; ++i) {
    auto got = Get(prompts[i]);
    ASSERT_TRUE(got.ok());
    ASSERT_LE(got->data.size(), payloads[i].size());
    EXPECT_TRUE(std::equal(got->data.begin(), got->data.end(), payloads[i].begin())) << i;
    hits += got->header.blocks() > 0;
  }
  EXPECT_GE(hits, 3);
  auto stats = client_->Stats();
  EXPECT_GT(stats->tiers(0).evictions(), 0u);
  EXPECT_LE(stats->tiers(0).bytes_used(), stats->tiers(0).capacity_bytes());
}

// Block ranges and Gets over several connections while Puts evict: every answer is a stretch of
// the right prompt's bytes, from the block it names (no disk tier: evicted blocks are gone).
TEST_F(ServiceTest, RangesUnderEvictionNeverReturnAWrongBlock) {
  daemon_.reset();
  Start({"--host_capacity=" + std::to_string(10 * bb_), "--disk_enabled=false"});
  constexpr int kPrompts = 12, kBlocks = 6;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::vector<uint8_t>> payloads;
  for (int i = 0; i < kPrompts; ++i) {
    prompts.push_back(Tokens(300 + i, kBlocks * 16));
    payloads.push_back(Bytes(400 + i, kBlocks * bb_));
  }
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    for (int round = 0; !stop.load(); ++round) {
      const int i = round % kPrompts;
      auto put = Put(prompts[i], payloads[i]);
      EXPECT_TRUE(put.ok() || put.status().code() == absl::StatusCode::kResourceExhausted)
          << put.status();
    }
  });
  int answered = 0;
  for (int round = 0; round < 300 && !HasFailure(); ++round) {
    const int i = round % kPrompts;
    client::GetArgs a = Args(prompts[i]);
    a.first_block = round % 3;
    a.streams = 1 + round % 3;
    auto got = client_->Get(a);
    EXPECT_TRUE(got.ok()) << got.status();
    if (!got.ok()) break;
    const uint32_t n = got->header.blocks();
    EXPECT_LE(a.first_block + n, static_cast<uint32_t>(kBlocks));
    EXPECT_EQ(got->data.size(), n * bb_);
    EXPECT_TRUE(
        a.first_block + n <= kBlocks && got->data.size() == n * bb_ &&
        std::equal(got->data.begin(), got->data.end(), payloads[i].begin() + a.first_block * bb_))
        << "prompt " << i << " from block " << a.first_block << ", " << a.streams << " streams";
    answered += n > 0;
  }
  stop = true;
  writer.join();
  EXPECT_GT(answered, 0);
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_GT(stats->tiers(0).evictions(), 0u);
  EXPECT_LE(stats->tiers(0).bytes_used(), stats->tiers(0).capacity_bytes());
}

TEST_F(ServiceTest, EightConcurrentClientsLoseNothing) {
  constexpr int kClients = 8, kRounds = 12;
  std::atomic<int> errors{0};
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      Client::Options o;
      o.address = daemon_->address();
      auto cl = Client::Connect(o);
      if (!cl.ok()) {
        ++errors;
        return;
      }
      for (int r = 0; r < kRounds; ++r) {
        // Every client shares the first block of even rounds.
        std::vector<int32_t> tokens = Tokens(r % 2 == 0 ? 999 : 1000 + c * 100 + r, 16);
        std::vector<uint8_t> bytes = Bytes(r % 2 == 0 ? 999 : 1000 + c * 100 + r, bb_);
        for (int t : Tokens(5000 + c * 100 + r, 32)) tokens.push_back(t);
        const auto tail = Bytes(5000 + c * 100 + r, 2 * bb_);
        bytes.insert(bytes.end(), tail.begin(), tail.end());
        if (!Put(tokens, bytes, false, cl->get()).ok()) ++errors;
        auto got = Get(tokens, cl->get());
        if (!got.ok() || got->data != bytes) ++errors;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(errors.load(), 0);
  auto models = client_->ListModels();
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->size(), 1u);
  // 1 shared + 8 clients x (6 odd-round firsts + 12 x 2 tails) blocks.
  EXPECT_EQ((*models)[0].blocks(), 1u + kClients * (kRounds / 2 + 2 * kRounds));
}

}  // namespace
}  // namespace ropekv
