"""One schema for every results file: ``kind``, ``schema`` version, ``meta`` and the payload.

Every study writes its results through a :class:`ResultFile` (the CLI commands and the notebooks
alike), so a file says what it holds and who made it::

    {"kind": "entropy", "schema": 1, "meta": {"model": ..., "n": ..., "settings": ..., "versions": ...},
     ...payload keys...}

The payload sits at the top level beside ``kind``, ``schema`` and ``meta``, so readers of the older
files (``doc["items"]``, ``doc["meta"]["settings"]``) keep working. :meth:`ResultFile.save` writes
atomically and refuses to overwrite a file of another kind; :meth:`ResultFile.load` names the file
in every error (missing, not JSON, another kind). File names carry the model tag
(:func:`model_tag`), so two models never overwrite each other's results.

>>> r = ResultFile("vis", meta={"model": "m", "n": 1}, payload={"accuracy": 1.0})
>>> ResultFile.from_json(r.to_json()).payload
{'accuracy': 1.0}
>>> r["accuracy"], r["meta"]["n"]
(1.0, 1)
>>> VisResults.filename("HuggingFaceTB/SmolLM2-135M")
'vis_HuggingFaceTB_SmolLM2-135M.json'
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

from earlyexit.core.atomic import _default, atomic_path
from earlyexit.core.errors import ResultsError  # noqa: F401  (a ValueError; importable from here as before)

SCHEMA = 1
RESERVED = ("kind", "schema", "meta")


def model_tag(model: Any) -> str:
    """The model part of a results or figure file name: the embedded short name as it is, a Hugging Face
    id with ``/`` → ``_``, a local folder by its last component; other characters than letters, digits,
    ``.``, ``-`` and ``_`` become ``_``.

    >>> model_tag("smollm2-135m"), model_tag("HuggingFaceTB/SmolLM2-135M"), model_tag("/models/my model/")
    ('smollm2-135m', 'HuggingFaceTB_SmolLM2-135M', 'my_model')
    """
    if not isinstance(model, (str, os.PathLike)):
        from earlyexit.core.models import model_name

        model = model_name(model)
    name = os.fspath(model)
    if name.startswith(("/", ".", "~")) or os.sep in name and os.path.isdir(os.path.expanduser(name)):
        name = Path(os.path.expanduser(name.rstrip("/"))).name
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "_")).strip("_")
    if not tag:
        raise ValueError(f"Cannot make a file-name tag from model {model!r}.")
    return tag


def _read(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"Results file {path} not found.")
    if not path.is_file():
        raise ResultsError(f"Results file {path} is not a file.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultsError(f"Results file {path} is not valid JSON ({err}); delete it or recompute it.") from None
    except OSError as err:
        raise ResultsError(f"Results file {path} cannot be read ({err.strerror or err}).") from None


def check_overwrite(path: str | os.PathLike, kind: str | None) -> None:
    """Raise :class:`ResultsError` when saving results of ``kind`` to ``path`` would destroy something else:
    another kind of results, or a file that is not a JSON results object. ``kind=None`` (a file that is not
    results: a page, a figure) refuses only an existing results file. Nothing is written."""
    path = Path(path)
    if not path.exists():
        return
    if kind is None:
        try:
            with path.open("rb") as f:
                if f.read(1) not in (b"{",):
                    return
        except OSError:
            return
        try:
            old = _read(path)
        except ResultsError:
            return
        if isinstance(old, dict) and old.get("kind") in KINDS:
            raise ResultsError(f"Refusing to overwrite {path}: it holds {old['kind']!r} results. Give another "
                               "file name.")
        return
    try:
        old = _read(path)
    except ResultsError:
        raise ResultsError(f"Refusing to overwrite {path}: it is not a JSON results file.") from None
    if not isinstance(old, dict):
        raise ResultsError(f"Refusing to overwrite {path}: it is not a JSON results object.")
    if old.get("kind") not in (None, kind):
        raise ResultsError(f"Refusing to overwrite {path}: it holds {old['kind']!r} results, not {kind!r}. "
                           "Give another file name.")
    if old.get("kind") is None and "meta" not in old:  # results written before the schema all have meta
        raise ResultsError(f"Refusing to overwrite {path}: it is a JSON file but not a results file (no 'kind', "
                           "no 'meta'). Give another file name.")


class ResultFile(Mapping[str, Any]):
    """A results document: ``kind``, ``schema``, ``meta`` (from :func:`~earlyexit.core.meta.run_metadata`:
    model, n, settings, library versions) and a JSON-ready ``payload`` dict.

    Reads like the dict it is written as (``r["meta"]``, ``r["items"]``), so the table and figure
    functions take either. Subclasses fix ``KIND`` and the file name pattern ``FILENAME``.
    """

    KIND: ClassVar[str | None] = None
    FILENAME: ClassVar[str | None] = None  # e.g. "vis_{tag}.json"

    def __init__(self, kind: str | None = None, *, meta: Mapping[str, Any] | None = None,
                 payload: Mapping[str, Any] | None = None, schema: int = SCHEMA):
        kind = kind or self.KIND
        if not kind:
            raise ValueError("A results file needs a kind.")
        if self.KIND and kind != self.KIND:
            raise ValueError(f"{type(self).__name__} holds kind {self.KIND!r}, not {kind!r}.")
        payload = dict(payload or {})
        clash = [k for k in RESERVED if k in payload]
        if clash:
            raise ValueError(f"Payload keys {clash} are reserved for the results header.")
        self.kind, self.schema, self.meta, self.payload = kind, int(schema), dict(meta or {}), payload
        self.source: Path | None = None  # the file it was read from or saved to

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def create(cls, model: Any = None, n: int | None = None, *, payload: Mapping[str, Any] | None = None,
               settings: Mapping[str, Any] | None = None, kind: str | None = None, data: Any = None) -> "ResultFile":
        """A new result with ``meta = run_metadata(model, n, data=data, **settings)`` (``data``: the loaded
        items, whose files' row counts and sha256 are recorded)."""
        from earlyexit.core.meta import run_metadata

        return cls(kind, meta=run_metadata(model, n, data=data, **dict(settings or {})), payload=payload)

    @classmethod
    def from_dict(cls, doc: Any, *, kind: str | None = None, source: str | os.PathLike | None = None) -> "ResultFile":
        """Parse a document; ``kind`` (default: the class's) must match. Returns the class registered for
        the document's kind when called on :class:`ResultFile` itself."""
        where = f"Results file {source}" if source is not None else "Results document"
        want = kind or cls.KIND
        if not isinstance(doc, dict):
            raise ResultsError(f"{where} holds a JSON {type(doc).__name__}, not a results object.")
        got = doc.get("kind")
        if got is None:
            target = KINDS.get(want, cls) if want else cls
            if want and target.accepts_legacy(doc):
                got = want
            else:
                raise ResultsError(f"{where} has no 'kind': it was written before the results schema "
                                   f"(schema {SCHEMA}); recompute it (recompute=True).")
        if want and got != want:
            raise ResultsError(f"{where} holds {got!r} results, not {want!r}.")
        schema = doc.get("schema", SCHEMA)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise ResultsError(f"{where} has schema {schema!r}; this earlyexit reads schema ≤ {SCHEMA}.")
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise ResultsError(f"{where}: 'meta' is not an object.")
        target = cls if cls.KIND else KINDS.get(got, ResultFile)
        payload = {k: v for k, v in doc.items() if k not in RESERVED}
        out = target(got, meta=meta, payload=payload, schema=schema)
        out.source = Path(source) if source is not None else None
        return out

    @classmethod
    def from_json(cls, text: str, *, kind: str | None = None, source: str | os.PathLike | None = None) -> "ResultFile":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            where = f"Results file {source}" if source is not None else "Results text"
            raise ResultsError(f"{where} is not valid JSON ({err}).") from None
        return cls.from_dict(doc, kind=kind, source=source)

    @classmethod
    def accepts_legacy(cls, doc: dict) -> bool:
        """Whether a document without ``kind`` (written before the schema) can be read as this kind."""
        return False

    # --- files -------------------------------------------------------------------------------------
    @classmethod
    def filename(cls, model: Any, **fields: Any) -> str:
        if not cls.FILENAME:
            raise TypeError(f"{cls.__name__} has no standard file name; give a path.")
        return cls.FILENAME.format(tag=model_tag(model), **fields)

    @classmethod
    def path(cls, results_dir: str | os.PathLike, model: Any, **fields: Any) -> Path:
        """``results_dir / FILENAME`` for ``model`` (e.g. ``results/entropy_smollm2-135m.json``)."""
        return Path(results_dir) / cls.filename(model, **fields)

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str | None = None) -> "ResultFile":
        """Read ``path``; a clear error naming it when it is missing, not JSON or of another kind."""
        path = Path(path)
        return cls.from_dict(_read(path), kind=kind, source=path)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically. Refuses (nothing written) when ``path`` holds another kind of results, or
        something that is not a JSON object; overwrites the same kind and pre-schema files.

        In an ``accelerate launch`` group only the main process writes (the others hold the same gathered
        results and return the path): one writer, one atomic rename."""
        from earlyexit.core.parallel import is_main_process

        path = Path(path)
        if not is_main_process():
            return path
        if path.is_dir():
            raise ResultsError(f"Cannot save {self.kind} results to {path}: it is a folder; give a file name.")
        check_overwrite(path, self.kind)
        text = self.to_json()
        with atomic_path(path, suffix=".json") as tmp:
            tmp.write_text(text, encoding="utf-8")
        self.source = path
        return path

    # --- views -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "schema": self.schema, "meta": self.meta, **self.payload}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=_default) + "\n"

    @property
    def model(self) -> str | None:
        return self.meta.get("model")

    @property
    def n(self) -> int | None:
        return self.meta.get("n")

    @property
    def parameters(self) -> dict[str, Any]:
        """The parameters the result was computed with (as the notebooks and CLI pass them), if stored."""
        return dict(self.payload.get("parameters") or {})

    def check_parameters(self, wanted: Mapping[str, Any]) -> None:
        """Raise when a stored parameter differs from ``wanted`` (a redraw would show other results)."""
        have = self.parameters
        diff = {k: (have[k], v) for k, v in wanted.items() if k in have and _norm(have[k]) != _norm(v)}
        if diff:
            where = self.source if self.source is not None else f"these {self.kind} results"
            text = ", ".join(f"{k}={a!r} (asked: {b!r})" for k, (a, b) in diff.items())
            raise ResultsError(f"{where} was computed with {text}: recompute (recompute=True) or point "
                               "results_dir elsewhere.")

    def __getitem__(self, key: str) -> Any:
        if key == "kind":
            return self.kind
        if key == "schema":
            return self.schema
        if key == "meta":
            return self.meta
        return self.payload[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(RESERVED) + len(self.payload)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, model={self.model!r}, n={self.n!r}, keys={list(self.payload)})"


def _norm(v: Any) -> Any:
    """Compare parameters as JSON would store them (tuples as lists)."""
    return json.loads(json.dumps(v, default=_default))


# --- the kinds -------------------------------------------------------------------------------------

class VisResults(ResultFile):
    """``vis.ipynb``: per-question choice probabilities by layer, answers, accuracy."""
    KIND, FILENAME = "vis", "vis_{tag}.json"


class EntropyResults(ResultFile):
    """``Entropy.ipynb`` / ``earlyexit entropy``: curves, CIs, tests, per-answer scores, the conclusion
    (per-question table beside it: ``entropy_per_question_<tag>.csv``)."""
    KIND, FILENAME = "entropy", "entropy_{tag}.json"
    CSV: ClassVar[str] = "entropy_per_question_{tag}.csv"

    @classmethod
    def csv_path(cls, results_dir: str | os.PathLike, model: Any) -> Path:
        return Path(results_dir) / cls.CSV.format(tag=model_tag(model))


class ProbesResults(ResultFile):
    """``classifier.ipynb`` / ``earlyexit probes``: one report per condition under ``conditions``."""
    KIND, FILENAME = "probes", "probes_{tag}.json"


class MCResults(ResultFile):
    """TruthfulQA multiple choice (``dola.ipynb`` / ``earlyexit truthfulqa mc``): one entry per decoding
    under ``decodings``; the notebook adds ``static`` (cross-validation) and ``paper``."""
    KIND, FILENAME = "truthfulqa-mc", "dola_mc_{tag}.json"


class GenerateResults(ResultFile):
    """TruthfulQA open-ended answers of one decoding (``earlyexit truthfulqa generate`` and the
    notebook's runs): ``indices``, ``complete``, ``n_done``, ``items``; resumable."""
    KIND, FILENAME = "truthfulqa-generate", "dola_generate_{decoding}_{tag}.json"

    @classmethod
    def accepts_legacy(cls, doc: dict) -> bool:
        return isinstance(doc.get("items"), list) and isinstance(doc.get("meta"), dict) and "indices" in doc


class ScoresResults(ResultFile):
    """TruthfulQA open-ended scores (BLEU, ROUGE-L, BERTScore): one entry per decoding under ``decodings``."""
    KIND, FILENAME = "truthfulqa-scores", "dola_scores_{tag}.json"


class ExitResults(ResultFile):
    """``early_exit.ipynb``: settling entries, oracle saving, exit policies (per lens under ``lenses``) and
    the early-exit decoder against greedy (``decoders``)."""
    KIND, FILENAME = "early-exit", "early_exit_{tag}.json"


class LensTable(ResultFile):
    """``earlyexit lens --json``: per-layer top tokens and entropy of one prompt."""
    KIND = "lens"


KINDS: dict[str, type[ResultFile]] = {c.KIND: c for c in (VisResults, EntropyResults, ProbesResults, MCResults,
                                                          GenerateResults, ScoresResults, LensTable,
                                                          ExitResults)}


def load_result(path: str | os.PathLike, kind: str | None = None) -> ResultFile:
    """Read any results file (the class of its kind), checking ``kind`` when given."""
    return ResultFile.load(path, kind=kind)


def write_result(path: str | os.PathLike, kind: str, doc: Mapping[str, Any]) -> Path:
    """Save a ``{"meta": ..., **payload}`` dict as a results file of ``kind`` (see :meth:`ResultFile.save`)."""
    doc = dict(doc)
    doc.pop("kind", None)
    doc.pop("schema", None)
    meta = doc.pop("meta", {})
    return KINDS.get(kind, ResultFile)(kind, meta=meta, payload=doc).save(path)
