// Prompt modules and parallel contexts (cache/modules.h) against the reference Llama frontend
// (clients/llama): the frontend encodes modules at their schema positions and contexts after a
// prefix, the store keeps them as segments, and what ComposePrompt / ComposeParallel return is
// compared with the frontend encoding the whole prompt itself. Layer-0 keys and values depend on
// the token and its position only, so they must match the full encode exactly (schema layout) or
// within 2 ulp (compact layout: keys re-rotated once); a 1-layer model's attention output over the
// composed cache must match the full encode's. APE through Attend equals the frontend's full
// attention at T = S = 1 and a direct fp64 evaluation of the formula at other T, S.
#include "cache/modules.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/modules_cuda.h"
#include "clients/llama/kv_cache.h"
#include "clients/llama/llama_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/common/device.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

constexpr char kTravel[] = R"(<schema name="travel">
  <module name="system">1 2 3 4 5 6</module>
  <union name="city">
    <module name="tokyo">10 11 12 13 14</module>
    <module name="miami">20 21</module>
  </union>
  <module name="plan">30 31 <parameter name="days" length="3"/> 32 33 34
    <module name="extras">40 41 42</module> 35</module>
</schema>)";

// Positions of kTravel: system 0-5; city 6-10 (tokyo 6-10, miami 6-7); plan 11-22: 30 31 at 11 12,
// days 13-15, 32 33 34 at 16-18, extras 19-21, 35 at 22; length 23.

llama::LlamaConfig SmallConfig(int layers) {
  llama::LlamaConfig c;
  c.vocab_size = 160;
  c.hidden_size = 48;
  c.intermediate_size = 80;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;  // GQA
  c.head_dim = 16;
  c.rms_norm_eps = 1e-6;
  c.max_position_embeddings = 4096;
  c.rope.theta = 10000.0;
  return c;
}

std::vector<int64_t> Iota(int64_t n, int64_t start) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = start + i;
  return p;
}

std::string Str(const std::vector<uint8_t>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size());
}

// Tokens [a, b) of range-layout KV of n tokens ([layer][k|v][kv_head][n][head_dim]).
std::vector<uint8_t> Slice(const ModelSpec& spec, const std::vector<uint8_t>& kv, int64_t n,
                           int64_t a, int64_t b) {
  const size_t row = static_cast<size_t>(spec.head_dim) * DTypeSize(spec.dtype);
  const int rows = spec.layers * 2 * spec.kv_heads;
  std::vector<uint8_t> out(static_cast<size_t>(rows) * (b - a) * row);
  for (int r = 0; r < rows; ++r) {
    std::memcpy(&out[static_cast<size_t>(r) * (b - a) * row],
                &kv[(static_cast<size_t>(r) * n + a) * row], (b - a) * row);
  }
  return out;
}

// Element (layer, kv, head, token, dim) of range-layout KV of n tokens, as float.
float At(const ModelSpec& spec, const std::vector<uint8_t>& kv, int64_t n, int layer, int kv_index,
         int head, int64_t token, int dim) {
  const size_t i =
      ((((static_cast<size_t>(layer) * 2 + kv_index) * spec.kv_heads + head) * n + token) *
       spec.head_dim) +
      dim;
  return LoadAsFloat(kv.data(), i, spec.dtype);
}

// One ulp of `dtype` at the largest magnitude among `values` (a rotated pair, before and after).
double PairUlp(DType dtype, std::initializer_list<float> values) {
  double m = 0;
  for (float v : values) m = std::max(m, std::fabs(double{v}));
  return UlpOf(dtype, m);
}

