"""ropekv.Client against a real ropekvd: byte-exact round trips, shared prefixes, status codes,
re-rotation to a target position, stats, pin/evict. Every test has a tenant of its own."""

import grpc
import numpy as np
import pytest

import ropekv
from ropekv.v1 import kvcache_pb2 as pb

LAYERS, KV_HEADS, HEAD_DIM, BT = 2, 2, 64, 16


def register(client, dtype="bf16", name="", head_dim=HEAD_DIM, **rope):
    rope.setdefault("theta", 10000.0)
    return client.register_model(layers=LAYERS, kv_heads=KV_HEADS, head_dim=head_dim, dtype=dtype,
                                 block_tokens=BT, rope=rope, name=name).model_id


def random_kv(rng, blocks, dtype, head_dim=HEAD_DIM):
    shape = (blocks, LAYERS, 2, KV_HEADS, BT, head_dim)
    if dtype == "bf16":
        # Finite bf16 values (bits of fp32 normals, upper half): byte-exactness is what counts.
        return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return rng.standard_normal(shape).astype({"f16": np.float16, "f32": np.float32}[dtype])


def raw(a):
    return np.ascontiguousarray(a).view(np.uint8)


def tokens(rng, n):
    return rng.integers(0, 50000, size=n).tolist()


# -- basics --------------------------------------------------------------------------------------


def test_health_is_serving(client):
    assert client.health() == "SERVING"


def connections_to(port):
    """The local ends of the established TCP connections in this network namespace to `port`
    (/proc/net/tcp, tcp6)."""
    ends = set()
    for path in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                _, local, remote, state = line.split()[:4]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    ends.add(local)
    return ends


def test_each_client_has_its_own_connection(daemon, client):
    """Counted as connections that were not there before: others closing meanwhile do not matter."""
    port = int(daemon.rsplit(":", 1)[1])
    before = connections_to(port)
    assert before  # the session client's
    a, b = ropekv.Client(daemon, timeout=30), ropekv.Client(daemon, timeout=30)
    try:
        a.wait_ready(timeout=10)
        b.wait_ready(timeout=10)
        assert len(connections_to(port) - before) == 2
    finally:
        a.close()
        b.close()


def test_register_is_idempotent_and_listed(client):
    spec = {"layers": 3, "kv_heads": 4, "head_dim": 32, "dtype": "f16", "block_tokens": 8,
            "rope": {"type": "llama3", "theta": 500000.0, "factor": 8.0,
                     "original_max_position_embeddings": 8192}}
    first = client.register_model(spec, name="listed-llama3")
    again = client.register_model(spec)
    assert first.model_id == again.model_id and len(first.model_id) == 16
    assert first.created and not again.created
    info = {m.model_id: m for m in client.list_models()}[first.model_id]
    assert "listed-llama3" in info.names
    assert info.block_bytes == 3 * 2 * 4 * 8 * 32 * 2
    assert (info.spec.layers, info.spec.kv_heads, info.spec.head_dim, info.spec.block_tokens) == (
        3, 4, 32, 8)
    assert info.spec.dtype == pb.DTYPE_F16
    assert info.spec.rope.type == pb.ROPE_TYPE_LLAMA3 and info.spec.rope.factor == 8.0
    # A ModelSpec proto and keyword arguments name the same model.
    assert client.register_model(ropekv.model_spec(spec)).model_id == first.model_id
    assert client.register_model(**spec).model_id == first.model_id


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_put_lookup_get_byte_exact(client, tenant, dtype):
    model = register(client, dtype)
    rng = np.random.default_rng(1)
    kv = random_kv(rng, 4, dtype)
    toks = tokens(rng, 4 * BT)

    resp = client.put(model, toks, kv, tenant=tenant)
    assert (resp.blocks_stored, resp.blocks_existing) == (4, 0)
    assert len(resp.block_hashes) == 4 and all(len(h) == 32 for h in resp.block_hashes)

    # The prompt goes on past the cached blocks (and into a partial block): 64 tokens match.
    prompt = toks + tokens(rng, 20)
    look = client.lookup(model, prompt, tenant=tenant)
    assert look.matched_tokens == 64
    assert [b.hash for b in look.blocks] == list(resp.block_hashes)
    assert [b.rotated_at for b in look.blocks] == [0, 16, 32, 48]
    assert all(b.tier == pb.TIER_HOST and not b.pinned for b in look.blocks)

    header, got = client.get(model, prompt, tenant=tenant)
    assert (header.matched_tokens, header.blocks) == (64, 4)
    assert header.block_bytes == kv[0].nbytes
    assert got.shape == kv.shape
    assert got.dtype == ropekv.numpy_dtype(ropekv.model_spec(dtype=dtype).dtype)
    assert np.array_equal(raw(got), raw(kv))

    # The same bytes again are not stored twice.
    again = client.put(model, toks, kv, tenant=tenant)
    assert (again.blocks_stored, again.blocks_existing) == (0, 4)


