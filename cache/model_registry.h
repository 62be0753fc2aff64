// The models the daemon knows: spec by id, and human names for ids. Thread-safe.
#ifndef ROPEKV_CACHE_MODEL_REGISTRY_H_
#define ROPEKV_CACHE_MODEL_REGISTRY_H_

#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "cache/model.h"

namespace ropekv {

struct RegisteredModel {
  ModelId id;
  ModelSpec spec;
  std::vector<std::string> names;
};

class ModelRegistry {
 public:
  struct Registration {
    ModelId id;
    bool created = false;  // false: the spec was known already
  };

  // Registers `spec` (validated: INVALID_ARGUMENT on a bad spec) under its id, and `name` (may be
  // empty) as a name of it. A name already naming another model -> ALREADY_EXISTS.
  absl::StatusOr<Registration> Register(const ModelSpec& spec, const std::string& name);

  // The model named by `id_or_name`; NOT_FOUND naming it otherwise.
  absl::StatusOr<RegisteredModel> Resolve(absl::string_view id_or_name) const;

  std::vector<RegisteredModel> List() const;
  size_t size() const;

 private:
  mutable absl::Mutex mu_;
  absl::flat_hash_map<ModelId, RegisteredModel> models_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<std::string, ModelId> names_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ropekv

#endif  // ROPEKV_CACHE_MODEL_REGISTRY_H_
