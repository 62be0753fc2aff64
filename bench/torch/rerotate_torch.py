#!/usr/bin/env python3
"""PyTorch re-rotation of the same tensors bench/rerotate_bench.cu moves, for comparison.

Shape: a 32K-token Llama-3-8B KV cache, 32 layers x 8 KV heads x 128 dims, bf16, RoPE theta
500000; keys rotated at positions 1000.. are moved to 37.. (NeoX rotate_half layout, HF's fp32
angles). Variants, each timed with CUDA events (median after warm-up):
  eager_unrotate_rotate  HF-style eager: un-rotate by the cos/sin of p, rotate by those of p'
                         (bf16 tensors, cos/sin cast to bf16 as LlamaRotaryEmbedding returns them)
  eager_delta            eager, one rotation by the fp32 angle difference, fp32 math, one rounding
  compiled_delta         torch.compile of eager_delta (fused)
  compiled_unrotate_rotate  torch.compile of eager_unrotate_rotate
  copy_k                 dst.copy_(src) of the keys (2 GiB)
  copy_kv                dst.copy_(src) of keys and values (4 GiB)
Each rotation writes a new key tensor (like the ropekv kernel's k_copy case). Bytes moved =
read + write of the keys. Needs only torch. Prints a table and one JSON line ("JSON {...}").

    python3 bench/torch/rerotate_torch.py [--tokens 32768] [--reps 20] [--no-compile]
"""
import argparse
import json
import sys

import torch


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def angles(inv_freq, pos):
    # HF: inv_freq (fp32) @ position_ids.float(), then cat(freqs, freqs)
    freqs = pos.float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs, freqs), dim=-1)  # [T, D] fp32


def eager_unrotate_rotate(k, cos_a, sin_a, cos_b, sin_b):
    # k: [L, H, T, D] bf16; cos/sin: [T, D] in k's dtype (as HF hands them to apply_rotary_pos_emb)
    unrot = k * cos_a - rotate_half(k) * sin_a
    return unrot * cos_b + rotate_half(unrot) * sin_b


def eager_delta(k, cos_d, sin_d):
    # cos_d/sin_d: [T, D] fp32 of (theta_b - theta_a); fp32 math, one rounding.
    kf = k.float()
    return (kf * cos_d + rotate_half(kf) * sin_d).to(k.dtype)


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    dev = "cuda"
    L, H, T, D = 32, 8, args.tokens, 128
    g = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(L, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(L, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    inv_freq = inv_freq.to(dev)
    pos_a = torch.arange(T, device=dev) + 1000
    pos_b = torch.arange(T, device=dev) + 37
    ang_a, ang_b = angles(inv_freq, pos_a), angles(inv_freq, pos_b)
    cos_a, sin_a = ang_a.cos().to(k.dtype), ang_a.sin().to(k.dtype)
    cos_b, sin_b = ang_b.cos().to(k.dtype), ang_b.sin().to(k.dtype)
    delta = ang_b.double() - ang_a.double()  # difference of the fp32 angles, exact
    cos_d, sin_d = delta.cos().float(), delta.sin().float()

    key_bytes = k.numel() * k.element_size()
    results = []

    def add(name, ms, moved):
        results.append(dict(case=name, ms=ms, bytes_moved=moved, gbps=moved / (ms * 1e6)))

    add("eager_unrotate_rotate",
        time_ms(lambda: eager_unrotate_rotate(k, cos_a, sin_a, cos_b, sin_b), args.reps),
        2 * key_bytes)
    add("eager_delta", time_ms(lambda: eager_delta(k, cos_d, sin_d), args.reps), 2 * key_bytes)
    if not args.no_compile:
        cd = torch.compile(eager_delta, fullgraph=True)
        add("compiled_delta", time_ms(lambda: cd(k, cos_d, sin_d), args.reps), 2 * key_bytes)
        cu = torch.compile(eager_unrotate_rotate, fullgraph=True)
        add("compiled_unrotate_rotate",
            time_ms(lambda: cu(k, cos_a, sin_a, cos_b, sin_b), args.reps), 2 * key_bytes)
    dst_k = torch.empty_like(k)
    dst_v = torch.empty_like(v)
    add("copy_k", time_ms(lambda: dst_k.copy_(k), args.reps), 2 * key_bytes)

    def copy_kv():
        dst_k.copy_(k)
        dst_v.copy_(v)

    add("copy_kv", time_ms(copy_kv, args.reps), 4 * key_bytes)

    # Accuracy of each variant against an fp64 rotation by the angle difference (sampled).
    sample = slice(0, 256)
    ref = (k[:, :, sample].double() * delta[sample].cos() +
           rotate_half(k[:, :, sample].double()) * delta[sample].sin())
    errs = {}
    for name, out in (("eager_unrotate_rotate",
                       eager_unrotate_rotate(k, cos_a, sin_a, cos_b, sin_b)[:, :, sample]),
                      ("eager_delta", eager_delta(k, cos_d, sin_d)[:, :, sample])):
        errs[name] = float((out.double() - ref).abs().max())

    copy_ms = next(r["ms"] for r in results if r["case"] == "copy_k")
    name = torch.cuda.get_device_name()
    print(f"rerotate_torch: {name}, torch {torch.__version__}; {L} layers x {H} KV heads x {D} "
          f"dims bf16, {T} tokens, keys {key_bytes / 2**30:.2f} GiB, median of {args.reps}")
    print(f"{'case':<26} {'ms':>10} {'GB/s':>10} {'vs copy_k':>10}")
    for r in results:
        print(f"{r['case']:<26} {r['ms']:>10.3f} {r['gbps']:>10.1f} {r['ms'] / copy_ms:>9.2f}x")
    print("max abs error vs fp64 (first 256 tokens):",
          ", ".join(f"{k_}={v_:.3g}" for k_, v_ in errs.items()))
    print("JSON " + json.dumps(dict(bench="rerotate_torch", device=name, torch=torch.__version__,
                                    tokens=T, cases=results, max_abs_err=errs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
