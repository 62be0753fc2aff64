// A small strict JSON (RFC 8259) parser for the files a model directory holds: the safetensors
// header, model.safetensors.index.json and config.json.
//
// Strict: no comments, no trailing commas, no NaN/Infinity, no leading zeros, no control
// characters inside strings, no duplicate object keys, nothing after the top-level value. Nesting
// is limited (kMaxJsonDepth) so hostile input cannot overflow the stack. Numbers keep both a
// double and, for integer literals that fit, an exact int64 (tensor byte offsets need all 64 bits
// of precision that a double does not have).
#ifndef ROPEKV_CLIENTS_LLAMA_JSON_H_
#define ROPEKV_CLIENTS_LLAMA_JSON_H_

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace ropekv {
namespace llama {

inline constexpr int kMaxJsonDepth = 64;

class JsonValue {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  JsonValue() = default;

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  // Accessors of the value; each is valid only for its type (callers check type() first, or use
  // the Get* helpers below, which return errors instead).
  bool bool_value() const { return bool_; }
  double number_value() const { return number_; }
  // True for an integer literal (no fraction, no exponent) that fits in int64.
  bool is_int64() const { return type_ == Type::kNumber && is_int64_; }
  int64_t int64_value() const { return int64_; }
  const std::string& string_value() const { return string_; }
  const std::vector<JsonValue>& array() const { return array_; }
  // Members in document order.
  const std::vector<std::pair<std::string, JsonValue>>& members() const { return members_; }

  // The member named key of an object, or nullptr (also for non-objects).
  const JsonValue* Find(absl::string_view key) const;

  // "null", "bool", "number", "string", "array", "object".
  static absl::string_view TypeName(Type t);

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  bool is_int64_ = false;
  double number_ = 0;
  int64_t int64_ = 0;
  std::string string_;
  std::vector<JsonValue> array_;
  std::vector<std::pair<std::string, JsonValue>> members_;
};

// Parses one JSON text. Malformed input -> INVALID_ARGUMENT naming the byte offset and what was
// expected there. Thread-safe (no shared state).
absl::StatusOr<JsonValue> ParseJson(absl::string_view text);

// Typed member access for readers of config files. Each returns INVALID_ARGUMENT naming `what`
// (e.g. "config.json") and the key when the member has the wrong type, NOT_FOUND when it is
// absent. GetInt64 accepts only integer literals; GetDouble accepts any number.
absl::StatusOr<int64_t> GetInt64(const JsonValue& object, absl::string_view key,
                                 absl::string_view what);
absl::StatusOr<double> GetDouble(const JsonValue& object, absl::string_view key,
                                 absl::string_view what);
absl::StatusOr<bool> GetBool(const JsonValue& object, absl::string_view key,
                             absl::string_view what);
absl::StatusOr<std::string> GetString(const JsonValue& object, absl::string_view key,
                                      absl::string_view what);

}  // namespace llama
}  // namespace ropekv

#endif  // ROPEKV_CLIENTS_LLAMA_JSON_H_