class ModulesTest : public ::testing::Test {
 protected:
  // A model of `layers` layers, its frontend cache in `dtype`, a store over a fresh KvCache.
  void Init(int layers, DType dtype) {
    auto model = llama::LlamaModel::Random(SmallConfig(layers), 0x6d6f64 + layers);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    spec_.layers = layers;
    spec_.kv_heads = 2;
    spec_.head_dim = 16;
    spec_.dtype = dtype;
    spec_.block_tokens = 4;
    spec_.rope = model_->rope();
    auto cache = KvCache::Create(KvCache::Options());
    ASSERT_TRUE(cache.ok()) << cache.status();
    cache_ = *std::move(cache);
    auto reg = cache_->RegisterModel(spec_, "small");
    ASSERT_TRUE(reg.ok()) << reg.status();
    model_id_ = reg->id;
    auto store = ModuleStore::Create(cache_.get(), ModuleStore::Options());
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  std::unique_ptr<llama::KvCache> NewFrontendCache() {
    auto c = model_->NewCache(spec_.dtype, spec_.block_tokens);
    EXPECT_TRUE(c.ok()) << c.status();
    return c.ok() ? *std::move(c) : nullptr;
  }

  // The frontend encodes `tokens` at `positions` after whatever `cache` holds and returns their KV
  // in range layout.
  std::vector<uint8_t> Encode(llama::KvCache* cache, const std::vector<int32_t>& tokens,
                              const std::vector<int64_t>& positions,
                              llama::ForwardTrace* trace = nullptr) {
    const int64_t before = cache->tokens();
    auto logits = model_->Prefill(tokens, positions, cache, trace);
    EXPECT_TRUE(logits.ok()) << logits.status();
    std::vector<uint8_t> kv(cache->BytesFor(static_cast<int64_t>(tokens.size())));
    EXPECT_TRUE(cache->ExportTokens(before, cache->tokens(), absl::MakeSpan(kv)).ok());
    last_logits_ = logits.ok() ? *std::move(logits) : std::vector<float>();
    return kv;
  }

  // Registers kTravel and puts every module, each encoded on its own at its schema positions (as
  // Prompt Cache does). Returns the schema id.
  std::string PutTravel(const std::string& tenant = "t") {
    auto reg = store_->RegisterSchema("small", kTravel);
    EXPECT_TRUE(reg.ok()) << reg.status();
    if (!reg.ok()) return "";
    for (const SchemaModule& m : reg->schema->modules) {
      auto frontend = NewFrontendCache();
      const std::vector<uint8_t> kv = Encode(frontend.get(), m.tokens, m.positions);
      PutModuleArgs args;
      args.schema_id = reg->id;
      args.module = m.name;
      args.tenant = tenant;
      auto put = store_->PutModule(args, Str(kv));
      EXPECT_TRUE(put.ok()) << m.name << ": " << put.status();
    }
    return reg->id;
  }

  ComposePromptArgs TravelPrompt(const std::string& id, Layout layout) {
    ComposePromptArgs a;
    a.schema_id = id;
    a.tenant = "t";
    a.modules = {"system", "miami", "plan"};
    a.arguments = {{"days", {90, 91}}};
    a.user_tokens = {100, 101};
    a.layout = layout;
    return a;
  }

  std::vector<uint8_t> All(const AssembledKv& kv) {
    std::vector<uint8_t> out(kv.bytes(), 0xFF);  // poisoned: an unwritten byte fails
    EXPECT_TRUE(kv.WriteAll(out.data()).ok());
    return out;
  }

  std::unique_ptr<llama::LlamaModel> model_;
  ModelSpec spec_;
  std::unique_ptr<KvCache> cache_;
  std::string model_id_;
  std::unique_ptr<ModuleStore> store_;
  std::vector<float> last_logits_;
};

// ---------------------------------------------------------------------------------------------
// Schemas

TEST_F(ModulesTest, RegisterSchemaIdIsStableAndPerModel) {
  Init(1, DType::kBF16);
  auto a = store_->RegisterSchema("small", kTravel);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->created);
  EXPECT_EQ(a->id.size(), 32u);
  EXPECT_EQ(a->id, SchemaIdOf(model_id_, kTravel));
  EXPECT_EQ(a->model_id, model_id_);
  // By id instead of name: the same schema.
  auto b = store_->RegisterSchema(model_id_, kTravel);
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->created);
  EXPECT_EQ(b->id, a->id);
  EXPECT_EQ(store_->schemas(), 1u);
  // Another model or another text: another id.
  ModelSpec other = spec_;
  other.block_tokens = 8;
  ASSERT_TRUE(cache_->RegisterModel(other, "other").ok());
  auto c = store_->RegisterSchema("other", kTravel);
  ASSERT_TRUE(c.ok());
  EXPECT_NE(c->id, a->id);
  auto d = store_->RegisterSchema("small", std::string(kTravel) + " ");
  ASSERT_TRUE(d.ok());
  EXPECT_NE(d->id, a->id);

  // Positions fixed by the parser.
  const Schema& s = *a->schema;
  EXPECT_EQ(s.length, 23);
  const SchemaModule& plan = s.modules[s.FindModule("plan")];
  EXPECT_THAT(plan.positions, ElementsAre(11, 12, 16, 17, 18, 22));
  const std::vector<ModuleRun> runs = ModuleRuns(plan);
  ASSERT_EQ(runs.size(), 3u);
  EXPECT_EQ(runs[0].start, 11);
  EXPECT_EQ(runs[0].size(), 2);
  EXPECT_EQ(runs[1].start, 16);
  EXPECT_EQ(runs[1].size(), 3);
  EXPECT_EQ(runs[2].start, 22);
  EXPECT_EQ(runs[2].size(), 1);
}

TEST_F(ModulesTest, RegisterSchemaErrors) {
  Init(1, DType::kBF16);
  auto unknown = store_->RegisterSchema("nope", kTravel);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  auto bad =
      store_->RegisterSchema("small", "<schema>\n  <module name=\"a\">1 x 2</module>\n</schema>");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(),
              AllOf(HasSubstr("module 'a'"), HasSubstr("line 2"), HasSubstr("'x'")));
  auto dup = store_->RegisterSchema(
      "small", "<schema><module name=\"a\">1</module><module name=\"a\">2</module></schema>");
  EXPECT_EQ(dup.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(dup.status().message(), HasSubstr("duplicate module name 'a'"));
  EXPECT_EQ(store_->GetSchema("0123").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store_->schemas(), 0u);
}

