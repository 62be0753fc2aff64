// Tests of cache/session.h: the piece list, the session store, and PIE edits checked against a
// tiny reference transformer (tests/unit/cache/tiny_transformer.h).
#include "cache/session.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/kv_cache.h"
#include "tests/unit/cache/tiny_transformer.h"

namespace ropekv {
namespace {

using ::ropekv::testing::SliceTokens;
using ::ropekv::testing::TinyConfig;
using ::ropekv::testing::TinyTransformer;
using ::ropekv::testing::ToBlocks;
using ::testing::ElementsAre;

std::string AsString(const std::vector<uint8_t>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size());
}

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, int64_t n) {
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 1000);
  return t;
}

// Random finite KV of n tokens in range layout.
std::vector<uint8_t> RandomKv(const ModelSpec& spec, int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t elems = RangeBytes(spec, n) / DTypeSize(spec.dtype);
  std::vector<uint8_t> out(RangeBytes(spec, n));
  for (size_t i = 0; i < elems; ++i) StoreFromFloat(out.data(), i, spec.dtype, normal(rng));
  return out;
}

// ----------------------------------------------------------------------------------------------
// The expected document: for each token, where its KV came from (a buffer in range layout, the
// token index there, the position its key was rotated at). The expected read of a token is ONE
// RerotateCopyCpu from that stored copy to the token's position: what "never chained" means.
struct Origin {
  const std::vector<uint8_t>* kv = nullptr;
  int64_t n = 0;  // tokens of *kv
  int64_t index = 0;
  int64_t rotated_at = 0;
};

class Shadow {
 public:
  Shadow(ModelSpec spec, int64_t base) : spec_(std::move(spec)), base_(base) {}

  // Takes KV of n tokens in range layout; token i rotated at rotated_at + i.
  void Open(std::vector<uint8_t> kv, int64_t n, int64_t rotated_at) {
    const std::vector<uint8_t>* p = Keep(std::move(kv));
    doc_.clear();
    for (int64_t i = 0; i < n; ++i) doc_.push_back(Origin{p, n, i, rotated_at + i});
  }
  void Edit(const std::vector<EditOp>& ops) {
    int64_t delta = 0;
    for (const EditOp& op : ops) {
      const int64_t s = op.start + delta;
      doc_.erase(doc_.begin() + s, doc_.begin() + op.end + delta);
      doc_.insert(doc_.begin() + s, op.tokens.size(), Origin{});
      delta += static_cast<int64_t>(op.tokens.size()) - (op.end - op.start);
    }
  }
  void Fill(TokenRange r, std::vector<uint8_t> kv) {
    const std::vector<uint8_t>* p = Keep(std::move(kv));
    for (int64_t i = r.start; i < r.end; ++i) {
      doc_[i] = Origin{p, r.size(), i - r.start, base_ + i};
    }
  }
  int64_t length() const { return static_cast<int64_t>(doc_.size()); }

  // Expected KV of [a, b) in range layout.
  std::vector<uint8_t> Expected(int64_t a, int64_t b) const {
    std::vector<uint8_t> out(RangeBytes(spec_, b - a), 0xFF);
    std::vector<RerotateCopy> jobs;
    for (int64_t i = a; i < b; ++i) {
      const Origin& o = doc_[i];
      RerotateCopy j;
      j.src = o.kv->data();
      j.src_strides = RangeStrides(spec_, o.n);
      j.src_token = o.index;
      j.dst = out.data();
      j.dst_strides = RangeStrides(spec_, b - a);
      j.dst_token = i - a;
      j.n_tokens = 1;
      j.from_pos = o.rotated_at;
      j.to_pos = base_ + i;
      jobs.push_back(j);
    }
    EXPECT_TRUE(RerotateCopyCpu(spec_.rope, BlockGeometry(spec_), jobs).ok());
    return out;
  }

 private:
  const std::vector<uint8_t>* Keep(std::vector<uint8_t> kv) {
    buffers_.push_back(std::move(kv));
    return &buffers_.back();
  }
  ModelSpec spec_;
  int64_t base_;
  std::deque<std::vector<uint8_t>> buffers_;
  std::vector<Origin> doc_;
};

// Worst error of layer `layer`'s keys of `got` against `want` (both range layout, n tokens), in
// ulps of the storage type of the pair's larger element (NeoX pairs (k, k + D/2)), as the rope
// tests measure it.
double WorstKeyUlp(const ModelSpec& spec, const std::vector<uint8_t>& got,
                   const std::vector<uint8_t>& want, int64_t n, int layer) {
  const int D = spec.head_dim;
  double worst = 0;
  for (int h = 0; h < spec.kv_heads; ++h) {
    for (int64_t t = 0; t < n; ++t) {
      const size_t row = ((static_cast<size_t>(layer) * 2 * spec.kv_heads + h) * n + t) * D;
      for (int k = 0; k < D / 2; ++k) {
        const double g1 = LoadAsFloat(got.data(), row + k, spec.dtype);
        const double g2 = LoadAsFloat(got.data(), row + k + D / 2, spec.dtype);
        const double w1 = LoadAsFloat(want.data(), row + k, spec.dtype);
        const double w2 = LoadAsFloat(want.data(), row + k + D / 2, spec.dtype);
        const double ulp = UlpOf(
            spec.dtype, std::max({std::fabs(g1), std::fabs(g2), std::fabs(w1), std::fabs(w2)}));
        if (!std::isfinite(g1) || !std::isfinite(g2)) return INFINITY;
        worst = std::max(worst, std::max(std::fabs(g1 - w1), std::fabs(g2 - w2)) / ulp);
      }
    }
  }
  return worst;
}

// Layer `layer`'s values of got and want are bit-identical.
bool ValuesEqual(const ModelSpec& spec, const std::vector<uint8_t>& got,
                 const std::vector<uint8_t>& want, int64_t n, int layer) {
  const size_t bytes =
      static_cast<size_t>(spec.kv_heads) * n * spec.head_dim * DTypeSize(spec.dtype);
  const size_t off = (static_cast<size_t>(layer) * 2 + 1) * bytes;
  return std::memcmp(got.data() + off, want.data() + off, bytes) == 0;
}

// ----------------------------------------------------------------------------------------------
// PieceList

std::shared_ptr<const KvChunk> FakeChunk() {
  auto c = std::make_shared<KvChunk>();
  c->tokens = 16;
  return c;
}

TEST(PieceListTest, SplitSpliceMergeAndCover) {
  auto c = FakeChunk();
  PieceList list({Piece{c, 0, 8, 100, 0}, Piece{c, 8, 8, 108, 0}});
  // The two pieces continue each other (same chunk, offsets and rotation): merged into one.
  ASSERT_EQ(list.pieces().size(), 1u);
  EXPECT_EQ(list.length(), 16);
  list.Splice(TokenRange{4, 6}, {Piece{nullptr, 0, 3, 0, 0}});
  EXPECT_EQ(list.length(), 17);
  ASSERT_EQ(list.pieces().size(), 3u);
  EXPECT_EQ(list.pieces()[0].tokens, 4);
  EXPECT_TRUE(list.pieces()[1].hole());
  EXPECT_EQ(list.pieces()[2].offset, 6);
  EXPECT_EQ(list.pieces()[2].rotated_at, 106);  // rotation of its first key, unchanged by the edit
  EXPECT_THAT(list.Holes(), ElementsAre(TokenRange{4, 7}));
  std::vector<Piece> cover = list.Cover(TokenRange{2, 9});
  ASSERT_EQ(cover.size(), 3u);
  EXPECT_EQ(cover[0].offset, 2);
  EXPECT_EQ(cover[0].rotated_at, 102);
  EXPECT_EQ(cover[0].tokens, 2);
  EXPECT_EQ(cover[2].offset, 6);
  EXPECT_EQ(cover[2].tokens, 2);
  // Removing the hole again rejoins the chunk: offsets 0..3 and 6.. do not continue (4, 5 are
  // gone), so two pieces remain.
  list.Splice(TokenRange{4, 7}, {});
  EXPECT_EQ(list.length(), 14);
  EXPECT_EQ(list.pieces().size(), 2u);
  EXPECT_TRUE(list.Holes().empty());
}

