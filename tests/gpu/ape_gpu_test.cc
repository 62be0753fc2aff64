// GPU test of the APE merge: ApeAttentionCuda equals ApeAttentionCpu (the fp64 reference) for
// every dtype, head_dim, decode and prefill, both split kernels, GQA, strided segments, with the
// outputs poisoned (NaN bytes) before the kernels run. Skips itself where there is no GPU.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/ape/ape.h"
#include "kernels/common/device.h"

namespace ropekv {
namespace {

using ::testing::HasSubstr;
using Kernel = ApeCudaOptions::Kernel;

#define ASSERT_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// Device memory owned for one test.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (cudaMalloc(&ptr_, bytes == 0 ? 16 : bytes) != cudaSuccess) ptr_ = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

// Random host bytes of dtype t, copied to the device.
struct HostDevice {
  std::vector<uint8_t> host;
  std::unique_ptr<DeviceBuffer> dev;
};

HostDevice RandomTensor(DType t, size_t n, std::mt19937& rng) {
  HostDevice hd;
  hd.host.resize(n * DTypeSize(t));
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (size_t i = 0; i < n; ++i) StoreFromFloat(hd.host.data(), i, t, dist(rng));
  hd.dev = std::make_unique<DeviceBuffer>(hd.host.size());
  if (hd.dev->get() != nullptr) {
    cudaMemcpy(hd.dev->get(), hd.host.data(), hd.host.size(), cudaMemcpyHostToDevice);
  }
  return hd;
}

struct GpuSegment {
  HostDevice k, v;
  KvSegment host_view, dev_view;
};

// Packed [kv_heads][tokens][d] or token-major [tokens][kv_heads][d] (explicit strides).
std::unique_ptr<GpuSegment> MakeSegment(DType t, int kv_heads, int64_t tokens, int d,
                                        bool token_major, std::mt19937& rng) {
  auto s = std::make_unique<GpuSegment>();
  s->k = RandomTensor(t, kv_heads * tokens * d, rng);
  s->v = RandomTensor(t, kv_heads * tokens * d, rng);
  KvSegment view;
  view.tokens = tokens;
  if (token_major) {
    view.head_stride = d;
    view.token_stride = static_cast<int64_t>(kv_heads) * d;
  }
  s->host_view = view;
  s->host_view.k = s->k.host.data();
  s->host_view.v = s->v.host.data();
  s->dev_view = view;
  s->dev_view.k = s->k.dev->get();
  s->dev_view.v = s->v.dev->get();
  return s;
}

struct Case {
  DType dtype = DType::kBF16;  // q and kv
  DType out_dtype = DType::kF32;
  int head_dim = 128;
  int q_heads = 8;
  int kv_heads = 2;
  int num_queries = 1;
  std::vector<int64_t> context_lens = {100, 37, 300, 64};
  int64_t prefix_len = 77;
  int64_t history_len = 0;  // earlier query / generated tokens before the current queries
  float temperature = 0.6f;
  float scale = 1.2f;
  ApeCudaOptions options;
  bool caller_workspace = false;
};

// Tolerance on |gpu - cpu| for an output element: relative to the largest |reference| value,
// plus one unit in the last place of the output type.
double PathTolerance(const Case& c, bool tensor_core) {
  if (!tensor_core) return 2e-5;                   // fp32 scores and weights throughout
  return c.dtype == DType::kBF16 ? 1.2e-2 : 2e-3;  // P rounded to bf16 / f16 for P.V
}

void RunCase(const Case& c) {
  if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  std::mt19937 rng(1000 + c.head_dim * 7 + c.num_queries * 13 + static_cast<int>(c.dtype));
  const int d = c.head_dim;
  AttentionShape shape;
  shape.num_queries = c.num_queries;
  shape.q_heads = c.q_heads;
  shape.kv_heads = c.kv_heads;
  shape.head_dim = d;
  shape.q_dtype = c.dtype;
  shape.kv_dtype = c.dtype;
  shape.out_dtype = c.out_dtype;

  HostDevice q = RandomTensor(c.dtype, static_cast<size_t>(c.num_queries) * c.q_heads * d, rng);
  std::vector<std::unique_ptr<GpuSegment>> segs;
  std::vector<KvSegment> ctx_host, ctx_dev, other_host, other_dev;
  bool token_major = false;
  for (int64_t len : c.context_lens) {
    segs.push_back(MakeSegment(c.dtype, c.kv_heads, len, d, token_major, rng));
    ctx_host.push_back(segs.back()->host_view);
    ctx_dev.push_back(segs.back()->dev_view);
    token_major = !token_major;
  }
  for (int64_t len : {c.prefix_len, c.history_len, static_cast<int64_t>(c.num_queries)}) {
    if (len == 0) continue;
    segs.push_back(MakeSegment(c.dtype, c.kv_heads, len, d, token_major, rng));
    other_host.push_back(segs.back()->host_view);
    other_dev.push_back(segs.back()->dev_view);
    token_major = !token_major;
  }
  for (auto& s : segs) ASSERT_NE(s->k.dev->get(), nullptr);

  // Reference, in f32.
  const size_t rows = static_cast<size_t>(c.num_queries) * c.q_heads;
  std::vector<float> ref(rows * d), ref_lse(rows);
  ApeArgs a;
  a.shape = shape;
  a.shape.out_dtype = DType::kF32;
  a.temperature = c.temperature;
  a.scale = c.scale;
  a.q = q.host.data();
  a.context = ctx_host;
  a.other = other_host;
  a.out = ref.data();
  a.lse = ref_lse.data();
  ASSERT_TRUE(ApeAttentionCpu(a).ok());

  // GPU, outputs poisoned with NaN bytes.
  const size_t out_bytes = rows * d * DTypeSize(c.out_dtype);
  DeviceBuffer out(out_bytes), lse(rows * sizeof(float));
  ASSERT_NE(out.get(), nullptr);
  ASSERT_CUDA_OK(cudaMemset(out.get(), 0xff, out_bytes));
  ASSERT_CUDA_OK(cudaMemset(lse.get(), 0xff, rows * sizeof(float)));
  ApeArgs g = a;
  g.shape.out_dtype = c.out_dtype;
  g.q = q.dev->get();
  g.context = ctx_dev;
  g.other = other_dev;
  g.out = out.get();
  g.lse = static_cast<float*>(lse.get());
  cudaStream_t stream;
  ASSERT_CUDA_OK(cudaStreamCreate(&stream));
  std::unique_ptr<DeviceBuffer> ws;
  if (c.caller_workspace) {
    absl::StatusOr<size_t> bytes = ApeCudaWorkspaceBytes(g, c.options);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    ws = std::make_unique<DeviceBuffer>(*bytes);
    ASSERT_CUDA_OK(cudaMemset(ws->get(), 0xff, *bytes));
    const absl::Status st = ApeAttentionCuda(g, ws->get(), *bytes, stream, c.options);
    ASSERT_TRUE(st.ok()) << st;
  } else {
    const absl::Status st = ApeAttentionCuda(g, nullptr, 0, stream, c.options);
    ASSERT_TRUE(st.ok()) << st;
  }
  ASSERT_CUDA_OK(cudaStreamSynchronize(stream));
  ASSERT_CUDA_OK(cudaStreamDestroy(stream));
  std::vector<uint8_t> got(out_bytes);
  std::vector<float> got_lse(rows);
  ASSERT_CUDA_OK(cudaMemcpy(got.data(), out.get(), out_bytes, cudaMemcpyDeviceToHost));
  ASSERT_CUDA_OK(
      cudaMemcpy(got_lse.data(), lse.get(), rows * sizeof(float), cudaMemcpyDeviceToHost));

  const bool tensor_core = c.options.kernel == Kernel::kTensorCore ||
                           (c.options.kernel == Kernel::kAuto && c.dtype != DType::kF32 &&
                            d <= 128 && c.num_queries * (c.q_heads / c.kv_heads) >= 32);
  double max_ref = 0;
  for (float x : ref) max_ref = std::max(max_ref, std::fabs(static_cast<double>(x)));
  ASSERT_GT(max_ref, 0.0);
  const double tol = PathTolerance(c, tensor_core) * max_ref;
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double v = LoadAsFloat(got.data(), i, c.out_dtype);
    const double err = std::fabs(v - ref[i]);
    worst = std::max(worst, err);
    ASSERT_LE(err, tol + UlpOf(c.out_dtype, ref[i]))
        << "element " << i << " (query " << i / (c.q_heads * d) << ", head " << (i / d) % c.q_heads
        << ", dim " << i % d << "): gpu " << v << " cpu " << ref[i];
  }
  for (size_t r = 0; r < rows; ++r) {
    ASSERT_NEAR(got_lse[r], ref_lse[r], 2e-4 * (1 + std::fabs(ref_lse[r]))) << "row " << r;
  }
  ::testing::Test::RecordProperty("max_abs_err", std::to_string(worst));
}

// ---------------------------------------------------------------------------------------------

using GridParam = std::tuple<DType, int /*head_dim*/, int /*num_queries*/, Kernel>;

class ApeGpuGridTest : public ::testing::TestWithParam<GridParam> {};

TEST_P(ApeGpuGridTest, MatchesCpuReference) {
  const auto [dtype, head_dim, n, kernel] = GetParam();
  const bool tc_ok = dtype != DType::kF32 && head_dim <= 128;
  if (kernel == Kernel::kTensorCore && !tc_ok) GTEST_SKIP() << "no tensor-core kernel for this";
  Case c;
  c.dtype = dtype;
  c.head_dim = head_dim;
  c.num_queries = n;
  c.options.kernel = kernel;
  RunCase(c);
}

INSTANTIATE_TEST_SUITE_P(
    Grid, ApeGpuGridTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(64, 96, 128, 256), ::testing::Values(1, 7, 40),
                       ::testing::Values(Kernel::kAuto, Kernel::kGeneric, Kernel::kTensorCore)),
    [](const ::testing::TestParamInfo<GridParam>& info) {
      const Kernel k = std::get<3>(info.param);
      return std::string(DTypeName(std::get<0>(info.param))) + "_d" +
             std::to_string(std::get<1>(info.param)) + "_n" +
             std::to_string(std::get<2>(info.param)) +
             (k == Kernel::kAuto ? "_auto" : (k == Kernel::kGeneric ? "_generic" : "_tc"));
    });

