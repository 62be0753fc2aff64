#!/usr/bin/env python3
"""The APE merge done by PyTorch, for comparison with bench/ape_bench (ropekv's kernel).

Same layer and prompt as ape_bench: Llama-3-8B-shaped (32 q heads, 8 KV heads, head_dim 128,
bf16), a 2K-token prefix, 8 contexts x 1K tokens, a 64-token question; prefill (the 64 question
tokens, causal among themselves) and decode (one token after the question).

APE: (o_c, lse_c) = attention over the contexts with scale 1/(sqrt(d)*T); (o_o, lse_o) = attention
over prefix + question (causal) with scale 1/sqrt(d); weights softmax([S*T*lse_c, lse_o]) in fp32.

Implementations timed:
  sdpa2+merge : PyTorch's fused attention kernels twice (they return the lse that the merge needs;
                the public F.scaled_dot_product_attention does not), then the merge in fp32:
                  contexts -> aten._scaled_dot_product_flash_attention (non-causal)
                  other    -> flash (decode) / aten._scaled_dot_product_efficient_attention with a
                              lower-right causal bias (prefill)
                GQA folded into the query rows ([Hkv, G*n, d] views, no K/V copies). The contexts
                are one contiguous tensor and prefix+question another, built outside the timing
                (ropekv reads the 8 contexts as separate segments).
  eager math  : matmul + softmax + matmul per group with repeat_interleave'd K/V (naive PyTorch).
Each is checked once against an fp32 evaluation of the formula. K/V rotate through several input
sets so that they come from HBM, not L2. Prints a table and one JSON line. Needs only torch + CUDA.

Usage: python3 ape_torch.py [--batches 50] [--calls 10] [--sets 4]
"""
import argparse
import json
import math

import torch

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PREFIX, CONTEXTS, CONTEXT_LEN, QUESTION = 2048, 8, 1024, 64
T, S = 0.5, 0.9
GROUP = Q_HEADS // KV_HEADS
DTYPE = torch.bfloat16


def make_set(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(DTYPE)

    ctx_k = rnd(1, KV_HEADS, CONTEXTS * CONTEXT_LEN, HEAD_DIM)
    ctx_v = rnd(1, KV_HEADS, CONTEXTS * CONTEXT_LEN, HEAD_DIM)
    # prefix ++ question ++ decode token
    oth_k = rnd(1, KV_HEADS, PREFIX + QUESTION + 1, HEAD_DIM)
    oth_v = rnd(1, KV_HEADS, PREFIX + QUESTION + 1, HEAD_DIM)
    q = rnd(1, Q_HEADS, QUESTION, HEAD_DIM)
    return {
        "ctx_k": ctx_k, "ctx_v": ctx_v,
        # prefill: other = prefix + question; decode: + the decode token; made outside timing
        "pre_k": oth_k[:, :, : PREFIX + QUESTION].contiguous(),
        "pre_v": oth_v[:, :, : PREFIX + QUESTION].contiguous(),
        "dec_k": oth_k, "dec_v": oth_v,
        "q_prefill": q, "q_decode": q[:, :, :1].contiguous(),
    }


def lower_right_bias(n, lo):
    """Additive bias [1, 1, G*n, lo] for folded rows r = g*n + i: key j visible iff j <= lo-n+i."""
    i = torch.arange(n, device="cuda").repeat(GROUP)  # row r -> query i = r % n
    j = torch.arange(lo, device="cuda")
    visible = j[None, :] <= (lo - n + i)[:, None]
    bias = torch.zeros(GROUP * n, lo, device="cuda", dtype=DTYPE)
    bias.masked_fill_(~visible, float("-inf"))
    return bias[None, None]


def flash(q, k, v, scale):
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                             scale=scale)
    return out[0], out[1]  # output [B, H, L, d], logsumexp [B, H, L] fp32