def test_get_miss_is_empty_not_an_error(client, tenant):
    model = register(client)
    header, got = client.get(model, list(range(64)), tenant=tenant)
    assert (header.matched_tokens, header.blocks) == (0, 0)
    assert got.shape == (0, LAYERS, 2, KV_HEADS, BT, HEAD_DIM)


def test_max_blocks_and_out_buffer(client, tenant):
    model = register(client)
    rng = np.random.default_rng(2)
    kv = random_kv(rng, 3, "bf16")
    toks = tokens(rng, 3 * BT)
    client.put(model, toks, kv, tenant=tenant)
    header, got = client.get(model, toks, tenant=tenant, max_blocks=2)
    assert header.blocks == 2 and np.array_equal(raw(got), raw(kv[:2]))

    out = np.full(kv.shape, 0xFFFF, np.uint16)  # poisoned: an unwritten element fails
    header, got = client.get(model, toks, tenant=tenant, out=out)
    assert np.shares_memory(got, out) and np.array_equal(out, kv)
    with pytest.raises(ropekv.Error) as e:
        client.get(model, toks, tenant=tenant, out=np.empty(kv.nbytes - 2, np.uint8))
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_block_ranges_and_several_streams(daemon, client, tenant):
    """first_block picks a stretch of the prefix; streams > 1 reads the prefix as block ranges at
    once over connections of their own: the same bytes and infos as one stream."""
    model = register(client)
    rng = np.random.default_rng(21)
    kv = random_kv(rng, 9, "bf16")
    toks = tokens(rng, 9 * BT)
    client.put(model, toks, kv, tenant=tenant)
    assert client.lookup(model, toks, tenant=tenant).block_bytes == kv[0].nbytes
    whole, all_kv = client.get(model, toks, tenant=tenant, target_position=300)
    assert whole.blocks == 9
    for first, max_blocks, want in ((0, 0, 9), (2, 0, 7), (2, 3, 3), (7, 5, 2), (9, 0, 0),
                                    (30, 1, 0)):
        header, got = client.get(model, toks, tenant=tenant, target_position=300,
                                 first_block=first, max_blocks=max_blocks)
        assert (header.first_block, header.blocks, header.matched_tokens) == (first, want, want * BT)
        assert np.array_equal(raw(got), raw(all_kv[first:first + want]))
        assert [b.hash for b in header.block_info] == [
            b.hash for b in whole.block_info[first:first + want]]
    port = int(daemon.rsplit(":", 1)[1])
    for streams in (2, 4, 9, 40):
        for first in (0, 3):
            before = connections_to(port)
            with ropekv.Client(daemon, timeout=30) as c:
                header, got = c.get(model, toks, tenant=tenant, target_position=300,
                                    first_block=first, streams=streams)
                opened = len(connections_to(port) - before)
            assert (header.first_block, header.blocks, header.block_bytes) == (
                first, 9 - first, kv[0].nbytes)
            assert np.array_equal(raw(got), raw(all_kv[first:]))
            assert [b.hash for b in header.block_info] == [b.hash for b in whole.block_info[first:]]
            assert opened == min(streams, 9 - first)
    out = np.full(kv.shape, 0xFFFF, np.uint16)  # poisoned
    header, got = client.get(model, toks, tenant=tenant, out=out, streams=3)
    assert np.shares_memory(got, out) and np.array_equal(out, kv)
    with pytest.raises(ropekv.Error) as e:
        client.get(model, toks, tenant=tenant, out=np.empty(kv.nbytes - 2, np.uint8), streams=3)
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_several_streams_end_where_a_range_came_back_short(client, tenant, monkeypatch):
    """Blocks evicted between the lookup and the ranges: the answer ends where the prefix now
    ends, as one stream would (the lookup is made to promise more than is cached)."""
    model = register(client)
    rng = np.random.default_rng(22)
    kv = random_kv(rng, 8, "bf16")
    toks = tokens(rng, 8 * BT)
    client.put(model, toks[:5 * BT], kv[:5], tenant=tenant)
    real = client.lookup
    promised = real(model, toks, tenant=tenant)
    assert len(promised.blocks) == 5
    promised.blocks.extend(promised.blocks[:3])  # "8 blocks"

    monkeypatch.setattr(client, "lookup", lambda *a, **k: promised)
    header, got = client.get(model, toks, tenant=tenant, streams=4)  # ranges 0-1, 2-3, 4-5, 6-7
    assert (header.blocks, header.matched_tokens) == (5, 5 * BT)
    assert np.array_equal(raw(got), raw(kv[:5]))


