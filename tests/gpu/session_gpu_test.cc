// GPU-resident sessions (SessionStore::Options::device = kGpu) against host sessions (kCpu) fed
// the same bytes and edits: every read equals the host session's (values and unmoved keys bit for
// bit; moved keys bit for bit but where CUDA's and libm's sin/cos round a coefficient differently,
// 1 ulp at most, as the rope GPU test allows), and the host session's reads are themselves checked
// against an fp64 reference in tests/unit/cache/session_test.cc. A device read lands at a token
// offset of a poisoned capacity-layout buffer without touching anything else; OpenFrom / FillFrom
// take KV from device memory. Skips itself without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/kv_cache.h"
#include "cache/session.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace {

std::vector<int32_t> Tokens(std::mt19937_64& rng, int64_t n) {
  std::uniform_int_distribution<int32_t> d(0, 31999);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = d(rng);
  return t;
}

std::vector<uint8_t> RandomBytes(const ModelSpec& spec, uint64_t bytes, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<uint8_t> out(bytes);
  for (size_t i = 0; i < bytes / DTypeSize(spec.dtype); ++i) {
    StoreFromFloat(out.data(), i, spec.dtype, normal(rng));
  }
  return out;
}

// GPU bytes vs host bytes of the same read (range layout of n tokens): values bit for bit; keys
// bit for bit or within 1 ulp. Returns how many key elements differ at all.
int64_t ExpectSameRead(const ModelSpec& spec, int64_t n, const std::vector<uint8_t>& gpu,
                       const std::vector<uint8_t>& cpu, const std::string& what) {
  EXPECT_EQ(gpu.size(), cpu.size()) << what;
  if (gpu.size() != cpu.size()) return -1;
  const size_t es = DTypeSize(spec.dtype);
  const size_t row = static_cast<size_t>(n) * spec.head_dim;  // elements of one (kv, head) row
  int64_t differ = 0;
  for (size_t i = 0; i < gpu.size() / es; ++i) {
    if (std::memcmp(gpu.data() + i * es, cpu.data() + i * es, es) == 0) continue;
    const bool is_key = (i / row / spec.kv_heads) % 2 == 0;
    const float g = LoadAsFloat(gpu.data(), i, spec.dtype);
    const float c = LoadAsFloat(cpu.data(), i, spec.dtype);
    if (!is_key) {
      ADD_FAILURE() << what << ": value element " << i << " gpu " << g << " cpu " << c;
      return -1;
    }
    const double ulp = std::fabs(g - c) / UlpOf(spec.dtype, std::max(std::fabs(g), std::fabs(c)));
    if (!(ulp <= 1.0)) {
      ADD_FAILURE() << what << ": key element " << i << " gpu " << g << " cpu " << c;
      return -1;
    }
    ++differ;
  }
  return differ;
}

class SessionGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
    spec_.layers = 3;
    spec_.kv_heads = 2;
    spec_.head_dim = 128;
    spec_.dtype = DType::kBF16;
    spec_.block_tokens = 16;
    spec_.rope.head_dim = 128;
    spec_.rope.theta = 500000;
    spec_.rope.type = RopeType::kLlama3;
    spec_.rope.factor = 8;
    spec_.rope.original_max_position_embeddings = 8192;
    auto cache = KvCache::Create(KvCache::Options());
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    auto reg = cache_->RegisterModel(spec_, "m");
    ASSERT_TRUE(reg.ok()) << reg.status();
    SessionStore::Options host;
    host.device = SessionDevice::kCpu;
    auto h = SessionStore::Create(cache_.get(), host);
    ASSERT_TRUE(h.ok()) << h.status();
    host_ = *std::move(h);
    SessionStore::Options gpu;
    gpu.device = SessionDevice::kGpu;
    gpu.capacity_bytes = 256ull << 20;
    auto g = SessionStore::Create(cache_.get(), gpu);
    ASSERT_TRUE(g.ok()) << g.status();
    gpu_ = *std::move(g);
    ASSERT_EQ(gpu_->gpu_device(), 0);
    ASSERT_EQ(host_->gpu_device(), -1);
  }

  // Both sessions' full reads, GPU one vs host one.
  void ExpectSame(const std::string& h, const std::string& g, const std::string& what) {
    auto rh = host_->Read(h, std::nullopt);
    auto rg = gpu_->Read(g, std::nullopt);
    ASSERT_TRUE(rh.ok()) << rh.status();
    ASSERT_TRUE(rg.ok()) << rg.status();
    ASSERT_TRUE(rg->on_gpu());
    ASSERT_FALSE(rh->on_gpu());
    ASSERT_EQ(rh->range(), rg->range());
    std::vector<uint8_t> a(rh->bytes(), 0xEE), b(rg->bytes(), 0xDD);
    ASSERT_TRUE(rh->WriteAll(a.data()).ok());
    ASSERT_TRUE(rg->WriteAll(b.data()).ok());
    const int64_t differ = ExpectSameRead(spec_, rh->range().size(), b, a, what + " WriteAll");
    ASSERT_GE(differ, 0);
    // Layer by layer (the streaming path) equals the whole read.
    std::vector<uint8_t> layer(rg->layer_bytes(), 0xCC);
    for (int l = 0; l < spec_.layers; ++l) {
      ASSERT_TRUE(rg->WriteLayer(l, layer.data()).ok());
      ASSERT_EQ(0, std::memcmp(layer.data(), b.data() + l * rg->layer_bytes(), layer.size()))
          << what << " layer " << l;
      // keys_only: the key plane alone comes back, the rest of dst untouched.
      std::vector<uint8_t> keys(rg->layer_bytes(), 0xA5);
      ASSERT_TRUE(rg->WriteLayer(l, keys.data(), /*keys_only=*/true).ok());
      ASSERT_EQ(0, std::memcmp(keys.data(), layer.data(), keys.size() / 2))
          << what << " keys of layer " << l;
      ASSERT_TRUE(std::all_of(keys.begin() + keys.size() / 2, keys.end(),
                              [](uint8_t x) { return x == 0xA5; }))
          << what << " layer " << l << ": bytes past the key plane written";
      // A gather's tokens (every third, and the last): the device session's packed K/V equal the
      // host session's.
      std::vector<int32_t> tokens;
      const int64_t n = rg->range().size();
      for (int32_t t = 0; t < n; t += 3) tokens.push_back(t);
      if (tokens.back() != n - 1) tokens.push_back(static_cast<int32_t>(n - 1));
      const size_t packed = layer.size() / n * tokens.size();
      std::vector<uint8_t> ph(packed, 0x11), pg(packed, 0x22);
      ASSERT_TRUE(rh->WriteLayerTokens(l, tokens, ph.data()).ok());
      ASSERT_TRUE(rg->WriteLayerTokens(l, tokens, pg.data()).ok());
      ASSERT_GE(ExpectSameRead(spec_, static_cast<int64_t>(tokens.size()), pg, ph,
                               what + " WriteLayerTokens"),
                0);
    }
    total_keys_differ_ += differ;
  }

  // Fills every pending range of both sessions with the same random KV.
  void FillBoth(const std::string& h, const std::string& g, const std::vector<TokenRange>& fill) {
    for (const TokenRange& r : fill) {
      auto kv = RandomBytes(spec_, RangeBytes(spec_, r.size()), rng_);
      const absl::string_view bytes(reinterpret_cast<const char*>(kv.data()), kv.size());
      FillArgs args;
      args.range = r;
      auto a = host_->Fill(h, args, bytes);
      auto b = gpu_->Fill(g, args, bytes);
      ASSERT_TRUE(a.ok()) << a.status();
      ASSERT_TRUE(b.ok()) << b.status();
      ASSERT_EQ(a->fill, b->fill);
    }
  }

  void EditBoth(const std::string& h, const std::string& g, std::vector<EditOp> ops,
                const std::string& what) {
    auto a = host_->Edit(h, ops);
    auto b = gpu_->Edit(g, ops);
    ASSERT_TRUE(a.ok()) << a.status();
    ASSERT_TRUE(b.ok()) << b.status();
    ASSERT_EQ(a->fill, b->fill);
    FillBoth(h, g, a->fill);
    ExpectSame(h, g, what);
  }

  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<SessionStore> host_, gpu_;
  std::mt19937_64 rng_{20261125};
  int64_t total_keys_differ_ = 0;
};

