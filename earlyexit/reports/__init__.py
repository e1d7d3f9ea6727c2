"""What each notebook runs: compute a study into its results file, or load that file, and draw every
figure and table from it.

One module per notebook (:mod:`~earlyexit.reports.vis`, :mod:`~earlyexit.reports.entropy`,
:mod:`~earlyexit.reports.probes`, :mod:`~earlyexit.reports.truthfulqa`), each with

* ``compute(...)`` — load the model, run the study, return its typed result (:mod:`earlyexit.core.results`);
  the CLI command of the study calls the same function, so both write the same file;
* ``load_or_compute(results_dir, recompute=..., ...)`` — the notebooks' first cell: with
  ``recompute=False`` and the results file present it only reads it (no model is loaded);
* ``plot_*`` / ``table*`` — figures (saved as PNG and PDF by :func:`earlyexit.plotting.save_figure`) and
  tables, drawn from the result alone.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

from earlyexit.core.results import ResultFile

__all__ = ["display_path", "load_or_compute"]


def _short_source(filename: str) -> str:
    """A warning's source file without the machine's folders: relative to the working folder, else from the
    package folder on (``tqdm/auto.py``), else the file name."""
    p = Path(filename)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        pass
    parts = p.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return str(Path(*parts[parts.index(marker) + 1:]))
    return p.name


def _relative_warnings() -> None:
    """In a notebook kernel, print warnings with short source paths, so that no executed notebook carries an
    absolute path of the machine it ran on."""
    import linecache
    import sys
    import warnings

    if "ipykernel" not in sys.modules or getattr(warnings.formatwarning, "_earlyexit", False):
        return
    original = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if line is None:
            line = linecache.getline(filename, lineno)
        return original(message, category, _short_source(filename), lineno, line)

    formatwarning._earlyexit = True
    warnings.formatwarning = formatwarning


_relative_warnings()


def _vector_figures() -> None:
    """In a notebook kernel, show figures inline as SVG: a PNG's base64 text can read as a path to the checks
    that keep machine paths out of committed notebooks; SVG text cannot (the PNG and PDF files are saved apart)."""
    import sys

    if "ipykernel" not in sys.modules:
        return
    try:
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # pragma: no cover - matplotlib-inline comes with ipykernel
        return
    set_matplotlib_formats("svg")


_vector_figures()


def display_path(path: str | os.PathLike) -> str:
    """``path`` as printed in a notebook: relative to the working folder when it lies below it, so that no
    executed notebook carries a machine's absolute path."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def load_or_compute(paths: Mapping[str, Path], load: Callable[[], Any], compute: Callable[[], Any], *,
                    recompute: bool, parameters: Mapping[str, Any] | None = None, what: str = "results") -> Any:
    """``load()`` when every file of ``paths`` exists and ``recompute`` is False (checking the stored
    parameters against ``parameters``), else ``compute()`` (which saves them). Prints which it did."""
    missing = [p for p in paths.values() if not Path(p).exists()]
    if not recompute and not missing:
        out = load()
        if parameters:
            for r in (out.values() if isinstance(out, Mapping) and not isinstance(out, ResultFile) else [out]):
                if isinstance(r, ResultFile):
                    r.check_parameters(parameters)
        print(f"{what}: loaded {', '.join(display_path(p) for p in paths.values())} (recompute=False: no model "
              "loaded, nothing recomputed)", flush=True)
        return out
    from earlyexit.core.checks import check_output_file

    for p in paths.values():  # a folder where a file goes, a path under a file: said before any work
        check_output_file(p, what=f"{what} results file", results=False)
    why = "recompute=True" if recompute else f"{display_path(missing[0])} not found"
    print(f"{what}: computing ({why})", flush=True)
    out = compute()
    print(f"{what}: wrote {', '.join(display_path(p) for p in paths.values())}", flush=True)
    return out

