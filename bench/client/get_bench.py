"""A gRPC Get through the Python client, over 1 and several connections (`streams`): a
Llama-3-8B-shaped model (32 layers, 8 KV heads, head_dim 128, bf16), a prefix of --tokens put once,
then --reps Gets of it into a reused numpy buffer for each stream count, the counts alternating
round by round. Checks the bytes of every count once (buffer poisoned first); prints medians and
minima in ms and GB/s, then a JSON line. Starts its own ropekvd (--ropekvd, or $ROPEKVD) with the
daemon flags given after `--`.

  ROPEKVD=build/ropekvd PYTHONPATH=build/python /usr/bin/python3 bench/client/get_bench.py \\
      [--tokens 4096] [--reps 5] [--streams 1,2,4,8]
"""

import argparse
import json
import os
import time

import numpy as np

from llama_daemon import llama_daemon


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ropekvd", default=os.environ.get("ROPEKVD", "ropekvd"))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--port", type=int, default=50435)
    p.add_argument("daemon_flags", nargs="*")
    a = p.parse_args()
    counts = [int(s) for s in a.streams.split(",")]
    layers, blocks = 32, a.tokens // 16
    with llama_daemon(a.ropekvd, a.port, layers, f"{blocks * 2 + 256}MiB",
                      a.daemon_flags) as client:
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 50000, a.tokens).tolist()
        kv = rng.integers(0, 1 << 15, (blocks, layers, 2, 8, 16, 128), dtype=np.uint16) & 0xBF7F
        client.put("m", tokens, kv)
        out = np.empty_like(kv)
        for s in counts:
            out.fill(0xFFFF)
            header, _ = client.get("m", tokens, out=out, streams=s)
            if header.blocks != blocks or not np.array_equal(out, kv):
                raise SystemExit(f"Get over {s} connections: wrong bytes")
        ms = {s: [] for s in counts}
        for _ in range(a.reps):
            for s in counts:
                t0 = time.perf_counter()
                client.get("m", tokens, out=out, streams=s)
                ms[s].append((time.perf_counter() - t0) * 1e3)
        print(f"{a.tokens} tokens, {kv.nbytes / 2**30:.3f} GiB; daemon "
              f"{' '.join(a.daemon_flags) or 'defaults'}; bytes checked for every count")
        print(f"{'connections':>12} {'median ms':>10} {'min ms':>8} {'GB/s':>6}")
        for s in counts:
            med = float(np.median(ms[s]))
            print(f"{s:>12} {med:>10.1f} {min(ms[s]):>8.1f} {kv.nbytes / med / 1e6:>6.2f}")
        print(json.dumps({"bench": "python_get_streams", "tokens": a.tokens, "bytes": kv.nbytes,
                          "reps": a.reps,
                          "median_ms": {s: round(float(np.median(ms[s])), 2) for s in counts},
                          "min_ms": {s: round(min(ms[s]), 2) for s in counts}}))


if __name__ == "__main__":
    main()
