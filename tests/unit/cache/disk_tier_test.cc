#include "cache/disk_tier.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <thread>

#include "gtest/gtest.h"
#include "rocksdb/db.h"
#include "tests/unit/cache/disk_damage.h"

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

  // Opens the tier with default options and loads it; *contents is what Load found.
  std::unique_ptr<DiskTier> Reopen(DiskContents* contents) {
    DiskTier::Options o;
    o.path = dir_;
    auto t = DiskTier::Open(o);
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return nullptr;
    auto c = (*t)->Load();
    EXPECT_TRUE(c.ok()) << c.status();
    if (c.ok()) *contents = *std::move(c);
    return *std::move(t);
  }

  // Rewrites the record of `hash` in its segment file (the tier must be closed).
  void RewriteValue(const BlockHash& hash, const std::function<void(std::string*)>& change) {
    testing::DamageDiskRecord(dir_, hash, change);
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

  // With a place (format 2), and without (format 1, before segments).
  std::optional<DiskPlace> place;
  d = DecodeDiskBlockMeta(EncodeDiskBlockMeta(m, DiskPlace{0xfedcba98, 0x123456789abcdef0}),
                          &place);
  ASSERT_TRUE(d.ok()) << d.status();
  ExpectSameMeta(m, *d);
  ASSERT_TRUE(place.has_value());
  EXPECT_EQ(place->segment, 0xfedcba98u);
  EXPECT_EQ(place->offset, 0x123456789abcdef0u);
  d = DecodeDiskBlockMeta(EncodeDiskBlockMeta(m), &place);
  ASSERT_TRUE(d.ok());
  EXPECT_FALSE(place.has_value());
}

TEST(DiskMetaTest, EveryFlippedByteOfARecordIsDataLoss) {
  std::mt19937_64 rng(2);
  const std::string enc = EncodeDiskBlockMeta(MetaOf(RandomHash(rng), 4096, 16), DiskPlace{3, 128});
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
  RewriteValue(h, [](std::string* v) { (*v)[kDiskRecordHeaderBytes + 31337] ^= 0x04; });
  auto t = OpenTier();
  std::string out(data.size(), '\0');
  EXPECT_EQ(t->ReadBlock(h, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(h));
}

TEST_F(DiskTierTest, ATruncatedSegmentLosesItsBlocksAtLoad) {
  const std::string data = RandomBytes(rng_, 40000);
  const BlockHash h = RandomHash(rng_);
  {
    auto t = OpenTier();
    ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()}}).ok());
  }
  RewriteValue(h, [](std::string* v) { v->resize(100); });
  DiskContents contents;
  auto t = Reopen(&contents);
  ASSERT_NE(t, nullptr);
  EXPECT_TRUE(contents.blocks.empty());
  EXPECT_EQ(contents.dropped_records, 1u);
  EXPECT_FALSE(t->Contains(h));
  EXPECT_EQ(t->used_bytes(), 0u);
  // The segment held nothing else: it is gone.
  EXPECT_EQ(t->Counters().segments, 0u);
}

TEST_F(DiskTierTest, ASegmentTruncatedWhileOpenIsDataLossAtTheRead) {
  const std::string data = RandomBytes(rng_, 40000);
  const BlockHash h = RandomHash(rng_);
  auto t = OpenTier();
  ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()}}).ok());
  auto place = t->PlaceOf(h);
  ASSERT_TRUE(place.ok());
  ASSERT_EQ(::truncate(t->SegmentPath(place->segment).c_str(), 7000), 0);
  std::string out(data.size(), '\0');
  EXPECT_EQ(t->ReadBlock(h, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(h));
  EXPECT_EQ(t->Counters().corrupt, 1u);
}

