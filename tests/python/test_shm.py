"""The shared-memory data plane through the Python client against a real ropekvd: what the daemon
writes into a registered ShmBuffer equals what the gRPC bytes path answers (itself checked against
fp64 references in test_client.py), the answer is a view of the buffer (no copy), bad ranges and
names are refused with nothing written, and a daemon that does not allow registration says so."""

import os

import grpc
import numpy as np
import pytest

import ropekv
from ropekv import arrays

LAYERS, KV_HEADS, HEAD_DIM, BT = 2, 2, 64, 16


def register(client, dtype="bf16"):
    return client.register_model(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=dtype,
                                 block_tokens=BT, rope={"theta": 10000.0}).model_id


def random_kv(rng, blocks, dtype="bf16"):
    shape = (blocks, LAYERS, 2, KV_HEADS, BT, HEAD_DIM)
    if dtype == "bf16":
        return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return rng.standard_normal(shape).astype({"f16": np.float16, "f32": np.float32}[dtype])


def raw(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def tokens(rng, n):
    return rng.integers(0, 50000, size=n).tolist()


@pytest.fixture
def shm(client):
    """A registered 1 MiB ShmBuffer filled with random canary bytes; its canaries as a copy."""
    buf = client.create_shm(1 << 20)
    canary = np.random.default_rng(99).integers(1, 256, size=buf.size, dtype=np.uint8)
    buf.bytes_view()[:] = canary
    yield buf, canary
    buf.close()


def unchanged_outside(buf, canary, begin, end):
    v = buf.bytes_view()
    ok = np.array_equal(v[:begin], canary[:begin]) and np.array_equal(v[end:], canary[end:])
    del v
    return ok


@pytest.mark.parametrize("dtype", ["bf16", "f16", "f32"])
def test_get_into_shm_equals_grpc_get_and_is_a_view(client, tenant, shm, dtype):
    buf, canary = shm
    rng = np.random.default_rng(1)
    model = register(client, dtype)
    toks = tokens(rng, 4 * BT)
    kv = random_kv(rng, 4, dtype)
    client.put(model, toks, kv, tenant=tenant)
    bb = arrays.block_bytes(client.spec(model))
    for target, offset in ((None, 0), (777, 4099)):
        want_header, want = client.get(model, toks + [1, 2], tenant=tenant,
                                       target_position=target)
        header, got = client.get(model, toks + [1, 2], tenant=tenant, target_position=target,
                                 out=(buf, offset))
        assert header.blocks == want_header.blocks == 4 and header.matched_tokens == 4 * BT
        assert got.shape == want.shape and got.dtype == want.dtype
        assert np.array_equal(raw(got), raw(want))
        if target is None:
            assert np.array_equal(raw(got), raw(kv))
        # A view of the buffer, not a copy.
        assert np.shares_memory(got, buf.bytes_view())
        assert unchanged_outside(buf, canary, offset, offset + 4 * bb)
        del got
        buf.bytes_view()[:] = canary


def test_put_from_shm_then_get(client, tenant, shm):
    buf, _ = shm
    rng = np.random.default_rng(2)
    model = register(client)
    toks = tokens(rng, 3 * BT)
    kv = random_kv(rng, 3)
    offset = 1000
    buf.bytes_view(offset, kv.nbytes)[:] = raw(kv)
    resp = client.put_from_buffer(model, toks, buf, offset=offset, tenant=tenant)
    assert resp.blocks_stored == 3 and resp.bytes_read == kv.nbytes
    _, got = client.get(model, toks, tenant=tenant)
    assert np.array_equal(raw(got), raw(kv))
    # Chained continuation from the same buffer.
    more = tokens(rng, BT)
    client.put_from_buffer(model, more, buf, offset=offset, tenant=tenant,
                           parent=resp.block_hashes[-1])
    assert client.lookup(model, toks + more, tenant=tenant).matched_tokens == 4 * BT


def test_compose_into_shm_equals_compose(client, tenant, shm):
    buf, canary = shm
    rng = np.random.default_rng(3)
    model = register(client)
    prefix = tokens(rng, 2 * BT)
    doc = tokens(rng, 21)
    client.put(model, prefix, random_kv(rng, 2), tenant=tenant)
    client.put_segment(model, doc, random_kv(rng, 2), tenant=tenant)
    parts = [{"tokens": prefix}, {"tokens": doc, "segment": True},
             {"tokens": doc, "segment": True, "target_position": 3000}]
    want_header, want = client.compose(model, parts, tenant=tenant)
    header, got = client.compose(model, parts, tenant=tenant, out=(buf, 64))
    assert header.total_tokens == want_header.total_tokens == 2 * BT + 42
    assert got.shape == want.shape
    assert np.array_equal(raw(got), raw(want))
    assert unchanged_outside(buf, canary, 64, 64 + want.nbytes)


def test_bad_ranges_are_invalid_and_write_nothing(client, tenant, shm):
    buf, canary = shm
    rng = np.random.default_rng(4)
    model = register(client)
    toks = tokens(rng, 4 * BT)
    client.put(model, toks, random_kv(rng, 4), tenant=tenant)
    bb = arrays.block_bytes(client.spec(model))
    for offset in (buf.size - 4 * bb + 1, buf.size, buf.size + 1, (1 << 64) - 1):
        with pytest.raises(ropekv.Error) as e:
            client.get(model, toks, tenant=tenant, out=(buf, offset))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, (offset, e.value)
    with pytest.raises(ropekv.Error) as e:
        client.put_from_buffer(model, tokens(rng, 80 * BT), buf, tenant=tenant)  # 80 x 16 KiB > 1 MiB
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert unchanged_outside(buf, canary, 0, 0)
    # The last byte that fits is fine.
    header, got = client.get(model, toks, tenant=tenant, out=(buf, buf.size - 4 * bb))
    assert header.blocks == 4
    del got


def test_registration_errors(client):
    with pytest.raises(ropekv.Error) as e:
        client.register_shm("/ropekv-pytest-no-such-object")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ropekv.Error) as e:
        client.register_shm("/a/b")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with ropekv.ShmBuffer(8192) as buf:
        with pytest.raises(ropekv.Error) as e:
            client.register_shm(buf, size=8192 + 4096, name="too-big")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "the registration claims" in e.value.message
        info = client.register_shm(buf)
        assert info.size == 8192 and info.shm_name == buf.shm_name
        with pytest.raises(ropekv.Error) as e:
            client.register_shm(buf)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert buf.name in [b.name for b in client.list_buffers().buffers]
    # close() unregistered it.
    assert buf.name not in [b.name for b in client.list_buffers().buffers]
    with pytest.raises(ropekv.Error) as e:
        client.unregister_buffer(buf.name)
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_unregistered_buffer_is_refused_locally(client, tenant):
    buf = ropekv.ShmBuffer(4096)
    try:
        with pytest.raises(ropekv.Error) as e:
            client.get(register(client), [1] * BT, tenant=tenant, out=buf)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        buf.close()