// Small splits: many partial results per group, merged by the combine kernel.
TEST(ApeGpuTest, ManySmallSplits) {
  for (Kernel k : {Kernel::kGeneric, Kernel::kTensorCore}) {
    Case c;
    c.num_queries = 20;
    c.options.kernel = k;
    c.options.split_tokens = 64;
    c.history_len = 50;
    SCOPED_TRACE(k == Kernel::kGeneric ? "generic" : "tensor core");
    RunCase(c);
  }
}

// Output in the input dtype (rounded once), caller-provided workspace.
TEST(ApeGpuTest, HalfOutputsAndCallerWorkspace) {
  for (DType t : {DType::kF16, DType::kBF16}) {
    for (int n : {1, 33}) {
      Case c;
      c.dtype = t;
      c.out_dtype = t;
      c.num_queries = n;
      c.caller_workspace = true;
      SCOPED_TRACE(testing::Message() << DTypeName(t) << " n " << n);
      RunCase(c);
    }
  }
}

// GQA groups 1 (MHA), 8 and 16 query heads per KV head; T = S = 1; no context at all.
TEST(ApeGpuTest, GroupsAndEdgeShapes) {
  for (auto [hq, hkv] : std::vector<std::pair<int, int>>{{4, 4}, {16, 2}, {16, 1}}) {
    for (int n : {1, 9}) {
      Case c;
      c.q_heads = hq;
      c.kv_heads = hkv;
      c.num_queries = n;
      SCOPED_TRACE(testing::Message() << "hq " << hq << " hkv " << hkv << " n " << n);
      RunCase(c);
    }
  }
  Case unit;
  unit.temperature = 1.0f;
  unit.scale = 1.0f;
  unit.num_queries = 5;
  RunCase(unit);
  Case no_context;
  no_context.context_lens = {};
  no_context.num_queries = 3;
  RunCase(no_context);
  Case no_prefix;
  no_prefix.prefix_len = 0;
  no_prefix.num_queries = 64;
  RunCase(no_prefix);
}

