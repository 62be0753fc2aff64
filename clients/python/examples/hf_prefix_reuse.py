#!/usr/bin/env python3
"""End-to-end prefix reuse through transformers with ropekvd as the KV store.

A random-weight LlamaForCausalLM (no download) serves two requests that share a prefix P:
  A = P + S_a   cache miss: full prefill; its whole blocks are stored in ropekvd
  B = P + S_b   P's KV is loaded from ropekvd; only S_b runs through the model
and the script shows
  (a) B's prefill skips P: tokens run through the model, and time, with and without ropekv;
  (b) B's outputs equal those computed without the cache: prefill logits and a greedy
      continuation of --new-tokens tokens (token ids identical, logits within tolerance), and
      the KV loaded from ropekvd is bit for bit the KV request A produced.
It prints a table and one JSON line, and exits 1 when (a) or (b) fails.

    python3 hf_prefix_reuse.py --ropekvd build/ropekvd                 # GPU if there is one
    python3 hf_prefix_reuse.py --ropekvd ./ropekvd --prefix 4096 --layers 16 --hidden 2048 \
        --heads 16 --kv-heads 8 --dtype bfloat16

Needs torch, transformers, grpcio, protobuf, numpy, and the ropekv package on PYTHONPATH
(<build>/python, or clients/python plus the generated modules).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

import ropekv
import ropekv.hf as rhf


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times, result = [], None
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def greedy(model, cache, logits, n):
    """n greedy steps after a prefill whose last logits are `logits`; (token ids, [n+1, vocab]
    logits of every step, the prefill's last one first)."""
    ids, steps = [], [logits[0, -1].float()]
    nxt = logits[:, -1:].argmax(-1)
    for _ in range(n):
        ids.append(int(nxt))
        out = model(input_ids=nxt, use_cache=True, **rhf.cache_kwargs(model, cache))
        cache = rhf.output_cache(out)
        steps.append(out.logits[0, -1].float())
        nxt = out.logits[:, -1:].argmax(-1)
    return ids, torch.stack(steps)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ropekvd", help="the daemon binary to start (else --addr)")
    ap.add_argument("--addr", help="HOST:PORT of a running ropekvd")
    ap.add_argument("--host-capacity", default="8GiB")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=0, help="0: 2.75 x hidden")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rope-theta", type=float, default=500000.0)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=1024, help="shared prefix tokens (whole blocks)")
    ap.add_argument("--suffix", type=int, default=32, help="tokens after the prefix, per request")
    ap.add_argument("--new-tokens", type=int, default=16, help="greedy tokens compared")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--buffer", default="auto", choices=["auto", "grpc", "shm", "cuda"],
                    help="how B's prefix KV reaches the frontend: gRPC bytes, a shared-memory "
                         "buffer, or the frontend's CUDA tensor by CUDA IPC (auto: cuda on a GPU)")
    args = ap.parse_args()
    if args.prefix % args.block_tokens:
        sys.exit(f"--prefix must be a multiple of --block-tokens {args.block_tokens}")
    if not args.ropekvd and not args.addr:
        sys.exit("give --ropekvd BINARY or --addr HOST:PORT")

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: (b) compares outputs
    torch.backends.cudnn.allow_tf32 = False
    daemon, buf = None, None
    if not args.addr:
        daemon = ropekv.LocalDaemon(args.ropekvd, "--host_capacity", args.host_capacity,
                                    prefix="ropekv-hf-")
        args.addr = daemon.address
    try:
        client = ropekv.Client(args.addr)
        client.wait_ready(timeout=30)

        torch.manual_seed(args.seed)
        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden,
            intermediate_size=args.intermediate or int(2.75 * args.hidden) // 64 * 64,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, max_position_embeddings=max(8192, 2 * args.prefix),
            rope_theta=args.rope_theta)
        model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
        spec = rhf.spec_from_config(model.config, block_tokens=args.block_tokens, dtype=dtype)
        model_id = client.register_model(spec, name="hf-prefix-reuse").model_id

        gen = torch.Generator().manual_seed(args.seed + 1)
        prefix = torch.randint(0, args.vocab, (1, args.prefix), generator=gen)
        a = torch.cat([prefix, torch.randint(0, args.vocab, (1, args.suffix), generator=gen)], 1)
        b = torch.cat([prefix, torch.randint(0, args.vocab, (1, args.suffix), generator=gen)], 1)
        a, b = a.to(device), b.to(device)
        tenant = f"demo-{os.getpid()}"
        # Where the daemon writes B's prefix KV (DataPlane), or None: gRPC bytes.
        path = args.buffer if args.buffer != "auto" else (
            "cuda" if device.type == "cuda" else "grpc")
        prefix_bytes = ropekv.arrays.block_bytes(client.spec(model_id)) * (
            args.prefix // args.block_tokens)
        if path == "cuda":
            buf = client.register_cuda(torch.empty(prefix_bytes, dtype=torch.uint8, device=device))
        elif path == "shm":
            buf = client.create_shm(prefix_bytes)

        with torch.inference_mode():
            # Request A: a miss; its whole blocks go to ropekvd.
            assert client.lookup(model_id, a[0], tenant=tenant).matched_tokens == 0
            out_a, matched_a = rhf.prefill(model, client, model_id, a, tenant=tenant)
            stored = client.lookup(model_id, a[0], tenant=tenant).matched_tokens

            # Request B, with ropekv: P is loaded, S_b is prefilled.
            out_b, matched_b = rhf.prefill(model, client, model_id, b, tenant=tenant, store=False,
                                           out=buf)
            ids_b, logits_b = greedy(model, rhf.output_cache(out_b), out_b.logits, args.new_tokens)
            # Request B without a cache: the reference.
            ref = model(input_ids=b, use_cache=True)
            ids_ref, logits_ref = greedy(model, rhf.output_cache(ref), ref.logits, args.new_tokens)

            kv_exact = all(
                torch.equal(kb[:, :, :matched_b], ka[:, :, :matched_b])
                and torch.equal(vb[:, :, :matched_b], va[:, :, :matched_b])
                for (kb, vb), (ka, va) in zip(rhf.layer_kv(rhf.output_cache(out_b)),
                                              rhf.layer_kv(rhf.output_cache(out_a))))
            prefill_diff = (out_b.logits.float() - ref.logits[:, matched_b:].float()).abs().max()
            step_diff = (logits_b - logits_ref).abs().max()
            scale = logits_ref.abs().max()

            # Timings (median of --reps): the full prefill vs load + suffix prefill.
            t_full, _ = timed(lambda: model(input_ids=b, use_cache=True), device, args.reps)
            t_load, _ = timed(lambda: rhf.load_prefix(client, model_id, b, tenant=tenant,
                                                      config=model.config, dtype=dtype,
                                                      device=device, out=buf),
                              device, args.reps)
            t_reuse, _ = timed(lambda: rhf.prefill(model, client, model_id, b, tenant=tenant,
                                                   store=False, out=buf), device, args.reps)

        tol = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}[args.dtype] * float(scale)
        ok_a = matched_a == 0 and matched_b == args.prefix and stored >= args.prefix
        ok_b = (kv_exact and float(prefill_diff) <= tol and float(step_diff) <= tol
                and (ids_b == ids_ref or args.dtype != "float32"))
        kv_bytes = prefix_bytes

        rows = [
            ("device", f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'})"),
            ("model", f"Llama random weights, {args.layers} layers, hidden {args.hidden}, "
                      f"{args.heads} heads / {args.kv_heads} kv heads, {args.dtype}"),
            ("prompt B", f"{b.shape[1]} tokens = prefix {args.prefix} + suffix {args.suffix}"),
            ("A: matched / stored", f"{matched_a} / {stored} tokens"),
            ("B: matched from ropekv", f"{matched_b} tokens ({kv_bytes / 2**20:.1f} MiB of KV)"),
            ("B: tokens prefilled", f"{b.shape[1] - matched_b} with ropekv vs {b.shape[1]} without"),
            ("B: full prefill", f"{t_full * 1e3:.2f} ms"),
            ("B: ropekv load (Get + DynamicCache)", f"{t_load * 1e3:.2f} ms over {path}"),
            ("B: load + suffix prefill", f"{t_reuse * 1e3:.2f} ms ({t_full / t_reuse:.2f}x)"),
            ("(b) loaded KV == A's KV", "bit for bit" if kv_exact else "DIFFERENT"),
            ("(b) prefill logits max |diff|", f"{float(prefill_diff):.3g} (tol {tol:.3g})"),
            ("(b) greedy tokens equal", f"{ids_b == ids_ref} ({args.new_tokens} tokens)"),
            ("(b) step logits max |diff|", f"{float(step_diff):.3g}"),
            ("result", f"(a) {'PASS' if ok_a else 'FAIL'}  (b) {'PASS' if ok_b else 'FAIL'}"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print(json.dumps({
            "bench": "hf_prefix_reuse", "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": args.dtype, "layers": args.layers, "hidden": args.hidden,
            "heads": args.heads, "kv_heads": args.kv_heads, "prefix": args.prefix,
            "suffix": args.suffix, "matched": matched_b, "kv_bytes": kv_bytes, "path": path,
            "prefilled_tokens_with": int(b.shape[1] - matched_b),
            "prefilled_tokens_without": int(b.shape[1]),
            "full_prefill_ms": t_full * 1e3, "load_ms": t_load * 1e3, "reuse_ms": t_reuse * 1e3,
            "kv_exact": kv_exact, "prefill_logit_diff": float(prefill_diff),
            "step_logit_diff": float(step_diff), "tokens_equal": ids_b == ids_ref,
            "pass_a": ok_a, "pass_b": ok_b,
            "transformers": transformers.__version__, "torch": torch.__version__}))
        return 0 if ok_a and ok_b else 1
    finally:
        if buf is not None and hasattr(buf, "close"):  # shared memory: unlink it
            buf.close()
        if daemon is not None:
            daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
