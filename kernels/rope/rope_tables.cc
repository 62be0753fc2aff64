// RopeSpec validation, table ids and the inverse-frequency tables of every rope_type.
//
// InvFreq reproduces the float32 arithmetic of transformers' modeling_rope_utils.py operation by
// operation (each torch op on a float32 tensor is one IEEE float op, so each line below is one
// rounding). Torch details that matter:
//   - `scalar / t` is Tensor.__rtruediv__ = t.reciprocal() * scalar (two roundings);
//   - `t / int_or_float` on the CPU is a true fp32 division; on CUDA a CPU-scalar divisor becomes a
//     multiply by the fp32 reciprocal (aten div_true_kernel_cuda);
//   - python scalars enter fp32 ops cast to float32;
//   - pow(fp32, fp32) is torch's (Sleef on CPU, powf on CUDA, both within 1 ulp); we use the
//     correctly rounded value, the one residual difference (docs/rope.md).
// Static tables are built at model init (on the CPU); the tables dynamic NTK grows and LongRoPE's
// long table are built in the forward pass on the activations' device (CUDA), so those use the CUDA
// forms. This file must not be compiled with floating-point contraction (see CMakeLists.txt).
#include <algorithm>
#include <cmath>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/rope/rope.h"

namespace ropekv {
namespace {

// Where torch ran the arithmetic of a table (see the file comment).
enum class TorchDevice { kCpu, kCuda };

float Powf(float base, float exponent) {
  return static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(exponent)));
}

// torch.arange(0, dim, 2).float() / dim, element i.
float ExponentShape(int i, int dim, TorchDevice device) {
  const float two_i = static_cast<float>(2 * i);
  if (device == TorchDevice::kCpu) return two_i / static_cast<float>(dim);
  const float inv_dim = 1.0f / static_cast<float>(dim);
  return two_i * inv_dim;
}

// 1.0 / (base ** (arange(0, dim, 2).float() / dim)) with base a python float (cast to fp32).
std::vector<float> DefaultInvFreq(double base, int dim, TorchDevice device) {
  std::vector<float> inv(dim / 2);
  const float base_f = static_cast<float>(base);
  for (int i = 0; i < dim / 2; ++i) {
    inv[i] = 1.0f / Powf(base_f, ExponentShape(i, dim, device));
  }
  return inv;
}

// Yarn's effective L_o: original_max_position_embeddings, else max_position_embeddings.
int64_t YarnOriginalMax(const RopeSpec& spec) {
  return spec.original_max_position_embeddings > 0 ? spec.original_max_position_embeddings
                                                   : spec.max_position_embeddings;
}

// LongRoPE's L_o (HF: config.original_max_position_embeddings, else max_position_embeddings).
int64_t LongRopeOriginalMax(const RopeSpec& spec) { return YarnOriginalMax(spec); }

// Yarn and LongRoPE: factor 0 means "absent", derived as max / original (HF does the same).
double EffectiveFactor(const RopeSpec& spec) {
  if ((spec.type == RopeType::kYarn || spec.type == RopeType::kLongRope) && spec.factor == 0.0) {
    return static_cast<double>(spec.max_position_embeddings) /
           static_cast<double>(YarnOriginalMax(spec));
  }
  return spec.factor;
}

double YarnGetMscale(double scale, double mscale) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

// Double-precision attention factor as HF computes it (a python float).
double AttentionFactor64(const RopeSpec& spec) {
  if (spec.type == RopeType::kYarn) {
    if (spec.attention_factor > 0.0) return spec.attention_factor;
    const double s = EffectiveFactor(spec);
    if (spec.mscale != 0.0 && spec.mscale_all_dim != 0.0) {
      return YarnGetMscale(s, spec.mscale) / YarnGetMscale(s, spec.mscale_all_dim);
    }
    return YarnGetMscale(s, 1.0);
  }
  if (spec.type == RopeType::kLongRope) {
    if (spec.attention_factor > 0.0) return spec.attention_factor;
    const double s = EffectiveFactor(spec);
    if (s <= 1.0) return 1.0;
    return std::sqrt(1.0 + std::log(s) / std::log(static_cast<double>(LongRopeOriginalMax(spec))));
  }
  return 1.0;
}

