// Retrieval through the real gRPC API: a ropekvd process on a free loopback port, the C++
// RetrievalClient, prefixes put with the KVCache client and sessions opened with the
// SessionClient. Selections are checked against fp64 top-k of the bytes the test sent.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "clients/cpp/client.h"
#include "clients/cpp/retrieval_client.h"
#include "clients/cpp/session_client.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"
#include "tests/integration/daemon.h"

namespace ropekv {
namespace {

using client::Client;
using client::KvShape;
using client::KvView;
using client::RetrievalClient;
using client::SelectArgs;
using client::SessionClient;

constexpr int kLayers = 2;
constexpr int kKvHeads = 2;
constexpr int kHeadDim = 64;
constexpr int kBlockTokens = 16;
constexpr int kQueryHeads = 4;

v1::ModelSpec Spec() {
  v1::ModelSpec s;
  s.set_layers(kLayers);
  s.set_kv_heads(kKvHeads);
  s.set_head_dim(kHeadDim);
  s.set_dtype(v1::DTYPE_BF16);
  s.set_block_tokens(kBlockTokens);
  s.mutable_rope()->set_theta(10000);
  return s;
}

// Block-layout bytes [block][layer][k|v][kv_head][token][head_dim], bf16.
size_t BlockIndex(int layer, int kv, int head, int64_t t, int c) {
  const int64_t b = t / kBlockTokens;
  return ((((static_cast<size_t>(b) * kLayers + layer) * 2 + kv) * kKvHeads + head) * kBlockTokens +
          t % kBlockTokens) *
             kHeadDim +
         c;
}

// Range-layout bytes [layer][k|v][kv_head][n][head_dim] (session Read).
size_t RangeIndex(int64_t n, int layer, int kv, int head, int64_t t, int c) {
  return ((((static_cast<size_t>(layer) * 2 + kv) * kKvHeads + head) * n + t) * kHeadDim) + c;
}

double At(const std::vector<uint8_t>& bytes, size_t i) {
  return LoadAsFloat(bytes.data(), i, DType::kBF16);
}

class RetrievalServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // Small chunks: gathered K/V span several messages. The checks below are against fp64
    // references at the CPU path's tolerances, so Select stays on the CPU on GPU hosts too
    // (tests/gpu/retrieval_gpu_test.cc checks the GPU path equals it).
    if (!device_.empty() && !GpuAvailable()) GTEST_SKIP() << "no CUDA device";
    daemon_ = std::make_unique<testing::Daemon>(std::vector<std::string>{
        "--chunk_size=5000", "--retrieval_threads=3",
        "--retrieval_device=" + (device_.empty() ? std::string("cpu") : device_)});
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    auto kv = Client::Connect(o);
    ASSERT_TRUE(kv.ok());
    kv_ = *std::move(kv);
    auto r = RetrievalClient::Connect(o);
    ASSERT_TRUE(r.ok());
    retrieval_ = *std::move(r);
    auto s = SessionClient::Connect(o);
    ASSERT_TRUE(s.ok());
    sessions_ = *std::move(s);
    ASSERT_TRUE(kv_->Health().ok());
    ASSERT_TRUE(kv_->RegisterModel(Spec(), "m").ok());
  }

  std::vector<uint8_t> RandomBlocks(int64_t blocks) {
    const size_t elems = KvShape::Of(Spec(), static_cast<uint32_t>(blocks)).Bytes() / 2;
    std::vector<uint8_t> out(elems * 2);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (size_t i = 0; i < elems; ++i) StoreFromFloat(out.data(), i, DType::kBF16, normal(rng_));
    return out;
  }

  std::vector<int32_t> Tokens(int64_t n) {
    std::vector<int32_t> t(n);
    for (auto& x : t) x = static_cast<int32_t>(rng_() % 30000);
    return t;
  }

  std::vector<float> Queries() {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(kQueryHeads * kHeadDim);
    for (float& x : q) x = normal(rng_);
    return q;
  }

