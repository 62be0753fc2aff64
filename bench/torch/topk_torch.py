#!/usr/bin/env python3
"""Query-aware top-k selection done by PyTorch, beside bench/topk_bench (ropekv's kernels).

Part 1, timing, the same shapes as topk_bench: 8 KV heads, head_dim 128, bf16 keys
[8, N, 128], queries [Hq, 128] for Hq in {8, 32, 512}, N in {4K, 32K, 128K, 1M}, k in {64, 256,
1024, 4096}:
  exact : torch.bmm(q grouped per KV head, K^T) -> amax over the group -> torch.topk(k)
  pqh   : the same without the reduction (top-k per query head)
  page  : Quest on page metadata M, m [8, N/16, 128] (built outside the timing):
          bmm(q+, M^T) + bmm(q-, m^T) -> amax over the group -> torch.topk(ceil(k / 16))
The L2 cache is overwritten before every timed run and left clean (a fill, then a read of the same
256 MiB; keys come from HBM, as in topk_bench).

Part 2, recall: keys and queries from a random-weight Llama layer (transformers' LlamaConfig /
rotary embedding when importable, else the same math written here: RMSNorm, q_proj/k_proj with
Llama's init std 0.02, NeoX RoPE with theta 500000), Llama-3-8B-shaped (hidden 4096, 32 query
heads, 8 KV heads, head_dim 128), bf16. A context of N tokens, then 64 query tokens after it.
Per (query, KV head), with the group's scores reduced by max as ropekv's kMax:
  exact : the top-k tokens by exact q.k
  bound : the top ceil(k/16) pages by the Quest bound (sum_i max(q_i M_i, q_i m_i)), all their tokens
  bte   : bound picks 4k tokens' worth of pages, exact q.k picks k tokens among them
index recall = |selected & exact| / k, captured softmax mass (per query head, scale 1/sqrt(d)) =
sum over selected of softmax weights. Median and 5th percentile at budgets 256..4096.

Prints tables and one JSON line. Needs torch with CUDA (transformers optional).

Usage: python3 topk_torch.py [--quick] [--reps 30] [--recall-n 32768] [--no-recall] [--no-timing]
       python3 topk_torch.py --device cpu --no-timing --recall-n 4096   (dry run without a GPU)
"""
import argparse
import json
import math
import time

import torch

KV_HEADS, HEAD_DIM, PAGE = 8, 128, 16
DTYPE = torch.bfloat16
DEV = "cuda"  # --device cpu runs the recall study without a GPU (a dry run of this script)