def test_bf16_accepts_int16_bits_and_bytes(client, tenant):
    model = register(client)
    rng = np.random.default_rng(3)
    kv = random_kv(rng, 2, "bf16")
    a, b, c = tokens(rng, 2 * BT), tokens(rng, 2 * BT), tokens(rng, 2 * BT)
    client.put(model, a, kv.view(np.int16), tenant=tenant)
    client.put(model, b, kv.tobytes(), tenant=tenant)
    client.put(model, c, np.asfortranarray(kv), tenant=tenant)  # made contiguous by the client
    for t in (a, b, c):
        assert np.array_equal(raw(client.get(model, t, tenant=tenant)[1]), raw(kv))


def test_large_put_streams_in_chunks(daemon, tenant):
    # Blocks larger than a chunk, and more bytes than one message: 8 x 1 MiB with 256 KiB chunks.
    with ropekv.Client(daemon, chunk_bytes=256 << 10) as c:
        model = c.register_model(layers=8, kv_heads=8, head_dim=128, dtype="f32", block_tokens=16,
                                 rope={"theta": 10000.0}).model_id
        rng = np.random.default_rng(4)
        kv = rng.standard_normal((8, 8, 2, 8, 16, 128)).astype(np.float32)
        toks = tokens(rng, 8 * 16)
        assert c.put(model, toks, kv, tenant=tenant).blocks_stored == 8
        assert np.array_equal(raw(c.get(model, toks, tenant=tenant)[1]), raw(kv))


# -- prefixes and tenants ------------------------------------------------------------------------


def test_shared_prefix(client, tenant):
    model = register(client)
    rng = np.random.default_rng(5)
    p, x, y = tokens(rng, 2 * BT), tokens(rng, 2 * BT), tokens(rng, 2 * BT)
    kv_a = random_kv(rng, 4, "bf16")
    hashes = client.put(model, p + x, kv_a, tenant=tenant).block_hashes

    # Request B shares only P with A.
    assert client.lookup(model, p + y, tenant=tenant).matched_tokens == 2 * BT
    header, got = client.get(model, p + y, tenant=tenant)
    assert header.blocks == 2 and np.array_equal(raw(got), raw(kv_a[:2]))

    # B's own blocks hang off P's last block; then all of B is cached, at positions 32 and 48.
    kv_y = random_kv(rng, 2, "bf16")
    resp = client.put(model, y, kv_y, tenant=tenant, parent=hashes[1])
    assert resp.blocks_stored == 2
    look = client.lookup(model, p + y, tenant=tenant)
    assert look.matched_tokens == 4 * BT
    assert [b.rotated_at for b in look.blocks] == [0, 16, 32, 48]
    header, got = client.get(model, p + y, tenant=tenant)
    assert np.array_equal(raw(got), raw(np.concatenate([kv_a[:2], kv_y])))
    # The parent may be given in hex too; same chain, nothing new stored.
    assert client.put(model, y, kv_y, tenant=tenant, parent=hashes[1].hex()).blocks_existing == 2
    # A diverging token inside a block ends the match before that block.
    q = list(p)
    q[BT + 3] += 1
    assert client.lookup(model, q + y, tenant=tenant).matched_tokens == BT


