"""Ordinary English prose for training and evaluating tuned lenses, offline.

The text is the prose of the Python documentation as the Debian package ``python3-doc`` (which
installs ``python3.11-doc``) ships it: every HTML paragraph (``<p>``) of the tutorial, the HOWTOs,
the FAQ, the language and library references and the "What's New" pages, with code blocks, tables,
navigation and the indexes left out, and paragraphs that are mostly symbols dropped. About 1.05M
words, 1.45M SmolLM2 tokens. Licence: the PSF License Agreement (the documentation's own licence;
see ``/usr/share/doc/python3.11-doc/copyright``). None of it is a TruthfulQA question, a
true/false statement or a BIG-bench item.

Install it with ``apt-get install python3-doc`` (``.ci/run`` and ``make setup`` do). Another folder
of Sphinx HTML can stand in: ``$EARLYEXIT_CORPUS_DIR``.

The split is by page: a page whose path hashes into the first :data:`HELDOUT_PERCENT` percent is
held out, so evaluation text is never seen in training.

>>> corpus = load_corpus()                            # doctest: +SKIP
>>> len(corpus.train), len(corpus.heldout)            # pages              # doctest: +SKIP
(474, 24)
>>> ids = corpus.tokens(tokenizer, "heldout")         # one int32 array     # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
import html.parser
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from earlyexit.core import store

ENV = "EARLYEXIT_CORPUS_DIR"
DOC_DIRS = ("/usr/share/doc/python3.11/html", "/usr/share/doc/python3/html")
INSTALL_HINT = "apt-get install python3-doc  (Debian/Ubuntu: the Python 3.11 documentation, PSF licence)"
CORPUS_NAME = "python3.11-doc prose"
CORPUS_VERSION = 1
HELDOUT_PERCENT = 5
MIN_CHARS = 60          # shorter paragraphs are mostly headings and labels
MIN_LETTERS = 0.8       # share of letters and spaces: drops paragraphs that are mostly code or symbols
SKIP_PREFIXES = ("genindex", "py-modindex", "search", "_", "contents", "license", "copyright")


class _Paragraphs(html.parser.HTMLParser):
    """The text of every ``<p>`` outside ``<pre>``, ``<script>`` and ``<style>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("pre", "script", "style"):
            self._skip += 1
        elif tag == "p" and self._skip == 0:
            self._buf = []

    def handle_endtag(self, tag):
        if tag in ("pre", "script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "p" and self._buf is not None:
            text = re.sub(r"\s+", " ", "".join(self._buf)).strip()
            self._buf = None
            if text:
                self.paragraphs.append(text)

    def handle_data(self, data):
        if self._buf is not None and self._skip == 0:
            self._buf.append(data)


def is_prose(paragraph: str) -> bool:
    """A paragraph long enough and made mostly of words.

    >>> is_prose("The hasattr() function was catching and ignoring all errors, under the assumption that they meant")
    True
    >>> is_prose("x = [i ** 2 for i in range(10)]  # squares, as a list")
    False
    """
    if len(paragraph) < MIN_CHARS:
        return False
    return sum(c.isalpha() or c == " " for c in paragraph) >= MIN_LETTERS * len(paragraph)


def page_paragraphs(html_text: str) -> list[str]:
    """The prose paragraphs of one HTML page."""
    parser = _Paragraphs()
    parser.feed(html_text)
    parser.close()
    return [p for p in parser.paragraphs if is_prose(p)]


def is_heldout(page: str) -> bool:
    """Whether page ``page`` (its path in the documentation) is in the held-out split."""
    return int(hashlib.sha256(page.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def find_doc_dir(doc_dir: str | os.PathLike | None = None) -> Path:
    """The HTML documentation folder: ``doc_dir``, else ``$EARLYEXIT_CORPUS_DIR``, else where Debian's
    ``python3-doc`` installs it."""
    candidates = [doc_dir] if doc_dir is not None else ([os.environ[ENV]] if os.environ.get(ENV) else list(DOC_DIRS))
    for c in candidates:
        p = Path(c)
        if p.is_dir() and any(p.rglob("*.html")):
            return p
    raise FileNotFoundError(
        f"The tuned-lens training text (the Python documentation's prose) was not found in "
        f"{', '.join(str(c) for c in candidates)}. Install it with: {INSTALL_HINT}; or point ${ENV} at a folder "
        "of Sphinx HTML pages.")


@dataclass
class Corpus:
    """Pages of prose, split by page into ``train`` and ``heldout`` (``{page path: [paragraph, ...]}``)."""

    source: str
    train: dict[str, list[str]]
    heldout: dict[str, list[str]]
    key: str

    def pages(self, split: str) -> dict[str, list[str]]:
        if split not in ("train", "heldout"):
            raise ValueError(f"Unknown split {split!r}: use 'train' or 'heldout'.")
        return self.train if split == "train" else self.heldout

    def texts(self, split: str) -> list[str]:
        """One text per page (paragraphs joined by blank lines)."""
        return ["\n\n".join(paras) for paras in self.pages(split).values() if paras]

    def n_words(self, split: str) -> int:
        return sum(len(p.split()) for paras in self.pages(split).values() for p in paras)

    def tokens(self, tokenizer, split: str, *, use_cache: bool = True) -> np.ndarray:
        """The split as one stream of token ids (int32): each page's tokens followed by the end-of-text
        token, page after page. Cached per tokenizer in the store (area ``corpus``)."""
        key = store.make_key("corpus-tokens", {"corpus": self.key, "split": split,
                                               "tokenizer": tokenizer_id(tokenizer)})
        path = store.area("corpus") / f"tokens-{split}-{key[:24]}.npz"
        if use_cache:
            hit = store.read_npz(path, key, warn=False)
            if hit is not None:
                return hit["ids"]
        return_ids = texts_to_stream(tokenizer, self.texts(split))
        if use_cache:
            store.write_npz(path, key, {"ids": return_ids})
        return return_ids


def tokenizer_id(tokenizer) -> dict:
    """What identifies a tokenizer's output: its name, size and the ids of a probe text."""
    probe = "The tuned lens reads 3.14 cafés' prices — quickly!\n\nSecond paragraph."
    return {"name": getattr(tokenizer, "name_or_path", ""), "n": len(tokenizer),
            "probe": list(tokenizer(probe, add_special_tokens=False)["input_ids"])}


def texts_to_stream(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token ids of ``texts`` (no special tokens), each followed by the end-of-text token, as one int32 array."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        out.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            out.append(int(eos))
    return np.asarray(out, dtype=np.int32)


def load_corpus(doc_dir: str | os.PathLike | None = None, *, use_cache: bool = True) -> Corpus:
    """The prose of the installed Python documentation, split by page (cached in the store)."""
    root = find_doc_dir(doc_dir)
    files = sorted(p for p in root.rglob("*.html")
                   if not p.relative_to(root).as_posix().startswith(SKIP_PREFIXES))
    listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in files]
    key = store.make_key("corpus", {"name": CORPUS_NAME, "v": CORPUS_VERSION, "files": listing,
                                    "min_chars": MIN_CHARS, "min_letters": MIN_LETTERS, "heldout": HELDOUT_PERCENT})
    path = store.area("corpus") / f"pages-{key[:24]}.json"
    pages = store.read_json_entry(path, key, warn=False) if use_cache else None
    if pages is None:
        pages = {}
        for p, (rel, _) in zip(files, listing):
            paras = page_paragraphs(p.read_text(encoding="utf-8", errors="replace"))
            if paras:
                pages[rel] = paras
        if use_cache:
            store.write_json_entry(path, key, pages)
    train = {k: v for k, v in pages.items() if not is_heldout(k)}
    heldout = {k: v for k, v in pages.items() if is_heldout(k)}
    return Corpus(source=str(root), train=train, heldout=heldout, key=key)