TEST_F(DiskTierTest, AFlippedHeaderBitIsDataLoss) {
  const std::string data = RandomBytes(rng_, 40000);
  const BlockHash h = RandomHash(rng_);
  {
    auto t = OpenTier();
    ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()}}).ok());
  }
  // Byte 20 is the payload checksum's: only the header's own checksum can tell.
  RewriteValue(h, [](std::string* v) { (*v)[20] ^= 0x10; });
  auto t = OpenTier();
  std::string out(data.size(), '\0');
  EXPECT_EQ(t->ReadBlock(h, out.data(), out.size()).code(), absl::StatusCode::kDataLoss);
  EXPECT_FALSE(t->Contains(h));
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
        {kDiskMetaFamily, rocksdb::ColumnFamilyOptions()}};
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, dir_, families, &handles, &db).ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), handles[1], "b" + bad.Raw(), "not a record").ok());
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
    delete db;
  }
  DiskContents contents;
  auto t = Reopen(&contents);
  ASSERT_NE(t, nullptr);
  ASSERT_EQ(contents.blocks.size(), 1u);
  EXPECT_EQ(contents.blocks[0].hash, good);
  EXPECT_EQ(contents.dropped_records, 1u);
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

// Bytes of the segment files against the live payload: at most twice it, plus one segment.
TEST_F(DiskTierTest, DeadSpaceIsCompactedAndEveryLiveBlockStaysReadable) {
  DiskTier::Options o;
  o.path = dir_;
  o.segment_bytes = 64 << 10;
  o.background_compaction = false;
  auto t = *DiskTier::Open(o);
  ASSERT_TRUE(t->Load().ok());
  constexpr int kBlocks = 64;
  std::vector<std::string> data;
  std::vector<BlockHash> hashes;
  for (int i = 0; i < kBlocks; ++i) {
    data.push_back(RandomBytes(rng_, 8000 + 16 * (i % 5)));
    hashes.push_back(RandomHash(rng_));
    ASSERT_TRUE(t->PutBlocks({{MetaOf(hashes[i], data[i].size(), 16 * i), data[i].data()}}).ok());
  }
  const DiskCounters full = t->Counters();
  EXPECT_GE(full.segments, 8u);  // 64 KiB segments of ~8 KB records
  // Three of every four blocks go, and every fourth of the others is rewritten (its old record
  // is dead space too).
  std::vector<BlockHash> doomed;
  for (int i = 0; i < kBlocks; ++i) {
    if (i % 4 != 0) doomed.push_back(hashes[i]);
  }
  ASSERT_TRUE(t->DeleteBlocks(doomed).ok());
  for (int i = 0; i < kBlocks; i += 16) {
    data[i] = RandomBytes(rng_, data[i].size());
    ASSERT_TRUE(t->PutBlocks({{MetaOf(hashes[i], data[i].size(), 16 * i), data[i].data()}}).ok());
  }
  const DiskCounters before = t->Counters();
  ASSERT_TRUE(t->Compact().ok());
  const DiskCounters after = t->Counters();
  EXPECT_GT(after.relocated, 0u);
  // Under sync, moved records reach the disk before their metadata points at them.
  EXPECT_GT(after.segment_syncs, before.segment_syncs);
  EXPECT_LT(after.file_bytes, before.file_bytes);
  EXPECT_LE(after.file_bytes, 2 * after.bytes_used + (64 << 10) + 2 * 8192);
  EXPECT_EQ(after.bytes_used, before.bytes_used);
  EXPECT_EQ(after.blocks, static_cast<uint64_t>(kBlocks / 4));
  // On disk, the files are what the counters say.
  uint64_t on_disk = 0;
  int files = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir_ + "/segments")) {
    on_disk += f.file_size();
    ++files;
  }
  EXPECT_EQ(on_disk, after.file_bytes);
  EXPECT_EQ(static_cast<uint64_t>(files), after.segments);
  auto read_all = [&](DiskTier& tier) {
    for (int i = 0; i < kBlocks; ++i) {
      std::string out(data[i].size(), '\xff');
      const absl::Status s = tier.ReadBlock(hashes[i], out.data(), out.size());
      if (i % 4 != 0) {
        EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << i;
        continue;
      }
      ASSERT_TRUE(s.ok()) << i << " " << s;
      EXPECT_EQ(out, data[i]) << i;
    }
  };
  read_all(*t);
  // Moved blocks keep their metadata (the pin, the write order) across a restart.
  t.reset();
  auto reopened = *DiskTier::Open(o);
  auto contents = reopened->Load();
  ASSERT_TRUE(contents.ok());
  ASSERT_EQ(contents->blocks.size(), static_cast<size_t>(kBlocks / 4));
  EXPECT_EQ(contents->dropped_records, 0u);
  for (const DiskBlockMeta& m : contents->blocks) {
    const int i = static_cast<int>(m.position / 16);
    ExpectSameMeta(m, MetaOf(hashes[i], data[i].size(), 16 * i));
  }
  for (size_t i = 1; i < contents->blocks.size(); ++i) {
    EXPECT_LT(contents->blocks[i - 1].sequence, contents->blocks[i].sequence);
  }
  // The rewritten blocks are the most recent.
  EXPECT_EQ(contents->blocks.back().hash, hashes[kBlocks - 16]);
  read_all(*reopened);
}