def test_tenants_do_not_share(client, tenant):
    model = register(client)
    rng = np.random.default_rng(6)
    toks = tokens(rng, 2 * BT)
    client.put(model, toks, random_kv(rng, 2, "bf16"), tenant=tenant)
    assert client.lookup(model, toks, tenant=tenant).matched_tokens == 2 * BT
    assert client.lookup(model, toks, tenant=tenant + "-other").matched_tokens == 0
    assert client.get(model, toks, tenant=tenant + "-other")[0].blocks == 0


def test_model_by_name_and_by_id(client, tenant):
    model_id = register(client, "f16", name="by-name-f16")
    rng = np.random.default_rng(7)
    kv = random_kv(rng, 1, "f16")
    toks = tokens(rng, BT)
    client.put("by-name-f16", toks, kv, tenant=tenant)
    assert np.array_equal(raw(client.get(model_id, toks, tenant=tenant)[1]), raw(kv))


# -- errors --------------------------------------------------------------------------------------


def expect_error(code, fn, *args, contains="", **kwargs):
    with pytest.raises(ropekv.Error) as e:
        fn(*args, **kwargs)
    assert e.value.code == code, e.value
    assert contains in e.value.message, e.value.message
    assert isinstance(e.value, Exception) and code.name in str(e.value)
    return e.value


def test_unknown_model_is_not_found(client, tenant):
    expect_error(grpc.StatusCode.NOT_FOUND, client.lookup, "no-such-model", [1, 2], contains="no-such-model")
    expect_error(grpc.StatusCode.NOT_FOUND, client.get, "no-such-model", [1, 2])
    expect_error(grpc.StatusCode.NOT_FOUND, client.put, "no-such-model", [1] * BT,
                 np.zeros((1, LAYERS, 2, KV_HEADS, BT, HEAD_DIM), np.uint16))
    expect_error(grpc.StatusCode.NOT_FOUND, client.evict, "no-such-model")


def test_local_shape_dtype_and_count_checks(client, tenant):
    model = register(client)
    rng = np.random.default_rng(8)
    kv = random_kv(rng, 2, "bf16")
    toks = tokens(rng, 2 * BT)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    expect_error(bad, client.put, model, toks[:-1], kv, tenant=tenant, contains="need 32 tokens, got 31")
    expect_error(bad, client.put, model, toks, kv[:, :1], tenant=tenant, contains="got [2, 1, 2, 2, 16, 64]")
    expect_error(bad, client.put, model, toks, kv.astype(np.float32), tenant=tenant,
                 contains="got float32")
    expect_error(bad, client.put, model, toks, kv.tobytes()[:-2], tenant=tenant,
                 contains="multiple of the block size")
    expect_error(bad, client.put, model, toks, kv, tenant=tenant, parent="zz", contains="hex")
    expect_error(bad, client.register_model, layers=1, kv_heads=1, head_dim=8, dtype="int8",
                 block_tokens=4)
    expect_error(bad, client.register_model, layers=1, kv_heads=1, head_dim=8, colour="red")
    # Nothing was stored by the failed calls.
    assert client.lookup(model, toks, tenant=tenant).matched_tokens == 0