TEST_F(SessionGpuTest, DeviceSessionEqualsHostSessionAfterEdits) {
  const int64_t n = 200;
  OpenSessionArgs args;
  args.model = "m";
  args.tokens = Tokens(rng_, n);
  args.base_position = 7;
  const uint64_t blocks = (n + spec_.block_tokens - 1) / spec_.block_tokens;
  auto kv = RandomBytes(spec_, blocks * BlockBytes(spec_), rng_);
  const absl::string_view bytes(reinterpret_cast<const char*>(kv.data()), kv.size());
  auto h = host_->Open(args, bytes);
  auto g = gpu_->Open(args, bytes);
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_TRUE(g.ok()) << g.status();
  auto info = gpu_->Info(g->id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->device, 0);
  EXPECT_EQ(gpu_->bytes_used(), blocks * BlockBytes(spec_));  // counted against the capacity
  ExpectSame(h->id, g->id, "open");

  EditBoth(h->id, g->id, {EditOp::Insert(10, Tokens(rng_, 5))}, "insert");
  EditBoth(h->id, g->id, {EditOp::Delete(30, 47)}, "delete");
  EditBoth(h->id, g->id, {EditOp::Replace(50, 55, Tokens(rng_, 23))}, "replace");
  EditBoth(h->id, g->id,
           {EditOp::Insert(0, Tokens(rng_, 3)), EditOp::Delete(20, 22),
            EditOp::Replace(80, 85, Tokens(rng_, 2)), EditOp::Insert(150, Tokens(rng_, 17))},
           "multi-edit");
  // Scattered deletions until the sessions compact themselves (a bit-exact copy on the device).
  for (int i = 0; i < 8; ++i) {
    EditBoth(h->id, g->id, {EditOp::Delete(5 + 3 * i, 12 + 3 * i), EditOp::Delete(60, 70)},
             absl::StrCat("deletion ", i));
  }
  auto snap = gpu_->Snapshot(g->id);
  ASSERT_TRUE(snap.ok());
  ExpectSame(h->id, snap->id, "snapshot");
  {
    // A read of a sub-range (the readers hold their chunks until they go).
    auto rh = host_->Read(h->id, TokenRange{3, 41});
    auto rg = gpu_->Read(g->id, TokenRange{3, 41});
    ASSERT_TRUE(rh.ok() && rg.ok());
    std::vector<uint8_t> a(rh->bytes()), b(rg->bytes());
    ASSERT_TRUE(rh->WriteAll(a.data()).ok());
    ASSERT_TRUE(rg->WriteAll(b.data()).ok());
    ASSERT_GE(ExpectSameRead(spec_, 38, b, a, "sub-range"), 0);
  }
  std::cout << "key elements not bit-exact (<= 1 ulp): " << total_keys_differ_ << "\n";

  // Closing every session gives the chunks' bytes back to the budget.
  ASSERT_TRUE(gpu_->Close(g->id).ok());
  ASSERT_TRUE(gpu_->Close(snap->id).ok());
  EXPECT_EQ(gpu_->bytes_used(), 0u);
}