// Compaction in the background while writers put, rewrite, delete and read: every read returns
// the bytes last written, and a restart finds exactly the blocks that were not deleted.
TEST_F(DiskTierTest, CompactionRacingWritersNeverLosesOrMixesABlock) {
  DiskTier::Options o;
  o.path = dir_;
  o.segment_bytes = 48 << 10;
  o.durability = Durability::kMemory;
  auto t = *DiskTier::Open(o);
  ASSERT_TRUE(t->Load().ok());
  constexpr int kThreads = 4;
  constexpr int kRounds = 150;
  std::vector<std::map<int, std::string>> kept(kThreads);  // block -> its last bytes
  std::vector<std::vector<BlockHash>> hashes(kThreads);
  std::atomic<int> failures{0};
  std::atomic<bool> done{false};
  std::thread compactor([&] {
    while (!done.load()) {
      if (!t->Compact().ok()) ++failures;
    }
  });
  std::vector<std::thread> threads;
  for (int w = 0; w < kThreads; ++w) {
    threads.emplace_back([&, w] {
      std::mt19937_64 rng(500 + w);
      for (int i = 0; i < 24; ++i) hashes[w].push_back(RandomHash(rng));
      // Until compaction has moved something while they write (at most 20x the rounds: on a
      // loaded machine the compactor may get no turn in the first ones).
      for (int r = 0; r < kRounds || (t->Counters().relocated == 0 && r < 20 * kRounds); ++r) {
        const int b = static_cast<int>(rng() % 24);
        const int op = static_cast<int>(rng() % 4);
        if (op <= 1) {  // put or rewrite
          std::string bytes = RandomBytes(rng, 4096 + 64 * (b % 3));
          if (!t->PutBlocks({{MetaOf(hashes[w][b], bytes.size(), 16 * b), bytes.data()}}).ok()) {
            ++failures;
          }
          kept[w][b] = std::move(bytes);
        } else if (op == 2) {
          if (!t->DeleteBlocks({hashes[w][b]}).ok()) ++failures;
          kept[w].erase(b);
        } else {
          auto it = kept[w].find(b);
          const size_t n = it == kept[w].end() ? 4096 : it->second.size();
          std::string out(n, '\xff');
          const absl::Status s = t->ReadBlock(hashes[w][b], out.data(), n);
          if (it == kept[w].end() ? !absl::IsNotFound(s) : (!s.ok() || out != it->second)) {
            ++failures;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  done = true;
  compactor.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(t->Counters().corrupt, 0u);
  EXPECT_GT(t->Counters().relocated, 0u);      // the race took place
  EXPECT_EQ(t->Counters().segment_syncs, 0u);  // memory: nothing is synced
  t.reset();
  auto reopened = *DiskTier::Open(o);
  auto contents = reopened->Load();
  ASSERT_TRUE(contents.ok());
  size_t expected = 0;
  uint64_t expected_bytes = 0;
  for (int w = 0; w < kThreads; ++w) {
    expected += kept[w].size();
    for (const auto& [b, bytes] : kept[w]) {
      expected_bytes += bytes.size();
      std::string out(bytes.size(), '\xff');
      ASSERT_TRUE(reopened->ReadBlock(hashes[w][b], out.data(), out.size()).ok());
      EXPECT_EQ(out, bytes);
    }
  }
  EXPECT_EQ(contents->blocks.size(), expected);
  EXPECT_EQ(reopened->used_bytes(), expected_bytes);
}

// A torn append (bytes past the last record, as a crash mid-write leaves) and a segment file that
// no block lives in (its metadata never committed) lose nothing and are reclaimed.
TEST_F(DiskTierTest, BytesWithoutMetadataAreNeverReadAndAreReclaimed) {
  const std::string data = RandomBytes(rng_, 20000);
  const BlockHash h = RandomHash(rng_);
  std::string file;
  {
    auto t = OpenTier();
    ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()}}).ok());
    file = t->SegmentPath(t->PlaceOf(h)->segment);
  }
  {
    std::ofstream torn(file, std::ios::app | std::ios::binary);
    torn << RandomBytes(rng_, 25000);  // more than the record: the segment is below half live
    std::ofstream orphan(dir_ + "/segments/0000abcd.seg", std::ios::binary);
    orphan << RandomBytes(rng_, 9000);
    std::ofstream foreign(dir_ + "/segments/notes.txt");
    foreign << "not a segment";
  }
  auto t = OpenTier();
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/segments/0000abcd.seg"));
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/segments/notes.txt"));  // not ours: left alone
  std::string out(data.size(), '\xff');
  ASSERT_TRUE(t->ReadBlock(h, out.data(), out.size()).ok());
  EXPECT_EQ(out, data);
  // New records go to a new segment, above every file there (the orphan's id too).
  const BlockHash h2 = RandomHash(rng_);
  ASSERT_TRUE(t->PutBlocks({{MetaOf(h2, data.size(), 16), data.data()}}).ok());
  EXPECT_GT(t->PlaceOf(h2)->segment, 0xabcdu);
  // The torn segment is below half live: compaction moves its block and removes it.
  ASSERT_TRUE(t->DeleteBlocks({h2}).ok());
  ASSERT_TRUE(t->Compact().ok());
  EXPECT_FALSE(std::filesystem::exists(file));
  ASSERT_TRUE(t->ReadBlock(h, out.data(), out.size()).ok());
  EXPECT_EQ(out, data);
}

TEST_F(DiskTierTest, AMissingSegmentFileDropsItsBlocksAtLoad) {
  const std::string data = RandomBytes(rng_, 20000);
  const BlockHash h = RandomHash(rng_);
  {
    auto t = OpenTier();
    ASSERT_TRUE(t->PutBlocks({{MetaOf(h, data.size(), 0), data.data()}}).ok());
    std::filesystem::remove(t->SegmentPath(t->PlaceOf(h)->segment));
  }
  DiskContents contents;
  auto t = Reopen(&contents);
  ASSERT_NE(t, nullptr);
  EXPECT_TRUE(contents.blocks.empty());
  EXPECT_EQ(contents.dropped_records, 1u);
  EXPECT_EQ(t->used_bytes(), 0u);
}

// A data folder written before segments (block bytes as values of a "blocks" column family,
// metadata of format 1) is migrated: every good block moves to a segment with its metadata, a
// damaged one is dropped, and the family is gone.
TEST_F(DiskTierTest, AFolderOfTheFormatBeforeSegmentsIsMigrated) {
  constexpr int kBlocks = 6;
  std::vector<std::string> data;
  std::vector<DiskBlockMeta> metas;
  DiskModelMeta model;
  model.spec = DemoModelSpec();
  model.id = ModelIdOf(model.spec);
  model.names = {"demo"};
  {
    rocksdb::DBOptions o;
    o.create_if_missing = true;
    o.create_missing_column_families = true;
    rocksdb::ColumnFamilyOptions blobs;
    blobs.enable_blob_files = true;
    blobs.min_blob_size = 4096;
    std::vector<rocksdb::ColumnFamilyDescriptor> families = {
        {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions()},
        {kDiskBlocksFamily, blobs},
        {kDiskMetaFamily, rocksdb::ColumnFamilyOptions()}};
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(o, dir_, families, &handles, &db).ok());
    ASSERT_TRUE(
        db->Put(rocksdb::WriteOptions(), handles[2], "m" + model.id, EncodeDiskModelMeta(model))
            .ok());
    for (int i = 0; i < kBlocks; ++i) {
      data.push_back(RandomBytes(rng_, 30000));
      DiskBlockMeta m = MetaOf(RandomHash(rng_), data[i].size(), 16 * i);
      m.model = model.id;
      m.sequence = 10 + i;
      metas.push_back(m);
      // The value of that format: magic "RKVB", format 1, size, XXH3, the block's hash, payload.
      std::string value(kDiskLegacyHeaderBytes, '\0');
      auto put = [&](int at, uint64_t v, int n) {
        for (int b = 0; b < n; ++b) value[at + b] = static_cast<char>(v >> (8 * b));
      };
      put(0, 0x42564b52, 4);
      put(4, 1, 4);
      put(8, data[i].size(), 8);
      put(16, BlockChecksum(data[i].data(), data[i].size()), 8);
      std::memcpy(value.data() + 24, m.hash.bytes.data(), 32);
      value += data[i];
      if (i == 3) value[kDiskLegacyHeaderBytes + 100] ^= 1;  // damaged
      ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), handles[1], m.hash.Raw(), value).ok());
      ASSERT_TRUE(
          db->Put(rocksdb::WriteOptions(), handles[2], "b" + m.hash.Raw(), EncodeDiskBlockMeta(m))
              .ok());
    }
    ASSERT_TRUE(db->Flush(rocksdb::FlushOptions(), handles).ok());
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
    delete db;
  }
  DiskTier::Options o;
  o.path = dir_;
  {
    auto t = *DiskTier::Open(o);
    auto contents = t->Load();
    ASSERT_TRUE(contents.ok()) << contents.status();
    EXPECT_EQ(contents->migrated_blocks, static_cast<uint64_t>(kBlocks - 1));
    EXPECT_EQ(contents->dropped_records, 1u);
    ASSERT_EQ(contents->models.size(), 1u);
    ASSERT_EQ(contents->blocks.size(), static_cast<size_t>(kBlocks - 1));
    for (int i = 0, j = 0; i < kBlocks; ++i) {
      std::string out(data[i].size(), '\xff');
      const absl::Status s = t->ReadBlock(metas[i].hash, out.data(), out.size());
      if (i == 3) {
        EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
        continue;
      }
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(out, data[i]);
      ExpectSameMeta(contents->blocks[j], metas[i]);
      EXPECT_EQ(contents->blocks[j++].sequence, metas[i].sequence);
    }
    EXPECT_EQ(t->used_bytes(), (kBlocks - 1) * 30000u);
  }
  std::vector<std::string> families;
  ASSERT_TRUE(rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions(), dir_, &families).ok());
  EXPECT_EQ(std::count(families.begin(), families.end(), kDiskBlocksFamily), 0);
  // A second start has nothing to migrate and finds the same blocks.
  auto t = *DiskTier::Open(o);
  auto contents = t->Load();
  ASSERT_TRUE(contents.ok());
  EXPECT_EQ(contents->migrated_blocks, 0u);
  EXPECT_EQ(contents->blocks.size(), static_cast<size_t>(kBlocks - 1));
}