  // Puts the blocks; returns the last block's hash.
  std::string Put(const std::vector<int32_t>& tokens, const std::vector<uint8_t>& blocks) {
    client::PutArgs a;
    a.model = "m";
    a.tokens = tokens;
    auto put =
        kv_->Put(a, KvView{blocks, KvShape::Of(Spec(), static_cast<uint32_t>(tokens.size() / 16))});
    EXPECT_TRUE(put.ok()) << put.status();
    return put.ok() && put->block_hashes_size() > 0
               ? put->block_hashes(put->block_hashes_size() - 1)
               : std::string();
  }

  // Checks row r of an EXACT kMax selection against fp64 scores of `key(layer, head, t, c)`.
  template <typename KeyFn>
  void CheckExactMax(const v1::SelectHeader& h, const std::vector<float>& q, int layer, int64_t k,
                     int64_t n_sink, int64_t n_local, KeyFn key) {
    const int64_t n = h.num_tokens();
    const int group = kQueryHeads / kKvHeads;
    ASSERT_EQ(h.rows_size(), kKvHeads);
    for (int g = 0; g < kKvHeads; ++g) {
      std::vector<double> score(n, -std::numeric_limits<double>::infinity());
      for (int j = 0; j < group; ++j) {
        const int qh = g * group + j;
        for (int64_t t = 0; t < n; ++t) {
          double acc = 0;
          for (int c = 0; c < kHeadDim; ++c)
            acc += double{q[qh * kHeadDim + c]} * key(layer, g, t, c);
          score[t] = std::max(score[t], acc);
        }
      }
      const auto& row = h.rows(g).indices();
      std::set<int64_t> got(row.begin(), row.end());
      ASSERT_EQ(got.size(), static_cast<size_t>(row.size()));
      ASSERT_TRUE(std::is_sorted(row.begin(), row.end()));
      double min_in = std::numeric_limits<double>::infinity();
      double max_out = -min_in;
      int64_t free_in = 0;
      for (int64_t t = 0; t < n; ++t) {
        const bool pinned = t < n_sink || t >= n - n_local;
        if (pinned) {
          EXPECT_TRUE(got.count(t)) << "pinned token " << t;
        } else if (got.count(t)) {
          ++free_in;
          min_in = std::min(min_in, score[t]);
        } else {
          max_out = std::max(max_out, score[t]);
        }
      }
      EXPECT_EQ(free_in, k);
      EXPECT_GE(min_in, max_out - 1e-6 * (1 + std::abs(max_out))) << "row " << g;
      if (h.rows(g).scores_size() > 0) {
        ASSERT_EQ(h.rows(g).scores_size(), row.size());
        for (int j = 0; j < row.size(); ++j) {
          EXPECT_NEAR(h.rows(g).scores(j), score[row[j]], 1e-4 * (1 + std::abs(score[row[j]])));
        }
      }
    }
  }

  // [k|v][rows][capacity][head_dim] gathered bytes vs `key(layer, kv, head, t, c)`.
  template <typename KvFn>
  void CheckGathered(const uint8_t* data, const v1::SelectHeader& h, int layer, KvFn kv_at) {
    const int64_t rows = h.rows_size();
    const int64_t cap = h.capacity();
    for (int kv = 0; kv < 2; ++kv) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < cap; ++j) {
          for (int c = 0; c < kHeadDim; ++c) {
            const size_t i = ((kv * rows + r) * cap + j) * kHeadDim + c;
            const double got = LoadAsFloat(data, i, DType::kBF16);
            const double want = j < h.rows(r).indices_size()
                                    ? kv_at(layer, kv, static_cast<int>(r * kKvHeads / rows),
                                            h.rows(r).indices(j), c)
                                    : 0.0;
            ASSERT_EQ(got, want) << "layer " << layer << " kv " << kv << " row " << r << " slot "
                                 << j;
          }
        }
      }
    }
  }

  // SelectBatch answers each item as Select would (bit for bit: both run on the same path), errors
  // included, in the order asked, rows packed where asked; its own bad requests get
  // INVALID_ARGUMENT.
  void CheckBatchAnswersEachItemAsSelect();

  std::string device_;  // --retrieval_device; empty: cpu
  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> kv_;
  std::unique_ptr<RetrievalClient> retrieval_;
  std::unique_ptr<SessionClient> sessions_;
  std::mt19937_64 rng_{0x5e1ec7};
};

