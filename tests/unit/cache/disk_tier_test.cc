#include "cache/disk_tier.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <thread>

#include "gtest/gtest.h"
#include "rocksdb/db.h"

namespace ropekv {
namespace {

std::string FreshDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  std::filesystem::path dir = std::filesystem::path(tmp ? tmp : "/tmp") /
                              ("ropekv-disk-" + name + "-" + std::to_string(getpid()));
  std::filesystem::remove_all(dir);
  return dir.string();
}

std::string RandomBytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    const uint64_t v = rng();
    std::memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return s;
}

BlockHash RandomHash(std::mt19937_64& rng) {
  BlockHash h;
  for (auto& b : h.bytes) b = static_cast<uint8_t>(rng());
  return h;
}

DiskBlockMeta MetaOf(const BlockHash& h, uint64_t bytes, int64_t position) {
  DiskBlockMeta m;
  m.hash = h;
  m.model = "0123456789abcdef";
  m.position = position;
  m.rotated_at = position + 7;
  m.rope_table = 3;
  m.pre_rope = position % 2 == 1;
  m.pinned = position % 3 == 0;
  m.bytes = bytes;
  return m;
}

void ExpectSameMeta(const DiskBlockMeta& a, const DiskBlockMeta& b) {
  EXPECT_EQ(a.hash, b.hash);
  EXPECT_EQ(a.model, b.model);
  EXPECT_EQ(a.parent.has_value(), b.parent.has_value());
  if (a.parent && b.parent) {
    EXPECT_EQ(*a.parent, *b.parent);
  }
  EXPECT_EQ(a.position, b.position);
  EXPECT_EQ(a.rotated_at, b.rotated_at);
  EXPECT_EQ(a.rope_table, b.rope_table);
  EXPECT_EQ(a.pre_rope, b.pre_rope);
  EXPECT_EQ(a.pinned, b.pinned);
  EXPECT_EQ(a.bytes, b.bytes);
}

class DiskTierTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = FreshDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<DiskTier> OpenTier(uint64_t capacity = 1ull << 30,
                                     Durability d = Durability::kSync) {
    DiskTier::Options o;
    o.path = dir_;
    o.capacity_bytes = capacity;
    o.durability = d;
    auto t = DiskTier::Open(o);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return nullptr;
    auto contents = (*t)->Load();
    EXPECT_TRUE(contents.ok()) << contents.status();
    return *std::move(t);
  }

  // Replaces the stored value of `hash` in the "blocks" family through RocksDB itself.
  void RewriteValue(const BlockHash& hash, const std::function<void(std::string*)>& change) {
    rocksdb::DBOptions o;
    std::vector<rocksdb::ColumnFamilyDescriptor> families = {
        {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
        {kDiskBlocksFamily, rocksdb::ColumnFamilyOptions()},
        {kDiskMetaFamily, rocksdb::ColumnFamilyOptions()}};
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, dir_, families, &handles, &db).ok());
    std::string value;
    ASSERT_TRUE(db->Get(rocksdb::ReadOptions(), handles[1], hash.Raw(), &value).ok());
    change(&value);
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), handles[1], hash.Raw(), value).ok());
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
    delete db;
  }

  std::string dir_;
  std::mt19937_64 rng_{20240611};
};

TEST(DiskMetaTest, BlockMetaRoundTrip) {
  std::mt19937_64 rng(1);
  DiskBlockMeta m = MetaOf(RandomHash(rng), 12345, 48);
  m.parent = RandomHash(rng);
  m.sequence = 99;
  auto d = DecodeDiskBlockMeta(EncodeDiskBlockMeta(m));
  ASSERT_TRUE(d.ok()) << d.status();
  ExpectSameMeta(m, *d);
  EXPECT_EQ(d->sequence, 99u);

  m.parent.reset();
  d = DecodeDiskBlockMeta(EncodeDiskBlockMeta(m));
  ASSERT_TRUE(d.ok());
  EXPECT_FALSE(d->parent.has_value());
}

