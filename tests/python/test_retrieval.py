"""ropekv.Client.select / ropekv.retrieval against a real ropekvd: the selection equals a top-k of
fp64 scores computed here from the bytes put; gathered K/V equal the stored bytes; status codes."""

import grpc
import numpy as np
import pytest

import ropekv

LAYERS, KV_HEADS, HEAD_DIM, BT = 2, 2, 64, 16
QUERY_HEADS = 4


@pytest.fixture
def model(client):
    return client.register_model(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype="f32",
                                 block_tokens=BT, rope={"theta": 10000.0},
                                 name="retrieval-f32").model_id


def put_random(client, model, tenant, rng, blocks):
    kv = rng.standard_normal((blocks, LAYERS, 2, KV_HEADS, BT, HEAD_DIM)).astype(np.float32)
    tokens = rng.integers(0, 50000, size=blocks * BT).tolist()
    client.put(model, tokens, kv, tenant=tenant)
    # [layers, 2, kv_heads, tokens, head_dim]
    return tokens, kv.transpose(1, 2, 3, 0, 4, 5).reshape(LAYERS, 2, KV_HEADS, blocks * BT,
                                                           HEAD_DIM)


def test_exact_selection_matches_fp64_and_gathers(client, model, tenant):
    rng = np.random.default_rng(7)
    tokens, kv = put_random(client, model, tenant, rng, 20)
    n = len(tokens)
    q = rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    k, n_sink, n_local = 25, 3, 6
    sel = client.select(q, k, model=model, tokens=tokens, tenant=tenant, layer=1, n_sink=n_sink,
                        n_local=n_local, want_scores=True, want_mass=True, gather=True, keep=True)
    assert sel.header.num_tokens == n
    assert len(sel.indices) == KV_HEADS and sel.mass.shape == (KV_HEADS,)
    group = QUERY_HEADS // KV_HEADS
    keys = kv[1, 0].astype(np.float64)  # [kv_heads, n, head_dim]
    for g in range(KV_HEADS):
        scores = (q[g * group:(g + 1) * group].astype(np.float64) @ keys[g].T).max(axis=0)
        row = sel.indices[g]
        assert np.all(np.diff(row) > 0)
        pinned = set(range(n_sink)) | set(range(n - n_local, n))
        assert pinned <= set(row.tolist())
        free = [t for t in row.tolist() if t not in pinned]
        assert len(free) == k
        others = [t for t in range(n) if t not in pinned and t not in free]
        assert scores[free].min() >= scores[others].max() - 1e-6
        np.testing.assert_allclose(sel.scores[g], scores[row], rtol=1e-5, atol=1e-5)
        cap = sel.header.capacity
        np.testing.assert_array_equal(sel.keys[g, :len(row)], kv[1, 0, g, row])
        np.testing.assert_array_equal(sel.values[g, :len(row)], kv[1, 1, g, row])
        assert not sel.keys[g, len(row):cap].any()
    # TidalDecode: the same tokens at layer 0.
    keys0, values0 = client.retrieval.gather(sel.selection_id, [0])
    for g in range(KV_HEADS):
        row = sel.indices[g]
        np.testing.assert_array_equal(keys0[0, g, :len(row)], kv[0, 0, g, row])
        np.testing.assert_array_equal(values0[0, g, :len(row)], kv[0, 1, g, row])
    client.retrieval.release(sel.selection_id)
    with pytest.raises(ropekv.Error) as e:
        client.retrieval.gather(sel.selection_id, [0])
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert client.retrieval.stats().selects >= 1


