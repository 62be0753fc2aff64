// Text material of the quality suite: real Python files (the machine's /usr/lib/python3.11 tree),
// picked deterministically by a seed, and the samples cut from them — context windows with an
// edit (insert a line, delete a line, rename an identifier everywhere), prompts made of modules
// (an import block, a class, a function), and runs of function definitions for parallel
// encoding. Pure text: no model, no cache. Bytes are tokens (code-byte-9m: token id = byte).
//
// Every sampler is a function of (corpus, seed, index): the same arguments give the same sample
// on every machine that has the same files, whatever the thread count.
#ifndef ROPEKV_BENCH_QUALITY_CORPUS_H_
#define ROPEKV_BENCH_QUALITY_CORPUS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ropekv {
namespace quality {

// Deterministic 64-bit generator (SplitMix64), the same on every platform.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  // A generator for (seed, stream, index): independent streams per purpose and sample.
  static Rng For(uint64_t seed, uint64_t stream, uint64_t index);
  uint64_t Next();
  // Uniform in [0, n) (n > 0).
  uint64_t Below(uint64_t n) { return Next() % n; }

 private:
  uint64_t state_;
};

struct SourceFile {
  std::string path;  // absolute path
  std::string text;  // its bytes (ASCII)
};

// The Python files under `root` (recursively, *.py), sorted by path, that are pure ASCII (bytes
// 1..127, the model's training data) and at least `min_bytes` long. NOT_FOUND when `root` does
// not exist or holds no such file.
absl::StatusOr<std::vector<SourceFile>> LoadPythonCorpus(const std::string& root,
                                                         int64_t min_bytes);

// One replacement of text: bytes [start, end) of the original become `text`. Insert: start ==
// end; delete: text empty.
struct TextEdit {
  int64_t start = 0;
  int64_t end = 0;
  std::string text;
};

enum class EditKind : uint8_t { kInsert = 0, kDelete = 1, kRename = 2 };
const char* EditKindName(EditKind kind);

// A context window of a file with an edit before its cursor (the end of the context). The
// target is the 64 (or fewer requested) bytes after the cursor, which are predicted after the
// edit; a rename also applies to the target (the identifier is renamed everywhere).
struct EditSample {
  EditKind kind = EditKind::kInsert;
  std::string file;
  int64_t offset = 0;           // of the context in the file
  std::string old_context;      // the document before the edit (its end is the cursor)
  std::vector<TextEdit> edits;  // in old_context coordinates, sorted, not overlapping
  std::string new_context;      // the document after the edit
  std::string new_target;       // the bytes after the cursor (renamed for kRename)
};

// A context window for the PIE experiment: file, offset and length.
struct Window {
  size_t file = 0;  // index into the corpus
  int64_t offset = 0;
  int64_t length = 0;  // context bytes; a target of `target` bytes follows in the file
};

// The window of sample `index`: a file (uniform over the corpus files long enough), a context
// starting at a line start of uniform length in [min_len, max_len], followed by `target` bytes of
// the file. NOT_FOUND when no file is long enough.
absl::StatusOr<Window> PickWindow(const std::vector<SourceFile>& corpus, uint64_t seed,
                                  uint64_t index, int64_t min_len, int64_t max_len, int64_t target);

// The edit of `kind` for a window, or nullopt when the window offers none (no line fits; for a
// rename: no identifier of 3+ characters, not a keyword, occurs twice or more in the context, once
// at least before the last `min_suffix` bytes, and once at least in the target, so that the
// prediction depends on the new name). The edit lies before the last `min_suffix` bytes of the
// context and after its first 32 bytes:
//   insert: a line of the same file from outside the window, re-indented like the line it goes
//           before; delete: one non-blank line (with its newline);
//   rename: every whole-word occurrence of an identifier x in the context and the target becomes
//           x + "_new".
std::optional<EditSample> MakeEdit(const std::vector<SourceFile>& corpus, const Window& window,
                                   EditKind kind, uint64_t seed, uint64_t index, int64_t min_suffix,
                                   int64_t target);

// A prompt of modules (Prompt Cache): module 1 is the file's first import block, module 2 a
// class of the file (its first lines, cut at a line end), then a function of the file: the
// prompt is imports + class + function. Each part ends with a newline.
struct ModuleSample {
  std::string file;
  std::vector<std::string> modules;  // cached, composed at their prompt positions
  std::string body;                  // encoded over the composed modules; its bytes are scored
};

// The module prompt of sample `index` (files tried in a seeded order), with each module at most
// `max_module` bytes and the body at most `max_body` bytes (cut at a line end, at least 48 bytes).
// NOT_FOUND when no file of the corpus has an import block, a class and a function.
absl::StatusOr<ModuleSample> MakeModuleSample(const std::vector<SourceFile>& corpus, uint64_t seed,
                                              uint64_t index, int64_t max_module, int64_t max_body);

// Parallel contexts (APE): a shared prefix (the lines before the first definition), k consecutive
// function definitions of one indentation, then the rest of the file.
struct ParallelSample {
  std::string file;
  std::string prefix;                 // shared, positions 0..
  std::vector<std::string> contexts;  // each a whole definition, encoded in parallel
  std::string rest;                   // what follows the k definitions; its bytes are scored
};

// The sample `index`: k consecutive definitions of 48..max_context bytes each, a prefix of up to
// `max_prefix` bytes (whole lines) before them and `rest` bytes after them. NOT_FOUND when no
// file has such a run.
absl::StatusOr<ParallelSample> MakeParallelSample(const std::vector<SourceFile>& corpus,
                                                  uint64_t seed, uint64_t index, int k,
                                                  int64_t max_prefix, int64_t max_context,
                                                  int64_t rest);

}  // namespace quality
}  // namespace ropekv

#endif  // ROPEKV_BENCH_QUALITY_CORPUS_H_