def efficient(q, k, v, bias, scale):
    bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])  # stride-0 broadcast
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False,
                                                                 scale=scale)
    return out[0], out[1][..., : q.shape[2]]


def merge(o_c, lse_c, o_o, lse_o):
    a = lse_c * (S * T)
    m = torch.maximum(a, lse_o)
    wc = torch.exp(a - m)
    wo = torch.exp(lse_o - m)
    z = wc + wo
    return (o_c.float() * (wc / z)[..., None] + o_o.float() * (wo / z)[..., None]).to(DTYPE)


def ape_sdpa(q, ck, cv, ok, ov, bias):
    """q [1, Hq, n, d] -> [1, Hq, n, d]; GQA folded: rows of kv head hk are (g, i)."""
    n = q.shape[2]
    qf = q.view(1, KV_HEADS, GROUP * n, HEAD_DIM)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    o_c, lse_c = flash(qf, ck, cv, scale / T)
    if bias is None:
        o_o, lse_o = flash(qf, ok, ov, scale)
    else:
        o_o, lse_o = efficient(qf, ok, ov, bias, scale)
    return merge(o_c, lse_c, o_o, lse_o).view(1, Q_HEADS, n, HEAD_DIM)


def ape_eager(q, ck, cv, ok, ov, mask):
    """Naive PyTorch: K/V repeated per q head, explicit scores, softmax, lse."""
    scale = 1.0 / math.sqrt(HEAD_DIM)
    ckr, cvr = ck.repeat_interleave(GROUP, 1), cv.repeat_interleave(GROUP, 1)
    okr, ovr = ok.repeat_interleave(GROUP, 1), ov.repeat_interleave(GROUP, 1)
    sc = (q @ ckr.transpose(-1, -2)).float() * (scale / T)
    so = (q @ okr.transpose(-1, -2)).float() * scale
    if mask is not None:
        so = so.masked_fill(~mask, float("-inf"))
    lse_c, lse_o = torch.logsumexp(sc, -1), torch.logsumexp(so, -1)
    o_c = torch.softmax(sc, -1).to(DTYPE) @ cvr
    o_o = torch.softmax(so, -1).to(DTYPE) @ ovr
    return merge(o_c, lse_c, o_o, lse_o)


def reference(q, ck, cv, ok, ov, n):
    """The formula in fp32 (K/V repeated per q head), query i sees other keys j <= lo - n + i."""
    q, ck, cv, ok, ov = (x.float() for x in (q, ck, cv, ok, ov))
    ckr, cvr = ck.repeat_interleave(GROUP, 1), cv.repeat_interleave(GROUP, 1)
    okr, ovr = ok.repeat_interleave(GROUP, 1), ov.repeat_interleave(GROUP, 1)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    sc = q @ ckr.transpose(-1, -2) * (scale / T)
    so = q @ okr.transpose(-1, -2) * scale
    lo = ok.shape[2]
    vis = torch.arange(lo, device="cuda")[None, :] <= (lo - n + torch.arange(n, device="cuda"))[:, None]
    so = so.masked_fill(~vis, float("-inf"))
    lse_c, lse_o = torch.logsumexp(sc, -1), torch.logsumexp(so, -1)
    o_c, o_o = torch.softmax(sc, -1) @ cvr, torch.softmax(so, -1) @ ovr
    a = lse_c * (S * T)
    m = torch.maximum(a, lse_o)
    wc, wo = torch.exp(a - m), torch.exp(lse_o - m)
    return (o_c * (wc / (wc + wo))[..., None] + o_o * (wo / (wc + wo))[..., None])