TEST_F(ModulesTest, MaxSchemas) {
  Init(1, DType::kBF16);
  ModuleStore::Options o;
  o.max_schemas = 1;
  auto store = ModuleStore::Create(cache_.get(), o);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->RegisterSchema("small", kTravel).ok());
  auto again = (*store)->RegisterSchema("small", kTravel);
  EXPECT_TRUE(again.ok());
  auto second = (*store)->RegisterSchema("small", "<schema><module name=\"m\">1</module></schema>");
  EXPECT_EQ(second.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(ModuleStore::Create(nullptr, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Modules

TEST_F(ModulesTest, GoldenPositionsBothLayouts) {
  Init(1, DType::kBF16);
  const std::string id = PutTravel();
  auto schema = store_->ComposePrompt(TravelPrompt(id, Layout::kSchema));
  ASSERT_TRUE(schema.ok()) << schema.status();
  EXPECT_THAT(schema->tokens,
              ElementsAre(1, 2, 3, 4, 5, 6, 20, 21, 30, 31, 90, 91, 32, 33, 34, 35, 100, 101));
  EXPECT_THAT(schema->position_ids,
              ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 16, 17, 18, 22, 23, 24));
  EXPECT_EQ(schema->next_position, 25);
  EXPECT_THAT(schema->kv_positions, ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 16, 17, 18, 22));
  EXPECT_EQ(schema->kv.total_tokens(), 14);
  ASSERT_EQ(schema->encode.size(), 2u);
  EXPECT_EQ(schema->encode[0].begin, 10);
  EXPECT_EQ(schema->encode[0].end, 12);
  EXPECT_EQ(schema->encode[0].position, 13);
  EXPECT_EQ(schema->encode[1].begin, 16);
  EXPECT_EQ(schema->encode[1].end, 18);
  EXPECT_EQ(schema->encode[1].position, 23);
  ASSERT_EQ(schema->pieces.size(), 7u);
  std::vector<int64_t> kv_offsets, prompt_offsets;
  for (const ComposedPiece& p : schema->pieces) {
    kv_offsets.push_back(p.kv_offset);
    prompt_offsets.push_back(p.prompt_offset);
    EXPECT_EQ(p.hit, HitKind::kExact) << p.piece.module;  // every module at its schema position
  }
  EXPECT_THAT(kv_offsets, ElementsAre(0, 6, 8, -1, 10, 13, -1));
  EXPECT_THAT(prompt_offsets, ElementsAre(0, 6, 8, 10, 12, 15, 16));
  EXPECT_EQ(schema->pieces[3].piece.parameter, "days");

  auto compact = store_->ComposePrompt(TravelPrompt(id, Layout::kCompact));
  ASSERT_TRUE(compact.ok()) << compact.status();
  EXPECT_THAT(compact->position_ids, ElementsAreArray(Iota(18, 0)));
  EXPECT_EQ(compact->next_position, 18);
  EXPECT_THAT(compact->kv_positions, ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15));
  ASSERT_EQ(compact->encode.size(), 2u);
  EXPECT_EQ(compact->encode[0].position, 10);
  EXPECT_EQ(compact->encode[1].position, 16);
  std::vector<HitKind> hits;
  for (const ComposedPiece& p : compact->pieces) {
    if (p.kv_offset >= 0) hits.push_back(p.hit);
  }
  EXPECT_THAT(hits, ElementsAre(HitKind::kExact, HitKind::kExact, HitKind::kRerotated,
                                HitKind::kRerotated, HitKind::kRerotated));
}

TEST_F(ModulesTest, NestedModuleAndOtherUnionMember) {
  Init(1, DType::kBF16);
  const std::string id = PutTravel();
  ComposePromptArgs a;
  a.schema_id = id;
  a.tenant = "t";
  a.modules = {"tokyo", "plan", "extras"};
  a.arguments = {{"days", {}}};  // blank slot
  a.layout = Layout::kSchema;
  auto p = store_->ComposePrompt(a);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_THAT(p->position_ids, ElementsAre(6, 7, 8, 9, 10, 11, 12, 16, 17, 18, 19, 20, 21, 22));
  EXPECT_EQ(p->next_position, 23);
  EXPECT_TRUE(p->encode.empty());
  a.layout = Layout::kCompact;
  auto c = store_->ComposePrompt(a);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->position_ids, ElementsAreArray(Iota(14, 0)));
}

// Layer-0 K/V of the composed prompt equal the frontend's full encode of the same prompt: bit for
// bit at schema positions; keys within 2 ulp (one re-rotation) and values bit for bit in compact
// layout. (Deeper layers differ by design: modules are encoded independently.)
TEST_F(ModulesTest, ComposedLayerZeroMatchesFullEncode) {
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(DTypeName(dtype));
    Init(2, dtype);
    const std::string id = PutTravel();
    for (Layout layout : {Layout::kSchema, Layout::kCompact}) {
      SCOPED_TRACE(layout == Layout::kSchema ? "schema" : "compact");
      auto prompt = store_->ComposePrompt(TravelPrompt(id, layout));
      ASSERT_TRUE(prompt.ok()) << prompt.status();
      const int64_t total = prompt->kv.total_tokens();
      const std::vector<uint8_t> got = All(prompt->kv);
      auto frontend = NewFrontendCache();
      const int64_t n = static_cast<int64_t>(prompt->tokens.size());
      const std::vector<uint8_t> full =
          Encode(frontend.get(), prompt->tokens, prompt->position_ids);
      double worst_ulps = 0;
      int64_t compared = 0;
      for (const ComposedPiece& p : prompt->pieces) {
        if (p.kv_offset < 0) continue;
        const bool rerotated = p.hit == HitKind::kRerotated;
        EXPECT_EQ(rerotated,
                  layout == Layout::kCompact && p.piece.position != p.piece.schema_position);
        for (int64_t t = 0; t < static_cast<int64_t>(p.piece.tokens.size()); ++t) {
          for (int kv = 0; kv < 2; ++kv) {
            for (int h = 0; h < spec_.kv_heads; ++h) {
              for (int d = 0; d < spec_.head_dim; ++d) {
                const float g = At(spec_, got, total, 0, kv, h, p.kv_offset + t, d);
                const float w = At(spec_, full, n, 0, kv, h, p.prompt_offset + t, d);
                ASSERT_FALSE(std::isnan(g));
                if (kv == 1 || !rerotated) {
                  ASSERT_EQ(g, w) << "kv " << kv << " token " << p.prompt_offset + t << " dim "
                                  << d;
                } else {
                  // In ulps of the larger element of the rotated pair (docs/rope.md).
                  const int pd = (d + spec_.head_dim / 2) % spec_.head_dim;
                  const double ulps =
                      std::fabs(double{g} - w) /
                      PairUlp(dtype, {g, w, At(spec_, got, total, 0, 0, h, p.kv_offset + t, pd),
                                      At(spec_, full, n, 0, 0, h, p.prompt_offset + t, pd)});
                  worst_ulps = std::max(worst_ulps, ulps);
                  ASSERT_LE(ulps, dtype == DType::kF32 ? 4.0 : 2.0)
                      << "token " << p.prompt_offset + t << " dim " << d;
                }
                ++compared;
              }
            }
          }
        }
      }
      EXPECT_EQ(compared, total * 2 * spec_.kv_heads * spec_.head_dim);
      std::cout << "layer-0 keys, " << DTypeName(dtype) << ", "
                << (layout == Layout::kSchema ? "schema" : "compact")
                << ": worst |re-rotated - fresh| = " << worst_ulps << " ulp\n";
    }
  }
}

