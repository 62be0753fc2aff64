#include "clients/llama/llama_config.h"

#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "clients/llama/json.h"
#include "clients/llama/safetensors.h"

namespace ropekv {
namespace llama {
namespace {

constexpr absl::string_view kWhat = "config.json";

// Reads an optional member: leaves *out as it is when absent, errors when of the wrong type.
absl::Status OptionalInt64(const JsonValue& obj, absl::string_view key, int64_t* out) {
  const JsonValue* v = obj.Find(key);
  if (v == nullptr || v->is_null()) return absl::OkStatus();
  absl::StatusOr<int64_t> x = GetInt64(obj, key, kWhat);
  if (!x.ok()) return x.status();
  *out = *x;
  return absl::OkStatus();
}

absl::Status OptionalDouble(const JsonValue& obj, absl::string_view key, double* out) {
  const JsonValue* v = obj.Find(key);
  if (v == nullptr || v->is_null()) return absl::OkStatus();
  absl::StatusOr<double> x = GetDouble(obj, key, kWhat);
  if (!x.ok()) return x.status();
  *out = *x;
  return absl::OkStatus();
}

absl::Status OptionalBool(const JsonValue& obj, absl::string_view key, bool* out) {
  const JsonValue* v = obj.Find(key);
  if (v == nullptr || v->is_null()) return absl::OkStatus();
  absl::StatusOr<bool> x = GetBool(obj, key, kWhat);
  if (!x.ok()) return x.status();
  *out = *x;
  return absl::OkStatus();
}

absl::Status OptionalDoubleList(const JsonValue& obj, absl::string_view key,
                                std::vector<double>* out) {
  const JsonValue* v = obj.Find(key);
  if (v == nullptr || v->is_null()) return absl::OkStatus();
  if (!v->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": \"", key, "\" must be an array of numbers"));
  }
  out->clear();
  for (const JsonValue& x : v->array()) {
    if (!x.is_number()) {
      return absl::InvalidArgumentError(
          absl::StrCat(kWhat, ": \"", key, "\" must be an array of numbers"));
    }
    out->push_back(x.number_value());
  }
  return absl::OkStatus();
}

absl::Status Required(const JsonValue& obj, absl::string_view key, int64_t* out) {
  absl::StatusOr<int64_t> x = GetInt64(obj, key, kWhat);
  if (!x.ok()) return x.status();
  *out = *x;
  return absl::OkStatus();
}

// Fills rope from one object of RoPE parameters (v5 rope_parameters or v4 rope_scaling).
absl::Status ReadRopeObject(const JsonValue& obj, RopeParameters* rope) {
  if (!obj.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        kWhat, ": rope parameters must be an object, got ", JsonValue::TypeName(obj.type())));
  }
  for (absl::string_view key : {"rope_type", "type"}) {
    const JsonValue* t = obj.Find(key);
    if (t == nullptr) continue;
    if (!t->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(kWhat, ": \"", key, "\" must be a string"));
    }
    rope->rope_type = t->string_value();
    break;
  }
  absl::Status s = OptionalDouble(obj, "rope_theta", &rope->theta);
  if (s.ok()) s = OptionalDouble(obj, "partial_rotary_factor", &rope->partial_rotary_factor);
  if (s.ok()) s = OptionalDouble(obj, "factor", &rope->factor);
  if (s.ok()) {
    s = OptionalInt64(obj, "original_max_position_embeddings",
                      &rope->original_max_position_embeddings);
  }
  if (s.ok()) s = OptionalDouble(obj, "low_freq_factor", &rope->low_freq_factor);
  if (s.ok()) s = OptionalDouble(obj, "high_freq_factor", &rope->high_freq_factor);
  if (s.ok()) s = OptionalDouble(obj, "beta_fast", &rope->beta_fast);
  if (s.ok()) s = OptionalDouble(obj, "beta_slow", &rope->beta_slow);
  if (s.ok()) s = OptionalDouble(obj, "mscale", &rope->mscale);
  if (s.ok()) s = OptionalDouble(obj, "mscale_all_dim", &rope->mscale_all_dim);
  if (s.ok()) s = OptionalBool(obj, "truncate", &rope->truncate);
  if (s.ok()) s = OptionalDouble(obj, "attention_factor", &rope->attention_factor);
  if (s.ok()) s = OptionalDoubleList(obj, "short_factor", &rope->short_factor);
  if (s.ok()) s = OptionalDoubleList(obj, "long_factor", &rope->long_factor);
  return s;
}

}  // namespace

