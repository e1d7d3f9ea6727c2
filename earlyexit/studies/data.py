"""Loaders for TruthfulQA, the true-false statements and BIG-bench ``general_knowledge``.

The directory is the ``data_dir`` argument, else ``$EARLYEXIT_DATA_DIR``, else ``data/``.

>>> items = load_truthfulqa("../shared/data")          # doctest: +SKIP
>>> len(items)                                          # doctest: +SKIP
817
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

TRUE_FALSE_TOPICS = ("animals", "cities", "companies", "elements", "facts", "inventions", "generated")

SOURCES = {
    "truthfulqa/TruthfulQA.csv": "github.com/sylinrl/TruthfulQA (TruthfulQA.csv), or the Hugging Face Hub "
    "dataset truthfulqa/truthful_qa (config 'generation'), read automatically when the Hub is reachable",
    "true-false": "the true-false-dataset.zip released with Azaria & Mitchell (2023), 'The Internal State of "
    "an LLM Knows When It's Lying'",
    "bigbench/general_knowledge.json": "github.com/google/BIG-bench, "
    "bigbench/benchmark_tasks/general_knowledge/task.json",
}


class DataNotFoundError(FileNotFoundError):
    pass


def data_dir(path: str | os.PathLike | None = None) -> Path:
    if path is not None:
        return Path(path)
    env = os.environ.get("EARLYEXIT_DATA_DIR")
    return Path(env) if env else Path("data")


def _missing(rel: str, directory: Path, source_key: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"Missing data file {rel!r}: looked in {directory.resolve()} (set EARLYEXIT_DATA_DIR or pass "
        f"data_dir). Get it from {SOURCES[source_key]} and place it at {directory / rel}."
    )


def _check_limit(limit: int | None, n: int, what: str) -> int:
    if limit is None:
        return n
    if not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    if limit > n:
        raise ValueError(f"limit {limit} is larger than the {n} {what} available")
    return limit


# --- TruthfulQA ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class TruthfulQAItem:
    index: int
    question: str
    best_answer: str
    correct_answers: list[str]
    incorrect_answers: list[str]
    category: str = ""
    type: str = ""

    def references(self) -> tuple[list[str], list[str]]:
        """The true references (the Best Answer first, then the Correct Answers) and the false ones (the
        Incorrect Answers), stripped, empty and repeated ones dropped: the one rule behind every
        "closer to a true than to a false reference" in the project.

        >>> TruthfulQAItem(0, "Q?", "Yes", ["Yes", "Sure "], ["No", ""]).references()
        (['Yes', 'Sure'], ['No'])
        """
        true = list(dict.fromkeys(a.strip() for a in [self.best_answer, *self.correct_answers] if a.strip()))
        false = list(dict.fromkeys(a.strip() for a in self.incorrect_answers if a.strip()))
        return true, false


def _split_answers(text: str) -> list[str]:
    return [a.strip() for a in text.split(";") if a.strip()]


def load_truthfulqa(data_dir_: str | os.PathLike | None = None, limit: int | None = None) -> list[TruthfulQAItem]:
    """The 817 TruthfulQA questions from ``truthfulqa/TruthfulQA.csv`` (else the Hub's copy)."""
    directory = data_dir(data_dir_)
    path = directory / "truthfulqa" / "TruthfulQA.csv"
    if path.exists():
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        items = [
            TruthfulQAItem(i, r["Question"], r["Best Answer"], _split_answers(r["Correct Answers"]),
                           _split_answers(r["Incorrect Answers"]), r.get("Category", ""), r.get("Type", ""))
            for i, r in enumerate(rows)
        ]
    else:
        items = _truthfulqa_from_hub()
        if items is None:
            raise _missing("truthfulqa/TruthfulQA.csv", directory, "truthfulqa/TruthfulQA.csv")
    return items[: _check_limit(limit, len(items), "TruthfulQA questions")]


def _truthfulqa_from_hub() -> list[TruthfulQAItem] | None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from datasets import load_dataset

        ds = load_dataset("truthfulqa/truthful_qa", "generation", split="validation")
    except Exception:
        return None
    return [
        TruthfulQAItem(i, r["question"], r["best_answer"], list(r["correct_answers"]),
                       list(r["incorrect_answers"]), r.get("category", ""), r.get("type", ""))
        for i, r in enumerate(ds)
    ]


# --- true-false statements ----------------------------------------------------------------------

@dataclass(frozen=True)
class Statement:
    topic: str
    statement: str
    label: int  # 1 = true


def load_true_false(topics=TRUE_FALSE_TOPICS[:6], data_dir_: str | os.PathLike | None = None,
                    limit_per_topic: int | None = None) -> list[Statement]:
    """Statements of the given topics, in topic order (``label`` 1 = true)."""
    directory = data_dir(data_dir_)
    if isinstance(topics, str):
        topics = [topics]
    out: list[Statement] = []
    for topic in topics:
        if topic not in TRUE_FALSE_TOPICS:
            raise ValueError(f"Unknown topic {topic!r}; topics are {TRUE_FALSE_TOPICS}")
        rel = f"true-false/{topic}_true_false.csv"
        path = directory / rel
        if not path.exists():
            raise _missing(rel, directory, "true-false")
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.DictReader(f))
        n = _check_limit(limit_per_topic, len(rows), f"{topic} statements")
        out.extend(Statement(topic, r["statement"], int(r["label"])) for r in rows[:n])
    return out


# --- BIG-bench general_knowledge ----------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceQuestion:
    index: int
    question: str
    choices: list[str]
    gold: list[str] = field(default_factory=list)  # one or more correct choices


HAND_ADDED = ChoiceQuestion(
    index=70,
    question="Where is the capital of Washington State?",
    choices=["Seattle", "Olympia", "Vancouver", "Spokane"],
    gold=["Olympia"],
)


def load_general_knowledge(data_dir_: str | os.PathLike | None = None, limit: int | None = None,
                           include_hand_added: bool = True) -> list[ChoiceQuestion]:
    """The 70 BIG-bench ``general_knowledge`` items plus the original study's hand-added one (71)."""
    directory = data_dir(data_dir_)
    rel = "bigbench/general_knowledge.json"
    path = directory / rel
    if path.exists():
        examples = json.loads(path.read_text())["examples"]
        items = [
            ChoiceQuestion(i, ex["input"], list(ex["target_scores"]),
                           [c for c, s in ex["target_scores"].items() if s == 1])
            for i, ex in enumerate(examples)
        ]
    else:
        items = _general_knowledge_from_hub()
        if items is None:
            raise _missing(rel, directory, rel)
    if include_hand_added:
        items.append(HAND_ADDED)
    return items[: _check_limit(limit, len(items), "general_knowledge questions")]


def _general_knowledge_from_hub() -> list[ChoiceQuestion] | None:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    try:
        from datasets import concatenate_datasets, load_dataset

        ds = load_dataset("tasksource/bigbench", "general_knowledge")
        ds = concatenate_datasets([ds[s] for s in ds])
    except Exception:
        return None
    return [
        ChoiceQuestion(i, r["inputs"].split("\n")[0].removeprefix("Q: ").strip(),
                       list(r["multiple_choice_targets"]),
                       [c for c, s in zip(r["multiple_choice_targets"], r["multiple_choice_scores"]) if s == 1])
        for i, r in enumerate(ds)
    ]