// A 1-layer model: the frontend plugs the composed KV in, encodes the arguments and the user
// tokens over it, and gets the attention output and logits of encoding the whole prompt itself.
TEST_F(ModulesTest, OneLayerAttentionOverComposedPromptMatchesFullEncode) {
  for (DType dtype : {DType::kBF16, DType::kF32}) {
    SCOPED_TRACE(DTypeName(dtype));
    Init(1, dtype);
    const std::string id = PutTravel();
    for (Layout layout : {Layout::kSchema, Layout::kCompact}) {
      SCOPED_TRACE(layout == Layout::kSchema ? "schema" : "compact");
      auto prompt = store_->ComposePrompt(TravelPrompt(id, layout));
      ASSERT_TRUE(prompt.ok()) << prompt.status();
      const std::vector<uint8_t> kv = All(prompt->kv);
      const int64_t total = prompt->kv.total_tokens();
      // The frontend: cached pieces appended, the others encoded, in prompt order.
      auto composed = NewFrontendCache();
      llama::ForwardTrace trace;
      for (const ComposedPiece& p : prompt->pieces) {
        const int64_t n = static_cast<int64_t>(p.piece.tokens.size());
        const std::vector<int64_t> pos = Iota(n, p.piece.position);
        if (p.kv_offset >= 0) {
          const std::vector<uint8_t> bytes = Slice(spec_, kv, total, p.kv_offset, p.kv_offset + n);
          ASSERT_TRUE(composed->AppendBytes(p.piece.tokens, pos, bytes).ok());
        } else {
          Encode(composed.get(), p.piece.tokens, pos, &trace);  // the user piece comes last
        }
      }
      const std::vector<float> logits = last_logits_;
      // The full encode.
      auto full = NewFrontendCache();
      llama::ForwardTrace full_trace;
      Encode(full.get(), prompt->tokens, prompt->position_ids, &full_trace);
      const std::vector<float>& full_logits = last_logits_;
      // Compare the user tokens' rows (the last 2 of the prompt).
      const int64_t n_user = 2, n = static_cast<int64_t>(prompt->tokens.size());
      const int64_t width = 4 * 16;  // heads * head_dim
      double worst = 0, scale = 0;
      for (int64_t i = 0; i < n_user * width; ++i) {
        const float g = trace.attention[0][i];
        const float w = full_trace.attention[0][(n - n_user) * width + i];
        worst = std::max(worst, std::fabs(double{g} - w));
        scale = std::max(scale, std::fabs(double{w}));
      }
      const int64_t vocab = 160;
      double worst_logit = 0;
      for (int64_t i = 0; i < n_user * vocab; ++i) {
        worst_logit = std::max(
            worst_logit, std::fabs(double{logits[i]} - full_logits[(n - n_user) * vocab + i]));
      }
      std::cout << DTypeName(dtype) << " " << (layout == Layout::kSchema ? "schema" : "compact")
                << ": attention max |diff| " << worst << " (scale " << scale
                << "), logits max |diff| " << worst_logit << "\n";
      if (layout == Layout::kSchema) {
        // The same bytes in the cache and chunked prefill == one call: exact.
        EXPECT_EQ(worst, 0.0);
        EXPECT_EQ(worst_logit, 0.0);
      } else {
        // Keys within 2 ulp of fresh ones.
        const double tol = dtype == DType::kF32 ? 1e-5 : 2e-2;
        EXPECT_LE(worst, tol * scale);
        EXPECT_LE(worst_logit, dtype == DType::kF32 ? 1e-5 : 5e-3);
      }
    }
  }
}

