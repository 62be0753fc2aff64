// The C++ client of ropekvd's Modules service: prompt modules (Prompt Cache) and parallel contexts
// (APE). See docs/prompt-modules.md and docs/parallel-contexts.md.
//
//   auto modules = ModulesClient::Connect({.address = "127.0.0.1:50051"});
//   auto schema = (*modules)->RegisterSchema("llama", pml_text);
//   for (const v1::SchemaModuleInfo& m : schema->schema().modules())   // encode each module at
//     (*modules)->PutModule({schema_id, m.name()}, Encode(m.tokens(), m.positions()));  // its
//   auto prompt = (*modules)->ComposePrompt(request);  // KV of the cached modules + what to encode
//
// KV layouts: PutModule / PutContext take range layout [layer][k|v][kv_head][n][head_dim];
// composed KV comes back as [layer][k|v][kv_head][kv_tokens][head_dim].
//
// Thread safety: a ModulesClient may be shared by threads.
#ifndef ROPEKV_CLIENTS_CPP_MODULES_CLIENT_H_
#define ROPEKV_CLIENTS_CPP_MODULES_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "clients/cpp/client.h"
#include "ropekv/v1/modules.grpc.pb.h"

namespace ropekv::client {

struct PutModuleArgs {
  std::string schema_id;
  std::string module;
  std::string tenant;
  int64_t rope_table = 0;
  bool pin = false;
};

struct ComposePromptArgs {
  std::string schema_id;
  std::string tenant;
  std::vector<std::string> modules;
  std::map<std::string, std::vector<int32_t>> arguments;  // parameter -> tokens
  std::vector<int32_t> user_tokens;
  v1::PromptLayout layout = v1::PROMPT_LAYOUT_SCHEMA;
};

struct ComposePromptResult {
  v1::ComposePromptHeader header;
  std::vector<uint8_t> data;  // [layer][k|v][kv_head][header.kv_tokens()][head_dim]
};

struct PutContextArgs {
  std::string model;
  std::string tenant;
  std::vector<int32_t> prefix;   // the prefix the context was encoded after
  std::vector<int32_t> context;  // its tokens
  int64_t rope_table = 0;
  bool pin = false;
};

struct ParallelArgs {
  std::string model;
  std::string tenant;
  std::vector<int32_t> prefix;
  std::vector<std::vector<int32_t>> contexts;
  std::vector<int32_t> query;
  float temperature = 1.0f;
  float scale = 1.0f;
};

struct ComposeParallelResult {
  v1::ComposeParallelHeader header;
  std::vector<uint8_t> data;  // [layer][k|v][kv_head][header.kv_tokens()][head_dim]
};

struct AttendArgs {
  int32_t layer = 0;
  int32_t num_queries = 1;
  int32_t q_heads = 0;
  v1::DType q_dtype = v1::DTYPE_F32;
  absl::Span<const uint8_t> q;         // [num_queries][q_heads][head_dim] of q_dtype
  int64_t query_kv_tokens = 0;         // m >= num_queries
  absl::Span<const uint8_t> query_kv;  // [k|v][kv_head][m][head_dim] of the model's dtype
  v1::AttendDevice device = v1::ATTEND_DEVICE_AUTO;
};

class ModulesClient {
 public:
  using Options = Client::Options;

  // Creates a channel (connects lazily). INVALID_ARGUMENT for an empty address.
  static absl::StatusOr<std::unique_ptr<ModulesClient>> Connect(Options options);

  // Registers a PML schema for a model; the response lists every element's positions.
  absl::StatusOr<v1::RegisterSchemaResponse> RegisterSchema(const std::string& model,
                                                            const std::string& schema_text);
  // The schema, with which modules are cached for `tenant`. NOT_FOUND for an unknown id.
  absl::StatusOr<v1::SchemaInfo> GetSchema(const std::string& schema_id,
                                           const std::string& tenant = "");

  // Stores a module's KV (its own tokens, range layout, keys at its schema positions).
  absl::StatusOr<v1::PutKvResponse> PutModule(const PutModuleArgs& args,
                                              absl::Span<const uint8_t> kv);
  // The KV of the cached modules of a prompt, the positions of every token and the ranges to
  // encode. The server's verdict otherwise (INVALID_ARGUMENT naming the place, NOT_FOUND).
  absl::StatusOr<ComposePromptResult> ComposePrompt(const ComposePromptArgs& args);

  // Stores a context's KV (range layout, keys at positions |prefix|..).
  absl::StatusOr<v1::PutKvResponse> PutContext(const PutContextArgs& args,
                                               absl::Span<const uint8_t> kv);
  // The prefix and contexts' KV with positions, context group, T and S.
  absl::StatusOr<ComposeParallelResult> ComposeParallel(const ParallelArgs& args);
  // The APE merge over a composed parallel prompt (a check of a frontend's attention).
  absl::StatusOr<v1::AttendResponse> Attend(const ParallelArgs& prompt, const AttendArgs& args);

  v1::Modules::Stub* stub() { return stub_.get(); }

 private:
  ModulesClient(Options options, std::shared_ptr<grpc::Channel> channel);
  void Prepare(grpc::ClientContext* ctx) const;
  // Streams header + bytes in chunks through `writer`, then finishes.
  template <typename Request>
  absl::Status Send(grpc::ClientWriter<Request>* writer, Request* first,
                    absl::Span<const uint8_t> bytes);

  Options options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Modules::Stub> stub_;
};

}  // namespace ropekv::client

#endif  // ROPEKV_CLIENTS_CPP_MODULES_CLIENT_H_
