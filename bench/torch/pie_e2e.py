#!/usr/bin/env python3
"""Time to the next token after a one-line edit in a 32K-token file, end to end in transformers:
re-encoding the edited file vs PIE (what ropekv's sessions do), on one GPU. Self-contained: torch
and transformers only (no ropekv library); the PIE steps are done with torch ops on the GPU, the
way a frontend would apply what a ropekv session hands it.

Model: LlamaForCausalLM with random weights, bf16, Llama-3-8B shape (hidden 4096, 32 heads, 8 KV
heads, head_dim 128, MLP 14336, vocab 128256, llama3 RoPE theta 500000); --layers to use fewer
layers if memory needs it. The file: --tokens random tokens, prefilled once (untimed). The edit:
replace 10 tokens at --at by 16 new ones (a rewritten line, Δ = +6).

  reencode  forward of the whole edited file (no cache) -> logits of its last token -> next token
  pie       1. keys of the suffix re-rotated by Δ from their cached copy in ONE rotation (fp32
               angle difference of HF's own fp32 angles, fp32 math, one rounding), values as they
               are (torch ops; --compile: the same function under torch.compile)
            2. the 16 new tokens encoded over the cached prefix (positions at..at+15)
            3. the cache assembled: prefix | new tokens | shifted suffix
            4. one decode step: the file's last token over the cache of the others -> next token
Each is timed end to end (torch.cuda.synchronize, median of --reps after warm-up); a separate
instrumented run gives the breakdown. Also reported: layer-0 keys of the PIE cache vs the
re-encode's (they must agree to bf16 rounding: layer 0 does not depend on the context), and
whether both paths predict the same next token (PIE is an approximation in deeper layers).

Prints a table and one JSON line ("JSON {...}").

    python3 bench/torch/pie_e2e.py [--tokens 32768] [--layers 32] [--at N] [--reps 5]
                                   [--no-compile]
"""
import argparse
import json
import sys
import time

import torch


ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
THETA = 500000.0


def build_model(layers, device, tiny=False):
    import inspect

    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
    )
    if tiny:  # a smoke test of the script itself (head_dim stays 128)
        kwargs.update(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                      num_attention_heads=4, num_key_value_heads=2)
    # transformers v5 names RoPE "rope_parameters" (theta inside); v4 "rope_theta" + "rope_scaling".
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kwargs["rope_parameters"] = dict(ROPE, rope_theta=THETA)
    else:
        kwargs.update(rope_theta=THETA, rope_scaling=dict(ROPE))
    try:
        config = LlamaConfig(attn_implementation="sdpa", **kwargs)
    except TypeError:
        config = LlamaConfig(**kwargs)
    config._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    return model, config


