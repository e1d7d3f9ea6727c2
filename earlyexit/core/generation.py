"""Batched greedy generation that records lens statistics for every generated token.

For generated token t, the statistics describe the distributions at the position that predicted t
(the last position of the step that chose it), for every requested layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from earlyexit.core.batching import StopTracker, chunks, encode_prompts, pad_id
from earlyexit.core.checks import check_int
from earlyexit.core.decoding import LensObserver, decode, make_scorer
from earlyexit.core.lens import check_layers
from earlyexit.core.lenses import LensLike, resolve_lens

if TYPE_CHECKING:
    from earlyexit.core.lenses import Model, Tokenizer

from earlyexit.core.stats import Workspace


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


@torch.no_grad()
def generate_with_lens(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    layers: Sequence[int] | None = None,
    lens: LensLike = "normed",
    top_k: int = 5,
    batch_size: int = 8,
    share_prefix: bool = True,
    progress: bool = False,
) -> list[LensGeneration]:
    """Greedy completions of ``prompts`` with per-token, per-layer lens statistics.

    Each sequence stops on its own (a stop string, or EOS) and leaves the batch, while the others go
    on; the KV cache is reused between steps and only the last position is read. The lens statistics
    of generated tokens are computed a group of tokens at a time (up to one chunk of
    :data:`earlyexit.core.stats.STEP_CHUNK_BYTES`), so no more than that chunk of logits exists at once and
    only the ``[layers, k]`` statistics are kept per token. A prefix shared by the prompts of a batch
    (a few-shot primer) is computed once (``share_prefix``).
    """
    check_int(max_new_tokens, "max_new_tokens", minimum=1)
    check_int(batch_size, "batch_size", minimum=1)
    token_lists = encode_prompts(tokenizer, prompts, model, reserve=max_new_tokens)
    lens = resolve_lens(model, lens)
    entries = check_layers(model, layers)
    check_int(top_k, "top_k", minimum=1, maximum=lens.vocab_size)
    workspace = Workspace()  # freed when this call returns
    greedy = make_scorer(model, "vanilla")
    results: list[LensGeneration] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)
    for start, group in chunks(token_lists, batch_size):
        B = len(group)
        tracker = StopTracker(tokenizer, B, stop, eos_ids(tokenizer, model))
        observer = LensObserver(model, entries, lens, top_k, B, max_new_tokens, workspace)
        decode(model, group, greedy, max_new_tokens=max_new_tokens, pad_id=pad_id(tokenizer), observers=[observer],
               stop=tracker, share_prefix=share_prefix)
        for j in range(B):
            text, toks = tracker.result(j)
            results.append(LensGeneration(prompt=prompts[start + j], text=text, token_ids=toks, layers=entries,
                                          **observer.row(j, len(toks))))
        bar.update(B)
    bar.close()
    return results
