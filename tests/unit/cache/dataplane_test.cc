// The data-plane copies (cache/dataplane.h) in process: a KvCache, a BufferRegistry and shared
// memory made here as a client makes it. Keys moved to a target position are checked against keys
// freshly rotated there (ApplyRopeCpu, the frontend's own rotation); everything else bit for bit;
// bytes outside the requested range must keep their random canary values.
#include "cache/dataplane.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace {

// An fp32 model: 2 layers, 2 KV heads, head_dim 32, 8-token blocks, default RoPE.
ModelSpec SmallSpec() {
  ModelSpec s;
  s.layers = 2;
  s.kv_heads = 2;
  s.head_dim = 32;
  s.dtype = DType::kF32;
  s.block_tokens = 8;
  s.rope.head_dim = 32;
  s.rope.theta = 10000;
  return s;
}

// A shared-memory object of the "client", filled with random canary bytes.
class ClientShm {
 public:
  explicit ClientShm(uint64_t size) : size_(size) {
    static std::atomic<int> counter{0};
    name_ = absl::StrCat("/ropekv-dp-unit-", getpid(), "-", counter++);
    fd_ = shm_open(name_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd_, 0);
    EXPECT_EQ(ftruncate(fd_, static_cast<off_t>(size)), 0);
    data_ = static_cast<uint8_t*>(mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0));
    std::mt19937_64 rng(size * 31 + 7);
    for (uint64_t i = 0; i < size; ++i) data_[i] = static_cast<uint8_t>(rng() | 1);
    snapshot_.assign(data_, data_ + size);
  }
  ~ClientShm() {
    munmap(data_, size_);
    close(fd_);
    shm_unlink(name_.c_str());
  }
  const std::string& name() const { return name_; }
  uint8_t* data() const { return data_; }
  int fd() const { return fd_; }
  bool UnchangedOutside(uint64_t begin, uint64_t end) const {
    return std::memcmp(data_, snapshot_.data(), begin) == 0 &&
           std::memcmp(data_ + end, snapshot_.data() + end, size_ - end) == 0;
  }
  bool Unchanged() const { return UnchangedOutside(0, 0); }
  const std::vector<uint8_t>& snapshot() const { return snapshot_; }

 private:
  std::string name_;
  int fd_ = -1;
  uint8_t* data_ = nullptr;
  uint64_t size_;
  std::vector<uint8_t> snapshot_;
};

class DataPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    KvCache::Options o;
    o.host_capacity_bytes = 1 << 24;
    auto cache = KvCache::Create(std::move(o));
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    ASSERT_TRUE(cache_->RegisterModel(SmallSpec(), "m").ok());
    BufferRegistry::Options r;
    r.allow = true;
    registry_ = *BufferRegistry::Create(r);
    bb_ = BlockBytes(SmallSpec());
    shm_ = std::make_unique<ClientShm>(kShmBytes);
    ASSERT_TRUE(registry_->RegisterShm("buf", shm_->name(), 0).ok());
  }

  // Pre-RoPE keys and values for n tokens, prompt layout [layer][k|v][head][token][dim].
  static std::vector<float> RawKv(uint64_t seed, int n) {
    const ModelSpec s = SmallSpec();
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    std::vector<float> kv(size_t{2} * s.layers * s.kv_heads * n * s.head_dim);
    for (auto& x : kv) x = nd(rng);
    return kv;
  }

  // raw with its keys freshly rotated at positions start.. (the frontend's rotation).
  static std::vector<float> Rotated(std::vector<float> kv, int n, int64_t start) {
    const ModelSpec s = SmallSpec();
    std::vector<int64_t> pos(n);
    for (int t = 0; t < n; ++t) pos[t] = start + t;
    for (int l = 0; l < s.layers; ++l) {
      for (int h = 0; h < s.kv_heads; ++h) {
        float* k = kv.data() + ((size_t(l) * 2 * s.kv_heads + h) * n) * s.head_dim;
        EXPECT_TRUE(ApplyRopeCpu(s.rope, 0, DType::kF32, n, 1, k, pos.data()).ok());
      }
    }
    return kv;
  }

  // Prompt layout of n tokens (n a multiple of block_tokens) -> block layout.
  static std::vector<float> ToBlocks(const std::vector<float>& kv, int n) {
    const ModelSpec s = SmallSpec();
    const int bt = s.block_tokens;
    std::vector<float> out(size_t(n / bt) * BlockBytes(s) / 4);
    const KvStrides bs = BlockStrides(s);
    for (int l = 0; l < s.layers; ++l)
      for (int kvi = 0; kvi < 2; ++kvi)
        for (int h = 0; h < s.kv_heads; ++h)
          for (int t = 0; t < n; ++t)
            for (int d = 0; d < s.head_dim; ++d) {
              const size_t src =
                  (((size_t(l) * 2 + kvi) * s.kv_heads + h) * n + t) * s.head_dim + d;
              const size_t dst = size_t(t / bt) * BlockBytes(s) / 4 + l * bs.layer + kvi * bs.kv +
                                 h * bs.head + (t % bt) * bs.token + d;
              out[dst] = kv[src];
            }
    return out;
  }

  void Put(const std::vector<int32_t>& tokens, const std::vector<float>& blocks) {
    PutOptions o;
    o.model = "m";
    o.tokens = tokens;
    auto w = cache_->BeginPut(std::move(o));
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Write(absl::string_view(reinterpret_cast<const char*>(blocks.data()),
                                              blocks.size() * 4))
                    .ok());
    ASSERT_TRUE((*w)->Finish().ok());
  }

  static std::vector<int32_t> Tokens(int n, int32_t first) {
    std::vector<int32_t> t(n);
    for (int i = 0; i < n; ++i) t[i] = first + i;
    return t;
  }

  static constexpr uint64_t kShmBytes = 1 << 20;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<BufferRegistry> registry_;
  std::unique_ptr<ClientShm> shm_;
  uint64_t bb_ = 0;
};

TEST_F(DataPlaneTest, GetToBufferAsStoredIsByteExact) {
  const auto tokens = Tokens(24, 100);
  const auto blocks = ToBlocks(Rotated(RawKv(1, 24), 24, 0), 24);
  Put(tokens, blocks);
  const uint64_t off = 4093;  // unaligned on purpose
  GetToBufferArgs a;
  a.model = "m";
  a.tokens = tokens;
  a.tokens.push_back(7);  // a partial tail: the 24 cached tokens match
  a.dst = {"buf", off, 0};
  auto r = GetToBuffer(*cache_, *registry_, a);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->matched_tokens, 24u);
  EXPECT_EQ(r->blocks.size(), 3u);
  EXPECT_EQ(r->block_bytes, bb_);
  EXPECT_EQ(r->bytes_written, 3 * bb_);
  EXPECT_EQ(std::memcmp(shm_->data() + off, blocks.data(), 3 * bb_), 0);
  EXPECT_TRUE(shm_->UnchangedOutside(off, off + 3 * bb_));
}

class DataPlaneThreadsTest : public DataPlaneTest, public ::testing::WithParamInterface<int> {};

TEST_P(DataPlaneThreadsTest, GetToBufferReRotatesToTheTarget) {
  const ModelSpec s = SmallSpec();
  const int n = 24;
  const auto raw = RawKv(2, n);
  Put(Tokens(n, 300), ToBlocks(Rotated(raw, n, 0), n));
  GetToBufferArgs a;
  a.model = "m";
  a.tokens = Tokens(n, 300);
  a.target_position = 1000;
  a.dst = {"buf", 64, 3 * bb_};
  a.copy_threads = GetParam();
  auto r = GetToBuffer(*cache_, *registry_, a);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->bytes_written, 3 * bb_);
  const auto want = ToBlocks(Rotated(raw, n, 1000), n);
  const auto* got = reinterpret_cast<const float*>(shm_->data() + 64);
  const KvStrides bs = BlockStrides(s);
  for (size_t i = 0; i < want.size(); ++i) {
    const bool value = (i % (bb_ / 4)) % bs.layer >= static_cast<size_t>(bs.kv);
    float g;
    std::memcpy(&g, got + i, 4);
    if (value) {
      ASSERT_EQ(g, want[i]) << "values are copied bit for bit, element " << i;
    } else {
      ASSERT_NEAR(g, want[i], 4 * UlpOf(DType::kF32, std::fabs(want[i])) + 1e-6) << i;
    }
  }
  EXPECT_TRUE(shm_->UnchangedOutside(64, 64 + 3 * bb_));
}