TEST(PieceListTest, ApplyEditUsesCumulativeDelta) {
  auto c = FakeChunk();
  PieceList list({Piece{c, 0, 12, 0, 0}});
  const std::vector<EditOp> ops = {EditOp::Insert(2, {1, 2, 3}), EditOp::Delete(5, 7),
                                   EditOp::Replace(8, 10, {9})};
  int64_t new_length = 0;
  ASSERT_TRUE(PieceList::ValidateEdit(12, ops, &new_length).ok());
  EXPECT_EQ(new_length, 12 + 3 - 2 - 1);
  std::vector<int64_t> ends;
  std::vector<TokenRange> inserted = list.ApplyEdit(ops, &ends);
  EXPECT_EQ(list.length(), new_length);
  // Insert at 2 -> [2, 5); delete [5, 7) + 3 -> [8, 10) gone; replace [8, 10) + 1 -> [9, 11)
  // replaced by one token at 9.
  EXPECT_THAT(inserted, ElementsAre(TokenRange{2, 5}, TokenRange{9, 10}));
  EXPECT_THAT(ends, ElementsAre(5, 8, 10));
  EXPECT_THAT(list.Holes(), ElementsAre(TokenRange{2, 5}, TokenRange{9, 10}));
  // Old token 10 (rotated at 10) is now at 10; old token 7 (rotated at 7) at 8.
  std::vector<Piece> at8 = list.Cover(TokenRange{8, 9});
  ASSERT_EQ(at8.size(), 1u);
  EXPECT_EQ(at8[0].rotated_at, 7);
  std::vector<Piece> at10 = list.Cover(TokenRange{10, 11});
  EXPECT_EQ(at10[0].rotated_at, 10);
}

TEST(PieceListTest, ValidateEditRejectsBadOps) {
  struct Case {
    std::vector<EditOp> ops;
    const char* message;
  } cases[] = {
      {{EditOp::Insert(11, {1})}, "past the length 10"},
      {{EditOp::Delete(3, 11)}, "past the length 10"},
      {{EditOp::Delete(-1, 2)}, "0 <= start <= end"},
      {{EditOp::Replace(5, 4, {1})}, "0 <= start <= end"},
      {{EditOp::Delete(2, 6), EditOp::Insert(5, {1})}, "must not overlap"},
      {{EditOp::Delete(6, 8), EditOp::Delete(1, 2)}, "must not overlap"},
      {{EditOp{EditOp::Kind::kInsert, 2, 3, {1}}}, "end == start"},
      {{EditOp{EditOp::Kind::kDelete, 2, 3, {1}}}, "carries no tokens"},
  };
  for (const Case& c : cases) {
    absl::Status s = PieceList::ValidateEdit(10, c.ops);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr(c.message));
  }
  // Touching ops are fine, and so are two inserts at one place.
  EXPECT_TRUE(PieceList::ValidateEdit(10, {EditOp::Delete(2, 4), EditOp::Insert(4, {1}),
                                           EditOp::Insert(4, {2}), EditOp::Replace(4, 10, {})})
                  .ok());
}

// ----------------------------------------------------------------------------------------------
// SessionStore over random KV (no model semantics).

class SessionStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    spec_.layers = 2;
    spec_.kv_heads = 2;
    spec_.head_dim = 16;
    spec_.dtype = DType::kBF16;
    spec_.block_tokens = 4;
    spec_.rope.head_dim = 16;
    spec_.rope.theta = 10000;
    auto cache = KvCache::Create(KvCache::Options());
    ASSERT_TRUE(cache.ok());
    cache_ = *std::move(cache);
    auto reg = cache_->RegisterModel(spec_, "m");
    ASSERT_TRUE(reg.ok()) << reg.status();
    model_ = reg->id;
    MakeStore(SessionStore::Options());
  }

  void MakeStore(SessionStore::Options options) {
    options.now = [this] { return now_; };
    auto store = SessionStore::Create(cache_.get(), std::move(options));
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  // Opens a session over n random tokens with random KV rotated at `rotated_at`.
  std::string OpenRandom(int64_t n, Shadow* shadow, int64_t base = 0, int64_t rotated_at = 0) {
    std::vector<uint8_t> kv = RandomKv(spec_, n, rng_);
    OpenSessionArgs args;
    args.model = "m";
    args.tokens = RandomTokens(rng_, n);
    args.base_position = base;
    args.rotated_at = rotated_at;
    auto r = store_->Open(args, AsString(ToBlocks(spec_, kv, n)));
    EXPECT_TRUE(r.ok()) << r.status();
    if (shadow != nullptr) shadow->Open(kv, n, rotated_at);
    return r.ok() ? r->id : "";
  }

  absl::StatusOr<std::vector<uint8_t>> ReadAll(const std::string& id,
                                               std::optional<TokenRange> range = std::nullopt) {
    auto reader = store_->Read(id, range);
    if (!reader.ok()) return reader.status();
    std::vector<uint8_t> out(reader->bytes(), 0xFF);  // poisoned: an unwritten byte shows
    if (auto s = reader->WriteAll(out.data()); !s.ok()) return s;
    return out;
  }

  // Edits session and shadow alike and fills every range to fill with random KV.
  EditResult EditAndFill(const std::string& id, Shadow* shadow, const std::vector<EditOp>& ops,
                         const EditOptions& options = {}) {
    auto r = store_->Edit(id, ops, options);
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok()) return {};
    shadow->Edit(ops);
    for (const TokenRange& f : r->fill) {
      std::vector<uint8_t> kv = RandomKv(spec_, f.size(), rng_);
      FillArgs fa;
      fa.range = f;
      auto fr = store_->Fill(id, fa, AsString(kv));
      EXPECT_TRUE(fr.ok()) << fr.status();
      shadow->Fill(f, kv);
    }
    return *r;
  }

  void ExpectMatchesShadow(const std::string& id, const Shadow& shadow) {
    auto got = ReadAll(id);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(*got == shadow.Expected(0, shadow.length())) << "session differs from one rotation";
  }

  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  ModelId model_;
  std::unique_ptr<SessionStore> store_;
  absl::Time now_ = absl::FromUnixSeconds(1000000);
  std::mt19937_64 rng_{0x5e55};
};

TEST_F(SessionStoreTest, OpenThenReadReturnsTheKvBitForBit) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(13, &shadow);  // 4 blocks, the last one with 1 token
  auto kv = ReadAll(id);
  ASSERT_TRUE(kv.ok()) << kv.status();
  EXPECT_TRUE(*kv == shadow.Expected(0, 13));
  auto part = ReadAll(id, TokenRange{3, 9});
  ASSERT_TRUE(part.ok());
  EXPECT_TRUE(*part == shadow.Expected(3, 9));
  auto info = store_->Info(id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->length, 13);
  EXPECT_EQ(info->model, model_);
  EXPECT_EQ(info->stored_bytes, 4 * BlockBytes(spec_));
  EXPECT_EQ(store_->bytes_used(), 4 * BlockBytes(spec_));
}

