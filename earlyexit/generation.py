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
from earlyexit.stats import STEP_CHUNK_BYTES, Workspace, chunk_rows, layer_stats
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


_FIELDS = ("entropy", "top_ids", "top_probs", "token_probs", "token_ranks", "kl_to_final")


class _LensQueue:
    """Last-position states of generated tokens waiting for their lens statistics.

    The statistics of a token do not influence decoding, so they are computed for many tokens at once
    (from several steps and rows): the head's product then runs on enough rows to be efficient, where
    a step with one or two unfinished sequences would give it 31–62. Results go into per-batch tensors
    ``[E, B, T]`` (``[E, B, T, k]`` for top-k), NaN / -1 where no token was generated.
    """

    def __init__(self, unembed, entries: list[int], lens: str, top_k: int, B: int, T: int, flush_rows: int,
                 workspace: Workspace):
        self.unembed, self.entries, self.lens, self.top_k = unembed, entries, lens, top_k
        self.flush_rows, self.workspace = flush_rows, workspace
        E = len(entries)
        self.out = {
            "entropy": torch.full((E, B, T), float("nan")),
            "top_ids": torch.full((E, B, T, top_k), -1, dtype=torch.long),
            "top_probs": torch.full((E, B, T, top_k), float("nan")),
            "token_probs": torch.full((E, B, T), float("nan")),
            "token_ranks": torch.full((E, B, T), -1, dtype=torch.long),
            "kl_to_final": torch.full((E, B, T), float("nan")),
        }
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor, int]] = []
        self._n = 0

    def add(self, hidden: Tensor, tokens: Tensor, final_logits: Tensor, rows: list[int], step: int) -> None:
        """hidden ``[E, b, d]``, tokens ``[b]`` (the generated ones), final_logits ``[b, V]`` of batch ``rows``."""
        self._pending.append((hidden, tokens, final_logits, torch.as_tensor(rows), step))
        self._n += len(rows)
        if self._n >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        hidden = torch.cat([p[0] for p in self._pending], dim=1)
        tokens = torch.cat([p[1] for p in self._pending])
        final_logits = torch.cat([p[2] for p in self._pending])
        rows = torch.cat([p[3] for p in self._pending])
        steps = torch.cat([torch.full((len(p[3]),), p[4]) for p in self._pending])
        self._pending, self._n = [], 0
        st = layer_stats(self.unembed, hidden, self.entries, lens=self.lens, top_k=self.top_k,
                         targets=tokens.unsqueeze(1), final_logits=final_logits, chunk_bytes=STEP_CHUNK_BYTES,
                         workspace=self.workspace)
        got = {"entropy": st.entropy, "top_ids": st.top_ids, "top_probs": st.top_probs,
               "token_probs": st.target_probs[..., 0], "token_ranks": st.target_ranks[..., 0],
               "kl_to_final": st.kl_to_final}
        for name, t in got.items():
            self.out[name][:, rows, steps] = t.cpu()


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

    Each sequence stops on its own (a stop string, or EOS) and leaves the batch, while the others go
    on; the KV cache is reused between steps and only the last position is read. The lens statistics
    of generated tokens are computed a group of tokens at a time (up to one chunk of
    :data:`earlyexit.stats.STEP_CHUNK_BYTES`), so no more than that chunk of logits exists at once and
    only the ``[layers, k]`` statistics are kept per token. A prefix shared by the prompts of a batch
    (a few-shot primer) is computed once (``share_prefix``).
    """
    check_lens(lens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    entries = check_layers(model, layers)
    token_lists = encode_prompts(tokenizer, prompts, model, reserve=max_new_tokens)
    unembed = get_unembed(model)
    flush_rows = chunk_rows(unembed.vocab_size, len(entries), STEP_CHUNK_BYTES)
    workspace = Workspace()  # freed when this call returns
    results: list[LensGeneration] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
    for start, group in chunks(token_lists, batch_size):
        B = len(group)
        tracker = StopTracker(tokenizer, B, stop, eos_ids(tokenizer, model))
        state = prefill(model, group, pad_id(tokenizer), share_prefix=share_prefix, output_hidden_states=True,
                        reserve=max_new_tokens)
        queue = _LensQueue(unembed, entries, lens, top_k, B, max_new_tokens, flush_rows, workspace)
        rows = list(range(B))  # the batch rows still decoding; finished ones are dropped from the state
        # inference mode, not just no_grad: a few % less per-op overhead; what the loop makes stays in it
        with torch.inference_mode():
            for step in range(max_new_tokens):
                next_tok = state.logits.argmax(-1)  # [b]
                queue.add(torch.stack([state.hidden_last[e] for e in entries]), next_tok, state.logits, rows, step)
                full_tok = torch.full((B,), -1, dtype=torch.long)
                full_tok[rows] = next_tok.cpu()
                tracker.update(full_tok.tolist())  # finished rows are skipped by the tracker
                if tracker.all_done:
                    break
                keep = [k for k, j in enumerate(rows) if not tracker.done[j]]
                if len(keep) < len(rows):
                    state.keep_rows(keep)
                    rows = [rows[k] for k in keep]
                    next_tok = next_tok[keep]
                out = model(**state.step_inputs(next_tok), output_hidden_states=True)
                state.cache = out.past_key_values
                state.logits = out.logits[:, -1].float()
                state.hidden_last = tuple(h[:, -1] for h in out.hidden_states)
            queue.flush()
        for j in range(B):
            text, toks = tracker.result(j)
            n = len(toks)
            results.append(LensGeneration(prompt=prompts[start + j], text=text, token_ids=toks, layers=entries,
                                          **{k: queue.out[k][:, j, :n].clone() for k in _FIELDS}))
        bar.update(B)
    bar.close()
    return results