def test_daemon_status_codes(client, tenant):
    model = register(client)
    rng = np.random.default_rng(9)
    kv = random_kv(rng, 1, "bf16")
    toks = tokens(rng, BT)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    # The daemon's own checks (the client passes these through).
    expect_error(bad, client.register_model, layers=1, kv_heads=1, head_dim=7, dtype="f32",
                 block_tokens=4, contains="head_dim")
    expect_error(bad, client.register_model, layers=0, kv_heads=1, head_dim=8, dtype="f32",
                 block_tokens=4, contains="layers")
    expect_error(bad, client.get, model, toks, tenant=tenant, target_position=-1,
                 contains="target_position must be in [0, 2^62], got -1")
    expect_error(bad, client.put, model, toks, kv, tenant=tenant, rotated_at=-5,
                 contains="rotated_at must be >= 0")
    expect_error(bad, client.put, model, toks, kv, tenant=tenant, parent=b"short",
                 contains="32 bytes")
    expect_error(grpc.StatusCode.NOT_FOUND, client.put, model, toks, kv, tenant=tenant,
                 parent=bytes(32), contains="not cached")
    register(client, name="taken-name")
    expect_error(grpc.StatusCode.ALREADY_EXISTS, register, client, "f32", name="taken-name")


def test_unreachable_daemon_is_unavailable():
    c = ropekv.Client("127.0.0.1:1", timeout=2)
    expect_error(grpc.StatusCode.UNAVAILABLE, c.health)
    expect_error(grpc.StatusCode.UNAVAILABLE, c.wait_ready, timeout=0.2)
    expect_error(grpc.StatusCode.UNAVAILABLE, c.get, "m", list(range(32)), streams=4)
    c.close()


# -- re-rotation ---------------------------------------------------------------------------------


