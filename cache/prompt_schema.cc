#include "cache/prompt_schema.h"

#include <algorithm>
#include <cctype>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ropekv {
namespace {

// ---------------------------------------------------------------------------------------------
// A small strict XML subset: elements, attributes in single or double quotes (with the five
// predefined entities), text, comments, an optional <?xml ...?> prolog. No DTDs, CDATA or
// namespaces: a schema needs none, and rejecting them keeps the parser small and its errors clear.

struct XmlNode {
  std::string tag;  // "" for a text node
  std::vector<std::pair<std::string, std::string>> attrs;
  std::string text;  // text nodes
  int line = 0;
  int column = 0;
  std::vector<XmlNode> children;
};

class XmlParser {
 public:
  explicit XmlParser(absl::string_view text) : text_(text) {}

  absl::StatusOr<XmlNode> ParseDocument() {
    if (absl::Status st = SkipMisc(/*allow_prolog=*/true); !st.ok()) return st;
    if (AtEnd() || Peek() != '<') return Error("expected the <schema> element");
    absl::StatusOr<XmlNode> root = ParseElement(1);
    if (!root.ok()) return root.status();
    if (absl::Status st = SkipMisc(/*allow_prolog=*/false); !st.ok()) return st;
    if (!AtEnd()) return Error(absl::StrCat("unexpected content after </", root->tag, ">"));
    return root;
  }

