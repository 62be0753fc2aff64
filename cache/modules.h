// Prompt modules (Prompt Cache) and parallel contexts (APE) over the KvCache's segments.
//
// Prompt modules (docs/prompt-modules.md). A schema (cache/prompt_schema.h) is registered for a
// model; its id is a hash of the model id and the schema text, so a frontend that registers the
// same text again (after a daemon restart, say) gets the same id and finds its modules. A module's
// own tokens sit at consecutive schema positions except where a parameter slot or a nested module
// interrupts them; each maximal run of consecutive positions ("run") is stored as one KvCache
// segment of the run's tokens, rotated_at = the run's schema start, under a tenant salt derived
// from (tenant, schema id, module name, run index) — so two modules, or two runs of one module,
// never share KV even when their tokens are equal (their KV depends on what they attended to).
// ComposePrompt lays a prompt out (LayoutPrompt) and places every cached run at its prompt
// position, re-rotating keys from the stored copy in one rotation when the position differs
// (compact layout, or nothing at all in the schema layout).
//
// Parallel contexts (docs/parallel-contexts.md). A context is a segment of its tokens under a
// context salt of the tenant, rotated_at = |P| of the prefix it was encoded after. ComposeParallel
// places the prefix (a cached prefix, or a segment) at 0..|P|-1 and every context at |P|..: a
// context encoded after a prefix of another length is re-rotated in one rotation. Its KV is APE's
// approximation: the context attended to some prefix, not necessarily this one. Attend runs the
// APE merge of kernels/ape over a composed parallel prompt (CPU reference, or CUDA where a GPU is
// present), for checking a frontend.
//
// Composed KV is held (its blocks cannot be evicted) for the life of the returned object and is
// produced one layer at a time, like cache/compose.h's ComposedPrompt.
//
// Thread safety: ModuleStore is thread-safe; its lock guards the schema registry only and is never
// held while calling into the KvCache. KvWriter, AssembledKv and the composed prompts are
// thread-compatible (one user each).
#ifndef ROPEKV_CACHE_MODULES_H_
#define ROPEKV_CACHE_MODULES_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "cache/compose.h"
#include "cache/kv_cache.h"
#include "cache/model.h"
#include "cache/prompt_schema.h"
#include "kernels/common/dtype.h"

namespace ropekv {

// A run of a module's own tokens at consecutive schema positions: [token_begin, token_end) of
// SchemaModule::tokens, the first at schema position `start`. Stored as one segment.
struct ModuleRun {
  int32_t token_begin = 0;
  int32_t token_end = 0;
  int64_t start = 0;
  int32_t size() const { return token_end - token_begin; }
};

// The runs of a module, in order (one per run of token ids in its PML content).
std::vector<ModuleRun> ModuleRuns(const SchemaModule& module);

// The schema id of `schema_text` for model `model_id`: 32 hex digits of SHA-256 over both
// (length-prefixed), stable across processes and versions.
std::string SchemaIdOf(absl::string_view model_id, absl::string_view schema_text);

// Tenant salts of the segments that hold a module run and a context (see the file comment).
std::string ModuleRunTenant(absl::string_view tenant, absl::string_view schema_id,
                            absl::string_view module, int run);
std::string ContextTenant(absl::string_view tenant);

// Strides and bytes of KV of n tokens in range layout [layer][k|v][kv_head][n][head_dim].
uint64_t RangeLayoutBytes(const ModelSpec& spec, int64_t n);

// KV of cached runs placed one after another, [layer][k|v][kv_head][total_tokens][head_dim], each
// run's keys at its own target positions (re-rotated once from the stored copy where needed),
// values bit for bit. Holds the runs' blocks until destroyed. Move-only, thread-compatible.
class AssembledKv {
 public:
  AssembledKv() = default;
  AssembledKv(AssembledKv&&) = default;
  AssembledKv& operator=(AssembledKv&&) = default;