TEST_F(SessionGpuTest, ReadIntoDeviceBufferAtTokenOffset) {
  const int64_t n = 90;
  OpenSessionArgs args;
  args.model = "m";
  args.tokens = Tokens(rng_, n);
  const uint64_t blocks = (n + spec_.block_tokens - 1) / spec_.block_tokens;
  auto kv = RandomBytes(spec_, blocks * BlockBytes(spec_), rng_);
  const absl::string_view bytes(reinterpret_cast<const char*>(kv.data()), kv.size());
  auto h = host_->Open(args, bytes);
  auto g = gpu_->Open(args, bytes);
  ASSERT_TRUE(h.ok() && g.ok());
  EditBoth(h->id, g->id, {EditOp::Replace(20, 30, Tokens(rng_, 16))}, "edit");

  // The frontend's cache: capacity C tokens; the moved suffix [36, 96) lands at tokens [o, o+60).
  const int64_t C = 160, o = 41;
  const TokenRange range{36, 96};
  const uint64_t cap_bytes = RangeBytes(spec_, C);
  void* dbuf = nullptr;
  ASSERT_EQ(cudaMalloc(&dbuf, cap_bytes), cudaSuccess);
  ASSERT_EQ(cudaMemset(dbuf, 0xFF, cap_bytes), cudaSuccess);  // poison: bf16 NaN everywhere
  auto rg = gpu_->Read(g->id, range);
  ASSERT_TRUE(rg.ok()) << rg.status();
  ASSERT_TRUE(rg->WriteToDevice(dbuf, RangeStrides(spec_, C), o).ok());
  std::vector<uint8_t> got(cap_bytes);
  ASSERT_EQ(cudaMemcpy(got.data(), dbuf, cap_bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  cudaFree(dbuf);

  // The host session's read of the same range, placed by the host at the same offset.
  auto rh = host_->Read(h->id, range);
  ASSERT_TRUE(rh.ok());
  std::vector<uint8_t> want(cap_bytes, 0xFF);
  ASSERT_TRUE(rh->WriteAllToHost(want.data(), RangeStrides(spec_, C), o).ok());
  // Untouched bytes stay poison; written ones match.
  const size_t es = DTypeSize(spec_.dtype);
  const size_t row_bytes = static_cast<size_t>(C) * spec_.head_dim * es;
  std::vector<uint8_t> got_range, want_range;
  for (size_t r = 0; r < cap_bytes / row_bytes; ++r) {
    for (int64_t t = 0; t < C; ++t) {
      const size_t at = r * row_bytes + static_cast<size_t>(t) * spec_.head_dim * es;
      const size_t len = spec_.head_dim * es;
      if (t >= o && t < o + range.size()) {
        got_range.insert(got_range.end(), got.begin() + at, got.begin() + at + len);
        want_range.insert(want_range.end(), want.begin() + at, want.begin() + at + len);
      } else {
        for (size_t k = 0; k < len; ++k) {
          ASSERT_EQ(got[at + k], 0xFF) << "row " << r << " token " << t << " written";
        }
      }
    }
  }
  ASSERT_GE(ExpectSameRead(spec_, range.size(), got_range, want_range, "device read"), 0);

  // The same through the host path of the GPU session (2-D copy back into a capacity layout).
  std::vector<uint8_t> host_copy(cap_bytes, 0xFF);
  ASSERT_TRUE(rg->WriteAllToHost(host_copy.data(), RangeStrides(spec_, C), o).ok());
  EXPECT_EQ(host_copy, got);
}

TEST_F(SessionGpuTest, OpenAndFillFromDeviceMemory) {
  // The frontend's buffer (capacity C) holds a document at tokens [o, o + n).
  const int64_t C = 128, o = 9, n = 70;
  const uint64_t cap_bytes = RangeBytes(spec_, C);
  auto host_kv = RandomBytes(spec_, cap_bytes, rng_);
  void* dbuf = nullptr;
  ASSERT_EQ(cudaMalloc(&dbuf, cap_bytes), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dbuf, host_kv.data(), cap_bytes, cudaMemcpyHostToDevice), cudaSuccess);
  OpenSessionArgs args;
  args.model = "m";
  args.tokens = Tokens(rng_, n);
  args.base_position = o;  // the keys sit at their positions: a read copies them bit for bit
  auto g = gpu_->OpenFrom(args, KvSource{dbuf, RangeStrides(spec_, C), o, 0});
  ASSERT_TRUE(g.ok()) << g.status();
  auto h = host_->OpenFrom(args, KvSource{host_kv.data(), RangeStrides(spec_, C), o, -1});
  ASSERT_TRUE(h.ok()) << h.status();
  // A host session cannot take device memory (the data plane stages it first).
  EXPECT_EQ(host_->OpenFrom(args, KvSource{dbuf, RangeStrides(spec_, C), o, 0}).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(gpu_->OpenFrom(args, KvSource{dbuf, RangeStrides(spec_, C), -1, 0}).status().code(),
            absl::StatusCode::kInvalidArgument);

  auto rg = gpu_->Read(g->id, std::nullopt);
  ASSERT_TRUE(rg.ok());
  std::vector<uint8_t> back(cap_bytes, 0xFF);
  ASSERT_TRUE(rg->WriteAllToHost(back.data(), RangeStrides(spec_, C), o).ok());
  const size_t es = DTypeSize(spec_.dtype);
  const size_t row = static_cast<size_t>(C) * spec_.head_dim * es;
  for (size_t r = 0; r < cap_bytes / row; ++r) {
    const size_t at = r * row + o * spec_.head_dim * es;
    ASSERT_EQ(0, std::memcmp(back.data() + at, host_kv.data() + at, n * spec_.head_dim * es))
        << "row " << r;
  }

  // Fill an inserted range from the device buffer (D2D) and from host memory (staged): both
  // sessions then read alike.
  auto eg = gpu_->Edit(g->id, {EditOp::Insert(30, Tokens(rng_, 12))});
  auto eh = host_->Edit(h->id, {EditOp::Insert(30, Tokens(rng_, 12))});
  ASSERT_TRUE(eg.ok() && eh.ok());
  FillArgs fill;
  fill.range = TokenRange{30, 42};
  auto fg = gpu_->FillFrom(g->id, fill, KvSource{dbuf, RangeStrides(spec_, C), 100, 0});
  ASSERT_TRUE(fg.ok()) << fg.status();
  auto fh = host_->FillFrom(h->id, fill, KvSource{host_kv.data(), RangeStrides(spec_, C), 100});
  ASSERT_TRUE(fh.ok()) << fh.status();
  EXPECT_TRUE(fg->fill.empty());
  ExpectSame(h->id, g->id, "after FillFrom");
  // And from host memory into the GPU session (pinned staging).
  auto e2g = gpu_->Edit(g->id, {EditOp::Replace(0, 4, Tokens(rng_, 5))});
  auto e2h = host_->Edit(h->id, {EditOp::Replace(0, 4, Tokens(rng_, 5))});
  ASSERT_TRUE(e2g.ok() && e2h.ok());
  fill.range = TokenRange{0, 5};
  ASSERT_TRUE(
      gpu_->FillFrom(g->id, fill, KvSource{host_kv.data(), RangeStrides(spec_, C), 3}).ok());
  ASSERT_TRUE(
      host_->FillFrom(h->id, fill, KvSource{host_kv.data(), RangeStrides(spec_, C), 3}).ok());
  ExpectSame(h->id, g->id, "after host FillFrom");
  cudaFree(dbuf);
}

}  // namespace
}  // namespace ropekv
