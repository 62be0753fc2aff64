#include "clients/llama/safetensors.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "tests/unit/clients/llama/test_util.h"

namespace ropekv {
namespace llama {
namespace {

using testing_util::MakeTempDir;
using testing_util::ModelDir;
using testing_util::WriteFile;

struct RawTensor {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string HeaderOf(const std::vector<RawTensor>& tensors, absl::string_view metadata_json) {
  std::vector<std::string> entries;
  if (!metadata_json.empty()) entries.push_back(absl::StrCat("\"__metadata__\":", metadata_json));
  size_t offset = 0;
  for (const RawTensor& t : tensors) {
    entries.push_back(absl::StrCat("\"", t.name, "\":{\"dtype\":\"", t.dtype, "\",\"shape\":[",
                                   absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", offset, ",",
                                   offset + t.bytes.size(), "]}"));
    offset += t.bytes.size();
  }
  return absl::StrCat("{", absl::StrJoin(entries, ","), "}");
}

// The bytes of a safetensors file: 8-byte LE header length, header, data.
std::string FileOf(absl::string_view header, absl::string_view data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return absl::StrCat(out, header, data);
}

std::string SafetensorsBytes(const std::vector<RawTensor>& tensors,
                             absl::string_view metadata_json = "") {
  std::string data;
  for (const RawTensor& t : tensors) data += t.bytes;
  return FileOf(HeaderOf(tensors, metadata_json), data);
}

template <typename T>
std::string BytesOf(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

// Decodes bf16 / fp16 bit patterns in closed form (independent of kernels/common/dtype.h).
double DecodeBf16(uint16_t b) {
  const int sign = b >> 15, exp = (b >> 7) & 0xff, man = b & 0x7f;
  const double mag = exp == 0 ? std::ldexp(man, -126 - 7) : std::ldexp(128 + man, exp - 127 - 7);
  return sign ? -mag : mag;
}
double DecodeF16(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  const double mag = exp == 0 ? std::ldexp(man, -24) : std::ldexp(1024 + man, exp - 15 - 10);
  return sign ? -mag : mag;
}

// Finite, non-NaN random 16-bit patterns of a format with `exp_mask`.
std::vector<uint16_t> RandomFinite16(std::mt19937& rng, size_t n, uint16_t exp_mask) {
  std::vector<uint16_t> v;
  while (v.size() < n) {
    const uint16_t b = static_cast<uint16_t>(rng());
    if ((b & exp_mask) != exp_mask) v.push_back(b);
  }
  return v;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override { dir_ = MakeTempDir("st"); }
  std::string Write(absl::string_view name, absl::string_view bytes) {
    const std::string path = absl::StrCat(dir_, "/", name);
    WriteFile(path, bytes);
    return path;
  }
  std::string dir_;
  std::mt19937 rng_{1234};
};

TEST_F(SafetensorsTest, ReadsBf16F16F32AndMetadata) {
  const std::vector<uint16_t> bf = RandomFinite16(rng_, 6, 0x7f80);
  const std::vector<uint16_t> hf = RandomFinite16(rng_, 5, 0x7c00);
  std::vector<float> f32(4);
  std::normal_distribution<float> normal;
  for (float& x : f32) x = normal(rng_);
  const std::vector<int64_t> i64 = {-3, 1ll << 40};
  const std::string path =
      Write("m.safetensors", SafetensorsBytes({{"w.bf16", "BF16", {2, 3}, BytesOf(bf)},
                                               {"w.f16", "F16", {5}, BytesOf(hf)},
                                               {"w.f32", "F32", {2, 1, 2}, BytesOf(f32)},
                                               {"idx", "I64", {2}, BytesOf(i64)},
                                               {"empty", "F32", {0, 3}, ""}},
                                              R"({"format":"pt","note":"x"})"));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Names(), (std::vector<std::string>{"empty", "idx", "w.bf16", "w.f16", "w.f32"}));
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->metadata().at("note"), "x");

