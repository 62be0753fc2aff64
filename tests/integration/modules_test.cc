// Prompt modules and parallel contexts through the real gRPC API: a ropekvd process on a free
// loopback port, the C++ ModulesClient, and the reference Llama frontend (clients/llama) encoding
// modules, contexts and queries. Checks golden position ids, the daemon's bytes against the
// in-process ModuleStore and against the frontend's own full encode, APE at T = S = 1 through
// Attend against the frontend's full attention, and error codes with the place named.
#include "cache/modules.h"

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cache/kv_cache.h"
#include "clients/cpp/client.h"
#include "clients/cpp/modules_client.h"
#include "clients/llama/llama_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon.h"

namespace ropekv {
namespace {

using client::Client;
using client::ModulesClient;
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

llama::LlamaConfig SmallConfig() {
  llama::LlamaConfig c;
  c.vocab_size = 160;
  c.hidden_size = 48;
  c.intermediate_size = 80;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 4096;
  c.rope.theta = 10000.0;
  return c;
}

template <typename Repeated>
std::vector<int64_t> Vec(const Repeated& r) {
  return std::vector<int64_t>(r.begin(), r.end());
}

std::vector<int64_t> Iota(int64_t n, int64_t start) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[i] = start + i;
  return p;
}

std::string Str(const std::vector<uint8_t>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size());
}

class ModulesServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto model = llama::LlamaModel::Random(SmallConfig(), 0x1e57);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *std::move(model);
    spec_.layers = 1;
    spec_.kv_heads = 2;
    spec_.head_dim = 16;
    spec_.dtype = DType::kBF16;
    spec_.block_tokens = 4;
    spec_.rope = model_->rope();
    // Small chunks on both sides: every put and every composed stream spans many messages.
    daemon_ = std::make_unique<testing::Daemon>(std::vector<std::string>{"--chunk_size=300"});
    ASSERT_TRUE(daemon_->running());
    Client::Options o;
    o.address = daemon_->address();
    o.chunk_bytes = 200;
    auto kv = Client::Connect(o);
    ASSERT_TRUE(kv.ok());
    kv_ = *std::move(kv);
    auto modules = ModulesClient::Connect(o);
    ASSERT_TRUE(modules.ok());
    modules_ = *std::move(modules);
    ASSERT_TRUE(kv_->Health().ok());
    v1::ModelSpec p;
    p.set_layers(1);
    p.set_kv_heads(2);
    p.set_head_dim(16);
    p.set_dtype(v1::DTYPE_BF16);
    p.set_block_tokens(4);
    p.mutable_rope()->set_theta(10000.0);
    p.mutable_rope()->set_max_position_embeddings(4096);
    auto reg = kv_->RegisterModel(p, "small");
    ASSERT_TRUE(reg.ok()) << reg.status();

    // The same operations in process give the expected bytes.
    auto cache = KvCache::Create(KvCache::Options());
    ASSERT_TRUE(cache.ok());
    cache_ = *std::move(cache);
    ASSERT_TRUE(cache_->RegisterModel(spec_, "small").ok());
    auto store = ModuleStore::Create(cache_.get(), ModuleStore::Options());
    ASSERT_TRUE(store.ok());
    store_ = *std::move(store);
  }

  // The frontend encodes tokens at positions after what `cache` holds; their KV in range layout.
  std::vector<uint8_t> Encode(llama::KvCache* cache, const std::vector<int32_t>& tokens,
                              const std::vector<int64_t>& positions,
                              llama::ForwardTrace* trace = nullptr) {
    const int64_t before = cache->tokens();
    auto logits = model_->Prefill(tokens, positions, cache, trace);
    EXPECT_TRUE(logits.ok()) << logits.status();
    std::vector<uint8_t> kv(cache->BytesFor(static_cast<int64_t>(tokens.size())));
    EXPECT_TRUE(cache->ExportTokens(before, cache->tokens(), absl::MakeSpan(kv)).ok());
    return kv;
  }
  std::unique_ptr<llama::KvCache> Frontend() {
    auto c = model_->NewCache(DType::kBF16, 4);
    EXPECT_TRUE(c.ok());
    return *std::move(c);
  }

  std::unique_ptr<llama::LlamaModel> model_;
  ModelSpec spec_;
  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<Client> kv_;
  std::unique_ptr<ModulesClient> modules_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<ModuleStore> store_;
};