def test_torch_view_of_shm(client, tenant, shm):
    torch = pytest.importorskip("torch")
    buf, _ = shm
    rng = np.random.default_rng(5)
    model = register(client)
    toks = tokens(rng, BT)
    kv = random_kv(rng, 1)
    client.put(model, toks, kv, tenant=tenant)
    client.get(model, toks, tenant=tenant, out=buf)
    t = buf.tensor(torch.bfloat16, kv.shape)
    assert torch.equal(t.view(torch.int16), torch.from_numpy(kv.view(np.int16)))
    del t


def _start_daemon(extra):
    binary = os.environ.get("ROPEKVD")
    if not binary:
        pytest.skip("ROPEKVD not set")
    return ropekv.LocalDaemon(binary, "--host_capacity", "64MiB", *extra, timeout=30,
                              prefix="ropekv-pytest-off-")


@pytest.mark.parametrize("flags,why", [
    (["--listen", "127.0.0.1:0", "--allow_buffers", "off"], "--allow_buffers=off"),
    (["--listen", "0.0.0.0:0"], "not loopback"),
])
def test_registration_refused_when_not_allowed(flags, why):
    with _start_daemon(flags) as d, ropekv.Client(d.address, timeout=30) as c, \
            ropekv.ShmBuffer(4096) as buf:
        c.wait_ready(timeout=10)
        assert not c.list_buffers().registration_allowed
        with pytest.raises(ropekv.Error) as e:
            c.register_shm(buf)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert why in e.value.message