  absl::StatusOr<TensorView> t = (*f)->Get("w.bf16");
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->dtype, "BF16");
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->numel(), 6);
  absl::StatusOr<std::vector<float>> v = TensorToFloat(*t, {2, 3});
  ASSERT_TRUE(v.ok()) << v.status();
  for (size_t i = 0; i < bf.size(); ++i) EXPECT_EQ((*v)[i], DecodeBf16(bf[i])) << i;

  v = TensorToFloat(*(*f)->Get("w.f16"), {5});
  ASSERT_TRUE(v.ok()) << v.status();
  for (size_t i = 0; i < hf.size(); ++i) EXPECT_EQ((*v)[i], DecodeF16(hf[i])) << i;

  v = TensorToFloat(*(*f)->Get("w.f32"), {2, 1, 2});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, f32);

  v = TensorToFloat(*(*f)->Get("empty"), {0, 3});
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_TRUE(v->empty());

  // An integer tensor is listed, but is not readable as float.
  absl::StatusOr<TensorView> idx = (*f)->Get("idx");
  ASSERT_TRUE(idx.ok());
  int64_t second;
  std::memcpy(&second, idx->data + 8, 8);
  EXPECT_EQ(second, 1ll << 40);
  v = TensorToFloat(*idx, {});
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(v.status().message()).find("I64"), std::string::npos) << v.status();
}

TEST_F(SafetensorsTest, MissingTensorAndWrongShape) {
  const std::vector<float> w(6, 1.0f);
  const std::string path =
      Write("m.safetensors", SafetensorsBytes({{"w", "F32", {2, 3}, BytesOf(w)}}));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  absl::StatusOr<TensorView> t = (*f)->Get("nope");
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(std::string(t.status().message()).find("nope"), std::string::npos);
  absl::StatusOr<std::vector<float>> v = TensorToFloat(*(*f)->Get("w"), {3, 2});
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(v.status().message(), "tensor w has shape [2, 3], expected [3, 2]");
}

TEST_F(SafetensorsTest, TruncatedFilesAreDataLoss) {
  const std::vector<float> w(6, 2.0f);
  const std::string good = SafetensorsBytes({{"w", "F32", {2, 3}, BytesOf(w)}});
  // Shorter than the length field.
  EXPECT_EQ(SafetensorsFile::Open(Write("a", good.substr(0, 5))).status().code(),
            absl::StatusCode::kDataLoss);
  // Header cut.
  EXPECT_EQ(SafetensorsFile::Open(Write("b", good.substr(0, 20))).status().code(),
            absl::StatusCode::kDataLoss);
  // Tensor data cut by one byte.
  absl::Status s = SafetensorsFile::Open(Write("c", good.substr(0, good.size() - 1))).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(s.message()).find("tensor w"), std::string::npos) << s;
  // The full file opens.
  EXPECT_TRUE(SafetensorsFile::Open(Write("d", good)).ok());
}