// Staged records are written as they are handed over, findable only once a PutBlocks commits
// them; blocks the staging did not get are written by the commit; an uncommitted staging leaves
// dead space only.
TEST_F(DiskTierTest, StagedRecordsAreFindableOnlyAfterTheirCommit) {
  DiskTier::Options o;
  o.path = dir_;
  o.background_compaction = false;
  auto t = *DiskTier::Open(o);
  ASSERT_TRUE(t->Load().ok());
  std::vector<std::string> data;
  std::vector<DiskTier::BlockWrite> writes;
  for (int i = 0; i < 6; ++i) data.push_back(RandomBytes(rng_, 20000 + 64 * i));
  for (int i = 0; i < 6; ++i) {
    writes.push_back({MetaOf(RandomHash(rng_), data[i].size(), 16 * i), data[i].data()});
  }
  {
    auto staging = t->BeginStaging();
    for (int i = 0; i < 4; ++i) {  // blocks 4 and 5 are not staged; block 1 twice
      staging->Append(writes[i].meta.hash, data[i].data(), data[i].size());
    }
    staging->Append(writes[1].meta.hash, data[1].data(), data[1].size());
    for (int i = 0; i < 6; ++i) EXPECT_FALSE(t->Contains(writes[i].meta.hash));
    ASSERT_TRUE(t->PutBlocks(writes, staging.get()).ok());
  }
  for (int i = 0; i < 6; ++i) {
    std::string out(data[i].size(), '\xff');
    ASSERT_TRUE(t->ReadBlock(writes[i].meta.hash, out.data(), out.size()).ok()) << i;
    EXPECT_EQ(out, data[i]) << i;
  }
  uint64_t records = 0;
  for (int i = 0; i < 6; ++i) records += (64 + data[i].size() + 63) / 64 * 64;
  const DiskCounters committed = t->Counters();
  EXPECT_EQ(committed.bytes_used, t->used_bytes());
  // Seven records written (block 1 twice): the extra one is dead space.
  EXPECT_EQ(committed.file_bytes, records + (64 + data[1].size() + 63) / 64 * 64);

  // A staging given up: its records take file space, no block is stored.
  const BlockHash lost = RandomHash(rng_);
  {
    auto staging = t->BeginStaging();
    staging->Append(lost, data[0].data(), data[0].size());
  }
  EXPECT_FALSE(t->Contains(lost));
  EXPECT_EQ(t->used_bytes(), committed.bytes_used);
  EXPECT_GT(t->Counters().file_bytes, committed.file_bytes);
  // And a restart finds exactly the committed blocks.
  t.reset();
  auto reopened = *DiskTier::Open(o);
  auto contents = reopened->Load();
  ASSERT_TRUE(contents.ok());
  EXPECT_EQ(contents->blocks.size(), 6u);
  EXPECT_FALSE(reopened->Contains(lost));
  for (int i = 0; i < 6; ++i) {
    std::string out(data[i].size(), '\xff');
    ASSERT_TRUE(reopened->ReadBlock(writes[i].meta.hash, out.data(), out.size()).ok()) << i;
    EXPECT_EQ(out, data[i]) << i;
  }
}

