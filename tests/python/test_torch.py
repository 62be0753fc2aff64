"""Torch tensors in and out, and the transformers DynamicCache integration (ropekv.hf).
Skipped where torch (or transformers) is not installed."""

import numpy as np
import pytest

import ropekv

torch = pytest.importorskip("torch")

LAYERS, KV_HEADS, HEAD_DIM, BT = 2, 2, 32, 8


def register(client, dtype):
    return client.register_model(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=dtype,
                                 block_tokens=BT, rope={"theta": 10000.0}).model_id


def token_list(gen, n):
    return torch.randint(0, 30000, (n,), generator=gen).tolist()


@pytest.mark.parametrize("dtype,torch_dtype", [
    ("bf16", torch.bfloat16), ("f16", torch.float16), ("f32", torch.float32)])
def test_tensor_round_trip(client, tenant, dtype, torch_dtype):
    model = register(client, dtype)
    gen = torch.Generator().manual_seed(1)
    kv = torch.randn(3, LAYERS, 2, KV_HEADS, BT, HEAD_DIM, generator=gen).to(torch_dtype)
    toks = token_list(gen, 3 * BT)
    assert client.put(model, torch.tensor(toks), kv, tenant=tenant).blocks_stored == 3
    header, got = client.get_torch(model, toks, tenant=tenant)
    assert header.blocks == 3 and got.dtype == torch_dtype and got.shape == kv.shape
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))


def test_bf16_tensor_and_numpy_bits_agree(client, tenant):
    model = register(client, "bf16")
    gen = torch.Generator().manual_seed(2)
    kv = torch.randn(1, LAYERS, 2, KV_HEADS, BT, HEAD_DIM, generator=gen).to(torch.bfloat16)
    toks = token_list(gen, BT)
    client.put(model, toks, kv, tenant=tenant)
    _, arr = client.get(model, toks, tenant=tenant)
    bits = kv.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(np.ascontiguousarray(arr).view(np.uint16), bits)


def test_wrong_tensor_dtype_is_invalid(client, tenant):
    import grpc

    model = register(client, "bf16")
    kv = torch.zeros(1, LAYERS, 2, KV_HEADS, BT, HEAD_DIM, dtype=torch.float16)
    with pytest.raises(ropekv.Error) as e:
        client.put(model, list(range(BT)), kv, tenant=tenant)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "float16" in e.value.message


# -- transformers --------------------------------------------------------------------------------


def test_cache_blocks_round_trip():
    pytest.importorskip("transformers")
    import ropekv.hf as rhf

    gen = torch.Generator().manual_seed(3)
    seq = 3 * BT + 5  # a partial block at the end is left out
    ks = [torch.randn(1, KV_HEADS, seq, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    vs = [torch.randn(1, KV_HEADS, seq, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    legacy = tuple(zip(ks, vs))
    blocks = rhf.cache_to_blocks(legacy, BT)
    assert blocks.shape == (3, LAYERS, 2, KV_HEADS, BT, HEAD_DIM)
    # Element (block b, layer l, k|v, head h, token t, dim d) is token b * BT + t of the layer.
    assert torch.equal(blocks[2, 1, 0, 1, 3], ks[1][0, 1, 2 * BT + 3])
    assert torch.equal(blocks[0, 0, 1, 0, 7], vs[0][0, 0, 7])
    back = rhf.blocks_to_cache(blocks)
    for i, (k, v) in enumerate(rhf.layer_kv(back)):
        assert torch.equal(k, ks[i][:, :, :3 * BT]) and torch.equal(v, vs[i][:, :, :3 * BT])
    # The middle blocks only.
    mid = rhf.cache_to_blocks(back, BT, start=BT, stop=3 * BT)
    assert torch.equal(mid, blocks[1:])


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=512,
        rope_theta=10000.0)
    return transformers.LlamaForCausalLM(config).eval()


def test_prefix_reuse_matches_full_prefill(client, tenant):
    import ropekv.hf as rhf

    model = tiny_llama()
    spec = rhf.spec_from_config(model.config, block_tokens=BT, dtype=torch.float32)
    assert (spec["layers"], spec["kv_heads"], spec["head_dim"]) == (LAYERS, KV_HEADS, HEAD_DIM)
    model_id = client.register_model(spec).model_id
    gen = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, 512, (1, 4 * BT), generator=gen)
    a = torch.cat([prefix, torch.randint(0, 512, (1, 11), generator=gen)], dim=1)
    b = torch.cat([prefix, torch.randint(0, 512, (1, 13), generator=gen)], dim=1)
    with torch.no_grad():
        out_a, matched_a = rhf.prefill(model, client, model_id, a, tenant=tenant)
        assert matched_a == 0
        assert client.lookup(model_id, a[0], tenant=tenant).matched_tokens == 4 * BT + BT
        # B shares the 4-block prefix only: its prefill runs 13 tokens, not 45.
        out_b, matched_b = rhf.prefill(model, client, model_id, b, tenant=tenant)
        assert matched_b == 4 * BT
        assert out_b.logits.shape[1] == b.shape[1] - 4 * BT
        ref = model(input_ids=b, use_cache=True)
        assert rhf.output_cache(ref).get_seq_length() == b.shape[1]
    # The loaded keys/values are the bytes request A produced.
    for (k_b, v_b), (k_a, v_a) in zip(rhf.layer_kv(rhf.output_cache(out_b)),
                                      rhf.layer_kv(rhf.output_cache(out_a))):
        assert torch.equal(k_b[:, :, :4 * BT], k_a[:, :, :4 * BT])
        assert torch.equal(v_b[:, :, :4 * BT], v_a[:, :, :4 * BT])
    torch.testing.assert_close(out_b.logits, ref.logits[:, 4 * BT:], rtol=1e-4, atol=1e-5)
    assert torch.equal(out_b.logits[0].argmax(-1), ref.logits[0, 4 * BT:].argmax(-1))
