"""One layer's Selects for a decode batch through gRPC and the Python client: --batch sequences,
each its own prefix of --tokens tokens of a Llama-3-8B-shaped model (8 KV heads, head_dim 128,
bf16) put once and named by its last block's hash, each its own 32 fp32 query heads, k 256. Times
the three ways a frontend can ask: one select() after another, one select() a thread (--batch
threads on one channel), and one select_batch(). With --gather (a model of --layers layers),
also a decode step's selections with their K/V at every layer written into one registered buffer
(shared memory, or with --cuda a torch CUDA tensor), each sequence at its own offset: select(keep)
then gather(out=) a sequence at a time, against select_batch(keep) then one gather_batch(). Starts
its own ropekvd (--ropekvd, or $ROPEKVD) with the daemon flags given after `--`; prints medians
and minima in ms over --reps rounds, and checks that every way selected (and wrote) the same.

  ROPEKVD=build/ropekvd PYTHONPATH=build/python /usr/bin/python3 \\
      bench/client/select_batch_bench.py [--batch 32] [--tokens 4096] [--reps 9] \\
      [--gather --layers 4 [--cuda]] [-- flags]
"""

import argparse
import concurrent.futures
import os
import time

import numpy as np

from llama_daemon import llama_daemon


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ropekvd", default=os.environ.get("ROPEKVD", "ropekvd"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--port", type=int, default=50433)
    p.add_argument("--gather", action="store_true")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--cuda", action="store_true")
    p.add_argument("daemon_flags", nargs="*")
    a = p.parse_args()
    host = f"{max(2, a.batch * a.tokens * a.layers * 4096 * 2 // (1 << 30) + 1)}GiB"
    with llama_daemon(a.ropekvd, a.port, a.layers, host, a.daemon_flags) as client:
        rng = np.random.default_rng(1)
        items = []
        for _ in range(a.batch):
            tokens = rng.integers(0, 50000, a.tokens).tolist()
            kv = rng.standard_normal((a.tokens // 16, a.layers, 2, 8, 16, 128)).astype(np.float32)
            put = client.put("m", tokens, (kv.view(np.uint32) >> 16).astype(np.uint16))
            q = rng.standard_normal((32, 128)).astype(np.float32)
            items.append(dict(queries=q, k=256, last_block=put.block_hashes[-1]))
        common = dict(model="m", layer=0, n_sink=4, n_local=64)
        pool = concurrent.futures.ThreadPoolExecutor(a.batch)

        def one_by_one():
            return [client.select(**common, **it) for it in items]

        def threads():
            return list(pool.map(lambda it: client.select(**common, **it), items))

        def batch():
            return client.select_batch(items, **common)

        label = " ".join(a.daemon_flags) or "defaults"
        print(f"daemon: {label}; batch {a.batch} x {a.tokens} tokens, k 256, exact")
        time_ways(a, [("select, one by one", one_by_one), ("select, a thread each", threads),
                      ("select_batch", batch)],
                  lambda got: [[r.tolist() for r in sel.indices] for sel in got])
        if a.gather:
            gather_step(client, a, items, common)
        s = client.retrieval.stats()
        print(f"selects {s.selects}, gpu_selects {s.gpu_selects}")


def gather_step(client, a, items, common):
    """Times a decode step's selections and their K/V at every layer into one buffer."""
    layers = list(range(a.layers))
    first = client.select(**common, **items[0])
    per_seq = a.layers * 2 * len(first.indices) * first.header.capacity * 128 * 2
    if a.cuda:
        import torch
        tensor = torch.zeros(per_seq * a.batch, dtype=torch.uint8, device="cuda")
        buf = client.register_cuda(tensor)
        snapshot = lambda: tensor.clone()
    else:
        buf = client.create_shm(per_seq * a.batch)
        snapshot = lambda: buf.array(np.uint8, (per_seq * a.batch,)).copy()

    def one_by_one():
        for i, it in enumerate(items):
            sel = client.select(**common, keep=True, **it)
            client.retrieval.gather(sel.selection_id, layers, out=(buf, i * per_seq))

    def batch():
        sels = client.select_batch(items, keep=True, **common)
        got = client.retrieval.gather_batch(
            [(s.selection_id, layers, (buf, i * per_seq)) for i, s in enumerate(sels)])
        bad = [g for g in got if isinstance(g, Exception)]
        if bad:
            raise bad[0]

    print(f"select + gather of {a.layers} layers into one {'CUDA' if a.cuda else 'shared-memory'}"
          f" buffer ({per_seq * a.batch / 1e6:.1f} MB)")
    with buf:
        time_ways(a, [("select + gather, one by one", one_by_one),
                      ("select_batch + gather_batch", batch)],
                  lambda _: snapshot(), lambda x, y: bool((x == y).all()))


def time_ways(a, ways, outcome, equal=lambda x, y: x == y):
    """Runs each (name, way) --reps times a pass and prints its median and minimum, ms, and the
    median per sequence; what outcome() makes of a way's last answer must be equal for all."""
    print(f"{'pass':>4} {'way':<28} {'median_ms':>9} {'min_ms':>7} {'per_seq_ms':>10}")
    want = None
    for n in range(a.passes):
        for name, way in ways:
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                got = way()
                ts.append(time.perf_counter() - t0)
            got = outcome(got)
            if want is None:
                want = got
            elif not equal(got, want):
                raise SystemExit(f"{name}: another outcome than the first way's")
            ts.sort()
            med = ts[len(ts) // 2] * 1e3
            print(f"{n + 1:>4} {name:<28} {med:9.2f} {ts[0] * 1e3:7.2f} {med / a.batch:10.3f}",
                  flush=True)

if __name__ == "__main__":
    main()