// A Llama-3-8B-shaped layer (32 q heads, 8 KV heads, d 128, bf16) with the automatic plan:
// decode and a 16-token prefill over a 512-token prefix and 4 contexts of 1K.
TEST(ApeGpuTest, LlamaShapedAutoPlan) {
  for (int n : {1, 16}) {
    Case c;
    c.q_heads = 32;
    c.kv_heads = 8;
    c.num_queries = n;
    c.context_lens = {1024, 1024, 1024, 1024};
    c.prefix_len = 512;
    c.history_len = 64;
    c.temperature = 0.5f;
    c.scale = 0.9f;
    SCOPED_TRACE(testing::Message() << "n " << n);
    RunCase(c);
  }
}

// ---------------------------------------------------------------------------------------------
// Errors of the CUDA path.

class ApeGpuErrorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
    std::mt19937 rng(5);
    q_ = RandomTensor(DType::kBF16, 4 * 128, rng);
    seg_ = MakeSegment(DType::kBF16, 1, 70, 128, false, rng);
    out_ = std::make_unique<DeviceBuffer>(4 * 128 * 4);
    views_ = {seg_->dev_view};
  }
  ApeArgs Good() {
    ApeArgs a;
    a.shape = {1, 4, 1, 128, DType::kBF16, DType::kBF16, DType::kF32};
    a.q = q_.dev->get();
    a.context = views_;
    a.other = views_;
    a.out = out_->get();
    return a;
  }
  void ExpectInvalid(const ApeArgs& a, const ApeCudaOptions& o, const std::string& needle) {
    const absl::Status st = ApeAttentionCuda(a, nullptr, 0, nullptr, o);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr(needle));
  }

  HostDevice q_;
  std::unique_ptr<GpuSegment> seg_;
  std::unique_ptr<DeviceBuffer> out_;
  std::vector<KvSegment> views_;
};