def time_it(fn, nsets, batches, calls):
    for i in range(20):
        fn(i % nsets)
    torch.cuda.synchronize()
    per_call = []
    s = 0
    for _ in range(batches):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(s)
            s = (s + 1) % nsets
        stop.record()
        stop.synchronize()
        per_call.append(start.elapsed_time(stop) * 1000.0 / calls)
    per_call.sort()
    return per_call[len(per_call) // 2], per_call[0], per_call[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--sets", type=int, default=4)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    sets = [make_set(42 + s) for s in range(args.sets)]
    results = []
    for scenario in ("decode (1 token)", "prefill (64 tokens)"):
        decode = scenario.startswith("decode")
        n = 1 if decode else QUESTION
        kk, vk, qk = ("dec_k", "dec_v", "q_decode") if decode else ("pre_k", "pre_v", "q_prefill")
        lo = sets[0][kk].shape[2]
        bias = None if decode else lower_right_bias(n, lo)
        mask = None
        if not decode:
            mask = (torch.arange(lo, device="cuda")[None, :]
                    <= (lo - n + torch.arange(n, device="cuda"))[:, None])
        impls = {
            "torch sdpa2+merge": lambda s: ape_sdpa(sets[s][qk], sets[s]["ctx_k"],
                                                    sets[s]["ctx_v"], sets[s][kk], sets[s][vk],
                                                    bias),
            "torch eager math": lambda s: ape_eager(sets[s][qk], sets[s]["ctx_k"],
                                                    sets[s]["ctx_v"], sets[s][kk], sets[s][vk],
                                                    mask),
        }
        ref = reference(sets[0][qk], sets[0]["ctx_k"], sets[0]["ctx_v"], sets[0][kk],
                        sets[0][vk], n)
        keys = CONTEXTS * CONTEXT_LEN + lo
        kv_bytes = 2 * keys * KV_HEADS * HEAD_DIM * 2
        visible = keys if decode else keys - n + (n + 1) / 2
        for name, fn in impls.items():
            try:
                err = (fn(0).float() - ref).abs().max().item()
                med, lo_us, hi_us = time_it(fn, args.sets, args.batches, args.calls)
            except Exception as e:  # an aten op missing or refusing these shapes
                print(f"{scenario} / {name}: failed: {e}")
                continue
            results.append({
                "scenario": scenario, "impl": name, "us_median": med, "us_min": lo_us,
                "us_max": hi_us, "kv_gbps": kv_bytes / (med * 1e-6) / 1e9,
                "tflops": 4.0 * n * Q_HEADS * visible * HEAD_DIM / (med * 1e-6) / 1e12,
                "max_abs_err": err,
            })
    dev = torch.cuda.get_device_name()
    print(f"APE merge by PyTorch {torch.__version__}, Llama-3-8B-shaped layer: {Q_HEADS} q heads, "
          f"{KV_HEADS} KV heads, d {HEAD_DIM}, bf16; prefix {PREFIX}, {CONTEXTS} contexts x "
          f"{CONTEXT_LEN}, question {QUESTION}; T {T} S {S}")
    print(f"device: {dev}; {args.sets} input sets rotated; median of {args.batches} batches x "
          f"{args.calls} calls\n")
    print(f"| {'scenario':<20} | {'impl':<18} | {'median us':>9} | {'min us':>9} | {'max us':>9} "
          f"| {'KV GB/s':>8} | {'TFLOP/s':>7} | {'max |err|':>9} |")
    print("|" + "|".join("-" * w for w in (22, 20, 11, 11, 11, 10, 9, 11)) + "|")
    for r in results:
        print(f"| {r['scenario']:<20} | {r['impl']:<18} | {r['us_median']:9.2f} | "
              f"{r['us_min']:9.2f} | {r['us_max']:9.2f} | {r['kv_gbps']:8.0f} | "
              f"{r['tflops']:7.1f} | {r['max_abs_err']:9.2e} |")
    print()
    print(json.dumps({"bench": "ape_torch", "device": dev, "torch": torch.__version__,
                      "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                      "prefix": PREFIX, "contexts": CONTEXTS, "context_len": CONTEXT_LEN,
                      "question": QUESTION, "results": results}))


if __name__ == "__main__":
    main()
