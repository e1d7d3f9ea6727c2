"""Tokenising prompts into left-padded batches, and per-sequence stop strings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def context_length(model) -> int | None:
    cfg = model.config
    get_text = getattr(cfg, "get_text_config", None)
    if get_text is not None:
        cfg = get_text()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if value:
            return int(value)
    return None


def encode_prompts(tokenizer, prompts: Sequence[str], model=None, reserve: int = 0) -> list[list[int]]:
    """Token ids of each prompt (tokenizer defaults, special tokens included).

    Raises ``ValueError`` for an empty prompt, or one that with ``reserve`` new tokens would not fit
    the model's context.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
    if len(prompts) == 0:
        raise ValueError("No prompts given: pass a non-empty list of strings.")
    limit = context_length(model) if model is not None else None
    out = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"Prompt {i} is empty: give each prompt some text.")
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"Prompt {i} tokenises to no tokens: give it some text.")
        if limit is not None and len(ids) + reserve > limit:
            raise ValueError(
                f"Prompt {i} has {len(ids)} tokens (+{reserve} to generate) but the model's context is "
                f"{limit} tokens: shorten the prompt (fewer few-shot examples) or use a longer-context model."
            )
        out.append(list(ids))
    return out


@dataclass
class Batch:
    """A left-padded batch: ``input_ids``, ``attention_mask``, ``position_ids`` all ``[B, T]``."""

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    lengths: list[int]

    @property
    def pad(self) -> list[int]:
        width = self.input_ids.shape[1]
        return [width - n for n in self.lengths]

    def model_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Left-pad token lists; position ids count real tokens only, so batched equals unbatched."""
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if len(toks):
            ids[i, width - len(toks):] = torch.tensor(list(toks), dtype=torch.long)
            mask[i, width - len(toks):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(ids.to(device), mask.to(device), pos.to(device), [len(t) for t in token_lists])


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pid)


def chunks(items: Sequence[T], size: int) -> Iterator[tuple[int, Sequence[T]]]:
    """``(start, items[start:start+size])`` pairs."""
    if size < 1:
        raise ValueError(f"batch size must be ≥ 1, got {size}")
    for start in range(0, len(items), size):
        yield start, items[start:start + size]


class StopTracker:
    """Per-sequence stop strings and EOS for a batch of greedy generations.

    Call :meth:`update` with the tokens chosen at each step; :attr:`done` says which sequences
    have finished. :meth:`result` returns the text before the first stop string and the tokens that
    lie wholly before it (the stop string itself is stripped).
    """

    def __init__(self, tokenizer, batch_size: int, stop: Iterable[str] = (), eos_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.eos = set(int(e) for e in eos_ids)
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size

    def update(self, next_tokens: Sequence[int]) -> list[bool]:
        for i, tok in enumerate(next_tokens):
            if self.done[i]:
                continue
            tok = int(tok)
            if tok in self.eos:
                self.done[i] = True
                continue
            self.tokens[i].append(tok)
            if self.stop:
                # only the tail can hold a new stop string
                tail = self.tokenizer.decode(self.tokens[i][-16:])
                if any(s in tail for s in self.stop):
                    self.done[i] = True
        return self.done

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def result(self, i: int) -> tuple[str, list[int]]:
        toks = self.tokens[i]
        text = self.tokenizer.decode(toks, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut < 0:
            return text, list(toks)
        text = text[:cut]
        keep = 0
        for n in range(len(toks), -1, -1):
            if len(self.tokenizer.decode(toks[:n], skip_special_tokens=True)) <= cut:
                keep = n
                break
        return text, list(toks[:keep])
