"""Prefill a batch whose prompts share a prefix (a few-shot primer), computing the prefix once.

Layout of the batch: ``[shared prefix][left padding][own suffix]``; the attention mask hides the
padding and position ids count real tokens only, so every row sees exactly what it would see alone.
The prefix's KV cache is kept (keyed by its tokens) and reused by later batches with the same prefix.

>>> batch = prefill(model, token_lists, pad_id=0)        # doctest: +SKIP
>>> batch.logits.shape                                      # [B, V] at each row's last position
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

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
    ``[B, S, d]`` over the suffix part (when asked); suffix_start: column where the padded suffix
    part begins; lengths: each row's real token count.
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

    def step_inputs(self, next_tokens: Tensor) -> dict:
        """Inputs for the next decoding step; advances the mask and positions in place."""
        B = next_tokens.shape[0]
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(B, 1)], dim=1)
        inputs = {"input_ids": next_tokens.view(B, 1), "attention_mask": self.attention_mask,
                  "position_ids": self.next_position, "past_key_values": self.cache, "use_cache": True}
        self.next_position = self.next_position + 1
        return inputs


def _prefix_cache(model, prefix: list[int], device) -> object:
    key = (id(model), tuple(prefix))
    cache = _PREFIX_CACHE.get(key)
    if cache is None:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        cache = out.past_key_values
        _PREFIX_CACHE.clear()  # keep one prefix: a long run uses one primer
        _PREFIX_CACHE[key] = cache
    return cache


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
) -> Prefilled:
    """Run the prompts of a batch, the shared prefix only once.

    ``keep_suffix`` also returns the hidden states (if ``output_hidden_states``) and logits of
    every suffix position, e.g. to score answer tokens.
    """
    dev = next(model.parameters()).device
    B = len(token_lists)
    p = shared_prefix_len(token_lists) if share_prefix else 0
    if p < min_prefix:
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
    cache = None
    if p:
        cache = copy.deepcopy(_prefix_cache(model, list(token_lists[0][:p]), dev))
        if B > 1:
            cache.batch_repeat_interleave(B)
    logits_to_keep = 0 if keep_suffix else 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep)
    hs = out.hidden_states if output_hidden_states else None
    return Prefilled(
        logits=out.logits[:, -1].float(),
        cache=out.past_key_values,
        attention_mask=mask,
        next_position=pos[:, -1:] + 1,
        hidden_last=tuple(h[:, -1] for h in hs) if hs is not None else None,
        suffix_hidden=hs if (hs is not None and keep_suffix) else None,
        suffix_logits=out.logits.float() if keep_suffix else None,
        suffix_start=p,
        lengths=[len(t) for t in token_lists],
    )
