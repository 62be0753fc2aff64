#!/usr/bin/env python3
"""Benchmark: Get of a Llama-3-8B-shaped KV cache through the Python client — by gRPC bytes and
by a registered shared-memory buffer (GetToBuffer: the daemon writes the blocks into the client's
region, the answer is a numpy view of it) — vs a memcpy (numpy copy) of the same bytes, in the
same run.

Default: 32768 tokens = 2048 blocks of 16 tokens x 32 layers x 8 KV heads x 128 dims, bf16:
2 MiB a block, 4 GiB in all (the daemon is started with a host tier large enough and no disk
tier; the client needs ~2x that in RAM: the shared region, which also holds the Put's source, and
the gRPC path's buffer). --tokens scales it down.

    python3 clients/python/bench_get.py --ropekvd build/ropekvd               # 4 GiB
    python3 clients/python/bench_get.py --ropekvd build/ropekvd --tokens 4096 # 512 MiB

--streams 2,4 adds rows: the gRPC Get into the buffer over that many connections at once
(`get(..., streams=N)`: block ranges, a connection each), each checked once into a poisoned buffer.

Prints a table and one JSON line. Needs the ropekv package on PYTHONPATH (<build>/python).
"""

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np

import ropekv
from ropekv import arrays


def median_seconds(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ropekvd", help="daemon binary to start (else --addr)")
    ap.add_argument("--addr", help="HOST:PORT of a running ropekvd (its host tier must hold the cache)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--streams", default="", help="comma-separated connection counts to time too")
    args = ap.parse_args()
    if args.tokens <= 0 or args.tokens % args.block_tokens:
        sys.exit(f"--tokens must be a positive multiple of --block-tokens {args.block_tokens}")
    if not args.ropekvd and not args.addr:
        sys.exit("give --ropekvd BINARY or --addr HOST:PORT")

    spec = ropekv.model_spec(layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim,
                             dtype=args.dtype, block_tokens=args.block_tokens,
                             rope={"type": "llama3", "theta": 500000.0, "factor": 8.0,
                                   "original_max_position_embeddings": 8192})
    blocks = args.tokens // args.block_tokens
    bb = arrays.block_bytes(spec)
    total = blocks * bb

    daemon = None
    if not args.addr:
        daemon = ropekv.LocalDaemon(args.ropekvd, "--host_capacity",
                                    str(total + total // 8 + (64 << 20)), prefix="ropekv-bench-")
        args.addr = daemon.address
    try:
        client = ropekv.Client(args.addr, timeout=600)
        client.wait_ready(timeout=30)
        model = client.register_model(spec, name="bench-get-llama3-8b").model_id
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 128000, size=args.tokens).tolist()

        # Random bytes (16 distinct blocks tiled), each block stamped with its index so that a
        # misordered answer fails the check.
        base = np.frombuffer(rng.bytes(min(blocks, 16) * bb), np.uint8).reshape(-1, bb)
        # The cache is built in the shared region itself (it is the Put's source too).
        shm = client.create_shm(total)
        kv = shm.array(np.uint8, (blocks, bb))
        for i in range(0, blocks, base.shape[0]):
            n = min(base.shape[0], blocks - i)
            kv[i:i + n] = base[:n]
        kv[:, :8] = np.arange(blocks, dtype=np.uint64)[:, None].view(np.uint8)

        typed = kv.reshape(-1).view(arrays.numpy_dtype(spec.dtype)).reshape(
            arrays.kv_shape(spec, blocks))
        t0 = time.perf_counter()
        resp = client.put(model, tokens, typed)
        put_s = time.perf_counter() - t0
        if resp.blocks_stored + resp.blocks_existing != blocks:
            sys.exit(f"Put took {resp.blocks_stored + resp.blocks_existing} of {blocks} blocks")

        out = np.zeros(total, np.uint8)  # pages touched before timing
        header, got = client.get(model, tokens, out=out)
        if header.blocks != blocks or not np.array_equal(out, kv.reshape(-1)):
            sys.exit(f"Get answered {header.blocks} blocks / wrong bytes (want {blocks})")
        # The shared-memory path into a poisoned region must give the gRPC path's bytes.
        kv.fill(0xFF)
        header, view = client.get(model, tokens, out=shm)
        if header.blocks != blocks or not np.array_equal(view.reshape(-1).view(np.uint8), out):
            sys.exit(f"shared-memory Get answered {header.blocks} blocks / wrong bytes")
        if not np.shares_memory(view, kv):
            sys.exit("shared-memory Get did not answer a view of the region")
        del view
        ok = True

        streams = [int(n) for n in args.streams.split(",") if n]
        for n in streams:
            out.fill(0xFF)
            header, _ = client.get(model, tokens, out=out, streams=n)
            if header.blocks != blocks or not np.array_equal(out, kv.reshape(-1)):
                sys.exit(f"Get over {n} connections answered {header.blocks} blocks / wrong bytes")

        get_s, get_all = median_seconds(lambda: client.get(model, tokens, out=out), args.reps,
                                        args.warmup)
        streams_s = {n: median_seconds(lambda: client.get(model, tokens, out=out, streams=n),
                                       args.reps, args.warmup)[0] for n in streams}
        shm_s, shm_all = median_seconds(lambda: client.get(model, tokens, out=shm), args.reps,
                                        args.warmup)
        alloc_s, _ = median_seconds(lambda: client.get(model, tokens), args.reps, args.warmup)
        src = kv.reshape(-1)
        copy_s, _ = median_seconds(lambda: np.copyto(out, src), args.reps, args.warmup)
        stats = client.stats()
        del kv, src, typed
        shm.close()
    finally:
        if daemon is not None:
            daemon.stop()

    gib = total / 2**30
    rows = [
        ("memcpy (numpy copyto)", copy_s),
        ("shared-memory Get (view)", shm_s),
        ("gRPC Get into a buffer", get_s),
    ] + [(f"gRPC Get, {n} connections", t) for n, t in streams_s.items()] + [
        ("gRPC Get, new array", alloc_s),
        ("gRPC Put (once, not median)", put_s),
    ]
    print(f"Get of {args.tokens} tokens = {blocks} blocks x {bb / 2**20:.2f} MiB = {gib:.3f} GiB "
          f"({args.layers} layers, {args.kv_heads} kv heads, head_dim {args.head_dim}, "
          f"{args.dtype}); median of {args.reps} after {args.warmup} warm-up; {platform.node()}")
    print(f"{'path':<30} {'ms':>10} {'GB/s':>8} {'x memcpy':>9}")
    for name, s in rows:
        print(f"{name:<30} {s * 1e3:>10.2f} {total / s / 1e9:>8.2f} {s / copy_s:>9.2f}")
    print(f"shared memory vs gRPC bytes into a buffer: {get_s / shm_s:.2f}x faster (target >= 3x)")
    print(json.dumps({
        "bench": "python_get", "tokens": args.tokens, "blocks": blocks, "block_bytes": bb,
        "bytes": total, "dtype": args.dtype, "reps": args.reps,
        "memcpy_ms": copy_s * 1e3, "get_into_ms": get_s * 1e3, "get_alloc_ms": alloc_s * 1e3,
        "put_ms": put_s * 1e3, "get_into_gbps": total / get_s / 1e9,
        "shm_get_ms": shm_s * 1e3, "shm_get_gbps": total / shm_s / 1e9,
        "shm_speedup_over_grpc": get_s / shm_s, "shm_times_ms": [t * 1e3 for t in shm_all],
        "memcpy_gbps": total / copy_s / 1e9, "get_over_memcpy": get_s / copy_s,
        "get_times_ms": [t * 1e3 for t in get_all], "bytes_match": ok,
        "get_streams_ms": {n: t * 1e3 for n, t in streams_s.items()},
        "daemon_bytes_out": stats.bytes_out, "host": platform.node()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
