#include "cache/prompt_schema.h"

#include <map>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace ropekv {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Args = std::map<std::string, std::vector<int32_t>>;
using Kind = PromptPiece::Kind;

// Positions (hand-worked):
//   system 0..2 | union city at 3: tokyo 3..6, miami 3..4 (spans 4) | plan: 30@7, days 8..10,
//   31@11, 32@12 | schema length 13.
constexpr char kTravel[] = R"(<?xml version="1.0"?>
<!-- a schema in PML with token ids -->
<schema name="travel">
  <module name="system">1 2 3</module>
  <union name="city">
    <module name="tokyo">10 11 12 13</module>
    <module name="miami">20 21</module>
  </union>
  <module name="plan">30 <parameter name="days" length="3"/> 31 32</module>
</schema>
)";

// Nesting: doc: 5@0 6@1, appendix 7 8 9 at 2..4, an unnamed union at 5 (a: 1@5; b: 2 3 at 5..6),
// 10@7, parameter who at 8..9 (PML's `len`); tail 11@10; schema length 11.
constexpr char kNested[] = R"(
<schema name="nest">
  <module name="doc">
    5, 6
    <module name="appendix"> 7 8 9 </module>
    <union>
      <module name="a"> 1 </module>
      <module name="b"> 2 3 </module>
    </union>
    10
    <parameter name='who' len="2"></parameter>
  </module>
  <module name="tail"> 11 </module>
</schema>)";

Schema MustParse(const char* text) {
  absl::StatusOr<Schema> s = ParseSchema(text);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *std::move(s) : Schema();
}

TEST(PromptSchemaTest, ParsesPositionsOfModulesUnionsAndParameters) {
  const Schema s = MustParse(kTravel);
  EXPECT_EQ(s.name, "travel");
  EXPECT_EQ(s.length, 13);
  ASSERT_EQ(s.modules.size(), 4u);
  const SchemaModule& system = s.modules[s.FindModule("system")];
  EXPECT_EQ(system.start, 0);
  EXPECT_EQ(system.length, 3);
  EXPECT_THAT(system.tokens, ElementsAre(1, 2, 3));
  EXPECT_THAT(system.positions, ElementsAre(0, 1, 2));
  const SchemaModule& tokyo = s.modules[s.FindModule("tokyo")];
  const SchemaModule& miami = s.modules[s.FindModule("miami")];
  EXPECT_EQ(tokyo.start, 3);
  EXPECT_EQ(miami.start, 3);
  EXPECT_THAT(miami.positions, ElementsAre(3, 4));
  ASSERT_EQ(s.unions.size(), 1u);
  EXPECT_EQ(s.unions[0].name, "city");
  EXPECT_EQ(s.unions[0].start, 3);
  EXPECT_EQ(s.unions[0].length, 4);
  EXPECT_EQ(tokyo.union_index, 0);
  const SchemaModule& plan = s.modules[s.FindModule("plan")];
  EXPECT_EQ(plan.start, 7);
  EXPECT_EQ(plan.length, 6);
  EXPECT_THAT(plan.tokens, ElementsAre(30, 31, 32));
  EXPECT_THAT(plan.positions, ElementsAre(7, 11, 12));
  ASSERT_EQ(s.parameters.size(), 1u);
  EXPECT_EQ(s.parameters[0].name, "days");
  EXPECT_EQ(s.parameters[0].start, 8);
  EXPECT_EQ(s.parameters[0].length, 3);
  EXPECT_EQ(s.parameters[0].module, s.FindModule("plan"));
  EXPECT_EQ(s.FindModule("nope"), -1);
  EXPECT_EQ(s.FindParameter("days"), 0);
}

