"""The validation layer at the public boundary: argument types and ranges, and output paths.

The API functions and the command line call the same checks, so a bad value gets the same message
either way (the CLI names the option, ``--top-k``; the API the argument, ``top_k``), and every check runs
before any model is loaded or any file is written.

>>> check_int(3, "top_k", minimum=1)
3
>>> check_int(1.5, "top_k", minimum=1)
Traceback (most recent call last):
...
earlyexit.core.errors.BadType: top_k must be an integer ≥ 1, got 1.5
>>> check_strings(["Q:"], "stop")
['Q:']
>>> check_strings("xs", "stop")
Traceback (most recent call last):
...
earlyexit.core.errors.BadType: stop must be a list of strings such as ['Q:'], not the string 'xs' (which would be read as its characters)
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from earlyexit.core.errors import BadInput, BadType, OutputPathError

__all__ = ["check_int", "check_int_list", "check_number", "check_strings", "check_output_file", "check_output_dir"]


def _bound(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in {minimum}..{maximum}"
    if minimum is not None:
        return f" ≥ {minimum}"
    if maximum is not None:
        return f" ≤ {maximum}"
    return ""


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> int | None:
    """``value`` as an ``int`` if it is an integer (not a bool, not a float such as 1.5) within the bounds."""
    if value is None and optional:
        return None
    want = f"{name} must be an integer{_bound(minimum, maximum)}"
    if isinstance(value, bool) or isinstance(value, float) or not isinstance(value, numbers.Integral) and not (
            hasattr(value, "__index__") and not isinstance(value, (str, bytes))):
        raise BadType(f"{want}, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BadInput(f"{want}, got {value}")
    return value


def check_int_list(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None,
                   allow_empty: bool = False) -> list[int]:
    """A list of integers (layer entries): a string, a float such as 1.5 or a bool is refused, not rounded."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise BadType(f"{name} must be a list of integers such as [15, 17], got {value!r}")
    out = [check_int(x, f"each of {name}", minimum=minimum, maximum=maximum) for x in value]
    if not out and not allow_empty:
        raise BadInput(f"{name} is empty: give at least one entry")
    return out


def check_number(value: Any, name: str, *, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None, optional: bool = False) -> float | None:
    """``value`` as a finite ``float`` within the bounds (``above``: strictly greater than)."""
    if value is None and optional:
        return None
    parts = []
    if above is not None:
        parts.append(f"> {above:g}")
    if minimum is not None:
        parts.append(f"≥ {minimum:g}")
    if maximum is not None:
        parts.append(f"≤ {maximum:g}")
    want = f"{name} must be a finite number" + (f" {' and '.join(parts)}" if parts else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadType(f"{want}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (above is not None and not value > above) or (
            minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BadInput(f"{want}, got {value!r}")
    return value


def check_strings(value: Any, name: str, *, allow_empty: bool = True) -> list[str]:
    """A list of strings (stop strings, prompts): a lone string is refused, not read as its characters."""
    if isinstance(value, (str, bytes)):
        raise BadType(f"{name} must be a list of strings such as ['Q:'], not the string {value!r} "
                      "(which would be read as its characters)")
    try:
        out = list(value)
    except TypeError:
        raise BadType(f"{name} must be a list of strings, got {value!r}") from None
    bad = [x for x in out if not isinstance(x, str)]
    if bad:
        raise BadType(f"{name} must be a list of strings, but holds {bad[0]!r}")
    if not out and not allow_empty:
        raise BadInput(f"{name} is empty: give at least one string")
    return out


# --- output paths ------------------------------------------------------------------------------------

def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, what: str) -> None:
    """``path``'s folders exist or can be made, and the nearest existing one is a writable folder."""
    anc = _first_existing(path.parent if path.parent != path else path)
    if not anc.is_dir():
        raise OutputPathError(f"{what} {path} cannot be written: {anc} is a file, not a folder. Choose a path "
                              "whose folders are folders.")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path} cannot be written: no permission to write in {anc}. Choose a "
                              "writable folder.")


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_file(path: str | os.PathLike, *, what: str = "out", kind: str | None = None,
                      inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), results: bool | None = None) -> Path:
    """Check, before any work, that a result can be written to the file ``path``.

    Refuses a folder, a path under a regular file, a folder without write permission, one of the
    command's ``inputs`` (``(option, path)`` pairs, e.g. ``("--predictions", "g.json")``), and an existing
    file that :meth:`~earlyexit.core.results.ResultFile.save` would refuse (another kind of results, or not
    a results file) when ``kind`` is given. With ``kind=None`` (an HTML page, a figure) an existing results
    file of any kind is refused too (``results=False`` turns that off).
    """
    if path is None or str(path).strip() == "":
        raise OutputPathError(f"{what} is empty: give a file name")
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.is_dir():
        raise OutputPathError(f"{what} {p} is a folder: give a file name (e.g. {p / 'results.json'}).")
    _check_parent(p, what)
    for option, other in inputs:
        if other is not None and _same(p, Path(os.fspath(other))):
            raise OutputPathError(f"{what} {p} is the command's input ({option}): writing there would destroy it; "
                                  "give another file name.")
    if p.exists():
        from earlyexit.core.results import check_overwrite

        if kind is not None:
            check_overwrite(p, kind)
        elif results is not False:
            check_overwrite(p, None)
    return p


def check_output_dir(path: str | os.PathLike, *, what: str = "out",
                     files: Sequence[tuple[str | os.PathLike, str | None]] = ()) -> Path:
    """Check, before any work, that results can be written into the folder ``path`` (made if missing):
    refuses a regular file, a path under a file, no write permission, and any of ``files`` (``(path, kind)``
    pairs of the files to be written there) that :func:`check_output_file` refuses."""
    if path is None or str(path).strip() == "":
        raise OutputPathError(f"{what} is empty: give a folder")
    p = Path(os.path.expanduser(os.fspath(path)))
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{what} {p} is a file, not a folder: give a folder to write the results into "
                              f"(e.g. {p.parent / 'results'}).")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputPathError(f"{what} {p} cannot be written: no permission to write in it. Choose a "
                                  "writable folder.")
    else:
        _check_parent(p, what)
    for f, kind in files:
        check_output_file(f, what=what, kind=kind, results=kind is not None)
    return p


def read_json(path: Path, what: str, *, fix: str = "") -> Any:
    """The JSON document in ``path``, or a :class:`~earlyexit.core.errors.DataError` naming ``what`` and the
    file when it is not JSON or not UTF-8 text (where in the file, and ``fix``: what to do about it)."""
    import json

    from earlyexit.core.errors import DataError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
                        f"{fix}.") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text ({err.reason}){fix}.") from None
