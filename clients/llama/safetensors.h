// Reader of Hugging Face safetensors files: single files and sharded models
// (model.safetensors.index.json + shards).
//
// Format: an 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//  "__metadata__": {"k": "v"}}, then the data region; offsets are relative to its start.
// Files are memory-mapped read-only; tensor views point into the mapping and live as long as the
// SafetensorsFile (or SafetensorsModel) that returned them. The header is validated at Open
// (strict JSON, known dtypes, shape x dtype size == byte range, ranges inside the file and not
// overlapping), so later reads cannot run past the mapping.
#ifndef ROPEKV_CLIENTS_LLAMA_SAFETENSORS_H_
#define ROPEKV_CLIENTS_LLAMA_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace ropekv {
namespace llama {

// One tensor of a file: its safetensors dtype name ("BF16", "F32", "I64", ...), element size,
// shape and the bytes (unaligned; read with memcpy).
struct TensorView {
  std::string name;
  std::string dtype;
  size_t element_size = 0;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t bytes = 0;

  int64_t numel() const;
};

// "[256, 384]".
std::string ShapeString(absl::Span<const int64_t> shape);

// One memory-mapped .safetensors file. Immutable after Open; thread-safe.
class SafetensorsFile {
 public:
  // Maps and validates `path`. Errors: NOT_FOUND (no such file), DATA_LOSS (shorter than its
  // header says: truncated header or tensor data), INVALID_ARGUMENT (malformed header: bad JSON,
  // unknown dtype, a byte range that does not match shape x dtype size, overlapping ranges),
  // INTERNAL (mmap failed).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // The tensor called name, or NOT_FOUND naming it and the file.
  absl::StatusOr<TensorView> Get(absl::string_view name) const;
  bool Has(absl::string_view name) const { return tensors_.count(std::string(name)) > 0; }
  // Tensor names in sorted order.
  std::vector<std::string> Names() const;
  // The "__metadata__" string map (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsFile() = default;

  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A model directory's weights: model.safetensors.index.json with its shards, or a single
// model.safetensors. Immutable after Open; thread-safe.
class SafetensorsModel {
 public:
  // Opens dir/model.safetensors.index.json (and every shard its weight_map names; each tensor
  // must be in the shard the map says) or else dir/model.safetensors. Errors: NOT_FOUND when
  // neither exists or a shard is missing, INVALID_ARGUMENT for a malformed index, and those of
  // SafetensorsFile::Open.
  static absl::StatusOr<std::unique_ptr<SafetensorsModel>> Open(const std::string& dir);

  // The tensor called name, or NOT_FOUND naming it.
  absl::StatusOr<TensorView> Get(absl::string_view name) const;
  bool Has(absl::string_view name) const;
  std::vector<std::string> Names() const;

  // Reads tensor name converted to fp32 (BF16, F16 and F32 are read exactly). Errors: NOT_FOUND
  // (absent), INVALID_ARGUMENT when its shape differs from expected_shape ("tensor t has shape
  // [a, b], expected [c, d]") or its dtype is not a float type.
  absl::StatusOr<std::vector<float>> ReadFloat(absl::string_view name,
                                               absl::Span<const int64_t> expected_shape) const;

 private:
  SafetensorsModel() = default;

  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;  // tensor name -> file
};

// Converts a BF16/F16/F32 tensor to fp32 (exactly), checking its shape against expected_shape
// when that is non-empty. Errors as SafetensorsModel::ReadFloat.
absl::StatusOr<std::vector<float>> TensorToFloat(const TensorView& t,
                                                 absl::Span<const int64_t> expected_shape);

// Reads a whole file into a string. NOT_FOUND when it cannot be opened.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace llama
}  // namespace ropekv

#endif  // ROPEKV_CLIENTS_LLAMA_SAFETENSORS_H_