  const ModelSpec& spec() const { return spec_; }
  int layers() const { return spec_.layers; }
  int64_t total_tokens() const { return total_tokens_; }
  // Bytes of one layer: [k|v][kv_head][total_tokens][head_dim].
  uint64_t layer_bytes() const;
  // Bytes of all layers.
  uint64_t bytes() const { return layer_bytes() * static_cast<uint64_t>(spec_.layers); }
  // Writes one layer (layer_bytes() bytes) into dst. INVALID_ARGUMENT for a layer out of range.
  absl::Status WriteLayer(int layer, void* dst) const;
  // Writes every layer, [layer][k|v][kv_head][total_tokens][head_dim] (bytes() bytes).
  absl::Status WriteAll(void* dst) const;

 private:
  friend class ModuleStore;
  struct Copy {
    const void* block;  // [layer][k|v][kv_head][block_tokens][head_dim]
    int64_t dst_token;
    int64_t n_tokens;
    int64_t from_pos;
    int64_t to_pos;
    RopeTableId table;
  };
  // Holds `handle` and places its first `n_tokens` tokens next, the first at `position`.
  HitKind Append(ReadHandle handle, int64_t n_tokens, int64_t position);

  ModelSpec spec_;
  std::vector<ReadHandle> handles_;
  std::vector<Copy> copies_;
  int64_t total_tokens_ = 0;
};

// What a PutModule or PutContext stored.
struct PutKvResult {
  int64_t tokens = 0;
  uint32_t segments = 0;
  uint32_t blocks_stored = 0;
  uint32_t blocks_existing = 0;
};

// Receives the KV of a PutModule or PutContext in range layout, [layer][k|v][kv_head][n][head_dim]
// of the model's dtype, in pieces of any size; Finish stores it as segments. Destroying it before
// Finish stores nothing. Thread-compatible.
class KvWriter {
 public:
  KvWriter(const KvWriter&) = delete;
  KvWriter& operator=(const KvWriter&) = delete;

  // Appends bytes. INVALID_ARGUMENT past expected_bytes(); the writer is dead after an error.
  absl::Status Write(absl::string_view bytes);
  // Stores every segment. INVALID_ARGUMENT when fewer bytes came than expected; the KvCache's
  // errors (RESOURCE_EXHAUSTED when full, ...) otherwise. A failure may leave some segments of a
  // module stored: harmless, ComposePrompt uses a module only when all of its runs are cached.
  absl::StatusOr<PutKvResult> Finish();

  uint64_t expected_bytes() const { return expected_; }
  uint64_t received_bytes() const { return buffer_.size(); }

 private:
  friend class ModuleStore;
  struct Segment {
    std::string tenant;
    std::vector<int32_t> tokens;
    int32_t token_begin = 0;  // in the range-layout buffer
    int64_t rotated_at = 0;
  };
  KvWriter(KvCache* cache, RegisteredModel model, std::vector<Segment> segments, int64_t n_tokens,
           RopeTableId rope_table, bool pin);

  KvCache* cache_;
  RegisteredModel model_;
  std::vector<Segment> segments_;
  int64_t n_tokens_;
  RopeTableId rope_table_;
  bool pin_;
  uint64_t expected_;
  std::string buffer_;
  absl::Status status_;
  bool finished_ = false;
};

// A registered schema.
struct RegisteredSchema {
  std::string id;
  ModelId model_id;
  std::shared_ptr<const Schema> schema;
  bool created = false;  // false: it was registered before
};

struct PutModuleArgs {
  std::string schema_id;
  std::string module;
  std::string tenant;
  RopeTableId rope_table = kBaseTable;  // table the keys were rotated with
  bool pin = false;                     // never evicted until unpinned
};

struct ComposePromptArgs {
  std::string schema_id;
  std::string tenant;
  std::vector<std::string> modules;                       // selected
  std::map<std::string, std::vector<int32_t>> arguments;  // parameter -> tokens
  std::vector<int32_t> user_tokens;
  Layout layout = Layout::kSchema;
};

// One piece of a composed prompt: a LayoutPrompt piece and where its KV is.
struct ComposedPiece {
  PromptPiece piece;
  int64_t prompt_offset = 0;  // index of its first token in ModulePrompt::tokens
  int64_t kv_offset = -1;     // cached: index of its first token in ModulePrompt::kv; else -1
  HitKind hit = HitKind::kExact;
};

// Prompt tokens [begin, end) at positions position.. that the frontend must encode.
struct EncodeRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t position = 0;
};