TEST(PromptSchemaTest, ParsesNestedModules) {
  const Schema s = MustParse(kNested);
  EXPECT_EQ(s.length, 11);
  const SchemaModule& doc = s.modules[s.FindModule("doc")];
  EXPECT_EQ(doc.length, 10);
  EXPECT_THAT(doc.tokens, ElementsAre(5, 6, 10));
  EXPECT_THAT(doc.positions, ElementsAre(0, 1, 7));
  const SchemaModule& appendix = s.modules[s.FindModule("appendix")];
  EXPECT_EQ(appendix.parent, s.FindModule("doc"));
  EXPECT_THAT(appendix.positions, ElementsAre(2, 3, 4));
  EXPECT_EQ(s.modules[s.FindModule("a")].start, 5);
  EXPECT_THAT(s.modules[s.FindModule("b")].positions, ElementsAre(5, 6));
  EXPECT_EQ(s.modules[s.FindModule("b")].parent, s.FindModule("doc"));
  EXPECT_EQ(s.parameters[0].start, 8);
  EXPECT_EQ(s.parameters[0].length, 2);
  EXPECT_THAT(s.modules[s.FindModule("tail")].positions, ElementsAre(10));
}

TEST(PromptLayoutTest, SchemaLayoutKeepsSchemaPositionsWithGaps) {
  const Schema s = MustParse(kTravel);
  absl::StatusOr<PromptLayout> l = LayoutPrompt(
      s, {"system", "miami", "plan"}, Args{{"days", {90, 91}}}, {100, 101}, Layout::kSchema);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_THAT(l->tokens, ElementsAre(1, 2, 3, 20, 21, 30, 90, 91, 31, 32, 100, 101));
  EXPECT_THAT(l->position_ids, ElementsAre(0, 1, 2, 3, 4, 7, 8, 9, 11, 12, 13, 14));
  EXPECT_EQ(l->next_position, 15);
  ASSERT_EQ(l->pieces.size(), 6u);
  const PromptPiece& p0 = l->pieces[0];
  EXPECT_EQ(p0.kind, Kind::kCached);
  EXPECT_EQ(p0.module, "system");
  EXPECT_EQ(p0.token_begin, 0);
  EXPECT_EQ(p0.token_end, 3);
  EXPECT_FALSE(p0.must_encode());
  EXPECT_EQ(l->pieces[1].module, "miami");
  EXPECT_EQ(l->pieces[1].schema_position, 3);
  EXPECT_EQ(l->pieces[2].module, "plan");
  EXPECT_EQ(l->pieces[2].token_end, 1);
  const PromptPiece& arg = l->pieces[3];
  EXPECT_EQ(arg.kind, Kind::kArgument);
  EXPECT_TRUE(arg.must_encode());
  EXPECT_EQ(arg.module, "plan");
  EXPECT_EQ(arg.parameter, "days");
  EXPECT_EQ(arg.schema_position, 8);
  EXPECT_EQ(arg.position, 8);
  EXPECT_THAT(arg.tokens, ElementsAre(90, 91));
  EXPECT_EQ(l->pieces[4].token_begin, 1);
  EXPECT_EQ(l->pieces[4].token_end, 3);
  EXPECT_EQ(l->pieces[4].position, 11);
  EXPECT_EQ(l->pieces[5].kind, Kind::kUser);
  EXPECT_EQ(l->pieces[5].position, 13);
  EXPECT_EQ(l->pieces[5].schema_position, 13);
}

TEST(PromptLayoutTest, CompactLayoutPacksPiecesWithoutGaps) {
  const Schema s = MustParse(kTravel);
  absl::StatusOr<PromptLayout> l = LayoutPrompt(
      s, {"plan", "system", "miami"}, Args{{"days", {90, 91}}}, {100, 101}, Layout::kCompact);
  ASSERT_TRUE(l.ok()) << l.status();
  // Selection order does not matter: pieces follow the schema.
  EXPECT_THAT(l->tokens, ElementsAre(1, 2, 3, 20, 21, 30, 90, 91, 31, 32, 100, 101));
  EXPECT_THAT(l->position_ids, ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11));
  EXPECT_EQ(l->next_position, 12);
  ASSERT_EQ(l->pieces.size(), 6u);
  std::vector<int64_t> positions, schema_positions;
  for (const PromptPiece& p : l->pieces) {
    positions.push_back(p.position);
    schema_positions.push_back(p.schema_position);
  }
  EXPECT_THAT(positions, ElementsAre(0, 3, 5, 6, 8, 10));
  EXPECT_THAT(schema_positions, ElementsAre(0, 3, 7, 8, 11, 13));
}

