#include "cache/model_registry.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace ropekv {

absl::StatusOr<ModelRegistry::Registration> ModelRegistry::Register(const ModelSpec& spec,
                                                                    const std::string& name) {
  if (auto s = ValidateModelSpec(spec); !s.ok()) return s;
  const ModelId id = ModelIdOf(spec);
  absl::MutexLock lock(&mu_);
  if (!name.empty()) {
    auto it = names_.find(name);
    if (it != names_.end() && it->second != id) {
      return absl::AlreadyExistsError(
          absl::StrCat("model name \"", name, "\" already names model ", it->second));
    }
    if (models_.contains(name) && name != id) {
      return absl::InvalidArgumentError(
          absl::StrCat("model name \"", name, "\" is the id of another model"));
    }
  }
  Registration reg{id, false};
  auto [it, inserted] = models_.try_emplace(id, RegisteredModel{id, spec, {}});
  reg.created = inserted;
  if (!name.empty() && !names_.contains(name)) {
    names_[name] = id;
    it->second.names.push_back(name);
  }
  return reg;
}

absl::StatusOr<RegisteredModel> ModelRegistry::Resolve(absl::string_view id_or_name) const {
  absl::MutexLock lock(&mu_);
  if (auto it = models_.find(id_or_name); it != models_.end()) return it->second;
  if (auto n = names_.find(id_or_name); n != names_.end()) return models_.at(n->second);
  return absl::NotFoundError(
      absl::StrCat("unknown model \"", id_or_name, "\": register it first (RegisterModel)"));
}

std::vector<RegisteredModel> ModelRegistry::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<RegisteredModel> out;
  for (const auto& [id, m] : models_) out.push_back(m);
  std::sort(out.begin(), out.end(),
            [](const RegisteredModel& a, const RegisteredModel& b) { return a.id < b.id; });
  return out;
}

size_t ModelRegistry::size() const {
  absl::MutexLock lock(&mu_);
  return models_.size();
}

}  // namespace ropekv