TEST_F(RetrievalServiceTest, SelectGatherOverPrefix) {
  const std::vector<int32_t> tokens = Tokens(40 * kBlockTokens);
  const std::vector<uint8_t> blocks = RandomBlocks(40);
  const std::string last_block = Put(tokens, blocks);
  const std::vector<float> q = Queries();
  SelectArgs a;
  a.model = "m";
  a.tokens = tokens;
  a.tokens.push_back(1);  // past the cached blocks: selection over the 640 cached tokens
  a.layer = 1;
  a.query_heads = kQueryHeads;
  a.queries = client::F32Bytes(q);
  a.k = 50;
  a.n_sink = 4;
  a.n_local = 16;
  a.want_scores = true;
  a.want_mass = true;
  a.gather = true;
  a.keep = true;
  auto sel = retrieval_->Select(a);
  ASSERT_TRUE(sel.ok()) << sel.status();
  const v1::SelectHeader& h = sel->header;
  EXPECT_EQ(h.num_tokens(), 640);
  EXPECT_EQ(h.kv_heads(), static_cast<uint32_t>(kKvHeads));
  EXPECT_EQ(h.dtype(), v1::DTYPE_BF16);
  EXPECT_EQ(h.capacity(), 70u);
  ASSERT_EQ(h.mass_size(), kKvHeads);
  for (float m : h.mass()) {
    EXPECT_GT(m, 0.0f);
    EXPECT_LE(m, 1.0f + 1e-6f);
  }
  auto key = [&](int layer, int head, int64_t t, int c) {
    return At(blocks, BlockIndex(layer, 0, head, t, c));
  };
  CheckExactMax(h, q, 1, 50, 4, 16, key);
  // 2 x 2 rows x 70 x 64 x 2 bytes: several 5000-byte messages.
  ASSERT_EQ(sel->gathered.size(), 2u * 2 * 70 * 64 * 2);
  ASSERT_EQ(h.gathered_bytes(), sel->gathered.size());
  auto kv_at = [&](int layer, int kv, int head, int64_t t, int c) {
    return At(blocks, BlockIndex(layer, kv, head, t, c));
  };
  CheckGathered(sel->gathered.data(), h, 1, kv_at);

  // TidalDecode: the same tokens at the other layers, in the order asked.
  ASSERT_FALSE(h.selection_id().empty());
  auto g = retrieval_->Gather(h.selection_id(), {0, 1, 0});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->header.rows(), 2u);
  EXPECT_EQ(g->header.capacity(), 70u);
  ASSERT_EQ(g->header.layers_size(), 3);
  ASSERT_EQ(g->header.counts_size(), 2);
  EXPECT_EQ(g->header.counts(0), h.rows(0).indices_size());
  const uint64_t lb = g->header.layer_bytes();
  ASSERT_EQ(lb, sel->gathered.size());
  ASSERT_EQ(g->data.size(), 3 * lb);
  CheckGathered(g->data.data(), h, 0, kv_at);
  EXPECT_EQ(std::memcmp(g->data.data() + lb, sel->gathered.data(), lb), 0);
  CheckGathered(g->data.data() + 2 * lb, h, 0, kv_at);

  // The prefix named by its last block's hash (32 bytes instead of the tokens): the same answer.
  SelectArgs by_hash = a;
  by_hash.tokens.clear();
  by_hash.last_block = last_block;
  by_hash.keep = false;
  auto sel2 = retrieval_->Select(by_hash);
  ASSERT_TRUE(sel2.ok()) << sel2.status();
  EXPECT_EQ(sel2->header.num_tokens(), 640);
  ASSERT_EQ(sel2->header.rows_size(), h.rows_size());
  for (int r = 0; r < h.rows_size(); ++r) {
    EXPECT_TRUE(std::equal(h.rows(r).indices().begin(), h.rows(r).indices().end(),
                           sel2->header.rows(r).indices().begin(),
                           sel2->header.rows(r).indices().end()));
    EXPECT_TRUE(std::equal(h.rows(r).scores().begin(), h.rows(r).scores().end(),
                           sel2->header.rows(r).scores().begin(),
                           sel2->header.rows(r).scores().end()));
  }
  EXPECT_EQ(sel2->gathered, sel->gathered);

  auto stats = retrieval_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->selects(), 2u);
  EXPECT_EQ(stats->gathers(), 3u);
  EXPECT_EQ(stats->selections(), 1u);
  ASSERT_TRUE(retrieval_->Release(h.selection_id()).ok());
  EXPECT_EQ(retrieval_->Release(h.selection_id()).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(retrieval_->Gather(h.selection_id(), {0}).status().code(), absl::StatusCode::kNotFound);
}

