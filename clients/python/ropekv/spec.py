"""Model specs: a ModelSpec proto from a dict, keyword arguments or a Hugging Face config.

A spec dict (every key optional except the first five; zero / absent = the daemon's default):

    {"layers": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bf16", "block_tokens": 16,
     "rope": {"type": "llama3", "theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
              "rotary_dim": 0, "layout": "neox"}}

dtype: "bf16" | "f16" | "f32" (also "bfloat16", "float16", "fp16", "float32", "fp32", a numpy or
torch dtype, or the proto enum value). rope.type: "default" | "linear" | "dynamic" | "llama3" |
"yarn" | "longrope". rope.layout: "neox" (rotate_half) | "gptj" (interleaved).
"""

from ropekv._pb import pb
from ropekv.errors import invalid

_DTYPES = {
    "bf16": pb.DTYPE_BF16,
    "bfloat16": pb.DTYPE_BF16,
    "f16": pb.DTYPE_F16,
    "fp16": pb.DTYPE_F16,
    "float16": pb.DTYPE_F16,
    "half": pb.DTYPE_F16,
    "f32": pb.DTYPE_F32,
    "fp32": pb.DTYPE_F32,
    "float32": pb.DTYPE_F32,
    "float": pb.DTYPE_F32,
}
_ROPE_TYPES = {
    "default": pb.ROPE_TYPE_DEFAULT,
    "linear": pb.ROPE_TYPE_LINEAR,
    "dynamic": pb.ROPE_TYPE_DYNAMIC,
    "llama3": pb.ROPE_TYPE_LLAMA3,
    "yarn": pb.ROPE_TYPE_YARN,
    "longrope": pb.ROPE_TYPE_LONGROPE,
}
_LAYOUTS = {"neox": pb.PAIR_LAYOUT_NEOX, "gptj": pb.PAIR_LAYOUT_GPTJ}
_MODEL_KEYS = ("layers", "kv_heads", "head_dim", "dtype", "block_tokens", "rope")
_ROPE_SCALARS = (
    "theta",
    "rotary_dim",
    "factor",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
)
_ROPE_ALIASES = {"rope_theta": "theta", "rope_type": "type"}


def dtype_enum(dtype):
    """The proto DType of a name, numpy dtype, torch dtype or enum value; INVALID_ARGUMENT else."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype in (pb.DTYPE_F32, pb.DTYPE_F16, pb.DTYPE_BF16):
            return dtype
        raise invalid(f"dtype enum must be DTYPE_F32, DTYPE_F16 or DTYPE_BF16, got {dtype}")
    name = str(dtype).lower()
    for prefix in ("torch.", "<class 'numpy.", "dtype_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.rstrip("'>")
    if name not in _DTYPES:
        raise invalid(f"dtype must be one of bf16, f16, f32, got {dtype!r}")
    return _DTYPES[name]


def _rope_spec(rope):
    if isinstance(rope, pb.RopeSpec):
        return rope
    if not isinstance(rope, dict):
        raise invalid(f"rope must be a dict or a RopeSpec, got {type(rope).__name__}")
    r = pb.RopeSpec()
    for key, value in rope.items():
        key = _ROPE_ALIASES.get(key, key)
        if value is None:
            continue
        if key == "type":
            if isinstance(value, str):
                if value.lower() not in _ROPE_TYPES:
                    raise invalid(
                        f"rope.type must be one of {sorted(_ROPE_TYPES)}, got {value!r}")
                value = _ROPE_TYPES[value.lower()]
            r.type = value
        elif key == "layout":
            if isinstance(value, str):
                if value.lower() not in _LAYOUTS:
                    raise invalid(f"rope.layout must be neox or gptj, got {value!r}")
                value = _LAYOUTS[value.lower()]
            r.layout = value
        elif key == "truncate":
            r.truncate = bool(value)
        elif key in ("short_factor", "long_factor"):
            getattr(r, key).extend(float(f) for f in value)
        elif key in _ROPE_SCALARS:
            field = r.DESCRIPTOR.fields_by_name[key]
            setattr(r, key, float(value) if field.cpp_type == field.CPPTYPE_DOUBLE else int(value))
        else:
            raise invalid(f"unknown rope key {key!r}; known: type, layout, truncate, "
                          f"short_factor, long_factor, {', '.join(_ROPE_SCALARS)}")
    return r


def model_spec(spec=None, **kwargs):
    """A ModelSpec proto from a ModelSpec, a dict, or keyword arguments (merged over the dict).

    Raises ropekv.Error(INVALID_ARGUMENT) for unknown keys or names; range checks are the
    daemon's (RegisterModel answers INVALID_ARGUMENT naming the field)."""
    if isinstance(spec, pb.ModelSpec):
        if kwargs:
            raise invalid("pass either a ModelSpec proto or keyword arguments, not both")
        return spec
    fields = dict(spec or {})
    fields.update(kwargs)
    out = pb.ModelSpec()
    for key, value in fields.items():
        if key not in _MODEL_KEYS:
            raise invalid(f"unknown model spec key {key!r}; known: {', '.join(_MODEL_KEYS)}")
        if key == "dtype":
            out.dtype = dtype_enum(value)
        elif key == "rope":
            out.rope.CopyFrom(_rope_spec(value))
        else:
            if int(value) < 0:
                raise invalid(f"model spec: {key} must be >= 0, got {value}")
            setattr(out, key, int(value))
    return out


def _get(obj, name, default=None):
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def spec_from_hf_config(config, block_tokens=16, dtype=None):
    """The spec dict of a Hugging Face transformers config (LlamaConfig and friends).

    Reads num_hidden_layers, num_key_value_heads, head_dim (or hidden_size / num_attention_heads),
    partial_rotary_factor, rope_theta + rope_scaling (transformers 4.x) or rope_parameters (5.x),
    max_position_embeddings. dtype: as for model_spec; default: the config's torch_dtype / dtype,
    else bf16. Keys are post-RoPE with the NeoX (rotate_half) layout, as HF's Llama caches them.
    """
    heads = _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim") or (_get(config, "hidden_size") // heads)
    kv_heads = _get(config, "num_key_value_heads") or heads
    params = dict(_get(config, "rope_parameters") or {})
    scaling = _get(config, "rope_scaling") or {}
    if not params:
        params = dict(scaling)
    theta = params.get("rope_theta", _get(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    rope = {"type": rope_type, "theta": theta}
    prf = params.get("partial_rotary_factor", _get(config, "partial_rotary_factor"))
    if prf is not None and prf != 1.0:
        rope["rotary_dim"] = int(head_dim * prf)
    mpe = _get(config, "max_position_embeddings")
    if mpe:
        rope["max_position_embeddings"] = mpe
    for key in ("factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "truncate", "attention_factor", "short_factor", "long_factor"):
        if params.get(key) is not None:
            rope[key] = params[key]
    if dtype is None:
        dtype = _get(config, "torch_dtype") or _get(config, "dtype") or "bf16"
    return {
        "layers": _get(config, "num_hidden_layers"),
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "dtype": dtype_enum(dtype),
        "block_tokens": block_tokens,
        "rope": rope,
    }