INSTANTIATE_TEST_SUITE_P(CopyThreads, DataPlaneThreadsTest, ::testing::Values(1, 2, 5),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return absl::StrCat(i.param, "threads");
                         });

TEST_F(DataPlaneTest, GetMissWritesNothing) {
  GetToBufferArgs a;
  a.model = "m";
  a.tokens = Tokens(16, 9000);
  a.dst = {"buf", 0, 0};
  auto r = GetToBuffer(*cache_, *registry_, a);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->blocks.size(), 0u);
  EXPECT_EQ(r->bytes_written, 0u);
  EXPECT_TRUE(shm_->Unchanged());
}

TEST_F(DataPlaneTest, GetIntoTooSmallARangeIsInvalidAndWritesNothing) {
  Put(Tokens(24, 100), ToBlocks(RawKv(3, 24), 24));
  GetToBufferArgs a;
  a.model = "m";
  a.tokens = Tokens(24, 100);
  for (const BufferRange& dst :
       {BufferRange{"buf", 0, 3 * bb_ - 1}, BufferRange{"buf", kShmBytes - 3 * bb_ + 1, 0},
        BufferRange{"buf", kShmBytes + 1, 0}, BufferRange{"buf", ~uint64_t{0} - 10, 100}}) {
    a.dst = dst;
    auto r = GetToBuffer(*cache_, *registry_, a);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument)
        << dst.offset << " +" << dst.length << ": " << r.status();
  }
  a.dst = {"nope", 0, 0};
  EXPECT_EQ(GetToBuffer(*cache_, *registry_, a).status().code(), absl::StatusCode::kNotFound);
  a.dst = {"buf", 0, 0};
  a.target_position = -1;
  EXPECT_EQ(GetToBuffer(*cache_, *registry_, a).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(shm_->Unchanged());
}

TEST_F(DataPlaneTest, PutFromBufferStoresTheRegionsBytes) {
  const auto blocks = ToBlocks(RawKv(4, 16), 16);
  const uint64_t off = 100000;
  std::memcpy(shm_->data() + off, blocks.data(), 2 * bb_);
  PutOptions o;
  o.model = "m";
  o.tokens = Tokens(16, 700);
  auto r = PutFromBuffer(*cache_, *registry_, o, {"buf", off, 2 * bb_});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->put.blocks_stored, 2u);
  EXPECT_EQ(r->bytes_read, 2 * bb_);
  auto h = cache_->AcquirePrefix("m", "", o.tokens, 0);
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(h->blocks().size(), 2u);
  EXPECT_EQ(std::memcmp(h->bytes(0).data(), blocks.data(), bb_), 0);
  EXPECT_EQ(std::memcmp(h->bytes(1).data(), blocks.data() + bb_ / 4, bb_), 0);
}

