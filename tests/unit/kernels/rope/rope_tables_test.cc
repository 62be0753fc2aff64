// Tests of RopeSpec validation, table ids, InvFreq (fp32, as HF) against the closed form in fp64,
// and attention factors against hand-computed values.
#include <cmath>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace {

using ::testing::HasSubstr;

RopeSpec Llama3Spec() {
  RopeSpec s;
  s.type = RopeType::kLlama3;
  s.theta = 500000.0;
  s.head_dim = 128;
  s.factor = 8.0;
  s.low_freq_factor = 1.0;
  s.high_freq_factor = 4.0;
  s.original_max_position_embeddings = 8192;
  s.max_position_embeddings = 131072;
  return s;
}

RopeSpec YarnSpec() {
  RopeSpec s;
  s.type = RopeType::kYarn;
  s.theta = 1000000.0;
  s.head_dim = 128;
  s.factor = 4.0;
  s.original_max_position_embeddings = 32768;
  s.max_position_embeddings = 131072;
  return s;
}

RopeSpec LongRopeSpec(int head_dim = 96) {
  RopeSpec s;
  s.type = RopeType::kLongRope;
  s.theta = 10000.0;
  s.head_dim = head_dim;
  s.max_position_embeddings = 131072;
  s.original_max_position_embeddings = 4096;
  s.factor = 0.0;  // derived: 131072 / 4096 = 32 (Phi-3 style)
  for (int i = 0; i < head_dim / 2; ++i) {
    s.short_factor.push_back(1.0 + 0.05 * i);
    s.long_factor.push_back(1.0 + 0.9 * i);
  }
  return s;
}

RopeSpec DynamicSpec() {
  RopeSpec s;
  s.type = RopeType::kDynamic;
  s.theta = 10000.0;
  s.head_dim = 128;
  s.factor = 2.0;
  s.max_position_embeddings = 4096;
  return s;
}

TEST(RopeSpecTest, ValidSpecsPass) {
  RopeSpec d;
  d.head_dim = 64;
  EXPECT_TRUE(ValidateRopeSpec(d).ok());
  EXPECT_TRUE(ValidateRopeSpec(Llama3Spec()).ok());
  EXPECT_TRUE(ValidateRopeSpec(YarnSpec()).ok());
  EXPECT_TRUE(ValidateRopeSpec(LongRopeSpec()).ok());
  EXPECT_TRUE(ValidateRopeSpec(DynamicSpec()).ok());
}

TEST(RopeSpecTest, InvalidFieldsAreNamed) {
  struct Case {
    RopeSpec spec;
    std::string field;
  };
  std::vector<Case> cases;
  RopeSpec s;
  s.head_dim = 0;
  cases.push_back({s, "head_dim"});
  s.head_dim = 64;
  s.rotary_dim = 66;
  cases.push_back({s, "rotary_dim"});
  s.rotary_dim = 31;
  cases.push_back({s, "rotary_dim"});
  s.rotary_dim = 0;
  s.theta = -1;
  cases.push_back({s, "theta"});
  s.theta = 10000;
  s.attention_factor = 2.0;
  cases.push_back({s, "attention_factor"});
  RopeSpec l = Llama3Spec();
  l.original_max_position_embeddings = 0;
  cases.push_back({l, "original_max_position_embeddings"});
  l = Llama3Spec();
  l.high_freq_factor = 0.5;
  cases.push_back({l, "high_freq_factor"});
  RopeSpec dyn = DynamicSpec();
  dyn.max_position_embeddings = 0;
  cases.push_back({dyn, "max_position_embeddings"});
  RopeSpec lr = LongRopeSpec();
  lr.long_factor.pop_back();
  cases.push_back({lr, "long_factor"});
  lr = LongRopeSpec();
  lr.short_factor[3] = -1;
  cases.push_back({lr, "short_factor[3]"});
  RopeSpec y = YarnSpec();
  y.beta_fast = 0;
  cases.push_back({y, "beta_fast"});
  for (const Case& c : cases) {
    absl::Status st = ValidateRopeSpec(c.spec);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(st.message()), HasSubstr("rope." + c.field)) << st;
  }
}

TEST(RopeTableTest, CanonicalIds) {
  RopeSpec dyn = DynamicSpec();
  EXPECT_EQ(RopeTableFor(dyn, 1), kBaseTable);
  EXPECT_EQ(RopeTableFor(dyn, 4096), kBaseTable);
  EXPECT_EQ(RopeTableFor(dyn, 4097), 4097);
  EXPECT_TRUE(ValidateRopeTable(dyn, 0).ok());
  EXPECT_TRUE(ValidateRopeTable(dyn, 9000).ok());
  EXPECT_EQ(ValidateRopeTable(dyn, 100).code(), absl::StatusCode::kInvalidArgument);
  RopeSpec lr = LongRopeSpec();
  EXPECT_EQ(RopeTableFor(lr, 4096), kLongRopeShortTable);
  EXPECT_EQ(RopeTableFor(lr, 4097), kLongRopeLongTable);
  EXPECT_EQ(ValidateRopeTable(lr, 2).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RopeTableFor(Llama3Spec(), 1 << 20), kBaseTable);
  EXPECT_EQ(ValidateRopeTable(Llama3Spec(), 1).code(), absl::StatusCode::kInvalidArgument);
}