def test_select_by_last_block_equals_select_by_tokens(client, model, tenant):
    rng = np.random.default_rng(11)
    kv = rng.standard_normal((12, LAYERS, 2, KV_HEADS, BT, HEAD_DIM)).astype(np.float32)
    tokens = rng.integers(0, 50000, size=12 * BT).tolist()
    put = client.put(model, tokens, kv, tenant=tenant)
    q = rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    for mode in ("exact", "bound", "bound_then_exact"):
        by_tokens = client.select(q, 20, model=model, tokens=tokens, tenant=tenant, layer=1,
                                  mode=mode, want_scores=True)
        for last in (put.block_hashes[-1], put.block_hashes[-1].hex()):
            by_hash = client.select(q, 20, model=model, last_block=last, layer=1, mode=mode,
                                    want_scores=True)
            assert by_hash.header.num_tokens == len(tokens)
            for a, b in zip(by_tokens.indices, by_hash.indices):
                np.testing.assert_array_equal(a, b)
            for a, b in zip(by_tokens.scores, by_hash.scores):
                np.testing.assert_array_equal(a, b)
    # An earlier block's hash: the prefix that ends there.
    short = client.select(q, 8, model=model, last_block=put.block_hashes[4], layer=0)
    assert short.header.num_tokens == 5 * BT
    assert all(int(r.max()) < 5 * BT for r in short.indices)
    with pytest.raises(ropekv.Error) as e:
        client.select(q, 8, model=model, tokens=tokens, last_block=put.block_hashes[4])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ropekv.Error) as e:
        client.select(q, 8, model=model, last_block=bytes(32))
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_gather_into_shared_memory_equals_gather(client, model, tenant):
    """DataPlane.GatherToBuffer: the kept selection's K/V at several layers written by the daemon
    into a registered buffer equal the streamed Gather and the bytes put; bytes outside stay."""
    rng = np.random.default_rng(11)
    tokens, kv = put_random(client, model, tenant, rng, 9)
    q = rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    sel = client.select(q, 20, model=model, tokens=tokens, tenant=tenant, layer=0, n_sink=1,
                        n_local=4, keep=True)
    want_k, want_v = client.retrieval.gather(sel.selection_id, [1, 0])
    nbytes = want_k.nbytes + want_v.nbytes
    with client.create_shm(nbytes + 64) as buf:
        canary = rng.integers(0, 256, size=nbytes + 64, dtype=np.uint8)
        buf.array(np.uint8, (nbytes + 64,))[:] = canary
        keys, values = client.retrieval.gather(sel.selection_id, [1, 0], out=(buf, 32))
        np.testing.assert_array_equal(keys, want_k)
        np.testing.assert_array_equal(values, want_v)
        raw = buf.array(np.uint8, (nbytes + 64,))
        np.testing.assert_array_equal(raw[:32], canary[:32])
        np.testing.assert_array_equal(raw[32 + nbytes:], canary[32 + nbytes:])
        for g in range(KV_HEADS):
            row = sel.indices[g]
            np.testing.assert_array_equal(keys[0, g, :len(row)], kv[1, 0, g, row])
            np.testing.assert_array_equal(values[1, g, :len(row)], kv[0, 1, g, row])
        # A layer out of range or a buffer too small: INVALID_ARGUMENT, nothing written.
        before = raw.copy()
        for layers, at in (([LAYERS], 0), ([0, 1], 65)):
            with pytest.raises(ropekv.Error) as e:
                client.retrieval.gather(sel.selection_id, layers, out=(buf, at))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        np.testing.assert_array_equal(buf.array(np.uint8, (nbytes + 64,)), before)
    client.retrieval.release(sel.selection_id)


def test_bound_mode_finds_needle_page(client, model, tenant):
    rng = np.random.default_rng(11)
    blocks = 32
    kv = rng.standard_normal((blocks, LAYERS, 2, KV_HEADS, BT, HEAD_DIM)).astype(np.float32)
    q = rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    needle = 301
    kv[needle // BT, 0, 0, 0, needle % BT] = 4 * q[0]  # query head 0 reads KV head 0
    tokens = rng.integers(0, 50000, size=blocks * BT).tolist()
    client.put(model, tokens, kv, tenant=tenant)
    sel = client.select(q, 16, model=model, tokens=tokens, tenant=tenant, mode="bound")
    assert set(range(needle // 16 * 16, needle // 16 * 16 + 16)) <= set(sel.indices[0].tolist())


def test_errors(client, model, tenant):
    rng = np.random.default_rng(3)
    tokens, _ = put_random(client, model, tenant, rng, 2)
    q = rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    cases = [
        (dict(model="no-such-model", tokens=tokens), 4, grpc.StatusCode.NOT_FOUND),
        (dict(session_id="no-such-session"), 4, grpc.StatusCode.NOT_FOUND),
        (dict(model=model, tokens=tokens, tenant=tenant, layer=LAYERS), 4,
         grpc.StatusCode.INVALID_ARGUMENT),
        (dict(model=model, tokens=tokens, tenant=tenant), 0, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for kwargs, k, code in cases:
        with pytest.raises(ropekv.Error) as e:
            client.select(q, k, **kwargs)
        assert e.value.code == code, kwargs
    bad = q.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ropekv.Error) as e:
        client.select(bad, 4, model=model, tokens=tokens, tenant=tenant)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in e.value.message
    with pytest.raises(ropekv.Error) as e:
        client.select(q[:, :32], 4, model=model, tokens=tokens, tenant=tenant)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_select_batch_answers_each_item_as_select(client, model, tenant):
    rng = np.random.default_rng(23)
    tokens_a, _ = put_random(client, model, tenant, rng, 10)
    tokens_b, _ = put_random(client, model, tenant, rng, 14)
    nan = rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    nan[1, 2] = np.nan
    items = []
    for i in range(9):  # a decode batch: each sequence its own prefix, queries and layer
        items.append(dict(queries=rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32),
                          k=10 + i, tokens=tokens_a if i % 2 else tokens_b, layer=i % LAYERS,
                          mode=("exact", "bound", "bound_then_exact")[i % 3]))
    items[4]["want_scores"] = True
    items[5]["keep"] = True
    items.append(dict(queries=nan, k=8, tokens=tokens_a))               # INVALID_ARGUMENT
    items.append(dict(queries=items[0]["queries"], k=8, tokens=[1, 2, 3] * 16))  # NOT_FOUND
    got = client.select_batch(items, model=model, tenant=tenant, n_sink=2, n_local=4)
    assert len(got) == len(items)
    assert isinstance(got[-2], ropekv.Error) and got[-2].code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(got[-1], ropekv.Error) and got[-1].code == grpc.StatusCode.NOT_FOUND
    for item, sel in zip(items[:-2], got[:-2]):
        alone = dict(item, keep=False)
        want = client.select(model=model, tenant=tenant, n_sink=2, n_local=4, **alone)
        assert isinstance(sel, ropekv.retrieval.Selection)
        assert sel.header.num_tokens == want.header.num_tokens
        for a, b in zip(sel.indices, want.indices):
            np.testing.assert_array_equal(a, b)
        if item.get("want_scores"):
            for a, b in zip(sel.scores, want.scores):
                np.testing.assert_array_equal(a, b)
        assert bool(sel.selection_id) == bool(item.get("keep"))
    keys, _ = client.retrieval.gather(got[5].selection_id, [0])
    assert keys.shape[:2] == (1, KV_HEADS)

    with pytest.raises(ropekv.Error) as e:
        client.select_batch([])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ropekv.Error) as e:
        client.select_batch([dict(items[0], gather=True)], model=model, tenant=tenant)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_packed_rows_equal_the_rows_form(client, model, tenant):
    """The client asks for packed rows (read with numpy.frombuffer); they hold what the rows form
    (one SelectedRow message a row, read element by element) holds: indices, scores, counts, -1
    padding up to the capacity."""
    rng = np.random.default_rng(31)
    tokens, _ = put_random(client, model, tenant, rng, 6)  # 96 tokens
    q = rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32)
    for reduction in ("max", "per_query_head"):
        kw = dict(model=model, tokens=tokens, tenant=tenant, layer=1, n_sink=1, want_scores=True,
                  reduction=reduction)
        sel = client.select(q, 120, **kw)  # k past the tokens: rows shorter than the capacity
        assert sel.header.HasField("packed") and len(sel.header.rows) == 0
        rows = KV_HEADS if reduction == "max" else QUERY_HEADS
        assert sel.padded_indices.shape == (rows, sel.header.capacity)
        assert sel.counts.tolist() == [96] * rows
        assert (sel.padded_indices[:, 96:] == -1).all()
        req = ropekv.retrieval._select_request(q, 120, **kw)
        req.packed_rows = False
        header, _ = ropekv.errors.read_stream(client.retrieval.stub.Select(req), "Select")
        assert len(header.rows) == rows and not header.HasField("packed")
        plain = ropekv.retrieval._selection(header, True, False)
        for a, b, c in zip(sel.indices, plain.indices, header.rows):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, np.array(c.indices, np.int32))
        for a, b in zip(sel.scores, plain.scores):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(sel.padded_indices, plain.padded_indices)