TEST_F(DataPlaneTest, PutFromBadRangesStoresNothing) {
  PutOptions o;
  o.model = "m";
  o.tokens = Tokens(16, 800);
  for (const BufferRange& src :
       {BufferRange{"buf", 0, 2 * bb_ - 1}, BufferRange{"buf", kShmBytes - bb_, 0}}) {
    auto r = PutFromBuffer(*cache_, *registry_, o, src);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  }
  EXPECT_EQ(PutFromBuffer(*cache_, *registry_, o, {"nope", 0, 0}).status().code(),
            absl::StatusCode::kNotFound);
  // A region the client shrank is refused before a byte is read.
  ClientShm small(1 << 16);
  ASSERT_TRUE(registry_->RegisterShm("small", small.name(), 0).ok());
  ASSERT_EQ(ftruncate(small.fd(), 4096), 0);
  EXPECT_EQ(PutFromBuffer(*cache_, *registry_, o, {"small", 0, 0}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  auto l = cache_->Lookup("m", "", o.tokens);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->matched_tokens, 0u);
  EXPECT_TRUE(shm_->Unchanged());
}

TEST_F(DataPlaneTest, ComposeToBufferEqualsWriteLayer) {
  const auto prefix = Tokens(16, 100);
  Put(prefix, ToBlocks(Rotated(RawKv(5, 16), 16, 0), 16));
  std::vector<ComposePart> parts(2);
  parts[0].tokens = prefix;
  parts[1].tokens = prefix;
  parts[1].target_position = 5000;  // the same prefix again, re-rotated
  const uint64_t off = 777;
  auto r = ComposeToBuffer(*cache_, *registry_, "m", "", parts, {"buf", off, 0});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->total_tokens, 32u);
  ASSERT_EQ(r->parts.size(), 2u);
  EXPECT_EQ(r->parts[1].hit, HitKind::kRerotated);
  auto prompt = Compose(*cache_, "m", "", parts);
  ASSERT_TRUE(prompt.ok());
  ASSERT_EQ(r->layer_bytes, prompt->layer_bytes());
  ASSERT_EQ(r->bytes_written, 2 * prompt->layer_bytes());
  std::string want(r->bytes_written, '\xff');
  for (int l = 0; l < 2; ++l) {
    ASSERT_TRUE(prompt->WriteLayer(l, want.data() + l * prompt->layer_bytes()).ok());
  }
  EXPECT_EQ(std::memcmp(shm_->data() + off, want.data(), want.size()), 0);
  EXPECT_TRUE(shm_->UnchangedOutside(off, off + want.size()));
  auto small = ComposeToBuffer(*cache_, *registry_, "m", "", parts, {"buf", 0, want.size() - 1});
  EXPECT_EQ(small.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DataPlaneTest, ReadToBufferEqualsTheSessionReader) {
  SessionStore::Options so;
  auto store = SessionStore::Create(cache_.get(), so);
  ASSERT_TRUE(store.ok()) << store.status();
  OpenSessionArgs args;
  args.model = "m";
  args.tokens = Tokens(20, 40);
  args.base_position = 3;
  const auto kv = Rotated(RawKv(6, 24), 24, 3);
  const auto blocks = ToBlocks(kv, 24);
  auto opened = (*store)->Open(
      args, absl::string_view(reinterpret_cast<const char*>(blocks.data()), 3 * bb_));
  ASSERT_TRUE(opened.ok()) << opened.status();
  ASSERT_TRUE((*store)->Edit(opened->id, {EditOp::Delete(2, 5)}).ok());  // the rest moves by -3
  const TokenRange range{1, 15};
  const uint64_t off = 3333;
  auto r = ReadToBuffer(**store, *registry_, opened->id, range, std::nullopt, {"buf", off, 0});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->range, range);
  EXPECT_EQ(r->document_length, 17);
  auto reader = (*store)->Read(opened->id, range);
  ASSERT_TRUE(reader.ok());
  std::string want(reader->bytes(), '\xff');
  ASSERT_TRUE(reader->WriteAll(want.data()).ok());
  ASSERT_EQ(r->bytes_written, want.size());
  EXPECT_EQ(std::memcmp(shm_->data() + off, want.data(), want.size()), 0);
  EXPECT_TRUE(shm_->UnchangedOutside(off, off + want.size()));
  EXPECT_EQ(ReadToBuffer(**store, *registry_, "no-such-session", std::nullopt, std::nullopt,
                         {"buf", 0, 0})
                .status()
                .code(),
            absl::StatusCode::kNotFound);
}

// Paged layouts (vLLM-style pools [layer][k|v][page][token][head][dim]): the expected image of the
// region is built element by element from the block-layout reference, with its own index formula.
class DataPlanePagedTest : public DataPlaneTest {
 protected:
  static constexpr uint32_t kPages = 8;

