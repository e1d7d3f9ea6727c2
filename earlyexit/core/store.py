"""The one on-disk cache: converted models, probe features, generated answers, MC log-probabilities, scores.

Everything lives under :func:`cache_root` — ``$EARLYEXIT_CACHE``, else ``~/.cache/earlyexit``
(``$EARLYEXIT_CACHE_DIR`` is read as a deprecated alias) — in one folder per area
(``models``, ``features``, ``entropy``, ``mc``, ``scores``, ``lenses``). Every entry stores the key it was
written for; keys include the model's weights fingerprint (:func:`model_fingerprint`), and a read whose key
does not match, or of a damaged file, warns and returns ``None`` so the caller recomputes. Writes are
atomic (a reader sees the old file or the complete new one), so several processes may share the store.

>>> key = make_key("demo", {"model": "m", "n": 3})
>>> len(key)
64
>>> import tempfile, numpy as np
>>> with tempfile.TemporaryDirectory() as d:
...     p = Path(d) / "x.npz"
...     write_npz(p, key, {"a": np.arange(3)})
...     read_npz(p, key)["a"].tolist(), read_npz(p, "other key", warn=False)
([0, 1, 2], None)
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from earlyexit.core.atomic import atomic_path

ENV = "EARLYEXIT_CACHE"
DEPRECATED_ENV = "EARLYEXIT_CACHE_DIR"
_warned: set[str] = set()


def cache_root() -> Path:
    """``$EARLYEXIT_CACHE``, else the deprecated ``$EARLYEXIT_CACHE_DIR`` (with a warning), else
    ``~/.cache/earlyexit``."""
    root = os.environ.get(ENV)
    if not root and os.environ.get(DEPRECATED_ENV):
        root = os.environ[DEPRECATED_ENV]
        if DEPRECATED_ENV not in _warned:
            _warned.add(DEPRECATED_ENV)
            warnings.warn(f"${DEPRECATED_ENV} is deprecated: set ${ENV} instead (one variable for every cache).",
                          DeprecationWarning, stacklevel=2)
    return Path(root) if root else Path.home() / ".cache" / "earlyexit"


def area(name: str, root: str | os.PathLike | None = None) -> Path:
    """The folder of one cache area (``root`` overrides the store's root for it)."""
    return Path(root) if root is not None else cache_root() / name


def slug(text: str) -> str:
    """A file-name-safe form of a model name or setting."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))[:60] or "model"


def make_key(kind: str, parts: Any) -> str:
    """sha256 of ``kind`` and ``parts`` (JSON, sorted keys)."""
    blob = json.dumps({"kind": kind, "parts": parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def model_fingerprint(model) -> str:
    """Hash of the model's name, config and the first values of every parameter.

    Cheap (no full pass over the weights) yet changes with the architecture, the size and the
    weights (a different seed or checkpoint changes the first values of every tensor). Computed on every
    call (milliseconds), so weights changed in place give another key.
    """
    import torch

    from earlyexit.core.meta import model_name

    h = hashlib.sha256()
    h.update(model_name(model).encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        offloaded = _offloaded_heads(model)
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            if name in offloaded:
                h.update(offloaded[name])
            elif p.device.type != "meta":
                h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _offloaded_heads(model) -> dict[str, bytes]:
    """The first values of every parameter that accelerate offloaded (weights on ``meta`` between calls),
    read by onloading one hooked module at a time, so that a dispatched model has the fingerprint of the
    same weights loaded whole."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return {}
    from accelerate.utils import align_module_device, has_offloaded_params

    out: dict[str, bytes] = {}
    for mname, module in model.named_modules():
        if not has_offloaded_params(module):
            continue
        recurse = bool(getattr(module._hf_hook, "place_submodules", False))
        with align_module_device(module):
            for pname, p in module.named_parameters(recurse=recurse):
                if p.device.type != "meta":
                    out[f"{mname}.{pname}" if mname else pname] = \
                        p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes()
    return out


def _ignore(path: Path, why: str, warn: bool) -> None:
    if warn:
        warnings.warn(f"Ignoring cache file {path}: {why}; recomputing it.", stacklevel=3)


def write_npz(path: str | os.PathLike, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Arrays and their key, atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, __key__=np.array(key), **arrays)


def read_npz(path: str | os.PathLike, key: str, *, rows: int | None = None, warn: bool = True) -> dict | None:
    """The arrays at ``path`` if it is a complete entry for ``key`` (with ``rows`` rows each, when given)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        _ignore(path, f"unreadable ({err})", warn)
        return None
    stored = data.pop("__key__", None)
    if stored is None or str(stored) != key or not data or (rows is not None and any(v.shape[0] != rows
                                                                                     for v in data.values())):
        _ignore(path, "its key or shape does not match", warn)
        return None
    return data


def write_object(path: str | os.PathLike, key: str, obj: Any) -> None:
    """A Python object (tensors, lists, dicts) and its key, atomically (``torch.save``)."""
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"__key__": key, "value": obj}, tmp)


def _read_entry(path: Path, key: str, load, errors: tuple, warn: bool) -> Any | None:
    """The ``value`` of a ``{"__key__", "value"}`` document at ``path`` written for ``key``, else ``None``."""
    if not path.exists():
        return None
    try:
        doc = load(path)
    except errors as err:
        _ignore(path, f"unreadable ({err})", warn)
        return None
    if not isinstance(doc, dict) or doc.get("__key__") != key:
        _ignore(path, "its key does not match", warn)
        return None
    return doc["value"]


def read_object(path: str | os.PathLike, key: str, *, warn: bool = True) -> Any | None:
    """The object at ``path`` if it was written for ``key``, else ``None``."""
    import torch

    return _read_entry(Path(path), key, lambda p: torch.load(p, weights_only=False),
                       (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile), warn)


def write_json_entry(path: str | os.PathLike, key: str, obj: Any) -> None:
    from earlyexit.core.atomic import write_json

    write_json(path, {"__key__": key, "value": obj})


def read_json_entry(path: str | os.PathLike, key: str, *, warn: bool = True) -> Any | None:
    return _read_entry(Path(path), key, lambda p: json.loads(p.read_text()), (OSError, ValueError), warn)
