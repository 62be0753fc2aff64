// GPU tests of RerotateEngine (kernels/rope/rerotate_cuda.h): the CUDA kernel equals the CPU
// reference RerotateCopyCpu over random shapes, every dtype, head_dim 64/80/96/128/256, both
// layouts, partial rotary, every rope_type (length-dependent ones across two tables), both modes,
// many jobs of different deltas in one launch (identity and keys-only jobs among them), strided
// destinations, in place, and misaligned buffers (narrower vectors). Destinations are poisoned
// (0xFF) first, so an unwritten element or a byte written outside the jobs fails the comparison.
// Skips itself without a GPU.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"
#include "kernels/rope/rerotate_cuda.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace {

#define ASSERT_CUDA(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

// Device buffer with RAII.
struct DeviceBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit DeviceBuffer(size_t n) : bytes(n) {
    if (cudaMalloc(&ptr, n) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
};

enum class Case { kDefault, kLlama3, kYarnMscale, kDynamicAcross, kLongRopeAcross };

const char* CaseName(Case c) {
  switch (c) {
    case Case::kDefault:
      return "default";
    case Case::kLlama3:
      return "llama3";
    case Case::kYarnMscale:
      return "yarn_mscale";
    case Case::kDynamicAcross:
      return "dynamic";
    case Case::kLongRopeAcross:
      return "longrope";
  }
  return "?";
}

RopeSpec SpecFor(Case c, int head_dim, int rotary_dim, PairLayout layout) {
  RopeSpec s;
  s.head_dim = head_dim;
  s.rotary_dim = rotary_dim;
  s.layout = layout;
  switch (c) {
    case Case::kDefault:
      break;
    case Case::kLlama3:
      s.type = RopeType::kLlama3;
      s.theta = 500000.0;
      s.factor = 8.0;
      s.original_max_position_embeddings = 8192;
      break;
    case Case::kYarnMscale:
      s.type = RopeType::kYarn;
      s.factor = 40.0;
      s.original_max_position_embeddings = 4096;
      s.mscale = 1.0;
      s.mscale_all_dim = 0.5;
      break;
    case Case::kDynamicAcross:
      s.type = RopeType::kDynamic;
      s.factor = 2.0;
      s.max_position_embeddings = 4096;
      break;
    case Case::kLongRopeAcross:
      s.type = RopeType::kLongRope;
      s.max_position_embeddings = 131072;
      s.original_max_position_embeddings = 4096;
      s.factor = 0.0;
      for (int i = 0; i < RotaryDim(s) / 2; ++i) {
        s.short_factor.push_back(1.0 + 0.03 * i);
        s.long_factor.push_back(1.0 + 1.7 * i);
      }
      break;
  }
  return s;
}

// Two table ids of a case (equal for static types).
std::pair<RopeTableId, RopeTableId> Tables(Case c) {
  if (c == Case::kDynamicAcross) return {0, 20000};
  if (c == Case::kLongRopeAcross) return {kLongRopeShortTable, kLongRopeLongTable};
  return {0, 0};
}

void FillRandom(std::vector<uint8_t>* bytes, DType dtype, std::mt19937_64& rng) {
  std::uniform_real_distribution<float> mag(0.05f, 2.0f);
  std::bernoulli_distribution sign(0.5);
  for (size_t i = 0; i < bytes->size() / DTypeSize(dtype); ++i) {
    StoreFromFloat(bytes->data(), i, dtype, mag(rng) * (sign(rng) ? -1.0f : 1.0f));
  }
}

struct CompareStats {
  int64_t elements = 0;
  int64_t not_bit_exact = 0;
  double worst_ulp = 0;
};

// Compares GPU and CPU destination buffers element by element: bit-equal, or both finite and
// within `tol_ulp` ulps (sin/cos of CUDA and libm may round a coefficient differently).
void CompareBuffers(const std::vector<uint8_t>& gpu, const std::vector<uint8_t>& cpu, DType dtype,
                    double tol_ulp, CompareStats* stats, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size());
  const size_t es = DTypeSize(dtype);
  for (size_t i = 0; i < gpu.size() / es; ++i) {
    ++stats->elements;
    if (std::memcmp(gpu.data() + i * es, cpu.data() + i * es, es) == 0) continue;
    ++stats->not_bit_exact;
    const float g = LoadAsFloat(gpu.data(), i, dtype), c = LoadAsFloat(cpu.data(), i, dtype);
    ASSERT_TRUE(std::isfinite(g) && std::isfinite(c))
        << what << ": element " << i << " gpu " << g << " cpu " << c
        << " (NaN: unwritten or written outside the jobs)";
    const double ulp = std::fabs(g - c) / UlpOf(dtype, std::max(std::fabs(g), std::fabs(c)));
    stats->worst_ulp = std::max(stats->worst_ulp, ulp);
    ASSERT_LE(ulp, tol_ulp) << what << ": element " << i << " gpu " << g << " cpu " << c;
  }
}