TEST(PromptLayoutTest, NestedModulesUnionsAndBlankArguments) {
  const Schema s = MustParse(kNested);
  absl::StatusOr<PromptLayout> schema_layout =
      LayoutPrompt(s, {"doc", "b", "tail"}, Args{{"who", {42}}}, {}, Layout::kSchema);
  ASSERT_TRUE(schema_layout.ok()) << schema_layout.status();
  EXPECT_THAT(schema_layout->tokens, ElementsAre(5, 6, 2, 3, 10, 42, 11));
  EXPECT_THAT(schema_layout->position_ids, ElementsAre(0, 1, 5, 6, 7, 8, 10));
  EXPECT_EQ(schema_layout->next_position, 11);

  absl::StatusOr<PromptLayout> compact =
      LayoutPrompt(s, {"doc", "b", "tail"}, Args{{"who", {42}}}, {}, Layout::kCompact);
  ASSERT_TRUE(compact.ok()) << compact.status();
  EXPECT_THAT(compact->position_ids, ElementsAre(0, 1, 2, 3, 4, 5, 6));
  EXPECT_EQ(compact->next_position, 7);

  // All of doc with the appendix and member a; the parameter left blank.
  absl::StatusOr<PromptLayout> full =
      LayoutPrompt(s, {"doc", "appendix", "a"}, Args{{"who", {}}}, {77}, Layout::kSchema);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_THAT(full->tokens, ElementsAre(5, 6, 7, 8, 9, 1, 10, 77));
  EXPECT_THAT(full->position_ids, ElementsAre(0, 1, 2, 3, 4, 5, 7, 11));
  ASSERT_EQ(full->pieces.size(), 5u);  // doc[0,2) appendix a doc[2,3) user; no empty argument
  EXPECT_EQ(full->pieces[1].module, "appendix");
  EXPECT_EQ(full->pieces[3].module, "doc");
  EXPECT_EQ(full->pieces[3].token_begin, 2);
  EXPECT_EQ(full->next_position, 12);
}

TEST(PromptLayoutTest, NothingSelectedLeavesOnlyUserTokens) {
  const Schema s = MustParse(kTravel);
  absl::StatusOr<PromptLayout> l = LayoutPrompt(s, {}, {}, {7, 8}, Layout::kSchema);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_THAT(l->position_ids, ElementsAre(13, 14));
  l = LayoutPrompt(s, {}, {}, {7, 8}, Layout::kCompact);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_THAT(l->position_ids, ElementsAre(0, 1));
}

// ---------------------------------------------------------------------------------------------
// Schema errors: INVALID_ARGUMENT naming the place.

void ExpectSchemaError(const std::string& text, const std::string& needle) {
  absl::StatusOr<Schema> s = ParseSchema(text);
  ASSERT_FALSE(s.ok()) << "parsed: " << text;
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.status().message()), HasSubstr(needle)) << text;
}

TEST(PromptSchemaErrorTest, Syntax) {
  ExpectSchemaError("", "line 1, column 1: expected the <schema> element");
  ExpectSchemaError("hello", "line 1, column 1: expected the <schema> element");
  ExpectSchemaError("<schema name=\"s\"><module name=\"m\">1</module>",
                    "<schema> opened at line 1 is not closed");
  ExpectSchemaError("<schema>\n<module name=\"m\">1</modul>\n</schema>",
                    "line 2, column 19: </modul> does not close <module> opened at line 2");
  ExpectSchemaError("<schema><module name=m>1</module></schema>",
                    "expected a quoted attribute value, got 'm'");
  ExpectSchemaError("<schema name=\"a\" name=\"b\"></schema>", "attribute 'name' repeated");
  ExpectSchemaError("<schema><module name=\"m\">1</module></schema><schema/>",
                    "unexpected content after </schema>");
  ExpectSchemaError("<schema><!-- never closed </schema>", "unterminated comment");
  ExpectSchemaError("<schema><![CDATA[1]]></schema>", "not supported");
  ExpectSchemaError("<schema name=\"&bogus;\"></schema>", "unknown entity");
  std::string deep = "<schema>";
  for (int i = 0; i < 40; ++i) deep += "<module name=\"m" + std::to_string(i) + "\">";
  ExpectSchemaError(deep, "elements nested deeper than 32 levels");
}