TEST_F(SessionStoreTest, WritersTakeBytesInPiecesOfAnySize) {
  const int64_t n = 11;
  std::vector<uint8_t> kv = RandomKv(spec_, n, rng_);
  const std::string blocks = AsString(ToBlocks(spec_, kv, n));
  OpenSessionArgs args;
  args.model = model_;
  args.tokens = RandomTokens(rng_, n);
  auto w = store_->BeginOpen(args);
  ASSERT_TRUE(w.ok());
  for (size_t o = 0; o < blocks.size();) {
    const size_t k = std::min<size_t>(blocks.size() - o, 1 + rng_() % 300);
    ASSERT_TRUE((*w)->Write(absl::string_view(blocks).substr(o, k)).ok());
    o += k;
  }
  auto opened = (*w)->Finish();
  ASSERT_TRUE(opened.ok()) << opened.status();

  // Fill [2, 9) in odd pieces (range layout: pieces straddle rows and blocks).
  ASSERT_TRUE(store_->Edit(opened->id, {}, {.stale = {TokenRange{2, 9}}}).ok());
  std::vector<uint8_t> fill = RandomKv(spec_, 7, rng_);
  const std::string fs = AsString(fill);
  FillArgs fa;
  fa.range = TokenRange{2, 9};
  auto fw = store_->BeginFill(opened->id, fa);
  ASSERT_TRUE(fw.ok()) << fw.status();
  for (size_t o = 0; o < fs.size();) {
    const size_t k = std::min<size_t>(fs.size() - o, 1 + rng_() % 100);
    ASSERT_TRUE((*fw)->Write(absl::string_view(fs).substr(o, k)).ok());
    o += k;
  }
  ASSERT_TRUE((*fw)->Finish().ok());
  Shadow shadow(spec_, 0);
  shadow.Open(kv, n, 0);
  shadow.Fill(TokenRange{2, 9}, fill);
  ExpectMatchesShadow(opened->id, shadow);
}

TEST_F(SessionStoreTest, WriterSizeErrors) {
  OpenSessionArgs args;
  args.model = model_;
  args.tokens = RandomTokens(rng_, 5);
  auto w = store_->BeginOpen(args);
  ASSERT_TRUE(w.ok());
  EXPECT_EQ((*w)->expected_bytes(), 2 * BlockBytes(spec_));
  ASSERT_TRUE((*w)->Write(std::string(BlockBytes(spec_), '\0')).ok());
  EXPECT_EQ((*w)->Finish().status().code(), absl::StatusCode::kInvalidArgument);  // short
  auto w2 = store_->BeginOpen(args);
  ASSERT_TRUE(w2.ok());
  absl::Status over = (*w2)->Write(std::string(2 * BlockBytes(spec_) + 1, '\0'));
  EXPECT_EQ(over.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(over.message()), ::testing::HasSubstr("bytes, got at least"));
  EXPECT_EQ((*w2)->Finish().status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->sessions(), 0u);
  w->reset();
  w2->reset();
  EXPECT_EQ(store_->bytes_used(), 0u);  // abandoned writers give their blocks back
}

TEST_F(SessionStoreTest, ReadOfTokensAwaitingFillFailsUntilFilled) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(10, &shadow);
  auto e = store_->Edit(id, {EditOp::Insert(4, {7, 7, 7})});
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->length, 13);
  EXPECT_THAT(e->fill, ElementsAre(TokenRange{4, 7}));
  auto r = store_->Read(id, std::nullopt);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(r.status().message()), ::testing::HasSubstr("[4, 7) await Fill"));
  // Ranges without the hole read fine (the prefix, and the shifted suffix).
  shadow.Edit({EditOp::Insert(4, {7, 7, 7})});
  auto suffix = ReadAll(id, TokenRange{7, 13});
  ASSERT_TRUE(suffix.ok());
  EXPECT_TRUE(*suffix == shadow.Expected(7, 13));
  std::vector<uint8_t> kv = RandomKv(spec_, 3, rng_);
  FillArgs fa;
  fa.range = TokenRange{4, 7};
  auto f = store_->Fill(id, fa, AsString(kv));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE(f->fill.empty());
  shadow.Fill(TokenRange{4, 7}, kv);
  ExpectMatchesShadow(id, shadow);
}

