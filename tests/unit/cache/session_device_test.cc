// The residency option of SessionStore and the copies that take or give KV in a frontend's cache
// layout ([layer][k|v][kv_head][capacity][head_dim] at a token offset): OpenFrom / FillFrom with a
// host KvSource, SessionReader::WriteAllToHost, and the errors of the device-only calls on a host
// session. Runs everywhere (host sessions); tests/gpu/session_gpu_test.cc covers GPU sessions.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <vector>

#include "cache/kv_cache.h"
#include "cache/session.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace {

class SessionDeviceTest : public ::testing::Test {
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
    ASSERT_TRUE(cache_->RegisterModel(spec_, "m").ok());
    SessionStore::Options o;
    o.device = SessionDevice::kCpu;
    auto store = SessionStore::Create(cache_.get(), o);
    ASSERT_TRUE(store.ok());
    store_ = *std::move(store);
  }

  std::vector<uint8_t> Random(uint64_t bytes) {
    std::normal_distribution<float> normal(0.f, 1.f);
    std::vector<uint8_t> out(bytes);
    for (size_t i = 0; i < bytes / 2; ++i) StoreFromFloat(out.data(), i, spec_.dtype, normal(rng_));
    return out;
  }

  // Expects tokens [o, o + n) of every row of `got` (capacity C) to equal those of `want` at
  // [wo, wo + n), and every other token of `got` to be 0xFF bytes.
  void ExpectPlaced(const std::vector<uint8_t>& got, int64_t C, int64_t o, int64_t n,
                    const std::vector<uint8_t>& want, int64_t wC, int64_t wo) {
    const size_t tb = spec_.head_dim * 2;
    const size_t rows = static_cast<size_t>(spec_.layers) * 2 * spec_.kv_heads;
    ASSERT_EQ(got.size(), rows * C * tb);
    for (size_t r = 0; r < rows; ++r) {
      for (int64_t t = 0; t < C; ++t) {
        const uint8_t* g = got.data() + (r * C + t) * tb;
        if (t >= o && t < o + n) {
          const uint8_t* w = want.data() + (r * wC + wo + (t - o)) * tb;
          ASSERT_EQ(0, std::memcmp(g, w, tb)) << "row " << r << " token " << t;
        } else {
          for (size_t k = 0; k < tb; ++k) ASSERT_EQ(g[k], 0xFF) << "row " << r << " token " << t;
        }
      }
    }
  }

  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<SessionStore> store_;
  std::mt19937_64 rng_{7};
};