TEST_F(ModulesServiceTest, SchemaPutComposeGoldenPositions) {
  auto reg = modules_->RegisterSchema("small", kTravel);
  ASSERT_TRUE(reg.ok()) << reg.status();
  EXPECT_TRUE(reg->created());
  const v1::SchemaInfo& info = reg->schema();
  EXPECT_EQ(info.name(), "travel");
  EXPECT_EQ(info.length(), 23);
  ASSERT_EQ(info.modules_size(), 5);
  std::map<std::string, const v1::SchemaModuleInfo*> by_name;
  for (const v1::SchemaModuleInfo& m : info.modules()) by_name[m.name()] = &m;
  EXPECT_THAT(Vec(by_name["system"]->positions()), ElementsAre(0, 1, 2, 3, 4, 5));
  EXPECT_THAT(Vec(by_name["tokyo"]->positions()), ElementsAre(6, 7, 8, 9, 10));
  EXPECT_EQ(by_name["tokyo"]->union_name(), "city");
  EXPECT_THAT(Vec(by_name["miami"]->positions()), ElementsAre(6, 7));
  EXPECT_THAT(Vec(by_name["plan"]->positions()), ElementsAre(11, 12, 16, 17, 18, 22));
  EXPECT_EQ(by_name["plan"]->start(), 11);
  EXPECT_EQ(by_name["plan"]->length(), 12);
  EXPECT_THAT(Vec(by_name["extras"]->positions()), ElementsAre(19, 20, 21));
  EXPECT_EQ(by_name["extras"]->parent(), "plan");
  ASSERT_EQ(info.unions_size(), 1);
  EXPECT_EQ(info.unions(0).start(), 6);
  EXPECT_EQ(info.unions(0).length(), 5);
  ASSERT_EQ(info.parameters_size(), 1);
  EXPECT_EQ(info.parameters(0).name(), "days");
  EXPECT_EQ(info.parameters(0).start(), 13);
  EXPECT_EQ(info.parameters(0).length(), 3);
  auto again = modules_->RegisterSchema("small", kTravel);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(again->created());
  EXPECT_EQ(again->schema().schema_id(), info.schema_id());

  // Every module encoded on its own at its schema positions, put through the daemon and in
  // process.
  auto local = store_->RegisterSchema("small", kTravel);
  ASSERT_TRUE(local.ok());
  for (const v1::SchemaModuleInfo& m : info.modules()) {
    const std::vector<int32_t> tokens(m.tokens().begin(), m.tokens().end());
    const std::vector<uint8_t> kv = Encode(Frontend().get(), tokens, Vec(m.positions()));
    client::PutModuleArgs args;
    args.schema_id = info.schema_id();
    args.module = m.name();
    args.tenant = "t";
    auto put = modules_->PutModule(args, kv);
    ASSERT_TRUE(put.ok()) << m.name() << ": " << put.status();
    EXPECT_EQ(put->tokens(), m.tokens_size());
    ASSERT_TRUE(store_->PutModule({local->id, m.name(), "t"}, Str(kv)).ok());
  }
  auto cached = modules_->GetSchema(info.schema_id(), "t");
  ASSERT_TRUE(cached.ok()) << cached.status();
  for (const v1::SchemaModuleInfo& m : cached->modules()) EXPECT_TRUE(m.cached()) << m.name();
  auto other_tenant = modules_->GetSchema(info.schema_id(), "u");
  ASSERT_TRUE(other_tenant.ok());
  for (const v1::SchemaModuleInfo& m : other_tenant->modules()) EXPECT_FALSE(m.cached());

  for (v1::PromptLayout layout : {v1::PROMPT_LAYOUT_SCHEMA, v1::PROMPT_LAYOUT_COMPACT}) {
    SCOPED_TRACE(v1::PromptLayout_Name(layout));
    client::ComposePromptArgs a;
    a.schema_id = info.schema_id();
    a.tenant = "t";
    a.modules = {"system", "miami", "plan"};
    a.arguments = {{"days", {90, 91}}};
    a.user_tokens = {100, 101};
    a.layout = layout;
    auto got = modules_->ComposePrompt(a);
    ASSERT_TRUE(got.ok()) << got.status();
    const v1::ComposePromptHeader& h = got->header;
    EXPECT_THAT(Vec(h.tokens()),
                ElementsAre(1, 2, 3, 4, 5, 6, 20, 21, 30, 31, 90, 91, 32, 33, 34, 35, 100, 101));
    ASSERT_EQ(h.encode_size(), 2);
    EXPECT_EQ(h.encode(0).begin(), 10);
    EXPECT_EQ(h.encode(0).end(), 12);
    EXPECT_EQ(h.encode(1).begin(), 16);
    if (layout == v1::PROMPT_LAYOUT_SCHEMA) {
      EXPECT_THAT(Vec(h.position_ids()),
                  ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 16, 17, 18, 22, 23, 24));
      EXPECT_EQ(h.next_position(), 25);
      EXPECT_THAT(Vec(h.kv_positions()),
                  ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 16, 17, 18, 22));
      EXPECT_EQ(h.encode(0).position(), 13);
      EXPECT_EQ(h.encode(1).position(), 23);
    } else {
      EXPECT_THAT(Vec(h.position_ids()), ElementsAreArray(Iota(18, 0)));
      EXPECT_EQ(h.next_position(), 18);
      EXPECT_THAT(Vec(h.kv_positions()), ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15));
      EXPECT_EQ(h.encode(0).position(), 10);
      EXPECT_EQ(h.encode(1).position(), 16);
    }
    ASSERT_EQ(h.pieces_size(), 7);
    EXPECT_EQ(h.pieces(3).kind(), v1::PromptPieceInfo::KIND_ARGUMENT);
    EXPECT_EQ(h.pieces(3).parameter(), "days");
    EXPECT_EQ(h.pieces(3).kv_offset(), -1);
    EXPECT_EQ(h.pieces(6).kind(), v1::PromptPieceInfo::KIND_USER);
    EXPECT_EQ(h.pieces(2).kind(), v1::PromptPieceInfo::KIND_CACHED);
    EXPECT_EQ(h.pieces(2).hit(),
              layout == v1::PROMPT_LAYOUT_SCHEMA ? v1::HIT_EXACT : v1::HIT_REROTATED);
    EXPECT_EQ(h.kv_tokens(), 14);

    // The daemon's bytes equal the library's.
    ComposePromptArgs la;
    la.schema_id = local->id;
    la.tenant = "t";
    la.modules = a.modules;
    la.arguments = a.arguments;
    la.user_tokens = a.user_tokens;
    la.layout = layout == v1::PROMPT_LAYOUT_SCHEMA ? Layout::kSchema : Layout::kCompact;
    auto want = store_->ComposePrompt(la);
    ASSERT_TRUE(want.ok());
    std::vector<uint8_t> want_bytes(want->kv.bytes(), 0xFF);
    ASSERT_TRUE(want->kv.WriteAll(want_bytes.data()).ok());
    ASSERT_EQ(got->data.size(), want_bytes.size());
    EXPECT_TRUE(got->data == want_bytes) << "daemon and library differ";

    // The frontend plugs the cached KV in and encodes the rest: with schema positions its user
    // tokens' logits equal encoding the whole prompt (1 layer: the same K/V bit for bit).
    if (layout == v1::PROMPT_LAYOUT_SCHEMA) {
      auto composed = Frontend();
      std::vector<float> logits;
      const int64_t total = h.kv_tokens();
      for (const v1::PromptPieceInfo& p : h.pieces()) {
        const std::vector<int32_t> tokens(p.tokens().begin(), p.tokens().end());
        const int64_t n = static_cast<int64_t>(tokens.size());
        if (p.kind() == v1::PromptPieceInfo::KIND_CACHED) {
          std::vector<uint8_t> slice;
          const size_t row = 16 * 2;
          for (int r = 0; r < 4; ++r) {  // [k|v][kv_head] rows of the one layer
            const uint8_t* src = got->data.data() + (r * total + p.kv_offset()) * row;
            slice.insert(slice.end(), src, src + n * row);
          }
          ASSERT_TRUE(composed->AppendBytes(tokens, Iota(n, p.position()), slice).ok());
        } else {
          auto l = model_->Prefill(tokens, Iota(n, p.position()), composed.get());
          ASSERT_TRUE(l.ok());
          logits = *std::move(l);
        }
      }
      auto full = Frontend();
      const std::vector<int32_t> all(h.tokens().begin(), h.tokens().end());
      auto full_logits = model_->Prefill(all, Vec(h.position_ids()), full.get());
      ASSERT_TRUE(full_logits.ok());
      ASSERT_EQ(logits.size(), 2u * 160);
      for (size_t i = 0; i < logits.size(); ++i) {
        ASSERT_EQ(logits[i], (*full_logits)[16 * 160 + i]) << i;
      }
    }
  }
}

