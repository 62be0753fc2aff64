// The end-to-end quality suite (issue 9): does reusing KV through ropekv keep a trained model's
// answers right? Each experiment teacher-forces real Python bytes through the reference frontend
// (clients/llama, the code-byte-9m model) over a KV cache obtained in different ways and scores
// next-byte accuracy and bits per byte against a full re-encode:
//
//   PIE      an edit earlier in a 600-1000-byte context (insert a line, delete a line, rename an
//            identifier everywhere); the 64 bytes after the cursor are scored over the KV of the
//            edited context obtained by: a full re-encode; a ropekv session (SessionStore: Open
//            with the old KV, Edit, Fill the new tokens encoded over the kept prefix, Read with the
//            suffix keys re-rotated once); naive reuse (the same without re-rotation); the stale
//            cache (edit ignored). Budgeted repair: Edit's repair_tokens = r re-encodes the r
//            tokens after each edit (renames, r = 0, 8, 32, 128).
//   modules  Prompt Cache: modules (an import block, a class) encoded alone, Put as segments and
//            Composed at their prompt positions (re-rotated), then a function body over them; vs
//            a full encode of the same prompt.
//   APE      k function definitions encoded in parallel after a shared prefix, the rest of the
//            file scored with sequential encoding, plain parallel, and APE's merge over a (T, S)
//            grid (kernels/ape ApeAttentionCpu inside the forward pass).
//   top-k    the 64 bytes after a ~1000-byte context decoded with every layer's attention
//            restricted to the tokens kernels/topk selects (EXACT, BOUND, BOUND_THEN_EXACT at
//            several budgets, plus sink and local tokens); index recall and captured mass too.
//
// docs/quality.md describes the method and the results; bench/RESULTS.md records runs.
//
// Thread safety: a Suite runs one experiment at a time; inside, samples run on `threads`
// threads (each with its own caches; the model, the ropekv cache and the session store are
// shared, all thread-safe for this use). Results do not depend on the thread count.
#ifndef ROPEKV_BENCH_QUALITY_SUITE_H_
#define ROPEKV_BENCH_QUALITY_SUITE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/quality/corpus.h"
#include "bench/quality/forward.h"
#include "cache/kv_cache.h"
#include "cache/session.h"
#include "clients/llama/llama_model.h"
#include "kernels/common/dtype.h"
#include "kernels/topk/topk.h"

namespace ropekv {
namespace quality {

// Teacher-forced next-byte accuracy and bits per byte.
struct Score {
  int64_t count = 0;    // predictions
  int64_t correct = 0;  // argmax == the true byte
  double bits = 0;      // sum of -log2 p(true byte)

  // Adds prediction rows logits [n][vocab] against labels [n].
  void Add(const std::vector<float>& logits, int64_t vocab, const std::vector<int32_t>& labels);
  void Merge(const Score& o);
  double accuracy() const { return count > 0 ? static_cast<double>(correct) / count : 0.0; }
  double bits_per_byte() const { return count > 0 ? bits / count : 0.0; }
};

struct SuiteOptions {
  // The model directory (config.json + safetensors).
  std::string model_dir;
  // Where the Python files come from.
  std::string corpus_root = "/usr/lib/python3.11";
  // Picks files, windows and edits.
  uint64_t seed = 1;
  // Samples in flight at once (each single-threaded).
  int threads = 2;
  // Stop starting samples of an experiment after this many seconds (0: no limit); the samples
  // done are reported (always a prefix of the sample indices).
  double max_seconds = 0;
  // Element type of every KV cache (frontend and ropekv).
  DType dtype = DType::kF32;

  // PIE: context length range, bytes scored after the cursor, bytes kept between the edit and
  // the cursor at least.
  int64_t pie_min_context = 600;
  int64_t pie_max_context = 1000;
  int64_t pie_target = 64;
  int64_t pie_min_suffix = 128;
  // Repair budgets (EditOptions::repair_tokens) run on renames; 0 is PIE itself.
  std::vector<int64_t> repair = {0, 8, 32, 128};

  // Top-k: context length range, bytes scored, budgets, sink and local tokens.
  int64_t topk_min_context = 900;
  int64_t topk_max_context = 1000;
  int64_t topk_target = 64;
  std::vector<int64_t> topk_budgets = {32, 64, 128, 256};
  int64_t topk_sink = 4;
  int64_t topk_local = 16;

  // Modules: most bytes per module and of the body.
  int64_t module_max = 360;
  int64_t module_body_max = 256;

