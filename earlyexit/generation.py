"""Batched greedy generation that records lens statistics for every generated token.

For generated token t, the statistics describe the distributions at the position that predicted t
(the last position of the step that chose it), for every requested layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from earlyexit.batching import StopTracker, chunks, encode_prompts, pad_id
from earlyexit.prefix import prefill
from earlyexit.lens import check_layers, get_unembed
from earlyexit.stats import layer_stats
from earlyexit.unembed import check_lens


@dataclass
class LensGeneration:
    """One prompt's greedy completion and per-token lens statistics.

    text: completion with the stop string stripped; token_ids: its ``n`` tokens;
    entropy ``[E, n]``; top_ids / top_probs ``[E, n, k]``; token_probs / token_ranks ``[E, n]`` =
    probability and rank (0 = top) of the generated token under each layer's lens; kl_to_final
    ``[E, n]`` = KL(p_final ‖ p_layer); layers: the hidden-state entries (E).
    """

    prompt: str
    text: str
    token_ids: list[int]
    layers: list[int]
    entropy: Tensor
    top_ids: Tensor
    top_probs: Tensor
    token_probs: Tensor
    token_ranks: Tensor
    kl_to_final: Tensor


def eos_ids(tokenizer, model=None) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None) if model is not None else None
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return sorted(ids)


def _live_rows(st, live: list[int], B: int):
    """Spread statistics of the ``live`` rows back to all ``B`` rows (finished rows: NaN / -1)."""
    if len(live) == B:
        return st
    for name in ("entropy", "top_ids", "top_probs", "target_probs", "target_ranks", "kl_to_final"):
        t = getattr(st, name)
        if t is None:
            continue
        full = t.new_full((t.shape[0], B, *t.shape[2:]), -1 if not t.is_floating_point() else float("nan"))
        full[:, live] = t
        setattr(st, name, full)
    return st


@torch.no_grad()
def generate_with_lens(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    layers: Sequence[int] | None = None,
    lens: str = "normed",
    top_k: int = 5,
    batch_size: int = 8,
    share_prefix: bool = True,
    progress: bool = False,
) -> list[LensGeneration]:
    """Greedy completions of ``prompts`` with per-token, per-layer lens statistics.

    Each sequence stops on its own (a stop string, or EOS) while the others go on; the KV cache is
    reused between steps and only the last position is read, so memory stays at
    ``batch × layers × k`` per step. A prefix shared by the prompts of a batch (a few-shot primer)
    is computed once (``share_prefix``).
    """
    check_lens(lens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    entries = check_layers(model, layers)
    token_lists = encode_prompts(tokenizer, prompts, model, reserve=max_new_tokens)
    unembed = get_unembed(model)
    results: list[LensGeneration] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
    for start, group in chunks(token_lists, batch_size):
        B = len(group)
        tracker = StopTracker(tokenizer, B, stop, eos_ids(tokenizer, model))
        rec = {k: [] for k in ("entropy", "top_ids", "top_probs", "token_probs", "token_ranks", "kl_to_final")}
        state = prefill(model, group, pad_id(tokenizer), share_prefix=share_prefix, output_hidden_states=True,
                        reserve=max_new_tokens)
        logits, hidden_last = state.logits, state.hidden_last
        for _ in range(max_new_tokens):
            hidden = torch.stack([hidden_last[e] for e in entries])  # [E, B, d]
            next_tok = logits.argmax(-1)  # [B]
            # rows that already stopped are never read again: compute their lens statistics no more
            live = [i for i, d in enumerate(tracker.done) if not d]
            st = _live_rows(layer_stats(unembed, hidden[:, live], entries, lens=lens, top_k=top_k,
                                        targets=next_tok[live].unsqueeze(1), final=hidden_last[unembed.n_layers][live]),
                            live, B)
            rec["entropy"].append(st.entropy.cpu())
            rec["top_ids"].append(st.top_ids.cpu())
            rec["top_probs"].append(st.top_probs.cpu())
            rec["token_probs"].append(st.target_probs[..., 0].cpu())
            rec["token_ranks"].append(st.target_ranks[..., 0].cpu())
            rec["kl_to_final"].append(st.kl_to_final.cpu())
            tracker.update(next_tok.tolist())
            if tracker.all_done:
                break
            out = model(**state.step_inputs(next_tok), output_hidden_states=True)
            state.cache = out.past_key_values
            logits = out.logits[:, -1].float()
            hidden_last = tuple(h[:, -1] for h in out.hidden_states)
        stacked = {k: torch.stack(v, dim=-2 if k in ("top_ids", "top_probs") else -1) for k, v in rec.items()}
        for j in range(B):
            text, toks = tracker.result(j)
            n = len(toks)
            results.append(LensGeneration(
                prompt=prompts[start + j], text=text, token_ids=toks, layers=entries,
                entropy=stacked["entropy"][:, j, :n].clone(),
                top_ids=stacked["top_ids"][:, j, :n].clone(),
                top_probs=stacked["top_probs"][:, j, :n].clone(),
                token_probs=stacked["token_probs"][:, j, :n].clone(),
                token_ranks=stacked["token_ranks"][:, j, :n].clone(),
                kl_to_final=stacked["kl_to_final"][:, j, :n].clone(),
            ))
        bar.update(B)
    bar.close()
    return results