// A staged commit that does not fit writes nothing findable.
TEST_F(DiskTierTest, AStagedCommitPastTheCapacityStoresNothing) {
  auto t = OpenTier(/*capacity=*/3 * 4096);
  std::vector<std::string> data;
  std::vector<DiskTier::BlockWrite> writes;
  for (int i = 0; i < 4; ++i) {
    data.push_back(RandomBytes(rng_, 4096));
    writes.push_back({MetaOf(RandomHash(rng_), 4096, 16 * i), data[i].data()});
  }
  auto staging = t->BeginStaging();
  for (int i = 0; i < 4; ++i) staging->Append(writes[i].meta.hash, data[i].data(), 4096);
  EXPECT_EQ(t->PutBlocks(writes, staging.get()).code(), absl::StatusCode::kResourceExhausted);
  for (int i = 0; i < 4; ++i) EXPECT_FALSE(t->Contains(writes[i].meta.hash));
  EXPECT_EQ(t->used_bytes(), 0u);
  // The tier is usable after it.
  ASSERT_TRUE(t->PutBlocks(absl::MakeConstSpan(writes).subspan(0, 3)).ok());
  EXPECT_EQ(t->used_bytes(), 3u * 4096);
}

// ReadBlocks on several threads reads what ReadBlock reads; past a damaged block a read either
// ran (and is right) or was skipped; on one thread every read after it is skipped.
TEST_F(DiskTierTest, ReadBlocksOnSeveralThreadsEqualsReadBlock) {
  constexpr int kBlocks = 32;
  std::vector<std::string> data;
  std::vector<BlockHash> hashes;
  {
    auto t = OpenTier();
    std::vector<DiskTier::BlockWrite> writes;
    for (int i = 0; i < kBlocks; ++i) {
      data.push_back(RandomBytes(rng_, 12288 + 64 * (i % 3)));
      hashes.push_back(RandomHash(rng_));
      writes.push_back({MetaOf(hashes[i], data[i].size(), 16 * i), data[i].data()});
    }
    ASSERT_TRUE(t->PutBlocks(writes).ok());
  }
  RewriteValue(hashes[20], [](std::string* v) { (*v)[kDiskRecordHeaderBytes + 5] ^= 1; });
  for (int threads : {4, 1}) {
    DiskTier::Options o;
    o.path = dir_;
    o.read_threads = threads;
    auto t = *DiskTier::Open(o);
    ASSERT_TRUE(t->Load().ok());
    std::vector<std::string> out(kBlocks);
    std::vector<DiskTier::BlockRead> reads;
    for (int i = 0; i < kBlocks; ++i) {
      out[i].assign(data[i].size(), '\xff');
      reads.push_back({hashes[i], out[i].data(), out[i].size()});
    }
    std::vector<absl::Status> statuses(kBlocks, absl::UnknownError("poison"));
    t->ReadBlocks(reads, absl::MakeSpan(statuses));
    for (int i = 0; i < kBlocks; ++i) {
      if (i < 20) {
        ASSERT_TRUE(statuses[i].ok()) << threads << " " << i << " " << statuses[i];
        EXPECT_EQ(out[i], data[i]) << i;
      } else if (i == 20) {
        EXPECT_EQ(statuses[i].code(), absl::StatusCode::kDataLoss) << threads;
      } else if (threads == 1) {
        EXPECT_EQ(statuses[i].code(), absl::StatusCode::kCancelled) << i;
      } else if (statuses[i].ok()) {
        EXPECT_EQ(out[i], data[i]) << i;
      } else {
        EXPECT_EQ(statuses[i].code(), absl::StatusCode::kCancelled) << i << " " << statuses[i];
      }
    }
    if (threads == 4) {
      // The damaged block is gone; a second ReadBlocks of the rest reads every one.
      reads.erase(reads.begin() + 20);
      std::vector<absl::Status> again(reads.size());
      t->ReadBlocks(reads, absl::MakeSpan(again));
      for (const absl::Status& st : again) EXPECT_TRUE(st.ok()) << st;
      // Put the damaged block back for the one-thread pass.
      ASSERT_TRUE(t->PutBlocks({{MetaOf(hashes[20], data[20].size(), 320), data[20].data()}}).ok());
      t.reset();
      RewriteValue(hashes[20], [](std::string* v) { (*v)[kDiskRecordHeaderBytes + 5] ^= 1; });
    }
  }
}

