#!/usr/bin/env python3
"""Time to first token for a prompt of a cached system module and parallel retrieved contexts,
end to end in transformers: full prefill vs composing the prompt from cached KV (what ropekv's
Modules service hands a frontend: a Prompt Cache module at its schema positions, APE contexts at
shared positions) and prefilling only the question. One GPU, one run. Self-contained: torch and
transformers only (no ropekv library, no daemon); the cached KV sits on the GPU as a GPU tier (or
a CUDA IPC buffer) would hand it over.

Model: LlamaForCausalLM with random weights, bf16, Llama-3-8B shape (hidden 4096, 32 heads, 8 KV
heads, head_dim 128, MLP 14336, vocab 128256, llama3 RoPE theta 500000); --layers to use fewer
layers if memory needs it (the table says how many ran).

Prompt (random tokens): a --system-token system module S, --contexts retrieved contexts C_j of
--context-tokens each, a --question-token question Q. Positions in the composed prompt (APE):
S at 0..|S|-1, every C_j at |S|..|S|+|C|-1 (shared), Q at |S|+max|C_j|.. .

  full        forward of S C_1 .. C_8 Q (positions 0..N-1, no cache) -> logits of the last token
  composed    the cache assembled from precomputed KV (S encoded alone; each C_j encoded after S,
              at |S|..), then Q prefilled over it at its APE positions -> logits of the last token.
              Attention is plain softmax over all keys (SDPA): APE with T = S = 1.
  composed+APE  the same with APE's merge in every layer (--temperature T, --scale S): the context
              group attended with scale 1/(sqrt(d) T), the prefix and question with 1/sqrt(d),
              merged with softmax([S T lse_c, lse_o]) in fp32 (torch ops, a registered
              transformers attention function).
  composed, moved contexts  each C_j was encoded after a 1K-token prefix (keys at 1024..) and is
              moved to |S|.. by ONE re-rotation from its cached copy (fp32 angle difference of HF's
              own fp32 angles, one rounding; torch ops) before the question is prefilled: ropekv's
              re-rotation of contexts encoded after a prefix of another length.

Each path is timed end to end (torch.cuda.synchronize, median of --reps after warm-up); a separate
instrumented run gives the breakdown. Also printed: first-token logits cosine of each path vs the
full prefill (random weights: APE's contexts attend to S only, so they differ by design; this is
no quality measurement), the APE merge at T = S = 1 vs SDPA (must agree to bf16 rounding), and
layer-0 keys of the moved contexts vs keys encoded at |S|.. (bf16 rounding).

Prints a table and one JSON line ("JSON {...}").

    python3 bench/torch/ttft_modules_ape.py [--layers 32] [--reps 5] [--temperature 0.8]
                                            [--scale 1.0] [--device cuda] [--tiny]
"""
import argparse
import inspect
import json
import math
import sys
import time

import torch

ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
THETA = 500000.0


def build_model(layers, device, tiny=False):
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
    """Closed form of HF's llama3 frequencies (fp64)."""
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


def inv_freq_of(model, device):
    rot = getattr(model.model, "rotary_emb", None)
    if rot is not None and hasattr(rot, "inv_freq"):
        inv = rot.inv_freq.to(device=device, dtype=torch.float32)
    else:
        inv = llama3_inv_freq().float().to(device)
    want = llama3_inv_freq().to(device)
    err = float(((inv.double() - want).abs() / want).max())
    if err > 1e-5:
        print(f"ttft_modules_ape: WARNING: the model's RoPE table is not llama3 (rel diff "
              f"{err:.2e})", file=sys.stderr)
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


def delta_cos_sin(inv_freq, old_pos, delta):
    # HF's fp32 angles: fl32(fl32(p) * inv_freq); the move is their difference (DESIGN.md rule 3).
    a_old = old_pos.float()[:, None] * inv_freq[None, :]
    a_new = (old_pos + delta).float()[:, None] * inv_freq[None, :]
    d = a_new.double() - a_old.double()
    d = torch.cat((d, d), dim=-1)
    return d.cos().float(), d.sin().float()


def rerotate(k, cos_d, sin_d):
    # k: [B, H, T, D] bf16 rotated at p; cos_d / sin_d: [T, D] fp32. One rotation, one rounding.
    kf = k.float()
    return (kf * cos_d + rotate_half(kf) * sin_d).to(k.dtype)


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


# ---------------------------------------------------------------------------------------------
# APE attention as a transformers attention function.