  void SetUp() override {
    DataPlaneTest::SetUp();
    auto m = cache_->ResolveModel("m");
    ASSERT_TRUE(m.ok());
    auto layout = MakePagedLayout(*m, kPages);
    ASSERT_TRUE(layout.ok()) << layout.status();
    layout_ = *layout;
    ASSERT_EQ(layout_.bytes(), uint64_t{kPages} * bb_);  // one page of each pool per block
    pages_ = std::make_unique<ClientShm>(layout_.bytes() + 4096);  // a tail that stays untouched
    auto info = registry_->RegisterShm("pages", pages_->name(), 0, layout_);
    ASSERT_TRUE(info.ok()) << info.status();
    ASSERT_TRUE(info->paged.has_value());
    EXPECT_EQ(info->paged->num_blocks, kPages);
  }

  // Byte offset in the region of element (layer, k|v, page, token, head, dim).
  static size_t PageElement(int l, int kv, uint32_t page, int t, int h, int d) {
    const ModelSpec s = SmallSpec();
    return ((((size_t(l) * 2 + kv) * kPages + page) * s.block_tokens + t) * s.kv_heads + h) *
               s.head_dim * 4 +
           size_t(d) * 4;
  }

  // The region's canaries with `blocks` (block layout, floats) written into pages `ids`; `key`
  // marks the floats that are keys (re-rotated ones are compared within a tolerance).
  std::vector<uint8_t> Image(const std::vector<float>& blocks, const std::vector<uint32_t>& ids,
                             std::vector<bool>* key = nullptr) const {
    const ModelSpec s = SmallSpec();
    const KvStrides bs = BlockStrides(s);
    std::vector<uint8_t> image = pages_->snapshot();
    if (key != nullptr) key->assign(image.size() / 4, false);
    for (size_t b = 0; b < ids.size(); ++b)
      for (int l = 0; l < s.layers; ++l)
        for (int kv = 0; kv < 2; ++kv)
          for (int h = 0; h < s.kv_heads; ++h)
            for (int t = 0; t < s.block_tokens; ++t)
              for (int d = 0; d < s.head_dim; ++d) {
                const size_t at = PageElement(l, kv, ids[b], t, h, d);
                const float x = blocks[b * bb_ / 4 + l * bs.layer + kv * bs.kv + h * bs.head +
                                       t * bs.token + d];
                std::memcpy(image.data() + at, &x, 4);
                if (key != nullptr) (*key)[at / 4] = kv == 0;
              }
    return image;
  }

  PagedLayout layout_;
  std::unique_ptr<ClientShm> pages_;
};

TEST_F(DataPlanePagedTest, GetIntoPagesAsStoredIsByteExact) {
  const auto tokens = Tokens(24, 100);
  const auto blocks = ToBlocks(Rotated(RawKv(11, 24), 24, 0), 24);
  Put(tokens, blocks);
  GetToBufferArgs a;
  a.model = "m";
  a.tokens = tokens;
  a.dst.buffer = "pages";
  a.dst.block_ids = {5, 0, 3};
  a.copy_threads = 2;
  auto r = GetToBuffer(*cache_, *registry_, a);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->blocks.size(), 3u);
  EXPECT_EQ(r->bytes_written, 3 * bb_);
  const auto want = Image(blocks, {5, 0, 3});
  EXPECT_EQ(std::memcmp(pages_->data(), want.data(), want.size()), 0);
  EXPECT_TRUE(shm_->Unchanged());
}

TEST_F(DataPlanePagedTest, GetIntoPagesReRotatesAndStopsAtTheIds) {
  const int n = 24;
  const auto raw = RawKv(12, n);
  Put(Tokens(n, 300), ToBlocks(Rotated(raw, n, 0), n));
  GetToBufferArgs a;
  a.model = "m";
  a.tokens = Tokens(n, 300);
  a.target_position = 1000;
  a.dst.buffer = "pages";
  a.dst.block_ids = {7, 2};  // two pages: the third matched block is not copied
  auto r = GetToBuffer(*cache_, *registry_, a);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->blocks.size(), 2u);
  EXPECT_EQ(r->matched_tokens, 16u);
  std::vector<bool> key;
  const auto want = Image(ToBlocks(Rotated(raw, n, 1000), n), {7, 2}, &key);
  const auto* got = reinterpret_cast<const float*>(pages_->data());
  const auto* exp = reinterpret_cast<const float*>(want.data());
  for (size_t i = 0; i < want.size() / 4; ++i) {
    float g, w;
    std::memcpy(&g, got + i, 4);
    std::memcpy(&w, exp + i, 4);
    if (key[i]) {
      ASSERT_NEAR(g, w, 4 * UlpOf(DType::kF32, std::fabs(w)) + 1e-6) << "key float " << i;
    } else {
      ASSERT_EQ(std::memcmp(&g, &w, 4), 0) << "value or canary float " << i;
    }
  }
}

