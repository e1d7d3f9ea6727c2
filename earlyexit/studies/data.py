"""Loaders for TruthfulQA, the true-false statements and BIG-bench ``general_knowledge``.

The directory is the ``data_dir`` argument, else ``$EARLYEXIT_DATA_DIR``, else ``data/``.

>>> items = load_truthfulqa("../shared/data")          # doctest: +SKIP
>>> len(items)                                          # doctest: +SKIP
817
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from earlyexit.core.checks import read_json
from earlyexit.core.errors import BadInput, BadType, DataError, DataNotFound
from earlyexit.core.meta import file_fingerprint

TRUE_FALSE_TOPICS = ("animals", "cities", "companies", "elements", "facts", "inventions", "generated")

SOURCES = {
    "truthfulqa/TruthfulQA.csv": "github.com/sylinrl/TruthfulQA (TruthfulQA.csv), or the Hugging Face Hub "
    "dataset truthfulqa/truthful_qa (config 'generation'), read automatically when the Hub is reachable",
    "true-false": "the true-false-dataset.zip released with Azaria & Mitchell (2023), 'The Internal State of "
    "an LLM Knows When It's Lying'",
    "bigbench/general_knowledge.json": "github.com/google/BIG-bench, "
    "bigbench/benchmark_tasks/general_knowledge/task.json",
}


class DataNotFoundError(DataNotFound):
    """A data file that is missing (the message says where to get it and where to put it)."""


class DataRows(list):
    """What a loader returns: a list of items that also knows the files they came from (``data_files``:
    name, row count and sha256 of each, recorded in the results' metadata by
    :func:`~earlyexit.core.meta.run_metadata`)."""

    data_files: list[dict]

    def __init__(self, items=(), data_files=()):
        super().__init__(items)
        self.data_files = [dict(f) for f in data_files]


def _read_csv(path: Path, rel: str, columns: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV data file as dicts, checked: readable UTF-8, the ``columns`` in its header, every row
    with as many fields as the header, no quoted field left open (a file cut short). Errors name the file
    and the row (1 = the first row after the header; the line number in brackets)."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(f"Data file {path} is empty: it needs a header line with {', '.join(columns)}. "
                                f"Get it again ({_source_of(rel)}).") from None
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(f"Data file {path} lacks the column(s) {', '.join(map(repr, missing))} (its header "
                                f"is {', '.join(map(repr, header))}): it is not the expected file; get it again "
                                f"({_source_of(rel)}).")
            rows = []
            row_no = 0
            for row_no, fields in enumerate(reader, 1):
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DataError(f"Data file {path}, row {row_no} (line {reader.line_num}): {len(fields)} fields "
                                    f"where the header has {len(header)}: the file is damaged or cut short; get it "
                                    f"again ({_source_of(rel)}).")
                rows.append(dict(zip(header, fields)))
    except csv.Error as err:
        raise DataError(f"Data file {path}, row {row_no + 1} (line {reader.line_num}): {err} (a quoted field never "
                        f"closed: the file is cut short or damaged); get it again ({_source_of(rel)}).") from None
    except UnicodeDecodeError as err:
        raise DataError(f"Data file {path} is not UTF-8 text ({err.reason} at byte {err.start}): get it again "
                        f"({_source_of(rel)}).") from None
    except IsADirectoryError:
        raise DataError(f"Data file {path} is a folder, not a file.") from None
    if not rows:
        raise DataError(f"Data file {path} has a header but no rows: get it again ({_source_of(rel)}).")
    return rows


def _source_of(rel: str) -> str:
    key = rel if rel in SOURCES else rel.split("/")[0]
    return SOURCES.get(key, "its source")


def _required(path: Path, rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    for i, r in enumerate(rows, 1):
        for c in columns:
            if not (r.get(c) or "").strip():
                raise DataError(f"Data file {path}, row {i}: the {c!r} field is empty; fix or restore the file.")


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
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise BadType(f"limit must be a positive integer, got {limit!r}")
    if limit <= 0:
        raise BadInput(f"limit must be a positive integer, got {limit!r}")
    if limit > n:
        raise BadInput(f"limit {limit} is larger than the {n} {what} available")
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
    rel = "truthfulqa/TruthfulQA.csv"
    path = directory / rel
    if path.exists():
        columns = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
        rows = _read_csv(path, rel, columns)
        _required(path, rows, columns)
        items = [
            TruthfulQAItem(i, r["Question"], r["Best Answer"], _split_answers(r["Correct Answers"]),
                           _split_answers(r["Incorrect Answers"]), r.get("Category", ""), r.get("Type", ""))
            for i, r in enumerate(rows)
        ]
        files = [file_fingerprint(path, len(rows), rel)]
    else:
        items = _truthfulqa_from_hub()
        if items is None:
            raise _missing(rel, directory, rel)
        files = [{"file": "hub:truthfulqa/truthful_qa (generation, validation)", "rows": len(items), "sha256": None}]
    return DataRows(items[: _check_limit(limit, len(items), "TruthfulQA questions")], files)


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
    files = []
    for topic in topics:
        if topic not in TRUE_FALSE_TOPICS:
            raise BadInput(f"Unknown topic {topic!r}; topics are {TRUE_FALSE_TOPICS}")
        rel = f"true-false/{topic}_true_false.csv"
        path = directory / rel
        if not path.exists():
            raise _missing(rel, directory, "true-false")
        rows = _read_csv(path, rel, ("statement", "label"))
        _required(path, rows, ("statement", "label"))
        for i, r in enumerate(rows, 1):
            if r["label"].strip() not in ("0", "1"):
                raise DataError(f"Data file {path}, row {i}: label {r['label']!r} is not 0 or 1 (1 = true); fix or "
                                "restore the file.")
        n = _check_limit(limit_per_topic, len(rows), f"{topic} statements")
        out.extend(Statement(topic, r["statement"], int(r["label"])) for r in rows[:n])
        files.append(file_fingerprint(path, len(rows), rel))
    return DataRows(out, files)


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
        examples = _read_examples(path, rel)
        items = [
            ChoiceQuestion(i, ex["input"], list(ex["target_scores"]),
                           [c for c, s in ex["target_scores"].items() if s == 1])
            for i, ex in enumerate(examples)
        ]
        files = [file_fingerprint(path, len(examples), rel)]
    else:
        items = _general_knowledge_from_hub()
        if items is None:
            raise _missing(rel, directory, rel)
        files = [{"file": "hub:tasksource/bigbench (general_knowledge)", "rows": len(items), "sha256": None}]
    if include_hand_added:
        items.append(HAND_ADDED)
    return DataRows(items[: _check_limit(limit, len(items), "general_knowledge questions")], files)


def _read_examples(path: Path, rel: str) -> list[dict]:
    """The ``examples`` of a BIG-bench task file, checked (each with an ``input`` string and
    ``target_scores`` mapping choices to 0/1, one of them 1); errors name the file and the example."""
    doc = read_json(path, "Data file", fix=f": the file is damaged or cut short; get it again ({_source_of(rel)})")
    examples = doc.get("examples") if isinstance(doc, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"Data file {path} has no 'examples' list: it is not a BIG-bench task file; get it again "
                        f"({_source_of(rel)}).")
    for i, ex in enumerate(examples):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str) or not ex["input"].strip():
            raise DataError(f"Data file {path}, example {i}: no 'input' text; fix or restore the file.")
        if not isinstance(scores, dict) or len(scores) < 2 or not all(v in (0, 1) for v in scores.values()) \
                or 1 not in scores.values():
            raise DataError(f"Data file {path}, example {i}: 'target_scores' must map at least two choices to 0 or 1, "
                            "one of them 1; fix or restore the file.")
    return examples


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