// Yarn's find_correction_range (python doubles) -> (low, high) before linear_ramp_factor.
void YarnCorrectionRange(const RopeSpec& spec, int dim, double* low, double* high) {
  const double base = spec.theta;
  const double l_o = static_cast<double>(YarnOriginalMax(spec));
  auto correction_dim = [&](double num_rotations) {
    return (dim * std::log(l_o / (num_rotations * 2 * M_PI))) / (2 * std::log(base));
  };
  double lo = correction_dim(spec.beta_fast);
  double hi = correction_dim(spec.beta_slow);
  if (spec.truncate) {
    lo = std::floor(lo);
    hi = std::ceil(hi);
  }
  *low = std::max(lo, 0.0);
  *high = std::min(hi, static_cast<double>(dim - 1));
}

std::vector<float> YarnInvFreq(const RopeSpec& spec, int dim) {
  const float factor_f = static_cast<float>(EffectiveFactor(spec));
  double low, high;
  YarnCorrectionRange(spec, dim, &low, &high);
  if (low == high) high += 0.001;  // linear_ramp_factor's "prevent singularity"
  const float low_f = static_cast<float>(low);
  const float range_f = static_cast<float>(high - low);
  const float base_f = static_cast<float>(spec.theta);
  std::vector<float> inv(dim / 2);
  for (int i = 0; i < dim / 2; ++i) {
    const float pos_freq = Powf(base_f, ExponentShape(i, dim, TorchDevice::kCpu));
    const float extrapolation = 1.0f / pos_freq;
    const float interpolation = 1.0f / (factor_f * pos_freq);
    float ramp = (static_cast<float>(i) - low_f) / range_f;
    ramp = std::min(std::max(ramp, 0.0f), 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    const float a = interpolation * (1.0f - extrapolation_factor);
    const float b = extrapolation * extrapolation_factor;
    inv[i] = a + b;
  }
  return inv;
}

std::vector<float> Llama3InvFreq(const RopeSpec& spec, int dim) {
  std::vector<float> inv = DefaultInvFreq(spec.theta, dim, TorchDevice::kCpu);
  const double old_context_len = static_cast<double>(spec.original_max_position_embeddings);
  const float factor_f = static_cast<float>(spec.factor);
  const float low_freq_factor_f = static_cast<float>(spec.low_freq_factor);
  const float low_freq_wavelen = static_cast<float>(old_context_len / spec.low_freq_factor);
  const float high_freq_wavelen = static_cast<float>(old_context_len / spec.high_freq_factor);
  const float two_pi_f = static_cast<float>(2 * M_PI);
  const float old_context_len_f = static_cast<float>(old_context_len);
  const float smooth_den_f = static_cast<float>(spec.high_freq_factor - spec.low_freq_factor);
  for (float& f : inv) {
    const float wavelen = (1.0f / f) * two_pi_f;
    const float inv_llama = wavelen > low_freq_wavelen ? f / factor_f : f;
    const float smooth = ((1.0f / wavelen) * old_context_len_f - low_freq_factor_f) / smooth_den_f;
    const float smoothed = ((1.0f - smooth) * inv_llama) / factor_f + smooth * inv_llama;
    const bool is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    f = is_medium ? smoothed : inv_llama;
  }
  return inv;
}

// Dynamic NTK's table for seq_len > max_position_embeddings, built on the device in the forward
// pass from the int64 tensor seq_len: every step is an fp32 CUDA op.
std::vector<float> DynamicGrownInvFreq(const RopeSpec& spec, int dim, int64_t seq_len) {
  const float factor_f = static_cast<float>(spec.factor);
  float x = factor_f * static_cast<float>(seq_len);
  x = x * (1.0f / static_cast<float>(spec.max_position_embeddings));
  x = x - static_cast<float>(spec.factor - 1.0);
  x = Powf(x, static_cast<float>(static_cast<double>(dim) / (dim - 2)));
  const float base = static_cast<float>(spec.theta) * x;
  std::vector<float> inv(dim / 2);
  for (int i = 0; i < dim / 2; ++i) {
    inv[i] = 1.0f / Powf(base, ExponentShape(i, dim, TorchDevice::kCuda));
  }
  return inv;
}

std::vector<float> LongRopeInvFreq(const RopeSpec& spec, int dim, bool long_table) {
  const std::vector<double>& ext = long_table ? spec.long_factor : spec.short_factor;
  const TorchDevice device = long_table ? TorchDevice::kCuda : TorchDevice::kCpu;
  const float base_f = static_cast<float>(spec.theta);
  std::vector<float> inv(dim / 2);
  for (int i = 0; i < dim / 2; ++i) {
    const float p = Powf(base_f, ExponentShape(i, dim, device));
    inv[i] = 1.0f / (static_cast<float>(ext[i]) * p);
  }
  return inv;
}

bool Finite(double v) { return std::isfinite(v); }

absl::Status Invalid(absl::string_view field, absl::string_view expected, double got) {
  return absl::InvalidArgumentError(
      absl::StrCat("rope.", field, " must be ", expected, ", got ", got));
}

}  // namespace