TEST(SessionDeviceOption, Parses) {
  EXPECT_EQ(*ParseSessionDevice("auto"), SessionDevice::kAuto);
  EXPECT_EQ(*ParseSessionDevice("cpu"), SessionDevice::kCpu);
  EXPECT_EQ(*ParseSessionDevice("gpu"), SessionDevice::kGpu);
  EXPECT_EQ(ParseSessionDevice("cuda").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_STREQ(SessionDeviceName(SessionDevice::kGpu), "gpu");
}

TEST_F(SessionDeviceTest, AutoIsHostWithoutGpuAndGpuFailsThere) {
  if (GpuAvailable()) GTEST_SKIP() << "a GPU is present (tests/gpu/session_gpu_test.cc)";
  auto automatic = SessionStore::Create(cache_.get(), SessionStore::Options());
  ASSERT_TRUE(automatic.ok());
  EXPECT_EQ((*automatic)->gpu_device(), -1);
  SessionStore::Options o;
  o.device = SessionDevice::kGpu;
  EXPECT_EQ(SessionStore::Create(cache_.get(), o).status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(SessionDeviceTest, OpenFromAndReadIntoCapacityLayout) {
  // The frontend's cache holds the document at tokens [5, 5 + 13) of capacity 32.
  const int64_t C = 32, o = 5, n = 13;
  auto src = Random(RangeBytes(spec_, C));
  OpenSessionArgs args;
  args.model = "m";
  args.tokens.assign(n, 1);
  args.base_position = o;  // keys at their positions: reads copy bit for bit
  auto s = store_->OpenFrom(args, KvSource{src.data(), RangeStrides(spec_, C), o});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->length, n);
  auto info = store_->Info(s->id);
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->device, -1);

  // Read [2, 13) into another buffer of capacity 20 at offset 9: lands at [9, 20).
  auto reader = store_->Read(s->id, TokenRange{2, 13});
  ASSERT_TRUE(reader.ok());
  // A read keeps positions base + index, so a different offset does not rotate anything.
  std::vector<uint8_t> dst(RangeBytes(spec_, 20), 0xFF);
  ASSERT_TRUE(reader->WriteAllToHost(dst.data(), RangeStrides(spec_, 20), 9).ok());
  ExpectPlaced(dst, 20, 9, 11, src, C, o + 2);

  // Device-only calls on a host session.
  EXPECT_FALSE(reader->on_gpu());
  EXPECT_EQ(reader->WriteToDevice(dst.data(), RangeStrides(spec_, 20), 0).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(
      store_->OpenFrom(args, KvSource{src.data(), RangeStrides(spec_, C), o, 0}).status().code(),
      absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(
      store_->OpenFrom(args, KvSource{src.data(), RangeStrides(spec_, C), -1}).status().code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->OpenFrom(args, KvSource{}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SessionDeviceTest, FillFromEqualsFillOfPackedBytes) {
  const int64_t C = 40;
  auto src = Random(RangeBytes(spec_, C));
  OpenSessionArgs args;
  args.model = "m";
  args.tokens.assign(10, 1);
  auto a = store_->OpenFrom(args, KvSource{src.data(), RangeStrides(spec_, C), 0});
  auto b = store_->OpenFrom(args, KvSource{src.data(), RangeStrides(spec_, C), 0});
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(store_->Edit(a->id, {EditOp::Insert(4, std::vector<int32_t>(7, 2))}).ok());
  ASSERT_TRUE(store_->Edit(b->id, {EditOp::Insert(4, std::vector<int32_t>(7, 2))}).ok());
  FillArgs fill;
  fill.range = TokenRange{4, 11};
  // From the buffer's tokens [20, 27) ...
  auto fa = store_->FillFrom(a->id, fill, KvSource{src.data(), RangeStrides(spec_, C), 20});
  ASSERT_TRUE(fa.ok()) << fa.status();
  EXPECT_TRUE(fa->fill.empty());
  // ... equals a Fill of those tokens packed in range layout.
  std::vector<uint8_t> packed(RangeBytes(spec_, 7));
  const size_t tb = spec_.head_dim * 2;
  for (size_t r = 0; r < static_cast<size_t>(spec_.layers) * 2 * spec_.kv_heads; ++r) {
    std::memcpy(packed.data() + r * 7 * tb, src.data() + (r * C + 20) * tb, 7 * tb);
  }
  ASSERT_TRUE(
      store_
          ->Fill(b->id, fill,
                 absl::string_view(reinterpret_cast<const char*>(packed.data()), packed.size()))
          .ok());
  auto ra = store_->Read(a->id, std::nullopt);
  auto rb = store_->Read(b->id, std::nullopt);
  ASSERT_TRUE(ra.ok() && rb.ok());
  std::vector<uint8_t> xa(ra->bytes()), xb(rb->bytes());
  ASSERT_TRUE(ra->WriteAll(xa.data()).ok());
  ASSERT_TRUE(rb->WriteAll(xb.data()).ok());
  EXPECT_EQ(xa, xb);

  // A fill range past the document: INVALID_ARGUMENT, session unchanged.
  fill.range = TokenRange{15, 30};
  EXPECT_EQ(store_->FillFrom(a->id, fill, KvSource{src.data(), RangeStrides(spec_, C), 0})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->Info(a->id)->length, 17);
}

}  // namespace
}  // namespace ropekv
