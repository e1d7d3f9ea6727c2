"""Argument types and output checks shared by the subcommands.

The types reject a bad value while the arguments are parsed, so argparse names the option itself
(``argument --top-k: expected an integer ≥ 1, got '-3'``) and nothing has run yet. They use the same
rules as the API (:mod:`earlyexit.core.checks`). :func:`out_file` and :func:`out_dir` check an output path
before any model is loaded; call them first in a command's ``func``::

    p.add_argument("--layers", type=layer_list)
    p.add_argument("--top-k", type=positive_int, default=5)
    ...
    out = out_file(args.out, kind=MCResults.KIND)              # before load_model
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from earlyexit.core.lenses import LENS_NAMES, lens_record

__all__ = ["parse_layers", "layer_list", "int_at_least", "positive_int", "nonnegative_int", "number",
           "name_list", "out_file", "out_dir", "LENS_CHOICES", "lens_notes", "cli_lens", "lens_record"]

# the lens names every ``--lens`` / ``--premature-lens`` takes: the ones resolve_lens knows, from that one place
LENS_CHOICES: tuple[str, ...] = LENS_NAMES


def _split(text: str) -> list[str]:
    return [x for x in text.replace(" ", "").split(",") if x]


def layer_list(text: str) -> list[int]:
    """``--layers``/``--taps``: comma-separated hidden-state entries (integers ≥ 0), e.g. ``0,15,30``."""
    parts = _split(text)
    bad = [x for x in parts if not x.isdigit()]
    if bad or not parts:
        what = f"{bad[0]!r} is not a layer entry" if bad else "no entries given"
        raise argparse.ArgumentTypeError(f"expected comma-separated layer entries (integers ≥ 0) such as 0,15,30, "
                                         f"got {text!r} ({what})")
    return [int(x) for x in parts]


def parse_layers(text: str | Sequence[int] | None) -> list[int] | None:
    """``None`` → ``None``; a string → :func:`layer_list`; a list (already parsed by ``type=layer_list``) as it is."""
    if text is None or not isinstance(text, str):
        return None if text is None else list(text)
    return layer_list(text)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number ≥ ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer ≥ {minimum}, got {value}")
        return value

    parse.__name__ = f"integer ≥ {minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def number(*, above: float | None = None, minimum: float | None = None,
           maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number with the given bounds (``above``: strictly greater)."""
    parts = [f"> {above:g}" if above is not None else "", f"≥ {minimum:g}" if minimum is not None else "",
             f"≤ {maximum:g}" if maximum is not None else ""]
    want = "a finite number" + "".join(f" {p}" for p in parts if p)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(value) or (above is not None and not value > above) or (
                minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = want
    return parse


def name_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: one name or a comma list, each one of ``choices``."""
    choices = tuple(choices)

    def parse(text: str) -> list[str]:
        names = _split(text)
        bad = [x for x in names if x not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)} (comma-separated), got {text!r}")
        return names

    return parse


def out_file(path: str | os.PathLike, *, option: str = "--out", kind: str | None = None,
             inputs: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> Path:
    """Check an output file before the work (see :func:`earlyexit.core.checks.check_output_file`)."""
    from earlyexit.core.checks import check_output_file

    return check_output_file(path, what=option, kind=kind, inputs=inputs)


def out_dir(path: str | os.PathLike, *, option: str = "--out",
            files: Sequence[tuple[str | os.PathLike, str | None]] = ()) -> Path:
    """Check an output folder (and the ``(path, kind)`` files to be written in it) before the work."""
    from earlyexit.core.checks import check_output_dir

    return check_output_dir(path, what=option, files=files)


# --- lenses ----------------------------------------------------------------------------------------

# what tuned_lens_for warns before it trains a lens (first use, or a stored one it cannot read)
_TUNED_NOTES = re.compile(r"(Training the tuned lens|Ignoring the stored tuned lens)")


@contextmanager
def lens_notes() -> Iterator[None]:
    """Within: the tuned lens's "training it on first use" warnings are printed at once as one plain line
    on stderr (``earlyexit: note: ...``), before the training starts; other warnings as usual."""
    from earlyexit.core.parallel import is_main_process

    with warnings.catch_warnings():
        shown = warnings.showwarning  # pytest's or the default; restored on exit

        def show(message, category, filename, lineno, file=None, line=None):
            if _TUNED_NOTES.match(str(message)):
                if is_main_process():
                    print(f"earlyexit: note: {message}", file=sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.filterwarnings("always", message=_TUNED_NOTES.pattern, category=UserWarning)
        warnings.showwarning = show
        yield


def cli_lens(model, name: str):
    """``name`` (one of :data:`LENS_CHOICES`) → the model's lens, as :func:`~earlyexit.core.lenses.resolve_lens`
    does. For ``"tuned"``: the model's cached or stored tuned lens; for the embedded models, one trained on
    first use (said on stderr before it starts, see :func:`lens_notes`); else the one-line error that
    says to run ``earlyexit tuned-lens train`` (exit code 2). Call it right after the model loads, before
    the work, so that a missing lens fails fast."""
    from earlyexit.core.lenses import resolve_lens

    with lens_notes():
        return resolve_lens(model, name)
