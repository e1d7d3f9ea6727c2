"""Provenance for saved results: model, data size, settings and library versions."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
from pathlib import Path
from importlib import metadata
from typing import Any

LIBRARIES = ("earlyexit", "torch", "transformers", "numpy", "scipy", "scikit-learn", "sacrebleu",
             "rouge-score", "bert-score", "matplotlib")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def model_name(model) -> str:
    """The name a model was loaded by (embedded short name, Hub id or folder)."""
    return getattr(model, "earlyexit_name", None) or getattr(model.config, "_name_or_path", "unknown")


def file_fingerprint(path: str | os.PathLike, rows: int | None, name: str | None = None) -> dict[str, Any]:
    """What a data file was: ``{"file": name, "rows": rows, "sha256": ...}`` (``name``: how to show it, e.g.
    its path below the data folder, so that no machine's absolute path is stored)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file": name or Path(path).name, "rows": rows, "sha256": h.hexdigest()}


def data_files(data: Any) -> list[dict[str, Any]]:
    """The fingerprints of the data files behind ``data``: what a loader of :mod:`earlyexit.studies.data`
    returned (it carries ``data_files``), or a list of :func:`file_fingerprint` dicts; ``[]`` if unknown."""
    if data is None:
        return []
    files = getattr(data, "data_files", None)
    if files is not None:
        return [dict(f) for f in files]
    if isinstance(data, (list, tuple)) and all(isinstance(f, dict) and "file" in f for f in data):
        return [dict(f) for f in data]
    return []


def run_metadata(model: Any = None, n: int | None = None, *, data: Any = None, parallel: Any = None,
                 **settings: Any) -> dict[str, Any]:
    """A dict to store beside every result: model name, n, settings, versions, time, device, and with
    ``data`` (the loaded items or their :func:`data_files`) each data file's row count and sha256.
    ``num_processes``: the processes of the run (:mod:`earlyexit.core.parallel`); with ``parallel`` (a
    :class:`~earlyexit.core.parallel.ParallelInfo` or its dict) also ``parallel``: the sharding and the
    items each process handled. A model placed by accelerate records its ``device_map``."""
    info: dict[str, Any] = {
        "model": model_name(model) if model is not None and not isinstance(model, str) else model,
        "n": n,
        "settings": settings,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    files = data_files(data)
    if files:
        info["data"] = files
    from earlyexit.core import parallel as _parallel

    par = parallel.as_meta() if hasattr(parallel, "as_meta") else parallel
    info["num_processes"] = int(par["num_processes"]) if par else _parallel.num_processes()
    if par:
        info["parallel"] = par
    if model is not None and not isinstance(model, str):
        info["device"] = str(_parallel.input_device(model))
        info["dtype"] = str(next(model.parameters()).dtype)
        device_map = getattr(model, "hf_device_map", None)
        if device_map and len(set(map(str, device_map.values()))) > 1:
            info["device_map"] = {str(k): str(v) for k, v in device_map.items()}
    return info