TEST_F(ApeGpuErrorTest, GoodCallPasses) {
  ASSERT_TRUE(ApeAttentionCuda(Good(), nullptr, 0, nullptr).ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

TEST_F(ApeGpuErrorTest, UnsupportedHeadDimAndKernel) {
  ApeArgs a = Good();
  a.shape.head_dim = 80;
  ExpectInvalid(a, {}, "head_dim must be 64, 96, 128 or 256, got 80");
  a = Good();
  a.shape.q_dtype = DType::kF32;
  ApeCudaOptions tc;
  tc.kernel = Kernel::kTensorCore;
  ExpectInvalid(a, tc, "tensor-core kernel needs q and kv of one dtype");
  ApeCudaOptions split;
  split.split_tokens = 100;
  ExpectInvalid(Good(), split, "split_tokens must be 0 (auto) or a positive multiple of 64");
}

TEST_F(ApeGpuErrorTest, MisalignedSegment) {
  std::vector<KvSegment> v = views_;
  v[0].k = static_cast<const char*>(v[0].k) + 2;
  v[0].tokens = 10;
  ApeArgs a = Good();
  a.context = v;
  ExpectInvalid(a, {}, "context[0] k, v and strides must be 16-byte aligned");
  v = views_;
  v[0].token_stride = 132;  // 264 bytes
  v[0].tokens = 10;
  a = Good();
  a.other = v;
  ExpectInvalid(a, {}, "other[0] k, v and strides must be 16-byte aligned");
}

TEST_F(ApeGpuErrorTest, TooManySegmentsAndSmallWorkspace) {
  std::vector<KvSegment> many(kApeCudaMaxSegments, views_[0]);
  ApeArgs a = Good();
  a.context = many;
  ExpectInvalid(a, {}, "at most 64 non-empty segments, got 65");
  a = Good();
  absl::StatusOr<size_t> bytes = ApeCudaWorkspaceBytes(a);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  DeviceBuffer ws(*bytes);
  const absl::Status st = ApeAttentionCuda(a, ws.get(), *bytes - 1, nullptr);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("workspace must be 16-byte aligned and hold"));
  a.other = {};
  ExpectInvalid(a, {}, "expected at least num_queries = 1 tokens, got 0");
}

}  // namespace
}  // namespace ropekv
