#include "clients/llama/json.h"

#include <string>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace ropekv {
namespace llama {
namespace {

TEST(JsonTest, ParsesEveryKindOfValue) {
  absl::StatusOr<JsonValue> v = ParseJson(
      R"( {"a": [1, -2.5e3, 0, true, false, null], "s": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00",
          "o": {"n": 18446744073709551615, "i": 9007199254740993}, "e": {}, "l": []} )");
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_TRUE(v->is_object());
  ASSERT_EQ(v->members().size(), 5u);
  EXPECT_EQ(v->members()[0].first, "a");  // document order is kept
  const JsonValue* a = v->Find("a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->array().size(), 6u);
  EXPECT_TRUE(a->array()[0].is_int64());
  EXPECT_EQ(a->array()[0].int64_value(), 1);
  EXPECT_FALSE(a->array()[1].is_int64());
  EXPECT_EQ(a->array()[1].number_value(), -2500.0);
  EXPECT_EQ(a->array()[2].int64_value(), 0);
  EXPECT_TRUE(a->array()[3].bool_value());
  EXPECT_FALSE(a->array()[4].bool_value());
  EXPECT_TRUE(a->array()[5].is_null());
  EXPECT_EQ(v->Find("s")->string_value(),
            "x\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80");  // UTF-8 of U+00E9 and U+1F600
  const JsonValue* o = v->Find("o");
  // 2^64 - 1 does not fit int64: a number, but not an int64.
  EXPECT_TRUE(o->Find("n")->is_number());
  EXPECT_FALSE(o->Find("n")->is_int64());
  // 2^53 + 1 is exact as int64 (a double would round it).
  EXPECT_EQ(o->Find("i")->int64_value(), int64_t{9007199254740993});
  EXPECT_TRUE(v->Find("e")->is_object());
  EXPECT_TRUE(v->Find("l")->is_array());
  EXPECT_EQ(v->Find("missing"), nullptr);
}

TEST(JsonTest, RejectsWhatRfc8259Rejects) {
  for (const char* bad : {
           "",                   // nothing
           "{",                  // unterminated
           "[1,]",               // trailing comma
           "{\"a\":1,}",         // trailing comma
           "{\"a\" 1}",          // missing colon
           "{a: 1}",             // unquoted key
           "[01]",               // leading zero
           "[1.]",               // no fraction digits
           "[1e]",               // no exponent digits
           "[-]",                // lone minus
           "[+1]",               // plus sign
           "[NaN]",              // not JSON
           "[Infinity]",         // not JSON
           "[1e999]",            // out of double range
           "// c\n[1]",          // comment
           "[1] x",              // garbage after the value
           "\"a\tb\"",           // raw control character
           "\"\\x\"",            // unknown escape
           "\"\\u12\"",          // short \u
           "\"\\ud800\"",        // lone high surrogate
           "\"\\udc00\"",        // lone low surrogate
           "{\"a\":1,\"a\":2}",  // duplicate key
           "[tru]",              // bad literal
           "'a'",                // single quotes
       }) {
    absl::StatusOr<JsonValue> v = ParseJson(bad);
    EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument) << "input: " << bad;
  }
}

TEST(JsonTest, ErrorNamesTheOffset) {
  absl::StatusOr<JsonValue> v = ParseJson("[1, 2, x]");
  ASSERT_FALSE(v.ok());
  EXPECT_NE(std::string(v.status().message()).find("byte 7"), std::string::npos) << v.status();
}

TEST(JsonTest, LimitsNesting) {
  std::string deep(kMaxJsonDepth + 1, '[');
  deep += std::string(kMaxJsonDepth + 1, ']');
  EXPECT_EQ(ParseJson(deep).status().code(), absl::StatusCode::kInvalidArgument);
  std::string ok(kMaxJsonDepth - 1, '[');
  ok += std::string(kMaxJsonDepth - 1, ']');
  EXPECT_TRUE(ParseJson(ok).ok());
}

TEST(JsonTest, TypedGetters) {
  absl::StatusOr<JsonValue> v = ParseJson(R"({"i": 7, "d": 0.5, "b": true, "s": "x"})");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*GetInt64(*v, "i", "t"), 7);
  EXPECT_EQ(*GetDouble(*v, "i", "t"), 7.0);
  EXPECT_EQ(*GetDouble(*v, "d", "t"), 0.5);
  EXPECT_TRUE(*GetBool(*v, "b", "t"));
  EXPECT_EQ(*GetString(*v, "s", "t"), "x");
  EXPECT_EQ(GetInt64(*v, "d", "t").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GetString(*v, "i", "t").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GetInt64(*v, "zz", "t").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace llama
}  // namespace ropekv
