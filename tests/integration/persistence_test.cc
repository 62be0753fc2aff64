// The disk tier through the real daemon: restarts keep every block and model, kill -9 during a
// put load loses no acknowledged block and shows no partial one, a corrupted value on disk is
// detected and never served, and capacities hold under twice the load.
#include <signal.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <thread>

#include "cache/disk_tier.h"
#include "clients/cpp/client.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon.h"
#include "tests/unit/cache/disk_damage.h"

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
  std::mt19937_64 rng(seed * 104729 + 3);
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

class PersistenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::FreshDir(::testing::UnitTest::GetInstance()->current_test_info()->name());
    bb_ = KvShape::Of(Demo(), 1).BlockBytes();
  }
  void TearDown() override {
    client_.reset();
    daemon_.reset();
    std::filesystem::remove_all(dir_);
  }

  // Starts (or restarts) the daemon on the test's data folder.
  void Start(std::vector<std::string> flags = {}, bool register_model = true) {
    flags_ = flags;
    Stop();
    daemon_ = std::make_unique<testing::Daemon>(std::move(flags), dir_);
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    o.timeout = absl::Seconds(30);
    auto c = Client::Connect(o);
    ASSERT_TRUE(c.ok());
    client_ = *std::move(c);
    ASSERT_TRUE(client_->Health().ok());
    if (register_model) {
      ASSERT_TRUE(client_->RegisterModel(Demo(), "demo").ok());
    }
  }
  void Restart() { Start(flags_, /*register_model=*/false); }
  // The client goes first: an open channel would hold the daemon's clean exit up.
  void Stop(bool hard = false) {
    client_.reset();
    if (daemon_) daemon_->Stop(hard);
  }

  absl::StatusOr<v1::PutResponse> Put(uint64_t seed, uint32_t blocks, Client* c = nullptr) {
    const auto tokens = Tokens(seed, blocks * 16);
    const auto bytes = Bytes(seed, blocks * bb_);
    client::PutArgs args;
    args.model = "demo";
    args.tokens = tokens;
    return (c ? c : client_.get())->Put(args, KvView{bytes, KvShape::Of(Demo(), blocks)});
  }

  // Blocks of prompt `seed` that read back; fails the test on a block with wrong bytes.
  uint32_t ReadBack(uint64_t seed, uint32_t blocks) {
    client::GetArgs g;
    g.model = "demo";
    g.tokens = Tokens(seed, blocks * 16);
    auto r = client_->Get(g);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return 0;
    const auto want = Bytes(seed, blocks * bb_);
    const uint32_t n = r->header.blocks();
    EXPECT_EQ(r->data.size(), n * bb_);
    for (uint32_t b = 0; b < n && (b + 1) * bb_ <= r->data.size(); ++b) {
      EXPECT_EQ(std::memcmp(r->data.data() + b * bb_, want.data() + b * bb_, bb_), 0)
          << "prompt " << seed << " block " << b << " has other bytes";
    }
    return n;
  }

  const v1::TierStats* Tier(const v1::StatsResponse& s, v1::Tier tier) {
    for (const auto& t : s.tiers()) {
      if (t.tier() == tier) return &t;
    }
    ADD_FAILURE() << "no tier " << v1::Tier_Name(tier);
    return nullptr;
  }

  std::string dir_;
  std::vector<std::string> flags_;
  uint64_t bb_ = 0;
  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> client_;
};