def test_paged_shm_get_and_put_by_block_ids(client, tenant):
    """A vLLM-style paged pool [layers, 2, pages, block_tokens, kv_heads, head_dim] in shared
    memory: blocks land in the pages named (keys re-rotated as the gRPC path does them), other
    pages keep their canaries; a Put reads blocks back from pages; bad ids write nothing."""
    rng = np.random.default_rng(12)
    model = register(client)
    spec = client.spec(model)
    pages = 6
    toks = tokens(rng, 3 * BT)
    client.put(model, toks, random_kv(rng, 3), tenant=tenant)
    pool_bytes = arrays.block_bytes(spec) * pages
    buf = _shm_buffer(client, pool_bytes, (model, pages))
    try:
        canary = rng.integers(1, 256, size=pool_bytes, dtype=np.uint8)
        ids = [4, 0, 2]
        for target in (None, 5000):
            buf.bytes_view()[:] = canary
            _, want = client.get(model, toks, tenant=tenant, target_position=target)
            header, pool = client.get(model, toks, tenant=tenant, target_position=target,
                                      out=buf, block_ids=ids)
            assert header.blocks == 3
            assert pool.shape == (LAYERS, 2, pages, BT, KV_HEADS, HEAD_DIM)
            expect = canary.view(np.uint16).reshape(pool.shape).copy()
            for b, page in enumerate(ids):
                # block [layers, 2, heads, tokens, dim] -> page [tokens, heads, dim]
                expect[:, :, page] = want[b].view(np.uint16).transpose(0, 1, 3, 2, 4)
            assert np.array_equal(pool.view(np.uint16), expect)
            del pool
        more = tokens(rng, 2 * BT)
        kv = random_kv(rng, 2)
        _, pool = client.get(model, toks, tenant=tenant, out=buf, block_ids=[1])
        pool.view(np.uint16)[:, :, 3] = kv[0].transpose(0, 1, 3, 2, 4)
        pool.view(np.uint16)[:, :, 5] = kv[1].transpose(0, 1, 3, 2, 4)
        del pool
        assert client.put_from_buffer(model, more, buf, tenant=tenant,
                                      block_ids=[3, 5]).blocks_stored == 2
        _, back = client.get(model, more, tenant=tenant)
        assert np.array_equal(raw(back), raw(kv))
        before = buf.bytes_view().copy()
        for bad in ([0, pages], [1, 1]):
            with pytest.raises(ropekv.Error) as e:
                client.get(model, toks, tenant=tenant, out=buf, block_ids=bad)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert np.array_equal(buf.bytes_view(), before)
    finally:
        buf.close()


def test_torch_ipc_handle_formats():
    """The raw cudaIpcMemHandle_t of torch's _share_cuda_(): as it is (older torch), unwrapped from
    c10's versioned handle [version][b"c"][64 bytes] (seen from torch on the H100 host), refused
    for expandable segments and unknown shapes."""
    from ropekv import shm as rshm

    raw64 = bytes(range(64))
    assert rshm.ipc_mem_handle(raw64) == raw64
    assert rshm.ipc_mem_handle(b"\x02c" + raw64) == raw64
    for bad in (b"\x02e" + raw64, b"\x02c" + raw64[:10], raw64 + b"x"):
        with pytest.raises(ropekv.Error) as e:
            rshm.ipc_mem_handle(bad)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _shm_buffer(client, size, paged):
    buf = ropekv.ShmBuffer(size)
    client.register_shm(buf, paged=paged)
    return buf