TEST_F(SessionStoreTest, WriteLayerConcatenatesToWriteAll) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(21, &shadow);
  EditAndFill(id, &shadow, {EditOp::Replace(3, 5, {1, 2, 3, 4, 5}), EditOp::Delete(9, 12)});
  auto reader = store_->Read(id, TokenRange{1, 20});
  ASSERT_TRUE(reader.ok());
  std::vector<uint8_t> layers(reader->bytes(), 0xFF);
  for (int l = 0; l < reader->layers(); ++l) {
    ASSERT_TRUE(reader->WriteLayer(l, layers.data() + l * reader->layer_bytes()).ok());
  }
  EXPECT_TRUE(layers == shadow.Expected(1, 20));
  // keys_only: the layer's key plane (its first half) as above, nothing past it written.
  const size_t plane = reader->layer_bytes() / 2;
  for (int l = 0; l < reader->layers(); ++l) {
    std::vector<uint8_t> keys(reader->layer_bytes(), 0xA5);
    ASSERT_TRUE(reader->WriteLayer(l, keys.data(), /*keys_only=*/true).ok());
    EXPECT_EQ(0, std::memcmp(keys.data(), layers.data() + l * reader->layer_bytes(), plane))
        << "layer " << l;
    EXPECT_TRUE(std::all_of(keys.begin() + plane, keys.end(), [](uint8_t b) { return b == 0xA5; }))
        << "layer " << l;
  }
  EXPECT_EQ(reader->WriteLayer(2, layers.data()).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SessionStoreTest, WriteLayerTokensPacksTheTokensOfWriteLayer) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(40, &shadow);
  // Pieces moved by the edits: their keys are re-rotated.
  EditAndFill(id, &shadow, {EditOp::Insert(5, {7, 8, 9}), EditOp::Delete(20, 24)});
  auto reader = store_->Read(id, std::nullopt);
  ASSERT_TRUE(reader.ok());
  const int64_t n = reader->range().size();
  const size_t es = DTypeSize(spec_.dtype);
  const size_t row = static_cast<size_t>(spec_.head_dim) * es;
  std::mt19937 rng(7);
  for (int trial = 0; trial < 4; ++trial) {
    // Runs and single tokens, ascending: the first and last token included in one trial.
    std::vector<int32_t> tokens;
    for (int32_t t = 0; t < n; ++t) {
      if (trial == 3 || rng() % 3 == 0) tokens.push_back(t);
    }
    for (int l = 0; l < reader->layers(); ++l) {
      std::vector<uint8_t> layer(reader->layer_bytes(), 0xFF);
      ASSERT_TRUE(reader->WriteLayer(l, layer.data()).ok());
      const size_t m = tokens.size();
      std::vector<uint8_t> packed(2 * spec_.kv_heads * m * row, 0xEE);
      ASSERT_TRUE(reader->WriteLayerTokens(l, tokens, packed.data()).ok());
      for (int kv = 0; kv < 2; ++kv) {
        for (int h = 0; h < spec_.kv_heads; ++h) {
          for (size_t i = 0; i < m; ++i) {
            const uint8_t* want = layer.data() + ((kv * spec_.kv_heads + h) * n + tokens[i]) * row;
            const uint8_t* got = packed.data() + ((kv * spec_.kv_heads + h) * m + i) * row;
            ASSERT_EQ(0, std::memcmp(want, got, row))
                << "trial " << trial << " layer " << l << " kv " << kv << " head " << h << " token "
                << tokens[i];
          }
        }
      }
    }
  }
  std::vector<uint8_t> out(reader->layer_bytes());
  const std::vector<int32_t> unsorted = {3, 2}, repeated = {4, 4}, outside = {0, 100};
  for (const auto* bad : {&unsorted, &repeated, &outside}) {
    EXPECT_EQ(reader->WriteLayerTokens(0, *bad, out.data()).code(),
              absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(reader->WriteLayerTokens(2, {}, out.data()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(reader->WriteLayerTokens(0, {}, out.data()).ok());
}

// LayerKeyPages: page p's rows equal WriteLayer's keys of its tokens; pages an edit left at their
// positions point into the chunks (none copied), the others are re-rotated copies.
TEST_F(SessionStoreTest, LayerKeyPagesEqualWriteLayerAndCopyOnlyMovedPages) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(41, &shadow);  // a partial last page
  const size_t es = DTypeSize(spec_.dtype);
  const size_t row = static_cast<size_t>(spec_.head_dim) * es;
  auto check = [&](int64_t page_tokens, int64_t want_copied) {
    auto reader = store_->Read(id, std::nullopt);
    ASSERT_TRUE(reader.ok());
    const int64_t n = reader->range().size();
    for (int l = 0; l < reader->layers(); ++l) {
      std::vector<uint8_t> keys(reader->layer_bytes(), 0xFF);
      ASSERT_TRUE(reader->WriteLayer(l, keys.data(), /*keys_only=*/true).ok());
      auto pages = reader->LayerKeyPages(l, page_tokens);
      ASSERT_TRUE(pages.ok()) << pages.status();
      ASSERT_EQ(static_cast<int64_t>(pages->pages.size()), (n + page_tokens - 1) / page_tokens);
      EXPECT_EQ(pages->copied_pages, want_copied) << "page_tokens " << page_tokens;
      for (int64_t t = 0; t < n; ++t) {
        for (int h = 0; h < spec_.kv_heads; ++h) {
          const uint8_t* got = static_cast<const uint8_t*>(pages->pages[t / page_tokens]) +
                               (h * pages->head_stride + (t % page_tokens) * spec_.head_dim) * es;
          ASSERT_EQ(0, std::memcmp(got, keys.data() + (h * n + t) * row, row))
              << "page_tokens " << page_tokens << " layer " << l << " head " << h << " token " << t;
        }
      }
    }
  };
  check(4, 0);
  check(2, 0);
  // 4 tokens inserted at 8 and filled at their positions: pages before and of the insert stay,
  // every later one (its chunk moved by 4 positions) is a copy. 45 tokens: 12 pages of 4, 3 in
  // place; 23 pages of 2, 6 in place.
  EditAndFill(id, &shadow, {EditOp::Insert(8, {7, 8, 9, 6})});
  check(4, 9);
  check(2, 17);
  // 1 token inserted at 1: pages of 4 from token 0 on span pieces, and are copies.
  EditAndFill(id, &shadow, {EditOp::Insert(1, {5})});
  check(4, 12);
  auto reader = store_->Read(id, std::nullopt);
  ASSERT_TRUE(reader.ok());
  // Some pages only: those as above, the others null.
  auto all = reader->LayerKeyPages(1, 4);
  const std::vector<int64_t> only = {0, 5};
  auto some = reader->LayerKeyPages(1, 4, &only);
  ASSERT_TRUE(all.ok() && some.ok());
  EXPECT_EQ(some->copied_pages, 2);
  ASSERT_EQ(some->pages.size(), all->pages.size());
  for (size_t p = 0; p < all->pages.size(); ++p) {
    if (p != 0 && p != 5) {
      EXPECT_EQ(some->pages[p], nullptr) << "page " << p;
      continue;
    }
    for (int h = 0; h < spec_.kv_heads; ++h) {
      const size_t at = (h * all->head_stride) * es;
      EXPECT_EQ(0, std::memcmp(static_cast<const uint8_t*>(some->pages[p]) + at,
                               static_cast<const uint8_t*>(all->pages[p]) + at, 4 * row))
          << "page " << p << " head " << h;
    }
  }
  EXPECT_EQ(reader->LayerKeyPages(2, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(reader->LayerKeyPages(0, 3).status().code(), absl::StatusCode::kInvalidArgument);
}

// PageNames change exactly for the pages whose keys change.
TEST_F(SessionStoreTest, PageNamesChangeWithThePagesKeys) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(41, &shadow);
  auto names = [&] {
    auto reader = store_->Read(id, std::nullopt);
    EXPECT_TRUE(reader.ok());
    return reader.ok() ? reader->PageNames(4) : std::vector<uint64_t>();
  };
  const std::vector<uint64_t> before = names();
  ASSERT_EQ(before.size(), 11u);
  EXPECT_EQ(names(), before);
  for (size_t p = 1; p < before.size(); ++p) EXPECT_NE(before[p], before[p - 1]);
  // An append of 5 tokens: pages 0-9 (tokens 0-39) unchanged, the partial page 10 changes.
  EditAndFill(id, &shadow, {EditOp::Insert(41, {1, 2, 3, 4, 5})});
  const std::vector<uint64_t> appended = names();
  ASSERT_EQ(appended.size(), 12u);
  for (size_t p = 0; p < 10; ++p) EXPECT_EQ(appended[p], before[p]) << "page " << p;
  EXPECT_NE(appended[10], before[10]);
  // An insert at 10: pages 0 and 1 unchanged, every later one moved.
  EditAndFill(id, &shadow, {EditOp::Insert(10, {7, 8, 9})});
  const std::vector<uint64_t> inserted = names();
  ASSERT_EQ(inserted.size(), 13u);
  for (size_t p = 0; p < inserted.size(); ++p) {
    EXPECT_EQ(inserted[p] == appended[p], p < 2) << "page " << p;
  }
  // Stale tokens filled again: new chunks, new names for their pages only.
  EditOptions stale;
  stale.stale = {TokenRange{20, 22}};
  EditAndFill(id, &shadow, {}, stale);
  const std::vector<uint64_t> refilled = names();
  for (size_t p = 0; p < refilled.size(); ++p) {
    EXPECT_EQ(refilled[p] == inserted[p], p != 5) << "page " << p;
  }
  // The first 4 tokens deleted: page p holds what page p + 1 held, from the same chunks, at
  // positions 4 lower: a new name.
  EditAndFill(id, &shadow, {EditOp::Delete(0, 4)});
  const std::vector<uint64_t> deleted = names();
  ASSERT_EQ(deleted.size(), refilled.size() - 1);
  for (size_t p = 0; p < deleted.size(); ++p)
    EXPECT_NE(deleted[p], refilled[p + 1]) << "page " << p;
}

TEST_F(SessionStoreTest, BadEditsLeaveTheSessionUnchanged) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(10, &shadow);
  EditAndFill(id, &shadow, {EditOp::Insert(2, {5})});
  auto before = store_->Info(id);
  ASSERT_TRUE(before.ok());
  auto kv_before = ReadAll(id);
  ASSERT_TRUE(kv_before.ok());
  struct Case {
    std::vector<EditOp> ops;
    EditOptions options;
  };
  std::vector<Case> cases;
  cases.push_back({{EditOp::Insert(12, {1})}, {}});                             // past the end
  cases.push_back({{EditOp::Delete(0, 3), EditOp::Delete(2, 5)}, {}});          // overlap
  cases.push_back({{EditOp::Insert(5, {1}), EditOp::Delete(0, 1)}, {}});        // unsorted
  cases.push_back({{EditOp::Replace(-2, 1, {1})}, {}});                         // negative
  cases.push_back({{EditOp::Insert(1, {1})}, {.stale = {TokenRange{5, 13}}}});  // stale past end
  cases.push_back({{EditOp::Insert(1, {1})}, {.repair_tokens = -1}});
  // A valid op first, then a bad one: nothing at all is applied.
  cases.push_back({{EditOp::Delete(0, 2), EditOp::Replace(1, 3, {4})}, {}});
  for (const Case& c : cases) {
    auto r = store_->Edit(id, c.ops, c.options);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  }
  EXPECT_EQ(store_->Edit("s-nope", {EditOp::Insert(0, {1})}).status().code(),
            absl::StatusCode::kNotFound);
  auto after = store_->Info(id);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->tokens, before->tokens);
  EXPECT_EQ(after->version, before->version);
  EXPECT_EQ(after->pieces, before->pieces);
  auto kv_after = ReadAll(id);
  ASSERT_TRUE(kv_after.ok());
  EXPECT_TRUE(*kv_after == *kv_before);
}

TEST_F(SessionStoreTest, EmptyEditsChangeNothing) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(9, &shadow);
  for (const std::vector<EditOp>& ops :
       {std::vector<EditOp>{}, std::vector<EditOp>{EditOp::Insert(3, {})},
        std::vector<EditOp>{EditOp::Delete(4, 4), EditOp::Replace(6, 6, {})}}) {
    auto r = store_->Edit(id, ops);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->length, 9);
    EXPECT_EQ(r->version, 0u);
    EXPECT_TRUE(r->fill.empty());
    EXPECT_TRUE(r->inserted.empty());
  }
  ExpectMatchesShadow(id, shadow);
}

