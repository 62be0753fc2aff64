#include "cache/tier_policy.h"

#include <cctype>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace ropekv {

absl::StatusOr<WriteTier> ParseWriteTier(absl::string_view text) {
  const std::string t = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  if (t == "gpu") return WriteTier::kGpu;
  if (t == "host") return WriteTier::kHost;
  if (t == "disk") return WriteTier::kDisk;
  return absl::InvalidArgumentError(
      absl::StrCat("write tier must be gpu, host or disk, got \"", text, "\""));
}

const char* WriteTierName(WriteTier tier) {
  switch (tier) {
    case WriteTier::kGpu:
      return "gpu";
    case WriteTier::kHost:
      return "host";
    case WriteTier::kDisk:
      return "disk";
  }
  return "?";
}

absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  size_t digits = 0;
  while (digits < s.size() && std::isdigit(static_cast<unsigned char>(s[digits]))) ++digits;
  uint64_t value = 0;
  if (digits == 0 || !absl::SimpleAtoi(s.substr(0, digits), &value)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "size must be a number with an optional unit (e.g. 2GiB), got \"", text, "\""));
  }
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s.substr(digits)));
  int shift = -1;
  if (unit.empty() || unit == "b") shift = 0;
  if (unit == "k" || unit == "kb" || unit == "kib") shift = 10;
  if (unit == "m" || unit == "mb" || unit == "mib") shift = 20;
  if (unit == "g" || unit == "gb" || unit == "gib") shift = 30;
  if (unit == "t" || unit == "tb" || unit == "tib") shift = 40;
  if (shift < 0) {
    return absl::InvalidArgumentError(absl::StrCat("unknown size unit \"", unit, "\" in \"", text,
                                                   "\"; use k, M, G or T (binary)"));
  }
  if (shift > 0 && value > (~uint64_t{0} >> shift)) {
    return absl::InvalidArgumentError(absl::StrCat("size \"", text, "\" overflows 64 bits"));
  }
  return value << shift;
}

absl::StatusOr<std::vector<ModelLimit>> ParseModelLimits(absl::string_view text) {
  std::vector<ModelLimit> out;
  for (absl::string_view entry : absl::StrSplit(text, ';', absl::SkipWhitespace())) {
    entry = absl::StripAsciiWhitespace(entry);
    const size_t eq = entry.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("model limit must look like NAME=host:SIZE,disk:SIZE, got \"", entry, "\""));
    }
    ModelLimit limit;
    limit.model = std::string(absl::StripAsciiWhitespace(entry.substr(0, eq)));
    for (absl::string_view kv : absl::StrSplit(entry.substr(eq + 1), ',', absl::SkipWhitespace())) {
      const size_t colon = kv.find(':');
      const std::string key = colon == absl::string_view::npos
                                  ? std::string(kv)
                                  : std::string(absl::StripAsciiWhitespace(kv.substr(0, colon)));
      if (colon == absl::string_view::npos || (key != "host" && key != "disk")) {
        return absl::InvalidArgumentError(absl::StrCat(
            "model limit of ", limit.model, ": expected host:SIZE or disk:SIZE, got \"", kv, "\""));
      }
      auto size = ParseByteSize(kv.substr(colon + 1));
      if (!size.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("model limit of ", limit.model, ": ", size.status().message()));
      }
      (key == "host" ? limit.host_bytes : limit.disk_bytes) = *size;
    }
    out.push_back(std::move(limit));
  }
  return out;
}

std::string FormatModelLimits(const std::vector<ModelLimit>& limits) {
  return absl::StrJoin(limits, ";", [](std::string* out, const ModelLimit& l) {
    absl::StrAppend(out, l.model, "=host:", l.host_bytes, ",disk:", l.disk_bytes);
  });
}

absl::Status ValidateTierPolicy(const TierPolicy& p) {
  if (!(p.low_watermark > 0 && p.low_watermark < p.high_watermark && p.high_watermark <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("watermarks must satisfy 0 < low < high <= 1, got low ", p.low_watermark,
                     " and high ", p.high_watermark));
  }
  absl::flat_hash_set<std::string> seen;
  for (const ModelLimit& l : p.model_limits) {
    if (!seen.insert(l.model).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("model ", l.model, " has more than one limit entry"));
    }
  }
  return absl::OkStatus();
}

}  // namespace ropekv