TEST_F(ModulesTest, ComposeErrorsNameThePlace) {
  Init(1, DType::kBF16);
  const std::string id = PutTravel();
  ComposePromptArgs a = TravelPrompt(id, Layout::kSchema);

  a.modules = {"system", "paris"};
  a.arguments.clear();
  auto unknown = store_->ComposePrompt(a);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("unknown module 'paris' in schema 'travel'"));

  a.modules = {"tokyo", "miami"};
  auto both = store_->ComposePrompt(a);
  EXPECT_EQ(both.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(both.status().message(),
              HasSubstr("modules 'tokyo' and 'miami' are both members of union 'city'"));

  a.modules = {"plan"};
  a.arguments = {{"days", {1, 2, 3, 4}}};
  auto longer = store_->ComposePrompt(a);
  EXPECT_EQ(longer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(longer.status().message(),
              HasSubstr("argument for parameter 'days' of module 'plan' has 4 tokens, longer "
                        "than its length 3"));

  a.arguments = {};
  auto missing = store_->ComposePrompt(a);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(missing.status().message(), HasSubstr("parameter 'days'"));

  a.schema_id = "feedfeedfeedfeedfeedfeedfeedfeed";
  EXPECT_EQ(store_->ComposePrompt(a).status().code(), absl::StatusCode::kNotFound);

  // Another tenant has put nothing.
  ComposePromptArgs other = TravelPrompt(id, Layout::kSchema);
  other.tenant = "u";
  auto not_put = store_->ComposePrompt(other);
  EXPECT_EQ(not_put.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(not_put.status().message(), AllOf(HasSubstr("module 'system' of schema 'travel'"),
                                                HasSubstr("tenant 'u'"), HasSubstr("PutModule")));
}

TEST_F(ModulesTest, ModuleNotYetPutIsNotFoundNamingTheRun) {
  Init(1, DType::kBF16);
  auto reg = store_->RegisterSchema("small", kTravel);
  ASSERT_TRUE(reg.ok());
  const Schema& s = *reg->schema;
  auto cached = store_->CachedModules(reg->id, "t");
  ASSERT_TRUE(cached.ok());
  EXPECT_THAT(*cached, ElementsAre(false, false, false, false, false));
  // Put system only.
  const SchemaModule& system = s.modules[s.FindModule("system")];
  auto fe = NewFrontendCache();
  PutModuleArgs args{reg->id, "system", "t"};
  auto put = store_->PutModule(args, Str(Encode(fe.get(), system.tokens, system.positions)));
  ASSERT_TRUE(put.ok()) << put.status();
  EXPECT_EQ(put->tokens, 6);
  EXPECT_EQ(put->segments, 1u);
  EXPECT_EQ(put->blocks_stored, 2u);  // 6 tokens in blocks of 4
  cached = store_->CachedModules(reg->id, "t");
  ASSERT_TRUE(cached.ok());
  EXPECT_THAT(*cached, ElementsAre(true, false, false, false, false));

  ComposePromptArgs a;
  a.schema_id = reg->id;
  a.tenant = "t";
  a.modules = {"system", "plan"};
  a.arguments = {{"days", {7}}};
  auto p = store_->ComposePrompt(a);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(p.status().message(), AllOf(HasSubstr("module 'plan'"), HasSubstr("run 0 of 3"),
                                          HasSubstr("schema position 11")));
  // The same module put again: its blocks exist already.
  auto again = store_->PutModule(
      args, Str(Encode(NewFrontendCache().get(), system.tokens, system.positions)));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->blocks_stored, 0u);
  EXPECT_EQ(again->blocks_existing, 2u);
}

TEST_F(ModulesTest, PutModuleErrors) {
  Init(1, DType::kBF16);
  auto reg = store_->RegisterSchema("small", kTravel);
  ASSERT_TRUE(reg.ok());
  PutModuleArgs args{reg->id, "paris", "t"};
  auto unknown = store_->BeginPutModule(args);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("unknown module 'paris' in schema 'travel'"));
  args.schema_id = "nope";
  EXPECT_EQ(store_->BeginPutModule(args).status().code(), absl::StatusCode::kNotFound);

  args = PutModuleArgs{reg->id, "miami", "t"};
  const uint64_t expected = RangeLayoutBytes(spec_, 2);
  auto short_put = store_->PutModule(args, std::string(expected - 2, '\1'));
  EXPECT_EQ(short_put.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(short_put.status().message(), AllOf(HasSubstr(absl::StrCat(expected, " bytes")),
                                                  HasSubstr(absl::StrCat(expected - 2))));
  auto long_put = store_->PutModule(args, std::string(expected + 2, '\1'));
  EXPECT_EQ(long_put.status().code(), absl::StatusCode::kInvalidArgument);
  // Nothing was stored by the failed puts.
  auto cached = store_->CachedModules(reg->id, "t");
  ASSERT_TRUE(cached.ok());
  EXPECT_FALSE((*cached)[reg->schema->FindModule("miami")]);

  // Streaming in small pieces works; a writer abandoned before Finish stores nothing.
  {
    auto w = store_->BeginPutModule(args);
    ASSERT_TRUE(w.ok());
    EXPECT_EQ((*w)->expected_bytes(), expected);
    ASSERT_TRUE((*w)->Write(std::string(10, '\2')).ok());
  }
  cached = store_->CachedModules(reg->id, "t");
  EXPECT_FALSE((*cached)[reg->schema->FindModule("miami")]);
  auto w = store_->BeginPutModule(args);
  ASSERT_TRUE(w.ok());
  const std::vector<uint8_t> kv = Encode(NewFrontendCache().get(), {20, 21}, {6, 7});
  for (size_t i = 0; i < kv.size(); i += 7) {
    ASSERT_TRUE((*w)->Write(Str(kv).substr(i, 7)).ok());
  }
  auto done = (*w)->Finish();
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ((*w)->Finish().status().code(), absl::StatusCode::kFailedPrecondition);
  cached = store_->CachedModules(reg->id, "t");
  EXPECT_TRUE((*cached)[reg->schema->FindModule("miami")]);

  ModuleStore::Options small;
  small.max_put_bytes = expected - 1;
  auto limited = ModuleStore::Create(cache_.get(), small);
  ASSERT_TRUE(limited.ok());
  ASSERT_TRUE((*limited)->RegisterSchema("small", kTravel).ok());
  EXPECT_EQ((*limited)->BeginPutModule(args).status().code(), absl::StatusCode::kResourceExhausted);
}

// ---------------------------------------------------------------------------------------------
// Parallel contexts

class ParallelTest : public ModulesTest {
 protected:
  void SetUpParallel(DType dtype) {
    Init(1, dtype);
    std::mt19937 rng(0xa9e);
    std::uniform_int_distribution<int32_t> tok(0, 159);
    auto random = [&](int n) {
      std::vector<int32_t> t(n);
      for (int32_t& x : t) x = tok(rng);
      return t;
    };
    prefix_ = random(8);  // two whole blocks: put as a prefix
    contexts_ = {random(5), random(7), random(3)};
    query_ = random(3);
    // The prefix through the ordinary Put (blocks of the frontend's cache, chained).
    auto fe = NewFrontendCache();
    Encode(fe.get(), prefix_, Iota(8, 0));
    PutOptions o;
    o.model = "small";
    o.tenant = "t";
    o.tokens = prefix_;
    auto w = cache_->BeginPut(o);
    ASSERT_TRUE(w.ok()) << w.status();
    for (int64_t b = 0; b < fe->num_blocks(); ++b) {
      auto bytes = fe->BlockData(b);
      ASSERT_TRUE(
          (*w)->Write(absl::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()))
              .ok());
    }
    ASSERT_TRUE((*w)->Finish().ok());
    prefix_kv_ = Encode(NewFrontendCache().get(), prefix_, Iota(8, 0));
    // Every context encoded after the prefix, on its own (APE).
    for (const std::vector<int32_t>& c : contexts_) {
      auto cfe = NewFrontendCache();
      Encode(cfe.get(), prefix_, Iota(8, 0));
      const std::vector<uint8_t> kv = Encode(cfe.get(), c, Iota(c.size(), 8));
      PutContextArgs args;
      args.model = "small";
      args.tenant = "t";
      args.prefix_tokens = 8;
      args.context = c;
      auto put = store_->PutContext(args, Str(kv));
      ASSERT_TRUE(put.ok()) << put.status();
      context_kv_.push_back(kv);
    }
  }

  ParallelArgs Args(float t = 1.0f, float s = 1.0f) {
    ParallelArgs a;
    a.model = "small";
    a.tenant = "t";
    a.prefix = prefix_;
    a.contexts = contexts_;
    a.query = query_;
    a.temperature = t;
    a.scale = s;
    return a;
  }

  // The frontend's cache holding the composed prompt, then the query encoded over it (full
  // attention over prefix, every context and the query, causal among the query). Fills q (layer 0
  // post-RoPE, [n][heads][head_dim] f32), query_kv ([k|v][kv_head][n][head_dim]) and the
  // frontend's attention output.
  void FrontendQuery(const ParallelPrompt& p, std::vector<float>* q, std::vector<uint8_t>* qkv,
                     std::vector<float>* attention) {
    const std::vector<uint8_t> kv = All(p.kv);
    const int64_t total = p.kv.total_tokens();
    auto fe = NewFrontendCache();
    std::vector<int32_t> ids = prefix_;
    for (const auto& c : contexts_) ids.insert(ids.end(), c.begin(), c.end());
    ASSERT_TRUE(fe->AppendBytes(ids, p.kv_positions, kv).ok());
    ASSERT_EQ(static_cast<int64_t>(ids.size()), total);
    llama::ForwardTrace trace;
    const std::vector<uint8_t> own = Encode(fe.get(), query_, p.query_positions, &trace);
    *q = trace.queries[0];
    *qkv = own;  // 1 layer: range layout is [k|v][kv_head][n][head_dim]
    *attention = trace.attention[0];
  }

  std::string Bytes(const std::vector<float>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  }

  std::vector<int32_t> prefix_, query_;
  std::vector<std::vector<int32_t>> contexts_;
  std::vector<uint8_t> prefix_kv_;
  std::vector<std::vector<uint8_t>> context_kv_;
};

