"""Run a causal LM's decoder layers one at a time, on a KV cache: what early-exit and self-speculative
decoding need (the model's own ``forward`` runs every layer, always).

:class:`LayerStack` splits the model's forward into its parts — the embeddings, the per-call context
(attention masks and rotary position embeddings, built with transformers' own functions), one decoder
layer — so a caller can stop after layer ``e``, skip a set of layers, or run only layers ``E..L-1`` on
hidden states it already has. Every layer writes its keys and values into the cache under its own index,
as in the model's forward; running all layers in order gives the model's output bit for bit.

Rule: the layers run in one call must all hold the same number of positions in the cache before it
(the masks are sized from the first of them). :func:`crop_layers` cuts layers back to a length, after a
rejected draft.

>>> import torch
>>> from earlyexit.core.prefix import prefill
>>> from earlyexit.core.tiny import tiny_model
>>> model = tiny_model("llama", vocab_size=64)
>>> state = prefill(model, [[1, 2, 3]], pad_id=0)
>>> stack = LayerStack(model)
>>> h = stack.run(torch.tensor([[7]]), 3, state.cache)                # all layers: the model's own step
>>> ref = model(torch.tensor([[1, 2, 3, 7]])).logits[0, -1]
>>> bool(torch.allclose(stack.final_logits(h)[0, -1], ref, atol=1e-5))
True
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from earlyexit.core.arch import resolve_arch
from earlyexit.core.lenses import get_unembed


class _KVWritten(Exception):
    """Raised by :class:`_KVOnly` once a layer has written its keys and values: the rest of the layer
    (attention, MLP) is not needed."""


class _KVOnly:
    """A stand-in for the cache that writes a layer's keys and values into the real one, then stops the
    layer (CALM's state propagation needs only the KV of the skipped layers)."""

    def __init__(self, cache):
        self._cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._cache.update(key_states, value_states, layer_idx, *args, **kwargs)
        raise _KVWritten

    def __getattr__(self, name):
        return getattr(self._cache, name)


@dataclass
class Context:
    """Masks and position embeddings of one call (one chunk of new positions)."""

    position_ids: Tensor
    masks: dict[str, Any] = field(default_factory=dict)
    rotary: dict[str, Any] = field(default_factory=dict)


def _text_config(model):
    cfg = model.config
    get_text = getattr(cfg, "get_text_config", None)
    return get_text() if get_text is not None else cfg


def cache_length(cache, layer: int) -> int:
    """Positions held by ``layer`` of the cache (every position seen, for a sliding-window layer)."""
    if cache is None or layer >= len(cache.layers):
        return 0
    return int(cache.layers[layer].get_seq_length())


def crop_layers(cache, length: int, layers: Sequence[int] | None = None) -> None:
    """Cut ``layers`` (all by default) of ``cache`` back to their first ``length`` positions. Sliding-window
    layers must record their past (:func:`prepare_cache`) to be cut."""
    idx = range(len(cache.layers)) if layers is None else layers
    for i in idx:
        extra = cache_length(cache, i) - length
        if extra < 0:
            raise ValueError(f"cache layer {i} holds {cache_length(cache, i)} positions, fewer than {length}")
        if extra:
            cache.layers[i].crop(-extra)


def prepare_cache(cache):
    """Let sliding-window layers be cut back after a rejection (transformers keeps their past until a
    crop then). Returns ``cache``."""
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    return cache


class LayerStack:
    """The parts of a decoder-only model's forward, for batch-1 decoding on a cache.

    Supported: Llama-style models (``model.model.layers`` with rotary embeddings: Llama, Mistral, Qwen,
    Gemma 1–3, OLMo-2, …) and GPT-2. Hidden-state entries follow ``output_hidden_states``: entry 0 = the
    embeddings, entry k = after ``layers[k-1]``, entry L = the normed output.
    """

    def __init__(self, model):
        self.model = model
        self.base = model.base_model
        self.arch = resolve_arch(model, getattr(model, "earlyexit_arch", None))
        self.layers = self.arch.layers
        self.L = self.arch.n_layers
        self.config = _text_config(model)
        self.unembed = get_unembed(model)
        types = getattr(self.config, "layer_types", None)
        self.layer_types = list(types) if types else ["full_attention"] * self.L
        self.gpt2 = hasattr(self.base, "wpe") and hasattr(self.base, "h")
        rotary = getattr(self.base, "rotary_emb", None)
        if not self.gpt2 and (rotary is None or not hasattr(self.base, "embed_tokens")):
            raise NotImplementedError(f"{type(model).__name__}: running layers one by one needs a Llama-style model "
                                      "(embed_tokens, rotary_emb, layers) or GPT-2.")
        self._rotary = rotary
        self._rotary_typed = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters

    # --- parts ------------------------------------------------------------------------------------
    def embed(self, ids: Tensor, position_ids: Tensor) -> Tensor:
        """``ids`` ``[1, n]`` → entry 0 ``[1, n, d]``."""
        if self.gpt2:
            h = self.base.wte(ids) + self.base.wpe(position_ids)
            return self.base.drop(h)
        return self.base.embed_tokens(ids)

    def context(self, h: Tensor, position_ids: Tensor, cache, layers: Sequence[int]) -> Context:
        """Masks (one per attention type among ``layers``, sized from the first layer of each type) and
        rotary embeddings for new positions ``position_ids`` ``[1, n]``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        ctx = Context(position_ids)
        for i in layers:
            kind = self.layer_types[i]
            if kind in ctx.masks:
                continue
            make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            ctx.masks[kind] = make(config=self.config, inputs_embeds=h, attention_mask=None, past_key_values=cache,
                                   position_ids=position_ids, layer_idx=i)
            if self._rotary is not None:
                rkey = kind if self._rotary_typed else "all"
                if rkey not in ctx.rotary:
                    ctx.rotary[rkey] = (self._rotary(h, position_ids, kind) if self._rotary_typed
                                        else self._rotary(h, position_ids=position_ids))
        return ctx

    def layer(self, i: int, h: Tensor, ctx: Context, cache) -> Tensor:
        """Decoder layer ``i`` (0-based) on ``h`` ``[1, n, d]``; writes its KV for the new positions."""
        kind = self.layer_types[i]
        mask = ctx.masks[kind]
        if self.gpt2:
            return self.layers[i](h, cache, mask, use_cache=True, position_ids=ctx.position_ids)
        rot = ctx.rotary["all" if not self._rotary_typed else kind]
        return self.layers[i](h, attention_mask=mask, position_embeddings=rot, position_ids=ctx.position_ids,
                              past_key_values=cache, use_cache=True)

    def write_kv(self, i: int, h: Tensor, ctx: Context, cache) -> None:
        """Only the keys and values of layer ``i`` computed from input ``h`` (CALM's state propagation: a
        skipped layer's KV from the exit hidden state copied upward). The layer stops once they are written."""
        kind = self.layer_types[i]
        proxy = _KVOnly(cache)
        try:
            if self.gpt2:
                self.layers[i](h, proxy, ctx.masks[kind], use_cache=True, position_ids=ctx.position_ids)
            else:
                rot = ctx.rotary["all" if not self._rotary_typed else kind]
                self.layers[i](h, attention_mask=ctx.masks[kind], position_embeddings=rot,
                               position_ids=ctx.position_ids, past_key_values=proxy, use_cache=True)
        except _KVWritten:
            return
        raise RuntimeError(f"decoder layer {i} did not write to the KV cache")

    def final_logits(self, h: Tensor) -> Tensor:
        """Entry-L logits of the last layer's output ``h`` ``[1, n, d]`` → ``[1, n, V]`` float32 (final norm,
        then the model's own head call, as its forward does)."""
        return self.unembed(self.unembed.final_norm(h), normed=False)

    # --- convenience -----------------------------------------------------------------------------
    def positions(self, start: int, n: int, device) -> Tensor:
        return torch.arange(start, start + n, device=device)[None]

    def run(self, ids: Tensor, start: int, cache, layers: Sequence[int] | None = None,
            h: Tensor | None = None) -> Tensor:
        """Run ``layers`` (default all, in order) on new positions ``start..start+n-1``: from token ``ids``
        ``[1, n]`` (embedded here) or from hidden states ``h`` ``[1, n, d]``. Returns the last layer's output."""
        layers = list(range(self.L)) if layers is None else list(layers)
        dev = self.unembed.device
        n = ids.shape[1] if h is None else h.shape[1]
        pos = self.positions(start, n, dev)
        if h is None:
            h = self.embed(ids.to(dev), pos)
        if not layers:
            return h
        ctx = self.context(h, pos, cache, layers)
        for i in layers:
            h = self.layer(i, h, ctx, cache)
        return h


def get_stack(model) -> LayerStack:
    """The model's :class:`LayerStack`, built once and kept on it."""
    stack = getattr(model, "_earlyexit_stack", None)
    if stack is None:
        stack = LayerStack(model)
        object.__setattr__(model, "_earlyexit_stack", stack)
    return stack