TEST(PromptSchemaErrorTest, Structure) {
  ExpectSchemaError("<module name=\"m\">1</module>",
                    "the root element must be <schema>, got <module>");
  ExpectSchemaError("<schema name=\"s\"></schema>",
                    "schema 's' (line 1, column 1): the schema has no modules");
  ExpectSchemaError("<schema name=\"s\">\n  <foo/>\n</schema>",
                    "schema 's' (line 2, column 3): <foo> is not allowed in <schema>");
  ExpectSchemaError("<schema name=\"s\"> 12 <module name=\"m\">1</module></schema>",
                    "schema 's' (line 1, column 18): text directly in <schema>");
  ExpectSchemaError("<schema><module name=\"m\" size=\"3\">1</module></schema>",
                    "unknown attribute 'size' on <module> (expected name)");
  ExpectSchemaError("<schema><module>1</module></schema>",
                    "<module> needs a non-empty 'name' attribute");
  ExpectSchemaError("<schema><module name=\"\">1</module></schema>",
                    "<module> needs a non-empty 'name' attribute");
  ExpectSchemaError(
      "<schema name=\"s\">\n<module name=\"m\">1</module>\n<module name=\"m\">2</module>"
      "</schema>",
      "schema 's' > module 'm' (line 3, column 1): duplicate module name 'm' (first "
      "defined on line 2)");
  ExpectSchemaError(
      "<schema name=\"s\"><union name=\"u\"><module name=\"m\">1</module></union>"
      "<module name=\"m\">2</module></schema>",
      "duplicate module name 'm'");
  ExpectSchemaError("<schema name=\"s\"><module name=\"m\"/></schema>",
                    "schema 's' > module 'm' (line 1, column 18): empty module");
  ExpectSchemaError("<schema name=\"s\"><module name=\"m\"> </module></schema>", "empty module");
  ExpectSchemaError("<schema name=\"s\"><union name=\"u\"></union></schema>",
                    "schema 's' > union 'u' (line 1, column 18): empty union");
  ExpectSchemaError(
      "<schema name=\"s\"><union><parameter name=\"p\" length=\"2\"/></union></schema>",
      "schema 's' > union #0 (line 1, column 25): <parameter> is not allowed in "
      "<union> (only <module>)");
  ExpectSchemaError(
      "<schema name=\"s\"><union name=\"u\"> 4 <module name=\"m\">1</module></union>"
      "</schema>",
      "text directly in <union>");
  ExpectSchemaError("<schema><module name=\"m\"><schema/></module></schema>",
                    "<schema> is not allowed in <module>");
}

TEST(PromptSchemaErrorTest, TokensAndParameters) {
  ExpectSchemaError("<schema name=\"s\"><module name=\"m\">1 2 12a</module></schema>",
                    "schema 's' > module 'm' (line 1, column 35): expected token ids (integers "
                    "0..2147483647), got '12a'");
  ExpectSchemaError("<schema><module name=\"m\">-3</module></schema>", "got '-3'");
  ExpectSchemaError("<schema><module name=\"m\">2147483648</module></schema>", "got '2147483648'");
  ExpectSchemaError(
      "<schema name=\"s\"><module name=\"m\"><parameter name=\"p\" length=\"0\"/>"
      "</module></schema>",
      "schema 's' > module 'm' > parameter 'p' (line 1, column 35): length must be a "
      "positive integer, got '0'");
  ExpectSchemaError(
      "<schema><module name=\"m\"><parameter name=\"p\" length=\"-2\"/></module></schema>",
      "length must be a positive integer, got '-2'");
  ExpectSchemaError(
      "<schema><module name=\"m\"><parameter name=\"p\" length=\"x\"/></module></schema>",
      "length must be a positive integer, got 'x'");
  ExpectSchemaError("<schema><module name=\"m\"><parameter name=\"p\"/></module></schema>",
                    "<parameter> needs exactly one of 'length' and 'len'");
  ExpectSchemaError(
      "<schema><module name=\"m\"><parameter name=\"p\" len=\"1\" length=\"1\"/>"
      "</module></schema>",
      "<parameter> needs exactly one of 'length' and 'len'");
  ExpectSchemaError("<schema><module name=\"m\"><parameter length=\"1\"/></module></schema>",
                    "<parameter> needs a non-empty 'name' attribute");
  ExpectSchemaError(
      "<schema><module name=\"m\"><parameter name=\"p\" length=\"2\">5</parameter>"
      "</module></schema>",
      "text inside <parameter>");
  ExpectSchemaError(
      "<schema name=\"s\">\n<module name=\"a\"><parameter name=\"p\" length=\"2\"/></module>\n"
      "<module name=\"b\"><parameter name=\"p\" length=\"1\"/></module></schema>",
      "duplicate parameter name 'p' (first defined on line 2 in module 'a')");
  ExpectSchemaError(
      "<schema><module name=\"m\"><parameter name=\"p\" length=\"2147483647\"/>"
      "</module><module name=\"n\">1</module></schema>",
      "the schema spans more than 2147483647 positions");
}

