#include "server/config_file.h"

#include <yaml-cpp/yaml.h>

#include <fstream>
#include <sstream>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace ropekv {
namespace {

absl::Status Flatten(const YAML::Node& node, const std::string& flag, const std::string& where,
                     std::vector<ConfigSetting>* out);

// `models:` -> one --model_limits value, "NAME=host:SIZE,disk:SIZE;..." (tier_policy.h).
absl::Status ModelLimits(const YAML::Node& node, std::vector<ConfigSetting>* out) {
  if (!node.IsSequence()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config: models must be a list of {name, host_capacity, disk_capacity}, "
                     "got a ",
                     node.IsMap() ? "map" : "scalar"));
  }
  std::vector<std::string> entries;
  for (size_t i = 0; i < node.size(); ++i) {
    const YAML::Node m = node[i];
    if (!m.IsMap() || !m["name"] || !m["name"].IsScalar()) {
      return absl::InvalidArgumentError(
          absl::StrCat("config: models[", i, "] must be a map with a name"));
    }
    std::string entry = m["name"].Scalar() + "=";
    std::vector<std::string> limits;
    for (const auto& kv : m) {
      const std::string key = kv.first.Scalar();
      if (key == "name") continue;
      if ((key != "host_capacity" && key != "disk_capacity") || !kv.second.IsScalar()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "config: models[", i, "].", key, ": expected host_capacity or disk_capacity: SIZE"));
      }
      limits.push_back(
          absl::StrCat(key == "host_capacity" ? "host:" : "disk:", kv.second.Scalar()));
    }
    entries.push_back(entry + absl::StrJoin(limits, ","));
  }
  out->push_back({"model_limits", absl::StrJoin(entries, ";"), "models"});
  return absl::OkStatus();
}

absl::Status Flatten(const YAML::Node& node, const std::string& flag, const std::string& where,
                     std::vector<ConfigSetting>* out) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar:
      out->push_back({flag, node.Scalar(), where});
      return absl::OkStatus();
    case YAML::NodeType::Sequence: {
      std::vector<std::string> items;
      for (size_t i = 0; i < node.size(); ++i) {
        if (!node[i].IsScalar()) {
          return absl::InvalidArgumentError(
              absl::StrCat("config: ", where, "[", i, "] must be a scalar"));
        }
        items.push_back(node[i].Scalar());
      }
      out->push_back({flag, absl::StrJoin(items, ","), where});
      return absl::OkStatus();
    }
    case YAML::NodeType::Map:
      for (const auto& kv : node) {
        if (!kv.first.IsScalar()) {
          return absl::InvalidArgumentError(absl::StrCat("config: ", where, " has a non-text key"));
        }
        const std::string key = kv.first.Scalar();
        if (flag.empty() && key == "models") {
          if (auto s = ModelLimits(kv.second, out); !s.ok()) return s;
          continue;
        }
        // `sessions:` is the section of the --session_* flags, as `session:` is.
        const std::string name = flag.empty() && key == "sessions" ? "session" : key;
        if (auto s = Flatten(kv.second, flag.empty() ? name : absl::StrCat(flag, "_", key),
                             where.empty() ? key : absl::StrCat(where, ".", key), out);
            !s.ok()) {
          return s;
        }
      }
      return absl::OkStatus();
    case YAML::NodeType::Null:
    case YAML::NodeType::Undefined:
      return absl::InvalidArgumentError(absl::StrCat("config: ", where, " has no value"));
  }
  return absl::InternalError("config: unknown YAML node type");
}

}  // namespace

absl::StatusOr<std::vector<ConfigSetting>> ParseConfigYaml(absl::string_view text) {
  // yaml-cpp reports errors by exceptions; they stop here.
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: malformed YAML at line ",
                                                   e.mark.line + 1, ", column ", e.mark.column + 1,
                                                   ": ", e.msg));
  }
  std::vector<ConfigSetting> out;
  if (root.IsNull()) return out;  // an empty file sets nothing
  if (!root.IsMap()) {
    return absl::InvalidArgumentError("config: the top level must be a map of settings");
  }
  try {
    if (auto s = Flatten(root, "", "", &out); !s.ok()) return s;
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config: ", e.what()));
  }
  return out;
}

absl::StatusOr<std::vector<ConfigSetting>> ReadConfigFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("config file ", path, " cannot be read"));
  std::stringstream text;
  text << in.rdbuf();
  auto settings = ParseConfigYaml(text.str());
  if (!settings.ok()) {
    return absl::Status(settings.status().code(),
                        absl::StrCat(path, ": ", settings.status().message()));
  }
  return settings;
}

absl::flat_hash_set<std::string> FlagsOnCommandLine(int argc, const char* const* argv) {
  absl::flat_hash_set<std::string> names;
  for (int i = 1; i < argc; ++i) {
    absl::string_view a = argv[i];
    if (a == "--") break;
    if (a.size() < 2 || a[0] != '-') continue;
    a.remove_prefix(a[1] == '-' ? 2 : 1);
    const std::string name(a.substr(0, a.find('=')));
    names.insert(name);
    if (absl::string_view(name).substr(0, 2) == "no") names.insert(name.substr(2));
  }
  return names;
}

absl::Status ApplyConfigSettings(absl::Span<const ConfigSetting> settings,
                                 const absl::flat_hash_set<std::string>& given) {
  // Check everything first, so that a bad file changes no flag.
  std::vector<absl::CommandLineFlag*> flags;
  for (const ConfigSetting& s : settings) {
    absl::CommandLineFlag* f = absl::FindCommandLineFlag(s.flag);
    if (f == nullptr || s.flag == "config") {
      return absl::InvalidArgumentError(
          absl::StrCat("config: unknown setting ", s.where, " (there is no flag --", s.flag, ")"));
    }
    flags.push_back(f);
  }
  std::vector<std::pair<absl::CommandLineFlag*, std::string>> previous;
  for (size_t i = 0; i < settings.size(); ++i) {
    if (given.contains(settings[i].flag)) continue;
    previous.push_back({flags[i], flags[i]->CurrentValue()});
    std::string error;
    if (!flags[i]->ParseFrom(settings[i].value, &error)) {
      for (auto it = previous.rbegin(); it != previous.rend(); ++it) {
        std::string ignored;
        it->first->ParseFrom(it->second, &ignored);
      }
      return absl::InvalidArgumentError(
          absl::StrCat("config: ", settings[i].where, ": \"", settings[i].value, "\": ", error));
    }
  }
  return absl::OkStatus();
}

}  // namespace ropekv
