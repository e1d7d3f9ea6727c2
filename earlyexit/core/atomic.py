"""Atomic writes: a reader sees the old file or the complete new one, never half of one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and for directories (the block may create either at the yielded path).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + suffix, dir=target.parent)
    except OSError as err:
        raise _write_error(target, err) from None
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as err:
            if _mentions(err, tmp_path):  # the user never gave the temporary name: name their path
                raise _write_error(target, err) from None
            raise
        try:
            if tmp_path.is_dir() and target.is_dir():
                shutil.rmtree(target)
            elif target.is_dir():
                raise IsADirectoryError(21, "Is a directory", str(target))
            os.replace(tmp_path, target)
        except OSError as err:
            raise _write_error(target, err) from None
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def _mentions(err: OSError, tmp: Path) -> bool:
    """Whether ``err`` is about the temporary path (or a file inside a temporary folder)."""
    return any(str(getattr(err, a, None) or "").startswith(str(tmp)) for a in ("filename", "filename2")) or \
        str(tmp) in str(err)


def _write_error(target: Path, err: OSError) -> Exception:
    """The failed write of ``target`` as an :class:`~earlyexit.core.errors.OutputPathError` naming ``target``."""
    from earlyexit.core.errors import OutputPathError

    why = err.strerror or type(err).__name__
    anc = target.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if isinstance(err, (FileExistsError, NotADirectoryError)) and anc.exists() and not anc.is_dir():
        why = f"{anc} is a file, not a folder"
    elif isinstance(err, IsADirectoryError) or target.is_dir():
        why = "it is a folder; give a file name"
    return OutputPathError(f"Cannot write {target}: {why}.")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_default) + "\n")
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")