struct ModulePrompt {
  std::vector<ComposedPiece> pieces;  // prompt order
  std::vector<int32_t> tokens;        // every token of the prompt
  std::vector<int64_t> position_ids;  // the position of every token
  int64_t next_position = 0;          // position of the first generated token
  std::vector<EncodeRange> encode;    // argument and user pieces
  std::vector<int64_t> kv_positions;  // the position of every token of kv
  AssembledKv kv;                     // the cached pieces' KV, prompt order
};

struct PutContextArgs {
  std::string model;  // id or name
  std::string tenant;
  int64_t prefix_tokens = 0;     // |P|: the context's keys are at positions |P|..
  std::vector<int32_t> context;  // the key
  RopeTableId rope_table = kBaseTable;
  bool pin = false;
};

struct ParallelArgs {
  std::string model;
  std::string tenant;
  std::vector<int32_t> prefix;  // a cached prefix (full blocks) or segment; may be empty
  std::vector<std::vector<int32_t>> contexts;  // each put by PutContext; at least one
  std::vector<int32_t> query;                  // for the query positions
  float temperature = 1.0f;                    // APE T (> 0, finite)
  float scale = 1.0f;                          // APE S (> 0, finite)
};

// KV tokens [kv_begin, kv_end) at positions position..
struct KvRange {
  int64_t kv_begin = 0;
  int64_t kv_end = 0;
  int64_t position = 0;
  HitKind hit = HitKind::kExact;
  int64_t size() const { return kv_end - kv_begin; }
};

struct ParallelPrompt {
  KvRange prefix;                 // [0, |P|) at 0
  std::vector<KvRange> contexts;  // each at |P|
  int64_t query_position = 0;     // |P| + max |C_j|
  std::vector<int64_t> query_positions;
  std::vector<KvRange> context_group;  // the contexts' KV, merged where adjacent
  float temperature = 1.0f;
  float scale = 1.0f;
  std::vector<int64_t> kv_positions;
  AssembledKv kv;  // prefix then contexts in order
};

enum class AttendDevice : uint8_t { kAuto = 0, kCpu = 1, kCuda = 2 };

struct AttendArgs {
  int layer = 0;
  int32_t num_queries = 1;  // n
  int32_t q_heads = 0;      // a multiple of the model's kv_heads
  DType q_dtype = DType::kF32;
  absl::string_view q;  // [n][q_heads][head_dim] of q_dtype, post-RoPE
  // [k|v][kv_head][m][head_dim] of the model's dtype, m >= n: keys after the prefix and contexts;
  // the last n are the queries' own (causal among them).
  int64_t query_kv_tokens = 0;  // m
  absl::string_view query_kv;
  AttendDevice device = AttendDevice::kAuto;
};

struct AttendResult {
  std::vector<float> out;  // [n][q_heads][head_dim]
  std::vector<float> lse;  // [n][q_heads]
  AttendDevice device = AttendDevice::kCpu;
};

class ModuleStore {
 public:
  struct Options {
    // Most schemas registered; more -> RESOURCE_EXHAUSTED.
    uint32_t max_schemas = 4096;
    // Largest KV one PutModule / PutContext may send (it is buffered until Finish).
    uint64_t max_put_bytes = 1ull << 30;
  };

  // `cache` is borrowed and must outlive the store. INVALID_ARGUMENT for a null cache or a zero
  // limit.
  static absl::StatusOr<std::unique_ptr<ModuleStore>> Create(KvCache* cache, Options options);

