"""The CUDA IPC data plane through the Python client: torch CUDA tensors registered by their IPC
handle (Client.register_cuda), filled by the daemon (Get, as stored and re-rotated on the GPU) and
read by it (Put), flat and as a vLLM-style paged pool addressed by block ids. References are the
gRPC bytes path (checked against fp64 in test_client.py): bit for bit as stored, keys within 1 ulp
where the GPU kernel re-rotated them (its documented bound). Needs torch with CUDA and a CUDA build
of ropekvd on a GPU host; skipped elsewhere. ctest labels: python;gpu (python_cuda_ipc)."""

import grpc
import numpy as np
import pytest

import ropekv
from ropekv import arrays

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

LAYERS, KV_HEADS, HEAD_DIM, BT = 2, 2, 64, 16


def register(client):
    return client.register_model(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                                 dtype="bf16", block_tokens=BT, rope={"theta": 10000.0}).model_id


def random_kv(rng, blocks):
    shape = (blocks, LAYERS, 2, KV_HEADS, BT, HEAD_DIM)
    return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def tokens(rng, n):
    return rng.integers(0, 50000, size=n).tolist()


def bits(a):
    """int32 of the bf16 bit patterns of a numpy uint16 array or a torch tensor."""
    if isinstance(a, torch.Tensor):
        return a.contiguous().view(torch.int16).cpu().numpy().astype(np.int32)
    return np.ascontiguousarray(a).view(np.int16).astype(np.int32)


def assert_within_ulp(got, want, exact):
    g, w = bits(got), bits(want)
    assert g.shape == w.shape
    if exact:
        assert np.array_equal(g, w)
    else:
        diff = np.abs(g - w)
        assert diff.max() <= 1, f"{int((diff > 1).sum())} words differ by more than 1 ulp"
        assert (diff == 1).mean() <= 0.01


def test_get_into_and_put_from_a_torch_cuda_tensor(client, tenant):
    rng = np.random.default_rng(6)
    model = register(client)
    toks = tokens(rng, 3 * BT)
    client.put(model, toks, random_kv(rng, 3), tenant=tenant)
    bb = arrays.block_bytes(client.spec(model))
    # An allocation with room around the buffer; the buffer is a slice at an offset in it.
    pool = torch.randint(1, 255, (8 * bb,), dtype=torch.uint8, device="cuda")
    canary = pool.clone()
    region = pool[bb:7 * bb]
    gbuf = client.register_cuda(region)
    try:
        for target in (None, 2048, 100000):
            _, want = client.get(model, toks, tenant=tenant, target_position=target)
            header, got = client.get(model, toks, tenant=tenant, target_position=target,
                                     out=(gbuf, 128))
            assert header.blocks == 3 and got.is_cuda and got.dtype == torch.bfloat16
            assert tuple(got.shape) == want.shape
            assert_within_ulp(got, want, exact=target is None)
            torch.cuda.synchronize()
            written = slice(bb + 128, bb + 128 + 3 * bb)
            assert torch.equal(pool[:written.start], canary[:written.start])
            assert torch.equal(pool[written.stop:], canary[written.stop:])
            pool.copy_(canary)
        # Put from the GPU tensor (the frontend's writes are synchronized by the client).
        more = tokens(rng, BT)
        src = torch.from_numpy(random_kv(rng, 1).reshape(-1).view(np.uint8).copy()).cuda()
        region[:bb].copy_(src)
        client.put_from_buffer(model, more, gbuf, tenant=tenant)
        _, back = client.get(model, more, tenant=tenant)
        assert np.array_equal(np.ascontiguousarray(back).reshape(-1).view(np.uint8),
                              src.cpu().numpy())
    finally:
        gbuf.close()


def test_paged_torch_pool_by_block_ids(client, tenant):
    rng = np.random.default_rng(7)
    model = register(client)
    pages = 8
    toks = tokens(rng, 3 * BT)
    client.put(model, toks, random_kv(rng, 3), tenant=tenant)
    # vLLM-style: one tensor [layers, 2, pages, block_size, kv_heads, head_dim].
    pool = torch.randn(LAYERS, 2, pages, BT, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16,
                       device="cuda")
    canary = pool.clone()
    gbuf = client.register_cuda(pool, paged=(model, pages))
    try:
        ids = [6, 1, 3]
        for target in (None, 4096):
            _, want = client.get(model, toks, tenant=tenant, target_position=target)
            header, got = client.get(model, toks, tenant=tenant, target_position=target,
                                     out=gbuf, block_ids=ids)
            assert header.blocks == 3 and got.is_cuda and tuple(got.shape) == tuple(pool.shape)
            torch.cuda.synchronize()
            for b, page in enumerate(ids):
                # block [layers, 2, heads, tokens, dim] -> page [tokens, heads, dim]
                assert_within_ulp(pool[:, :, page], want[b].transpose(0, 1, 3, 2, 4),
                                  exact=target is None)
            others = [p for p in range(pages) if p not in ids]
            assert torch.equal(pool[:, :, others], canary[:, :, others])
            pool.copy_(canary)
        # Put from pages 2 and 5.
        more = tokens(rng, 2 * BT)
        kv = random_kv(rng, 2)
        for b, page in enumerate((2, 5)):
            page_bits = torch.from_numpy(kv[b].transpose(0, 1, 3, 2, 4).copy().view(np.int16))
            pool[:, :, page] = page_bits.cuda().view(torch.bfloat16)
        assert client.put_from_buffer(model, more, gbuf, tenant=tenant,
                                      block_ids=[2, 5]).blocks_stored == 2
        _, back = client.get(model, more, tenant=tenant)
        assert np.array_equal(bits(back), bits(kv))
        # Bad ids: INVALID_ARGUMENT, nothing written.
        torch.cuda.synchronize()
        before = pool.clone()
        for bad in ([0, pages], [4, 4]):
            with pytest.raises(ropekv.Error) as e:
                client.get(model, toks, tenant=tenant, out=gbuf, block_ids=bad)
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ropekv.Error) as e:
            client.put_from_buffer(model, tokens(rng, 2 * BT), gbuf, tenant=tenant, block_ids=[1])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        torch.cuda.synchronize()
        assert torch.equal(pool, before)
    finally:
        gbuf.close()
