"""Select through gRPC and the Python client: one layer of a Llama-3-8B-shaped model (8 KV heads,
head_dim 128, bf16), a prefix of --tokens put once, then --reps Selects of k 256 with 32 fp32
query heads per mode, the prefix named by its tokens and by its last block's hash. Starts its own
ropekvd (--ropekvd, or $ROPEKVD) with the daemon flags given after `--`; prints medians and
minima in ms.

  ROPEKVD=build/ropekvd PYTHONPATH=build/python /usr/bin/python3 bench/client/select_bench.py \\
      [--tokens 32768] [--reps 15] [--passes 2] [-- --write_tier=gpu]
"""

import argparse
import os
import time

import numpy as np

from llama_daemon import llama_daemon


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ropekvd", default=os.environ.get("ROPEKVD", "ropekvd"))
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--port", type=int, default=50431)
    p.add_argument("daemon_flags", nargs="*")
    a = p.parse_args()
    with llama_daemon(a.ropekvd, a.port, 1, "2GiB", a.daemon_flags) as client:
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 50000, a.tokens).tolist()
        kv = rng.standard_normal((a.tokens // 16, 1, 2, 8, 16, 128)).astype(np.float32)
        put = client.put("m", tokens, (kv.view(np.uint32) >> 16).astype(np.uint16))
        q = rng.standard_normal((32, 128)).astype(np.float32)
        label = " ".join(a.daemon_flags) or "defaults"
        print(f"daemon: {label}; {a.tokens} tokens")
        print(f"{'pass':>4} {'mode':<17} {'source':<11} {'median_ms':>9} {'min_ms':>7}")
        for n in range(a.passes):
            for mode in ("bound", "exact", "bound_then_exact"):
                for source in ("tokens", "last_block"):
                    kw = (dict(tokens=tokens) if source == "tokens"
                          else dict(last_block=put.block_hashes[-1]))
                    ts = []
                    for _ in range(a.reps):
                        t0 = time.perf_counter()
                        client.select(q, 256, model="m", mode=mode, layer=0, **kw)
                        ts.append(time.perf_counter() - t0)
                    ts.sort()
                    print(f"{n + 1:>4} {mode:<17} {source:<11} {ts[len(ts) // 2] * 1e3:9.2f} "
                          f"{ts[0] * 1e3:7.2f}", flush=True)
        s = client.retrieval.stats()
        print(f"gpu_selects {s.gpu_selects}, gpu_keys_in_place {s.gpu_keys_in_place}, "
              f"metadata_prefix_view_hits {s.metadata_prefix_view_hits}")


if __name__ == "__main__":
    main()