def bf16_to_f32(a):
    """fp32 values of bf16 data (uint16 bits or ml_dtypes.bfloat16)."""
    bits = np.ascontiguousarray(a).view(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def inv_freq32(theta, rotary_dim):
    """HF's default inv_freq in fp32: 1 / theta ** (arange(0, d, 2) / d), each op one fp32
    rounding, the pow correctly rounded (as kernels/rope does)."""
    exps = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(rotary_dim)
    pow32 = (np.float64(np.float32(theta)) ** exps.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / pow32).astype(np.float32)


def rotate_ref(keys, positions, theta, rotary_dim, layout):
    """fp64 rotation of keys [..., tokens, head_dim] by the engine's fp32 angles
    fl32(fl32(p) * inv_freq); a negative position rotates backwards (un-rotates)."""
    inv = inv_freq32(theta, rotary_dim)
    sign = np.sign(positions).astype(np.float64)[:, None]
    ang = (np.abs(positions).astype(np.float32)[:, None] * inv[None, :]).astype(np.float64) * sign
    cos, sin = np.cos(ang), np.sin(ang)  # [tokens][rotary_dim / 2]
    k = keys.astype(np.float64)
    out = k.copy()
    half = rotary_dim // 2
    if layout == "neox":
        a, b = k[..., :half], k[..., half:rotary_dim]
        out[..., :half] = a * cos - b * sin
        out[..., half:rotary_dim] = b * cos + a * sin
    else:
        a, b = k[..., 0:rotary_dim:2], k[..., 1:rotary_dim:2]
        out[..., 0:rotary_dim:2] = a * cos - b * sin
        out[..., 1:rotary_dim:2] = b * cos + a * sin
    return out


@pytest.mark.parametrize("dtype,layout,rotary_dim", [
    ("f32", "neox", 0), ("f32", "gptj", 0), ("f32", "neox", 32), ("bf16", "neox", 0)])
def test_target_position_rerotates_keys_not_values(client, tenant, dtype, layout, rotary_dim):
    theta = 10000.0
    model = register(client, dtype, layout=layout, rotary_dim=rotary_dim)
    rd = rotary_dim or HEAD_DIM
    rng = np.random.default_rng(10)
    kv = random_kv(rng, 2, dtype)
    toks = tokens(rng, 2 * BT)
    client.put(model, toks, kv, tenant=tenant)  # keys rotated at 0..31

    target = 1000
    header, got = client.get(model, toks, tenant=tenant, target_position=target)
    assert header.blocks == 2
    assert [b.rotated_at for b in header.block_info] == [0, 16]  # what is stored is unchanged
    # Values, and key dims past rotary_dim, bit for bit.
    assert np.array_equal(raw(got[:, :, 1]), raw(kv[:, :, 1]))
    assert np.array_equal(raw(got[..., 0, :, :, rd:]), raw(kv[..., 0, :, :, rd:]))

    to_f32 = bf16_to_f32 if dtype == "bf16" else (lambda a: a)
    stored = to_f32(kv[:, :, 0])  # [blocks][layers][heads][tokens][dim]
    moved = to_f32(got[:, :, 0])
    # [layers][heads][32 tokens][dim]: the keys in token order, blocks joined.
    stored = np.concatenate(list(stored), axis=2)
    moved = np.concatenate(list(moved), axis=2)
    # Token t was rotated at p = t and moves to p' = 1000 + t: k' = T(p') T(p)^T k.
    pos = np.arange(32)
    ref = rotate_ref(rotate_ref(stored, -pos, theta, rd, layout), pos + target, theta, rd, layout)
    scale = np.abs(stored).max()
    # f32: fp32 trig and products (~1e-6 relative); bf16: one rounding (2^-8 relative) plus that.
    tol = 1e-5 * scale + (np.abs(ref) * 2.0 ** -8 if dtype == "bf16" else 0)
    err = np.abs(moved - ref)
    assert (err <= tol).all(), f"max error {err.max()} (scale {scale})"
    # The test can tell positions apart: one position off is far outside the tolerance.
    off_by_one = rotate_ref(rotate_ref(stored, -pos, theta, rd, layout), pos + target + 1, theta,
                            rd, layout)
    assert (np.abs(moved - off_by_one) > tol).any()
    assert not np.array_equal(raw(got[:, :, 0]), raw(kv[:, :, 0]))

    # Stored at its own position, a key comes back bit for bit.
    _, same = client.get(model, toks, tenant=tenant, target_position=0)
    assert np.array_equal(raw(same), raw(kv))


def test_rerotation_round_trip(client, tenant):
    """Keys stored rotated at 1000 and read at 0 are the original keys (one rotation back)."""
    model = register(client, "f32")
    rng = np.random.default_rng(11)
    kv = random_kv(rng, 1, "f32")
    a, b = tokens(rng, BT), tokens(rng, BT)
    client.put(model, a, kv, tenant=tenant)
    _, moved = client.get(model, a, tenant=tenant, target_position=1000)
    client.put(model, b, moved, tenant=tenant, rotated_at=1000)
    header, back = client.get(model, b, tenant=tenant, target_position=0)
    assert header.block_info[0].rotated_at == 1000
    assert np.array_equal(raw(back[:, :, 1]), raw(kv[:, :, 1]))
    assert np.abs(back - kv).max() <= 1e-5 * np.abs(kv).max()


# -- stats, pin, evict ---------------------------------------------------------------------------


def test_stats_count_puts_gets_and_bytes(client, tenant):
    model = register(client)
    rng = np.random.default_rng(12)
    kv = random_kv(rng, 3, "bf16")
    toks = tokens(rng, 3 * BT)
    before = client.stats()
    client.put(model, toks, kv, tenant=tenant)
    client.lookup(model, toks + tokens(rng, BT), tenant=tenant)
    client.get(model, toks, tenant=tenant)
    after = client.stats()
    assert after.puts - before.puts == 1
    assert after.gets - before.gets == 1
    assert after.lookups - before.lookups == 1
    assert after.bytes_in - before.bytes_in == kv.nbytes
    assert after.bytes_out - before.bytes_out == kv.nbytes
    assert after.lookup_hit_tokens - before.lookup_hit_tokens == 3 * BT
    assert after.lookup_miss_tokens - before.lookup_miss_tokens == BT
    host = {t.tier: t for t in after.tiers}[pb.TIER_HOST]
    host_before = {t.tier: t for t in before.tiers}[pb.TIER_HOST]
    assert host.capacity_bytes == 256 << 20
    assert host.blocks - host_before.blocks == 3
    assert host.bytes_used - host_before.bytes_used == kv.nbytes
    for t in after.tiers:
        # Host: used plus freed slots kept for reuse, within the capacity; GPU chunks, disk segment
        # files (record headers): more than the bytes they hold.
        assert t.reserved_bytes >= t.bytes_used
        if t.tier == pb.TIER_HOST:
            assert t.reserved_bytes <= t.capacity_bytes
    assert after.models >= 1


def test_pin_then_evict(client, tenant):
    model = register(client)
    rng = np.random.default_rng(13)
    toks = tokens(rng, 2 * BT)
    client.put(model, toks, random_kv(rng, 2, "bf16"), tenant=tenant)
    assert client.pin(model, toks, tenant=tenant) == 2
    assert all(b.pinned for b in client.lookup(model, toks, tenant=tenant).blocks)
    assert client.evict(model, toks, tenant=tenant) == 0  # pinned blocks stay
    assert client.lookup(model, toks, tenant=tenant).matched_tokens == 2 * BT
    assert client.unpin(model, toks, tenant=tenant) == 2
    assert client.evict(model, toks, tenant=tenant) == 2
    assert client.lookup(model, toks, tenant=tenant).matched_tokens == 0


def test_put_with_pin(client, tenant):
    model = register(client)
    rng = np.random.default_rng(14)
    toks = tokens(rng, BT)
    client.put(model, toks, random_kv(rng, 1, "bf16"), tenant=tenant, pin=True)
    assert client.lookup(model, toks, tenant=tenant).blocks[0].pinned
    client.unpin(model, toks, tenant=tenant)


def test_generated_stubs_are_reachable(client):
    stub = client.stub("KVCache")
    assert stub.Stats(pb.StatsRequest(), timeout=10).models >= 0
    expect_error(grpc.StatusCode.NOT_FOUND, client.stub, "NoSuchService")


# -- segments and Compose (API revisions that have them) -----------------------------------------


def test_segment_and_compose(client, tenant):
    if not hasattr(client.kvcache, "Compose") or "segment" not in pb.PutHeader.DESCRIPTOR.fields_by_name:
        pytest.skip("this API revision has no segments / Compose")
    model = register(client, "f32")
    rng = np.random.default_rng(15)
    prefix_kv, seg_kv = random_kv(rng, 1, "f32"), random_kv(rng, 2, "f32")
    prefix, seg = tokens(rng, BT), tokens(rng, BT + 5)  # a segment of 21 tokens: 2 blocks
    try:
        assert client.put_segment(model, seg, seg_kv, tenant=tenant).blocks_stored == 2
    except ropekv.Error as e:
        if e.code == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip("the daemon has no segments")
        raise
    assert client.lookup(model, seg, tenant=tenant, segment=True).matched_tokens == BT + 5
    assert client.lookup(model, seg[:-1], tenant=tenant, segment=True).matched_tokens == 0
    client.put(model, prefix, prefix_kv, tenant=tenant)

    header, kv = client.compose(model, [{"tokens": prefix}, {"tokens": seg, "segment": True}],
                                tenant=tenant)
    assert header.total_tokens == 2 * BT + 5
    assert [(p.tokens, p.position, p.hit) for p in header.parts] == [
        (BT, 0, pb.HIT_EXACT), (BT + 5, BT, pb.HIT_REROTATED)]
    assert kv.shape == (LAYERS, 2, KV_HEADS, 2 * BT + 5, HEAD_DIM)
    # [blocks][layers][kv][heads][bt][dim] -> [layers][kv][heads][tokens][dim]
    joined = lambda b: np.concatenate(list(b), axis=3)  # noqa: E731
    assert np.array_equal(raw(kv[:, :, :, :BT]), raw(joined(prefix_kv)))
    assert np.array_equal(raw(kv[:, 1, :, BT:]), raw(joined(seg_kv)[:, 1, :, :BT + 5]))
    # The segment's keys moved from positions 0..20 to 16..36.
    pos = np.arange(BT + 5)
    stored = joined(seg_kv)[:, 0, :, :BT + 5]
    ref = rotate_ref(rotate_ref(stored, -pos, 10000.0, HEAD_DIM, "neox"), pos + BT, 10000.0,
                     HEAD_DIM, "neox")
    assert np.abs(kv[:, 0, :, BT:] - ref).max() <= 1e-5 * np.abs(stored).max()
