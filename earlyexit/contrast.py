"""The DoLa contrast (Chuang et al. 2023) on logits: layer buckets, premature-layer choice,
adaptive plausibility, and the contrast scores. Decoding loops live in :mod:`earlyexit.dola`.

>>> import torch
>>> final = torch.tensor([[2.0, 1.0, -3.0]])
>>> premature = torch.tensor([[1.0, 1.0, 1.0]])
>>> contrast_scores(final, premature, relative_top=0.1)[0, 2].item()
-inf
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PREMATURE_FLOOR = -1e3  # premature log-probs of filtered tokens (they end at -inf anyway)
EXP_FLOOR = -87.0  # log of about the smallest normal float32 (1.6e-38)


def dola_buckets(n_layers: int, tied_embeddings: bool) -> dict[str, list[int]]:
    """Candidate hidden-state entries of the "high" and "low" buckets (transformers ≤ 4.55 rule).

    For L ≤ 40: high = range(L/2, L, 2), low = range(s, L/2, 2); for L > 40: high = range(L−20, L, 2),
    low = range(s, 20, 2); s = 2 when input and output embeddings are tied (entry 0 would only
    predict the input token), else 0.

    >>> dola_buckets(30, True)["high"]
    [15, 17, 19, 21, 23, 25, 27, 29]
    >>> dola_buckets(30, True)["low"]
    [2, 4, 6, 8, 10, 12, 14]
    """
    start = 2 if tied_embeddings else 0
    if n_layers <= 40:
        return {"high": list(range(n_layers // 2, n_layers, 2)), "low": list(range(start, n_layers // 2, 2))}
    return {"high": list(range(n_layers - 20, n_layers, 2)), "low": list(range(start, 20, 2))}


def candidate_layers(n_layers: int, tied_embeddings: bool, dola_layers: str | Sequence[int]) -> list[int]:
    """Resolve ``"high"``, ``"low"`` or an explicit list of entries; validate against 0..L-1."""
    if isinstance(dola_layers, str):
        buckets = dola_buckets(n_layers, tied_embeddings)
        if dola_layers not in buckets:
            raise ValueError(f"Unknown DoLa bucket {dola_layers!r}: use 'high', 'low' or a list of layer entries.")
        layers = buckets[dola_layers]
    else:
        layers = [int(x) for x in dola_layers]
    if not layers:
        raise ValueError("The DoLa candidate bucket is empty: give at least one premature layer entry.")
    for x in layers:
        if x == n_layers:
            raise ValueError(f"Premature layer {x} is the mature (final) layer: pick entries in 0..{n_layers - 1}.")
        if not 0 <= x < n_layers:
            raise IndexError(f"Premature layer {x} out of range: entries are 0..{n_layers - 1} for {n_layers} layers.")
    return layers


def check_relative_top(relative_top: float) -> None:
    if not 0 < relative_top <= 1:
        raise ValueError(f"relative_top must be in (0, 1], got {relative_top}")


def js_distance(final_logits: Tensor, premature_logits: Tensor) -> Tensor:
    """Per-sequence distance of each candidate from the final layer, as the published code computes it.

    final_logits ``[B, V]``, premature_logits ``[C, B, V]`` → ``[C, B]``:
    0.5·(KL(M‖p_final) + KL(M‖p_j)) with M = (p_final + p_j)/2, each KL averaged over the vocabulary
    (``F.kl_div(log p, M)`` is KL(M‖p)).
    """
    if premature_logits.dim() != 3 or premature_logits.shape[1:] != final_logits.shape:
        raise ValueError(f"premature_logits must be [C, B, V] with [B, V] = {tuple(final_logits.shape)}, "
                         f"got {tuple(premature_logits.shape)}")
    lp_f = F.log_softmax(final_logits.float(), dim=-1)
    lp_j = F.log_softmax(premature_logits.float(), dim=-1)
    return js_distance_logprobs(lp_f, lp_j)


def js_distance_logprobs(lp_final: Tensor, lp_premature: Tensor) -> Tensor:
    """:func:`js_distance` from log-probabilities ``[B, V]`` and ``[C, B, V]`` → ``[C, B]``.

    KL(M‖p) = Σ m·(log m − log p), so the sum of both is m·(2·log m − log p_f − log p_j); written out
    rather than through ``F.kl_div`` (whose ``xlogy`` kernel is ~10× slower on CPU). Log-probabilities
    are floored at :data:`EXP_FLOOR` before ``exp``: float32 cannot hold much smaller probabilities
    anyway, the floor keeps ``log m`` finite, and ``exp`` of the raw lens's hundreds-of-nats-negative
    values otherwise takes a slow path (15× slower on CPU). Each floored token adds < 1e-35 to the sum.
    """
    C, B, V = lp_premature.shape
    m = lp_premature.clamp(min=EXP_FLOOR).exp_().add_(lp_final.clamp(min=EXP_FLOOR).exp_()[None]).mul_(0.5)
    t = m.log().mul_(2).sub_(lp_premature).sub_(lp_final[None])
    # Σ_v m·t as a batched dot product: one pass, no temporary
    total = torch.bmm(m.view(C * B, 1, V), t.view(C * B, V, 1)).view(C, B)
    return total.mul_(0.5 / V)


def select_premature(final_logits: Tensor, premature_logits: Tensor) -> Tensor:
    """Index (into the candidate axis) of the most distant candidate, chosen per sequence: ``[B]``."""
    return js_distance(final_logits, premature_logits).argmax(0)


def plausibility_mask(final_logprobs: Tensor, relative_top: float = 0.1) -> Tensor:
    """``[B, V]`` bool: tokens with log p ≥ max log p + log(relative_top); at least the top one."""
    check_relative_top(relative_top)
    top = final_logprobs.max(-1, keepdim=True).values
    return final_logprobs >= top + math.log(relative_top)


def contrast_scores(final_logits: Tensor, premature_logits: Tensor, *, relative_top: float = 0.1,
                    plausibility: bool = True) -> Tensor:
    """DoLa scores ``[B, V]``: log p_final − log p_premature over the plausible tokens, −inf elsewhere.

    With ``plausibility=False`` (multiple-choice scoring) every token keeps its difference.
    """
    if final_logits.shape != premature_logits.shape:
        raise ValueError(f"shapes differ: {tuple(final_logits.shape)} vs {tuple(premature_logits.shape)}")
    lp_f = F.log_softmax(final_logits.float(), dim=-1)
    lp_p = F.log_softmax(premature_logits.float(), dim=-1)
    if not plausibility:
        return lp_f - lp_p
    keep = plausibility_mask(lp_f, relative_top)
    lp_p = lp_p.masked_fill(~keep, PREMATURE_FLOOR)
    return (lp_f - lp_p).masked_fill(~keep, float("-inf"))


def repetition_penalty(scores: Tensor, seen_ids: Tensor, penalty: float) -> Tensor:
    """transformers' ``RepetitionPenaltyLogitsProcessor`` on ``scores`` ``[B, V]``: every id in
    ``seen_ids`` ``[B, T]`` (prompt and output so far) has its score divided by ``penalty`` if positive,
    multiplied if negative."""
    if penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
    if penalty == 1.0:
        return scores
    picked = scores.gather(1, seen_ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, seen_ids, picked)
