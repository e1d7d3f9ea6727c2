"""The in-place KV cache: same results as transformers' DynamicCache, without copying the cache per step."""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from earlyexit.core.kvcache import GrowingLayer, use_growing_layers


def _decode(model, ids, steps, grow):
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    if grow:
        use_growing_layers(cache)
    logits, ptrs = [out.logits[:, -1]], []
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        ptrs.append(cache.layers[0].keys.data_ptr())
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits), ptrs, cache


@torch.no_grad()
def test_growing_layers_match_the_dynamic_cache_and_append_in_place(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 1000, (3, 11))
    want, _, _ = _decode(model, ids, 12, grow=False)
    got, ptrs, cache = _decode(model, ids, 12, grow=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    # the buffer grew at most a few times over 12 steps instead of being copied at each one
    assert len(set(ptrs)) <= 2


@torch.no_grad()
def test_growing_layer_after_row_selection_and_crop(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 1000, (3, 9))
    out = model(input_ids=ids, use_cache=True)
    cache = use_growing_layers(out.past_key_values)
    nxt = torch.randint(0, 1000, (3, 1))
    cache = model(input_ids=nxt, past_key_values=cache, use_cache=True).past_key_values
    cache.batch_select_indices(torch.tensor([0, 2]))
    cache.crop(-1)  # drop the step just appended
    got = model(input_ids=nxt[[0, 2]], past_key_values=cache, use_cache=True).logits[:, -1]
    want = model(input_ids=torch.cat([ids, nxt], 1)[[0, 2]]).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_only_plain_layers_are_switched():
    class Cache:
        layers = [DynamicLayer(), object()]

    cache = use_growing_layers(Cache())
    assert type(cache.layers[0]) is GrowingLayer and type(cache.layers[1]) is object
