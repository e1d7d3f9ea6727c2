"""Provenance for saved results: model, data size, settings and library versions."""
from __future__ import annotations

import datetime as _dt
import platform
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


def run_metadata(model: Any = None, n: int | None = None, **settings: Any) -> dict[str, Any]:
    """A dict to store beside every result: model name, n, settings, versions, time, device."""
    info: dict[str, Any] = {
        "model": model_name(model) if model is not None and not isinstance(model, str) else model,
        "n": n,
        "settings": settings,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if model is not None and not isinstance(model, str):
        info["device"] = str(next(model.parameters()).device)
        info["dtype"] = str(next(model.parameters()).dtype)
    return info