  // Parses `schema_text` (ParseSchema) for `model` (id or name) and registers it. NOT_FOUND for an
  // unknown model; INVALID_ARGUMENT (naming line, column and element) for a bad schema;
  // RESOURCE_EXHAUSTED past max_schemas. The same model and text give the same id (created false).
  absl::StatusOr<RegisteredSchema> RegisterSchema(absl::string_view model,
                                                  absl::string_view schema_text);
  // The schema of `schema_id`; NOT_FOUND when it is not registered.
  absl::StatusOr<RegisteredSchema> GetSchema(absl::string_view schema_id) const;
  // Whether every run of each module is cached for `tenant`, in schema module order.
  absl::StatusOr<std::vector<bool>> CachedModules(absl::string_view schema_id,
                                                  absl::string_view tenant);

  // Starts storing a module's KV: its own tokens (SchemaModule::tokens, n of them) in range
  // layout, keys rotated at SchemaModule::positions. NOT_FOUND for an unknown schema;
  // INVALID_ARGUMENT for an unknown module (naming the schema) or a bad rope table;
  // RESOURCE_EXHAUSTED when its KV is more than max_put_bytes.
  absl::StatusOr<std::unique_ptr<KvWriter>> BeginPutModule(const PutModuleArgs& args);
  // BeginPutModule + Write + Finish.
  absl::StatusOr<PutKvResult> PutModule(const PutModuleArgs& args, absl::string_view range_bytes);

  // Lays out a prompt (LayoutPrompt: INVALID_ARGUMENT naming the place for an unknown module, two
  // members of one union, an argument longer than its parameter, ...) and holds the KV of its
  // cached pieces. NOT_FOUND for an unknown schema, or naming the module and its run when a
  // selected module is not (fully) cached for the tenant.
  absl::StatusOr<ModulePrompt> ComposePrompt(const ComposePromptArgs& args);

  // Starts storing a context's KV (range layout, keys at positions prefix_tokens..). NOT_FOUND for
  // an unknown model; INVALID_ARGUMENT for an empty context, a negative token id or prefix length,
  // a bad table; RESOURCE_EXHAUSTED when its KV is more than max_put_bytes. Contexts with the
  // same tokens share one stored copy (the first put keeps its rotated_at).
  absl::StatusOr<std::unique_ptr<KvWriter>> BeginPutContext(const PutContextArgs& args);
  absl::StatusOr<PutKvResult> PutContext(const PutContextArgs& args, absl::string_view range_bytes);

  // Composes a parallel prompt (see ParallelPrompt). NOT_FOUND for an unknown model, for a prefix
  // cached neither as a prefix nor as a segment, or naming the context that is not cached;
  // INVALID_ARGUMENT for no contexts, an empty context, T or S not finite and > 0.
  absl::StatusOr<ParallelPrompt> ComposeParallel(const ParallelArgs& args);

  // APE attention (kernels/ape) of args.q over `prompt`: the context group with T, the prefix
  // and args.query_kv as the other group, merged with S. kAuto runs CUDA when built with it, a GPU
  // is present and the shape is supported, else the CPU reference. INVALID_ARGUMENT (naming the
  // field, expected vs got) for a bad layer, size or shape; UNAVAILABLE for kCuda without a GPU
  // (UNIMPLEMENTED in a build without CUDA). Thread-safe for distinct prompts.
  static absl::StatusOr<AttendResult> Attend(const ParallelPrompt& prompt, const AttendArgs& args);

  uint32_t schemas() const;

 private:
  struct Entry {
    RegisteredSchema reg;
    std::vector<std::vector<ModuleRun>> runs;  // per module
  };
  ModuleStore(KvCache* cache, Options options) : cache_(cache), options_(options) {}
  absl::StatusOr<std::shared_ptr<const Entry>> Find(absl::string_view schema_id) const;
  absl::Status CheckPutBytes(const ModelSpec& spec, int64_t n_tokens) const;

  KvCache* cache_;
  const Options options_;
  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<const Entry>> schemas_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_MODULES_H_
