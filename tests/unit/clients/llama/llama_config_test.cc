#include "clients/llama/llama_config.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/unit/clients/llama/test_util.h"

namespace ropekv {
namespace llama {
namespace {

using testing_util::ModelDir;

TEST(LlamaConfigTest, CodeByte9m) {
  absl::StatusOr<LlamaConfig> c = LoadLlamaConfig(ModelDir());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 256);
  EXPECT_EQ(c->hidden_size, 384);
  EXPECT_EQ(c->intermediate_size, 1024);
  EXPECT_EQ(c->num_hidden_layers, 6);
  EXPECT_EQ(c->num_attention_heads, 6);
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->group_size(), 3);
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_EQ(c->rope.rope_type, "default");
  EXPECT_EQ(c->rope.theta, 10000.0);

  absl::StatusOr<RopeSpec> spec = RopeSpecOf(*c);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->type, RopeType::kDefault);
  EXPECT_EQ(spec->theta, 10000.0);
  EXPECT_EQ(spec->head_dim, 64);
  EXPECT_EQ(spec->rotary_dim, 64);
  EXPECT_EQ(spec->layout, PairLayout::kNeox);
  EXPECT_EQ(spec->max_position_embeddings, 4096);
}

TEST(LlamaConfigTest, TransformersV4SpellingWithRopeScaling) {
  absl::StatusOr<LlamaConfig> c = ParseLlamaConfig(R"({
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "tie_word_embeddings": false, "attention_bias": false,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 128);  // hidden / heads when absent
  EXPECT_EQ(c->rope.rope_type, "llama3");
  EXPECT_EQ(c->rope.theta, 500000.0);
  EXPECT_EQ(c->rope.factor, 8.0);
  EXPECT_EQ(c->rope.original_max_position_embeddings, 8192);
  absl::StatusOr<RopeSpec> spec = RopeSpecOf(*c);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->type, RopeType::kLlama3);
  EXPECT_EQ(spec->factor, 8.0);
  EXPECT_EQ(spec->low_freq_factor, 1.0);
  EXPECT_EQ(spec->high_freq_factor, 4.0);
  EXPECT_EQ(spec->original_max_position_embeddings, 8192);
  EXPECT_EQ(spec->max_position_embeddings, 131072);
}

TEST(LlamaConfigTest, OldTypeKeyYarnAndPartialRotary) {
  absl::StatusOr<LlamaConfig> c = ParseLlamaConfig(R"({
    "vocab_size": 10, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
    "num_attention_heads": 4, "head_dim": 32, "partial_rotary_factor": 0.5,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 16, "mscale": 0.707,
                     "mscale_all_dim": 1.0, "truncate": false,
                     "original_max_position_embeddings": 4096}})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 4);  // defaults to num_attention_heads
  absl::StatusOr<RopeSpec> spec = RopeSpecOf(*c);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->type, RopeType::kYarn);
  EXPECT_EQ(spec->head_dim, 32);
  EXPECT_EQ(spec->rotary_dim, 16);
  EXPECT_EQ(spec->beta_fast, 16.0);
  EXPECT_EQ(spec->beta_slow, 1.0);
  EXPECT_EQ(spec->mscale, 0.707);
  EXPECT_EQ(spec->mscale_all_dim, 1.0);
  EXPECT_FALSE(spec->truncate);
}

TEST(LlamaConfigTest, Errors) {
  const std::string base =
      R"("vocab_size": 10, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1)";
  auto code = [&](const std::string& extra) {
    return ParseLlamaConfig(absl::StrCat("{", base, extra, "}")).status().code();
  };
  EXPECT_EQ(code(R"(, "num_attention_heads": 4)"), absl::StatusCode::kOk);
  // Required field absent.
  EXPECT_EQ(code(""), absl::StatusCode::kNotFound);
  // Wrong types and bad shapes.
  EXPECT_EQ(code(R"(, "num_attention_heads": "4")"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4.5)"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "num_key_value_heads": 3)"),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(R"(, "num_attention_heads": 0)"), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "head_dim": 15)"),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "rms_norm_eps": -1)"),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "rope_scaling": 3)"),
            absl::StatusCode::kInvalidArgument);
  // What this forward pass does not compute.
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "attention_bias": true)"),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "hidden_act": "gelu")"),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "model_type": "gpt2")"),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(code(R"(, "num_attention_heads": 4, "rope_parameters": {"rope_type": "mrope"})"),
            absl::StatusCode::kUnimplemented);
  // Not JSON.
  EXPECT_EQ(ParseLlamaConfig("{").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadLlamaConfig("/nonexistent/dir").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace llama
}  // namespace ropekv
