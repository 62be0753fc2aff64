#!/usr/bin/env python3
"""Time to the next token after a one-line edit in a 32K-token file, end to end: a transformers
frontend that keeps its KV in one CUDA buffer and lets ropekvd (a separate process, the packed
daemon) shift and re-rotate the edited file's suffix straight into that buffer, against
re-encoding the edited file. Issue 5's end-to-end benchmark, through the Python client.

The frontend (what an editor's completion server does with ropekv):
  once     prefill the file into its KV buffer [layer][k|v][kv_head][capacity][head_dim] (bf16,
           torch CUDA tensor, registered with the daemon by CUDA IPC) and open a session from it
           (the daemon copies the KV device to device)
  per edit (timed)
    1. Sessions.Edit: replace 10 tokens at --at by 16 new ones (a rewritten line, Δ = +6); the
       answer names the 16 new tokens as the range to compute
    2. DataPlane.ReadToBuffer: the daemon writes the suffix [at+16, n-1) of the edited file into
       the buffer at its new token offset, every key moved by R(Δ) from its stored copy in one
       fused device-to-device pass (values copied as they are)
    3. one forward of 17 tokens: the 16 new ones (positions at..at+15, causal among themselves,
       seeing the prefix) and the file's last token (position n-1, seeing everything), with a 4D
       mask; their K/V go straight into the buffer slots of their positions (a Cache that writes
       in place: no concatenation of the 32K-token history), so the buffer holds the whole edited
       file afterwards -> the next token
  after the token (timed separately): DataPlane.FillFromBuffer stores the 16 new tokens' KV in
  the session (the daemon copies them device to device), so the next edit finds no holes.

  reencode: one forward of the whole edited file (no cache) -> its last token's logits.

Checks: the layer-0 keys of the buffer equal the re-encode's to bf16 rounding (layer 0 does not
depend on context; prefix and new tokens are computed, the suffix is re-rotated by the daemon),
and both paths' next tokens. Model: LlamaForCausalLM, random weights, bf16, Llama-3-8B shape
(see pie_e2e.py's build_model). Prints a table and one JSON line ("JSON {...}").

    python3 bench/torch/pie_e2e_ropekv.py --ropekvd PATH --pythonpath build/python
        [--tokens 32768] [--layers 32] [--at N] [--reps 5] [--tiny --device cpu|cuda]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pie_e2e import build_model, cache_kw, layer_kv, out_cache  # noqa: E402

EDIT_REMOVED = 10
EDIT_NEW = 16


def make_buffer_cache(buf):
    """A transformers Cache over the frontend's KV buffer buf [L, 2, H, C, D]: update() writes the
    new keys and values into the slots set by `place` and returns views of the first `length`
    tokens of the layer (no copy of the history). Subclasses DynamicCache so that transformers
    accepts it wherever a Cache goes."""
    from transformers import DynamicCache

    class BufferCache(DynamicCache):
        def __init__(self):
            try:
                super().__init__()
            except TypeError:  # versions whose DynamicCache needs arguments
                pass
            self.buf = buf
            self.slots = None
            self.length = 0

        def place(self, slots, length):
            self.slots, self.length = slots, length

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            kv = self.buf[layer_idx]
            kv[0, :, self.slots] = key_states[0]
            kv[1, :, self.slots] = value_states[0]
            return kv[0, :, : self.length][None], kv[1, :, : self.length][None]

        def get_seq_length(self, layer_idx=0, *args, **kwargs):
            return self.length

        def get_mask_sizes(self, *args, **kwargs):
            return self.length, 0

    return BufferCache()


def pie_mask(at, n, device):
    """[1, 1, 17, n] bool: rows 0..15 are the new tokens at at..at+15 (they see the prefix and the
    new tokens up to themselves), row 16 the last token at n-1 (it sees everything)."""
    m = torch.zeros(EDIT_NEW + 1, n, dtype=torch.bool, device=device)
    m[:EDIT_NEW, :at] = True
    m[:EDIT_NEW, at:at + EDIT_NEW] = torch.tril(
        torch.ones(EDIT_NEW, EDIT_NEW, dtype=torch.bool, device=device))
    m[EDIT_NEW] = True
    return m[None, None]


def synchronize(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ropekvd", required=True)
    ap.add_argument("--pythonpath", default="", help="where the ropekv package is (build/python)")
    ap.add_argument("--daemon-arg", action="append", default=[],
                    help="extra ropekvd flag (repeatable)")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--at", type=int, default=-1, help="edit position (default: tokens // 2)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a small model: smoke test of the script")
    args = ap.parse_args()
    if args.pythonpath:
        sys.path.insert(0, os.path.abspath(args.pythonpath))
    import ropekv
    import ropekv.hf as rhf
    from ropekv import sessions as rs

    dev = torch.device(args.device)
    torch.manual_seed(0)
    model, config = build_model(args.layers, dev, args.tiny)
    n_old = args.tokens
    at = args.at if args.at >= 0 else n_old // 2
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (n_old,), generator=g).to(dev)
    new_tokens = torch.randint(0, config.vocab_size, (EDIT_NEW,), generator=g).to(dev)
    edited = torch.cat((tokens[:at], new_tokens, tokens[at + EDIT_REMOVED:]))
    n = edited.numel()
    L, H = config.num_hidden_layers, config.num_key_value_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    capacity = n_old + 64

    # The frontend's KV buffer, filled by a prefill of the original file (untimed).
    buf = torch.empty((L, 2, H, capacity, D), dtype=torch.bfloat16, device=dev)
    cache = make_buffer_cache(buf)
    with torch.no_grad():
        cache.place(torch.arange(n_old, device=dev), n_old)
        model.model(input_ids=tokens[None], position_ids=torch.arange(n_old, device=dev)[None],
                    use_cache=True, **{cache_kw(model): cache})
    synchronize(dev)

    daemon = ropekv.LocalDaemon(args.ropekvd, *args.daemon_arg, prefix="ropekv-pie-")
    client = ropekv.Client(daemon.address)
    shared = None
    try:
        client.wait_ready()
        spec = rhf.spec_from_config(config, dtype=torch.bfloat16)
        model_id = client.register_model(spec).model_id
        if dev.type == "cuda":
            shared = client.register_cuda(buf)
        else:  # a smoke test on the CPU: the same flow over a shared-memory buffer
            shared = client.create_shm(buf.numel() * buf.element_size())
            shm_buf = shared.tensor(torch.bfloat16, tuple(buf.shape))
            shm_buf.copy_(buf)
            buf = shm_buf
            cache.buf = buf
        sessions = client.sessions
        toks = tokens.tolist()
        new_list = new_tokens.tolist()
        mask = pie_mask(at, n, dev)
        pos = torch.cat((torch.arange(at, at + EDIT_NEW, device=dev),
                         torch.tensor([n - 1], device=dev)))[None]
        inputs = torch.cat((new_tokens, edited[-1:]))[None]

        # The file's session, opened once from the buffer (device to device); every repetition
        # edits a snapshot of it (KV shared, nothing copied). The buffer need not be restored:
        # each step rewrites all of [0, n) from the same inputs.
        base = sessions.open_from_buffer(model_id, toks, shared, capacity=capacity)

        def pie_step(sid, timings=None):
            t0 = time.perf_counter()
            ed = sessions.edit(sid, [rs.replace(at, at + EDIT_REMOVED, new_list)])
            assert [tuple(r) for r in ed.fill] == [(at, at + EDIT_NEW)], ed.fill
            t1 = time.perf_counter()
            sessions.read_to_buffer(sid, shared, start=at + EDIT_NEW, end=n - 1,
                                    capacity=capacity, token_offset=at + EDIT_NEW)
            t2 = time.perf_counter()
            with torch.no_grad():
                cache.place(pos[0], n)
                out = model.model(input_ids=inputs, position_ids=pos, attention_mask=mask,
                                  use_cache=True, **{cache_kw(model): cache})
                logits = model.lm_head(out.last_hidden_state[:, -1])
                nxt = int(logits.argmax(-1))  # syncs
            t3 = time.perf_counter()
            if timings is not None:
                timings.append(dict(edit_ms=1e3 * (t1 - t0), read_ms=1e3 * (t2 - t1),
                                    forward_ms=1e3 * (t3 - t2), total_ms=1e3 * (t3 - t0)))
            return logits.float(), nxt

        def fill_step(sid):
            t0 = time.perf_counter()
            sessions.fill_from_buffer(sid, shared, start=at, end=at + EDIT_NEW,
                                      capacity=capacity, token_offset=at)
            return 1e3 * (time.perf_counter() - t0)

        # Warm-up, then timed repetitions (each on a fresh snapshot of the file's session).
        timings, fills = [], []
        for rep in range(args.reps + 1):
            sid = sessions.snapshot(base.id).id
            t = [] if rep > 0 else None
            pie_logits, pie_next = pie_step(sid, t)
            f = fill_step(sid)
            if rep > 0:
                timings += t
                fills.append(f)
            if rep < args.reps:
                sessions.close(sid)
        # After the last repetition: the session has no holes and the buffer holds the file.
        holes = [(r.start, r.end) for r in sessions.info(sid).fill]

        def reencode():
            with torch.no_grad():
                out = model.model(input_ids=edited[None], use_cache=False)
                logits = model.lm_head(out.last_hidden_state[:, -1])
                return logits.float(), int(logits.argmax(-1))

        reencode()
        re_ts = []
        for _ in range(args.reps):
            synchronize(dev)
            t0 = time.perf_counter()
            ref_logits, ref_next = reencode()
            synchronize(dev)
            re_ts.append(1e3 * (time.perf_counter() - t0))

        # Layer-0 keys of the buffer (after the last PIE step) vs a re-encode of the edited file.
        with torch.no_grad():
            ref = model.model(input_ids=edited[None], use_cache=True)
            ref_k0 = layer_kv(out_cache(ref), 0)[0][0].float()
        del ref
        k0 = buf[0, 0, :, :n].float()
        scale = float(ref_k0.abs().max())
        err = lambda a, b: float((a - b).abs().max()) / scale  # noqa: E731
        key_err = err(k0, ref_k0)
        suffix_err = err(k0[:, at + EDIT_NEW:], ref_k0[:, at + EDIT_NEW:])
        cos = float(torch.nn.functional.cosine_similarity(pie_logits, ref_logits).item())
    finally:
        if shared is not None and hasattr(shared, "close"):
            del buf, cache  # views of the shared memory
            shared.close()
        client.close()
        daemon.stop()

    med = lambda xs: statistics.median(xs)  # noqa: E731
    pie_ms = med([t["total_ms"] for t in timings])
    re_ms = med(re_ts)
    res = dict(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        tokens=n_old, layers=L, at=at, edit=f"replace {EDIT_REMOVED} by {EDIT_NEW}",
        reencode_ms=re_ms, pie_ms=pie_ms, speedup=re_ms / pie_ms,
        edit_ms=med([t["edit_ms"] for t in timings]),
        read_ms=med([t["read_ms"] for t in timings]),
        forward_ms=med([t["forward_ms"] for t in timings]),
        fill_after_ms=med(fills),
        moved_bytes=2 * L * H * (n - 1 - at - EDIT_NEW) * D * 2,
        layer0_key_rel_err=key_err, suffix_key_rel_err=suffix_err,
        same_next_token=pie_next == ref_next, logits_cosine=cos,
        session_device=base.device, session_holes=holes, reps=args.reps)
    print(f"{'path':<28}{'ms':>10}")
    print(f"{'re-encode':<28}{re_ms:>10.1f}")
    print(f"{'ropekv (edit+read+forward)':<28}{pie_ms:>10.1f}   {res['speedup']:.1f}x  "
          f"(edit {res['edit_ms']:.2f}, read {res['read_ms']:.2f}, "
          f"forward {res['forward_ms']:.1f}; fill after {res['fill_after_ms']:.2f})")
    print(f"layer-0 key rel err {key_err:.2e} (suffix {suffix_err:.2e}); next token "
          f"{'same' if res['same_next_token'] else 'DIFFERENT'}; logits cosine {cos:.5f}")
    print("JSON " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
