#include "clients/llama/json.h"

#include <charconv>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace ropekv {
namespace llama {

const JsonValue* JsonValue::Find(absl::string_view key) const {
  if (type_ != Type::kObject) return nullptr;
  for (const auto& [k, v] : members_) {
    if (k == key) return &v;
  }
  return nullptr;
}

absl::string_view JsonValue::TypeName(Type t) {
  switch (t) {
    case Type::kNull:
      return "null";
    case Type::kBool:
      return "bool";
    case Type::kNumber:
      return "number";
    case Type::kString:
      return "string";
    case Type::kArray:
      return "array";
    case Type::kObject:
      return "object";
  }
  return "?";
}

class JsonParser {
 public:
  explicit JsonParser(absl::string_view text) : text_(text) {}

  absl::StatusOr<JsonValue> ParseDocument() {
    JsonValue v;
    SkipSpace();
    if (absl::Status s = ParseValue(&v, 0); !s.ok()) return s;
    SkipSpace();
    if (pos_ != text_.size()) return Error("end of input after the top-level value");
    return v;
  }

 private:
  absl::Status Error(absl::string_view expected) const {
    std::string got = pos_ < text_.size() ? absl::StrCat("'", text_.substr(pos_, 1), "'")
                                          : std::string("end of input");
    return absl::InvalidArgumentError(
        absl::StrCat("JSON: expected ", expected, " at byte ", pos_, ", got ", got));
  }

  void SkipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      ++pos_;
    }
  }

  bool Consume(absl::string_view word) {
    if (text_.substr(pos_, word.size()) == word) {
      pos_ += word.size();
      return true;
    }
    return false;
  }

  absl::Status ParseValue(JsonValue* out, int depth) {
    if (depth >= kMaxJsonDepth) {
      return absl::InvalidArgumentError(
          absl::StrCat("JSON: nesting deeper than ", kMaxJsonDepth, " at byte ", pos_));
    }
    if (pos_ >= text_.size()) return Error("a value");
    const char c = text_[pos_];
    if (c == '{') return ParseObject(out, depth);
    if (c == '[') return ParseArray(out, depth);
    if (c == '"') {
      out->type_ = JsonValue::Type::kString;
      return ParseString(&out->string_);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out);
    if (Consume("true")) {
      out->type_ = JsonValue::Type::kBool;
      out->bool_ = true;
      return absl::OkStatus();
    }
    if (Consume("false")) {
      out->type_ = JsonValue::Type::kBool;
      out->bool_ = false;
      return absl::OkStatus();
    }
    if (Consume("null")) {
      out->type_ = JsonValue::Type::kNull;
      return absl::OkStatus();
    }
    return Error("a value");
  }

  absl::Status ParseObject(JsonValue* out, int depth) {
    out->type_ = JsonValue::Type::kObject;
    ++pos_;  // '{'
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == '}') {
      ++pos_;
      return absl::OkStatus();
    }
    while (true) {
      SkipSpace();
      if (pos_ >= text_.size() || text_[pos_] != '"') return Error("a string key");
      const size_t key_pos = pos_;
      std::string key;
      if (absl::Status s = ParseString(&key); !s.ok()) return s;
      if (out->Find(key) != nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("JSON: duplicate key \"", key, "\" at byte ", key_pos));
      }
      SkipSpace();
      if (pos_ >= text_.size() || text_[pos_] != ':') return Error("':'");
      ++pos_;
      SkipSpace();
      JsonValue v;
      if (absl::Status s = ParseValue(&v, depth + 1); !s.ok()) return s;
      out->members_.emplace_back(std::move(key), std::move(v));
      SkipSpace();
      if (pos_ < text_.size() && text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < text_.size() && text_[pos_] == '}') {
        ++pos_;
        return absl::OkStatus();
      }
      return Error("',' or '}'");
    }
  }

  absl::Status ParseArray(JsonValue* out, int depth) {
    out->type_ = JsonValue::Type::kArray;
    ++pos_;  // '['
    SkipSpace();
    if (pos_ < text_.size() && text_[pos_] == ']') {
      ++pos_;
      return absl::OkStatus();
    }
    while (true) {
      SkipSpace();
      JsonValue v;
      if (absl::Status s = ParseValue(&v, depth + 1); !s.ok()) return s;
      out->array_.push_back(std::move(v));
      SkipSpace();
      if (pos_ < text_.size() && text_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (pos_ < text_.size() && text_[pos_] == ']') {
        ++pos_;
        return absl::OkStatus();
      }
      return Error("',' or ']'");
    }
  }

  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }

  absl::Status ParseHex4(uint32_t* out) {
    if (pos_ + 4 > text_.size()) return Error("4 hex digits");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const int d = HexDigit(text_[pos_]);
      if (d < 0) return Error("a hex digit");
      v = v * 16 + static_cast<uint32_t>(d);
      ++pos_;
    }
    *out = v;
    return absl::OkStatus();
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
  }

  absl::Status ParseString(std::string* out) {
    ++pos_;  // opening quote
    out->clear();
    while (true) {
      if (pos_ >= text_.size()) return Error("'\"' closing the string");
      const unsigned char c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return absl::OkStatus();
      }
      if (c < 0x20) return Error("an escaped control character");
      if (c != '\\') {
        out->push_back(static_cast<char>(c));
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= text_.size()) return Error("an escape character");
      const char e = text_[pos_++];
      switch (e) {
        case '"':
          out->push_back('"');
          break;
        case '\\':
          out->push_back('\\');
          break;
        case '/':
          out->push_back('/');
          break;
        case 'b':
          out->push_back('\b');
          break;
        case 'f':
          out->push_back('\f');
          break;
        case 'n':
          out->push_back('\n');
          break;
        case 'r':
          out->push_back('\r');
          break;
        case 't':
          out->push_back('\t');
          break;
        case 'u': {
          uint32_t cp = 0;
          if (absl::Status s = ParseHex4(&cp); !s.ok()) return s;
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            // A high surrogate must be followed by an escaped low surrogate.
            if (!Consume("\\u")) return Error("a low surrogate escape");
            uint32_t lo = 0;
            if (absl::Status s = ParseHex4(&lo); !s.ok()) return s;
            if (lo < 0xDC00 || lo > 0xDFFF) return Error("a low surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return Error("a high surrogate before a low one");
          }
          AppendUtf8(cp, out);
          break;
        }
        default:
          --pos_;
          return Error("one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u");
      }
    }
  }

  absl::Status ParseNumber(JsonValue* out) {
    const size_t start = pos_;
    bool integral = true;
    if (text_[pos_] == '-') ++pos_;
    if (pos_ >= text_.size()) return Error("a digit");
    if (text_[pos_] == '0') {
      ++pos_;
    } else if (text_[pos_] >= '1' && text_[pos_] <= '9') {
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    } else {
      return Error("a digit");
    }
    if (pos_ < text_.size() && text_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9') {
        return Error("a digit after '.'");
      }
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9') {
        return Error("a digit in the exponent");
      }
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
    }
    const char* first = text_.data() + start;
    const char* last = text_.data() + pos_;
    out->type_ = JsonValue::Type::kNumber;
    // from_chars is locale-independent; the grammar was checked above.
    auto dr = std::from_chars(first, last, out->number_);
    if (dr.ec == std::errc::result_out_of_range) {
      pos_ = start;
      return Error("a number within double range");
    }
    if (integral) {
      auto ir = std::from_chars(first, last, out->int64_);
      out->is_int64_ = ir.ec == std::errc() && ir.ptr == last;
    }
    return absl::OkStatus();
  }

  absl::string_view text_;
  size_t pos_ = 0;
};

