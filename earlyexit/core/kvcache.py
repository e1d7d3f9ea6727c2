"""A KV cache that appends in place.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies
the whole cache of every layer at every decoding step: for SmolLM2 with 16 sequences of ~250 tokens
that is ~190 MB copied per generated token, a third of the step's time on a laptop CPU.
:class:`GrowingLayer` keeps the keys and values in a buffer with spare room and writes new positions
into it, so a step copies only the new position (the buffer doubles when full). Everything else —
masks, cropping, batch selection — sees the same ``keys`` / ``values`` tensors as before (views of the
buffer's front), so results do not change.

>>> from earlyexit.core.prefix import prefill
>>> from earlyexit.core.tiny import tiny_model
>>> cache = prefill(tiny_model(vocab_size=64), [[1, 2, 3]], pad_id=0).cache   # prefill converts it
>>> type(cache.layers[0]).__name__
'GrowingLayer'
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

MIN_SPARE = 64  # positions of spare room added at least when the buffer grows


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` ``[B, H, T, D]`` are views of buffers with
    room for more positions."""

    @classmethod
    def from_layer(cls, layer: DynamicLayer) -> "GrowingLayer":
        new = cls.__new__(cls)
        new.__dict__.update(layer.__dict__)
        new._buffers_kv = None
        return new

    def _owns(self, t: Tensor, buf: Tensor) -> bool:
        """Whether ``t`` is still the front view of ``buf`` (not a new tensor, as batch selection makes)."""
        return t.data_ptr() == buf.data_ptr() and t.shape[:2] == buf.shape[:2] and t.stride() == buf.stride()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        T, n = self.keys.shape[-2], key_states.shape[-2]
        bufs = self._buffers_kv
        if (bufs is None or not self._owns(self.keys, bufs[0]) or not self._owns(self.values, bufs[1])
                or T + n > bufs[0].shape[-2]):
            capacity = T + n + max(MIN_SPARE, T)
            bufs = tuple(self._grow(t, capacity) for t in (self.keys, self.values))
            self._buffers_kv = bufs
        kbuf, vbuf = bufs
        kbuf[..., T:T + n, :] = key_states
        vbuf[..., T:T + n, :] = value_states
        self.keys, self.values = kbuf[..., :T + n, :], vbuf[..., :T + n, :]
        return self.keys, self.values

    @staticmethod
    def _grow(t: Tensor, capacity: int) -> Tensor:
        B, H, T, D = t.shape
        buf = t.new_empty(B, H, capacity, D)
        buf[..., :T, :] = t
        return buf


def use_growing_layers(cache) -> object:
    """Switch the plain (full-attention) layers of a ``DynamicCache`` to :class:`GrowingLayer`, in place;
    sliding-window and other layer kinds are left as they are. Returns ``cache``."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = GrowingLayer.from_layer(layer)
    return cache