class Timer:
    """Median microseconds of a CUDA workload, L2 flushed before each run."""

    def __init__(self):
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)

    def median_us(self, fn, reps, warm=3):
        for _ in range(warm):
            fn()
        times = []
        for i in range(reps):
            # Overwrite L2, then read the same bytes so that its lines are clean (as topk_bench).
            self.flush.fill_(i & 0xFF)
            self.flush.view(torch.int32).sum()
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1000.0)
        times.sort()
        return times[len(times) // 2]


def page_meta(keys):
    """M, m [H, P, D] of keys [H, N, D] (bf16 max/min are exact: no rounding needed)."""
    h, n, d = keys.shape
    p = (n + PAGE - 1) // PAGE
    pad = p * PAGE - n
    if pad:
        hi = torch.cat([keys, keys[:, -1:].expand(h, pad, d)], 1)
    else:
        hi = keys
    v = hi.view(h, p, PAGE, d)
    return v.amax(2), v.amin(2)


def copy_bandwidth(timer):
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    us = timer.median_us(lambda: b.copy_(a), 20)
    return 2.0 * a.numel() / (us * 1e-6)


def timing(args, timer):
    hqs = [32] if args.quick else [8, 32, 512]
    ns = [131072] if args.quick else [4096, 32768, 131072, 1 << 20]
    ks = [64, 256, 1024, 4096]
    bw = copy_bandwidth(timer)
    rows = []
    print(f"# torch {torch.__version__} on {torch.cuda.get_device_name()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# D2D copy bandwidth (read + write): {bw / 1e9:.0f} GB/s; times in us (median of "
          f"{args.reps}), L2 flushed per run")
    print(f"{'hq':>5} {'N':>8} {'k':>5} {'read_us':>9} {'exact_us':>9} {'ratio':>6} "
          f"{'pqh_us':>9} {'page_us':>9}")
    g = torch.Generator(device=DEV).manual_seed(1)
    for hq in hqs:
        grp = hq // KV_HEADS
        for n in ns:
            keys = torch.randn(KV_HEADS, n, HEAD_DIM, device=DEV, generator=g).to(DTYPE)
            q = torch.randn(hq, HEAD_DIM, device=DEV, generator=g).to(DTYPE)
            qg = q.view(KV_HEADS, grp, HEAD_DIM)
            kt = keys.transpose(1, 2)  # a view: bmm reads K as stored
            hi, lo = page_meta(keys)
            hit, lot = hi.transpose(1, 2), lo.transpose(1, 2)
            qp, qm = qg.clamp(min=0), qg.clamp(max=0)
            read_us = keys.numel() * 2 / bw * 1e6
            for k in ks:
                kp = (k + PAGE - 1) // PAGE

                def exact():
                    s = torch.bmm(qg, kt).amax(1)
                    return torch.topk(s, min(k, n), dim=-1)

                def pqh():
                    s = torch.bmm(qg, kt).view(hq, n)
                    return torch.topk(s, min(k, n), dim=-1)

                def page():
                    b = (torch.bmm(qp, hit) + torch.bmm(qm, lot)).amax(1)
                    return torch.topk(b, min(kp, b.shape[-1]), dim=-1)

                e_us = timer.median_us(exact, args.reps)
                p_us = timer.median_us(pqh, args.reps)
                g_us = timer.median_us(page, args.reps)
                print(f"{hq:>5} {n:>8} {k:>5} {read_us:>9.1f} {e_us:>9.1f} "
                      f"{e_us / read_us:>6.2f} {p_us:>9.1f} {g_us:>9.1f}", flush=True)
                rows.append({"query_heads": hq, "n": n, "k": k, "read_us": round(read_us, 2),
                             "exact_us": round(e_us, 2), "exact_pqh_us": round(p_us, 2),
                             "page_us": round(g_us, 2)})
            del keys, hi, lo, hit, lot
            torch.cuda.empty_cache()
    return {"copy_bw_GBps": round(bw / 1e9, 1), "rows": rows}


# ------------------------------------------------------------------------------------------
# Recall study.

HIDDEN, Q_HEADS, THETA = 4096, 32, 500000.0


def rope_cos_sin(positions):
    """cos, sin [len, D] as transformers computes them (fp32 inv_freq and angles)."""
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        cfg = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=Q_HEADS,
                          num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rope_theta=THETA,
                          max_position_embeddings=int(positions.max().item()) + 1)
        rot = LlamaRotaryEmbedding(config=cfg).to(DEV)
        x = torch.zeros(1, positions.numel(), HEAD_DIM, device=DEV)
        cos, sin = rot(x, positions.view(1, -1))
        return cos[0].float(), sin[0].float(), "transformers"
    except Exception:  # noqa: BLE001 - any transformers version mismatch: same math by hand
        inv = 1.0 / (THETA ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
        ang = positions.float()[:, None] * inv[None, :]
        emb = torch.cat([ang, ang], -1)
        return emb.cos(), emb.sin(), "torch"


def rotate_half(x):
    a, b = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
    return torch.cat([-b, a], -1)


def llama_qk(n_ctx, n_query, seed):
    """Post-RoPE keys [8, n_ctx, D] and queries [n_query, 32, D] (bf16) of a random Llama layer."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    wq = (torch.randn(Q_HEADS * HEAD_DIM, HIDDEN, device=DEV, generator=g) * 0.02).to(DTYPE)
    wk = (torch.randn(KV_HEADS * HEAD_DIM, HIDDEN, device=DEV, generator=g) * 0.02).to(DTYPE)
    total = n_ctx + n_query
    # Token embeddings from a vocabulary of random vectors (repeats make some keys alike).
    vocab = torch.randn(32000, HIDDEN, device=DEV, generator=g).to(DTYPE)
    ids = torch.randint(0, 32000, (total,), device=DEV, generator=g)
    x = vocab[ids].float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)  # RMSNorm, unit weight
    x = x.to(DTYPE)
    pos = torch.arange(total, device=DEV)
    cos, sin, src = rope_cos_sin(pos)
    q = (x @ wq.t()).float().view(total, Q_HEADS, HEAD_DIM)
    k = (x @ wk.t()).float().view(total, KV_HEADS, HEAD_DIM)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    keys = k[:n_ctx].transpose(0, 1).contiguous().to(DTYPE)  # [8, n_ctx, D]
    queries = q[n_ctx:].to(DTYPE)                             # [n_query, 32, D]
    return keys, queries, src


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))]


def recall(args):
    n, nq = args.recall_n, 64
    keys, queries, src = llama_qk(n, nq, 7)
    grp = Q_HEADS // KV_HEADS
    kf = keys.float()                                         # [8, n, D]
    hi, lo = page_meta(keys)
    hi, lo = hi.float(), lo.float()                           # [8, P, D]
    pages = hi.shape[1]
    budgets = [256, 512, 1024, 2048, 4096]
    stats = {m: {b: {"recall": [], "mass": []} for b in budgets} for m in ("exact", "bound", "bte")}
    scale = 1.0 / math.sqrt(HEAD_DIM)
    for qi in range(nq):
        q = queries[qi].float().view(KV_HEADS, grp, HEAD_DIM)  # [8, G, D]
        s = torch.bmm(q, kf.transpose(1, 2))                    # [8, G, n]
        w = torch.softmax(s * scale, -1)                        # per query head
        red = s.amax(1)                                         # [8, n], kMax
        qp, qm = q.clamp(min=0), q.clamp(max=0)
        bound = (torch.bmm(qp, hi.transpose(1, 2)) + torch.bmm(qm, lo.transpose(1, 2))).amax(1)
        for b in budgets:
            exact = torch.topk(red, b, -1).indices              # [8, b]
            emask = torch.zeros(KV_HEADS, n, dtype=torch.bool, device=DEV)
            emask.scatter_(1, exact, True)
            # bound: ceil(b/16) pages, all their tokens
            bp = torch.topk(bound, min((b + PAGE - 1) // PAGE, pages), -1).indices
            pmask = torch.zeros(KV_HEADS, pages, dtype=torch.bool, device=DEV)
            pmask.scatter_(1, bp, True)
            bmask = pmask.repeat_interleave(PAGE, 1)[:, :n]
            # bound-then-exact: 4b tokens' worth of pages, then exact top-b among their tokens
            cp = torch.topk(bound, min((4 * b + PAGE - 1) // PAGE, pages), -1).indices
            cmask = torch.zeros(KV_HEADS, pages, dtype=torch.bool, device=DEV)
            cmask.scatter_(1, cp, True)
            ctok = cmask.repeat_interleave(PAGE, 1)[:, :n]
            cand = red.masked_fill(~ctok, float("-inf"))
            te = torch.topk(cand, min(b, int(ctok.sum(1).min().item())), -1).indices
            tmask = torch.zeros(KV_HEADS, n, dtype=torch.bool, device=DEV)
            tmask.scatter_(1, te, True)
            for name, mask in (("exact", emask), ("bound", bmask), ("bte", tmask)):
                rec = (mask & emask).sum(1).float() / b                      # [8]
                mass = (w * mask[:, None, :].float()).sum(-1).flatten()      # [32]
                stats[name][b]["recall"] += rec.tolist()
                stats[name][b]["mass"] += mass.tolist()
    print(f"# recall study: random-weight Llama layer (RoPE by {src}), N = {n} context tokens, "
          f"{nq} query tokens, kMax over 4 query heads; median / 5th percentile")
    print(f"{'mode':>6} {'budget':>6} {'recall_med':>10} {'recall_p5':>9} {'mass_med':>9} "
          f"{'mass_p5':>8}")
    out = []
    for name in ("exact", "bound", "bte"):
        for b in budgets:
            r, m = stats[name][b]["recall"], stats[name][b]["mass"]
            row = {"mode": name, "budget": b, "recall_median": round(pct(r, 50), 4),
                   "recall_p5": round(pct(r, 5), 4), "mass_median": round(pct(m, 50), 4),
                   "mass_p5": round(pct(m, 5), 4)}
            out.append(row)
            print(f"{name:>6} {b:>6} {row['recall_median']:>10.4f} {row['recall_p5']:>9.4f} "
                  f"{row['mass_median']:>9.4f} {row['mass_p5']:>8.4f}")
    return {"n": n, "queries": nq, "rope": src, "rows": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only 32 query heads at N = 128K")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--recall-n", type=int, default=32768)
    ap.add_argument("--no-recall", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a recall-only dry run")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV != "cuda" and not args.no_timing:
        ap.error("timing needs --device cuda (use --no-timing)")
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"bench": "topk_torch",
              "device": torch.cuda.get_device_name() if DEV == "cuda" else DEV,
              "torch": torch.__version__}
    with torch.no_grad():
        if not args.no_timing:
            result["timing"] = timing(args, Timer())
        if not args.no_recall:
            result["recall"] = recall(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