TEST_F(PersistenceTest, RestartKeepsEveryBlockAndModel) {
  Start();
  for (uint64_t seed = 1; seed <= 8; ++seed) ASSERT_TRUE(Put(seed, 4).ok());
  Stop();  // clean shutdown
  Restart();
  auto models = client_->ListModels();
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->size(), 1u);
  EXPECT_EQ((*models)[0].names(0), "demo");
  EXPECT_EQ((*models)[0].blocks(), 32u);
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    auto l = client_->Lookup("demo", "", Tokens(seed, 64));
    ASSERT_TRUE(l.ok());
    EXPECT_EQ(l->matched_tokens(), 64u);
    EXPECT_EQ(l->blocks(0).tier(), v1::TIER_DISK);
    EXPECT_EQ(ReadBack(seed, 4), 4u);
  }
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  const v1::TierStats* host = Tier(*stats, v1::TIER_HOST);
  const v1::TierStats* disk = Tier(*stats, v1::TIER_DISK);
  ASSERT_TRUE(host && disk);
  EXPECT_EQ(host->promotions(), 32u);
  EXPECT_EQ(disk->blocks(), 32u);
  EXPECT_EQ(disk->bytes_used(), 32 * bb_);
  EXPECT_EQ(disk->bytes_moved(), 32 * bb_);
}

