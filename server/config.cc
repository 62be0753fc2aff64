#include "server/config.h"

#include <cctype>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace ropekv {

absl::StatusOr<uint64_t> ParseSize(absl::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  size_t digits = 0;
  while (digits < s.size() && std::isdigit(static_cast<unsigned char>(s[digits]))) ++digits;
  uint64_t value = 0;
  if (digits == 0 || !absl::SimpleAtoi(s.substr(0, digits), &value)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "size must be a number with an optional unit (e.g. 2GiB), got \"", text, "\""));
  }
  std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s.substr(digits)));
  int shift = 0;
  if (unit.empty() || unit == "b") {
    shift = 0;
  } else if (unit == "k" || unit == "kb" || unit == "kib") {
    shift = 10;
  } else if (unit == "m" || unit == "mb" || unit == "mib") {
    shift = 20;
  } else if (unit == "g" || unit == "gb" || unit == "gib") {
    shift = 30;
  } else if (unit == "t" || unit == "tb" || unit == "tib") {
    shift = 40;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown size unit \"", unit, "\" in \"", text,
                                                   "\"; use k, M, G or T (binary)"));
  }
  if (shift > 0 && value > (~uint64_t{0} >> shift)) {
    return absl::InvalidArgumentError(absl::StrCat("size \"", text, "\" overflows 64 bits"));
  }
  return value << shift;
}

absl::Status ValidateConfig(const ServerConfig& c) {
  if (c.host_capacity_bytes == 0) {
    return absl::InvalidArgumentError("host_capacity must be positive");
  }
  for (const auto& [name, value] :
       {std::pair<const char*, const std::string*>{"gpu_mode", &c.gpu_mode},
        {"host_pinned", &c.host_pinned}}) {
    if (*value != "auto" && *value != "on" && *value != "off") {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be auto, on or off, got \"", *value, "\""));
    }
  }
  if (c.disk_enabled && c.disk_capacity_bytes == 0) {
    return absl::InvalidArgumentError("disk_capacity must be positive");
  }
  if (c.disk_segment_bytes != 0 && (c.disk_segment_bytes < kMinDiskSegmentBytes ||
                                    c.disk_segment_bytes > kMaxDiskSegmentBytes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "disk_segment_size must be 0 (derived from disk_capacity) or in [1MiB, 64GiB], got ",
        c.disk_segment_bytes, " bytes"));
  }
  if (c.policy.write_tier == WriteTier::kDisk && !c.disk_enabled) {
    return absl::InvalidArgumentError("write_tier disk needs the disk tier (disk_enabled)");
  }
  if (c.policy.write_tier == WriteTier::kGpu && c.gpu_mode == "off") {
    return absl::InvalidArgumentError("write_tier gpu needs the GPU tier (gpu_mode auto or on)");
  }
  if (auto s = ValidateTierPolicy(c.policy); !s.ok()) return s;
  if (c.kvcache_threads < 1 || c.kvcache_threads > 256) {
    return absl::InvalidArgumentError(
        absl::StrCat("kvcache_threads must be in [1, 256], got ", c.kvcache_threads));
  }
  if (c.chunk_bytes == 0 || c.chunk_bytes + (64 << 10) > c.max_message_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk size ", c.chunk_bytes,
                     " must be positive and at least 64 KiB below the maximum "
                     "message size ",
                     c.max_message_bytes));
  }
  return absl::OkStatus();
}

}  // namespace ropekv
