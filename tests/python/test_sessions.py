"""Editor sessions (ropekv.sessions, `client.sessions`) against a real ropekvd: open / edit / fill /
read through gRPC bytes and through registered buffers in the frontend's capacity layout
[layers, 2, kv_heads, capacity, head_dim]. Moved keys are checked against an fp64 RoPE rotation
computed here (one rotation by Δ, within bf16 rounding), values and unmoved keys bit for bit;
buffer writes touch only their tokens. Torch and CUDA cases skip themselves without torch / a GPU.
"""

import grpc
import numpy as np
import pytest

import ropekv

LAYERS, KV_HEADS, HEAD_DIM, BT, THETA = 2, 2, 64, 16, 10000.0


@pytest.fixture(scope="module")
def model(client):
    return client.register_model(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="bf16",
                                 block_tokens=BT, rope={"theta": THETA}, name="sess-demo").model_id


def bf16(x):
    """float -> bf16 bits (uint16), round to nearest even."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bits(a):
    """bf16 bits (uint16) of an array: read() answers ml_dtypes.bfloat16 where that is installed,
    uint16 bits elsewhere."""
    a = np.asarray(a)
    return a if a.dtype == np.uint16 else a.view(np.uint16)


def f32(b):
    return (bits(b).astype(np.uint32) << 16).view(np.float32)


def read(s, *args, **kwargs):
    """Sessions.read as bf16 bits."""
    return bits(s.read(*args, **kwargs))


def random_kv(rng, n, capacity=None):
    """Range-layout bf16 bits [layers, 2, kv_heads, n, head_dim]."""
    return bf16(rng.standard_normal((LAYERS, 2, KV_HEADS, capacity or n, HEAD_DIM)))


def rotate(keys_bits, delta):
    """fp64 reference: NeoX RoPE by `delta` positions of bf16 keys [..., n, head_dim]."""
    k = f32(keys_bits).astype(np.float64)
    half = HEAD_DIM // 2
    inv = THETA ** (-np.arange(half, dtype=np.float64) * 2 / HEAD_DIM)
    c, s = np.cos(delta * inv), np.sin(delta * inv)
    a, b = k[..., :half], k[..., half:]
    return np.concatenate((a * c - b * s, b * c + a * s), axis=-1)


def expect_rotated(got_bits, old_bits, delta):
    """Keys re-rotated once by delta: within 2 bf16 ulps of the fp64 rotation of the stored keys."""
    ref = rotate(old_bits, delta)
    got = f32(got_bits).astype(np.float64)
    ulp = np.maximum(np.abs(ref), 1e-30) * 2.0 ** -7
    assert np.all(np.abs(got - ref) <= 2 * ulp + 1e-6), np.max(np.abs(got - ref) / ulp)


def tokens(rng, n):
    return rng.integers(0, 30000, size=n).tolist()


def test_open_edit_fill_read(client, model):
    s = client.sessions
    rng = np.random.default_rng(1)
    n = 40
    kv = random_kv(rng, n)
    opened = s.open(model, tokens(rng, n), kv)
    assert opened.length == n and opened.fill == []
    assert np.array_equal(read(s, opened.id), kv)  # read where they were stored: bit for bit

    # One-line edit: replace [10, 13) by 5 tokens (Δ = +2); only the new tokens await fill.
    ed = s.edit(opened.id, [s.replace(10, 13, tokens(rng, 5))])
    assert (ed.length, ed.fill, ed.inserted) == (n + 2, [(10, 15)], [(10, 15)])
    with pytest.raises(ropekv.Error) as e:
        read(s, opened.id)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    new = random_kv(rng, 5)
    assert s.fill(opened.id, 10, 15, new).fill == []
    got = read(s, opened.id)
    assert np.array_equal(got[:, :, :, :10], kv[:, :, :, :10])  # prefix untouched
    assert np.array_equal(got[:, :, :, 10:15], new)
    assert np.array_equal(got[:, 1, :, 15:], kv[:, 1, :, 13:])  # values move as they are
    expect_rotated(got[:, 0, :, 15:], kv[:, 0, :, 13:], 2)      # keys: one rotation by Δ
    assert not np.array_equal(got[:, 0, :, 15:], kv[:, 0, :, 13:])

    # Several places at once, as tuples too; a snapshot keeps the state.
    snap = s.snapshot(opened.id)
    ed = s.edit(opened.id, [("delete", 0, 3), ("insert", 20, tokens(rng, 4))])
    assert ed.fill == [(17, 21)]
    s.fill(opened.id, 17, 21, random_kv(rng, 4))
    assert read(s, opened.id, 0, 5).shape == (LAYERS, 2, KV_HEADS, 5, HEAD_DIM)
    assert np.array_equal(read(s, snap.id), got)
    assert s.info(opened.id).length == n + 2 - 3 + 4
    s.close(snap.id)
    s.close(opened.id)


def test_errors(client, model):
    s = client.sessions
    rng = np.random.default_rng(2)
    sid = s.open(model, tokens(rng, 8), random_kv(rng, 8)).id
    for call in (lambda: s.edit(sid, [s.delete(5, 3)]),           # start > end
                 lambda: s.edit(sid, [s.delete(2, 6), s.delete(4, 7)]),  # overlapping
                 lambda: s.edit(sid, [("move", 1, 2)]),            # not an op
                 lambda: s.fill(sid, 0, 2, random_kv(rng, 3)),     # wrong size
                 lambda: read(s, sid, 3, 9)):                       # past the end
        with pytest.raises(ropekv.Error) as e:
            call()
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert s.info(sid).length == 8 and s.info(sid).version == 0
    with pytest.raises(ropekv.Error) as e:
        s.edit("s-nope", [s.insert(0, [1])])
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    s.close(sid)


def test_capacity_layout_through_shared_memory(client, model):
    """The frontend's cache in shared memory: open from it, read the shifted suffix back into it at
    its new offset, fill the new tokens from it."""
    s = client.sessions
    rng = np.random.default_rng(3)
    C, n = 64, 30
    shape = (LAYERS, 2, KV_HEADS, C, HEAD_DIM)
    buf = client.create_shm(int(np.prod(shape)) * 2 + 256)
    try:
        view = buf.array(np.uint16, shape)
        view[:] = random_kv(rng, n, capacity=C)
        tail = buf.bytes_view(int(np.prod(shape)) * 2)
        tail[:] = 0xA5
        kv = view[:, :, :, :n].copy()
        opened = s.open_from_buffer(model, tokens(rng, n), buf, capacity=C)
        assert (opened.length, opened.bytes_read) == (n, kv.nbytes)
        assert np.array_equal(read(s, opened.id), kv)

        ed = s.edit(opened.id, [s.replace(5, 8, tokens(rng, 6))])  # Δ = +3
        assert ed.fill == [(5, 11)]
        before = view.copy()
        r = s.read_to_buffer(opened.id, buf, 11, n + 3, capacity=C, token_offset=11)
        assert (r.header.range.start, r.header.range.end) == (11, n + 3)
        assert np.array_equal(view[:, :, :, :11], before[:, :, :, :11])        # untouched
        assert np.array_equal(view[:, :, :, n + 3:], before[:, :, :, n + 3:])  # untouched
        assert np.all(tail == 0xA5)
        assert np.array_equal(view[:, 1, :, 11:n + 3], kv[:, 1, :, 8:])
        expect_rotated(view[:, 0, :, 11:n + 3], kv[:, 0, :, 8:], 3)
        # The new tokens' KV, computed by the frontend into its cache, stored from there.
        view[:, :, :, 5:11] = random_kv(rng, 6)
        f = s.fill_from_buffer(opened.id, buf, 5, 11, capacity=C, token_offset=5)
        assert f.fill == [] and f.bytes_read == 6 * LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
        assert np.array_equal(read(s, opened.id), view[:, :, :, :n + 3])

        # Layout errors: nothing written.
        before = view.copy()
        for kw in ({"capacity": C, "token_offset": C - 5},  # the range does not fit
                   {"capacity": C + 64}):                  # the layout does not fit the buffer
            with pytest.raises(ropekv.Error) as e:
                s.read_to_buffer(opened.id, buf, 0, 10, **kw)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ropekv.Error) as e:
            s.read_to_buffer(opened.id, buf, 0, 10, token_offset=3)  # offset without capacity
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert np.array_equal(view, before)
        s.close(opened.id)
        del view, tail
    finally:
        buf.close()


def test_torch_in_and_out(client, model):
    torch = pytest.importorskip("torch")
    s = client.sessions
    rng = np.random.default_rng(4)
    kv = random_kv(rng, 20)
    t = torch.from_numpy(kv.view(np.int16)).view(torch.bfloat16)
    sid = s.open(model, tokens(rng, 20), t).id
    out = s.read(sid, device="cpu")
    assert out.dtype == torch.bfloat16 and torch.equal(out, t)
    s.close(sid)


def test_cuda_buffer_device_to_device(client, model):
    """A torch CUDA cache registered by IPC handle: open from it, read into it at an offset (one
    fused launch when the daemon keeps the session on that GPU), fill from it."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    s = client.sessions
    rng = np.random.default_rng(5)
    C, n = 96, 50
    host = random_kv(rng, n, capacity=C)
    buf = torch.from_numpy(host.view(np.int16)).view(torch.bfloat16).cuda()
    try:
        shared = client.register_cuda(buf)
    except ropekv.Error as e:
        pytest.skip(f"the daemon cannot open CUDA IPC buffers: {e.message}")
    try:
        opened = s.open_from_buffer(model, tokens(rng, n), shared, capacity=C)
        kv = host[:, :, :, :n]
        assert np.array_equal(read(s, opened.id), kv)
        ed = s.edit(opened.id, [s.replace(20, 30, tokens(rng, 16))])  # Δ = +6
        assert ed.fill == [(20, 36)]
        before = buf.clone()
        s.read_to_buffer(opened.id, shared, 36, n + 6, capacity=C, token_offset=36)
        got = buf.view(torch.int16).cpu().numpy().view(np.uint16)
        want = read(s, opened.id, 36, n + 6)
        assert np.array_equal(got[:, :, :, 36:n + 6], want)
        assert torch.equal(buf[:, :, :, :36], before[:, :, :, :36])
        assert torch.equal(buf[:, :, :, n + 6:], before[:, :, :, n + 6:])
        expect_rotated(got[:, 0, :, 36:n + 6], kv[:, 0, :, 30:], 6)
        buf[:, :, :, 20:36] = 0.5
        f = s.fill_from_buffer(opened.id, shared, 20, 36, capacity=C, token_offset=20)
        assert f.fill == []
        assert np.all(f32(read(s, opened.id, 20, 36)) == 0.5)
        s.close(opened.id)
    finally:
        shared.close()