TEST_F(SafetensorsTest, BadHeadersAreInvalidArgument) {
  const std::string four(16, '\0');
  struct Case {
    const char* what;
    std::string header;
    std::string data;
  };
  const std::vector<Case> cases = {
      {"not json", "{\"w\":", four},
      {"not an object", "[1,2]", four},
      {"entry not an object", R"({"w":3})", four},
      {"unknown dtype", R"({"w":{"dtype":"Q7","shape":[4],"data_offsets":[0,16]}})", four},
      {"dtype not a string", R"({"w":{"dtype":5,"shape":[4],"data_offsets":[0,16]}})", four},
      {"negative dim", R"({"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}})", four},
      {"fractional dim", R"({"w":{"dtype":"F32","shape":[4.5],"data_offsets":[0,16]}})", four},
      {"size mismatch", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", four},
      {"wrong dtype size", R"({"w":{"dtype":"F16","shape":[4],"data_offsets":[0,16]}})", four},
      {"offsets reversed", R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", four},
      {"three offsets", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8,16]}})", four},
      {"overlap",
       R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},)"
       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
       four},
      {"metadata not strings", R"({"__metadata__":{"a":1}})", ""},
  };
  for (const Case& c : cases) {
    absl::Status s = SafetensorsFile::Open(Write("bad", FileOf(c.header, c.data))).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.what << ": " << s;
  }
  // A header length beyond the format's 100 MB limit.
  std::string huge(16, '\0');
  huge[4] = 1;  // 2^32
  EXPECT_EQ(SafetensorsFile::Open(Write("huge", huge)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsFile::Open(dir_ + "/absent").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, ShardedModelThroughTheIndex) {
  const std::vector<float> a = {1, 2, 3}, b = {4, 5};
  Write("s1.safetensors", SafetensorsBytes({{"a", "F32", {3}, BytesOf(a)}}));
  Write("s2.safetensors", SafetensorsBytes({{"b", "F32", {2}, BytesOf(b)}}));
  Write(
      "model.safetensors.index.json",
      R"({"metadata":{"total_size":20},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})");
  absl::StatusOr<std::unique_ptr<SafetensorsModel>> m = SafetensorsModel::Open(dir_);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->Names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(*(*m)->ReadFloat("a", {3}), a);
  EXPECT_EQ(*(*m)->ReadFloat("b", {2}), b);
  EXPECT_EQ((*m)->ReadFloat("c", {2}).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*m)->ReadFloat("b", {3}).status().code(), absl::StatusCode::kInvalidArgument);

  // The index names a tensor that its shard does not hold.
  Write("model.safetensors.index.json", R"({"weight_map":{"a":"s2.safetensors"}})");
  EXPECT_EQ(SafetensorsModel::Open(dir_).status().code(), absl::StatusCode::kNotFound);
  // The index names a shard that does not exist.
  Write("model.safetensors.index.json", R"({"weight_map":{"a":"s9.safetensors"}})");
  EXPECT_EQ(SafetensorsModel::Open(dir_).status().code(), absl::StatusCode::kNotFound);
  // A malformed index, and one reaching outside the directory.
  Write("model.safetensors.index.json", R"({"weight_map":["a"]})");
  EXPECT_EQ(SafetensorsModel::Open(dir_).status().code(), absl::StatusCode::kInvalidArgument);
  Write("model.safetensors.index.json", R"({"weight_map":{"a":"../s1.safetensors"}})");
  EXPECT_EQ(SafetensorsModel::Open(dir_).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(SafetensorsTest, SingleFileModelAndEmptyDir) {
  EXPECT_EQ(SafetensorsModel::Open(dir_).status().code(), absl::StatusCode::kNotFound);
  const std::vector<float> a = {7, 8};
  Write("model.safetensors", SafetensorsBytes({{"a", "F32", {2}, BytesOf(a)}}));
  absl::StatusOr<std::unique_ptr<SafetensorsModel>> m = SafetensorsModel::Open(dir_);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(*(*m)->ReadFloat("a", {2}), a);
}

TEST(SafetensorsRealModelTest, ShardsOfCodeByte9m) {
  absl::StatusOr<std::unique_ptr<SafetensorsModel>> m = SafetensorsModel::Open(ModelDir());
  ASSERT_TRUE(m.ok()) << m.status();
  // embed + 6 layers x 9 + final norm + lm_head.
  EXPECT_EQ((*m)->Names().size(), 57u);
  absl::StatusOr<TensorView> e = (*m)->Get("model.embed_tokens.weight");
  ASSERT_TRUE(e.ok());
  EXPECT_EQ(e->dtype, "BF16");
  EXPECT_EQ(e->shape, (std::vector<int64_t>{256, 384}));
  absl::StatusOr<TensorView> k = (*m)->Get("model.layers.5.self_attn.k_proj.weight");
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->shape, (std::vector<int64_t>{128, 384}));
  absl::StatusOr<std::vector<float>> norm = (*m)->ReadFloat("model.norm.weight", {384});
  ASSERT_TRUE(norm.ok());
  for (float x : *norm) EXPECT_TRUE(std::isfinite(x) && x != 0.0f);
}

}  // namespace
}  // namespace llama
}  // namespace ropekv
