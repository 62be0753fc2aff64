"""Gather of a kept selection through the Python client: a Llama-3-8B-shaped model (32 layers, 8
KV heads, head_dim 128, bf16), a prefix of --tokens put once, one exact Select of k 256 with 32
query heads kept, then --reps gathers of all 32 layers: into a registered CUDA buffer (a torch
tensor; DataPlane.GatherToBuffer, which gathers on the GPU when the prefix sits in the GPU tier on
the buffer's device: start the daemon with `-- --write_tier=gpu`) and as gRPC bytes
(Retrieval.Gather). Checks that both give the same bytes; prints medians and minima in ms. Starts
its own ropekvd (--ropekvd, or $ROPEKVD) with the daemon flags given after `--`.

  ROPEKVD=build/ropekvd PYTHONPATH=build/python python3 bench/client/gather_bench.py \\
      [--tokens 32768] [--reps 15] [-- --write_tier=gpu --gpu_capacity=6GiB]
"""

import argparse
import os
import time

import numpy as np
import torch

from llama_daemon import llama_daemon
from ropekv import shm as _shm


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ropekvd", default=os.environ.get("ROPEKVD", "ropekvd"))
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--port", type=int, default=50433)
    p.add_argument("daemon_flags", nargs="*")
    a = p.parse_args()
    layers, blocks = 32, a.tokens // 16
    with llama_daemon(a.ropekvd, a.port, layers, f"{blocks * 2 + 256}MiB",
                      a.daemon_flags) as client:
        rng = np.random.default_rng(1)
        tokens = rng.integers(0, 50000, a.tokens).tolist()
        # Random finite bf16 words, one block (2 MiB) pattern per 64 blocks to keep the put cheap.
        words = rng.integers(0, 1 << 15, (64, layers, 2, 8, 16, 128), dtype=np.uint16) & 0xBF7F
        kv = np.concatenate([words] * (blocks // 64 + 1))[:blocks]
        client.put("m", tokens, kv)
        q = rng.standard_normal((32, 128)).astype(np.float32)
        sel = client.select(q, 256, model="m", mode="exact", layer=0, tokens=tokens, keep=True)
        want_k, want_v = client.retrieval.gather(sel.selection_id, list(range(layers)))
        nbytes = 2 * want_k.nbytes
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        buf = client.register_cuda(dst)
        req = _shm.dpb.GatherToBufferRequest(selection_id=sel.selection_id,
                                             layers=list(range(layers)),
                                             dst=_shm.buffer_range(buf, 0))
        r = client._call(client.dataplane.GatherToBuffer, req)
        torch.cuda.synchronize()
        got = dst.cpu().numpy().reshape(layers, 2, -1)
        same = (np.array_equal(got[:, 0], want_k.reshape(layers, -1).view(np.uint8)) and
                np.array_equal(got[:, 1], want_v.reshape(layers, -1).view(np.uint8)))
        label = " ".join(a.daemon_flags) or "defaults"
        print(f"daemon: {label}; {a.tokens} tokens, {layers} layers, k 256, "
              f"{r.layer_bytes * layers / 1e6:.1f} MB gathered; on_device {r.on_device}; "
              f"same bytes as Retrieval.Gather: {same}")
        rows = (("GatherToBuffer into a CUDA buffer",
                 lambda: client._call(client.dataplane.GatherToBuffer, req)),
                ("Retrieval.Gather (gRPC bytes)",
                 lambda: client.retrieval.gather(sel.selection_id, list(range(layers)))))
        for name, fn in rows:
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            ts.sort()
            print(f"{name:<36} median {ts[len(ts) // 2] * 1e3:8.2f} ms  min {ts[0] * 1e3:8.2f} ms",
                  flush=True)
        client.unregister_buffer(buf)


if __name__ == "__main__":
    main()