// kill -9 while Puts are in flight: every acknowledged Put reads back whole, and whatever else
// is visible reads back right (no partial block), for both durability settings.
class KillTest : public PersistenceTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(KillTest, AcknowledgedPutsSurviveKill9) {
  Start({std::string("--disk_durability=") + GetParam(), "--host_capacity=64MiB"});
  constexpr int kWriters = 3;
  std::atomic<bool> stop{false};
  std::atomic<size_t> acked_count{0};
  std::vector<std::vector<uint64_t>> acked(kWriters);
  std::vector<std::vector<uint64_t>> tried(kWriters);
  std::vector<std::thread> threads;
  for (int w = 0; w < kWriters; ++w) {
    threads.emplace_back([&, w] {
      Client::Options o;
      o.address = daemon_->address();
      o.timeout = absl::Seconds(10);
      auto c = Client::Connect(o);
      if (!c.ok()) return;
      for (uint64_t seed = 1000 * (w + 1); !stop; ++seed) {
        tried[w].push_back(seed);
        if (Put(seed, 3, c->get()).ok()) {
          acked[w].push_back(seed);
          ++acked_count;
        } else {
          return;  // the daemon is gone
        }
      }
    });
  }
  // Let some Puts be acknowledged, then kill the daemon in the middle of the load.
  for (int i = 0; i < 1000 && acked_count < 30; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  daemon_->Stop(/*hard=*/true);
  stop = true;
  for (auto& t : threads) t.join();
  size_t total = 0;
  for (int w = 0; w < kWriters; ++w) total += acked[w].size();
  ASSERT_GT(total, 0u);
  std::cout << total << " Puts acknowledged before kill -9\n";

  Restart();
  for (int w = 0; w < kWriters; ++w) {
    for (uint64_t seed : acked[w]) {
      EXPECT_EQ(ReadBack(seed, 3), 3u) << "acknowledged prompt " << seed << " lost";
    }
    // In-flight Puts: all of their blocks or none (one atomic batch), and right when there.
    for (uint64_t seed : tried[w]) {
      const uint32_t n = ReadBack(seed, 3);
      EXPECT_TRUE(n == 0 || n == 3) << "prompt " << seed << " is partly visible: " << n;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Durability, KillTest, ::testing::Values("sync", "memory"));

TEST_F(PersistenceTest, CorruptedValueIsDetectedAndNeverServed) {
  Start();
  ASSERT_TRUE(Put(5, 4).ok());
  auto l = client_->Lookup("demo", "", Tokens(5, 64));
  ASSERT_TRUE(l.ok());
  ASSERT_EQ(l->blocks_size(), 4);
  const std::string victim = l->blocks(1).hash();
  Stop();

  // Garbage into the block's payload in its segment file.
  auto hash = BlockHash::FromRaw(victim);
  ASSERT_TRUE(hash.ok());
  std::mt19937_64 rng(99);
  testing::DamageDiskRecord(dir_ + "/rocksdb", *hash, [&](std::string* record) {
    for (size_t i = kDiskRecordHeaderBytes; i < record->size(); ++i) {
      (*record)[i] = static_cast<char>(rng());
    }
  });

  Restart();
  EXPECT_EQ(ReadBack(5, 4), 1u);  // the good first block; the garbage never comes back
  auto after = client_->Lookup("demo", "", Tokens(5, 64));
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->matched_tokens(), 16u);
  auto stats = client_->Stats();
  ASSERT_TRUE(stats.ok());
  const v1::TierStats* disk = Tier(*stats, v1::TIER_DISK);
  ASSERT_NE(disk, nullptr);
  EXPECT_EQ(disk->corrupt_blocks(), 1u);
  // Storing the prompt again heals it.
  ASSERT_TRUE(Put(5, 4).ok());
  EXPECT_EQ(ReadBack(5, 4), 4u);
}

TEST_F(PersistenceTest, CapacitiesHoldUnderTwiceTheLoad) {
  // 32 blocks fit the disk, 8 the host; 64 are written.
  Start({"--host_capacity=" + std::to_string(8 * KvShape::Of(Demo(), 1).BlockBytes()),
         "--disk_capacity=" + std::to_string(32 * KvShape::Of(Demo(), 1).BlockBytes())});
  for (uint64_t seed = 1; seed <= 32; ++seed) {
    ASSERT_TRUE(Put(seed, 2).ok()) << seed;
    auto s = client_->Stats();
    ASSERT_TRUE(s.ok());
    for (const auto& t : s->tiers()) {
      ASSERT_LE(t.bytes_used(), t.capacity_bytes()) << v1::Tier_Name(t.tier());
    }
  }
  // The newest prompts are whole; whatever is read is right.
  for (uint64_t seed = 1; seed <= 32; ++seed) {
    const uint32_t n = ReadBack(seed, 2);
    if (seed > 24) {
      EXPECT_EQ(n, 2u) << seed;
    }
  }
  Stop();
  Restart();
  auto s = client_->Stats();
  ASSERT_TRUE(s.ok());
  const v1::TierStats* disk = Tier(*s, v1::TIER_DISK);
  ASSERT_NE(disk, nullptr);
  EXPECT_LE(disk->bytes_used(), disk->capacity_bytes());
  EXPECT_GE(disk->blocks(), 16u);
  for (uint64_t seed = 25; seed <= 32; ++seed) EXPECT_EQ(ReadBack(seed, 2), 2u) << seed;
}

TEST_F(PersistenceTest, ConfigFileAndFlagsTogether) {
  // The file says a 1 MiB host tier and no disk; the command line turns the disk back on.
  const std::string config = dir_ + "/ropekvd.yaml";
  std::filesystem::create_directories(dir_);
  {
    std::ofstream f(config);
    f << "host:\n  capacity: 1MiB\ndisk:\n  enabled: false\n  durability: memory\n";
  }
  Start({"--config=" + config, "--disk_enabled=true"});
  auto s = client_->Stats();
  ASSERT_TRUE(s.ok());
  ASSERT_GE(s->tiers_size(), 2);  // host and disk (and GPU on a GPU machine)
  EXPECT_EQ(Tier(*s, v1::TIER_HOST)->capacity_bytes(), 1u << 20);
  EXPECT_NE(Tier(*s, v1::TIER_DISK), nullptr);
}

// A configuration written for the fixed GPU slots (gpu: slot_size, before 2026-11-27) still
// starts the daemon: the setting is accepted and ignored, with a warning.
TEST_F(PersistenceTest, AnOlderConfigWithTheGpuSlotSizeStillStarts) {
  const std::string config = dir_ + "/ropekvd.yaml";
  std::filesystem::create_directories(dir_);
  {
    std::ofstream f(config);
    f << "gpu:\n  slot_size: 2MiB\n  chunk_size: 32MiB\n";
  }
  Start({"--config=" + config});
  ASSERT_TRUE(client_->Stats().ok());
}

}  // namespace
}  // namespace ropekv