  // APE: contexts, prefix and context sizes, bytes scored after the contexts, the (T, S) grid.
  int ape_k = 3;
  int64_t ape_max_prefix = 192;
  int64_t ape_max_context = 256;
  int64_t ape_rest = 64;
  std::vector<float> ape_temperatures = {1.0f, 0.9f, 0.8f, 0.6f};
  std::vector<float> ape_scales = {1.0f, 0.9f, 0.8f};
};

// One way of obtaining the KV of an edited context, scored.
struct PieKindResult {
  EditKind kind = EditKind::kInsert;
  int64_t samples = 0;
  Score full, pie, naive, stale;
  // PIE with repair_tokens = repair[i] (renames only; empty for the others), and the tokens
  // each re-encoded in all (inserted + repaired).
  std::vector<Score> repaired;
  std::vector<int64_t> repaired_tokens;
};

struct PieResults {
  int64_t windows = 0;
  std::vector<PieKindResult> kinds;  // insert, delete, rename
  std::vector<int64_t> repair;       // the budgets of PieKindResult::repaired
  double seconds = 0;
};

struct TopkConfigResult {
  topk::Mode mode = topk::Mode::kExact;
  int64_t budget = 0;
  Score score;
  // Mean over (sample, layer, step, KV head) of: the fraction of the exact top-k tokens (sink
  // and local excluded) that the selection holds (1 for EXACT by construction), and the softmax
  // mass of the selection (SelectCpu's captured mass, averaged over the group's query heads).
  double recall = 0;
  double mass = 0;
  int64_t rows = 0;
};

struct TopkResults {
  int64_t samples = 0;
  Score full;
  std::vector<TopkConfigResult> configs;
  double seconds = 0;
};

struct ModuleResults {
  int64_t samples = 0;
  Score full;       // the whole prompt encoded at once
  Score composed;   // modules from ropekv Compose (re-rotated to their positions)
  Score naive;      // modules' KV concatenated as encoded (each at 0.., no re-rotation)
  Score body_only;  // the body with no modules before it
  double seconds = 0;
};

struct ApeConfigResult {
  float temperature = 1.0f;
  float scale = 1.0f;
  Score score;
};

struct ApeResults {
  int64_t samples = 0;
  Score sequential;  // prefix + contexts + rest encoded in order
  Score parallel;    // contexts at the same positions, full attention
  std::vector<ApeConfigResult> grid;
  double seconds = 0;
};

class Suite {
 public:
  // Loads the model and the corpus, registers the model with an in-process ropekv cache and
  // opens a session store. Errors of LlamaModel::Load, LoadPythonCorpus (NOT_FOUND), and
  // INVALID_ARGUMENT for bad options (threads < 1, inverted ranges, a non-positive budget).
  static absl::StatusOr<std::unique_ptr<Suite>> Create(const SuiteOptions& options);
  ~Suite();

  const SuiteOptions& options() const { return options_; }
  const llama::LlamaModel& model() const { return *model_; }
  size_t corpus_files() const { return corpus_.size(); }

  // The experiments, over samples 0..n-1 (fewer when options.max_seconds runs out).
  absl::StatusOr<PieResults> RunPie(int n);
  absl::StatusOr<TopkResults> RunTopk(int n);
  absl::StatusOr<ModuleResults> RunModules(int n);
  absl::StatusOr<ApeResults> RunApe(int n);

 private:
  explicit Suite(const SuiteOptions& options) : options_(options) {}

  SuiteOptions options_;
  std::unique_ptr<llama::LlamaModel> model_;
  std::unique_ptr<HookedForward> forward_;
  std::vector<SourceFile> corpus_;
  std::unique_ptr<KvCache> store_cache_;  // ropekv's cache: model registry, segments
  std::unique_ptr<SessionStore> sessions_;
  std::string model_name_ = "code-byte-9m";
};

// Tables (Markdown) and one JSON object of the results, for the command and RESULTS.md.
std::string FormatPie(const PieResults& r);
std::string FormatTopk(const TopkResults& r);
std::string FormatModules(const ModuleResults& r);
std::string FormatApe(const ApeResults& r);
std::string ToJson(const SuiteOptions& options, const PieResults* pie, const TopkResults* topk,
                   const ModuleResults* modules, const ApeResults* ape);

}  // namespace quality
}  // namespace ropekv

#endif  // ROPEKV_BENCH_QUALITY_SUITE_H_