// Many Puts stage at once through the tier's few staging threads; some give up. Every committed
// block reads back, no other block is stored, and nothing stays reserved.
TEST_F(DiskTierTest, ManyStagingsShareTheStagingThreads) {
  DiskTier::Options o;
  o.path = dir_;
  o.durability = Durability::kMemory;
  o.stage_threads = 2;
  o.background_compaction = false;
  auto t = *DiskTier::Open(o);
  ASSERT_TRUE(t->Load().ok());
  constexpr int kPuts = 12;
  constexpr int kBlocks = 8;
  std::vector<std::vector<std::string>> data(kPuts);
  std::vector<std::vector<DiskTier::BlockWrite>> writes(kPuts);
  for (int p = 0; p < kPuts; ++p) {
    for (int i = 0; i < kBlocks; ++i) data[p].push_back(RandomBytes(rng_, 8192 + 64 * p));
    for (int i = 0; i < kBlocks; ++i) {
      writes[p].push_back({MetaOf(RandomHash(rng_), data[p][i].size(), 16 * i), data[p][i].data()});
    }
  }
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int p = 0; p < kPuts; ++p) {
    threads.emplace_back([&, p] {
      auto staging = t->BeginStaging();
      for (const auto& w : writes[p]) staging->Append(w.meta.hash, w.data, w.meta.bytes);
      if (p % 4 == 3) return;  // given up
      if (!t->PutBlocks(writes[p], staging.get()).ok()) ++failures;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  uint64_t expect_bytes = 0;
  for (int p = 0; p < kPuts; ++p) {
    for (int i = 0; i < kBlocks; ++i) {
      const BlockHash& h = writes[p][i].meta.hash;
      if (p % 4 == 3) {
        EXPECT_FALSE(t->Contains(h));
        continue;
      }
      expect_bytes += data[p][i].size();
      std::string out(data[p][i].size(), '\xff');
      ASSERT_TRUE(t->ReadBlock(h, out.data(), out.size()).ok()) << p << " " << i;
      EXPECT_EQ(out, data[p][i]);
    }
  }
  EXPECT_EQ(t->used_bytes(), expect_bytes);
  EXPECT_TRUE(t->Fits(o.capacity_bytes - expect_bytes));  // no reservation left behind
  EXPECT_EQ(t->Counters().blocks, static_cast<uint64_t>(kPuts - kPuts / 4) * kBlocks);
}

}  // namespace
}  // namespace ropekv