// Every fp32 table against its fp64 closed form: a handful of fp32 roundings apart.
TEST(InvFreqTest, MatchesClosedForm) {
  std::vector<std::pair<RopeSpec, RopeTableId>> cases;
  RopeSpec d;
  d.head_dim = 128;
  cases.push_back({d, 0});
  d.rotary_dim = 32;
  cases.push_back({d, 0});
  RopeSpec lin = d;
  lin.type = RopeType::kLinear;
  lin.factor = 3.0;
  cases.push_back({lin, 0});
  cases.push_back({Llama3Spec(), 0});
  cases.push_back({YarnSpec(), 0});
  RopeSpec ym = YarnSpec();
  ym.truncate = false;
  cases.push_back({ym, 0});
  cases.push_back({LongRopeSpec(), 0});
  cases.push_back({LongRopeSpec(), 1});
  cases.push_back({DynamicSpec(), 0});
  cases.push_back({DynamicSpec(), 10000});
  cases.push_back({DynamicSpec(), 131072});
  for (const auto& [spec, table] : cases) {
    const std::vector<float> f = InvFreq(spec, table);
    const std::vector<double> ref = InvFreq64(spec, table);
    ASSERT_EQ(f.size(), static_cast<size_t>(RotaryDim(spec) / 2));
    ASSERT_EQ(ref.size(), f.size());
    for (size_t i = 0; i < f.size(); ++i) {
      // Dynamic's grown base goes through an fp32 pow of (s*L/L_max - (s-1)): ~1e-6 relative in
      // the base, amplified by the exponent 2i/d <= 1.
      const double tol = spec.type == RopeType::kDynamic && table != 0 ? 8e-6 : 2e-6;
      EXPECT_NEAR(f[i] / ref[i], 1.0, tol)
          << RopeTypeName(spec.type) << " table " << table << " i " << i;
    }
  }
}

TEST(InvFreqTest, DefaultIsHfFloat32Formula) {
  RopeSpec d;
  d.head_dim = 128;
  d.theta = 500000.0;
  const std::vector<float> f = InvFreq(d, 0);
  EXPECT_EQ(f[0], 1.0f);
  for (int i = 0; i < 64; ++i) {
    // fl32(1 / fl32(pow(500000f, fl32(2i/128))))
    const float e = static_cast<float>(2 * i) / 128.0f;
    const float p = static_cast<float>(std::pow(500000.0, static_cast<double>(e)));
    EXPECT_EQ(f[i], 1.0f / p) << i;
  }
}

TEST(InvFreqTest, Llama3Bands) {
  const RopeSpec s = Llama3Spec();
  RopeSpec d = s;
  d.type = RopeType::kDefault;
  const std::vector<float> f = InvFreq(s, 0);
  const std::vector<float> base = InvFreq(d, 0);
  int high = 0, low = 0, medium = 0;
  for (size_t i = 0; i < f.size(); ++i) {
    const double wavelen = 2 * M_PI / base[i];
    if (wavelen < 8192.0 / 4.0) {
      EXPECT_EQ(f[i], base[i]) << i;
      ++high;
    } else if (wavelen > 8192.0) {
      EXPECT_EQ(f[i], base[i] / 8.0f) << i;
      ++low;
    } else {
      EXPECT_LT(f[i], base[i]);
      EXPECT_GT(f[i], base[i] / 8.0f);
      ++medium;
    }
  }
  EXPECT_GT(high, 0);
  EXPECT_GT(low, 0);
  EXPECT_GT(medium, 0);
}

TEST(InvFreqTest, DynamicGrowsBaseAndLongRopeSwitches) {
  const RopeSpec dyn = DynamicSpec();
  const std::vector<float> base = InvFreq(dyn, 0);
  const std::vector<float> grown = InvFreq(dyn, 16384);
  EXPECT_EQ(grown[0], 1.0f);
  for (size_t i = 1; i < base.size(); ++i) EXPECT_LT(grown[i], base[i]) << i;
  // The base table of dynamic is the default table.
  RopeSpec d = dyn;
  d.type = RopeType::kDefault;
  d.factor = 1.0;
  EXPECT_EQ(base, InvFreq(d, 0));

  const RopeSpec lr = LongRopeSpec();
  const std::vector<float> s = InvFreq(lr, 0), l = InvFreq(lr, 1);
  for (size_t i = 1; i < s.size(); ++i) EXPECT_LT(l[i], s[i]) << i;
}

TEST(AttentionFactorTest, PerType) {
  RopeSpec d;
  d.head_dim = 64;
  EXPECT_EQ(AttentionFactor(d), 1.0f);
  EXPECT_EQ(AttentionFactor(Llama3Spec()), 1.0f);
  EXPECT_EQ(AttentionFactor(DynamicSpec()), 1.0f);
  RopeSpec y = YarnSpec();
  EXPECT_FLOAT_EQ(AttentionFactor(y), static_cast<float>(0.1 * std::log(4.0) + 1.0));
  y.mscale = 0.707;
  y.mscale_all_dim = 0.707;
  EXPECT_EQ(AttentionFactor(y), 1.0f);  // DeepSeek-V3 style: equal mscales cancel
  y.mscale = 1.0;
  y.mscale_all_dim = 0.5;
  EXPECT_FLOAT_EQ(AttentionFactor(y),
                  static_cast<float>((0.1 * std::log(4.0) + 1) / (0.05 * std::log(4.0) + 1)));
  y.attention_factor = 1.25;
  EXPECT_EQ(AttentionFactor(y), 1.25f);
  RopeSpec lr = LongRopeSpec();
  EXPECT_FLOAT_EQ(AttentionFactor(lr),
                  static_cast<float>(std::sqrt(1 + std::log(32.0) / std::log(4096.0))));
  lr.factor = 1.0;
  EXPECT_EQ(AttentionFactor(lr), 1.0f);
}

}  // namespace
}  // namespace ropekv
