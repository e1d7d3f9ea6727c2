"""The DoLa contrast (Chuang et al. 2023), once: layer buckets, premature-layer choice, adaptive
plausibility and the contrast scores. Decoding (:mod:`earlyexit.methods.dola`) and MC scoring
(:mod:`earlyexit.studies.mc`) both call :func:`choose_premature` and :func:`contrast`.

>>> import torch
>>> final = torch.tensor([[2.0, 1.0, -3.0]])
>>> premature = torch.tensor([[[1.0, 1.0, 1.0]]])          # [C=1, B=1, V=3]
>>> scores, chosen = dola_scores(final, premature, relative_top=0.1)
>>> scores[0, 2].item(), chosen.tolist()
(-inf, [0])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from earlyexit.core.errors import BadInput
from earlyexit.core.lenses import check_entries

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
            raise BadInput(f"Unknown DoLa bucket {dola_layers!r}: use 'high', 'low' or a list of layer entries.")
        if not buckets[dola_layers]:
            raise BadInput(f"The DoLa bucket {dola_layers!r} is empty for {n_layers} layers: give the premature "
                             "layer entries explicitly.")
        return buckets[dola_layers]
    return check_entries(n_layers, dola_layers, final=False, what="Premature layer")


def check_relative_top(relative_top: float) -> None:
    if isinstance(relative_top, bool) or not isinstance(relative_top, (int, float)) or not 0 < relative_top <= 1:
        raise BadInput(f"relative_top must be a number in (0, 1], got {relative_top!r}")


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


def choose_premature(distance: Tensor) -> Tensor:
    """Index (into the candidate axis) of the most distant candidate: ``[C, ...]`` → ``[...]``, chosen per
    sequence / per token, never shared across a batch."""
    return distance.argmax(0)


def plausibility_mask(final_logprobs: Tensor, relative_top: float = 0.1) -> Tensor:
    """``[B, V]`` bool: tokens with log p ≥ max log p + log(relative_top); at least the top one."""
    check_relative_top(relative_top)
    top = final_logprobs.max(-1, keepdim=True).values
    return final_logprobs >= top + math.log(relative_top)


def contrast(final_logprobs: Tensor, premature_logprobs: Tensor, keep: Tensor | None = None) -> Tensor:
    """log p_final − log p_premature; with a plausibility mask ``keep``, −inf outside it (the published
    code floors the premature log-probs there at :data:`PREMATURE_FLOOR` first, which ends −inf anyway)."""
    diff = final_logprobs - premature_logprobs
    return diff if keep is None else diff.masked_fill_(~keep, float("-inf"))


def dola_scores(final_logits: Tensor, premature_logits: Tensor, *, relative_top: float = 0.1) -> tuple[Tensor, Tensor]:
    """One DoLa step: final logits ``[B, V]`` and candidates' ``[C, B, V]`` → contrast scores ``[B, V]``
    (plausible tokens only) and the chosen candidate of each sequence ``[B]`` (index into C)."""
    if premature_logits.dim() != 3 or premature_logits.shape[1:] != final_logits.shape:
        raise ValueError(f"premature_logits must be [C, B, V] with [B, V] = {tuple(final_logits.shape)}, "
                         f"got {tuple(premature_logits.shape)}")
    B = final_logits.shape[0]
    lp_f = torch.log_softmax(final_logits.float(), dim=-1)
    lp_p = torch.log_softmax(premature_logits.float(), dim=-1)
    if premature_logits.shape[0] == 1:
        idx = torch.zeros(B, dtype=torch.long, device=final_logits.device)
        lp_c = lp_p[0]
    else:
        idx = choose_premature(js_distance_logprobs(lp_f, lp_p))
        lp_c = lp_p[idx, torch.arange(B, device=final_logits.device)]
    return contrast(lp_f, lp_c, plausibility_mask(lp_f, relative_top)), idx