TEST_F(ParallelTest, PositionsRangesAndBytes) {
  SetUpParallel(DType::kBF16);
  auto p = store_->ComposeParallel(Args(0.8f, 1.25f));
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->prefix.kv_begin, 0);
  EXPECT_EQ(p->prefix.kv_end, 8);
  EXPECT_EQ(p->prefix.position, 0);
  ASSERT_EQ(p->contexts.size(), 3u);
  EXPECT_EQ(p->contexts[0].kv_begin, 8);
  EXPECT_EQ(p->contexts[1].kv_begin, 13);
  EXPECT_EQ(p->contexts[2].kv_begin, 20);
  EXPECT_EQ(p->contexts[2].kv_end, 23);
  for (const KvRange& r : p->contexts) {
    EXPECT_EQ(r.position, 8);
    EXPECT_EQ(r.hit, HitKind::kExact);
  }
  EXPECT_EQ(p->query_position, 15);  // |P| + max |C_j| = 8 + 7
  EXPECT_THAT(p->query_positions, ElementsAre(15, 16, 17));
  ASSERT_EQ(p->context_group.size(), 1u);
  EXPECT_EQ(p->context_group[0].kv_begin, 8);
  EXPECT_EQ(p->context_group[0].kv_end, 23);
  EXPECT_EQ(p->temperature, 0.8f);
  EXPECT_EQ(p->scale, 1.25f);
  EXPECT_THAT(p->kv_positions, ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 8, 9, 10, 11,
                                           12, 13, 14, 8, 9, 10));
  // The KV is the frontend's bytes, unchanged.
  const std::vector<uint8_t> kv = All(p->kv);
  EXPECT_EQ(Slice(spec_, kv, 23, 0, 8), prefix_kv_);
  EXPECT_EQ(Slice(spec_, kv, 23, 8, 13), context_kv_[0]);
  EXPECT_EQ(Slice(spec_, kv, 23, 13, 20), context_kv_[1]);
  EXPECT_EQ(Slice(spec_, kv, 23, 20, 23), context_kv_[2]);
}

// Contexts encoded after an 8-token prefix, composed after a 6-token one: re-rotated to 6.. in one
// rotation, within 2 ulp of keys encoded there.
TEST_F(ParallelTest, ContextsMoveToAnotherPrefixLength) {
  SetUpParallel(DType::kBF16);
  const std::vector<int32_t> short_prefix(prefix_.begin(), prefix_.begin() + 6);
  // A 6-token prefix is not whole blocks: put as a segment.
  auto fe = NewFrontendCache();
  Encode(fe.get(), short_prefix, Iota(6, 0));
  PutOptions o;
  o.model = "small";
  o.tenant = "t";
  o.tokens = short_prefix;
  o.segment = true;
  auto w = cache_->BeginPut(o);
  ASSERT_TRUE(w.ok());
  for (int64_t b = 0; b < fe->num_blocks(); ++b) {
    auto bytes = fe->BlockData(b);
    ASSERT_TRUE(
        (*w)->Write(absl::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()))
            .ok());
  }
  ASSERT_TRUE((*w)->Finish().ok());
  ParallelArgs a = Args();
  a.prefix = short_prefix;
  auto p = store_->ComposeParallel(a);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->prefix.hit, HitKind::kExact);
  EXPECT_EQ(p->query_position, 13);
  const std::vector<uint8_t> kv = All(p->kv);
  const int64_t total = p->kv.total_tokens();
  ASSERT_EQ(total, 6 + 15);
  double worst = 0;
  for (size_t j = 0; j < contexts_.size(); ++j) {
    const KvRange& r = p->contexts[j];
    EXPECT_EQ(r.position, 6);
    EXPECT_EQ(r.hit, HitKind::kRerotated);
    auto fresh = model_->Layer0Keys(contexts_[j], Iota(contexts_[j].size(), 6));
    ASSERT_TRUE(fresh.ok());
    for (int64_t t = 0; t < r.size(); ++t) {
      for (int h = 0; h < spec_.kv_heads; ++h) {
        for (int d = 0; d < spec_.head_dim; ++d) {
          const float g = At(spec_, kv, total, 0, 0, h, r.kv_begin + t, d);
          const float want = RoundTo(DType::kBF16, (*fresh)[(t * spec_.kv_heads + h) * 16 + d]);
          const int pd = (d + 8) % 16;
          const double ulps =
              std::fabs(double{g} - want) /
              PairUlp(DType::kBF16,
                      {g, want, At(spec_, kv, total, 0, 0, h, r.kv_begin + t, pd),
                       RoundTo(DType::kBF16, (*fresh)[(t * spec_.kv_heads + h) * 16 + pd])});
          worst = std::max(worst, ulps);
          ASSERT_LE(ulps, 2.0) << "context " << j << " token " << t << " dim " << d;
          // Values bit for bit.
          ASSERT_EQ(At(spec_, kv, total, 0, 1, h, r.kv_begin + t, d),
                    At(spec_, context_kv_[j], r.size(), 0, 1, h, t, d));
        }
      }
    }
  }
  std::cout << "contexts moved 8 -> 6: worst key error " << worst << " ulp\n";
}