def llama3_inv_freq(head_dim=128):
    """Closed form of HF's llama3 frequencies (fp64), to check the model's own table."""
    import math

    inv = [1.0 / THETA ** (2 * i / head_dim) for i in range(head_dim // 2)]
    lo = ROPE["original_max_position_embeddings"] / ROPE["low_freq_factor"]
    hi = ROPE["original_max_position_embeddings"] / ROPE["high_freq_factor"]
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl > lo:
            out.append(f / ROPE["factor"])
        elif wl < hi:
            out.append(f)
        else:
            s = (ROPE["original_max_position_embeddings"] / wl - ROPE["low_freq_factor"]) / (
                ROPE["high_freq_factor"] - ROPE["low_freq_factor"])
            out.append((1 - s) * f / ROPE["factor"] + s * f)
    return torch.tensor(out, dtype=torch.float64)


def inv_freq_of(model, config, device):
    rot = getattr(model.model, "rotary_emb", None)
    if rot is not None and hasattr(rot, "inv_freq"):
        inv = rot.inv_freq.to(device=device, dtype=torch.float32)
    else:
        inv = llama3_inv_freq().float().to(device)
    want = llama3_inv_freq().to(device)
    err = float(((inv.double() - want).abs() / want).max())
    if err > 1e-5:
        print(f"pie_e2e: WARNING: the model's RoPE table is not llama3 (rel diff {err:.2e})",
              file=sys.stderr)
    return inv


def layer_kv(cache, layer):
    """(keys, values) of one layer of a transformers Cache, across versions."""
    if hasattr(cache, "layers"):
        entry = cache.layers[layer]
        return entry.keys, entry.values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    return cache[layer]


def cache_kw(model):
    """The name forward() takes a Cache under: "cache" from transformers 5.2x, else
    "past_key_values"."""
    import inspect

    params = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


def make_cache(kvs):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(kvs):
        cache.update(k, v, layer)
    return cache


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rerotate(k, cos_d, sin_d):
    # k: [B, H, T, D] bf16 rotated at p; cos_d/sin_d: [T, D] fp32 of angle(p + Δ) - angle(p).
    kf = k.float()
    return (kf * cos_d + rotate_half(kf) * sin_d).to(k.dtype)


def delta_cos_sin(inv_freq, old_pos, delta):
    # HF's fp32 angles: fl32(fl32(p) * inv_freq); the move is their difference (DESIGN.md rule 3).
    a_old = old_pos.float()[:, None] * inv_freq[None, :]
    a_new = (old_pos + delta).float()[:, None] * inv_freq[None, :]
    d = (a_new.double() - a_old.double())
    d = torch.cat((d, d), dim=-1)
    return d.cos().float(), d.sin().float()


@torch.no_grad()
def next_token_reencode(model, tokens):
    out = model.model(input_ids=tokens[None], use_cache=False)
    logits = model.lm_head(out.last_hidden_state[:, -1])
    return logits.float(), int(logits.argmax(-1))


@torch.no_grad()
def next_token_pie(model, cached, new_tokens, at, n_old, inv_freq, rot_fn, edited, timings=None):
    """cached: per layer (k, v) [1, H, n_old, D] of the original file (untouched)."""
    dev = new_tokens.device
    n_new = new_tokens.numel()
    removed = 10
    delta = n_new - removed
    sync = synchronize if timings is not None else (lambda: None)
    t0 = time.perf_counter()
    # 1. Shift the suffix: one rotation per key from its cached copy; values unchanged.
    old_pos = torch.arange(at + removed, n_old, device=dev)
    cos_d, sin_d = delta_cos_sin(inv_freq, old_pos, delta)
    suffix = [(rot_fn(k[:, :, at + removed:], cos_d, sin_d), v[:, :, at + removed:])
              for k, v in cached]
    sync()
    t1 = time.perf_counter()
    # 2. Encode the new tokens over the cached prefix.
    prefix = make_cache([(k[:, :, :at], v[:, :, :at]) for k, v in cached])
    pos = torch.arange(at, at + n_new, device=dev)
    out = model.model(input_ids=new_tokens[None], position_ids=pos[None],
                      use_cache=True, **{cache_kw(model): prefix})
    pkv = out_cache(out)
    sync()
    t2 = time.perf_counter()
    # 3. Assemble prefix | new | shifted suffix; the last token's KV is left out (step 4 makes it).
    n = n_old + delta
    full = []
    for layer in range(len(cached)):
        k_pn, v_pn = layer_kv(pkv, layer)
        k_s, v_s = suffix[layer]
        full.append((torch.cat((k_pn, k_s[:, :, :-1]), dim=2),
                     torch.cat((v_pn, v_s[:, :, :-1]), dim=2)))
    sync()
    t3 = time.perf_counter()
    # 4. One decode step: the last token of the edited file at position n - 1.
    cache = make_cache(full)
    out = model.model(input_ids=edited[None, -1:], position_ids=torch.tensor([[n - 1]], device=dev),
                      use_cache=True, **{cache_kw(model): cache})
    logits = model.lm_head(out.last_hidden_state[:, -1])
    nxt = int(logits.argmax(-1))
    sync()
    t4 = time.perf_counter()
    if timings is not None:
        timings.update(rotate_ms=1e3 * (t1 - t0), encode_new_ms=1e3 * (t2 - t1),
                       assemble_ms=1e3 * (t3 - t2), decode_ms=1e3 * (t4 - t3))
    return logits.float(), nxt, full


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize()
        ts.append(1e3 * (time.perf_counter() - t0))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--at", type=int, default=-1, help="edit position (default: tokens // 2)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model: smoke test of the script")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("pie_e2e: needs a CUDA GPU (or --device cpu --tiny for a smoke test)",
              file=sys.stderr)
        return 1
    dev = torch.device(args.device)
    torch.manual_seed(0)
    import transformers

    model, config = build_model(args.layers, dev, args.tiny)
    inv_freq = inv_freq_of(model, config, dev)
    n_old = args.tokens
    at = args.at if args.at >= 0 else n_old // 2
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (n_old,), generator=g).to(dev)
    new_tokens = torch.randint(0, config.vocab_size, (16,), generator=g).to(dev)
    edited = torch.cat((tokens[:at], new_tokens, tokens[at + 10:]))
    n = edited.numel()

    # The original file, prefilled once (what the session holds).
    with torch.no_grad():
        out = model.model(input_ids=tokens[None], use_cache=True)
    cached = [tuple(t.contiguous() for t in layer_kv(out_cache(out), l))
              for l in range(args.layers)]
    del out
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # Correctness/agreement (untimed): layer-0 keys vs a re-encode, and the predicted token.
    with torch.no_grad():
        ref = model.model(input_ids=edited[None], use_cache=True)
        ref_logits = model.lm_head(ref.last_hidden_state[:, -1]).float()
        ref_k0 = layer_kv(out_cache(ref), 0)[0][:, :, : n - 1].float()
    del ref
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    pie_logits, pie_next, full = next_token_pie(model, cached, new_tokens, at, n_old, inv_freq,
                                                rerotate, edited)
    k0 = full[0][0].float()
    key_err = float(((k0 - ref_k0).abs().max() / ref_k0.abs().max()).item())
    shifted = slice(at + 16, n - 1)
    suffix_key_err = float(((k0[:, :, shifted] - ref_k0[:, :, shifted]).abs().max() /
                            ref_k0[:, :, shifted].abs().max()).item())
    # Without re-rotation (a cache that does not understand RoPE): the suffix keys as cached.
    naive_k0 = torch.cat((k0[:, :, : at + 16], cached[0][0][:, :, at + 10: n_old - 1].float()),
                         dim=2)
    naive_err = float(((naive_k0[:, :, shifted] - ref_k0[:, :, shifted]).abs().max() /
                       ref_k0[:, :, shifted].abs().max()).item())
    cos = float(torch.nn.functional.cosine_similarity(pie_logits, ref_logits).item())
    same_next = pie_next == int(ref_logits.argmax(-1))
    del full, k0, ref_k0, naive_k0
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    reencode_ms = median_ms(lambda: next_token_reencode(model, edited), max(3, args.reps // 2))
    pie_ms = median_ms(lambda: next_token_pie(model, cached, new_tokens, at, n_old, inv_freq,
                                              rerotate, edited), args.reps)
    breakdown = {}
    next_token_pie(model, cached, new_tokens, at, n_old, inv_freq, rerotate, edited, breakdown)
    compiled_ms = None
    compiled_breakdown = {}
    if not args.no_compile:
        try:
            rot_c = torch.compile(rerotate, dynamic=False)
            compiled_ms = median_ms(lambda: next_token_pie(model, cached, new_tokens, at, n_old,
                                                           inv_freq, rot_c, edited),
                                    args.reps, warmup=2)
            next_token_pie(model, cached, new_tokens, at, n_old, inv_freq, rot_c, edited,
                           compiled_breakdown)
        except Exception as e:  # torch.compile is optional (no triton, old torch)
            print(f"pie_e2e: torch.compile unavailable: {e}", file=sys.stderr)

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"pie_e2e: {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"LlamaForCausalLM random bf16, {args.layers} layers "
          f"({'tiny smoke-test shape' if args.tiny else 'Llama-3-8B shape'}); file "
          f"{n_old} tokens, replace 10 tokens at {at} by 16; median of {args.reps}")
    print(f"{'path':<22} {'ms':>10} {'speedup':>9}   breakdown (ms)")
    print(f"{'re-encode':<22} {reencode_ms:10.1f} {1.0:8.1f}x")
    fmt = lambda b: "  ".join(f"{k[:-3]} {v:.1f}" for k, v in b.items())
    print(f"{'pie (eager rotate)':<22} {pie_ms:10.1f} {reencode_ms / pie_ms:8.1f}x   "
          f"{fmt(breakdown)}")
    if compiled_ms is not None:
        print(f"{'pie (compiled rotate)':<22} {compiled_ms:10.1f} "
              f"{reencode_ms / compiled_ms:8.1f}x   {fmt(compiled_breakdown)}")
    print(f"layer-0 keys vs re-encode: max rel err {key_err:.2e} (shifted suffix "
          f"{suffix_key_err:.2e}; without re-rotation {naive_err:.2e}); next-token logits cosine "
          f"{cos:.4f}, same next token: {same_next}")
    best = min(x for x in (pie_ms, compiled_ms) if x is not None)
    result = {
        "bench": "pie_e2e", "device": name, "torch": torch.__version__,
        "transformers": transformers.__version__, "layers": args.layers, "tiny": args.tiny,
        "tokens": n_old,
        "edit_at": at, "removed": 10, "inserted": 16, "reencode_ms": reencode_ms,
        "pie_ms": pie_ms, "pie_compiled_ms": compiled_ms, "speedup": reencode_ms / pie_ms,
        "speedup_best": reencode_ms / best, "target_speedup": 15.0,
        "breakdown_ms": breakdown, "breakdown_compiled_ms": compiled_breakdown,
        "layer0_key_rel_err": key_err, "layer0_suffix_key_rel_err": suffix_key_err,
        "layer0_suffix_key_rel_err_without_rerotation": naive_err,
        "next_token_logits_cosine": cos, "same_next_token": same_next,
    }
    print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
