#!/usr/bin/env python3
"""Benchmark: Put throughput through the daemon, by disk tier setting — no disk tier, write-through
with `--disk_durability memory`, write-through with `sync` (the default) — for one daemon binary
and any number of others in the same run (--baseline [LABEL=]BINARY, repeatable: e.g. older
builds), alternating.

Each Put stores a fresh prompt (all its blocks new) of a Llama-3-8B-shaped KV cache from a
registered shared-memory region, so that the time is the daemon's storage path, not gRPC bytes.
Default: 4096 tokens = 256 blocks of 2 MiB = 0.5 GiB a Put.

    python3 clients/python/bench_put.py --ropekvd build/ropekvd [--baseline old/ropekvd]

With a disk tier, the daemon is then restarted on the same data folder and every stored prompt
is read back once into a registered shared-memory region (GetToBuffer), its blocks coming from
disk (the OS page cache is warm: they were just written): "get after restart".

Prints a table (median GB/s over --reps Puts after --warmup) and one JSON line. Needs the ropekv
package on PYTHONPATH (<build>/python).
"""

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import ropekv
from ropekv import arrays
from ropekv._pb import pb

SETTINGS = [
    ("no disk tier", ["--disk_enabled=false"]),
    ("disk, memory", ["--disk_durability=memory"]),
    ("disk, sync", ["--disk_durability=sync"]),
]


def run(binary, flags, spec, src, tokens_per_put, reps, warmup, seed, extra):
    """Seconds of each timed Put (fresh prompts) on a fresh daemon started with `flags`, and of
    each Get of those prompts after a restart (disk tier only)."""
    total = src.nbytes
    data_dir = tempfile.mkdtemp(prefix="ropekv-bench-put-data-")
    args = ["--host_capacity", str((reps + warmup + 1) * total),
            "--disk_capacity", str((reps + warmup + 1) * total), *flags, *extra,
            f"--data_dir={data_dir}"]
    prompts = []
    daemon = ropekv.LocalDaemon(binary, *args, prefix="ropekv-bench-put-")
    try:
        client = ropekv.Client(daemon.address, timeout=600)
        client.wait_ready(timeout=30)
        model = client.register_model(spec, name="bench-put-llama3-8b").model_id
        shm = client.create_shm(total)
        shm.array(np.uint8, (total,))[:] = src
        rng = np.random.default_rng(seed)
        times = []
        for i in range(warmup + reps):
            tokens = rng.integers(0, 128000, size=tokens_per_put).tolist()
            prompts.append(tokens)
            t0 = time.perf_counter()
            resp = client.put_from_buffer(model, tokens, shm)
            s = time.perf_counter() - t0
            if resp.blocks_stored != tokens_per_put // spec.block_tokens:
                sys.exit(f"a Put stored {resp.blocks_stored} blocks")
            if i >= warmup:
                times.append(s)
        # The last prompt reads back whole from the daemon (from the host tier).
        out = np.zeros(total, np.uint8)
        header, _ = client.get(model, tokens, out=out)
        if header.blocks != tokens_per_put // spec.block_tokens or not np.array_equal(out, src):
            sys.exit("the last Put reads back other bytes")
        shm.close()
        disk = [t for t in client.stats().tiers if t.tier == pb.TIER_DISK]
        disk_blocks = disk[0].blocks if disk else 0
        client.close()
        daemon.stop()
        gets = []
        if disk_blocks:
            daemon = ropekv.LocalDaemon(binary, *args, prefix="ropekv-bench-put-")
            client = ropekv.Client(daemon.address, timeout=600)
            client.wait_ready(timeout=30)
            shm = client.create_shm(total)
            for tokens in prompts[warmup:]:
                t0 = time.perf_counter()
                header, _ = client.get(model, tokens, out=shm)
                gets.append(time.perf_counter() - t0)
                if header.blocks != tokens_per_put // spec.block_tokens:
                    sys.exit(f"a Get after the restart answered {header.blocks} blocks")
            if not np.array_equal(shm.array(np.uint8, (total,)), src):
                sys.exit("a Get after the restart answered other bytes")
            shm.close()
            client.close()
        return times, gets, disk_blocks
    finally:
        daemon.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ropekvd", required=True, help="daemon binary")
    ap.add_argument("--baseline", action="append", default=[],
                    help="[LABEL=]BINARY of another daemon, timed alternately (repeatable)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens a Put")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--daemon-flags", default="", help="more daemon flags, space-separated")
    args = ap.parse_args()

    spec = ropekv.model_spec(layers=32, kv_heads=8, head_dim=128, dtype="bf16", block_tokens=16,
                             rope={"type": "llama3", "theta": 500000.0, "factor": 8.0,
                                   "original_max_position_embeddings": 8192})
    blocks = args.tokens // spec.block_tokens
    total = blocks * arrays.block_bytes(spec)
    src = np.frombuffer(np.random.default_rng(0).bytes(total), np.uint8)

    binaries = [("new", args.ropekvd)]
    for i, b in enumerate(args.baseline):
        label, _, path = b.rpartition("=")
        binaries.append((label or f"baseline{i + 1}", path))
    results = {}  # (binary, setting) -> seconds
    get_results = {}
    disk_blocks = {}
    for p in range(args.passes):
        for label, binary in binaries:
            for name, flags in SETTINGS:
                times, gets, db = run(binary, flags, spec, src, args.tokens, args.reps,
                                      args.warmup, p, args.daemon_flags.split())
                results.setdefault((label, name), []).extend(times)
                get_results.setdefault((label, name), []).extend(gets)
                disk_blocks[(label, name)] = db

    print(f"Put of {args.tokens} tokens = {blocks} blocks = {total / 2**30:.3f} GiB, fresh prompt "
          f"each; median of {args.reps} x {args.passes} passes after {args.warmup} warm-up; "
          f"{platform.node()}")
    print(f"{'daemon':<12} {'setting':<14} {'put ms':>9} {'GB/s':>7} {'x no disk':>10} "
          f"{'disk blocks':>12} {'get after restart ms':>21} {'GB/s':>7}")
    rows = []
    for label, _ in binaries:
        base = statistics.median(results[(label, SETTINGS[0][0])])
        for name, _ in SETTINGS:
            s = statistics.median(results[(label, name)])
            gets = get_results[(label, name)]
            g = statistics.median(gets) if gets else None
            get_cols = f"{g * 1e3:>21.1f} {total / g / 1e9:>7.2f}" if g else f"{'-':>21} {'-':>7}"
            print(f"{label:<12} {name:<14} {s * 1e3:>9.1f} {total / s / 1e9:>7.2f} "
                  f"{s / base:>10.2f} {disk_blocks[(label, name)]:>12} {get_cols}")
            rows.append({"daemon": label, "setting": name, "median_ms": s * 1e3,
                         "gbps": total / s / 1e9,
                         "times_ms": [t * 1e3 for t in results[(label, name)]],
                         "get_after_restart_ms": [t * 1e3 for t in gets]})
    print(json.dumps({"bench": "python_put", "tokens": args.tokens, "bytes": total,
                      "reps": args.reps, "passes": args.passes, "rows": rows,
                      "host": platform.node()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
