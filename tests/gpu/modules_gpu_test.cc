// GPU test of the daemon's Attend check (cache/modules.h): on CUDA it equals the CPU reference
// over the same composed parallel prompt — Llama-3-8B head shape (8 KV heads, 32 query heads,
// head_dim 128), bf16 KV, a prefix by Put and contexts by PutContext at shared positions, decode
// and prefill queries, f32 queries (generic kernel) and bf16 queries (tensor-core kernel for
// prefill), several T and S. Outputs are poisoned (NaN) on both paths, so an element the CUDA path
// does not write fails. Skips itself where there is no GPU.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "cache/kv_cache.h"
#include "cache/modules.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace {

std::string RandomBytes(DType t, size_t elements, std::mt19937& rng) {
  std::string out(elements * DTypeSize(t), '\0');
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (size_t i = 0; i < elements; ++i) StoreFromFloat(out.data(), i, t, dist(rng));
  return out;
}

std::vector<int32_t> RandomTokens(std::mt19937& rng, int n) {
  std::vector<int32_t> t(n);
  for (int32_t& x : t) x = static_cast<int32_t>(rng() % 50000);
  return t;
}

class ModulesGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
    spec_.layers = 2;
    spec_.kv_heads = 8;
    spec_.head_dim = 128;
    spec_.dtype = DType::kBF16;
    spec_.block_tokens = 16;
    spec_.rope.theta = 500000.0;
    spec_.rope.head_dim = 128;
    auto cache = KvCache::Create(KvCache::Options());
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    ASSERT_TRUE(cache_->RegisterModel(spec_, "llama").ok());
    auto store = ModuleStore::Create(cache_.get(), ModuleStore::Options());
    ASSERT_TRUE(store.ok());
    store_ = *std::move(store);
    std::mt19937 rng(0x9e6);
    prefix_ = RandomTokens(rng, 256);
    PutOptions o;
    o.model = "llama";
    o.tokens = prefix_;
    auto w = cache_->BeginPut(o);
    ASSERT_TRUE(w.ok()) << w.status();
    ASSERT_TRUE((*w)->Write(RandomBytes(spec_.dtype, (*w)->expected_bytes() / 2, rng)).ok());
    ASSERT_TRUE((*w)->Finish().ok());
    for (int n : {300, 517, 129, 64}) {
      contexts_.push_back(RandomTokens(rng, n));
      PutContextArgs args;
      args.model = "llama";
      args.prefix_tokens = 256;
      args.context = contexts_.back();
      const std::string kv = RandomBytes(spec_.dtype, RangeLayoutBytes(spec_, n) / 2, rng);
      ASSERT_TRUE(store_->PutContext(args, kv).ok());
    }
  }

  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<ModuleStore> store_;
  std::vector<int32_t> prefix_;
  std::vector<std::vector<int32_t>> contexts_;
};

TEST_F(ModulesGpuTest, CudaEqualsCpu) {
  std::mt19937 rng(7);
  struct Case {
    int n;
    DType q_dtype;
    float t, s;
  };
  for (const Case& c : {Case{1, DType::kF32, 1.0f, 1.0f}, Case{1, DType::kBF16, 0.6f, 1.2f},
                        Case{16, DType::kF32, 0.8f, 1.0f}, Case{16, DType::kBF16, 0.5f, 0.9f},
                        Case{64, DType::kBF16, 1.0f, 1.0f}}) {
    SCOPED_TRACE(::testing::Message()
                 << "n " << c.n << " q " << DTypeName(c.q_dtype) << " T " << c.t << " S " << c.s);
    ParallelArgs pa;
    pa.model = "llama";
    pa.prefix = prefix_;
    pa.contexts = contexts_;
    pa.temperature = c.t;
    pa.scale = c.s;
    auto prompt = store_->ComposeParallel(pa);
    ASSERT_TRUE(prompt.ok()) << prompt.status();
    const int m = c.n + 3;  // three earlier generated tokens before the queries
    const std::string q = RandomBytes(c.q_dtype, static_cast<size_t>(c.n) * 32 * 128, rng);
    const std::string qkv = RandomBytes(spec_.dtype, size_t{2} * 8 * m * 128, rng);
    AttendArgs a;
    a.layer = 1;
    a.num_queries = c.n;
    a.q_heads = 32;
    a.q_dtype = c.q_dtype;
    a.q = q;
    a.query_kv_tokens = m;
    a.query_kv = qkv;
    a.device = AttendDevice::kCpu;
    auto cpu = ModuleStore::Attend(*prompt, a);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    a.device = AttendDevice::kCuda;
    auto gpu = ModuleStore::Attend(*prompt, a);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    EXPECT_EQ(gpu->device, AttendDevice::kCuda);
    a.device = AttendDevice::kAuto;
    auto autod = ModuleStore::Attend(*prompt, a);
    ASSERT_TRUE(autod.ok());
    EXPECT_EQ(autod->device, AttendDevice::kCuda);
    double max_ref = 0;
    for (float x : cpu->out) max_ref = std::max(max_ref, std::fabs(double{x}));
    // The tensor-core path (bf16 queries and KV) rounds P to bf16 for P.V.
    const bool tensor_core = c.q_dtype == DType::kBF16;
    const double tol = (tensor_core ? 1.2e-2 : 2e-5) * max_ref;
    double worst = 0;
    for (size_t i = 0; i < cpu->out.size(); ++i) {
      ASSERT_FALSE(std::isnan(gpu->out[i])) << "element " << i << " not written";
      const double err = std::fabs(double{gpu->out[i]} - cpu->out[i]);
      worst = std::max(worst, err);
      ASSERT_LE(err, tol) << "element " << i;
    }
    for (size_t r = 0; r < cpu->lse.size(); ++r) {
      ASSERT_NEAR(gpu->lse[r], cpu->lse[r], 2e-4 * (1 + std::fabs(cpu->lse[r]))) << "row " << r;
    }
    std::cout << "n " << c.n << " q " << DTypeName(c.q_dtype) << ": max |cuda - cpu| " << worst
              << " (scale " << max_ref << ")\n";
  }
}

}  // namespace
}  // namespace ropekv