TEST_F(SessionStoreTest, EditsAtStartAtEndAndDeletingEverything) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(10, &shadow);
  auto e = EditAndFill(id, &shadow, {EditOp::Insert(0, {1, 2})});
  EXPECT_THAT(e.inserted, ElementsAre(TokenRange{0, 2}));
  ExpectMatchesShadow(id, shadow);
  e = EditAndFill(id, &shadow, {EditOp::Insert(12, {3, 4, 5})});
  EXPECT_THAT(e.inserted, ElementsAre(TokenRange{12, 15}));
  ExpectMatchesShadow(id, shadow);
  e = EditAndFill(id, &shadow, {EditOp::Delete(0, 1), EditOp::Replace(14, 15, {6})});
  EXPECT_EQ(e.length, 14);
  ExpectMatchesShadow(id, shadow);
  e = EditAndFill(id, &shadow, {EditOp::Delete(0, 14)});
  EXPECT_EQ(e.length, 0);
  auto info = store_->Info(id);
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->tokens.empty());
  EXPECT_EQ(info->stored_bytes, 0u);
  auto empty = ReadAll(id);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
  e = EditAndFill(id, &shadow, {EditOp::Insert(0, {9, 9, 9, 9, 9})});
  EXPECT_EQ(e.length, 5);
  ExpectMatchesShadow(id, shadow);
}

TEST_F(SessionStoreTest, StaleAndRepairRangesAreListedAndDropped) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(30, &shadow);
  EditOptions options;
  options.stale = {TokenRange{0, 2}};
  options.repair_tokens = 4;
  // Insert 2 at 5 -> [5, 7), repair [7, 11); delete [20, 22) -> at 22 after the +2, repair
  // [22, 26); replace [27, 29) by 1 -> [27, 28), repair [28, 29) (the end of the document).
  auto r = store_->Edit(
      id, {EditOp::Insert(5, {1, 2}), EditOp::Delete(20, 22), EditOp::Replace(27, 29, {3})},
      options);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->length, 29);
  EXPECT_THAT(r->inserted, ElementsAre(TokenRange{5, 7}, TokenRange{27, 28}));
  EXPECT_THAT(r->repair, ElementsAre(TokenRange{7, 11}, TokenRange{22, 26}, TokenRange{28, 29}));
  EXPECT_THAT(r->fill, ElementsAre(TokenRange{0, 2}, TokenRange{5, 11}, TokenRange{22, 26},
                                   TokenRange{27, 29}));
  // Repair stops at the next op: an edit right after another marks only up to it.
  auto r2 =
      store_->Edit(id, {EditOp::Insert(12, {1}), EditOp::Insert(14, {2})}, {.repair_tokens = 10});
  ASSERT_TRUE(r2.ok());
  EXPECT_THAT(r2->repair, ElementsAre(TokenRange{13, 15}, TokenRange{16, 26}));
}

TEST_F(SessionStoreTest, FillForAnOlderVersionFails) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(10, &shadow);
  auto e = store_->Edit(id, {EditOp::Insert(3, {1, 2})});
  ASSERT_TRUE(e.ok());
  FillArgs fa;
  fa.range = TokenRange{3, 5};
  auto w = store_->BeginFill(id, fa);  // bound to version 1
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Write(AsString(RandomKv(spec_, 2, rng_))).ok());
  ASSERT_TRUE(store_->Edit(id, {EditOp::Delete(0, 1)}).ok());  // version 2
  EXPECT_EQ((*w)->Finish().status().code(), absl::StatusCode::kFailedPrecondition);
  fa.version = 1;
  EXPECT_EQ(store_->BeginFill(id, fa).status().code(), absl::StatusCode::kFailedPrecondition);
  fa.version.reset();
  fa.range = TokenRange{5, 12};
  EXPECT_EQ(store_->BeginFill(id, fa).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->BeginFill("s-none", fa).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, SnapshotIsIndependentAndSharesBlocks) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(16, &shadow);
  const uint64_t used = store_->bytes_used();
  auto snap = store_->Snapshot(id);
  ASSERT_TRUE(snap.ok());
  EXPECT_NE(snap->id, id);
  EXPECT_EQ(store_->bytes_used(), used);  // nothing copied
  Shadow snap_shadow = shadow;
  EditAndFill(snap->id, &snap_shadow, {EditOp::Replace(2, 6, {4, 4})});
  ExpectMatchesShadow(id, shadow);  // the original is untouched
  ExpectMatchesShadow(snap->id, snap_shadow);
  EXPECT_EQ(store_->Snapshot("s-none").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, CloseFreesAndForgets) {
  const std::string id = OpenRandom(12, nullptr);
  EXPECT_GT(store_->bytes_used(), 0u);
  ASSERT_TRUE(store_->Close(id).ok());
  EXPECT_EQ(store_->bytes_used(), 0u);
  EXPECT_EQ(store_->Close(id).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Read(id, std::nullopt).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->Info(id).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, ReaderOutlivesEditsAndClose) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(12, &shadow);
  auto reader = store_->Read(id, std::nullopt);
  ASSERT_TRUE(reader.ok());
  ASSERT_TRUE(store_->Edit(id, {EditOp::Delete(0, 12)}).ok());
  ASSERT_TRUE(store_->Close(id).ok());
  std::vector<uint8_t> out(reader->bytes(), 0xFF);
  ASSERT_TRUE(reader->WriteAll(out.data()).ok());
  EXPECT_TRUE(out == shadow.Expected(0, 12));
}

