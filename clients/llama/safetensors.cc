#include "clients/llama/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "clients/llama/json.h"
#include "kernels/common/dtype.h"

namespace ropekv {
namespace llama {
namespace {

// The safetensors spec caps the header at 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

// Element size of a safetensors dtype name, or 0 for an unknown one.
size_t DTypeBytes(absl::string_view d) {
  if (d == "BOOL" || d == "U8" || d == "I8" || d == "F8_E5M2" || d == "F8_E4M3") return 1;
  if (d == "I16" || d == "U16" || d == "F16" || d == "BF16") return 2;
  if (d == "I32" || d == "U32" || d == "F32") return 4;
  if (d == "I64" || d == "U64" || d == "F64") return 8;
  return 0;
}

std::string Errno() { return std::strerror(errno); }

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path));
  return ss.str();
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("no file ", path));
    return absl::InternalError(absl::StrCat("cannot open ", path, ": ", Errno()));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string e = Errno();
    ::close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", e));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": truncated: a safetensors file has at least ",
                                            "8 bytes (the header length), got ", file_size));
  }
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  const std::string map_error = map == MAP_FAILED ? Errno() : "";
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", map_error));
  }
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = path;
  file->map_ = map;
  file->map_size_ = file_size;
  const uint8_t* bytes = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " exceeds the format's limit of ",
                                                   kMaxHeaderBytes, " bytes"));
  }
  if (header_len > file_size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": truncated: header length is ", header_len,
                                            " bytes, the file has ", file_size - 8,
                                            " after the length"));
  }
  const uint64_t data_size = file_size - 8 - header_len;
  const uint8_t* data = bytes + 8 + header_len;

  absl::StatusOr<JsonValue> header =
      ParseJson(absl::string_view(reinterpret_cast<const char*>(bytes + 8), header_len));
  if (!header.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": bad safetensors header: ", header.status().message()));
  }
  if (!header->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": safetensors header must be a JSON object, got ",
                     JsonValue::TypeName(header->type())));
  }

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, entry] : header->members()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ must be an object"));
      }
      for (const auto& [k, v] : entry.members()) {
        if (!v.is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": __metadata__ value of \"", k, "\" must be a string"));
        }
        file->metadata_[k] = v.string_value();
      }
      continue;
    }
    const std::string what = absl::StrCat(path, ": tensor ", name);
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": entry must be an object"));
    }
    TensorView t;
    t.name = name;
    absl::StatusOr<std::string> dtype = GetString(entry, "dtype", what);
    if (!dtype.ok()) return absl::InvalidArgumentError(dtype.status().message());
    t.dtype = *dtype;
    t.element_size = DTypeBytes(t.dtype);
    if (t.element_size == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": unknown dtype \"", t.dtype,
          "\" (expected one of BOOL U8 I8 F8_E5M2 F8_E4M3 I16 U16 F16 BF16 I32 U32 F32 I64 "
          "U64 F64)"));
    }
    const JsonValue* shape = entry.Find("shape");
    if (shape == nullptr || !shape->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": \"shape\" must be an array"));
    }
    unsigned __int128 numel = 1;
    for (const JsonValue& d : shape->array()) {
      if (!d.is_int64() || d.int64_value() < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": shape entries must be non-negative integers"));
      }
      t.shape.push_back(d.int64_value());
      numel *= static_cast<uint64_t>(d.int64_value());
      if (numel > (static_cast<unsigned __int128>(1) << 62)) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": shape ", ShapeString(t.shape), " is too large"));
      }
    }
    const JsonValue* offsets = entry.Find("data_offsets");
    if (offsets == nullptr || !offsets->is_array() || offsets->array().size() != 2 ||
        !offsets->array()[0].is_int64() || !offsets->array()[1].is_int64() ||
        offsets->array()[0].int64_value() < 0 ||
        offsets->array()[1].int64_value() < offsets->array()[0].int64_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": \"data_offsets\" must be [begin, end] with 0 <= begin <= end"));
    }
    const uint64_t begin = static_cast<uint64_t>(offsets->array()[0].int64_value());
    const uint64_t end = static_cast<uint64_t>(offsets->array()[1].int64_value());
    const unsigned __int128 want = numel * t.element_size;
    if (want != end - begin) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": shape ", ShapeString(t.shape), " of ", t.dtype, " needs ",
                       static_cast<uint64_t>(want), " bytes, data_offsets [", begin, ", ", end,
                       ") hold ", end - begin));
    }
    if (end > data_size) {
      return absl::DataLossError(absl::StrCat(what, ": truncated: its data ends at byte ", end,
                                              " of the data region, which has ", data_size,
                                              " bytes"));
    }
    t.data = data + begin;
    t.bytes = end - begin;
    if (t.bytes > 0) ranges.emplace_back(begin, end);
    file->tensors_.emplace(name, std::move(t));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor byte ranges overlap: [", ranges[i - 1].first, ", ", ranges[i - 1].second,
          ") and [", ranges[i].first, ", ", ranges[i].second, ")"));
    }
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