absl::Status ValidateLlamaConfig(const LlamaConfig& c) {
  struct Dim {
    absl::string_view name;
    int64_t value;
  };
  for (const Dim& d :
       {Dim{"vocab_size", c.vocab_size}, Dim{"hidden_size", c.hidden_size},
        Dim{"intermediate_size", c.intermediate_size},
        Dim{"num_hidden_layers", c.num_hidden_layers},
        Dim{"num_attention_heads", c.num_attention_heads},
        Dim{"num_key_value_heads", c.num_key_value_heads}, Dim{"head_dim", c.head_dim}}) {
    if (d.value <= 0 || d.value > (int64_t{1} << 24)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kWhat, ": ", d.name, " must be in [1, 2^24], got ", d.value));
    }
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": num_attention_heads (", c.num_attention_heads,
                     ") must be a multiple of num_key_value_heads (", c.num_key_value_heads, ")"));
  }
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": head_dim must be even, got ", c.head_dim));
  }
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": rms_norm_eps must be positive, got ", c.rms_norm_eps));
  }
  if (!(c.rope.theta > 0) || !std::isfinite(c.rope.theta)) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": rope_theta must be positive, got ", c.rope.theta));
  }
  const double rotary = c.rope.partial_rotary_factor * static_cast<double>(c.head_dim);
  const int64_t rotary_dim = static_cast<int64_t>(rotary);
  if (!(c.rope.partial_rotary_factor > 0 && c.rope.partial_rotary_factor <= 1) || rotary_dim < 2 ||
      rotary_dim % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        kWhat, ": partial_rotary_factor ", c.rope.partial_rotary_factor, " x head_dim ", c.head_dim,
        " must give an even rotary dimension in [2, head_dim], got ", rotary));
  }
  return absl::OkStatus();
}

absl::StatusOr<LlamaConfig> ParseLlamaConfig(absl::string_view json_text) {
  absl::StatusOr<JsonValue> doc = ParseJson(json_text);
  if (!doc.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(kWhat, ": ", doc.status().message()));
  }
  if (!doc->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kWhat, ": expected an object, got ", JsonValue::TypeName(doc->type())));
  }
  const JsonValue& j = *doc;
  LlamaConfig c;
  if (const JsonValue* mt = j.Find("model_type"); mt != nullptr) {
    if (!mt->is_string() || mt->string_value() != "llama") {
      return absl::UnimplementedError(
          absl::StrCat(kWhat, ": model_type must be \"llama\", got ",
                       mt->is_string() ? absl::StrCat("\"", mt->string_value(), "\"")
                                       : std::string(JsonValue::TypeName(mt->type()))));
    }
  }
  for (absl::string_view key : {"attention_bias", "mlp_bias"}) {
    bool bias = false;
    if (absl::Status s = OptionalBool(j, key, &bias); !s.ok()) return s;
    if (bias) {
      return absl::UnimplementedError(
          absl::StrCat(kWhat, ": ", key, " = true is not supported (no biases)"));
    }
  }
  if (const JsonValue* act = j.Find("hidden_act"); act != nullptr) {
    if (!act->is_string() || act->string_value() != "silu") {
      return absl::UnimplementedError(
          absl::StrCat(kWhat, ": hidden_act must be \"silu\", got ",
                       act->is_string() ? act->string_value() : JsonValue::TypeName(act->type())));
    }
  }
  absl::Status s = Required(j, "vocab_size", &c.vocab_size);
  if (s.ok()) s = Required(j, "hidden_size", &c.hidden_size);
  if (s.ok()) s = Required(j, "intermediate_size", &c.intermediate_size);
  if (s.ok()) s = Required(j, "num_hidden_layers", &c.num_hidden_layers);
  if (s.ok()) s = Required(j, "num_attention_heads", &c.num_attention_heads);
  if (!s.ok()) return s;
  c.num_key_value_heads = c.num_attention_heads;  // HF's default: no GQA
  s = OptionalInt64(j, "num_key_value_heads", &c.num_key_value_heads);
  if (s.ok()) s = OptionalInt64(j, "head_dim", &c.head_dim);
  if (s.ok()) s = OptionalDouble(j, "rms_norm_eps", &c.rms_norm_eps);
  if (s.ok()) s = OptionalBool(j, "tie_word_embeddings", &c.tie_word_embeddings);
  if (s.ok()) s = OptionalInt64(j, "max_position_embeddings", &c.max_position_embeddings);
  // v4: rope_theta and partial_rotary_factor at the top level, rope_scaling beside them.
  if (s.ok()) s = OptionalDouble(j, "rope_theta", &c.rope.theta);
  if (s.ok()) s = OptionalDouble(j, "partial_rotary_factor", &c.rope.partial_rotary_factor);
  if (!s.ok()) return s;
  for (absl::string_view key : {"rope_scaling", "rope_parameters"}) {
    const JsonValue* r = j.Find(key);
    if (r == nullptr || r->is_null()) continue;
    if (absl::Status rs = ReadRopeObject(*r, &c.rope); !rs.ok()) return rs;
  }
  if (c.head_dim == 0 && c.num_attention_heads > 0) {
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  static constexpr absl::string_view kRopeTypes[] = {"default", "linear", "dynamic",
                                                     "llama3",  "yarn",   "longrope"};
  bool known = false;
  for (absl::string_view t : kRopeTypes) known = known || c.rope.rope_type == t;
  if (!known) {
    return absl::UnimplementedError(absl::StrCat(
        kWhat,
        ": rope_type must be one of default, linear, dynamic, llama3, yarn, longrope; got \"",
        c.rope.rope_type, "\""));
  }
  if (absl::Status v = ValidateLlamaConfig(c); !v.ok()) return v;
  return c;
}

absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& dir) {
  absl::StatusOr<std::string> text = ReadFileToString(absl::StrCat(dir, "/config.json"));
  if (!text.ok()) return text.status();
  return ParseLlamaConfig(*text);
}

absl::StatusOr<RopeSpec> RopeSpecOf(const LlamaConfig& config) {
  const RopeParameters& r = config.rope;
  RopeSpec spec;
  if (r.rope_type == "default") {
    spec.type = RopeType::kDefault;
  } else if (r.rope_type == "linear") {
    spec.type = RopeType::kLinear;
  } else if (r.rope_type == "dynamic") {
    spec.type = RopeType::kDynamic;
  } else if (r.rope_type == "llama3") {
    spec.type = RopeType::kLlama3;
  } else if (r.rope_type == "yarn") {
    spec.type = RopeType::kYarn;
  } else if (r.rope_type == "longrope") {
    spec.type = RopeType::kLongRope;
  } else {
    return absl::UnimplementedError(
        absl::StrCat("rope_type \"", r.rope_type, "\" is not supported"));
  }
  spec.theta = r.theta;
  spec.head_dim = static_cast<int>(config.head_dim);
  // HF: int(head_dim * partial_rotary_factor).
  spec.rotary_dim =
      static_cast<int>(static_cast<double>(config.head_dim) * r.partial_rotary_factor);
  spec.layout = PairLayout::kNeox;
  spec.factor = r.factor;
  spec.max_position_embeddings = config.max_position_embeddings;
  spec.original_max_position_embeddings = r.original_max_position_embeddings;
  spec.low_freq_factor = r.low_freq_factor;
  spec.high_freq_factor = r.high_freq_factor;
  spec.beta_fast = r.beta_fast;
  spec.beta_slow = r.beta_slow;
  spec.mscale = r.mscale;
  spec.mscale_all_dim = r.mscale_all_dim;
  spec.truncate = r.truncate;
  spec.attention_factor = r.attention_factor;
  spec.short_factor = r.short_factor;
  spec.long_factor = r.long_factor;
  if (absl::Status s = ValidateRopeSpec(spec); !s.ok()) return s;
  return spec;
}

}  // namespace llama
}  // namespace ropekv
