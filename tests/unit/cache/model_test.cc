#include "cache/model.h"

#include "gtest/gtest.h"

namespace ropekv {
namespace {

TEST(ModelTest, DemoSpecIsValidAndSized) {
  const ModelSpec spec = DemoModelSpec();
  ASSERT_TRUE(ValidateModelSpec(spec).ok());
  EXPECT_EQ(BlockBytes(spec), 4u * 2 * 2 * 16 * 64 * 2);
  const KvStrides s = BlockStrides(spec);
  EXPECT_EQ(s.token, 64);
  EXPECT_EQ(s.head, 64 * 16);
  EXPECT_EQ(s.kv, 64 * 16 * 2);
  EXPECT_EQ(s.layer, 64 * 16 * 2 * 2);
}

TEST(ModelTest, IdIsStableAndSpecific) {
  ModelSpec a = DemoModelSpec();
  const ModelId id = ModelIdOf(a);
  EXPECT_EQ(id.size(), 16u);
  EXPECT_EQ(id, ModelIdOf(DemoModelSpec()));
  ModelSpec b = a;
  b.rope.theta = 500000;
  EXPECT_NE(ModelIdOf(b), id);
  b = a;
  b.dtype = DType::kF16;
  EXPECT_NE(ModelIdOf(b), id);
  b = a;
  b.block_tokens = 32;
  EXPECT_NE(ModelIdOf(b), id);
}

TEST(ModelTest, BadSpecsNameTheField) {
  ModelSpec s = DemoModelSpec();
  s.layers = 0;
  absl::Status st = ValidateModelSpec(s);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("layers"), std::string::npos) << st;
  s = DemoModelSpec();
  s.head_dim = 63;
  s.rope.head_dim = 63;
  EXPECT_EQ(ValidateModelSpec(s).code(), absl::StatusCode::kInvalidArgument);
  s = DemoModelSpec();
  s.block_tokens = kMaxBlockTokens + 1;
  st = ValidateModelSpec(s);
  EXPECT_NE(st.message().find("block_tokens"), std::string::npos) << st;
  s = DemoModelSpec();
  s.rope.head_dim = 128;
  EXPECT_EQ(ValidateModelSpec(s).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ropekv