 private:
  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek(size_t ahead = 0) const {
    return pos_ + ahead < text_.size() ? text_[pos_ + ahead] : '\0';
  }
  bool LookingAt(absl::string_view s) const { return text_.substr(pos_, s.size()) == s; }
  void Advance(size_t n = 1) {
    for (size_t i = 0; i < n && pos_ < text_.size(); ++i, ++pos_) {
      if (text_[pos_] == '\n') {
        ++line_;
        column_ = 1;
      } else {
        ++column_;
      }
    }
  }
  absl::Status Error(absl::string_view msg) const { return ErrorAt(line_, column_, msg); }
  static absl::Status ErrorAt(int line, int column, absl::string_view msg) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt schema: line ", line, ", column ", column, ": ", msg));
  }
  static bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }
  static bool IsNameStart(char c) {
    return std::isalpha(static_cast<unsigned char>(c)) || c == '_';
  }
  static bool IsNameChar(char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.' ||
           c == ':';
  }
  void SkipSpace() {
    while (!AtEnd() && IsSpace(Peek())) Advance();
  }

  // Whitespace, comments and (before the root) one <?xml ...?> prolog.
  absl::Status SkipMisc(bool allow_prolog) {
    for (;;) {
      SkipSpace();
      if (LookingAt("<!--")) {
        if (absl::Status st = SkipComment(); !st.ok()) return st;
      } else if (allow_prolog && LookingAt("<?xml")) {
        const size_t end = text_.find("?>", pos_);
        if (end == absl::string_view::npos) return Error("unterminated <?xml ...?> prolog");
        Advance(end + 2 - pos_);
        allow_prolog = false;
      } else {
        return absl::OkStatus();
      }
    }
  }

  absl::Status SkipComment() {
    const size_t end = text_.find("-->", pos_ + 4);
    if (end == absl::string_view::npos) return Error("unterminated comment (expected -->)");
    Advance(end + 3 - pos_);
    return absl::OkStatus();
  }

  absl::StatusOr<std::string> ParseName(absl::string_view what) {
    if (!IsNameStart(Peek())) {
      return Error(absl::StrCat("expected ", what, ", got ", Describe()));
    }
    const size_t begin = pos_;
    while (!AtEnd() && IsNameChar(Peek())) Advance();
    return std::string(text_.substr(begin, pos_ - begin));
  }

  std::string Describe() const {
    if (AtEnd()) return "the end of the text";
    return absl::StrCat("'", text_.substr(pos_, 1), "'");
  }

  absl::StatusOr<std::string> ParseAttrValue() {
    const char quote = Peek();
    if (quote != '"' && quote != '\'') {
      return Error(absl::StrCat("expected a quoted attribute value, got ", Describe()));
    }
    Advance();
    std::string value;
    while (!AtEnd() && Peek() != quote) {
      if (Peek() == '<') return Error("'<' in an attribute value");
      if (Peek() == '&') {
        static constexpr std::pair<absl::string_view, char> kEntities[] = {
            {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
        bool found = false;
        for (const auto& [entity, c] : kEntities) {
          if (LookingAt(entity)) {
            value.push_back(c);
            Advance(entity.size());
            found = true;
            break;
          }
        }
        if (!found) return Error("unknown entity (use &amp; &lt; &gt; &quot; &apos;)");
        continue;
      }
      value.push_back(Peek());
      Advance();
    }
    if (AtEnd()) return Error("unterminated attribute value");
    Advance();
    return value;
  }

  // At '<' of a start tag.
  absl::StatusOr<XmlNode> ParseElement(int depth) {
    if (depth > kMaxSchemaDepth) {
      return Error(absl::StrCat("elements nested deeper than ", kMaxSchemaDepth, " levels"));
    }
    XmlNode node;
    node.line = line_;
    node.column = column_;
    Advance();  // '<'
    absl::StatusOr<std::string> tag = ParseName("an element name");
    if (!tag.ok()) return tag.status();
    node.tag = *std::move(tag);
    for (;;) {
      const bool had_space = !AtEnd() && IsSpace(Peek());
      SkipSpace();
      if (LookingAt("/>")) {
        Advance(2);
        return node;
      }
      if (Peek() == '>') {
        Advance();
        break;
      }
      if (!had_space) {
        return Error(
            absl::StrCat("expected whitespace, '>' or '/>' in <", node.tag, ">, got ", Describe()));
      }
      absl::StatusOr<std::string> name =
          ParseName(absl::StrCat("an attribute of <", node.tag, ">"));
      if (!name.ok()) return name.status();
      for (const auto& [existing, unused] : node.attrs) {
        if (existing == *name) {
          return Error(absl::StrCat("attribute '", *name, "' repeated in <", node.tag, ">"));
        }
      }
      SkipSpace();
      if (Peek() != '=') return Error(absl::StrCat("expected '=' after attribute '", *name, "'"));
      Advance();
      SkipSpace();
      absl::StatusOr<std::string> value = ParseAttrValue();
      if (!value.ok()) return value.status();
      node.attrs.emplace_back(*std::move(name), *std::move(value));
    }
    // Content, up to the matching end tag.
    for (;;) {
      if (AtEnd()) {
        return Error(absl::StrCat("<", node.tag, "> opened at line ", node.line, " is not closed"));
      }
      if (LookingAt("<!--")) {
        if (absl::Status st = SkipComment(); !st.ok()) return st;
      } else if (LookingAt("</")) {
        const int end_line = line_;
        const int end_column = column_;
        Advance(2);
        absl::StatusOr<std::string> end = ParseName("an element name");
        if (!end.ok()) return end.status();
        if (*end != node.tag) {
          return ErrorAt(end_line, end_column,
                         absl::StrCat("</", *end, "> does not close <", node.tag,
                                      "> opened at line ", node.line));
        }
        SkipSpace();
        if (Peek() != '>') return Error(absl::StrCat("expected '>' after </", *end));
        Advance();
        return node;
      } else if (Peek() == '<') {
        if (LookingAt("<!") || LookingAt("<?")) {
          return Error("DTDs, CDATA and processing instructions are not supported");
        }
        absl::StatusOr<XmlNode> child = ParseElement(depth + 1);
        if (!child.ok()) return child.status();
        node.children.push_back(*std::move(child));
      } else {
        XmlNode text;
        text.line = line_;
        text.column = column_;
        const size_t begin = pos_;
        while (!AtEnd() && Peek() != '<') Advance();
        text.text = std::string(text_.substr(begin, pos_ - begin));
        node.children.push_back(std::move(text));
      }
    }
  }

  absl::string_view text_;
  size_t pos_ = 0;
  int line_ = 1;
  int column_ = 1;
};

// ---------------------------------------------------------------------------------------------
// XML tree -> Schema, fixing positions in document order.

class SchemaBuilder {
 public:
  absl::StatusOr<Schema> Build(const XmlNode& root) {
    if (root.tag != "schema") {
      return absl::InvalidArgumentError(absl::StrCat("prompt schema: line ", root.line,
                                                     ": the root element must be <schema>, got <",
                                                     root.tag, ">"));
    }
    if (absl::Status st = CheckAttrs(root, {}, {"name"}); !st.ok()) return st;
    schema_.name = Attr(root, "name");
    path_.push_back(schema_.name.empty() ? "schema" : absl::StrCat("schema '", schema_.name, "'"));
    int64_t cursor = 0;
    for (const XmlNode& child : root.children) {
      if (child.tag.empty()) {
        if (absl::Status st = CheckBlank(child, "directly in <schema>"); !st.ok()) return st;
        continue;
      }
      SchemaItem item;
      item.start = cursor;
      if (child.tag == "module") {
        absl::StatusOr<int> m = BuildModule(child, -1, -1, cursor);
        if (!m.ok()) return m.status();
        item.kind = SchemaItem::Kind::kModule;
        item.index = *m;
        item.length = schema_.modules[*m].length;
      } else if (child.tag == "union") {
        absl::StatusOr<int> u = BuildUnion(child, -1, cursor);
        if (!u.ok()) return u.status();
        item.kind = SchemaItem::Kind::kUnion;
        item.index = *u;
        item.length = schema_.unions[*u].length;
      } else {
        return Invalid(child, absl::StrCat("<", child.tag,
                                           "> is not allowed in <schema> (only <module> and "
                                           "<union>)"));
      }
      cursor += item.length;
      if (cursor > kMaxSchemaPositions) return TooLong(child);
      schema_.items.push_back(item);
    }
    if (schema_.items.empty()) return Invalid(root, "the schema has no modules");
    schema_.length = cursor;
    return std::move(schema_);
  }

 private:
  static std::string Attr(const XmlNode& n, absl::string_view name) {
    for (const auto& [k, v] : n.attrs) {
      if (k == name) return v;
    }
    return "";
  }
  static bool HasAttr(const XmlNode& n, absl::string_view name) {
    for (const auto& [k, v] : n.attrs) {
      if (k == name) return true;
    }
    return false;
  }

  std::string Where(const XmlNode& n) const {
    return absl::StrCat(absl::StrJoin(path_, " > "), " (line ", n.line, ", column ", n.column, ")");
  }
  absl::Status Invalid(const XmlNode& n, absl::string_view msg) const {
    return absl::InvalidArgumentError(absl::StrCat("prompt schema: ", Where(n), ": ", msg));
  }
  absl::Status TooLong(const XmlNode& n) const {
    return Invalid(n,
                   absl::StrCat("the schema spans more than ", kMaxSchemaPositions, " positions"));
  }

  // Attributes: every required one present (non-empty), nothing outside required + optional.
  absl::Status CheckAttrs(const XmlNode& n, std::vector<absl::string_view> required,
                          std::vector<absl::string_view> optional) {
    for (const auto& [k, v] : n.attrs) {
      const bool known = std::find(required.begin(), required.end(), k) != required.end() ||
                         std::find(optional.begin(), optional.end(), k) != optional.end();
      if (!known) {
        std::vector<absl::string_view> all = required;
        all.insert(all.end(), optional.begin(), optional.end());
        return absl::InvalidArgumentError(absl::StrCat(
            "prompt schema: line ", n.line, ", column ", n.column, ": unknown attribute '", k,
            "' on <", n.tag, "> (expected ", absl::StrJoin(all, ", "), ")"));
      }
    }
    for (absl::string_view r : required) {
      if (Attr(n, r).empty()) {
        return absl::InvalidArgumentError(absl::StrCat("prompt schema: line ", n.line, ", column ",
                                                       n.column, ": <", n.tag,
                                                       "> needs a non-empty '", r, "' attribute"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status CheckBlank(const XmlNode& text, absl::string_view where) const {
    for (char c : text.text) {
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
        return Invalid(text, absl::StrCat("text ", where, " (token ids belong inside a <module>)"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status ClaimModuleName(const XmlNode& n, const std::string& name, int index) {
    auto [it, inserted] = schema_.module_index.emplace(name, index);
    if (!inserted) {
      return Invalid(n, absl::StrCat("duplicate module name '", name, "' (first defined on line ",
                                     schema_.modules[it->second].line, ")"));
    }
    return absl::OkStatus();
  }

  // Builds the module at `start`; returns its index.
  absl::StatusOr<int> BuildModule(const XmlNode& n, int parent, int union_index, int64_t start) {
    if (absl::Status st = CheckAttrs(n, {"name"}, {}); !st.ok()) return st;
    const std::string name = Attr(n, "name");
    const int index = static_cast<int>(schema_.modules.size());
    path_.push_back(absl::StrCat("module '", name, "'"));
    {
      SchemaModule m;
      m.name = name;
      m.parent = parent;
      m.union_index = union_index;
      m.start = start;
      m.line = n.line;
      schema_.modules.push_back(std::move(m));
    }
    if (absl::Status st = ClaimModuleName(n, name, index); !st.ok()) return st;
    int64_t cursor = start;
    for (const XmlNode& child : n.children) {
      SchemaItem item;
      item.start = cursor;
      if (child.tag.empty()) {
        absl::StatusOr<std::vector<int32_t>> ids = ParseTokenIds(child);
        if (!ids.ok()) return ids.status();
        if (ids->empty()) continue;
        SchemaModule& m = schema_.modules[index];
        item.kind = SchemaItem::Kind::kTokens;
        item.token_begin = static_cast<int32_t>(m.tokens.size());
        for (int32_t id : *ids) {
          m.tokens.push_back(id);
          m.positions.push_back(cursor + static_cast<int64_t>(m.positions.size()) -
                                item.token_begin);
        }
        item.token_end = static_cast<int32_t>(m.tokens.size());
        item.length = item.token_end - item.token_begin;
      } else if (child.tag == "parameter") {
        absl::StatusOr<int> p = BuildParameter(child, index, cursor);
        if (!p.ok()) return p.status();
        item.kind = SchemaItem::Kind::kParameter;
        item.index = *p;
        item.length = schema_.parameters[*p].length;
      } else if (child.tag == "module") {
        absl::StatusOr<int> m = BuildModule(child, index, -1, cursor);
        if (!m.ok()) return m.status();
        item.kind = SchemaItem::Kind::kModule;
        item.index = *m;
        item.length = schema_.modules[*m].length;
      } else if (child.tag == "union") {
        absl::StatusOr<int> u = BuildUnion(child, index, cursor);
        if (!u.ok()) return u.status();
        item.kind = SchemaItem::Kind::kUnion;
        item.index = *u;
        item.length = schema_.unions[*u].length;
      } else {
        return Invalid(child, absl::StrCat("<", child.tag,
                                           "> is not allowed in <module> (only token ids, "
                                           "<parameter>, <module> and <union>)"));
      }
      cursor += item.length;
      if (cursor > kMaxSchemaPositions) return TooLong(child);
      schema_.modules[index].items.push_back(item);
    }
    if (schema_.modules[index].items.empty()) {
      return Invalid(n, "empty module (it needs token ids, a <parameter> or a nested <module>)");
    }
    schema_.modules[index].length = cursor - start;
    path_.pop_back();
    return index;
  }

  absl::StatusOr<int> BuildUnion(const XmlNode& n, int parent, int64_t start) {
    if (absl::Status st = CheckAttrs(n, {}, {"name"}); !st.ok()) return st;
    const int index = static_cast<int>(schema_.unions.size());
    {
      SchemaUnion u;
      u.name = Attr(n, "name");
      u.parent = parent;
      u.start = start;
      u.line = n.line;
      path_.push_back(u.name.empty() ? absl::StrCat("union #", index)
                                     : absl::StrCat("union '", u.name, "'"));
      schema_.unions.push_back(std::move(u));
    }
    int64_t longest = 0;
    for (const XmlNode& child : n.children) {
      if (child.tag.empty()) {
        if (absl::Status st = CheckBlank(child, "directly in <union>"); !st.ok()) return st;
        continue;
      }
      if (child.tag != "module") {
        return Invalid(child,
                       absl::StrCat("<", child.tag, "> is not allowed in <union> (only <module>)"));
      }
      absl::StatusOr<int> m = BuildModule(child, parent, index, start);
      if (!m.ok()) return m.status();
      schema_.unions[index].members.push_back(*m);
      longest = std::max(longest, schema_.modules[*m].length);
    }
    if (schema_.unions[index].members.empty()) {
      return Invalid(n, "empty union (it needs at least one <module>)");
    }
    schema_.unions[index].length = longest;
    path_.pop_back();
    return index;
  }

  absl::StatusOr<int> BuildParameter(const XmlNode& n, int module, int64_t start) {
    // Prompt Cache's PML spells the attribute `len`; both are accepted.
    if (absl::Status st = CheckAttrs(n, {"name"}, {"length", "len"}); !st.ok()) return st;
    const std::string name = Attr(n, "name");
    path_.push_back(absl::StrCat("parameter '", name, "'"));
    for (const XmlNode& child : n.children) {
      if (!child.tag.empty()) return Invalid(n, "<parameter> must be empty (<parameter .../>)");
      if (absl::Status st = CheckBlank(child, "inside <parameter>"); !st.ok()) return st;
    }
    if (HasAttr(n, "length") == HasAttr(n, "len")) {
      return Invalid(n, "<parameter> needs exactly one of 'length' and 'len'");
    }
    const std::string len = HasAttr(n, "length") ? Attr(n, "length") : Attr(n, "len");
    int64_t length = 0;
    bool ok = !len.empty() && len.size() <= 10;
    for (char c : len) ok = ok && c >= '0' && c <= '9';
    if (ok) {
      for (char c : len) length = length * 10 + (c - '0');
    }
    if (!ok || length <= 0 || length > kMaxSchemaPositions) {
      return Invalid(n, absl::StrCat("length must be a positive integer, got '", len, "'"));
    }
    const int index = static_cast<int>(schema_.parameters.size());
    auto [it, inserted] = schema_.parameter_index.emplace(name, index);
    if (!inserted) {
      const SchemaParameter& first = schema_.parameters[it->second];
      return Invalid(
          n, absl::StrCat("duplicate parameter name '", name, "' (first defined on line ",
                          first.line, " in module '", schema_.modules[first.module].name, "')"));
    }
    SchemaParameter p;
    p.name = name;
    p.module = module;
    p.start = start;
    p.length = length;
    p.line = n.line;
    schema_.parameters.push_back(std::move(p));
    path_.pop_back();
    return index;
  }

  absl::StatusOr<std::vector<int32_t>> ParseTokenIds(const XmlNode& text) {
    std::vector<int32_t> ids;
    const std::string& s = text.text;
    size_t i = 0;
    while (i < s.size()) {
      if (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r' || s[i] == ',') {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < s.size() &&
             !(s[j] == ' ' || s[j] == '\t' || s[j] == '\n' || s[j] == '\r' || s[j] == ',')) {
        ++j;
      }
      const std::string word = s.substr(i, j - i);
      int64_t v = 0;
      bool ok = word.size() <= 10;
      for (char c : word) ok = ok && c >= '0' && c <= '9';
      if (ok) {
        for (char c : word) v = v * 10 + (c - '0');
      }
      if (!ok || v > 0x7fffffff) {
        return Invalid(text, absl::StrCat("expected token ids (integers 0..2147483647), got '",
                                          word.substr(0, 40), "'"));
      }
      ids.push_back(static_cast<int32_t>(v));
      i = j;
    }
    return ids;
  }

  Schema schema_;
  std::vector<std::string> path_;
};

// ---------------------------------------------------------------------------------------------
// Layout.

class PromptLayouter {
 public:
  PromptLayouter(const Schema& schema, const std::vector<bool>& selected,
                 const std::map<std::string, std::vector<int32_t>>& arguments, Layout layout)
      : schema_(schema), selected_(selected), arguments_(arguments), layout_(layout) {}

  void Items(const std::vector<SchemaItem>& items) {
    for (const SchemaItem& item : items) {
      if (item.kind == SchemaItem::Kind::kModule) {
        if (selected_[item.index]) Module(item.index);
      } else if (item.kind == SchemaItem::Kind::kUnion) {
        for (int m : schema_.unions[item.index].members) {
          if (selected_[m]) Module(m);
        }
      }
    }
  }

  void Module(int index) {
    const SchemaModule& m = schema_.modules[index];
    for (const SchemaItem& item : m.items) {
      switch (item.kind) {
        case SchemaItem::Kind::kTokens: {
          PromptPiece p;
          p.kind = PromptPiece::Kind::kCached;
          p.module = m.name;
          p.token_begin = item.token_begin;
          p.token_end = item.token_end;
          p.tokens.assign(m.tokens.begin() + item.token_begin, m.tokens.begin() + item.token_end);
          Emit(std::move(p), item.start);
          break;
        }
        case SchemaItem::Kind::kParameter: {
          const SchemaParameter& param = schema_.parameters[item.index];
          const std::vector<int32_t>& arg = arguments_.at(param.name);  // checked before
          if (arg.empty()) break;
          PromptPiece p;
          p.kind = PromptPiece::Kind::kArgument;
          p.module = m.name;
          p.parameter = param.name;
          p.tokens = arg;
          Emit(std::move(p), item.start);
          break;
        }
        case SchemaItem::Kind::kModule:
        case SchemaItem::Kind::kUnion:
          Items({item});
          break;
      }
    }
  }

  void User(absl::Span<const int32_t> tokens) {
    if (tokens.empty()) return;
    PromptPiece p;
    p.kind = PromptPiece::Kind::kUser;
    p.tokens.assign(tokens.begin(), tokens.end());
    Emit(std::move(p), schema_.length);
  }

  PromptLayout Finish() {
    out_.next_position = layout_ == Layout::kCompact ? cursor_ : schema_.length;
    if (!out_.pieces.empty() && out_.pieces.back().kind == PromptPiece::Kind::kUser) {
      const PromptPiece& u = out_.pieces.back();
      out_.next_position = u.position + static_cast<int64_t>(u.tokens.size());
    }
    return std::move(out_);
  }

 private:
  void Emit(PromptPiece p, int64_t schema_position) {
    p.schema_position = schema_position;
    p.position = layout_ == Layout::kCompact ? cursor_ : schema_position;
    for (size_t i = 0; i < p.tokens.size(); ++i) {
      out_.tokens.push_back(p.tokens[i]);
      out_.position_ids.push_back(p.position + static_cast<int64_t>(i));
    }
    cursor_ = p.position + static_cast<int64_t>(p.tokens.size());
    out_.pieces.push_back(std::move(p));
  }

  const Schema& schema_;
  const std::vector<bool>& selected_;
  const std::map<std::string, std::vector<int32_t>>& arguments_;
  const Layout layout_;
  int64_t cursor_ = 0;
  PromptLayout out_;
};

std::string SchemaLabel(const Schema& s) {
  return s.name.empty() ? std::string("the schema") : absl::StrCat("schema '", s.name, "'");
}

std::string UnionLabel(const Schema& s, int u) {
  return s.unions[u].name.empty() ? absl::StrCat("union #", u, " (line ", s.unions[u].line, ")")
                                  : absl::StrCat("union '", s.unions[u].name, "'");
}

absl::Status CheckTokenIds(absl::Span<const int32_t> ids, absl::string_view what) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("prompt layout: ", what, " token ", i, " is ",
                                                     ids[i], "; token ids are >= 0"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

int Schema::FindModule(absl::string_view module_name) const {
  auto it = module_index.find(module_name);
  return it == module_index.end() ? -1 : it->second;
}

int Schema::FindParameter(absl::string_view parameter_name) const {
  auto it = parameter_index.find(parameter_name);
  return it == parameter_index.end() ? -1 : it->second;
}

absl::StatusOr<Schema> ParseSchema(absl::string_view text) {
  XmlParser parser(text);
  absl::StatusOr<XmlNode> root = parser.ParseDocument();
  if (!root.ok()) return root.status();
  SchemaBuilder builder;
  return builder.Build(*root);
}

absl::StatusOr<PromptLayout> LayoutPrompt(
    const Schema& schema, absl::Span<const std::string> selected_modules,
    const std::map<std::string, std::vector<int32_t>>& arguments,
    absl::Span<const int32_t> user_tokens, Layout layout) {
  if (layout != Layout::kSchema && layout != Layout::kCompact) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt layout: layout must be kSchema or kCompact, got ", static_cast<int>(layout)));
  }
  std::vector<bool> selected(schema.modules.size(), false);
  for (const std::string& name : selected_modules) {
    const int m = schema.FindModule(name);
    if (m < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt layout: unknown module '", name, "' in ", SchemaLabel(schema)));
    }
    if (selected[m]) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt layout: module '", name, "' selected twice"));
    }
    selected[m] = true;
  }
  for (size_t m = 0; m < schema.modules.size(); ++m) {
    if (!selected[m]) continue;
    const SchemaModule& mod = schema.modules[m];
    if (mod.parent >= 0 && !selected[mod.parent]) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt layout: module '", mod.name, "' is nested in module '",
                       schema.modules[mod.parent].name, "', which is not selected"));
    }
  }
  for (size_t u = 0; u < schema.unions.size(); ++u) {
    int first = -1;
    for (int m : schema.unions[u].members) {
      if (!selected[m]) continue;
      if (first >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("prompt layout: modules '", schema.modules[first].name, "' and '",
                         schema.modules[m].name, "' are both members of ",
                         UnionLabel(schema, static_cast<int>(u)), "; select at most one"));
      }
      first = m;
    }
  }
  for (const auto& [name, tokens] : arguments) {
    const int p = schema.FindParameter(name);
    if (p < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt layout: unknown parameter '", name, "' in ", SchemaLabel(schema)));
    }
    const SchemaParameter& param = schema.parameters[p];
    const std::string& module = schema.modules[param.module].name;
    if (!selected[param.module]) {
      return absl::InvalidArgumentError(absl::StrCat("prompt layout: argument for parameter '",
                                                     name, "' of module '", module,
                                                     "', which is not selected"));
    }
    if (static_cast<int64_t>(tokens.size()) > param.length) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt layout: argument for parameter '", name, "' of module '", module,
                       "' has ", tokens.size(), " tokens, longer than its length ", param.length));
    }
    if (absl::Status st = CheckTokenIds(tokens, absl::StrCat("argument '", name, "'")); !st.ok()) {
      return st;
    }
  }
  for (const SchemaParameter& param : schema.parameters) {
    if (selected[param.module] && arguments.find(param.name) == arguments.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt layout: parameter '", param.name, "' of selected module '",
                       schema.modules[param.module].name,
                       "' has no argument (pass an empty list to leave it blank)"));
    }
  }
  if (absl::Status st = CheckTokenIds(user_tokens, "user"); !st.ok()) return st;

  PromptLayouter layouter(schema, selected, arguments, layout);
  layouter.Items(schema.items);
  layouter.User(user_tokens);
  return layouter.Finish();
}

}  // namespace ropekv