TEST_F(DataPlanePagedTest, PutFromPagesStoresTheBlocks) {
  const auto blocks = ToBlocks(RawKv(13, 16), 16);
  const auto image = Image(blocks, {4, 1});
  std::memcpy(pages_->data(), image.data(), image.size());
  PutOptions o;
  o.model = "m";
  o.tokens = Tokens(16, 900);
  auto r = PutFromBuffer(*cache_, *registry_, o, BufferRange{"pages", 0, 0, {4, 1}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->put.blocks_stored, 2u);
  auto h = cache_->AcquirePrefix("m", "", o.tokens, 0);
  ASSERT_TRUE(h.ok());
  ASSERT_EQ(h->blocks().size(), 2u);
  EXPECT_EQ(std::memcmp(h->bytes(0).data(), blocks.data(), bb_), 0);
  EXPECT_EQ(std::memcmp(h->bytes(1).data(), blocks.data() + bb_ / 4, bb_), 0);
}

TEST_F(DataPlanePagedTest, BadIdsAndLayoutsAreInvalidAndTouchNothing) {
  const auto tokens = Tokens(16, 500);
  Put(tokens, ToBlocks(RawKv(14, 16), 16));
  GetToBufferArgs a;
  a.model = "m";
  a.tokens = tokens;
  for (const BufferRange& dst : {
           BufferRange{"pages", 0, 0, {1, kPages}},  // out of range
           BufferRange{"pages", 0, 0, {3, 3}},       // twice
           BufferRange{"pages", 64, 0, {1, 2}},      // an offset as well
           BufferRange{"buf", 0, 0, {1, 2}},         // no paged layout
       }) {
    a.dst = dst;
    EXPECT_EQ(GetToBuffer(*cache_, *registry_, a).status().code(),
              absl::StatusCode::kInvalidArgument)
        << dst.buffer << " " << dst.offset;
  }
  PutOptions o;
  o.model = "m";
  o.tokens = Tokens(16, 600);
  for (const BufferRange& src : {BufferRange{"pages", 0, 0, {1}},  // 2 blocks, 1 id
                                 BufferRange{"pages", 0, 0, {0, 9}}}) {
    EXPECT_EQ(PutFromBuffer(*cache_, *registry_, o, src).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  auto l = cache_->Lookup("m", "", o.tokens);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->matched_tokens, 0u);
  // Pages of another model.
  ModelSpec other = SmallSpec();
  other.head_dim = other.rope.head_dim = 16;
  ASSERT_TRUE(cache_->RegisterModel(other, "m2").ok());
  Put(tokens, ToBlocks(RawKv(15, 16), 16));
  a.model = "m2";
  a.dst = BufferRange{"pages", 0, 0, {0}};
  EXPECT_EQ(GetToBuffer(*cache_, *registry_, a).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Calls that take an offset refuse ids.
  std::vector<ComposePart> parts(1);
  parts[0].tokens = tokens;
  EXPECT_EQ(ComposeToBuffer(*cache_, *registry_, "m", "", parts, BufferRange{"pages", 0, 0, {0}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(pages_->Unchanged());
  EXPECT_TRUE(shm_->Unchanged());
  // A layout larger than its buffer; a layout of no pages.
  auto m = cache_->ResolveModel("m");
  ASSERT_TRUE(m.ok());
  auto big = MakePagedLayout(*m, kShmBytes / bb_ + 1);
  ASSERT_TRUE(big.ok());
  ClientShm one(kShmBytes);
  EXPECT_EQ(registry_->RegisterShm("big", one.name(), 0, *big).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakePagedLayout(*m, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry_->List().size(), 2u);
}

}  // namespace
}  // namespace ropekv