absl::StatusOr<TensorView> SafetensorsFile::Get(absl::string_view name) const {
  auto it = tensors_.find(std::string(name));
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", name, " is not in ", path_));
  }
  return it->second;
}

std::vector<std::string> SafetensorsFile::Names() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, t] : tensors_) names.push_back(name);
  return names;
}

absl::StatusOr<std::unique_ptr<SafetensorsModel>> SafetensorsModel::Open(const std::string& dir) {
  auto model = std::unique_ptr<SafetensorsModel>(new SafetensorsModel());
  const std::string index_path = absl::StrCat(dir, "/model.safetensors.index.json");
  absl::StatusOr<std::string> index_text = ReadFileToString(index_path);
  if (!index_text.ok()) {
    const std::string single = absl::StrCat(dir, "/model.safetensors");
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(single);
    if (absl::IsNotFound(f.status())) {
      return absl::NotFoundError(
          absl::StrCat(dir, " has neither model.safetensors.index.json ", "nor model.safetensors"));
    }
    if (!f.ok()) return f.status();
    for (const std::string& name : (*f)->Names()) model->where_[name] = f->get();
    model->files_.push_back(std::move(*f));
    return model;
  }
  absl::StatusOr<JsonValue> index = ParseJson(*index_text);
  if (!index.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": ", index.status().message()));
  }
  const JsonValue* map = index->Find("weight_map");
  if (map == nullptr || !map->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": \"weight_map\" must be an object"));
  }
  std::map<std::string, const SafetensorsFile*> by_shard;
  for (const auto& [name, shard] : map->members()) {
    if (!shard.is_string() || shard.string_value().empty() ||
        shard.string_value().find('/') != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": weight_map[\"", name, "\"] must be a file name in the same directory"));
    }
    const std::string& shard_name = shard.string_value();
    auto it = by_shard.find(shard_name);
    if (it == by_shard.end()) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> f =
          SafetensorsFile::Open(absl::StrCat(dir, "/", shard_name));
      if (!f.ok()) return f.status();
      it = by_shard.emplace(shard_name, f->get()).first;
      model->files_.push_back(std::move(*f));
    }
    if (!it->second->Has(name)) {
      return absl::NotFoundError(absl::StrCat("tensor ", name, " is not in shard ", shard_name,
                                              " although ", index_path, " says so"));
    }
    model->where_[name] = it->second;
  }
  return model;
}

absl::StatusOr<TensorView> SafetensorsModel::Get(absl::string_view name) const {
  auto it = where_.find(std::string(name));
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", name, " is not in the model"));
  }
  return it->second->Get(name);
}

bool SafetensorsModel::Has(absl::string_view name) const {
  return where_.count(std::string(name)) > 0;
}

std::vector<std::string> SafetensorsModel::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, f] : where_) names.push_back(name);
  return names;
}

absl::StatusOr<std::vector<float>> TensorToFloat(const TensorView& t,
                                                 absl::Span<const int64_t> expected_shape) {
  if (!expected_shape.empty() &&
      !std::equal(t.shape.begin(), t.shape.end(), expected_shape.begin(), expected_shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", t.name, " has shape ",
                                                   ShapeString(t.shape), ", expected ",
                                                   ShapeString(expected_shape)));
  }
  const int64_t n = t.numel();
  std::vector<float> out(static_cast<size_t>(n));
  if (t.dtype == "F32") {
    std::memcpy(out.data(), t.data, static_cast<size_t>(n) * 4);
  } else if (t.dtype == "BF16" || t.dtype == "F16") {
    const bool bf16 = t.dtype == "BF16";
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, t.data + 2 * i, 2);  // the data region need not be aligned
      out[i] = bf16 ? BFloat16ToFloat(h) : HalfToFloat(h);
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor ", t.name, " has dtype ", t.dtype, ", expected BF16, F16 or F32"));
  }
  return out;
}

absl::StatusOr<std::vector<float>> SafetensorsModel::ReadFloat(
    absl::string_view name, absl::Span<const int64_t> expected_shape) const {
  absl::StatusOr<TensorView> t = Get(name);
  if (!t.ok()) return t.status();
  return TensorToFloat(*t, expected_shape);
}

}  // namespace llama
}  // namespace ropekv