TEST(DiskMetaTest, EveryFlippedByteOfARecordIsDataLoss) {
  std::mt19937_64 rng(2);
  const std::string enc = EncodeDiskBlockMeta(MetaOf(RandomHash(rng), 4096, 16));
  for (size_t i = 0; i < enc.size(); ++i) {
    std::string bad = enc;
    bad[i] ^= 0x20;
    EXPECT_EQ(DecodeDiskBlockMeta(bad).status().code(), absl::StatusCode::kDataLoss) << i;
  }
  EXPECT_EQ(DecodeDiskBlockMeta(enc.substr(0, enc.size() - 1)).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(DecodeDiskBlockMeta("").status().code(), absl::StatusCode::kDataLoss);
}

TEST(DiskMetaTest, ModelMetaRoundTripKeepsEveryRopeField) {
  DiskModelMeta m;
  m.spec.layers = 3;
  m.spec.kv_heads = 2;
  m.spec.head_dim = 8;
  m.spec.dtype = DType::kF16;
  m.spec.block_tokens = 4;
  RopeSpec& r = m.spec.rope;
  r.type = RopeType::kLongRope;
  r.theta = 12345.678;
  r.head_dim = 8;
  r.rotary_dim = 4;
  r.layout = PairLayout::kGptj;
  r.factor = 4.0;
  r.max_position_embeddings = 131072;
  r.original_max_position_embeddings = 4096;
  r.short_factor = {1.0, 1.5};
  r.long_factor = {2.0, 3.25};
  ASSERT_TRUE(ValidateModelSpec(m.spec).ok()) << ValidateModelSpec(m.spec);
  m.id = ModelIdOf(m.spec);
  m.names = {"phi", "phi-3.5"};
  auto d = DecodeDiskModelMeta(EncodeDiskModelMeta(m));
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->id, m.id);
  EXPECT_EQ(ModelIdOf(d->spec), m.id);  // every field that identifies the model came back
  EXPECT_EQ(d->names, m.names);
  EXPECT_EQ(d->spec.rope.long_factor, r.long_factor);
  EXPECT_EQ(d->spec.dtype, DType::kF16);

  // A record whose spec does not hash to its id is refused.
  DiskModelMeta wrong = m;
  wrong.id = "ffffffffffffffff";
  EXPECT_EQ(DecodeDiskModelMeta(EncodeDiskModelMeta(wrong)).status().code(),
            absl::StatusCode::kDataLoss);
}