using Param = std::tuple<DType, int /*head_dim*/, PairLayout, int /*rotary divisor*/, Case>;

class RerotateGpuTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

// Many jobs of different deltas in one launch: block source [L][2][H][T][D] -> paged destination
// [L][2][T_dst][H][D] (different strides), against the CPU reference on the same host bytes.
TEST_P(RerotateGpuTest, EqualsCpuReferenceManyJobsOneLaunch) {
  const auto [dtype, head_dim, layout, div, c] = GetParam();
  const RopeSpec spec = SpecFor(c, head_dim, head_dim / div, layout);
  ASSERT_TRUE(ValidateRopeSpec(spec).ok()) << ValidateRopeSpec(spec);
  auto engine_or = RerotateEngine::Create(spec);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  RerotateEngine& engine = **engine_or;
  const auto [table_a, table_b] = Tables(c);

  std::mt19937_64 rng(static_cast<uint64_t>(head_dim) * 131 + static_cast<int>(dtype) * 17 +
                      static_cast<int>(c) * 7 + div + static_cast<int>(layout) * 3);
  const int layers = 3, heads = 2, src_tokens = 96, dst_tokens = 400;
  const size_t es = DTypeSize(dtype);
  const KvGeometry geometry{layers, heads, head_dim, dtype};
  const KvStrides src_strides{int64_t{2} * heads * src_tokens * head_dim,
                              int64_t{heads} * src_tokens * head_dim,
                              int64_t{src_tokens} * head_dim, head_dim};
  const KvStrides dst_strides{int64_t{2} * dst_tokens * heads * head_dim,
                              int64_t{dst_tokens} * heads * head_dim, head_dim,
                              int64_t{heads} * head_dim};
  std::vector<uint8_t> src(static_cast<size_t>(layers) * 2 * heads * src_tokens * head_dim * es);
  FillRandom(&src, dtype, rng);
  std::vector<uint8_t> dst_cpu(static_cast<size_t>(layers) * 2 * dst_tokens * heads * head_dim * es,
                               0xFF);

  // Jobs: consecutive destination ranges with gaps (never written), mixed deltas and tables.
  const int64_t kPos[] = {0, 1, 255, 256, 8191, 8192, 32767, 131071, 1048575};
  std::uniform_int_distribution<int> pos_pick(0, 8);
  std::uniform_int_distribution<int> len_pick(1, 40);
  std::vector<RerotateCopy> jobs;
  int64_t dst_cursor = 1;
  for (int j = 0; dst_cursor < dst_tokens - 45; ++j) {
    RerotateCopy job;
    job.n_tokens = len_pick(rng);
    job.src_token = std::uniform_int_distribution<int64_t>(0, src_tokens - job.n_tokens)(rng);
    job.dst_token = dst_cursor;
    dst_cursor += job.n_tokens + (j % 3);  // gaps stay poisoned
    job.from_pos = kPos[pos_pick(rng)] + j;
    job.to_pos = j % 7 == 3 ? job.from_pos : kPos[pos_pick(rng)];
    job.from_table = j % 2 == 0 ? table_a : table_b;
    job.to_table = j % 7 == 3 ? job.from_table : (j % 3 == 0 ? table_b : table_a);
    job.keys_only = j % 5 == 4;
    job.src_strides = src_strides;
    job.dst_strides = dst_strides;
    jobs.push_back(job);
  }
  ASSERT_GT(jobs.size(), 10u);

  DeviceBuffer d_src(src.size()), d_dst(dst_cpu.size());
  ASSERT_NE(d_src.ptr, nullptr);
  ASSERT_NE(d_dst.ptr, nullptr);
  ASSERT_CUDA(cudaMemcpy(d_src.ptr, src.data(), src.size(), cudaMemcpyHostToDevice));
  cudaStream_t stream;
  ASSERT_CUDA(cudaStreamCreate(&stream));
  for (RerotateMode mode : {RerotateMode::kEngine, RerotateMode::kExact}) {
    std::fill(dst_cpu.begin(), dst_cpu.end(), 0xFF);
    ASSERT_CUDA(cudaMemset(d_dst.ptr, 0xFF, dst_cpu.size()));
    std::vector<RerotateCopy> host_jobs = jobs, dev_jobs = jobs;
    for (size_t j = 0; j < jobs.size(); ++j) {
      host_jobs[j].src = src.data();
      host_jobs[j].dst = dst_cpu.data();
      dev_jobs[j].src = d_src.ptr;
      dev_jobs[j].dst = d_dst.ptr;
    }
    ASSERT_TRUE(RerotateCopyCpu(spec, geometry, host_jobs, mode).ok());
    const absl::Status st = engine.RerotateCopyCuda(geometry, dev_jobs, mode, stream);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_CUDA(cudaStreamSynchronize(stream));
    std::vector<uint8_t> dst_gpu(dst_cpu.size());
    ASSERT_CUDA(cudaMemcpy(dst_gpu.data(), d_dst.ptr, dst_gpu.size(), cudaMemcpyDeviceToHost));
    CompareStats stats;
    CompareBuffers(dst_gpu, dst_cpu, dtype, 1.0, &stats,
                   mode == RerotateMode::kEngine ? "engine" : "exact");
    // Differences come only from fp64 sin/cos rounding to a different fp32 coefficient half.
    EXPECT_LE(stats.not_bit_exact, std::max<int64_t>(2, stats.elements / 10000))
        << stats.not_bit_exact << " of " << stats.elements << " not bit-exact";
    RecordProperty(mode == RerotateMode::kEngine ? "engine_not_bit_exact" : "exact_not_bit_exact",
                   absl::StrCat(stats.not_bit_exact, "/", stats.elements));
  }
  ASSERT_CUDA(cudaStreamDestroy(stream));
}