TEST_F(SessionStoreTest, SessionCountCapacity) {
  SessionStore::Options o;
  o.max_sessions = 2;
  MakeStore(o);
  const std::string a = OpenRandom(4, nullptr);
  OpenRandom(4, nullptr);
  OpenSessionArgs args;
  args.model = model_;
  args.tokens = {1, 2, 3, 4};
  auto r = store_->Open(args, AsString(ToBlocks(spec_, RandomKv(spec_, 4, rng_), 4)));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(r.status().message()), ::testing::HasSubstr("2 of 2"));
  EXPECT_EQ(store_->Snapshot(a).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(store_->Close(a).ok());
  EXPECT_TRUE(store_->Open(args, AsString(ToBlocks(spec_, RandomKv(spec_, 4, rng_), 4))).ok());
}

TEST_F(SessionStoreTest, ByteCapacity) {
  SessionStore::Options o;
  o.capacity_bytes = 3 * BlockBytes(spec_);
  MakeStore(o);
  const std::string a = OpenRandom(8, nullptr);  // 2 blocks
  OpenSessionArgs args;
  args.model = model_;
  args.tokens = RandomTokens(rng_, 8);
  EXPECT_EQ(store_->BeginOpen(args).status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(store_->Edit(a, {EditOp::Insert(0, {1, 2, 3, 4, 5})}).ok());
  FillArgs fa;
  fa.range = TokenRange{0, 5};  // 2 blocks
  EXPECT_EQ(store_->BeginFill(a, fa).status().code(), absl::StatusCode::kResourceExhausted);
  fa.range = TokenRange{0, 4};  // 1 block
  EXPECT_TRUE(store_->Fill(a, fa, AsString(RandomKv(spec_, 4, rng_))).ok());
  EXPECT_EQ(store_->bytes_used(), 3 * BlockBytes(spec_));
  ASSERT_TRUE(store_->Close(a).ok());
  EXPECT_EQ(store_->bytes_used(), 0u);
}

TEST_F(SessionStoreTest, IdleSessionsExpire) {
  SessionStore::Options o;
  o.idle_ttl = absl::Minutes(5);
  o.max_sessions = 2;
  MakeStore(o);
  const std::string a = OpenRandom(4, nullptr);
  const std::string b = OpenRandom(4, nullptr);
  now_ += absl::Minutes(4);
  EXPECT_TRUE(store_->Info(a).ok());  // a is used: its idle time restarts
  now_ += absl::Minutes(2);
  auto gone = store_->Info(b);
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(gone.status().message()), ::testing::HasSubstr("expired"));
  EXPECT_TRUE(store_->Info(a).ok());
  // At capacity, expired sessions make room.
  OpenRandom(4, nullptr);
  now_ += absl::Minutes(6);
  EXPECT_EQ(store_->SweepExpired(), 2);
  EXPECT_EQ(store_->sessions(), 0u);
  EXPECT_EQ(store_->bytes_used(), 0u);
}

