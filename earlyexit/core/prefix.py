"""Prefill a batch whose prompts share a prefix (a few-shot primer), computing the prefix once.

Layout of the batch: ``[shared prefix][left padding][own suffix]``; the attention mask hides the
padding and position ids count real tokens only, so every row sees exactly what it would see alone.
The prefix's KV cache is kept (keyed by its tokens) and reused by later batches with the same prefix.

>>> from earlyexit.core.tiny import tiny_model
>>> model = tiny_model("llama", vocab_size=64)
>>> primer = list(range(1, 11))                             # ten shared tokens, then each row's own
>>> batch = prefill(model, [primer + [20, 21], primer + [30]], pad_id=0)
>>> batch.suffix_start, batch.logits.shape                  # the prefix ran once; [B, V] at each last position
(10, torch.Size([2, 64]))
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from earlyexit.core.kvcache import use_growing_layers
from earlyexit.core.parallel import input_device

_PREFIX_CACHE: dict[tuple, object] = {}


def shared_prefix_len(token_lists: Sequence[Sequence[int]]) -> int:
    """Longest common prefix of the token lists, leaving every list at least one own token."""
    first = token_lists[0]
    n = min(len(t) for t in token_lists) - 1
    for i in range(max(n, 0)):
        tok = first[i]
        if any(t[i] != tok for t in token_lists):
            return i
    return max(n, 0)


@dataclass
class Prefilled:
    """A prefilled batch, ready for decoding.

    logits ``[B, V]`` at each row's last position; hidden_last: L+1 tensors ``[B, d]`` at the last
    position (when asked); cache: the KV cache of the whole batch; attention_mask ``[B, T]``;
    next_position ``[B, 1]``: position id of the next token; suffix_hidden: L+1 tensors
    ``[B, S, d]`` over the (left-padded) suffix part and suffix_logits ``[B, S, V]`` (when asked);
    prefix_hidden: L+1 tensors ``[p, d]`` of the shared prefix (when hidden states are asked);
    suffix_start: the shared prefix length p; lengths: each row's real token count.
    """

    logits: Tensor
    cache: object
    attention_mask: Tensor
    next_position: Tensor
    hidden_last: tuple[Tensor, ...] | None
    suffix_hidden: tuple[Tensor, ...] | None
    suffix_logits: Tensor | None
    suffix_start: int
    lengths: list[int]
    prefix_hidden: tuple[Tensor, ...] | None = None

    def hidden_at(self, entry: int, row: int, position: int) -> Tensor:
        """Hidden state ``[d]`` of ``entry`` at token ``position`` of ``row`` (needs keep_suffix)."""
        if position < self.suffix_start:
            return self.prefix_hidden[entry][position]
        width = self.suffix_hidden[entry].shape[1]
        return self.suffix_hidden[entry][row, width - (self.lengths[row] - position)]

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Drop every row of the decoding state but ``rows`` (indices into the current batch), so that
        sequences that have finished cost nothing in later steps. The kept rows' results do not change:
        each row only ever attends to itself."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        self.cache.batch_select_indices(idx.cpu())  # CPU indices: a sharded model's cache sits on several devices
        self.attention_mask = self.attention_mask[idx]
        self.next_position = self.next_position[idx]
        self.logits = self.logits[idx]
        if self.hidden_last is not None:
            self.hidden_last = tuple(h[idx] for h in self.hidden_last)
        if self.suffix_hidden is not None:
            self.suffix_hidden = tuple(h[idx] for h in self.suffix_hidden)
        if self.suffix_logits is not None:
            self.suffix_logits = self.suffix_logits[idx]
        self.lengths = [self.lengths[i] for i in rows]

    def step_inputs(self, next_tokens: Tensor) -> dict:
        """Inputs for the next decoding step; advances the mask and positions in place."""
        B = next_tokens.shape[0]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(B, 1)], dim=1)
        inputs = {"input_ids": next_tokens.view(B, 1), "attention_mask": self.attention_mask,
                  "position_ids": self.next_position, "past_key_values": self.cache, "use_cache": True}
        self.next_position = self.next_position + 1
        return inputs


def _prefix_state(model, prefix: list[int], device) -> tuple[object, tuple[Tensor, ...]]:
    """KV cache and hidden states ``(L+1) × [p, d]`` of one prefix, computed once and kept."""
    key = (id(model), tuple(prefix))
    state = _PREFIX_CACHE.get(key)
    if state is None:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, output_hidden_states=True,
                    logits_to_keep=1)  # only the KV cache and hidden states are kept
        state = (out.past_key_values, tuple(h[0] for h in out.hidden_states))
        _PREFIX_CACHE.clear()  # keep one prefix: a long run uses one primer
        _PREFIX_CACHE[key] = state
    return state


@torch.no_grad()
def extend_prefix(model, ids: Sequence[int], prefix: Sequence[int]):
    """A fresh KV cache of ``ids`` (batch 1): when ``ids`` starts with ``prefix`` (a few-shot primer), the
    prefix's cache — computed once and kept, as for :func:`prefill` — is copied and only the rest runs;
    otherwise all of ``ids`` runs. ``None`` for no ids."""
    dev = input_device(model)
    ids, prefix = list(ids), list(prefix)
    n = len(prefix)
    if n and len(ids) >= n and ids[:n] == prefix:
        cache = copy.deepcopy(_prefix_state(model, prefix, dev)[0])
        rest = ids[n:]
    else:
        cache, rest, n = None, ids, 0
    if rest:
        pos = torch.arange(n, n + len(rest), device=dev)[None]
        cache = model(input_ids=torch.tensor([rest], device=dev), position_ids=pos, past_key_values=cache,
                      use_cache=True).past_key_values
    return cache


def _sliding_window(model) -> int | None:
    cfg = model.config
    get_text = getattr(cfg, "get_text_config", None)
    if get_text is not None:
        cfg = get_text()
    window = getattr(cfg, "sliding_window", None)
    return int(window) if window else None


@torch.no_grad()
def prefill(
    model,
    token_lists: Sequence[Sequence[int]],
    pad_id: int,
    *,
    share_prefix: bool = True,
    min_prefix: int = 8,
    output_hidden_states: bool = False,
    keep_suffix: bool = False,
    suffix_logits: bool = True,
    reserve: int = 0,
) -> Prefilled:
    """Run the prompts of a batch, the shared prefix only once.

    ``keep_suffix`` also returns the hidden states (if ``output_hidden_states``) and, with
    ``suffix_logits``, the logits of every suffix position, e.g. to score answer tokens.
    ``reserve``: tokens that will be decoded after the prefill. With sliding-window attention the
    prefix is shared only while the whole sequence fits the window (a cropped window cache and a
    padding gap in the middle of the sequence do not mix).
    """
    dev = input_device(model)
    B = len(token_lists)
    p = shared_prefix_len(token_lists) if share_prefix else 0
    if p < min_prefix:
        p = 0
    window = _sliding_window(model)
    if p and window is not None and max(len(t) for t in token_lists) + reserve > window:
        p = 0
    suffixes = [list(t[p:]) for t in token_lists]
    width = max(len(s) for s in suffixes)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    mask = torch.zeros((B, p + width), dtype=torch.long)
    mask[:, :p] = 1
    for i, s in enumerate(suffixes):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, p + width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
    ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
    cache, prefix_hidden = None, None
    if p:
        shared_cache, prefix_hidden = _prefix_state(model, list(token_lists[0][:p]), dev)
        cache = copy.deepcopy(shared_cache)
        if B > 1:
            cache.batch_repeat_interleave(B)
    logits_to_keep = 0 if keep_suffix and suffix_logits else 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep)
    hs = out.hidden_states if output_hidden_states else None
    return Prefilled(
        logits=out.logits[:, -1].float(),
        cache=use_growing_layers(out.past_key_values),  # decoding appends in place from here on
        attention_mask=mask,
        next_position=pos[:, -1:] + 1,
        hidden_last=tuple(h[:, -1] for h in hs) if hs is not None else None,
        suffix_hidden=hs if (hs is not None and keep_suffix) else None,
        suffix_logits=out.logits.float() if keep_suffix and suffix_logits else None,
        suffix_start=p,
        lengths=[len(t) for t in token_lists],
        prefix_hidden=prefix_hidden if output_hidden_states else None,
    )