TEST(DiskDurabilityTest, Parses) {
  EXPECT_EQ(*ParseDurability("sync"), Durability::kSync);
  EXPECT_EQ(*ParseDurability("memory"), Durability::kMemory);
  EXPECT_EQ(ParseDurability("fsync").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_STREQ(DurabilityName(Durability::kMemory), "memory");
}

TEST_F(DiskTierTest, BadOptionsAreRefused) {
  DiskTier::Options o;
  EXPECT_EQ(DiskTier::Open(o).status().code(), absl::StatusCode::kInvalidArgument);
  o.path = dir_;
  o.capacity_bytes = 0;
  EXPECT_EQ(DiskTier::Open(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(DiskTierTest, SecondOpenOfTheSameFolderIsUnavailable) {
  auto t = OpenTier();
  DiskTier::Options o;
  o.path = dir_;
  EXPECT_EQ(DiskTier::Open(o).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(DiskTierTest, WriteReadRoundTrip) {
  auto t = OpenTier();
  std::vector<std::string> data;
  std::vector<DiskTier::BlockWrite> writes;
  for (int i = 0; i < 5; ++i) data.push_back(RandomBytes(rng_, 10000 + 24 * i));
  for (int i = 0; i < 5; ++i) {
    writes.push_back({MetaOf(RandomHash(rng_), data[i].size(), 16 * i), data[i].data()});
  }
  ASSERT_TRUE(t->PutBlocks(writes).ok());
  EXPECT_EQ(t->used_bytes(), 5 * 10000u + 24 * 10);
  for (int i = 0; i < 5; ++i) {
    std::string out(data[i].size(), '\xff');
    ASSERT_TRUE(t->ReadBlock(writes[i].meta.hash, out.data(), out.size()).ok());
    EXPECT_EQ(out, data[i]) << i;
  }
  const DiskCounters c = t->Counters();
  EXPECT_EQ(c.blocks, 5u);
  EXPECT_EQ(c.writes, 5u);
  EXPECT_EQ(c.reads, 5u);
  EXPECT_EQ(c.corrupt, 0u);

  std::string out(10, '\0');
  EXPECT_EQ(t->ReadBlock(RandomHash(rng_), out.data(), 10).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(t->ReadBlock(writes[0].meta.hash, out.data(), 10).code(),
            absl::StatusCode::kInvalidArgument);
  // A wrong-size read deletes nothing.
  EXPECT_TRUE(t->Contains(writes[0].meta.hash));
}

TEST_F(DiskTierTest, SurvivesReopenWithModelsAndMetadata) {
  std::vector<std::string> data;
  std::vector<DiskTier::BlockWrite> writes;
  DiskModelMeta model;
  model.spec = DemoModelSpec();
  model.id = ModelIdOf(model.spec);
  model.names = {"demo"};
  {
    auto t = OpenTier(1ull << 30, Durability::kMemory);
    ASSERT_TRUE(t->PutModel(model).ok());
    for (int i = 0; i < 8; ++i) data.push_back(RandomBytes(rng_, 32768));
    std::optional<BlockHash> parent;
    for (int i = 0; i < 8; ++i) {
      DiskBlockMeta m = MetaOf(RandomHash(rng_), data[i].size(), 16 * i);
      m.model = model.id;
      m.parent = parent;
      parent = m.hash;
      writes.push_back({m, data[i].data()});
    }
    // Two batches: sequence order follows write order across batches.
    ASSERT_TRUE(t->PutBlocks(absl::MakeConstSpan(writes).subspan(0, 3)).ok());
    ASSERT_TRUE(t->PutBlocks(absl::MakeConstSpan(writes).subspan(3)).ok());
    DiskBlockMeta pinned = writes[2].meta;
    pinned.pinned = true;
    ASSERT_TRUE(t->UpdateMeta(pinned).ok());
    writes[2].meta.pinned = true;
  }
  DiskTier::Options o;
  o.path = dir_;
  auto t = DiskTier::Open(o);
  ASSERT_TRUE(t.ok()) << t.status();
  auto contents = (*t)->Load();
  ASSERT_TRUE(contents.ok()) << contents.status();
  ASSERT_EQ(contents->models.size(), 1u);
  EXPECT_EQ(contents->models[0].id, model.id);
  EXPECT_EQ(contents->models[0].names, model.names);
  EXPECT_EQ(contents->dropped_records, 0u);
  ASSERT_EQ(contents->blocks.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    ExpectSameMeta(contents->blocks[i], writes[i].meta);  // in write order
    std::string out(data[i].size(), '\xff');
    ASSERT_TRUE((*t)->ReadBlock(writes[i].meta.hash, out.data(), out.size()).ok());
    EXPECT_EQ(out, data[i]);
  }
  EXPECT_EQ((*t)->used_bytes(), 8u * 32768);
}

TEST_F(DiskTierTest, GarbageValueIsDataLossThenGone) {
  const std::string data = RandomBytes(rng_, 65536);
  const BlockHash h = RandomHash(rng_);
  const BlockHash other = RandomHash(rng_);
  const std::string other_data = RandomBytes(rng_, 65536);
  {
    auto t = OpenTier();
    ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()},
                              {MetaOf(other, other_data.size(), 16), other_data.data()}})
                    .ok());
  }
  // Same size, random garbage (header included).
  RewriteValue(h, [this](std::string* v) { *v = RandomBytes(rng_, v->size()); });
  auto t = OpenTier();
  std::string out(data.size(), '\0');
  EXPECT_EQ(t->ReadBlock(h, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(h));
  EXPECT_EQ(t->ReadBlock(h, out.data(), out.size()).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(t->Counters().corrupt, 1u);
  EXPECT_EQ(t->used_bytes(), other_data.size());
  // The neighbour is intact.
  std::string out2(other_data.size(), '\xff');
  ASSERT_TRUE(t->ReadBlock(other, out2.data(), out2.size()).ok());
  EXPECT_EQ(out2, other_data);
  // And it stays gone after a restart.
  t.reset();
  t = OpenTier();
  EXPECT_FALSE(t->Contains(h));
  EXPECT_TRUE(t->Contains(other));
}

TEST_F(DiskTierTest, OneFlippedPayloadBitIsDataLoss) {
  const std::string data = RandomBytes(rng_, 40000);
  const BlockHash h = RandomHash(rng_);
  {
    auto t = OpenTier();
    ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()}}).ok());
  }
  RewriteValue(h, [](std::string* v) { (*v)[kDiskBlockHeaderBytes + 31337] ^= 0x04; });
  auto t = OpenTier();
  std::string out(data.size(), '\0');
  EXPECT_EQ(t->ReadBlock(h, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(h));
}

TEST_F(DiskTierTest, TruncatedValueIsDataLossAtItsFirstRead) {
  const std::string data = RandomBytes(rng_, 40000);
  const BlockHash h = RandomHash(rng_);
  {
    auto t = OpenTier();
    ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()}}).ok());
  }
  RewriteValue(h, [](std::string* v) { v->resize(100); });
  auto t = OpenTier();
  EXPECT_TRUE(t->Contains(h));  // Load reads no values
  std::string out(data.size(), '\0');
  EXPECT_EQ(t->ReadBlock(h, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(h));
  EXPECT_EQ(t->used_bytes(), 0u);
  // A value shorter than the header too.
  const BlockHash h2 = RandomHash(rng_);
  ASSERT_TRUE(t->PutBlocks({{MetaOf(h2, data.size(), 0), data.data()}}).ok());
  t.reset();
  RewriteValue(h2, [](std::string* v) { v->resize(7); });
  t = OpenTier();
  EXPECT_EQ(t->ReadBlock(h2, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(h2));
}

TEST_F(DiskTierTest, ValueOfAnotherBlockIsDataLoss) {
  // A value found under another key (same size, a valid header, the right checksum of its own
  // bytes) still fails: its header names the other block.
  const std::string a = RandomBytes(rng_, 40000);
  const std::string b = RandomBytes(rng_, 40000);
  const BlockHash ha = RandomHash(rng_);
  const BlockHash hb = RandomHash(rng_);
  {
    auto t = OpenTier();
    ASSERT_TRUE(
        t->PutBlocks({{MetaOf(ha, a.size(), 0), a.data()}, {MetaOf(hb, b.size(), 16), b.data()}})
            .ok());
  }
  std::string value_b;
  RewriteValue(hb, [&](std::string* v) { value_b = *v; });
  RewriteValue(ha, [&](std::string* v) { *v = value_b; });
  auto t = OpenTier();
  std::string out(a.size(), '\0');
  EXPECT_EQ(t->ReadBlock(ha, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(ha));
  std::string out_b(b.size(), '\xff');
  ASSERT_TRUE(t->ReadBlock(hb, out_b.data(), out_b.size()).ok());
  EXPECT_EQ(out_b, b);
}

TEST_F(DiskTierTest, CapacityIsNeverPassed) {
  auto t = OpenTier(/*capacity=*/10 * 4096);
  std::vector<std::string> data;
  std::vector<BlockHash> hashes;
  for (int i = 0; i < 12; ++i) {
    data.push_back(RandomBytes(rng_, 4096));
    hashes.push_back(RandomHash(rng_));
  }
  for (int i = 0; i < 10; ++i) {
    ASSERT_TRUE(t->PutBlocks({{MetaOf(hashes[i], 4096, i), data[i].data()}}).ok());
  }
  EXPECT_EQ(t->used_bytes(), 10u * 4096);
  EXPECT_FALSE(t->Fits(1));
  // A batch of two where only one would fit writes nothing.
  EXPECT_EQ(t->PutBlocks({{MetaOf(hashes[10], 4096, 10), data[10].data()},
                          {MetaOf(hashes[11], 4096, 11), data[11].data()}})
                .code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(t->Contains(hashes[10]));
  // Rewriting a stored block does not grow usage.
  ASSERT_TRUE(t->PutBlocks({{MetaOf(hashes[3], 4096, 3), data[3].data()}}).ok());
  EXPECT_EQ(t->used_bytes(), 10u * 4096);
  ASSERT_TRUE(t->DeleteBlocks({hashes[0], hashes[1]}).ok());
  EXPECT_EQ(t->used_bytes(), 8u * 4096);
  ASSERT_TRUE(t->PutBlocks({{MetaOf(hashes[10], 4096, 10), data[10].data()},
                            {MetaOf(hashes[11], 4096, 11), data[11].data()}})
                  .ok());
  EXPECT_EQ(t->used_bytes(), 10u * 4096);
  std::string out(4096, '\0');
  EXPECT_EQ(t->ReadBlock(hashes[0], out.data(), 4096).code(), absl::StatusCode::kNotFound);
}

TEST_F(DiskTierTest, CorruptMetadataRecordIsDroppedAtLoad) {
  const std::string data = RandomBytes(rng_, 8192);
  const BlockHash good = RandomHash(rng_);
  const BlockHash bad = RandomHash(rng_);
  {
    auto t = OpenTier();
    ASSERT_TRUE(
        t->PutBlocks({{MetaOf(good, 8192, 0), data.data()}, {MetaOf(bad, 8192, 16), data.data()}})
            .ok());
  }
  {
    rocksdb::DBOptions o;
    std::vector<rocksdb::ColumnFamilyDescriptor> families = {
        {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
        {kDiskBlocksFamily, rocksdb::ColumnFamilyOptions()},
        {kDiskMetaFamily, rocksdb::ColumnFamilyOptions()}};
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, dir_, families, &handles, &db).ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), handles[2], "b" + bad.Raw(), "not a record").ok());
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
    delete db;
  }
  DiskTier::Options o;
  o.path = dir_;
  auto t = DiskTier::Open(o);
  ASSERT_TRUE(t.ok());
  auto contents = (*t)->Load();
  ASSERT_TRUE(contents.ok());
  ASSERT_EQ(contents->blocks.size(), 1u);
  EXPECT_EQ(contents->blocks[0].hash, good);
  EXPECT_EQ(contents->dropped_records, 1u);
}

TEST_F(DiskTierTest, ConcurrentWritersAndReadersSeeTheirOwnBytes) {
  auto t = OpenTier(1ull << 30, Durability::kMemory);
  constexpr int kThreads = 4;
  constexpr int kBlocks = 40;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(100 + w);
      for (int i = 0; i < kBlocks; ++i) {
        const std::string data = RandomBytes(rng, 8192 + 8 * w);
        const BlockHash h = RandomHash(rng);
        if (!t->PutBlocks({{MetaOf(h, data.size(), i), data.data()}}).ok()) ++failures;
        std::string out(data.size(), '\xff');
        if (!t->ReadBlock(h, out.data(), out.size()).ok() || out != data) ++failures;
        if (i % 3 == 0 && !t->DeleteBlocks({h}).ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  uint64_t expect = 0;
  for (int w = 0; w < kThreads; ++w) expect += (kBlocks - (kBlocks + 2) / 3) * (8192 + 8 * w);
  EXPECT_EQ(t->used_bytes(), expect);
}

}  // namespace
}  // namespace ropekv
