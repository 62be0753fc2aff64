// The daemon's YAML configuration file (ropekvd --config FILE; example deploy/ropekvd.yaml).
//
// The file sets flags, so every flag can live in the file and the command line overrides it:
//   - a top-level scalar names a flag:          `listen: 127.0.0.1:50051`  -> --listen
//   - a section's keys join its name with '_':  `gpu: {capacity: 4GiB}`     -> --gpu_capacity
//     (sections nest: `a: {b: {c: 1}}` -> --a_b_c)
//   - a list of scalars is joined with ',';
//   - `models:` is a list of per-model limits, gathered into --model_limits:
//       models:
//         - name: llama-3-8b        # model name or id
//           host_capacity: 1GiB     # optional
//           disk_capacity: 16GiB    # optional
// A flag given on the command line wins over the file. Unknown keys are errors (a typo must not
// silently fall back to a default).
#ifndef ROPEKV_SERVER_CONFIG_FILE_H_
#define ROPEKV_SERVER_CONFIG_FILE_H_

#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace ropekv {

// One flag value from the file.
struct ConfigSetting {
  std::string flag;   // flag name without dashes, e.g. "gpu_capacity"
  std::string value;  // its text, as on a command line
  std::string where;  // the key path in the file for messages, e.g. "gpu.capacity"
};

// Parses YAML text. INVALID_ARGUMENT for malformed YAML (with line and column), a top level that
// is not a map, null values, or a bad `models` entry. Settings come in file order.
absl::StatusOr<std::vector<ConfigSetting>> ParseConfigYaml(absl::string_view text);

// Reads and parses a file. NOT_FOUND when it cannot be read.
absl::StatusOr<std::vector<ConfigSetting>> ReadConfigFile(const std::string& path);

// Names of the flags given on a command line ("--name=v", "--name v", "-name", "--noname" for
// booleans gives both "noname" and "name"); scanning stops at "--".
absl::flat_hash_set<std::string> FlagsOnCommandLine(int argc, const char* const* argv);

// Sets the registered absl flags from `settings`, except those named in `given` (the command
// line's, which win). INVALID_ARGUMENT naming the key for an unknown flag or a value the flag
// does not parse; nothing is applied then. Call after absl::ParseCommandLine. Not thread-safe
// (flags are global).
absl::Status ApplyConfigSettings(absl::Span<const ConfigSetting> settings,
                                 const absl::flat_hash_set<std::string>& given);

}  // namespace ropekv

#endif  // ROPEKV_SERVER_CONFIG_FILE_H_