APE = {"prefix": 0, "context": 0, "temperature": 1.0, "scale": 1.0}


def ape_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                  **kwargs):
    """query [B, Hq, n, D]; key / value [B, Hkv, L, D] in cache order: prefix (APE["prefix"]
    tokens), the context group (APE["context"] tokens), then the question tokens (the last n are
    the queries' own; causal among them). Returns ([B, n, Hq, D], None) like HF's sdpa."""
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    p, c = APE["prefix"], APE["context"]
    t, s = APE["temperature"], APE["scale"]
    sc = scaling if scaling is not None else d ** -0.5
    q = query.reshape(b, hkv, g * n, d).float()  # row r: query head (kv head, r // n), token r % n
    kc, vc = key[:, :, p:p + c].float(), value[:, :, p:p + c].float()
    ko = torch.cat((key[:, :, :p], key[:, :, p + c:]), dim=2).float()
    vo = torch.cat((value[:, :, :p], value[:, :, p + c:]), dim=2).float()
    s_c = (q @ kc.transpose(-1, -2)) * (sc / t)
    lse_c = torch.logsumexp(s_c, dim=-1, keepdim=True)
    o_c = torch.softmax(s_c, dim=-1) @ vc
    s_o = (q @ ko.transpose(-1, -2)) * sc
    m = ko.shape[2] - p  # question tokens in the cache (earlier ones and the n current)
    tok = torch.arange(n, device=q.device).repeat(g)[:, None]
    j = torch.arange(ko.shape[2], device=q.device)[None, :]
    visible = (j < p) | ((j - p) <= (m - n + tok))
    s_o = s_o.masked_fill(~visible, float("-inf"))
    lse_o = torch.logsumexp(s_o, dim=-1, keepdim=True)
    o_o = torch.softmax(s_o, dim=-1) @ vo
    w = torch.softmax(torch.cat((s * t * lse_c, lse_o), dim=-1), dim=-1)
    out = w[..., :1] * o_c + w[..., 1:] * o_o  # [B, Hkv, g * n, D]
    out = out.reshape(b, hq, n, d).transpose(1, 2).to(query.dtype).contiguous()
    return out, None


def register_ape():
    try:
        from transformers import AttentionInterface
    except ImportError:
        from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register("ropekv_ape", ape_attention)


def set_attention(model, name):
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(name)
            return
        except Exception:  # older versions validate names against their own list
            pass
    model.config._attn_implementation = name


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def first_token_full(model, tokens):
    out = model.model(input_ids=tokens[None], use_cache=False)
    logits = model.lm_head(out.last_hidden_state[:, -1])
    return logits.float(), int(logits.argmax(-1))


@torch.no_grad()
def first_token_composed(model, system_kv, context_kv, question, q_pos, moves=None,
                         timings=None):
    """system_kv / context_kv[j]: per layer (k, v) [1, H, T, D] cached on the GPU. moves: per
    context (cos, sin) of its re-rotation, or None."""
    sync = synchronize if timings is not None else (lambda: None)
    t0 = time.perf_counter()
    if moves is not None:
        context_kv = [[(rerotate(k, *moves[j]), v) for k, v in ctx]
                      for j, ctx in enumerate(context_kv)]
    sync()
    t1 = time.perf_counter()
    kvs = []
    for layer in range(len(system_kv)):
        ks = [system_kv[layer][0]] + [ctx[layer][0] for ctx in context_kv]
        vs = [system_kv[layer][1]] + [ctx[layer][1] for ctx in context_kv]
        kvs.append((torch.cat(ks, dim=2), torch.cat(vs, dim=2)))
    cache = make_cache(kvs)
    sync()
    t2 = time.perf_counter()
    out = model.model(input_ids=question[None], position_ids=q_pos[None], use_cache=True,
                      **{cache_kw(model): cache})
    logits = model.lm_head(out.last_hidden_state[:, -1])
    nxt = int(logits.argmax(-1))
    sync()
    t3 = time.perf_counter()
    if timings is not None:
        if moves is not None:
            timings["rerotate_ms"] = 1e3 * (t1 - t0)
        timings.update(assemble_ms=1e3 * (t2 - t1), prefill_question_ms=1e3 * (t3 - t2))
    return logits.float(), nxt