// Page mode finds a planted needle's page; the metadata was built when the Put stored the blocks
// (every layer), so Select finds it in the store and builds none.
TEST_F(RetrievalServiceTest, BoundModeFindsNeedleAndKeepsMetadata) {
  const std::vector<int32_t> tokens = Tokens(64 * kBlockTokens);
  std::vector<uint8_t> blocks = RandomBlocks(64);
  const std::vector<float> q = Queries();
  const int64_t needle = 517;
  for (int c = 0; c < kHeadDim; ++c) {
    StoreFromFloat(blocks.data(), BlockIndex(0, 0, 1, needle, c), DType::kBF16,
                   4.0f * q[2 * kHeadDim + c]);  // query head 2 reads KV head 1
  }
  Put(tokens, blocks);
  SelectArgs a;
  a.model = "m";
  a.tokens = tokens;
  a.query_heads = kQueryHeads;
  a.queries = client::F32Bytes(q);
  a.k = 16;
  a.mode = v1::SELECT_MODE_BOUND;
  for (int round = 0; round < 2; ++round) {
    auto sel = retrieval_->Select(a);
    ASSERT_TRUE(sel.ok()) << sel.status();
    EXPECT_TRUE(sel->header.metadata_cached());
    const auto& row = sel->header.rows(1).indices();
    for (int64_t t = 512; t < 528; ++t) {
      EXPECT_TRUE(std::find(row.begin(), row.end(), t) != row.end()) << t;
    }
  }
  auto stats = retrieval_->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->metadata_builds(), 0u);
  EXPECT_EQ(stats->metadata_put_builds(), 64u * kLayers);  // all built when the Put stored them
  EXPECT_EQ(stats->gpu_selects(), 0u);                     // --retrieval_device=cpu
  EXPECT_EQ(stats->gpu_fallbacks(), 0u);
  EXPECT_EQ(stats->metadata_hits(), 2u * 64);
  EXPECT_EQ(stats->metadata_entries(), 64u * kLayers);
  // The entries, and the prefix view of the selected layer (~40 bytes a block).
  const uint64_t entry_bytes = 64u * kLayers * 2 * 128 * 2;
  EXPECT_GE(stats->metadata_bytes(), entry_bytes + 64 * 40);
  EXPECT_LE(stats->metadata_bytes(), entry_bytes + 64 * 40 + 256);

  a.mode = v1::SELECT_MODE_BOUND_THEN_EXACT;
  auto sel = retrieval_->Select(a);
  ASSERT_TRUE(sel.ok()) << sel.status();
  const auto& row = sel->header.rows(1).indices();
  EXPECT_TRUE(std::find(row.begin(), row.end(), needle) != row.end());
}

TEST_F(RetrievalServiceTest, SelectOverSession) {
  const int64_t n = 200;
  const std::vector<int32_t> tokens = Tokens(n);
  const std::vector<uint8_t> blocks = RandomBlocks((n + kBlockTokens - 1) / kBlockTokens);
  client::OpenArgs open;
  open.model = "m";
  open.tokens = tokens;
  auto opened = sessions_->Open(open, blocks);
  ASSERT_TRUE(opened.ok()) << opened.status();
  auto edit = sessions_->Edit(opened->session_id(), {client::DeleteOp(10, 20)});
  ASSERT_TRUE(edit.ok()) << edit.status();
  auto read = sessions_->Read(opened->session_id());
  ASSERT_TRUE(read.ok()) << read.status();
  const int64_t m = read->header.length();
  ASSERT_EQ(m, n - 10);

  const std::vector<float> q = Queries();
  SelectArgs a;
  a.session_id = opened->session_id();
  a.layer = 1;
  a.query_heads = kQueryHeads;
  a.queries = client::F32Bytes(q);
  a.k = 30;
  a.n_sink = 2;
  a.n_local = 8;
  a.want_scores = true;
  a.gather = true;
  a.keep = true;
  auto sel = retrieval_->Select(a);
  ASSERT_TRUE(sel.ok()) << sel.status();
  EXPECT_EQ(sel->header.num_tokens(), m);
  auto key = [&](int layer, int head, int64_t t, int c) {
    return At(read->data, RangeIndex(m, layer, 0, head, t, c));
  };
  CheckExactMax(sel->header, q, 1, 30, 2, 8, key);
  auto kv_at = [&](int layer, int kv, int head, int64_t t, int c) {
    return At(read->data, RangeIndex(m, layer, kv, head, t, c));
  };
  CheckGathered(sel->gathered.data(), sel->header, 1, kv_at);
  auto g = retrieval_->Gather(sel->header.selection_id(), {0});
  ASSERT_TRUE(g.ok()) << g.status();
  CheckGathered(g->data.data(), sel->header, 0, kv_at);
}