TEST_F(SessionStoreTest, BasePositionAndRotatedAt) {
  // The document starts at position 100 (after a system prompt); its keys were rotated at 40
  // (e.g. cached from another prompt): reads move them to 100 + i in one rotation.
  Shadow shadow(spec_, 100);
  const std::string id = OpenRandom(14, &shadow, /*base=*/100, /*rotated_at=*/40);
  ExpectMatchesShadow(id, shadow);
  EditAndFill(id, &shadow, {EditOp::Replace(1, 3, {1, 2, 3, 4}), EditOp::Delete(10, 13)});
  ExpectMatchesShadow(id, shadow);
  OpenSessionArgs bad;
  bad.model = model_;
  bad.base_position = -1;
  EXPECT_EQ(store_->Open(bad, "").status().code(), absl::StatusCode::kInvalidArgument);
  bad.base_position = 0;
  bad.model = "nope";
  EXPECT_EQ(store_->Open(bad, "").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SessionStoreTest, OpenFromCachedPrefixBlocks) {
  const int64_t n = 11;  // 2 full cached blocks + 3 tokens that are not cached
  std::vector<int32_t> tokens = RandomTokens(rng_, n);
  std::vector<uint8_t> kv = RandomKv(spec_, 8, rng_);
  PutOptions put;
  put.model = model_;
  put.tokens.assign(tokens.begin(), tokens.begin() + 8);
  auto w = cache_->BeginPut(put);
  ASSERT_TRUE(w.ok());
  ASSERT_TRUE((*w)->Write(AsString(ToBlocks(spec_, kv, 8))).ok());
  ASSERT_TRUE((*w)->Finish().ok());
  OpenSessionArgs args;
  args.model = model_;
  args.tokens = tokens;
  auto r = store_->OpenFromCache(args);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->length, n);
  EXPECT_THAT(r->fill, ElementsAre(TokenRange{8, 11}));
  std::vector<uint8_t> tail = RandomKv(spec_, 3, rng_);
  FillArgs fa;
  fa.range = TokenRange{8, 11};
  ASSERT_TRUE(store_->Fill(r->id, fa, AsString(tail)).ok());
  Shadow shadow(spec_, 0);
  shadow.Open(kv, 8, 0);
  shadow.Edit({EditOp::Insert(8, {0, 0, 0})});
  shadow.Fill(TokenRange{8, 11}, tail);
  ExpectMatchesShadow(r->id, shadow);
  // The session owns copies: evicting the cache's blocks changes nothing.
  ASSERT_TRUE(cache_->Evict(model_, "", {}).ok());
  ExpectMatchesShadow(r->id, shadow);
  args.rotated_at = 3;
  EXPECT_EQ(store_->OpenFromCache(args).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SessionStoreTest, CompactionKeepsTheKvAndFreesBlocks) {
  Shadow shadow(spec_, 0);
  const std::string id = OpenRandom(64, &shadow);  // 16 blocks
  // Delete 3 of every 4 tokens, in one edit: every block stays referenced by one token.
  std::vector<EditOp> ops;
  for (int64_t b = 0; b < 16; ++b) ops.push_back(EditOp::Delete(4 * b + 1, 4 * b + 4));
  auto r = store_->Edit(id, ops);
  ASSERT_TRUE(r.ok());
  shadow.Edit(ops);
  EXPECT_EQ(r->length, 16);
  auto info = store_->Info(id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->stored_bytes, 4 * BlockBytes(spec_));  // compacted: 16 tokens in 4 blocks
  EXPECT_EQ(store_->bytes_used(), 4 * BlockBytes(spec_));
  ExpectMatchesShadow(id, shadow);  // still one rotation from each key's original copy
}

TEST(SessionStoreCreateTest, RejectsBadOptions) {
  auto cache = KvCache::Create(KvCache::Options());
  ASSERT_TRUE(cache.ok());
  EXPECT_EQ(SessionStore::Create(nullptr, {}).status().code(), absl::StatusCode::kInvalidArgument);
  SessionStore::Options o;
  o.max_sessions = 0;
  EXPECT_EQ(SessionStore::Create(cache->get(), o).status().code(),
            absl::StatusCode::kInvalidArgument);
  o = SessionStore::Options();
  o.idle_ttl = absl::ZeroDuration();
  EXPECT_EQ(SessionStore::Create(cache->get(), o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ----------------------------------------------------------------------------------------------
// PIE against a reference transformer.

class TransformerSessionTest : public ::testing::TestWithParam<std::tuple<int, DType>> {
 protected:
  void SetUp() override {
    TinyConfig c;
    c.layers = std::get<0>(GetParam());
    c.dtype = std::get<1>(GetParam());
    model_ = std::make_unique<TinyTransformer>(c, 0x71e7 + c.layers);
    spec_ = model_->spec();
    auto cache = KvCache::Create(KvCache::Options());
    ASSERT_TRUE(cache.ok());
    cache_ = *std::move(cache);
    ASSERT_TRUE(cache_->RegisterModel(spec_, "tiny").ok());
    auto store = SessionStore::Create(cache_.get(), SessionStore::Options());
    ASSERT_TRUE(store.ok());
    store_ = *std::move(store);
  }
  double UlpTol() const { return spec_.dtype == DType::kF32 ? 4.0 : 2.0; }

  std::unique_ptr<TinyTransformer> model_;
  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<SessionStore> store_;
  std::mt19937_64 rng_{0xed17};
};

// After insert, delete, replace and multi-place edits through the session API (the new tokens'
// KV filled from the model, as a frontend does): layer-0 keys equal a full re-encode of the edited
// file within 2 ulp (4 for fp32), layer-0 values bit for bit; every layer's keys are ONE rotation
// of their stored copy (bit-exact against RerotateCopyCpu from the original).
TEST_P(TransformerSessionTest, EditsMatchFullReencodeAtLayerZero) {
  struct Scenario {
    const char* name;
    std::vector<EditOp> ops;
  };
  const std::vector<Scenario> scenarios = {
      {"insert", {EditOp::Insert(17, {11, 12, 13, 14, 15})}},
      {"delete", {EditOp::Delete(9, 21)}},
      {"replace", {EditOp::Replace(30, 33, {40, 41, 42, 43, 44, 45, 46})}},
      {"multi",
       {EditOp::Insert(0, {1, 2}), EditOp::Delete(5, 8), EditOp::Replace(20, 21, {3, 4, 5}),
        EditOp::Insert(40, {6}), EditOp::Replace(55, 60, {})}},
  };
  for (const Scenario& sc : scenarios) {
    SCOPED_TRACE(sc.name);
    std::vector<int32_t> tokens = RandomTokens(rng_, 60);
    std::vector<uint8_t> kv = model_->Encode(tokens);
    OpenSessionArgs args;
    args.model = "tiny";
    args.tokens = tokens;
    auto opened = store_->Open(args, AsString(ToBlocks(spec_, kv, 60)));
    ASSERT_TRUE(opened.ok()) << opened.status();
    Shadow shadow(spec_, 0);
    shadow.Open(kv, 60, 0);

    auto edit = store_->Edit(opened->id, sc.ops);
    ASSERT_TRUE(edit.ok()) << edit.status();
    shadow.Edit(sc.ops);
    int64_t delta = 0;
    for (const EditOp& op : sc.ops) {
      tokens.erase(tokens.begin() + op.start + delta, tokens.begin() + op.end + delta);
      tokens.insert(tokens.begin() + op.start + delta, op.tokens.begin(), op.tokens.end());
      delta += static_cast<int64_t>(op.tokens.size()) - (op.end - op.start);
    }
    const int64_t n = static_cast<int64_t>(tokens.size());
    ASSERT_EQ(edit->length, n);
    // The frontend encodes the edited file's new tokens; a full re-encode is the reference.
    const std::vector<uint8_t> full = model_->Encode(tokens);
    for (const TokenRange& f : edit->fill) {
      std::vector<uint8_t> part = SliceTokens(spec_, full, n, f.start, f.end);
      FillArgs fa;
      fa.range = f;
      ASSERT_TRUE(store_->Fill(opened->id, fa, AsString(part)).ok());
      shadow.Fill(f, part);
    }
    auto reader = store_->Read(opened->id, std::nullopt);
    ASSERT_TRUE(reader.ok()) << reader.status();
    std::vector<uint8_t> got(reader->bytes(), 0xFF);
    ASSERT_TRUE(reader->WriteAll(got.data()).ok());
    EXPECT_TRUE(got == shadow.Expected(0, n)) << "keys are not one rotation of the stored copy";
    const double worst = WorstKeyUlp(spec_, got, full, n, 0);
    EXPECT_LE(worst, UlpTol()) << "layer-0 keys vs full re-encode";
    EXPECT_TRUE(ValuesEqual(spec_, got, full, n, 0));
    auto info = store_->Info(opened->id);
    ASSERT_TRUE(info.ok());
    EXPECT_EQ(info->tokens, tokens);
    RecordProperty(absl::StrCat(sc.name, "_worst_ulp"), absl::StrCat(worst));
  }
}

INSTANTIATE_TEST_SUITE_P(LayersByDtype, TransformerSessionTest,
                         ::testing::Combine(::testing::Values(1, 2),
                                            ::testing::Values(DType::kF32, DType::kF16,
                                                              DType::kBF16)),
                         [](const ::testing::TestParamInfo<std::tuple<int, DType>>& info) {
                           return absl::StrCat("L", std::get<0>(info.param), "_",
                                               std::string(DTypeName(std::get<1>(info.param))));
                         });

// Max |a - b| over max |b|.
double RelErr(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, mag = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::fabs(a[i] - b[i]));
    mag = std::max(mag, std::fabs(b[i]));
  }
  return diff / mag;
}

// The next-token attention output of a 1-layer model over the session's KV equals a full
// recompute within fp tolerance; reusing the suffix's KV without re-rotation (what a cache that
// does not understand RoPE would do) is measurably wrong.
class NextTokenTest : public ::testing::TestWithParam<DType> {};

TEST_P(NextTokenTest, SessionMatchesRecomputeAndNaiveReuseDoesNot) {
  TinyConfig c;
  c.layers = 1;
  c.dtype = GetParam();
  TinyTransformer model(c, 0xa77e);
  const ModelSpec spec = model.spec();
  auto cache = KvCache::Create(KvCache::Options());
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE((*cache)->RegisterModel(spec, "tiny").ok());
  auto store = SessionStore::Create(cache->get(), SessionStore::Options());
  ASSERT_TRUE(store.ok());
  std::mt19937_64 rng(0xbeef);
  std::vector<int32_t> tokens = RandomTokens(rng, 96);
  const std::vector<uint8_t> kv = model.Encode(tokens);
  OpenSessionArgs args;
  args.model = "tiny";
  args.tokens = tokens;
  auto opened = (*store)->Open(args, AsString(ToBlocks(spec, kv, 96)));
  ASSERT_TRUE(opened.ok());

  // A one-line edit near the top of the file: replace 3 tokens by 9.
  const std::vector<int32_t> line = {5, 6, 7, 8, 9, 10, 11, 12, 13};
  auto edit = (*store)->Edit(opened->id, {EditOp::Replace(10, 13, line)});
  ASSERT_TRUE(edit.ok());
  std::vector<int32_t> edited = tokens;
  edited.erase(edited.begin() + 10, edited.begin() + 13);
  edited.insert(edited.begin() + 10, line.begin(), line.end());
  const int64_t n = static_cast<int64_t>(edited.size());
  const std::vector<uint8_t> full = model.Encode(edited);
  ASSERT_THAT(edit->fill, ElementsAre(TokenRange{10, 19}));
  FillArgs fa;
  fa.range = TokenRange{10, 19};
  ASSERT_TRUE((*store)->Fill(opened->id, fa, AsString(SliceTokens(spec, full, n, 10, 19))).ok());
  auto reader = (*store)->Read(opened->id, std::nullopt);
  ASSERT_TRUE(reader.ok());
  std::vector<uint8_t> session_kv(reader->bytes(), 0xFF);
  ASSERT_TRUE(reader->WriteAll(session_kv.data()).ok());

  // Naive reuse: prefix, new tokens, then the old suffix KV as it was stored (old positions).
  std::vector<uint8_t> naive(RangeBytes(spec, n));
  const size_t row = static_cast<size_t>(spec.head_dim) * DTypeSize(spec.dtype);
  for (int r = 0; r < 2 * spec.kv_heads; ++r) {
    std::memcpy(&naive[r * n * row], &full[r * n * row], 19 * row);
    std::memcpy(&naive[(r * n + 19) * row], &kv[(r * 96 + 13) * row], (96 - 13) * row);
  }

  const int32_t next = 77;
  const std::vector<double> want = model.NextTokenAttention(full, n, next, n);
  const std::vector<double> got = model.NextTokenAttention(session_kv, n, next, n);
  const std::vector<double> bad = model.NextTokenAttention(naive, n, next, n);
  const double err = RelErr(got, want);
  const double naive_err = RelErr(bad, want);
  const double tol = spec.dtype == DType::kF32 ? 1e-6 : spec.dtype == DType::kF16 ? 1e-3 : 5e-3;
  EXPECT_LE(err, tol) << "session vs full recompute";
  EXPECT_GE(naive_err, 0.05) << "reuse without re-rotation";
  EXPECT_GE(naive_err, 10 * err);
  RecordProperty("session_rel_err", absl::StrCat(err));
  RecordProperty("naive_rel_err", absl::StrCat(naive_err));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, NextTokenTest,
                         ::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                         [](const ::testing::TestParamInfo<DType>& info) {
                           return std::string(DTypeName(info.param));
                         });

// 200 random edits (1 to 3 ops each) in bf16: after every 20, the layer-0 keys of the session are
// within 2 ulp of a full re-encode: no error growth, because every read rotates from the stored
// copy once. The same moves applied as chained rotations (each edit re-rotating the previous
// result) drift, which is why the session never does that.
TEST(RandomEditsTest, TwoHundredEditsInBf16DoNotGrowTheError) {
  TinyConfig c;
  c.layers = 1;
  c.dtype = DType::kBF16;
  TinyTransformer model(c, 0x200);
  const ModelSpec spec = model.spec();
  auto cache = KvCache::Create(KvCache::Options());
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE((*cache)->RegisterModel(spec, "tiny").ok());
  auto store = SessionStore::Create(cache->get(), SessionStore::Options());
  ASSERT_TRUE(store.ok());
  std::mt19937_64 rng(0x200200);
  std::vector<int32_t> tokens = RandomTokens(rng, 200);
  std::vector<uint8_t> kv = model.Encode(tokens);
  OpenSessionArgs args;
  args.model = "tiny";
  args.tokens = tokens;
  auto opened = (*store)->Open(args, AsString(ToBlocks(spec, kv, 200)));
  ASSERT_TRUE(opened.ok());
  const std::string id = opened->id;

  // Chained: one key per token, re-rotated by Δ on every edit that moves it.
  struct Chained {
    std::vector<uint8_t> kv;  // range layout, 1 token
    int64_t pos;
  };
  std::vector<Chained> chained;
  for (int64_t i = 0; i < 200; ++i) chained.push_back({SliceTokens(spec, kv, 200, i, i + 1), i});

  double worst_session = 0, worst_chained = 0;
  for (int step = 1; step <= 200; ++step) {
    const int64_t len = static_cast<int64_t>(tokens.size());
    std::vector<EditOp> ops;
    const int n_ops = 1 + static_cast<int>(rng() % 3);
    int64_t cursor = 0;
    for (int k = 0; k < n_ops && cursor <= len; ++k) {
      const int64_t a = cursor + static_cast<int64_t>(rng() % (len - cursor + 1)) / 2;
      const int64_t b = std::min(len, a + static_cast<int64_t>(rng() % 4));
      std::vector<int32_t> ins = RandomTokens(rng, static_cast<int64_t>(rng() % 5));
      switch (rng() % 3) {
        case 0:
          ops.push_back(EditOp::Insert(a, ins));
          cursor = a;
          break;
        case 1:
          ops.push_back(EditOp::Delete(a, b));
          cursor = b;
          break;
        default:
          ops.push_back(EditOp::Replace(a, b, ins));
          cursor = b;
          break;
      }
    }
    auto edit = (*store)->Edit(id, ops);
    ASSERT_TRUE(edit.ok()) << "step " << step << ": " << edit.status();
    int64_t delta = 0;
    for (const EditOp& op : ops) {
      const int64_t s = op.start + delta;
      tokens.erase(tokens.begin() + s, tokens.begin() + op.end + delta);
      tokens.insert(tokens.begin() + s, op.tokens.begin(), op.tokens.end());
      chained.erase(chained.begin() + s, chained.begin() + op.end + delta);
      chained.insert(chained.begin() + s, op.tokens.size(), Chained{{}, -1});
      delta += static_cast<int64_t>(op.tokens.size()) - (op.end - op.start);
    }
    const int64_t n = static_cast<int64_t>(tokens.size());
    ASSERT_EQ(edit->length, n);
    // The frontend encodes the new tokens (layer 0: only token and position matter).
    for (const TokenRange& f : edit->fill) {
      std::vector<int32_t> sub(tokens.begin() + f.start, tokens.begin() + f.end);
      std::vector<uint8_t> part = model.Encode(sub, f.start);
      FillArgs fa;
      fa.range = f;
      ASSERT_TRUE((*store)->Fill(id, fa, AsString(part)).ok());
      for (int64_t i = f.start; i < f.end; ++i) {
        chained[i] = Chained{SliceTokens(spec, part, f.size(), i - f.start, i - f.start + 1), i};
      }
    }
    for (int64_t i = 0; i < n; ++i) {  // chained rotation: from where it is now to i
      if (chained[i].pos == i) continue;
      std::vector<uint8_t> moved(chained[i].kv.size());
      RerotateCopy j;
      j.src = chained[i].kv.data();
      j.src_strides = RangeStrides(spec, 1);
      j.dst = moved.data();
      j.dst_strides = RangeStrides(spec, 1);
      j.n_tokens = 1;
      j.from_pos = chained[i].pos;
      j.to_pos = i;
      ASSERT_TRUE(RerotateCopyCpu(spec.rope, BlockGeometry(spec), {&j, 1}).ok());
      chained[i] = Chained{std::move(moved), i};
    }
    if (step % 20 != 0) continue;
    const std::vector<uint8_t> full = model.Encode(tokens);
    auto reader = (*store)->Read(id, std::nullopt);
    ASSERT_TRUE(reader.ok()) << reader.status();
    std::vector<uint8_t> got(reader->bytes(), 0xFF);
    ASSERT_TRUE(reader->WriteAll(got.data()).ok());
    const double w = WorstKeyUlp(spec, got, full, n, 0);
    EXPECT_LE(w, 2.0) << "after " << step << " edits";
    EXPECT_TRUE(ValuesEqual(spec, got, full, n, 0));
    worst_session = std::max(worst_session, w);
    std::vector<uint8_t> chain_kv(RangeBytes(spec, n));
    const size_t row = static_cast<size_t>(spec.head_dim) * DTypeSize(spec.dtype);
    for (int64_t i = 0; i < n; ++i) {
      for (int r = 0; r < 2 * spec.kv_heads; ++r) {
        std::memcpy(&chain_kv[(r * n + i) * row], &chained[i].kv[r * row], row);
      }
    }
    worst_chained = std::max(worst_chained, WorstKeyUlp(spec, chain_kv, full, n, 0));
  }
  RecordProperty("worst_ulp_session", absl::StrCat(worst_session));
  RecordProperty("worst_ulp_chained", absl::StrCat(worst_chained));
  EXPECT_GT(worst_chained, worst_session) << "chained rotations should drift";
  std::cout << "200 bf16 edits: worst layer-0 key error " << worst_session
            << " ulp through the session, " << worst_chained << " ulp with chained rotations\n";
}

}  // namespace
}  // namespace ropekv
