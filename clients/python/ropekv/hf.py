"""Hugging Face transformers integration: store and load the DynamicCache of a prompt's prefix.

A transformers cache holds, per layer, K and V as [batch, kv_heads, seq, head_dim] (post-RoPE
keys). ropekv stores blocks [blocks][layers][k|v][kv_heads][block_tokens][head_dim]; this module
converts between the two and wires them to a Client:

    import ropekv, ropekv.hf as rhf
    client = ropekv.Client(addr)
    model_id = client.register_model(rhf.spec_from_config(model.config, dtype=torch.bfloat16)).model_id
    out, matched = rhf.prefill(model, client, model_id, input_ids)   # reuses a cached prefix
    # rhf.output_cache(out) continues decoding as usual; matched tokens were not recomputed.

Works with the transformers versions whose DynamicCache exposes `.layers[i].keys / .values`
(4.56 and later, 5.x) or `.key_cache[i] / .value_cache[i]` (4.36 - 4.55), and with legacy tuples.
Only batch row `batch_index` (default 0) is stored; loading builds a batch of one. torch and
transformers are imported lazily (this module imports without them).
"""

from ropekv import arrays
from ropekv.errors import invalid
from ropekv.spec import spec_from_hf_config


def spec_from_config(config, block_tokens=16, dtype=None):
    """The ropekv model spec dict of a transformers config (see ropekv.spec.spec_from_hf_config)."""
    return spec_from_hf_config(config, block_tokens=block_tokens, dtype=dtype)


def layer_kv(cache):
    """[(keys, values)] per layer of a transformers cache, each [batch, kv_heads, seq, head_dim]."""
    layers = getattr(cache, "layers", None)
    if layers is not None and (len(layers) == 0 or hasattr(layers[0], "keys")):
        out = []
        for i, layer in enumerate(layers):
            if layer.keys is None or layer.keys.dim() != 4:
                raise invalid(f"cache layer {i} holds no keys yet")
            out.append((layer.keys, layer.values))
        return out
    if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (tuple, list)):
        return [(kv[0], kv[1]) for kv in cache]
    if hasattr(cache, "to_legacy_cache"):
        return [(k, v) for k, v in cache.to_legacy_cache()]
    raise invalid(f"not a transformers KV cache: {type(cache).__name__}")


def cache_seq_length(cache):
    kvs = layer_kv(cache)
    return 0 if not kvs else int(kvs[0][0].shape[-2])


def cache_to_blocks(cache, block_tokens, start=0, stop=None, batch_index=0):
    """Tokens [start, stop) of one batch row of a cache as whole blocks: a torch tensor
    [blocks, layers, 2, kv_heads, block_tokens, head_dim] on the cache's device (a copy).
    stop defaults to the cache length; (stop - start) is rounded down to whole blocks."""
    import torch

    kvs = layer_kv(cache)
    if not kvs:
        raise invalid("the cache has no layers")
    seq = int(kvs[0][0].shape[-2])
    stop = seq if stop is None else min(stop, seq)
    n = (stop - start) // block_tokens
    if start < 0 or n <= 0:
        raise invalid(f"tokens [{start}, {stop}) of a {seq}-token cache hold no whole block of "
                      f"{block_tokens} tokens")
    end = start + n * block_tokens
    per_layer = [torch.stack([k[batch_index, :, start:end], v[batch_index, :, start:end]])
                 for k, v in kvs]  # each [2, kv_heads, n * bt, head_dim]
    x = torch.stack(per_layer)  # [layers, 2, kv_heads, n * bt, head_dim]
    layers, _, heads, _, head_dim = x.shape
    x = x.reshape(layers, 2, heads, n, block_tokens, head_dim)
    return x.permute(3, 0, 1, 2, 4, 5).contiguous()


def blocks_to_cache(blocks, config=None, dtype=None, device=None):
    """A DynamicCache (batch of one) holding the tokens of `blocks`
    [blocks, layers, 2, kv_heads, block_tokens, head_dim] (a torch tensor), in block order."""
    import transformers

    n, layers, two, heads, bt, head_dim = blocks.shape
    if two != 2:
        raise invalid(f"blocks must be [blocks, layers, 2, kv_heads, tokens, head_dim], "
                      f"got {list(blocks.shape)}")
    if dtype is not None or device is not None:
        blocks = blocks.to(device=device, dtype=dtype)
    x = blocks.permute(1, 2, 3, 0, 4, 5).reshape(layers, 2, heads, n * bt, head_dim)
    cache = _new_dynamic_cache(transformers, config)
    for layer in range(layers):
        cache.update(x[layer, 0].unsqueeze(0).contiguous(), x[layer, 1].unsqueeze(0).contiguous(),
                     layer)
    return cache