TEST_F(RetrievalServiceTest, ConcurrentSelectsAgree) {
  const std::vector<int32_t> tokens = Tokens(16 * kBlockTokens);
  Put(tokens, RandomBlocks(16));
  const std::vector<float> q = Queries();
  SelectArgs a;
  a.model = "m";
  a.tokens = tokens;
  a.query_heads = kQueryHeads;
  a.queries = client::F32Bytes(q);
  a.k = 20;
  a.mode = v1::SELECT_MODE_BOUND_THEN_EXACT;
  auto want = retrieval_->Select(a);
  ASSERT_TRUE(want.ok()) << want.status();
  std::vector<std::thread> threads;
  std::vector<int> mismatches(4, 0);
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      for (int j = 0; j < 5; ++j) {
        auto got = retrieval_->Select(a);
        if (!got.ok() ||
            got->header.rows(0).SerializeAsString() != want->header.rows(0).SerializeAsString() ||
            got->header.rows(1).SerializeAsString() != want->header.rows(1).SerializeAsString()) {
          ++mismatches[i];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) EXPECT_EQ(mismatches[i], 0) << "thread " << i;
}

// A header's rows, as indices and scores per row, from either form (rows or packed).
struct Rows {
  std::vector<std::vector<int32_t>> indices;
  std::vector<std::vector<float>> scores;
};

Rows RowsOf(const v1::SelectHeader& h) {
  Rows out;
  if (!h.has_packed()) {
    for (const v1::SelectedRow& r : h.rows()) {
      out.indices.emplace_back(r.indices().begin(), r.indices().end());
      out.scores.emplace_back(r.scores().begin(), r.scores().end());
    }
    return out;
  }
  EXPECT_EQ(h.rows_size(), 0);
  const v1::PackedRows& p = h.packed();
  const size_t rows = p.counts().size() / 4, cap = h.capacity();
  EXPECT_EQ(p.indices().size(), rows * cap * 4);
  EXPECT_TRUE(p.scores().empty() || p.scores().size() == rows * cap * 4);
  for (size_t r = 0; r < rows; ++r) {
    int32_t count = 0;
    std::memcpy(&count, p.counts().data() + r * 4, 4);
    std::vector<int32_t> idx(cap);
    std::memcpy(idx.data(), p.indices().data() + r * cap * 4, cap * 4);
    for (size_t j = count; j < cap; ++j) EXPECT_EQ(idx[j], -1) << "row " << r << " slot " << j;
    idx.resize(count);
    out.indices.push_back(std::move(idx));
    std::vector<float> sc;
    if (!p.scores().empty()) {
      sc.resize(count);
      std::memcpy(sc.data(), p.scores().data() + r * cap * 4, count * 4);
    }
    out.scores.push_back(std::move(sc));
  }
  return out;
}

TEST_F(RetrievalServiceTest, SelectBatchAnswersEachItemAsSelect) {
  CheckBatchAnswersEachItemAsSelect();
}

// The same through a daemon that selects on the GPU: its jobs prepare the items, one GPU pass
// scores them all (RetrievalStore::Run).
class RetrievalServiceGpuTest : public RetrievalServiceTest {
 protected:
  void SetUp() override {
    device_ = "gpu";
    RetrievalServiceTest::SetUp();
  }
};

TEST_F(RetrievalServiceGpuTest, OnePassBatchAnswersEachItemAsSelect) {
  CheckBatchAnswersEachItemAsSelect();
  auto stats = retrieval_->Stats();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_GT(stats->gpu_selects(), 1000u);
  EXPECT_EQ(stats->gpu_fallbacks(), 0u);
}

// Packed rows (Select and SelectBatch) hold what the rows form holds.
TEST_F(RetrievalServiceTest, PackedRowsEqualTheRows) {
  const std::vector<int32_t> tokens = Tokens(9 * kBlockTokens);
  Put(tokens, RandomBlocks(9));
  for (bool scores : {false, true}) {
    for (auto reduction : {v1::GQA_REDUCTION_MAX, v1::GQA_REDUCTION_PER_QUERY_HEAD}) {
      SelectArgs a;
      a.model = "m";
      a.tokens = tokens;
      a.layer = 1;
      a.query_heads = kQueryHeads;
      a.queries = client::F32Bytes(Queries());
      a.k = 300;  // more than the 144 tokens: rows shorter than the capacity
      a.n_sink = 1;
      a.reduction = reduction;
      a.want_scores = scores;
      auto want = retrieval_->Select(a);
      ASSERT_TRUE(want.ok()) << want.status();
      a.packed_rows = true;
      auto got = retrieval_->Select(a);
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_TRUE(got->header.has_packed());
      auto batch = retrieval_->SelectBatch({a});
      ASSERT_TRUE(batch.ok()) << batch.status();
      const Rows w = RowsOf(want->header);
      ASSERT_EQ(w.indices.size(), reduction == v1::GQA_REDUCTION_MAX ? kKvHeads : kQueryHeads);
      EXPECT_EQ(w.indices[0].size(), 144u);
      for (const v1::SelectHeader* h : {&got->header, &(*batch)[0].header}) {
        const Rows g = RowsOf(*h);
        EXPECT_EQ(g.indices, w.indices);
        EXPECT_EQ(g.scores, w.scores);
        EXPECT_EQ(h->capacity(), want->header.capacity());
      }
    }
  }
}

void RetrievalServiceTest::CheckBatchAnswersEachItemAsSelect() {
  const std::vector<int32_t> tokens_a = Tokens(12 * kBlockTokens);
  const std::vector<int32_t> tokens_b = Tokens(20 * kBlockTokens);
  Put(tokens_a, RandomBlocks(12));
  const std::string last_b = Put(tokens_b, RandomBlocks(20));
  std::vector<SelectArgs> items;
  auto item = [&](const std::vector<int32_t>& tokens, v1::SelectMode mode, int64_t k) {
    SelectArgs a;
    a.model = "m";
    a.tokens = tokens;
    a.layer = static_cast<int32_t>(items.size() % kLayers);
    a.query_heads = kQueryHeads;
    a.queries = client::F32Bytes(Queries());
    a.k = k;
    a.mode = mode;
    a.n_sink = 2;
    a.n_local = 8;
    items.push_back(a);
    return &items.back();
  };
  item(tokens_a, v1::SELECT_MODE_EXACT, 20);
  item(tokens_b, v1::SELECT_MODE_BOUND_THEN_EXACT, 16)->keep = true;
  item(tokens_a, v1::SELECT_MODE_EXACT, 8)->model = "unknown";  // NOT_FOUND
  SelectArgs* by_hash = item({}, v1::SELECT_MODE_EXACT, 30);
  by_hash->last_block = last_b;
  by_hash->want_scores = true;
  by_hash->reduction = v1::GQA_REDUCTION_PER_QUERY_HEAD;
  std::vector<float> nan = Queries();
  nan[3] = std::numeric_limits<float>::quiet_NaN();
  item(tokens_b, v1::SELECT_MODE_BOUND, 32)->queries = client::F32Bytes(nan);  // INVALID_ARGUMENT
  item(tokens_b, v1::SELECT_MODE_BOUND, 32)->want_mass = true;
  // More items than the service's 3 threads, each its own queries, some rows packed.
  for (int i = 0; i < 40; ++i) {
    item(i % 2 ? tokens_a : tokens_b, v1::SELECT_MODE_EXACT, 5 + i)->packed_rows = i % 3 == 0;
  }

  auto batch = retrieval_->SelectBatch(items);
  ASSERT_TRUE(batch.ok()) << batch.status();
  ASSERT_EQ(batch->size(), items.size());
  EXPECT_EQ((*batch)[2].status.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*batch)[4].status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE((*batch)[4].status.message().find("NaN"), absl::string_view::npos)
      << (*batch)[4].status;
  for (size_t i = 0; i < items.size(); ++i) {
    SelectArgs alone = items[i];
    alone.keep = false;
    alone.packed_rows = false;
    auto want = retrieval_->Select(alone);
    const client::BatchSelection& got = (*batch)[i];
    ASSERT_EQ(got.status.code(), want.status().code()) << "item " << i << ": " << got.status;
    if (!want.ok()) continue;
    const v1::SelectHeader& h = got.header;
    EXPECT_EQ(h.num_tokens(), want->header.num_tokens()) << "item " << i;
    EXPECT_EQ(h.gathered_bytes(), 0u);
    EXPECT_EQ(h.has_packed(), items[i].packed_rows) << "item " << i;
    const Rows g = RowsOf(h), w = RowsOf(want->header);
    EXPECT_EQ(g.indices, w.indices) << "item " << i;
    EXPECT_EQ(g.scores, w.scores) << "item " << i;
    EXPECT_EQ(h.mass_size(), items[i].want_mass ? kKvHeads : 0) << "item " << i;
    EXPECT_EQ(h.selection_id().empty(), !items[i].keep) << "item " << i;
  }
  EXPECT_EQ((*batch)[3].header.rows_size(), kQueryHeads);
  EXPECT_EQ((*batch)[3].header.rows(0).scores_size(), (*batch)[3].header.rows(0).indices_size());
  // The kept item gathers like any kept selection.
  auto g = retrieval_->Gather((*batch)[1].header.selection_id(), {0, 1});
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->header.counts(0), (*batch)[1].header.rows(0).indices_size());

  // The call's own errors.
  auto code = [&](const std::vector<SelectArgs>& v) {
    return retrieval_->SelectBatch(v).status().code();
  };
  EXPECT_EQ(code({}), absl::StatusCode::kInvalidArgument);
  std::vector<SelectArgs> gather = {items[0], items[1]};
  gather[1].gather = true;
  EXPECT_EQ(code(gather), absl::StatusCode::kInvalidArgument);
  SelectArgs light = items[0];
  light.tokens.clear();
  light.last_block = last_b;
  EXPECT_EQ(code(std::vector<SelectArgs>(1025, light)), absl::StatusCode::kInvalidArgument);
  auto full = retrieval_->SelectBatch(std::vector<SelectArgs>(1024, light));
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->size(), 1024u);
  EXPECT_TRUE(full->back().status.ok()) << full->back().status;
}