std::string ParamName(const ::testing::TestParamInfo<Param>& info) {
  const auto [dtype, head_dim, layout, div, c] = info.param;
  return absl::StrCat(DTypeName(dtype), "_d", head_dim, "_",
                      layout == PairLayout::kNeox ? "neox" : "gptj", "_r", head_dim / div, "_",
                      CaseName(c));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, RerotateGpuTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kF16, DType::kBF16),
                       ::testing::Values(64, 80, 96, 128, 256),
                       ::testing::Values(PairLayout::kNeox, PairLayout::kGptj),
                       ::testing::Values(1, 2, 4),
                       ::testing::Values(Case::kDefault, Case::kLlama3, Case::kYarnMscale,
                                         Case::kDynamicAcross, Case::kLongRopeAcross)),
    ParamName);

class RerotateGpuMiscTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GpuAvailable()) GTEST_SKIP() << "no CUDA device";
  }
};

// In place (src == dst) and misaligned regions (element offsets that rule out 16-byte vectors)
// equal the CPU reference; a 2048-token job (many tiles) and a 1-token job share the launch.
TEST_F(RerotateGpuMiscTest, InPlaceMisalignedAndLargeJobs) {
  RopeSpec spec = SpecFor(Case::kLlama3, 128, 0, PairLayout::kNeox);
  auto engine_or = RerotateEngine::Create(spec);
  ASSERT_TRUE(engine_or.ok()) << engine_or.status();
  for (int offset_elems : {0, 1, 2, 4}) {
    const int layers = 4, heads = 8, tokens = 2100;
    const DType dtype = DType::kBF16;
    const KvGeometry geometry{layers, heads, 128, dtype};
    // One extra element at the front shifts every row's alignment.
    const int64_t row = 128;
    const KvStrides strides{2 * heads * tokens * row, heads * tokens * row, tokens * row, row};
    std::vector<uint8_t> buf((static_cast<size_t>(layers) * 2 * heads * tokens * row + 8) * 2);
    std::mt19937_64 rng(offset_elems + 1);
    FillRandom(&buf, dtype, rng);
    std::vector<uint8_t> cpu = buf;
    DeviceBuffer d(buf.size());
    ASSERT_NE(d.ptr, nullptr);
    ASSERT_CUDA(cudaMemcpy(d.ptr, buf.data(), buf.size(), cudaMemcpyHostToDevice));
    RerotateCopy big;
    big.src_strides = big.dst_strides = strides;
    big.src_token = big.dst_token = 10;
    big.n_tokens = 2048;
    big.from_pos = 70000;
    big.to_pos = 12;
    RerotateCopy small = big;
    small.src_token = small.dst_token = 5;
    small.n_tokens = 1;
    small.from_pos = 3;
    small.to_pos = 1048575;
    std::vector<RerotateCopy> host = {big, small}, dev = {big, small};
    for (auto& j : host) j.src = j.dst = cpu.data() + offset_elems * 2;
    for (auto& j : dev) j.src = j.dst = static_cast<uint8_t*>(d.ptr) + offset_elems * 2;
    ASSERT_TRUE(RerotateCopyCpu(spec, geometry, host).ok());
    const absl::Status st =
        (*engine_or)->RerotateCopyCuda(geometry, dev, RerotateMode::kEngine, nullptr);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_CUDA(cudaDeviceSynchronize());
    std::vector<uint8_t> gpu(buf.size());
    ASSERT_CUDA(cudaMemcpy(gpu.data(), d.ptr, gpu.size(), cudaMemcpyDeviceToHost));
    CompareStats stats;
    CompareBuffers(gpu, cpu, dtype, 1.0, &stats, absl::StrCat("offset ", offset_elems));
    EXPECT_LE(stats.not_bit_exact, stats.elements / 10000 + 2);
  }
}