absl::StatusOr<JsonValue> ParseJson(absl::string_view text) {
  return JsonParser(text).ParseDocument();
}

namespace {

absl::StatusOr<const JsonValue*> Member(const JsonValue& object, absl::string_view key,
                                        absl::string_view what, JsonValue::Type type) {
  if (!object.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": expected an object, got ", JsonValue::TypeName(object.type())));
  }
  const JsonValue* v = object.Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(what, ": no \"", key, "\""));
  if (v->type() != type) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": \"", key, "\" must be a ",
                                                   JsonValue::TypeName(type), ", got ",
                                                   JsonValue::TypeName(v->type())));
  }
  return v;
}

}  // namespace

absl::StatusOr<int64_t> GetInt64(const JsonValue& object, absl::string_view key,
                                 absl::string_view what) {
  absl::StatusOr<const JsonValue*> v = Member(object, key, what, JsonValue::Type::kNumber);
  if (!v.ok()) return v.status();
  if (!(*v)->is_int64()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": \"", key, "\" must be an integer, got ", (*v)->number_value()));
  }
  return (*v)->int64_value();
}

absl::StatusOr<double> GetDouble(const JsonValue& object, absl::string_view key,
                                 absl::string_view what) {
  absl::StatusOr<const JsonValue*> v = Member(object, key, what, JsonValue::Type::kNumber);
  if (!v.ok()) return v.status();
  return (*v)->number_value();
}

absl::StatusOr<bool> GetBool(const JsonValue& object, absl::string_view key,
                             absl::string_view what) {
  absl::StatusOr<const JsonValue*> v = Member(object, key, what, JsonValue::Type::kBool);
  if (!v.ok()) return v.status();
  return (*v)->bool_value();
}

absl::StatusOr<std::string> GetString(const JsonValue& object, absl::string_view key,
                                      absl::string_view what) {
  absl::StatusOr<const JsonValue*> v = Member(object, key, what, JsonValue::Type::kString);
  if (!v.ok()) return v.status();
  return (*v)->string_value();
}

}  // namespace llama
}  // namespace ropekv