TEST_F(ModulesServiceTest, ErrorsNameThePlace) {
  auto bad =
      modules_->RegisterSchema("small", "<schema>\n<module name=\"a\">1 2</modul>\n</schema>");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), AllOf(HasSubstr("line 2"), HasSubstr("</modul>")));
  EXPECT_EQ(modules_->RegisterSchema("nope", kTravel).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(modules_->GetSchema("feedfeed").status().code(), absl::StatusCode::kNotFound);

  auto reg = modules_->RegisterSchema("small", kTravel);
  ASSERT_TRUE(reg.ok());
  const std::string id = reg->schema().schema_id();
  client::ComposePromptArgs a;
  a.schema_id = id;
  a.modules = {"paris"};
  auto unknown = modules_->ComposePrompt(a);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(unknown.status().message(), HasSubstr("unknown module 'paris' in schema 'travel'"));
  a.modules = {"tokyo", "miami"};
  auto both = modules_->ComposePrompt(a);
  EXPECT_EQ(both.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(both.status().message(), HasSubstr("both members of union 'city'"));
  a.modules = {"plan"};
  a.arguments = {{"days", {1, 2, 3, 4}}};
  auto longer = modules_->ComposePrompt(a);
  EXPECT_EQ(longer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      longer.status().message(),
      HasSubstr("parameter 'days' of module 'plan' has 4 tokens, longer than its length 3"));
  a.arguments = {{"days", {1}}};
  auto not_put = modules_->ComposePrompt(a);
  EXPECT_EQ(not_put.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(not_put.status().message(),
              AllOf(HasSubstr("module 'plan'"), HasSubstr("PutModule")));

  client::PutModuleArgs put;
  put.schema_id = id;
  put.module = "miami";
  auto short_put = modules_->PutModule(put, std::vector<uint8_t>(100, 1));
  EXPECT_EQ(short_put.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(short_put.status().message(), HasSubstr("got 100"));
  put.module = "paris";
  EXPECT_EQ(modules_->PutModule(put, std::vector<uint8_t>(10, 1)).status().code(),
            absl::StatusCode::kInvalidArgument);

  // A PutModule stream without a header.
  grpc::ClientContext ctx;
  v1::PutKvResponse resp;
  auto writer = modules_->stub()->PutModule(&ctx, &resp);
  v1::PutModuleRequest req;
  req.set_data("xyz");
  writer->Write(req);
  writer->WritesDone();
  const grpc::Status st = writer->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(st.error_message(), HasSubstr("needs a header"));

  client::ParallelArgs p;
  p.model = "small";
  p.contexts = {{1, 2, 3}};
  p.temperature = 0.0f;
  auto bad_t = modules_->ComposeParallel(p);
  EXPECT_EQ(bad_t.status().code(), absl::StatusCode::kInvalidArgument);
  p.temperature = 1.0f;
  auto missing = modules_->ComposeParallel(p);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("context 0"));
}

// Parallel contexts: prefix by KVCache.Put, contexts by PutContext, ComposeParallel's positions,
// and Attend at T = S = 1 against the frontend's full attention over the same cache.
TEST_F(ModulesServiceTest, ParallelContextsAndAttend) {
  std::mt19937 rng(77);
  std::uniform_int_distribution<int32_t> tok(0, 159);
  auto random = [&](int n) {
    std::vector<int32_t> t(n);
    for (int32_t& x : t) x = tok(rng);
    return t;
  };
  const std::vector<int32_t> prefix = random(8);
  const std::vector<std::vector<int32_t>> contexts = {random(6), random(9)};
  const std::vector<int32_t> query = random(2);
  {
    auto fe = Frontend();
    Encode(fe.get(), prefix, Iota(8, 0));
    std::vector<uint8_t> blocks;
    for (int64_t b = 0; b < fe->num_blocks(); ++b) {
      auto data = fe->BlockData(b);
      blocks.insert(blocks.end(), data.begin(), data.end());
    }
    client::PutArgs put;
    put.model = "small";
    put.tenant = "t";
    put.tokens = prefix;
    v1::ModelSpec p;
    p.set_layers(1);
    p.set_kv_heads(2);
    p.set_head_dim(16);
    p.set_dtype(v1::DTYPE_BF16);
    p.set_block_tokens(4);
    auto r = kv_->Put(put, client::KvView{blocks, client::KvShape::Of(p, 2)});
    ASSERT_TRUE(r.ok()) << r.status();
  }
  for (const auto& c : contexts) {
    auto fe = Frontend();
    Encode(fe.get(), prefix, Iota(8, 0));
    const std::vector<uint8_t> kv = Encode(fe.get(), c, Iota(c.size(), 8));
    client::PutContextArgs args;
    args.model = "small";
    args.tenant = "t";
    args.prefix = prefix;
    args.context = c;
    auto put = modules_->PutContext(args, kv);
    ASSERT_TRUE(put.ok()) << put.status();
    EXPECT_EQ(put->tokens(), static_cast<int64_t>(c.size()));
  }
  client::ParallelArgs pa;
  pa.model = "small";
  pa.tenant = "t";
  pa.prefix = prefix;
  pa.contexts = contexts;
  pa.query = query;
  auto composed = modules_->ComposeParallel(pa);
  ASSERT_TRUE(composed.ok()) << composed.status();
  const v1::ComposeParallelHeader& h = composed->header;
  EXPECT_EQ(h.prefix().kv_end(), 8);
  ASSERT_EQ(h.contexts_size(), 2);
  EXPECT_EQ(h.contexts(0).position(), 8);
  EXPECT_EQ(h.contexts(1).position(), 8);
  EXPECT_EQ(h.contexts(1).kv_begin(), 14);
  EXPECT_EQ(h.query_position(), 17);
  EXPECT_THAT(Vec(h.query_positions()), ElementsAre(17, 18));
  ASSERT_EQ(h.context_group_size(), 1);
  EXPECT_EQ(h.context_group(0).kv_begin(), 8);
  EXPECT_EQ(h.context_group(0).kv_end(), 23);
  EXPECT_EQ(h.temperature(), 1.0f);
  EXPECT_EQ(h.scale(), 1.0f);
  EXPECT_EQ(h.kv_tokens(), 23);

  // The frontend's full attention over prefix + contexts (shared positions) + query.
  auto fe = Frontend();
  std::vector<int32_t> ids = prefix;
  for (const auto& c : contexts) ids.insert(ids.end(), c.begin(), c.end());
  ASSERT_TRUE(fe->AppendBytes(ids, Vec(h.kv_positions()), composed->data).ok());
  llama::ForwardTrace trace;
  const std::vector<uint8_t> own = Encode(fe.get(), query, Vec(h.query_positions()), &trace);
  const std::vector<float>& q = trace.queries[0];
  client::AttendArgs at;
  at.num_queries = 2;
  at.q_heads = 4;
  at.q = absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(q.data()), q.size() * sizeof(float));
  at.query_kv_tokens = 2;
  at.query_kv = own;
  auto out = modules_->Attend(pa, at);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->device(), v1::ATTEND_DEVICE_CPU);  // head_dim 16 is not a CUDA shape
  ASSERT_EQ(out->out_size(), static_cast<int>(trace.attention[0].size()));
  double worst = 0;
  for (int i = 0; i < out->out_size(); ++i) {
    worst = std::max(worst, std::fabs(double{out->out(i)} - trace.attention[0][i]));
  }
  EXPECT_LE(worst, 2e-6);
  at.layer = 3;
  auto bad = modules_->Attend(pa, at);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("layer 3 out of range [0, 1)"));
}

}  // namespace
}  // namespace ropekv