TEST_F(RerotateGpuMiscTest, InvalidInputsAreInvalidArgument) {
  RopeSpec spec;
  spec.head_dim = 72;
  EXPECT_EQ(RerotateEngine::Create(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec.head_dim = 128;
  spec.rotary_dim = 5;
  EXPECT_EQ(RerotateEngine::Create(spec).status().code(), absl::StatusCode::kInvalidArgument);
  spec.rotary_dim = 0;
  auto engine_or = RerotateEngine::Create(spec);
  ASSERT_TRUE(engine_or.ok());
  DeviceBuffer d(1 << 20);
  RerotateCopy job;
  job.src = job.dst = d.ptr;
  job.src_strides = job.dst_strides = {2 * 128 * 4, 128 * 4, 128 * 4, 128};
  job.n_tokens = 4;
  job.to_pos = 9;
  const KvGeometry geometry{1, 1, 128, DType::kF16};
  RerotateCopy bad = job;
  bad.to_table = 5;
  EXPECT_EQ(
      (*engine_or)->RerotateCopyCuda(geometry, {&bad, 1}, RerotateMode::kEngine, nullptr).code(),
      absl::StatusCode::kInvalidArgument);
  KvGeometry wrong = geometry;
  wrong.head_dim = 64;
  EXPECT_EQ((*engine_or)->RerotateCopyCuda(wrong, {&job, 1}, RerotateMode::kEngine, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  // Odd element misalignment of an fp32 GPT-J pair cannot be vectorized by pairs.
  RopeSpec gptj = spec;
  gptj.layout = PairLayout::kGptj;
  auto g_or = RerotateEngine::Create(gptj);
  ASSERT_TRUE(g_or.ok());
  RerotateCopy odd = job;
  odd.src = static_cast<char*>(d.ptr) + 4;
  const KvGeometry f32{1, 1, 128, DType::kF32};
  EXPECT_EQ((*g_or)->RerotateCopyCuda(f32, {&odd, 1}, RerotateMode::kEngine, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE((*engine_or)->RerotateCopyCuda(geometry, {}, RerotateMode::kEngine, nullptr).ok());
  ASSERT_CUDA(cudaDeviceSynchronize());
}

}  // namespace
}  // namespace ropekv