@torch.no_grad()
def encode(model, tokens, positions, prefix_kv=None):
    """KV of `tokens` at `positions` after prefix_kv (per layer (k, v)), per layer (k, v)."""
    kw = {}
    if prefix_kv is not None:
        kw[cache_kw(model)] = make_cache([(k.clone(), v.clone()) for k, v in prefix_kv])
    out = model.model(input_ids=tokens[None], position_ids=positions[None], use_cache=True, **kw)
    cache = out_cache(out)
    n = tokens.numel()
    return [tuple(t[:, :, -n:].contiguous() for t in layer_kv(cache, l))
            for l in range(len(model.model.layers))]


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b).item())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--system-tokens", type=int, default=2048)
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--moved-from", type=int, default=1024,
                    help="prefix length the moved contexts were encoded after")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model: smoke test of the script")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ttft_modules_ape: needs a CUDA GPU (or --device cpu --tiny for a smoke test)",
              file=sys.stderr)
        return 1
    if args.moved_from > args.system_tokens:
        print("ttft_modules_ape: --moved-from must be <= --system-tokens", file=sys.stderr)
        return 1
    dev = torch.device(args.device)
    torch.manual_seed(0)
    import transformers

    model, config = build_model(args.layers, dev, args.tiny)
    inv_freq = inv_freq_of(model, dev)
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda n: torch.randint(0, config.vocab_size, (n,), generator=g).to(dev)
    P, C, nq = args.system_tokens, args.context_tokens, args.question_tokens
    system = rand(P)
    contexts = [rand(C) for _ in range(args.contexts)]
    question = rand(nq)
    full_prompt = torch.cat([system] + contexts + [question])
    n_full = full_prompt.numel()
    q_pos = torch.arange(P + C, P + C + nq, device=dev)  # |S| + max |C_j|

    # The cache (untimed): S alone at 0..; each C_j after S at |S|..; and each C_j after the first
    # --moved-from tokens of S at moved_from.. (to be moved to |S|..).
    system_kv = encode(model, system, torch.arange(P, device=dev))
    context_kv = [encode(model, c, torch.arange(P, P + C, device=dev), system_kv)
                  for c in contexts]
    q0 = args.moved_from
    head_kv = [(k[:, :, :q0].contiguous(), v[:, :, :q0].contiguous()) for k, v in system_kv]
    moved_kv = [encode(model, c, torch.arange(q0, q0 + C, device=dev), head_kv if q0 else None)
                for c in contexts]
    del head_kv
    cos_sin = delta_cos_sin(inv_freq, torch.arange(q0, q0 + C, device=dev), P - q0)
    moves = [cos_sin] * len(contexts)
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # Agreement (untimed).
    full_logits, full_next = first_token_full(model, full_prompt)
    comp_logits, comp_next = first_token_composed(model, system_kv, context_kv, question, q_pos)
    moved_logits, _ = first_token_composed(model, system_kv, moved_kv, question, q_pos, moves)
    # Layer-0 keys of the moved contexts vs keys encoded at |S|.. (layer 0 is context-free).
    k_moved = rerotate(moved_kv[0][0][0], *cos_sin).float()
    k_fresh = context_kv[0][0][0].float()
    moved_key_err = float(((k_moved - k_fresh).abs().max() / k_fresh.abs().max()).item())
    unmoved_key_err = float(((moved_kv[0][0][0].float() - k_fresh).abs().max() /
                             k_fresh.abs().max()).item())
    ape_ok = True
    try:
        register_ape()
        APE.update(prefix=P, context=C * len(contexts), temperature=1.0, scale=1.0)
        set_attention(model, "ropekv_ape")
        ape1_logits, _ = first_token_composed(model, system_kv, context_kv, question, q_pos)
        APE.update(temperature=args.temperature, scale=args.scale)
        ape_logits, ape_next = first_token_composed(model, system_kv, context_kv, question, q_pos)
        set_attention(model, "sdpa")
        ape_unit_cos = cosine(ape1_logits, comp_logits)
        ape_unit_maxdiff = float((ape1_logits - comp_logits).abs().max() /
                                 comp_logits.abs().max())
    except Exception as e:  # an old transformers without AttentionInterface
        print(f"ttft_modules_ape: APE attention function unavailable: {e}", file=sys.stderr)
        set_attention(model, "sdpa")
        ape_ok = False
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # Timings.
    full_ms = median_ms(lambda: first_token_full(model, full_prompt), args.reps)
    comp_ms = median_ms(
        lambda: first_token_composed(model, system_kv, context_kv, question, q_pos), args.reps)
    comp_bd = {}
    first_token_composed(model, system_kv, context_kv, question, q_pos, timings=comp_bd)
    moved_ms = median_ms(
        lambda: first_token_composed(model, system_kv, moved_kv, question, q_pos, moves),
        args.reps)
    moved_bd = {}
    first_token_composed(model, system_kv, moved_kv, question, q_pos, moves, timings=moved_bd)
    ape_ms, ape_bd = None, {}
    if ape_ok:
        set_attention(model, "ropekv_ape")
        ape_ms = median_ms(
            lambda: first_token_composed(model, system_kv, context_kv, question, q_pos), args.reps)
        first_token_composed(model, system_kv, context_kv, question, q_pos, timings=ape_bd)
        set_attention(model, "sdpa")

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"ttft_modules_ape: {name}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; LlamaForCausalLM random bf16, {args.layers} layers "
          f"({'tiny smoke-test shape' if args.tiny else 'Llama-3-8B shape'}); prompt {P}-token "
          f"system module + {len(contexts)} x {C}-token contexts + {nq}-token question = "
          f"{n_full} tokens; median of {args.reps}")
    fmt = lambda b: "  ".join(f"{k[:-3]} {v:.1f}" for k, v in b.items())
    print(f"{'path':<34} {'TTFT ms':>9} {'speedup':>8}   breakdown (ms)")
    print(f"{'full prefill':<34} {full_ms:9.1f} {1.0:7.1f}x")
    print(f"{'composed (T = S = 1, SDPA)':<34} {comp_ms:9.1f} {full_ms / comp_ms:7.1f}x   "
          f"{fmt(comp_bd)}")
    if ape_ms is not None:
        label = f"composed + APE (T={args.temperature:g}, S={args.scale:g})"
        print(f"{label:<34} {ape_ms:9.1f} {full_ms / ape_ms:7.1f}x   {fmt(ape_bd)}")
    label = f"composed, contexts moved {q0}->{P}"
    print(f"{label:<34} {moved_ms:9.1f} {full_ms / moved_ms:7.1f}x   {fmt(moved_bd)}")
    print(f"first-token logits cosine vs full prefill: composed {cosine(comp_logits, full_logits):.4f}"
          + (f", APE {cosine(ape_logits, full_logits):.4f}" if ape_ok else "")
          + f", moved {cosine(moved_logits, full_logits):.4f} (random weights: informational)")
    if ape_ok:
        print(f"APE merge at T = S = 1 vs SDPA: logits cosine {ape_unit_cos:.6f}, max rel diff "
              f"{ape_unit_maxdiff:.2e}")
    print(f"layer-0 keys of moved contexts vs encoded at {P}..: max rel err {moved_key_err:.2e} "
          f"(not moved: {unmoved_key_err:.2e})")
    result = {
        "bench": "ttft_modules_ape", "device": name, "torch": torch.__version__,
        "transformers": transformers.__version__, "layers": args.layers, "tiny": args.tiny,
        "system_tokens": P, "contexts": len(contexts), "context_tokens": C,
        "question_tokens": nq, "prompt_tokens": n_full, "reps": args.reps,
        "full_ms": full_ms, "composed_ms": comp_ms, "composed_speedup": full_ms / comp_ms,
        "composed_breakdown_ms": comp_bd,
        "ape_ms": ape_ms, "ape_speedup": (full_ms / ape_ms) if ape_ms else None,
        "ape_breakdown_ms": ape_bd, "temperature": args.temperature, "scale": args.scale,
        "moved_ms": moved_ms, "moved_speedup": full_ms / moved_ms, "moved_from": q0,
        "moved_breakdown_ms": moved_bd,
        "logits_cosine_vs_full": {"composed": cosine(comp_logits, full_logits),
                                  "ape": cosine(ape_logits, full_logits) if ape_ok else None,
                                  "moved": cosine(moved_logits, full_logits)},
        "same_first_token": {"composed": comp_next == full_next,
                             "ape": (ape_next == full_next) if ape_ok else None},
        "ape_unit_vs_sdpa_cosine": ape_unit_cos if ape_ok else None,
        "ape_unit_vs_sdpa_max_rel_diff": ape_unit_maxdiff if ape_ok else None,
        "moved_layer0_key_rel_err": moved_key_err,
        "unmoved_layer0_key_rel_err": unmoved_key_err,
    }
    print("JSON " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