def _new_dynamic_cache(transformers, config):
    cls = transformers.DynamicCache
    if config is not None:
        try:
            return cls(config=config)
        except TypeError:  # versions whose DynamicCache takes no config
            pass
    return cls()


def cache_kwargs(hf_model, cache):
    """The forward() keyword that passes a cache: `cache` (transformers 5.x, where
    `past_key_values` is deprecated) or `past_key_values` (4.x)."""
    import inspect

    params = inspect.signature(hf_model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def output_cache(out):
    """The cache of a model output: `.cache` (transformers 5.x) or `.past_key_values` (4.x)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _row(input_ids, batch_index):
    if arrays.is_torch_tensor(input_ids) and input_ids.dim() == 2:
        input_ids = input_ids[batch_index]
    return arrays.tokens_list(input_ids)


def store_prefix(client, model, input_ids, cache, tenant="", pin=False, batch_index=0):
    """Stores the whole blocks of `input_ids` that `cache` holds (the cache must have been filled
    from these tokens, starting at position 0). Blocks already cached are not sent again: the
    longest cached prefix is looked up first and only the blocks after it travel.
    Returns the PutResponse, or None when there was nothing new to store."""
    tokens = _row(input_ids, batch_index)
    bt = client.spec(model).block_tokens
    n = min(len(tokens), cache_seq_length(cache)) // bt * bt
    if n == 0:
        return None
    look = client.lookup(model, tokens[:n], tenant=tenant)
    m = look.matched_tokens
    if m >= n:
        return None
    kv = cache_to_blocks(cache, bt, start=m, stop=n, batch_index=batch_index)
    parent = look.blocks[-1].hash if m > 0 else None
    return client.put(model, tokens[m:n], kv, tenant=tenant, parent=parent, pin=pin)


def load_prefix(client, model, input_ids, tenant="", config=None, dtype=None, device=None,
                max_tokens=None, batch_index=0, out=None):
    """The cached KV of the longest cached prefix of `input_ids`, as a DynamicCache.

    At most `max_tokens` tokens are loaded (default: len - 1, so that at least one token is left to
    run through the model and give logits). out: a registered buffer (Client.register_cuda for a
    GPU frontend, or a ShmBuffer) that the daemon writes the blocks into itself (DataPlane, no
    bytes through gRPC); it must hold the blocks. Returns (matched_tokens, cache); (0, None) on a
    miss."""
    tokens = _row(input_ids, batch_index)
    limit = len(tokens) - 1 if max_tokens is None else min(max_tokens, len(tokens))
    bt = client.spec(model).block_tokens
    max_blocks = limit // bt
    if max_blocks <= 0:
        return 0, None
    if out is not None:
        header, blocks = client.get(model, tokens[:max_blocks * bt], tenant=tenant,
                                    max_blocks=max_blocks, out=out)
        if header.blocks and not arrays.is_torch_tensor(blocks):  # a view of shared memory
            blocks = arrays.numpy_to_torch(blocks, client.spec(model).dtype, device)
        elif header.blocks and device is not None:
            blocks = blocks.to(device)
    else:
        header, blocks = client.get_torch(model, tokens[:max_blocks * bt], tenant=tenant,
                                          max_blocks=max_blocks, device=device)
    if header.blocks == 0:
        return 0, None
    return header.matched_tokens, blocks_to_cache(blocks, config=config, dtype=dtype)


def prefill(hf_model, client, model, input_ids, tenant="", store=True, out=None,
            **forward_kwargs):
    """A prefill that reuses ropekv: loads the longest cached prefix of `input_ids` (a [1, n]
    tensor; through the registered buffer `out` when given, see load_prefix), runs `hf_model` on
    the remaining tokens only, and (store=True) stores the new whole blocks. Returns (model
    output: .logits of the remaining tokens, and the cache of the whole prompt, see
    output_cache(); matched_tokens)."""
    import transformers

    param = next(hf_model.parameters())
    matched, cache = load_prefix(client, model, input_ids, tenant=tenant, config=hf_model.config,
                                 dtype=param.dtype, device=input_ids.device, out=out)
    if cache is None:
        cache = _new_dynamic_cache(transformers, hf_model.config)
    out = hf_model(input_ids=input_ids[:, matched:], use_cache=True,
                   **cache_kwargs(hf_model, cache), **forward_kwargs)
    if store:
        store_prefix(client, model, input_ids, output_cache(out), tenant=tenant)
    return out, matched
