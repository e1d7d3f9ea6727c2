"""Per-layer probabilities of multiple-choice answers (the original study's ``vis`` protocol).

>>> from earlyexit import load_model, load_general_knowledge               # doctest: +SKIP
>>> model, tok = load_model(); qs = load_general_knowledge()               # doctest: +SKIP
>>> probs = choice_probabilities(model, tok, qs)                           # doctest: +SKIP
>>> probs[0].probs.shape      # [layers L+1, choices]                      # doctest: +SKIP
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from earlyexit.studies.data import ChoiceQuestion
from earlyexit.core.generation import generate_with_lens
from earlyexit.core.lens import lens_stats, n_layers
from earlyexit.studies.prompts import vis_prompt

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
NUMBER_WORDS["none"] = "0"


def normalise_answer(text: str) -> str:
    """Lower case, first line only, no punctuation or articles, number words as digits."""
    first = text.strip().split("\n")[0].lower()
    words = re.findall(r"[a-z0-9]+", first)
    words = [NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the")]
    return " ".join(words)


def is_correct(answer: str, gold: Sequence[str]) -> bool:
    """Normalised exact match against any gold choice ("4" matches "four"; "none" matches "0")."""
    norm = normalise_answer(answer)
    return any(norm == normalise_answer(g) for g in gold)


def first_choice_tokens(tokenizer, choices: Sequence[str]) -> list[int]:
    """The first sub-token of each choice as it follows ``"Answer:"`` (with its leading space)."""
    out = []
    for c in choices:
        ids = tokenizer(" " + c, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"Choice {c!r} tokenises to nothing.")
        out.append(int(ids[0]))
    return out


@dataclass
class ChoiceReading:
    """One question: probs ``[E, n_choices]`` of each choice's first sub-token at the last prompt
    position, per layer entry in ``layers``; the greedy answer and whether it is correct."""

    question: ChoiceQuestion
    prompt: str
    layers: list[int]
    probs: Tensor
    choice_tokens: list[int]
    answer: str | None = None
    correct: bool | None = None

    @property
    def gold_index(self) -> int:
        return self.question.choices.index(self.question.gold[0])

    @property
    def shared_first_token(self) -> bool:
        """Two choices start with the same sub-token (their bars are then identical)."""
        return len(set(self.choice_tokens)) < len(self.choice_tokens)

    def first_layer_gold_on_top(self) -> int | None:
        """First layer entry from which a gold choice stays the most probable choice up to layer L.

        ``None`` when a gold choice is not the top choice at layer L. (Reading "first layer at which
        it is on top" without the "stays" would count noise: at early layers every choice has a
        probability near 0 and the argmax among them is arbitrary.)
        """
        gold = {self.question.choices.index(g) for g in self.question.gold}
        on_top = [t in gold for t in self.probs.argmax(-1).tolist()]
        if not on_top[-1]:
            return None
        k = len(on_top) - 1
        while k > 0 and on_top[k - 1]:
            k -= 1
        return self.layers[k]


def choice_probabilities(model, tokenizer, questions: Sequence[ChoiceQuestion], *,
                         pool: Sequence[ChoiceQuestion] | None = None, layers: Sequence[int] | None = None,
                         lens: str = "normed", batch_size: int = 8, progress: bool = False) -> list[ChoiceReading]:
    """Per-layer probability of each choice's first sub-token at the last prompt position."""
    pool = pool if pool is not None else questions
    prompts = [vis_prompt(q, pool) for q in questions]
    tokens = [first_choice_tokens(tokenizer, q.choices) for q in questions]
    r = lens_stats(model, tokenizer, prompts, positions="last", layers=layers, lens=lens,
                   targets=[[t] for t in tokens], top_k=1, batch_size=batch_size, progress=progress)
    return [
        ChoiceReading(q, p, r.layers, r.target_probs[i, :, 0, : len(t)].clone(), t)
        for i, (q, p, t) in enumerate(zip(questions, prompts, tokens))
    ]


def answer_questions(model, tokenizer, readings: Sequence[ChoiceReading], *, max_new_tokens: int = 8,
                     batch_size: int = 8, progress: bool = False) -> list[ChoiceReading]:
    """Greedy answers (stop at a newline), filled into ``readings`` with normalised correctness."""
    L = n_layers(model)
    gens = generate_with_lens(model, tokenizer, [r.prompt for r in readings], max_new_tokens=max_new_tokens,
                              stop=("\n",), layers=[L], top_k=1, batch_size=batch_size, progress=progress)
    for r, g in zip(readings, gens):
        r.answer = g.text.strip()
        r.correct = is_correct(r.answer, r.question.gold)
    return readings