// APE with T = S = 1 is full attention: Attend over the composed prompt equals the frontend's
// own attention over the same cache (fp32 there, fp64 in the kernel).
TEST_F(ParallelTest, AttendWithUnitTemperatureAndScaleIsFullAttention) {
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(dtype));
    SetUpParallel(dtype);
    auto p = store_->ComposeParallel(Args());
    ASSERT_TRUE(p.ok()) << p.status();
    std::vector<float> q, attention;
    std::vector<uint8_t> qkv;
    FrontendQuery(*p, &q, &qkv, &attention);
    AttendArgs a;
    a.layer = 0;
    a.num_queries = 3;
    a.q_heads = 4;
    a.q_dtype = DType::kF32;
    const std::string qb = Bytes(q);
    a.q = qb;
    a.query_kv_tokens = 3;
    const std::string kvb = Str(qkv);
    a.query_kv = kvb;
    a.device = AttendDevice::kCpu;
    auto r = ModuleStore::Attend(*p, a);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->device, AttendDevice::kCpu);
    ASSERT_EQ(r->out.size(), attention.size());
    double worst = 0, scale = 0;
    for (size_t i = 0; i < attention.size(); ++i) {
      worst = std::max(worst, std::fabs(double{r->out[i]} - attention[i]));
      scale = std::max(scale, std::fabs(double{attention[i]}));
    }
    std::cout << DTypeName(dtype) << ": APE(T=S=1) vs frontend attention max |diff| " << worst
              << " (scale " << scale << ")\n";
    EXPECT_LE(worst, 2e-6 * std::max(1.0, scale));
    for (float x : r->lse) EXPECT_TRUE(std::isfinite(x));
  }
}

// Other T, S: a direct fp64 evaluation of APE's formula over the same keys.
TEST_F(ParallelTest, AttendMatchesTheFormulaInFp64) {
  SetUpParallel(DType::kBF16);
  const float t = 0.7f, s = 1.3f;
  auto p = store_->ComposeParallel(Args(t, s));
  ASSERT_TRUE(p.ok()) << p.status();
  std::vector<float> q, attention;
  std::vector<uint8_t> qkv;
  FrontendQuery(*p, &q, &qkv, &attention);
  AttendArgs a;
  a.num_queries = 3;
  a.q_heads = 4;
  const std::string qb = Bytes(q);
  a.q = qb;
  a.query_kv_tokens = 3;
  const std::string kvb = Str(qkv);
  a.query_kv = kvb;
  a.device = AttendDevice::kAuto;  // the CPU here (no GPU; head_dim 16 is not a CUDA shape)
  auto r = ModuleStore::Attend(*p, a);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->device, AttendDevice::kCpu);

  const std::vector<uint8_t> kv = All(p->kv);
  const int64_t total = p->kv.total_tokens();
  const int D = 16;
  double worst = 0, diff_from_full = 0;
  for (int i = 0; i < 3; ++i) {
    for (int h = 0; h < 4; ++h) {
      const int kh = h / 2;
      auto dot = [&](auto key) {
        double acc = 0;
        for (int d = 0; d < D; ++d) acc += double{q[(i * 4 + h) * D + d]} * key(d);
        return acc;
      };
      // Context group: scale 1/(sqrt(d) T).
      std::vector<std::pair<double, int64_t>> ctx, oth;  // (score, token) with source flag below
      for (int64_t tok = 8; tok < total; ++tok) {
        ctx.push_back({dot([&](int d) { return double{At(spec_, kv, total, 0, 0, kh, tok, d)}; }) /
                           (std::sqrt(double{D}) * t),
                       tok});
      }
      // Other: the prefix and the query tokens 0..i.
      for (int64_t tok = 0; tok < 8; ++tok) {
        oth.push_back({dot([&](int d) { return double{At(spec_, kv, total, 0, 0, kh, tok, d)}; }) /
                           std::sqrt(double{D}),
                       tok});
      }
      for (int j = 0; j <= i; ++j) {
        oth.push_back({dot([&](int d) { return double{At(spec_, qkv, 3, 0, 0, kh, j, d)}; }) /
                           std::sqrt(double{D}),
                       -1 - j});
      }
      auto attend = [&](const std::vector<std::pair<double, int64_t>>& scores, double* lse) {
        double mx = -1e300;
        for (const auto& [sc, tok] : scores) mx = std::max(mx, sc);
        double z = 0;
        for (const auto& [sc, tok] : scores) z += std::exp(sc - mx);
        *lse = mx + std::log(z);
        std::vector<double> o(D, 0.0);
        for (const auto& [sc, tok] : scores) {
          const double w = std::exp(sc - *lse);
          for (int d = 0; d < D; ++d) {
            o[d] += w * (tok >= 0 ? At(spec_, kv, total, 0, 1, kh, tok, d)
                                  : At(spec_, qkv, 3, 0, 1, kh, -1 - tok, d));
          }
        }
        return o;
      };
      double lse_c = 0, lse_o = 0;
      const std::vector<double> oc = attend(ctx, &lse_c);
      const std::vector<double> oo = attend(oth, &lse_o);
      const double a_c = s * t * lse_c, a_o = lse_o, mx = std::max(a_c, a_o);
      const double wc = std::exp(a_c - mx) / (std::exp(a_c - mx) + std::exp(a_o - mx));
      for (int d = 0; d < D; ++d) {
        const double want = wc * oc[d] + (1 - wc) * oo[d];
        const float got = r->out[(i * 4 + h) * D + d];
        worst = std::max(worst, std::fabs(got - want));
        diff_from_full =
            std::max(diff_from_full, std::fabs(double{got} - attention[(i * 4 + h) * D + d]));
      }
      EXPECT_NEAR(r->lse[i * 4 + h], mx + std::log(std::exp(a_c - mx) + std::exp(a_o - mx)),
                  1e-5 * std::max(1.0, std::fabs(mx)));
    }
  }
  EXPECT_LE(worst, 1e-6);
  EXPECT_GT(diff_from_full, 1e-3);  // T, S != 1 change the output
}

