#!/usr/bin/env python3
"""Golden RoPE data made by Hugging Face transformers' own code, for
tests/unit/kernels/rope/rope_golden_test.cc.

For each config it builds transformers' LlamaRotaryEmbedding (its rope init function, its
dynamic_rope_update) on the CPU as model init does, moves it to the device (CUDA when available)
and rotates ONE random pre-RoPE key per head at every position of a list with
modeling_llama.apply_rotary_pos_emb, in fp32 and in bf16; GPT-J's interleaved layout goes through
modeling_gptj (create_sinusoidal_positions, apply_rotary_pos_emb with rotate_every_two). It
records inv_freq and attention_scaling as HF holds them after the forward pass. Values are stored
as IEEE bit patterns (uint32 for fp32, uint16 for bf16) so the C++ side reads them exactly.

Needs only torch + transformers. Run on the GPU host:
    python3 bench/torch/make_hf_rope_golden.py --out tests/data/rope/hf_rope_golden.json
then commit the file. The C++ test skips itself while the file is absent.
"""
import argparse
import json
import math
import struct
import sys

import torch
import transformers
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama

POSITIONS = [0, 1, 255, 256, 257, 8191, 8192, 32767, 131071, 1048575]
HEADS = 2
HEAD_DIM = 64

# (name, rope_theta, max_position_embeddings, rope_scaling or None)
LLAMA_CASES = [
    ("default", 10000.0, 4096, None),
    ("llama3", 500000.0, 131072,
     dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192)),
    # max / original == factor, so transformers 4.x (which derives the factor from them) and 5.x
    # agree.
    ("yarn", 1000000.0, 131072,
     dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)),
    ("yarn_mscale", 10000.0, 163840,
     dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, mscale=1.0,
          mscale_all_dim=0.5, beta_fast=32.0, beta_slow=1.0)),
    # The batch's largest position grows the table: seq_len 1048576 > 4096.
    ("dynamic", 10000.0, 4096, dict(rope_type="dynamic", factor=2.0)),
    # Positions beyond original_max_position_embeddings select the long factors.
    ("longrope", 10000.0, 131072,
     dict(rope_type="longrope", original_max_position_embeddings=4096,
          short_factor=[1.0 + 0.03 * i for i in range(HEAD_DIM // 2)],
          long_factor=[1.0 + 1.7 * i for i in range(HEAD_DIM // 2)])),
]


def f32_bits(t):
    return [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in t.flatten().tolist()]


def bf16_bits(t):
    return t.contiguous().view(torch.int16).flatten().to(torch.int32).bitwise_and(0xFFFF).tolist()


def make_config(theta, max_pos, scaling):
    kwargs = dict(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                  num_key_value_heads=HEADS, head_dim=HEAD_DIM, intermediate_size=256,
                  num_hidden_layers=1, vocab_size=256, max_position_embeddings=max_pos)
    major = int(transformers.__version__.split(".")[0])
    if major >= 5:
        params = dict(scaling or {"rope_type": "default"})
        params["rope_theta"] = theta
        kwargs["rope_parameters"] = params
    else:
        kwargs["rope_theta"] = theta
        kwargs["rope_scaling"] = dict(scaling) if scaling else None
    if scaling and scaling.get("rope_type") == "longrope":
        # Phi-3 style: original_max_position_embeddings at the top level of the config too.
        kwargs["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return LlamaConfig(**kwargs)


def llama_case(name, theta, max_pos, scaling, device, gen):
    config = make_config(theta, max_pos, scaling)
    rotary = modeling_llama.LlamaRotaryEmbedding(config=config)  # tables built on the CPU
    rotary = rotary.to(device)
    pre = torch.randn(HEADS, HEAD_DIM, generator=gen, dtype=torch.float32)
    s = len(POSITIONS)
    k32 = pre[None, :, None, :].expand(1, HEADS, s, HEAD_DIM).contiguous().to(device)
    pos = torch.tensor([POSITIONS], dtype=torch.int64, device=device)
    out = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        k = k32.to(dtype)
        cos, sin = rotary(k, pos)
        _, k_embed = modeling_llama.apply_rotary_pos_emb(k, k, cos, sin)
        bits = f32_bits if dtype == torch.float32 else bf16_bits
        out["k_" + tag + "_bits"] = bits(k[0, :, 0, :].cpu())  # [heads][head_dim]
        out["k_embed_" + tag + "_bits"] = bits(k_embed[0].cpu())  # [heads][positions][head_dim]
    inv = rotary.inv_freq.detach().float().cpu()
    sc = dict(scaling or {})
    rope_type = sc.get("rope_type", "default")
    seq_len = max(POSITIONS) + 1
    table = 0
    if rope_type == "dynamic" and seq_len > max_pos:
        table = seq_len
    if rope_type == "longrope" and seq_len > sc["original_max_position_embeddings"]:
        table = 1
    case = dict(name=name, rope_type=rope_type, layout="neox", rope_theta=theta,
                head_dim=HEAD_DIM, rotary_dim=HEAD_DIM, heads=HEADS,
                max_position_embeddings=max_pos, table_id=table,
                attention_scaling=float(rotary.attention_scaling), positions=POSITIONS,
                inv_freq_bits=f32_bits(inv))
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "short_factor",
                "long_factor"):
        if key in sc:
            case[key] = sc[key]
    case.update(out)
    return case


def gptj_case(device, gen):
    from transformers.models.gptj import modeling_gptj
    rotary_dim = 32
    positions = [p for p in POSITIONS if p <= 131071]
    embed = modeling_gptj.create_sinusoidal_positions(max(positions) + 1, rotary_dim).to(device)
    pre = torch.randn(HEADS, HEAD_DIM, generator=gen, dtype=torch.float32)
    s = len(positions)
    pos = torch.tensor([positions], dtype=torch.int64, device=device)
    out = {}
    for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        # GPTJAttention layout: [batch, seq, heads, head_dim]
        k = pre[None, None, :, :].expand(1, s, HEADS, HEAD_DIM).contiguous().to(device).to(dtype)
        sincos = embed[pos]
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        k_rot = modeling_gptj.apply_rotary_pos_emb(k[:, :, :, :rotary_dim], sin, cos)
        # HF's GPT-J multiplies by its fp32 sin/cos table (promoting bf16 to fp32); round once.
        k_embed = torch.cat([k_rot.to(dtype), k[:, :, :, rotary_dim:]], dim=-1)
        bits = f32_bits if dtype == torch.float32 else bf16_bits
        out["k_" + tag + "_bits"] = bits(k[0, 0].cpu())
        out["k_embed_" + tag + "_bits"] = bits(k_embed[0].transpose(0, 1).cpu())
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64) / rotary_dim))
    case = dict(name="gptj", rope_type="default", layout="gptj", rope_theta=10000.0,
                head_dim=HEAD_DIM, rotary_dim=rotary_dim, heads=HEADS, table_id=0,
                max_position_embeddings=0, attention_scaling=1.0, positions=positions,
                inv_freq_bits=f32_bits(inv.float()))
    case.update(out)
    return case


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/data/rope/hf_rope_golden.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(1234)
    cases, errors = [], []
    for name, theta, max_pos, scaling in LLAMA_CASES:
        try:
            cases.append(llama_case(name, theta, max_pos, scaling, args.device, gen))
        except Exception as e:  # keep the other cases when one API differs in this version
            errors.append(f"{name}: {type(e).__name__}: {e}")
    try:
        cases.append(gptj_case(args.device, gen))
    except Exception as e:
        errors.append(f"gptj: {type(e).__name__}: {e}")
    doc = dict(format="ropekv-hf-rope-golden-v1", transformers=transformers.__version__,
               torch=torch.__version__, device=args.device,
               device_name=(torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
               errors=errors, cases=cases)
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    print(f"wrote {args.out}: {len(cases)} cases ({', '.join(c['name'] for c in cases)}), "
          f"transformers {transformers.__version__}, torch {torch.__version__}, {args.device}")
    for e in errors:
        print("ERROR", e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