def test_gather_batch_into_shared_memory_equals_gather(client, model, tenant):
    """DataPlane.GatherBatchToBuffer: a decode batch's kept selections, each at its own offset of
    one buffer, equal Retrieval.Gather item by item; a failed item writes nothing and fails
    alone."""
    rng = np.random.default_rng(29)
    items = []
    for blocks in (6, 9, 12):
        tokens, _ = put_random(client, model, tenant, rng, blocks)
        items.append(dict(queries=rng.standard_normal((QUERY_HEADS, HEAD_DIM)).astype(np.float32),
                          k=12, tokens=tokens))
    sels = client.select_batch(items, model=model, tenant=tenant, n_sink=1, n_local=3, keep=True)
    wants = [client.retrieval.gather(s.selection_id, [1, 0]) for s in sels]
    sizes = [k.nbytes + v.nbytes for k, v in wants]
    total = sum(sizes) + 256
    with client.create_shm(total) as buf:
        canary = rng.integers(0, 256, size=total, dtype=np.uint8)
        buf.array(np.uint8, (total,))[:] = canary
        offsets = np.cumsum([64] + sizes[:-1]).tolist()
        batch = [(s.selection_id, [1, 0], (buf, at)) for s, at in zip(sels, offsets)]
        batch.insert(1, ("sel-unknown", [0], (buf, 0)))                  # NOT_FOUND
        batch.append((sels[0].selection_id, [0, 1], (buf, total - 8)))  # too small: INVALID_ARGUMENT
        got = client.retrieval.gather_batch(batch)
        assert len(got) == len(batch)
        assert isinstance(got[1], ropekv.Error) and got[1].code == grpc.StatusCode.NOT_FOUND
        assert isinstance(got[-1], ropekv.Error)
        assert got[-1].code == grpc.StatusCode.INVALID_ARGUMENT
        for (keys, values), (want_k, want_v) in zip([got[0]] + got[2:-1], wants):
            np.testing.assert_array_equal(keys, want_k)
            np.testing.assert_array_equal(values, want_v)
        raw = buf.array(np.uint8, (total,))
        np.testing.assert_array_equal(raw[:64], canary[:64])
        end = offsets[-1] + sizes[-1]
        np.testing.assert_array_equal(raw[end:], canary[end:])
    with pytest.raises(ropekv.Error) as e:
        client.retrieval.gather_batch([])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