int RotaryDim(const RopeSpec& spec) {
  return spec.rotary_dim == 0 ? spec.head_dim : spec.rotary_dim;
}

const char* RopeTypeName(RopeType type) {
  switch (type) {
    case RopeType::kDefault:
      return "default";
    case RopeType::kLinear:
      return "linear";
    case RopeType::kDynamic:
      return "dynamic";
    case RopeType::kLlama3:
      return "llama3";
    case RopeType::kYarn:
      return "yarn";
    case RopeType::kLongRope:
      return "longrope";
  }
  return "unknown";
}

absl::Status ValidateRopeSpec(const RopeSpec& spec) {
  if (static_cast<int>(spec.type) > static_cast<int>(RopeType::kLongRope)) {
    return Invalid("type", "a RopeType (0..5)", static_cast<int>(spec.type));
  }
  if (static_cast<int>(spec.layout) > static_cast<int>(PairLayout::kGptj)) {
    return Invalid("layout", "kNeox or kGptj", static_cast<int>(spec.layout));
  }
  if (!Finite(spec.theta) || spec.theta <= 0.0)
    return Invalid("theta", "finite and > 0", spec.theta);
  if (spec.head_dim <= 0 || spec.head_dim % 2 != 0) {
    return Invalid("head_dim", "even and > 0", spec.head_dim);
  }
  if (spec.rotary_dim != 0 &&
      (spec.rotary_dim < 2 || spec.rotary_dim % 2 != 0 || spec.rotary_dim > spec.head_dim)) {
    return Invalid("rotary_dim",
                   absl::StrCat("0 (= head_dim) or even in [2, head_dim ", spec.head_dim, "]"),
                   spec.rotary_dim);
  }
  const int dim = RotaryDim(spec);
  const RopeType t = spec.type;
  if (spec.attention_factor != 0.0 && t != RopeType::kYarn && t != RopeType::kLongRope) {
    return Invalid("attention_factor",
                   absl::StrCat("0 for rope_type ", RopeTypeName(t), " (yarn and longrope only)"),
                   spec.attention_factor);
  }
  if (!Finite(spec.attention_factor) || spec.attention_factor < 0.0) {
    return Invalid("attention_factor", "finite and >= 0 (0 = derived)", spec.attention_factor);
  }
  if (spec.max_position_embeddings < 0) {
    return Invalid("max_position_embeddings", ">= 0", spec.max_position_embeddings);
  }
  if (spec.original_max_position_embeddings < 0) {
    return Invalid("original_max_position_embeddings", ">= 0",
                   spec.original_max_position_embeddings);
  }
  switch (t) {
    case RopeType::kDefault:
      return absl::OkStatus();
    case RopeType::kLinear:
      if (!Finite(spec.factor) || spec.factor <= 0.0) {
        return Invalid("factor", "finite and > 0 for linear", spec.factor);
      }
      return absl::OkStatus();
    case RopeType::kDynamic:
      if (!Finite(spec.factor) || spec.factor <= 0.0) {
        return Invalid("factor", "finite and > 0 for dynamic", spec.factor);
      }
      if (spec.max_position_embeddings <= 0) {
        return Invalid("max_position_embeddings", "> 0 for dynamic", spec.max_position_embeddings);
      }
      if (dim <= 2) return Invalid("rotary_dim", "> 2 for dynamic (exponent d/(d-2))", dim);
      return absl::OkStatus();
    case RopeType::kLlama3:
      if (!Finite(spec.factor) || spec.factor <= 0.0) {
        return Invalid("factor", "finite and > 0 for llama3", spec.factor);
      }
      if (spec.original_max_position_embeddings <= 0) {
        return Invalid("original_max_position_embeddings", "> 0 for llama3",
                       spec.original_max_position_embeddings);
      }
      if (!Finite(spec.low_freq_factor) || spec.low_freq_factor <= 0.0) {
        return Invalid("low_freq_factor", "finite and > 0", spec.low_freq_factor);
      }
      if (!Finite(spec.high_freq_factor) || spec.high_freq_factor <= spec.low_freq_factor) {
        return Invalid("high_freq_factor",
                       absl::StrCat("finite and > low_freq_factor ", spec.low_freq_factor),
                       spec.high_freq_factor);
      }
      return absl::OkStatus();
    case RopeType::kYarn:
    case RopeType::kLongRope: {
      const absl::string_view name = t == RopeType::kYarn ? "yarn" : "longrope";
      if (YarnOriginalMax(spec) <= 1) {
        return Invalid("original_max_position_embeddings",
                       absl::StrCat("> 1 for ", name, " (or max_position_embeddings > 1)"),
                       YarnOriginalMax(spec));
      }
      if (!Finite(spec.factor) || spec.factor < 0.0) {
        return Invalid("factor", absl::StrCat("finite and > 0 for ", name, " (0 = max/original)"),
                       spec.factor);
      }
      if (spec.factor == 0.0 && spec.max_position_embeddings <= 0) {
        return Invalid("max_position_embeddings",
                       absl::StrCat("> 0 when ", name, "'s factor is derived (factor 0)"),
                       spec.max_position_embeddings);
      }
      if (t == RopeType::kYarn) {
        if (!Finite(spec.beta_fast) || spec.beta_fast <= 0.0) {
          return Invalid("beta_fast", "finite and > 0", spec.beta_fast);
        }
        if (!Finite(spec.beta_slow) || spec.beta_slow <= 0.0) {
          return Invalid("beta_slow", "finite and > 0", spec.beta_slow);
        }
        if (!Finite(spec.mscale) || spec.mscale < 0.0) {
          return Invalid("mscale", "finite and >= 0 (0 = absent)", spec.mscale);
        }
        if (!Finite(spec.mscale_all_dim) || spec.mscale_all_dim < 0.0) {
          return Invalid("mscale_all_dim", "finite and >= 0 (0 = absent)", spec.mscale_all_dim);
        }
        return absl::OkStatus();
      }
      for (const auto* factors : {&spec.short_factor, &spec.long_factor}) {
        const absl::string_view field =
            factors == &spec.short_factor ? "short_factor" : "long_factor";
        if (static_cast<int>(factors->size()) != dim / 2) {
          return absl::InvalidArgumentError(absl::StrCat("rope.", field,
                                                         " must have rotary_dim/2 = ", dim / 2,
                                                         " entries, got ", factors->size()));
        }
        for (size_t i = 0; i < factors->size(); ++i) {
          if (!Finite((*factors)[i]) || (*factors)[i] <= 0.0) {
            return Invalid(absl::StrCat(field, "[", i, "]"), "finite and > 0", (*factors)[i]);
          }
        }
      }
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

RopeTableId RopeTableFor(const RopeSpec& spec, int64_t seq_len) {
  switch (spec.type) {
    case RopeType::kDynamic:
      return seq_len > spec.max_position_embeddings ? seq_len : kBaseTable;
    case RopeType::kLongRope:
      return seq_len > LongRopeOriginalMax(spec) ? kLongRopeLongTable : kLongRopeShortTable;
    default:
      return kBaseTable;
  }
}

absl::Status ValidateRopeTable(const RopeSpec& spec, RopeTableId table) {
  switch (spec.type) {
    case RopeType::kDynamic:
      if (table == kBaseTable || table > spec.max_position_embeddings) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat(
          "rope table of dynamic must be 0 (base) or a seq_len > max_position_embeddings ",
          spec.max_position_embeddings, ", got ", table));
    case RopeType::kLongRope:
      if (table == kLongRopeShortTable || table == kLongRopeLongTable) return absl::OkStatus();
      return absl::InvalidArgumentError(
          absl::StrCat("rope table of longrope must be 0 (short) or 1 (long), got ", table));
    default:
      if (table == kBaseTable) return absl::OkStatus();
      return absl::InvalidArgumentError(
          absl::StrCat("rope table of rope_type ", RopeTypeName(spec.type),
                       " must be 0 (static frequencies), got ", table));
  }
}

std::vector<float> InvFreq(const RopeSpec& spec, RopeTableId table) {
  if (!ValidateRopeSpec(spec).ok() || !ValidateRopeTable(spec, table).ok()) return {};
  const int dim = RotaryDim(spec);
  switch (spec.type) {
    case RopeType::kDefault:
      return DefaultInvFreq(spec.theta, dim, TorchDevice::kCpu);
    case RopeType::kLinear: {
      std::vector<float> inv = DefaultInvFreq(spec.theta, dim, TorchDevice::kCpu);
      const float factor_f = static_cast<float>(spec.factor);
      for (float& f : inv) f = f / factor_f;
      return inv;
    }
    case RopeType::kDynamic:
      // At init HF computes base * 1.0 ** (d/(d-2)) in python doubles: the default table.
      if (table == kBaseTable) return DefaultInvFreq(spec.theta, dim, TorchDevice::kCpu);
      return DynamicGrownInvFreq(spec, dim, table);
    case RopeType::kLlama3:
      return Llama3InvFreq(spec, dim);
    case RopeType::kYarn:
      return YarnInvFreq(spec, dim);
    case RopeType::kLongRope:
      return LongRopeInvFreq(spec, dim, table == kLongRopeLongTable);
  }
  return {};
}

std::vector<double> InvFreq64(const RopeSpec& spec, RopeTableId table) {
  if (!ValidateRopeSpec(spec).ok() || !ValidateRopeTable(spec, table).ok()) return {};
  const int dim = RotaryDim(spec);
  std::vector<double> inv(dim / 2);
  double base = spec.theta;
  if (spec.type == RopeType::kDynamic && table != kBaseTable) {
    const double l = static_cast<double>(table);
    const double l_max = static_cast<double>(spec.max_position_embeddings);
    base *= std::pow(spec.factor * l / l_max - (spec.factor - 1.0),
                     static_cast<double>(dim) / (dim - 2));
  }
  for (int i = 0; i < dim / 2; ++i) inv[i] = std::pow(base, -2.0 * i / dim);
  switch (spec.type) {
    case RopeType::kLinear:
      for (double& f : inv) f /= spec.factor;
      break;
    case RopeType::kLlama3: {
      const double l_o = static_cast<double>(spec.original_max_position_embeddings);
      for (double& f : inv) {
        const double wavelen = 2 * M_PI / f;
        if (wavelen < l_o / spec.high_freq_factor) continue;
        if (wavelen > l_o / spec.low_freq_factor) {
          f /= spec.factor;
          continue;
        }
        const double smooth =
            (l_o / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor);
        f = (1 - smooth) * f / spec.factor + smooth * f;
      }
      break;
    }
    case RopeType::kYarn: {
      double low, high;
      YarnCorrectionRange(spec, dim, &low, &high);
      if (low == high) high += 0.001;
      const double s = EffectiveFactor(spec);
      for (int i = 0; i < dim / 2; ++i) {
        const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
        // ramp 0: extrapolation (theta_i), ramp 1: interpolation (theta_i / s).
        inv[i] = inv[i] / s * ramp + inv[i] * (1 - ramp);
      }
      break;
    }
    case RopeType::kLongRope: {
      const std::vector<double>& ext =
          table == kLongRopeLongTable ? spec.long_factor : spec.short_factor;
      for (int i = 0; i < dim / 2; ++i) inv[i] /= ext[i];
      break;
    }
    default:
      break;
  }
  return inv;
}

float AttentionFactor(const RopeSpec& spec) { return static_cast<float>(AttentionFactor64(spec)); }

}  // namespace ropekv
