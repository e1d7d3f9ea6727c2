"""Tokenising prompts into left-padded batches, and per-sequence stop strings."""
from __future__ import annotations

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


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]], model=None,
                   reserve: int = 0) -> list[list[int]]:
    """Token ids of each prompt (tokenizer defaults, special tokens included).

    A prompt may also be a list of token ids, used as they are (no special tokens added).
    Raises ``ValueError`` for an empty prompt, or one that with ``reserve`` new tokens would not fit
    the model's context.
    """
    from earlyexit.core.errors import BadInput, BadType

    if isinstance(prompts, str):
        raise BadType("prompts must be a list of strings, not one string; wrap it: [prompt]")
    if len(prompts) == 0:
        raise BadInput("No prompts given: pass a non-empty list of strings.")
    if all(isinstance(p, int) for p in prompts):
        raise BadType("prompts must be a list of prompts, not one list of token ids; wrap it: [ids]")
    limit = context_length(model) if model is not None else None
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = [int(t) for t in prompt]
        elif not isinstance(prompt, str):
            raise BadType(f"Prompt {i} is a {type(prompt).__name__}, not a string: give each prompt as text.")
        elif not prompt.strip():
            raise BadInput(f"Prompt {i} is empty: give each prompt some text.")
        else:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) == 0:
            raise BadInput(f"Prompt {i} tokenises to no tokens: give it some text.")
        if limit is not None and len(ids) + reserve > limit:
            raise BadInput(
                f"Prompt {i} has {len(ids)} tokens (+{reserve} to generate) but the model's context is "
                f"{limit} tokens: shorten the prompt (fewer few-shot examples) or use a longer-context model."
            )
        out.append(list(ids))
    return out


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
        from earlyexit.core.checks import check_strings

        self.tokenizer = tokenizer
        self.stop = [s for s in check_strings(stop, "stop") if s]  # a lone string is refused, not its characters
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
