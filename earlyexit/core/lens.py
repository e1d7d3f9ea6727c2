"""The logit lens: per-layer distributions of a batch of prompts, reduced on the fly.

>>> from earlyexit import lens_stats, load_tokenizer, tiny_model
>>> model, tok = tiny_model("llama"), load_tokenizer()          # or load_model("smollm2-135m")
>>> r = lens_stats(model, tok, ["The capital of France is", "Hi"], positions="all", kl=True)
>>> r.entropy.shape                                             # [B, E = L+1, P]; P: the longer prompt
torch.Size([2, 5, 5])
>>> bool(r.kl_to_final[:, -1][r.valid].abs().max() < 1e-5)       # entry L is the model's output
True

On SmolLM2, ``tok.decode(r.top_ids[0, -1, -1, 0])`` for the first prompt is ``' Paris'``.

Layer numbering follows ``output_hidden_states``: entry 0 is the embedding output, entry k the
residual stream after decoder layer k, entry L the model's own (normed) output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from earlyexit.core.batching import chunks, encode_prompts, pad_id
from earlyexit.core.checks import check_int
from earlyexit.core.prefix import prefill
from earlyexit.core.stats import CHUNK_BYTES, layer_stats
from earlyexit.core.lenses import LensLike, check_entries, get_unembed, resolve_lens

if TYPE_CHECKING:
    from earlyexit.core.lenses import Model, Tokenizer


Positions = Union[Literal["last", "all"], Sequence[int], Sequence[Sequence[int]]]


def n_layers(model) -> int:
    return get_unembed(model).n_layers


def check_layers(model, layers: Sequence[int] | None) -> list[int]:
    """Validate hidden-state entries of ``model``; ``None`` → all of 0..L (see :func:`check_entries`)."""
    return check_entries(n_layers(model), layers)


def depth_layers(L: int) -> list[int]:
    """The original figure's layers: depth 0, L/4, L/2, 3L/4, L-1 and L (sorted, unique)."""
    return sorted({0, L // 4, L // 2, (3 * L) // 4, L - 1, L})


@dataclass
class LensResult:
    """Lens statistics of ``B`` prompts, ``E`` layers (hidden-state entries) and ``P`` positions.

    positions ``[B, P]``: token index in each prompt (its own tokens, no padding); ``-1`` marks an
    unused slot when prompts have different numbers of positions (``valid`` is False there and the
    statistics are NaN / -1). entropy ``[B, E, P]``; top_ids, top_probs ``[B, E, P, k]``;
    target_probs, target_ranks ``[B, E, P, n_t]``; kl_to_final ``[B, E, P]``; probs ``[B, E, P, V]``.
    """

    layers: list[int]
    lens: str
    tokens: list[list[int]]
    positions: Tensor
    valid: Tensor
    entropy: Tensor
    top_ids: Tensor
    top_probs: Tensor
    target_probs: Tensor | None = None
    target_ranks: Tensor | None = None
    kl_to_final: Tensor | None = None
    probs: Tensor | None = None

    def layer_index(self, entry: int) -> int:
        """Position of hidden-state ``entry`` along the E axis."""
        if entry not in self.layers:
            raise IndexError(f"Layer {entry} was not computed; computed: {self.layers}")
        return self.layers.index(entry)


def _resolve_positions(positions: Positions, lengths: list[int]) -> list[list[int]]:
    B = len(lengths)
    if isinstance(positions, str):
        if positions == "last":
            return [[n - 1] for n in lengths]
        if positions == "all":
            return [list(range(n)) for n in lengths]
        raise ValueError(f"Unknown positions {positions!r}: use 'last', 'all', or token indices.")
    positions = list(positions)
    if positions and all(isinstance(p, int) for p in positions):
        per = [list(positions)] * B
    else:
        per = [list(p) for p in positions]
        if len(per) != B:
            raise ValueError(f"Got position lists for {len(per)} prompts, but {B} prompts.")
    out = []
    for i, (pos, n) in enumerate(zip(per, lengths)):
        if not pos:
            raise ValueError(f"Prompt {i}: no positions given.")
        fixed = []
        for p in pos:
            q = p + n if p < 0 else p
            if not 0 <= q < n:
                raise IndexError(f"Position {p} out of range for prompt {i}, which has {n} tokens.")
            fixed.append(q)
        out.append(fixed)
    return out


def _resolve_targets(targets, per_pos: list[list[int]]) -> list[list[list[int]]] | None:
    """targets → per prompt, per position, a list of token ids."""
    if targets is None:
        return None
    targets = list(targets)
    if all(isinstance(t, int) for t in targets):
        return [[list(targets) for _ in pos] for pos in per_pos]
    if len(targets) != len(per_pos):
        raise ValueError("Per-prompt targets need one list per prompt.")
    out = []
    for i, (t, pos) in enumerate(zip(targets, per_pos)):
        t = list(t)
        if len(t) != len(pos):
            raise ValueError(f"Prompt {i}: {len(t)} targets for {len(pos)} positions.")
        out.append([[int(x)] if isinstance(x, int) else [int(y) for y in x] for x in t])
    return out


@torch.no_grad()
def lens_stats(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    positions: Positions = "last",
    layers: Sequence[int] | None = None,
    lens: LensLike = "normed",
    top_k: int = 5,
    targets: Sequence[int] | Sequence[Sequence[int]] | None = None,
    kl: bool = False,
    return_probs: bool = False,
    batch_size: int = 8,
    chunk_bytes: int = CHUNK_BYTES,
    dedupe_prefix: bool = True,
    progress: bool = False,
) -> LensResult:
    """Per-layer lens statistics of ``prompts`` at ``positions``.

    positions: ``"last"``, ``"all"``, a list of token indices for every prompt (negative counts
    from the end), or one such list per prompt. targets: token ids whose probability and rank to
    report at every position, or one list per prompt with one id per position (e.g. the answer
    tokens, see :func:`answer_span`). ``return_probs`` keeps the full distributions — only for the
    positions asked. A token prefix shared by a whole batch runs through the model once and its
    positions' statistics are computed once (``dedupe_prefix``): they are the same in every row.
    """
    lens = resolve_lens(model, lens)
    entries = check_layers(model, layers)
    check_int(top_k, "top_k", minimum=1, maximum=lens.vocab_size)
    check_int(batch_size, "batch_size", minimum=1)
    token_lists = encode_prompts(tokenizer, prompts, model)
    lengths = [len(t) for t in token_lists]
    per_pos = _resolve_positions(positions, lengths)
    per_tgt = _resolve_targets(targets, per_pos)
    unembed = get_unembed(model)
    dev = unembed.device  # a sharded model: the head's device, where every statistic is computed
    B, E, P = len(prompts), len(entries), max(len(p) for p in per_pos)
    n_t = max(len(x) for t in per_tgt for x in t) if per_tgt else 0

    pos_t = torch.full((B, P), -1, dtype=torch.long)
    for i, pos in enumerate(per_pos):
        pos_t[i, : len(pos)] = torch.tensor(pos)
    valid = pos_t >= 0
    res = LensResult(
        layers=entries, lens=lens.name, tokens=token_lists, positions=pos_t, valid=valid,
        entropy=torch.full((B, E, P), float("nan")),
        top_ids=torch.full((B, E, P, top_k), -1, dtype=torch.long),
        top_probs=torch.full((B, E, P, top_k), float("nan")),
        target_probs=torch.full((B, E, P, n_t), float("nan")) if per_tgt else None,
        target_ranks=torch.full((B, E, P, n_t), -1, dtype=torch.long) if per_tgt else None,
        kl_to_final=torch.full((B, E, P), float("nan")) if kl else None,
        probs=torch.full((B, E, P, unembed.vocab_size), float("nan")) if return_probs else None,
    )
    L = unembed.n_layers
    for start, group in tqdm(list(chunks(token_lists, batch_size)), desc="lens", disable=not progress):
        # Prompts of a batch that share a token prefix (a few-shot primer) run it once, and the
        # statistics of a position inside that prefix are computed once and copied to every row.
        state = prefill(model, group, pad_id(tokenizer), share_prefix=dedupe_prefix, output_hidden_states=True,
                        keep_suffix=True, suffix_logits=False)
        shared = state.suffix_start
        rows, owners, source, first_row = [], [], [], {}
        for j in range(len(group)):
            i = start + j
            for k, p in enumerate(per_pos[i]):
                key = (p, tuple(per_tgt[i][k]) if per_tgt else ()) if p < shared else None
                if key is not None and key in first_row:
                    source.append(first_row[key])
                    continue
                if key is not None:
                    first_row[key] = len(rows)
                source.append(len(rows))
                rows.append((j, p))
                owners.append((i, k))
        # [E, N, d] on the head's device: each entry's rows moved once (a sharded model's layers sit elsewhere)
        hidden = torch.stack([torch.stack([state.hidden_at(e, j, p) for j, p in rows]).to(dev) for e in entries])
        final = torch.stack([state.hidden_at(L, j, p) for j, p in rows]).to(dev) if kl else None
        tgt = None
        if per_tgt:
            tgt = torch.tensor(
                [per_tgt[i][k] + [per_tgt[i][k][-1]] * (n_t - len(per_tgt[i][k])) for i, k in owners], device=dev
            )
        del state
        st = layer_stats(lens, hidden, entries, top_k=top_k, targets=tgt, final=final,
                         keep_probs=return_probs, chunk_bytes=chunk_bytes)
        src = torch.tensor(source)
        slots = [(start + j, k) for j in range(len(group)) for k in range(len(per_pos[start + j]))]
        bi = torch.tensor([i for i, _ in slots])
        ki = torch.tensor([k for _, k in slots])
        res.entropy[bi, :, ki] = st.entropy.T.cpu()[src]
        res.top_ids[bi, :, ki] = st.top_ids.transpose(0, 1).cpu()[src]
        res.top_probs[bi, :, ki] = st.top_probs.transpose(0, 1).cpu()[src]
        if per_tgt:
            res.target_probs[bi, :, ki] = st.target_probs.transpose(0, 1).cpu()[src]
            res.target_ranks[bi, :, ki] = st.target_ranks.transpose(0, 1).cpu()[src]
        if kl:
            res.kl_to_final[bi, :, ki] = st.kl_to_final.T.cpu()[src]
        if return_probs:
            res.probs[bi, :, ki] = st.probs.transpose(0, 1).cpu()[src]
    return res


def answer_span(tokenizer, prompt: str, answer: str) -> tuple[str, list[int], list[int]]:
    """The text ``prompt + answer``, the positions that predict each answer token, and those tokens.

    Prompt and answer are tokenised together (as scoring protocols do); the answer's tokens are
    those after the prompt's own token count. Pass the results to :func:`lens_stats` as
    ``positions`` and ``targets`` (one list per prompt).
    """
    if not answer:
        raise ValueError("Empty answer: give the answer text whose tokens to read.")
    full = prompt + answer
    n_prompt = len(tokenizer(prompt)["input_ids"])
    ids = tokenizer(full)["input_ids"]
    if len(ids) <= n_prompt:
        raise ValueError(f"Answer {answer!r} adds no tokens after the prompt.")
    return full, list(range(n_prompt - 1, len(ids) - 1)), list(ids[n_prompt:])
