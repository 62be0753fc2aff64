#!/usr/bin/env python3
"""The editor loop (PIE) through ropekvd's sessions with a transformers model.

An editor's completion server keeps the KV cache of an open file in a ropekv session. On every
edit it sends the edit, encodes only the new tokens (over the cached prefix), fills their KV, and
reads the edited file's KV back: every suffix key moved to its new position by the daemon, in one
rotation from the stored copy. A tiny random-weight LlamaForCausalLM (no download) plays the
model; after each edit the script compares the session's layer-0 keys with a re-encode of the
edited file (layer 0 does not depend on context: they agree to rounding) and prints the next
token by PIE and by re-encoding (deeper layers are PIE's approximation: they may differ).

    python3 editor_loop.py --ropekvd build/ropekvd [--tokens 256] [--edits 5]
    python3 editor_loop.py --address 127.0.0.1:50051

Needs torch and transformers (skips politely without them), grpcio, protobuf, numpy, and the
ropekv package on PYTHONPATH (<build>/python).
"""

import argparse
import os
import sys

import numpy as np

import ropekv


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--address", help="a running ropekvd (else --ropekvd starts one)")
    ap.add_argument("--ropekvd", default=os.environ.get("ROPEKVD", "ropekvd"))
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"editor_loop: needs torch and transformers ({e}); skipping")
        return 0
    import ropekv.hf as rhf

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=4096)
    model = transformers.LlamaForCausalLM(config).eval()  # fp32, CPU: exact enough to compare

    def encode(ids, cache=None, start=0):
        """One forward of `ids` at positions start.. over `cache`: (logits of the last, cache)."""
        cache = cache if cache is not None else transformers.DynamicCache()
        pos = torch.arange(start, start + len(ids))[None]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), position_ids=pos, use_cache=True,
                        **rhf.cache_kwargs(model, cache))
        return out.logits[0, -1], rhf.output_cache(out)

    def range_kv(cache, a, b):
        """Tokens [a, b) of a cache as [layers, 2, kv_heads, n, head_dim]."""
        return torch.stack([torch.stack((k[0, :, a:b], v[0, :, a:b]))
                            for k, v in rhf.layer_kv(cache)])

    def cache_of(kv):
        """A DynamicCache holding range-layout KV [layers, 2, kv_heads, n, head_dim]."""
        cache = transformers.DynamicCache()
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0][None].contiguous(), kv[layer, 1][None].contiguous(), layer)
        return cache

    daemon = None
    address = args.address
    if address is None:
        daemon = ropekv.LocalDaemon(args.ropekvd, "--disk_enabled=false", prefix="ropekv-editor-")
        address = daemon.address
    try:
        client = ropekv.Client(address)
        client.wait_ready()
        model_id = client.register_model(rhf.spec_from_config(config, dtype=torch.float32),
                                         name="editor-loop").model_id
        s = client.sessions
        rng = np.random.default_rng(args.seed)
        file = rng.integers(0, config.vocab_size, args.tokens).tolist()

        # Open: prefill the file once and hand its KV to the daemon.
        _, cache = encode(file)
        sid = s.open(model_id, file, range_kv(cache, 0, len(file))).id
        print(f"opened session {sid}: {len(file)} tokens")
        print(f"{'edit':>4} {'op':>22} {'fill':>12} {'layer-0 key err':>16} {'next: PIE / re-encode':>22}")
        for e in range(args.edits):
            # A rewritten "line": replace a few tokens somewhere by a few others.
            at = int(rng.integers(0, len(file) - 8))
            removed, added = int(rng.integers(0, 6)), int(rng.integers(1, 9))
            new = rng.integers(0, config.vocab_size, added).tolist()
            ed = s.edit(sid, [s.replace(at, at + removed, new)])
            file = file[:at] + new + file[at + removed:]
            # Encode only what the session asks for, over the session's own prefix KV.
            for a, b in ed.fill:
                prefix = cache_of(torch.from_numpy(s.read(sid, 0, a).copy())) if a > 0 else None
                _, c = encode(file[a:b], prefix, start=a)
                s.fill(sid, a, b, range_kv(c, a, b))
            # The edited file's KV from the daemon; the next token over it (the last token
            # re-encoded at its position), against re-encoding the edited file.
            kv = torch.from_numpy(s.read(sid).copy())
            pie_logits, _ = encode(file[-1:], cache_of(kv[:, :, :, :-1]), start=len(file) - 1)
            ref_logits, ref = encode(file)
            ref_kv = range_kv(ref, 0, len(file))
            err = float((kv[0, 0] - ref_kv[0, 0]).abs().max() / ref_kv[0, 0].abs().max())
            print(f"{e:>4} {f'replace [{at}, {at + removed}) by {added}':>22} "
                  f"{str(ed.fill):>12} {err:>16.2e} "
                  f"{f'{int(pie_logits.argmax())} / {int(ref_logits.argmax())}':>22}")
            if err > 1e-5:
                print("layer-0 keys differ from a re-encode: FAIL")
                return 1
        s.close(sid)
        return 0
    finally:
        if daemon is not None:
            daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