TEST_F(ParallelTest, Errors) {
  SetUpParallel(DType::kBF16);
  ParallelArgs a = Args(0.0f, 1.0f);
  auto bad_t = store_->ComposeParallel(a);
  EXPECT_EQ(bad_t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_t.status().message(), HasSubstr("T = 0"));
  a = Args(1.0f, std::nanf(""));
  EXPECT_EQ(store_->ComposeParallel(a).status().code(), absl::StatusCode::kInvalidArgument);
  a = Args();
  a.contexts.clear();
  EXPECT_EQ(store_->ComposeParallel(a).status().code(), absl::StatusCode::kInvalidArgument);
  a = Args();
  a.contexts[1].clear();
  auto empty = store_->ComposeParallel(a);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.status().message(), HasSubstr("context 1"));
  a = Args();
  a.contexts[2] = {1, 2, 3, 4};
  auto missing = store_->ComposeParallel(a);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), AllOf(HasSubstr("context 2"), HasSubstr("PutContext")));
  a = Args();
  a.tenant = "u";
  EXPECT_EQ(store_->ComposeParallel(a).status().code(), absl::StatusCode::kNotFound);
  a = Args();
  a.prefix[0] ^= 1;
  auto no_prefix = store_->ComposeParallel(a);
  EXPECT_EQ(no_prefix.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(no_prefix.status().message(), HasSubstr("prefix of 8 tokens"));
  a = Args();
  a.model = "nope";
  EXPECT_EQ(store_->ComposeParallel(a).status().code(), absl::StatusCode::kNotFound);

  PutContextArgs put;
  put.model = "small";
  put.context = {};
  EXPECT_EQ(store_->BeginPutContext(put).status().code(), absl::StatusCode::kInvalidArgument);
  put.context = {1, -2};
  EXPECT_EQ(store_->BeginPutContext(put).status().code(), absl::StatusCode::kInvalidArgument);
  put.context = {1, 2};
  put.prefix_tokens = -1;
  EXPECT_EQ(store_->BeginPutContext(put).status().code(), absl::StatusCode::kInvalidArgument);

  auto p = store_->ComposeParallel(Args());
  ASSERT_TRUE(p.ok());
  AttendArgs at;
  at.num_queries = 1;
  at.q_heads = 4;
  const std::string q(4 * 16 * 4, '\0');
  at.q = q;
  at.query_kv_tokens = 1;
  const std::string kv(RangeLayoutBytes(spec_, 1), '\0');
  at.query_kv = kv;
  at.layer = 1;
  auto bad_layer = ModuleStore::Attend(*p, at);
  EXPECT_EQ(bad_layer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_layer.status().message(), HasSubstr("layer 1 out of range [0, 1)"));
  at.layer = 0;
  at.q_heads = 3;
  EXPECT_EQ(ModuleStore::Attend(*p, at).status().code(), absl::StatusCode::kInvalidArgument);
  at.q_heads = 4;
  at.q = q.substr(1);
  auto bad_q = ModuleStore::Attend(*p, at);
  EXPECT_EQ(bad_q.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad_q.status().message(), HasSubstr("q must be [1][4][16] = 256 bytes, got 255"));
  at.q = q;
  at.query_kv_tokens = 0;
  EXPECT_EQ(ModuleStore::Attend(*p, at).status().code(), absl::StatusCode::kInvalidArgument);
  at.query_kv_tokens = 2;
  EXPECT_EQ(ModuleStore::Attend(*p, at).status().code(), absl::StatusCode::kInvalidArgument);
  at.query_kv_tokens = 1;
  ASSERT_TRUE(ModuleStore::Attend(*p, at).ok());
  at.device = AttendDevice::kCuda;
  const absl::StatusCode cuda = ModuleStore::Attend(*p, at).status().code();
  if (!ApeCudaBuilt()) {
    EXPECT_EQ(cuda, absl::StatusCode::kUnimplemented);
  } else if (!GpuAvailable()) {
    EXPECT_EQ(cuda, absl::StatusCode::kUnavailable);
  } else {
    EXPECT_EQ(cuda, absl::StatusCode::kInvalidArgument);  // head_dim 16 is not a CUDA shape
  }
}

}  // namespace
}  // namespace ropekv
