// Prompt Cache schemas: reusable prompt modules, and the layout of a prompt built from them.
//
// A schema (docs/prompt-modules.md) is written in PML, Prompt Cache's XML-like markup, with token
// ids in place of text because the daemon works on token ids:
//   <schema name="travel">
//     <module name="system"> 128000 882 25 </module>
//     <union name="city">
//       <module name="tokyo"> 41 42 43 </module>
//       <module name="miami"> 51 52 </module>
//     </union>
//     <module name="plan"> 61 <parameter name="days" length="2"/> 62 </module>
//   </schema>
// It has modules (named token spans, cached once at their schema positions), unions (at most one
// member chosen per prompt; members share their start position; the union spans its longest
// member) and parameters (a named slot inside a module reserving `length` positions, filled with
// argument tokens at request time). Modules may nest inside modules (a nested module is optional
// content of its parent). ParseSchema fixes every element's start position, in document order.
//
// LayoutPrompt turns a selection of modules, arguments and user tokens into the prompt's pieces:
// cached module spans (reused KV), argument and user tokens (the frontend encodes them), with the
// position of every token, either at schema positions (Prompt Cache's own layout, gaps where
// modules were not chosen) or packed without gaps (the daemon re-rotates cached keys to close the
// gaps). Pure functions: no storage, no gRPC.
#ifndef ROPEKV_CACHE_PROMPT_SCHEMA_H_
#define ROPEKV_CACHE_PROMPT_SCHEMA_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace ropekv {

// One entry of a module's content, or of the schema's top level, in document order.
struct SchemaItem {
  enum class Kind : uint8_t {
    kTokens = 0,     // a run of the module's own tokens: [token_begin, token_end)
    kParameter = 1,  // Schema::parameters[index]
    kModule = 2,     // Schema::modules[index], nested (or at the top level)
    kUnion = 3,      // Schema::unions[index]
  };
  Kind kind = Kind::kTokens;
  int index = -1;
  int32_t token_begin = 0;
  int32_t token_end = 0;
  // Schema position of the item's first position, and how many positions it spans.
  int64_t start = 0;
  int64_t length = 0;
};

struct SchemaModule {
  std::string name;
  // Enclosing module (-1 at the top level) and the union it is a member of (-1 if none).
  int parent = -1;
  int union_index = -1;
  // Positions [start, start + length): own tokens, parameter slots and nested content.
  int64_t start = 0;
  int64_t length = 0;
  // The module's own tokens (what its cached KV holds), in order, and the schema position of
  // each; they skip the positions of parameters and nested modules.
  std::vector<int32_t> tokens;
  std::vector<int64_t> positions;
  std::vector<SchemaItem> items;
  int line = 0;  // where it was defined, for messages
};

struct SchemaUnion {
  std::string name;  // optional in the schema; "" then
  int parent = -1;   // enclosing module, -1 at the top level
  std::vector<int> members;
  // Members all start at `start`; length is the longest member's.
  int64_t start = 0;
  int64_t length = 0;
  int line = 0;
};

struct SchemaParameter {
  std::string name;    // unique in the schema
  int module = -1;     // the module holding the slot
  int64_t start = 0;   // schema position of the slot
  int64_t length = 0;  // positions reserved
  int line = 0;
};

struct Schema {
  std::string name;
  std::vector<SchemaModule> modules;  // document order (a parent before its children)
  std::vector<SchemaUnion> unions;
  std::vector<SchemaParameter> parameters;
  std::vector<SchemaItem> items;  // top level: kModule and kUnion
  int64_t length = 0;             // positions spanned by the whole schema

  // Index of the module / parameter of that name, or -1.
  int FindModule(absl::string_view module_name) const;
  int FindParameter(absl::string_view parameter_name) const;

  absl::flat_hash_map<std::string, int> module_index;
  absl::flat_hash_map<std::string, int> parameter_index;
};

// Most positions one schema may span, and deepest nesting of elements.
inline constexpr int64_t kMaxSchemaPositions = (int64_t{1} << 31) - 1;
inline constexpr int kMaxSchemaDepth = 32;

// Parses and validates a PML schema (grammar in docs/prompt-modules.md) and fixes every element's
// start position. INVALID_ARGUMENT naming the place (line, column, element path) for syntax
// errors, unknown elements or attributes, duplicate module or parameter names, empty modules or
// unions, non-positive parameter lengths, bad token ids, or more than kMaxSchemaPositions
// positions. Thread-safe.
absl::StatusOr<Schema> ParseSchema(absl::string_view text);

enum class Layout : uint8_t {
  // Prompt Cache's layout: every piece at its schema position; gaps where modules were not chosen
  // and where arguments are shorter than their parameter; user tokens after the whole schema.
  kSchema = 0,
  // Pieces packed in order from position 0 with no gaps; cached keys are re-rotated to their new
  // positions by the daemon.
  kCompact = 1,
};

struct PromptPiece {
  enum class Kind : uint8_t {
    kCached = 0,    // a run of a module's own tokens: reuse its cached KV
    kArgument = 1,  // argument tokens of a parameter: the frontend encodes them
    kUser = 2,      // the user tokens at the end: the frontend encodes them
  };
  Kind kind = Kind::kCached;
  // kCached: the module whose KV this is; kArgument: the module holding the parameter.
  std::string module;
  // kArgument: the parameter.
  std::string parameter;
  // kCached: range of the module's own tokens ([token_begin, token_end) of SchemaModule::tokens).
  int32_t token_begin = 0;
  int32_t token_end = 0;
  // Schema position of the piece's first token (kUser: where the user tokens would start in the
  // schema layout, Schema::length).
  int64_t schema_position = 0;
  // Position of the piece's first token in this prompt; its tokens are consecutive from there.
  int64_t position = 0;
  std::vector<int32_t> tokens;

  bool must_encode() const { return kind != Kind::kCached; }
};

struct PromptLayout {
  std::vector<PromptPiece> pieces;    // prompt order
  std::vector<int32_t> tokens;        // every token of the prompt, in order
  std::vector<int64_t> position_ids;  // the position of every token
  int64_t next_position = 0;          // position of the first generated token
};

// Lays out a prompt: the selected modules (names; a nested module needs its parent selected; at
// most one member per union), an argument for every parameter of the selected modules (name ->
// tokens, at most the parameter's length; an empty list leaves the slot blank), and the user's
// tokens, which come last. Pieces follow schema (document) order. INVALID_ARGUMENT naming the
// place for an unknown module, a module selected twice, two members of one union, a nested
// module without its parent, an unknown parameter, an argument for a module not selected, a
// missing argument, an argument longer than its parameter, or a negative token id. Thread-safe.
absl::StatusOr<PromptLayout> LayoutPrompt(
    const Schema& schema, absl::Span<const std::string> selected_modules,
    const std::map<std::string, std::vector<int32_t>>& arguments,
    absl::Span<const int32_t> user_tokens, Layout layout);

}  // namespace ropekv

#endif  // ROPEKV_CACHE_PROMPT_SCHEMA_H_