// An answer over the daemon's message size is RESOURCE_EXHAUSTED, not a broken stream; the
// daemon stops selecting (or, on the GPU, preparing) once the answers pass it.
void CheckAnswerOverTheMessageSize(const std::string& device) {
  testing::Daemon daemon(
      {"--max_message_size=128KiB", "--chunk_size=16KiB", "--retrieval_device=" + device});
  ASSERT_TRUE(daemon.running());
  Client::Options o;
  o.address = daemon.address();
  o.chunk_bytes = 16 << 10;  // the Put in messages under the daemon's limit
  auto kv = Client::Connect(o);
  ASSERT_TRUE(kv.ok());
  auto retrieval = RetrievalClient::Connect(o);
  ASSERT_TRUE(retrieval.ok());
  ASSERT_TRUE((*kv)->RegisterModel(Spec(), "m").ok());
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> blocks(KvShape::Of(Spec(), 16).Bytes());
  for (size_t i = 0; i < blocks.size() / 2; ++i) {
    StoreFromFloat(blocks.data(), i, DType::kBF16, normal(rng));
  }
  client::PutArgs put;
  put.model = "m";
  for (int t = 0; t < 16 * kBlockTokens; ++t) put.tokens.push_back(t);
  auto stored = (*kv)->Put(put, KvView{blocks, KvShape::Of(Spec(), 16)});
  ASSERT_TRUE(stored.ok()) << stored.status();
  std::vector<float> q(kQueryHeads * kHeadDim);
  for (float& x : q) x = normal(rng);
  SelectArgs a;
  a.model = "m";
  a.last_block = stored->block_hashes(stored->block_hashes_size() - 1);
  a.query_heads = kQueryHeads;
  a.queries = client::F32Bytes(q);
  a.k = 200;
  a.want_scores = true;
  // ~2.4 KB an answer: 32 fit in 128 KiB, 64 do not.
  auto fit = (*retrieval)->SelectBatch(std::vector<SelectArgs>(32, a));
  ASSERT_TRUE(fit.ok()) << fit.status();
  EXPECT_TRUE(fit->back().status.ok()) << fit->back().status;
  auto over = (*retrieval)->SelectBatch(std::vector<SelectArgs>(64, a));
  EXPECT_EQ(over.status().code(), absl::StatusCode::kResourceExhausted) << over.status();
  EXPECT_NE(over.status().message().find("split the batch"), absl::string_view::npos);
  // It stopped selecting once its answers passed the size (about 54 of the 64 fit; on the GPU none
  // of them ran).
  auto stats = (*retrieval)->Stats();
  ASSERT_TRUE(stats.ok());
  EXPECT_LT(stats->selects(), 32u + 64u);
}