// ---------------------------------------------------------------------------------------------
// Layout errors: INVALID_ARGUMENT naming the module / parameter / union.

void ExpectLayoutError(const Schema& s, std::vector<std::string> selected, const Args& args,
                       std::vector<int32_t> user, const std::string& needle) {
  absl::StatusOr<PromptLayout> l = LayoutPrompt(s, selected, args, user, Layout::kCompact);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(std::string(l.status().message()), needle);
}

TEST(PromptLayoutErrorTest, Selection) {
  const Schema s = MustParse(kTravel);
  ExpectLayoutError(s, {"system", "paris"}, {}, {},
                    "prompt layout: unknown module 'paris' in schema 'travel'");
  ExpectLayoutError(s, {"system", "system"}, {}, {},
                    "prompt layout: module 'system' selected twice");
  ExpectLayoutError(s, {"tokyo", "miami"}, {}, {},
                    "prompt layout: modules 'tokyo' and 'miami' are both members of union "
                    "'city'; select at most one");
  const Schema n = MustParse(kNested);
  ExpectLayoutError(n, {"doc", "a", "b"}, Args{{"who", {}}}, {},
                    "prompt layout: modules 'a' and 'b' are both members of union #0 (line 6); "
                    "select at most one");
  ExpectLayoutError(n, {"appendix"}, {}, {},
                    "prompt layout: module 'appendix' is nested in module 'doc', which is not "
                    "selected");
}

TEST(PromptLayoutErrorTest, Arguments) {
  const Schema s = MustParse(kTravel);
  ExpectLayoutError(s, {"plan"}, Args{{"days", {1}}, {"nights", {2}}}, {},
                    "prompt layout: unknown parameter 'nights' in schema 'travel'");
  ExpectLayoutError(s, {"system"}, Args{{"days", {1}}}, {},
                    "prompt layout: argument for parameter 'days' of module 'plan', which is not "
                    "selected");
  ExpectLayoutError(s, {"plan"}, Args{{"days", {1, 2, 3, 4}}}, {},
                    "prompt layout: argument for parameter 'days' of module 'plan' has 4 tokens, "
                    "longer than its length 3");
  ExpectLayoutError(s, {"plan"}, {}, {},
                    "prompt layout: parameter 'days' of selected module 'plan' has no argument "
                    "(pass an empty list to leave it blank)");
  ExpectLayoutError(s, {"plan"}, Args{{"days", {1, -2}}}, {},
                    "prompt layout: argument 'days' token 1 is -2; token ids are >= 0");
  ExpectLayoutError(s, {"system"}, {}, {5, -1},
                    "prompt layout: user token 1 is -1; token ids are >= 0");
  // An argument exactly as long as the parameter is fine.
  EXPECT_TRUE(LayoutPrompt(s, {"plan"}, Args{{"days", {1, 2, 3}}}, {}, Layout::kSchema).ok());
}

}  // namespace
}  // namespace ropekv
