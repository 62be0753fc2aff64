#include "bench/quality/corpus.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace ropekv {
namespace quality {
namespace {

// Streams of Rng::For, one per purpose.
enum Stream : uint64_t {
  kWindowStream = 1,
  kEditStream = 2,
  kModuleStream = 3,
  kParallelStream = 4,
};

// A line [start, end) of a text; end includes the newline (the last line may have none).
struct Line {
  int64_t start = 0;
  int64_t end = 0;
};

std::vector<Line> Lines(const std::string& text) {
  std::vector<Line> lines;
  int64_t s = 0;
  const int64_t n = static_cast<int64_t>(text.size());
  for (int64_t i = 0; i < n; ++i) {
    if (text[i] == '\n') {
      lines.push_back({s, i + 1});
      s = i + 1;
    }
  }
  if (s < n) lines.push_back({s, n});
  return lines;
}

bool Blank(const std::string& text, const Line& l) {
  for (int64_t i = l.start; i < l.end; ++i) {
    if (text[i] != ' ' && text[i] != '\t' && text[i] != '\n' && text[i] != '\r') return false;
  }
  return true;
}

int64_t Indent(const std::string& text, const Line& l) {
  int64_t i = l.start;
  while (i < l.end && (text[i] == ' ' || text[i] == '\t')) ++i;
  return i - l.start;
}

bool StartsWithAt(const std::string& text, int64_t at, absl::string_view prefix) {
  return static_cast<int64_t>(text.size()) - at >= static_cast<int64_t>(prefix.size()) &&
         text.compare(static_cast<size_t>(at), prefix.size(), prefix.data(), prefix.size()) == 0;
}

bool IdentChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

// Python's keywords and soft keywords, and the conventional receiver names: not renamed.
const std::set<std::string>& NotRenamed() {
  static const std::set<std::string>* s = new std::set<std::string>{
      "False",   "None",     "True",     "and",    "as",   "assert", "async",  "await",
      "break",   "class",    "continue", "def",    "del",  "elif",   "else",   "except",
      "finally", "for",      "from",     "global", "if",   "import", "in",     "is",
      "lambda",  "nonlocal", "not",      "or",     "pass", "raise",  "return", "try",
      "while",   "with",     "yield",    "match",  "case", "self",   "cls",    "print"};
  return *s;
}

// Maximal runs of identifier characters that start with a letter or '_' (so "0x1F" holds none).
struct Ident {
  int64_t start = 0;
  int64_t end = 0;
};

std::vector<Ident> Identifiers(const std::string& text) {
  std::vector<Ident> out;
  const int64_t n = static_cast<int64_t>(text.size());
  int64_t i = 0;
  while (i < n) {
    if (!IdentChar(text[i])) {
      ++i;
      continue;
    }
    int64_t j = i;
    while (j < n && IdentChar(text[j])) ++j;
    if (!(text[i] >= '0' && text[i] <= '9')) out.push_back({i, j});
    i = j;
  }
  return out;
}

std::string Apply(const std::string& text, const std::vector<TextEdit>& edits) {
  std::string out;
  int64_t at = 0;
  for (const TextEdit& e : edits) {
    out.append(text, static_cast<size_t>(at), static_cast<size_t>(e.start - at));
    out += e.text;
    at = e.end;
  }
  out.append(text, static_cast<size_t>(at), std::string::npos);
  return out;
}

// A block of lines starting at line `first` that ends before the next non-blank line indented at
// most `indent` (trailing blank lines included), as [start, end) bytes and its last line + 1.
std::pair<Line, size_t> Block(const std::string& text, const std::vector<Line>& lines, size_t first,
                              int64_t indent) {
  size_t j = first + 1;
  while (j < lines.size() && (Blank(text, lines[j]) || Indent(text, lines[j]) > indent)) ++j;
  return {Line{lines[first].start, lines[j - 1].end}, j};
}

// The longest run of whole lines of `block` from its start that is at most `max` bytes.
int64_t CutAtLine(const std::string& text, Line block, int64_t max) {
  int64_t end = block.start;
  for (int64_t i = block.start; i < block.end && i - block.start < max; ++i) {
    if (text[i] == '\n') end = i + 1;
  }
  return end;
}

}  // namespace

Rng Rng::For(uint64_t seed, uint64_t stream, uint64_t index) {
  Rng r(seed ^ (stream * 0xd1b54a32d192ed03ull));
  uint64_t s = r.Next() ^ (index * 0x9e3779b97f4a7c15ull);
  Rng out(s);
  out.Next();
  return out;
}

uint64_t Rng::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

const char* EditKindName(EditKind kind) {
  switch (kind) {
    case EditKind::kInsert:
      return "insert";
    case EditKind::kDelete:
      return "delete";
    case EditKind::kRename:
      return "rename";
  }
  return "?";
}

absl::StatusOr<std::vector<SourceFile>> LoadPythonCorpus(const std::string& root,
                                                         int64_t min_bytes) {
  std::error_code ec;
  if (!std::filesystem::is_directory(root, ec)) {
    return absl::NotFoundError(absl::StrCat("corpus root ", root, " is not a directory"));
  }
  std::vector<std::string> paths;
  for (auto it = std::filesystem::recursive_directory_iterator(
           root, std::filesystem::directory_options::skip_permission_denied, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_regular_file(ec) && it->path().extension() == ".py") {
      paths.push_back(it->path().string());
    }
  }
  std::sort(paths.begin(), paths.end());
  std::vector<SourceFile> files;
  for (const std::string& p : paths) {
    std::ifstream in(p, std::ios::binary);
    if (!in) continue;
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (static_cast<int64_t>(text.size()) < min_bytes) continue;
    const bool ascii = std::all_of(text.begin(), text.end(), [](char c) {
      const unsigned char u = static_cast<unsigned char>(c);
      return u >= 1 && u <= 127;
    });
    if (ascii) files.push_back({p, std::move(text)});
  }
  if (files.empty()) {
    return absl::NotFoundError(
        absl::StrCat("no ASCII .py file of at least ", min_bytes, " bytes under ", root));
  }
  return files;
}

absl::StatusOr<Window> PickWindow(const std::vector<SourceFile>& corpus, uint64_t seed,
                                  uint64_t index, int64_t min_len, int64_t max_len,
                                  int64_t target) {
  std::vector<size_t> eligible;
  for (size_t i = 0; i < corpus.size(); ++i) {
    if (static_cast<int64_t>(corpus[i].text.size()) >= max_len + target + 64) eligible.push_back(i);
  }
  if (eligible.empty()) {
    return absl::NotFoundError(
        absl::StrCat("no corpus file has ", max_len + target + 64, " bytes or more"));
  }
  Rng rng = Rng::For(seed, kWindowStream, index);
  Window w;
  w.file = eligible[rng.Below(eligible.size())];
  w.length =
      min_len + static_cast<int64_t>(rng.Below(static_cast<uint64_t>(max_len - min_len + 1)));
  const std::string& text = corpus[w.file].text;
  std::vector<int64_t> starts;
  for (const Line& l : Lines(text)) {
    if (l.start + w.length + target + 64 <= static_cast<int64_t>(text.size())) {
      starts.push_back(l.start);
    }
  }
  w.offset = starts.empty() ? 0 : starts[rng.Below(starts.size())];
  return w;
}

std::optional<EditSample> MakeEdit(const std::vector<SourceFile>& corpus, const Window& window,
                                   EditKind kind, uint64_t seed, uint64_t index, int64_t min_suffix,
                                   int64_t target) {
  const SourceFile& f = corpus[window.file];
  const int64_t L = window.length;
  EditSample s;
  s.kind = kind;
  s.file = f.path;
  s.offset = window.offset;
  s.old_context = f.text.substr(static_cast<size_t>(window.offset), static_cast<size_t>(L));
  // The target and 64 bytes more, so that a rename that lengthens it still fills `target`.
  const std::string after =
      f.text.substr(static_cast<size_t>(window.offset + L), static_cast<size_t>(target + 64));
  Rng rng = Rng::For(seed, kEditStream * 8 + static_cast<uint64_t>(kind), index);

  const std::vector<Line> lines = Lines(s.old_context);
  std::vector<Line> candidates;
  for (const Line& l : lines) {
    if (l.start >= 32 && l.end <= L - min_suffix && !Blank(s.old_context, l) &&
        l.end - l.start <= 121) {
      candidates.push_back(l);
    }
  }

  if (kind == EditKind::kDelete || kind == EditKind::kInsert) {
    if (candidates.empty()) return std::nullopt;
    const Line at = candidates[rng.Below(candidates.size())];
    if (kind == EditKind::kDelete) {
      s.edits.push_back({at.start, at.end, ""});
    } else {
      // A line of the same file from outside the window (context and target), re-indented.
      const std::vector<Line> file_lines = Lines(f.text);
      const int64_t w0 = window.offset, w1 = window.offset + L + target;
      std::string line;
      for (int attempt = 0; attempt < 200 && line.empty(); ++attempt) {
        const Line& l = file_lines[rng.Below(file_lines.size())];
        if (l.end > w0 && l.start < w1) continue;
        if (Blank(f.text, l)) continue;
        const int64_t ind = Indent(f.text, l);
        std::string body = f.text.substr(static_cast<size_t>(l.start + ind),
                                         static_cast<size_t>(l.end - l.start - ind));
        while (!body.empty() && (body.back() == '\n' || body.back() == '\r')) body.pop_back();
        if (body.empty() || body.size() > 100) continue;
        line = body;
      }
      if (line.empty()) return std::nullopt;
      const std::string indent = s.old_context.substr(
          static_cast<size_t>(at.start), static_cast<size_t>(Indent(s.old_context, at)));
      s.edits.push_back({at.start, at.start, absl::StrCat(indent, line, "\n")});
    }
    s.new_context = Apply(s.old_context, s.edits);
    s.new_target = after.substr(0, static_cast<size_t>(target));
    return s;
  }

  // Rename: identifiers over context + target (so that one straddling the cursor is seen whole).
  const std::string whole = s.old_context + after;
  const std::vector<Ident> idents = Identifiers(whole);
  std::map<std::string, std::vector<Ident>> by_name;
  for (const Ident& id : idents) {
    if (id.start >= L + target) break;
    by_name[whole.substr(static_cast<size_t>(id.start), static_cast<size_t>(id.end - id.start))]
        .push_back(id);
  }
  std::vector<std::string> names;
  for (const auto& [name, occ] : by_name) {
    if (name.size() < 3 || NotRenamed().count(name) > 0) continue;
    int in_context = 0, early = 0, in_target = 0;
    bool straddles = false;
    for (const Ident& id : occ) {
      if (id.start < L && id.end > L) straddles = true;
      if (id.end <= L) ++in_context;
      if (id.start >= 32 && id.end <= L - min_suffix) ++early;
      if (id.start >= L && id.end <= L + target) ++in_target;
    }
    if (!straddles && in_context >= 2 && early >= 1 && in_target >= 1) names.push_back(name);
  }
  if (names.empty()) return std::nullopt;
  const std::string& name = names[rng.Below(names.size())];
  const std::string renamed = name + "_new";
  std::vector<TextEdit> target_edits;
  for (const Ident& id : by_name[name]) {
    if (id.end <= L) {
      s.edits.push_back({id.start, id.end, renamed});
    } else {
      target_edits.push_back({id.start - L, id.end - L, renamed});
    }
  }
  s.new_context = Apply(s.old_context, s.edits);
  s.new_target = Apply(after, target_edits).substr(0, static_cast<size_t>(target));
  return s;
}

absl::StatusOr<ModuleSample> MakeModuleSample(const std::vector<SourceFile>& corpus, uint64_t seed,
                                              uint64_t index, int64_t max_module,
                                              int64_t max_body) {
  for (uint64_t attempt = 0; attempt < 400; ++attempt) {
    Rng rng = Rng::For(seed, kModuleStream, index * 1000 + attempt);
    const SourceFile& f = corpus[rng.Below(corpus.size())];
    const std::string& t = f.text;
    const std::vector<Line> lines = Lines(t);
    // The first import block: import/from lines and their continuations.
    size_t i = 0;
    while (i < lines.size() && !StartsWithAt(t, lines[i].start, "import ") &&
           !StartsWithAt(t, lines[i].start, "from ")) {
      ++i;
    }
    if (i == lines.size()) continue;
    size_t j = i + 1;
    while (j < lines.size() && !Blank(t, lines[j]) &&
           (StartsWithAt(t, lines[j].start, "import ") ||
            StartsWithAt(t, lines[j].start, "from ") || Indent(t, lines[j]) > 0 ||
            t[lines[j].start] == ')')) {
      ++j;
    }
    const Line imports{lines[i].start, lines[j - 1].end};
    const int64_t imports_end = CutAtLine(t, imports, max_module);
    if (imports_end - imports.start < 16) continue;
    // The first top-level class after it.
    size_t c = j;
    while (c < lines.size() && !StartsWithAt(t, lines[c].start, "class ")) ++c;
    if (c == lines.size()) continue;
    const auto [class_block, class_next] = Block(t, lines, c, 0);
    const int64_t class_end = CutAtLine(t, class_block, max_module);
    if (class_end - class_block.start < 48) continue;
    // A top-level function; else a method that lies after the class module.
    std::optional<Line> body;
    for (size_t k = 0; k < lines.size() && !body; ++k) {
      if (!StartsWithAt(t, lines[k].start, "def ")) continue;
      const Line b = Block(t, lines, k, 0).first;
      const int64_t end = CutAtLine(t, b, max_body);
      if (end - b.start >= 48) body = Line{b.start, end};
    }
    for (size_t k = class_next; k < lines.size() && !body; ++k) {
      const int64_t ind = Indent(t, lines[k]);
      if (ind == 0 || !StartsWithAt(t, lines[k].start + ind, "def ")) continue;
      const Line b = Block(t, lines, k, ind).first;
      const int64_t end = CutAtLine(t, b, max_body);
      if (end - b.start >= 48) body = Line{b.start, end};
    }
    if (!body) continue;
    ModuleSample s;
    s.file = f.path;
    s.modules.push_back(t.substr(static_cast<size_t>(imports.start),
                                 static_cast<size_t>(imports_end - imports.start)));
    s.modules.push_back(t.substr(static_cast<size_t>(class_block.start),
                                 static_cast<size_t>(class_end - class_block.start)));
    s.body =
        t.substr(static_cast<size_t>(body->start), static_cast<size_t>(body->end - body->start));
    return s;
  }
  return absl::NotFoundError(
      absl::StrCat("no file with an import block, a class and a function "
                   "found for module sample ",
                   index));
}

absl::StatusOr<ParallelSample> MakeParallelSample(const std::vector<SourceFile>& corpus,
                                                  uint64_t seed, uint64_t index, int k,
                                                  int64_t max_prefix, int64_t max_context,
                                                  int64_t rest) {
  if (k < 1) return absl::InvalidArgumentError(absl::StrCat("k must be >= 1, got ", k));
  for (uint64_t attempt = 0; attempt < 400; ++attempt) {
    Rng rng = Rng::For(seed, kParallelStream, index * 1000 + attempt);
    const SourceFile& f = corpus[rng.Below(corpus.size())];
    const std::string& t = f.text;
    const std::vector<Line> lines = Lines(t);
    // Every definition: [start, end) with trailing blank lines, its indentation, next line.
    struct Def {
      Line span;
      int64_t indent;
    };
    std::vector<Def> defs;
    for (size_t i = 0; i < lines.size(); ++i) {
      const int64_t ind = Indent(t, lines[i]);
      if (!StartsWithAt(t, lines[i].start + ind, "def ")) continue;
      defs.push_back({Block(t, lines, i, ind).first, ind});
    }
    // Runs of k consecutive definitions (each starts where the previous ends) of one
    // indentation, each 48..max_context bytes, with `rest` bytes after them.
    std::vector<size_t> runs;
    for (size_t i = 0; i + static_cast<size_t>(k) <= defs.size(); ++i) {
      bool ok = defs[i].span.start > 0;
      for (int j = 0; j < k && ok; ++j) {
        const Def& d = defs[i + j];
        const int64_t size = d.span.end - d.span.start;
        ok = size >= 48 && size <= max_context && d.indent == defs[i].indent &&
             (j == 0 || d.span.start == defs[i + j - 1].span.end);
      }
      if (ok && defs[i + k - 1].span.end + rest <= static_cast<int64_t>(t.size())) {
        runs.push_back(i);
      }
    }
    if (runs.empty()) continue;
    const size_t i = runs[rng.Below(runs.size())];
    const int64_t first = defs[i].span.start;
    int64_t p = first;
    for (const Line& l : lines) {
      if (l.start >= first - max_prefix && l.start < first) {
        p = l.start;
        break;
      }
    }
    if (first - p < 16) continue;
    ParallelSample s;
    s.file = f.path;
    s.prefix = t.substr(static_cast<size_t>(p), static_cast<size_t>(first - p));
    for (int j = 0; j < k; ++j) {
      const Line& sp = defs[i + j].span;
      s.contexts.push_back(
          t.substr(static_cast<size_t>(sp.start), static_cast<size_t>(sp.end - sp.start)));
    }
    s.rest = t.substr(static_cast<size_t>(defs[i + k - 1].span.end), static_cast<size_t>(rest));
    return s;
  }
  return absl::NotFoundError(absl::StrCat(
      "no file with ", k, " consecutive definitions found for parallel sample ", index));
}

}  // namespace quality
}  // namespace ropekv