TEST(RetrievalBatchLimitTest, AnswerOverTheMessageSizeIsResourceExhausted) {
  CheckAnswerOverTheMessageSize("cpu");
}

TEST(RetrievalServiceGpuLimitTest, AnswerOverTheMessageSizeIsResourceExhausted) {
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  CheckAnswerOverTheMessageSize("gpu");
}

TEST_F(RetrievalServiceTest, BadRequestsGetTheRightCodes) {
  const std::vector<int32_t> tokens = Tokens(4 * kBlockTokens);
  Put(tokens, RandomBlocks(4));
  std::vector<float> q = Queries();
  SelectArgs good;
  good.model = "m";
  good.tokens = tokens;
  good.query_heads = kQueryHeads;
  good.queries = client::F32Bytes(q);
  good.k = 8;
  ASSERT_TRUE(retrieval_->Select(good).ok());
  auto code = [&](const SelectArgs& a) { return retrieval_->Select(a).status().code(); };

  SelectArgs a = good;
  a.model = "unknown";
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);
  a = good;
  a.tokens = Tokens(64);
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);
  a = good;
  a.session_id = "no-such-session";
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);
  a = good;
  a.last_block = std::string(32, '\x01');  // with tokens
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a.tokens.clear();
  EXPECT_EQ(code(a), absl::StatusCode::kNotFound);  // no such block
  a.last_block = "short";
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.layer = kLayers;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.layer = -1;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.k = 0;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.queries.pop_back();
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  a = good;
  a.query_heads = 3;
  EXPECT_EQ(code(a), absl::StatusCode::kInvalidArgument);
  q[5] = std::numeric_limits<float>::quiet_NaN();
  a = good;
  a.queries = client::F32Bytes(q);
  auto nan = retrieval_->Select(a);
  EXPECT_EQ(nan.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(nan.status().message().find("NaN"), absl::string_view::npos) << nan.status();

  v1::SelectRequest raw = client::ToRequest(good);
  raw.clear_source();
  EXPECT_EQ(retrieval_->Select(raw).status().code(), absl::StatusCode::kInvalidArgument);
  raw = client::ToRequest(good);
  raw.set_mode(static_cast<v1::SelectMode>(7));
  EXPECT_EQ(retrieval_->Select(raw).status().code(), absl::StatusCode::kInvalidArgument);
  raw = client::ToRequest(good);
  raw.set_query_dtype(static_cast<v1::DType>(9));
  EXPECT_EQ(retrieval_->Select(raw).status().code(), absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(retrieval_->Gather("sel-unknown", {0}).status().code(), absl::StatusCode::kNotFound);
  a = good;
  a.keep = true;
  auto kept = retrieval_->Select(a);
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ(retrieval_->Gather(kept->header.selection_id(), {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(retrieval_->Gather(kept->header.selection_id(), {0, kLayers}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Evicted blocks: the selection cannot be gathered any more.
  ASSERT_TRUE(kv_->Evict("m", "", tokens).ok());
  EXPECT_EQ(retrieval_->Gather(kept->header.selection_id(), {1}).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(code(good), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ropekv
