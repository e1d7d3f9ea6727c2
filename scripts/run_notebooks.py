"""Execute the project's notebooks headless with papermill (the main job).

    python scripts/run_notebooks.py                      # full data: results/, figures/ and the notebooks in place
    python scripts/run_notebooks.py --limit 20           # a subset: results, figures and notebooks in runs/limit-20/
    python scripts/run_notebooks.py --no-recompute       # redraw every figure and table from the saved results
    python scripts/run_notebooks.py --model gemma3-270m vis.ipynb

Where things go: a full run of the default model writes ``results/`` and ``figures/`` and the executed
notebooks in place; a subset run (``--limit N``) writes all three under ``runs/limit-N/`` (gitignored) and
leaves every tracked file untouched; another model's executed notebooks go to ``runs/<model>/`` (its
results and figures carry the model in their names, so they sit beside the default model's).

Notebooks read their parameters from a cell tagged ``parameters``: ``model``, ``limit`` (None = all data),
``data_dir``, ``figures_dir``, ``results_dir``, ``recompute``. Only parameters that differ from those
defaults are injected, never a machine path: the data folder reaches the kernel as ``$EARLYEXIT_DATA_DIR``.
The runner prints which notebook and which cell runs, with the elapsed time, and streams the kernel's
output (progress bars included).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = ("vis.ipynb", "Entropy.ipynb", "classifier.ipynb", "dola.ipynb", "tuned_lens.ipynb", "early_exit.ipynb")
REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "smollm2-135m"
# the notebooks' own defaults: not injected when a run uses them
DEFAULTS = {"figures_dir": "figures", "results_dir": "results", "recompute": False}


def _say(text: str) -> None:
    print(f"[run_notebooks] {text}", flush=True)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def _first_line(source: str, width: int = 70) -> str:
    line = next((l.strip() for l in source.splitlines() if l.strip() and not l.strip().startswith("#")), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def _engine():
    """A papermill engine that reports each code cell (index, first line, elapsed time) as it runs."""
    from papermill.engines import NBClientEngine, papermill_engines

    class ProgressEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, label: str = "", report=_say, **kwargs):
            code = [i for i, c in enumerate(nb_man.nb.cells) if c.cell_type == "code"]
            t0 = time.monotonic()
            started: dict[int, float] = {}
            cell_start, cell_complete = nb_man.cell_start, nb_man.cell_complete

            def on_start(cell, cell_index=None, **kw):
                if cell_index in code:
                    started[cell_index] = time.monotonic()
                    report(f"{label} cell {code.index(cell_index) + 1}/{len(code)} [{_clock(started[cell_index] - t0)}]"
                           f" {_first_line(cell.source)}")
                return cell_start(cell, cell_index, **kw)

            def on_complete(cell, cell_index=None, **kw):
                if cell_index in started and time.monotonic() - started[cell_index] >= 5:
                    report(f"{label} cell {code.index(cell_index) + 1}/{len(code)} done in "
                           f"{time.monotonic() - started[cell_index]:.0f} s")
                return cell_complete(cell, cell_index, **kw)

            nb_man.cell_start, nb_man.cell_complete = on_start, on_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("earlyexit-progress", ProgressEngine)
    return "earlyexit-progress"


def run_notebook(path: Path, output: Path, parameters: dict, cwd: Path = REPO, timeout: int | None = None,
                 label: str | None = None, progress: bool = True) -> None:
    """Execute ``path`` with ``parameters`` into ``output`` (written atomically: nothing when a cell fails).

    ``progress``: report each cell as it starts and stream the kernel's stdout / stderr (progress bars)."""
    import papermill as pm

    from earlyexit.core.atomic import atomic_path

    kw = {}
    if progress:
        kw = dict(engine_name=_engine(), label=label or Path(path).name, stdout_file=sys.stdout, stderr_file=sys.stderr)
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    # a committed notebook keeps the parameters of the run that executed it: drop them, so that a run which
    # injects nothing (its parameters are the defaults) runs on the defaults, not on the last run's values
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    with atomic_path(output, suffix=".ipynb") as tmp:
        pm.execute_notebook(nb, str(tmp), parameters=parameters, cwd=str(cwd), kernel_name="python3",
                            progress_bar=False, request_save_on_cell_execute=False, execution_timeout=timeout, **kw)
        _relative_paths(tmp, path, output, cwd)


def _relative_paths(nb_path: Path, src: Path, dst: Path, cwd: Path) -> None:
    """papermill records its input and output paths as given (absolute, the output a temporary name):
    store them relative to ``cwd`` so that the executed notebook holds no machine path."""
    import nbformat

    nb = nbformat.read(str(nb_path), as_version=4)
    meta = nb.metadata.get("papermill")
    if meta is None:
        return
    for key, p in (("input_path", src), ("output_path", dst)):
        if key in meta:
            meta[key] = os.path.relpath(Path(p).resolve(), Path(cwd).resolve())
    nbformat.write(nb, str(nb_path))


def plan(limit: int | None = None, model: str | None = None, results_dir: str | None = None,
         figures_dir: str | None = None, output_dir: str | None = None) -> dict[str, Path]:
    """Where a run writes: ``results``, ``figures`` and ``notebooks`` (paths relative to the repository)."""
    from earlyexit.core.results import model_tag

    base = Path("runs") / f"limit-{limit}" if limit is not None else Path(".")
    if output_dir:
        notebooks = Path(output_dir)
    elif model is not None and model != DEFAULT_MODEL:  # the tracked notebooks hold the default model's run
        notebooks = (base if limit is not None else Path("runs")) / model_tag(model)
    else:
        notebooks = base
    return {"results": Path(results_dir) if results_dir else base / "results",
            "figures": Path(figures_dir) if figures_dir else base / "figures",
            "notebooks": notebooks}


def default_data_dir() -> str | None:
    """As the Makefile: ``data/`` when it holds the data, else ``../shared/data`` when that exists."""
    if (REPO / "data" / "truthfulqa" / "TruthfulQA.csv").exists():
        return "data"
    shared = REPO.parent / "shared" / "data"
    return str(shared) if shared.is_dir() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help=f"default: those of {NOTEBOOKS} that exist")
    parser.add_argument("--model", default=None)
    parser.add_argument("--limit", type=int, default=None,
                        help="items per notebook (default: the full data); writes everything under runs/limit-N/")
    parser.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute the results (default), or --no-recompute: redraw from the saved results")
    parser.add_argument("--data-dir", default=None, help="data folder, given to the kernel as $EARLYEXIT_DATA_DIR")
    parser.add_argument("--figures-dir", default=None, help="default: figures/ (a subset run: runs/limit-N/figures/)")
    parser.add_argument("--results-dir", default=None, help="default: results/ (a subset run: runs/limit-N/results/)")
    parser.add_argument("--output-dir", default=None, help="write the executed notebooks here")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: none)")
    parser.add_argument("--quiet", action="store_true", help="no per-cell report, no streamed kernel output")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be ≥ 1, got {args.limit}")
    names = args.notebooks or [n for n in NOTEBOOKS if (REPO / n).exists()]
    missing = [n for n in names if not (REPO / n).exists()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    where = plan(args.limit, args.model, args.results_dir, args.figures_dir, args.output_dir)
    data = args.data_dir or os.environ.get("EARLYEXIT_DATA_DIR") or default_data_dir()
    if data:
        os.environ["EARLYEXIT_DATA_DIR"] = str(data)  # the kernel inherits it; nothing machine-specific is injected
    params = {"figures_dir": str(where["figures"]), "results_dir": str(where["results"]), "recompute": args.recompute}
    params = {k: v for k, v in params.items() if DEFAULTS.get(k) != v}
    if args.model:
        params["model"] = args.model
    if args.limit is not None:
        params["limit"] = args.limit
    t_all = time.time()
    times = []
    for i, name in enumerate(names, 1):
        src = REPO / name
        dst = REPO / where["notebooks"] / name
        t0 = time.time()
        _say(f"[{i}/{len(names)}] {name} with {params or 'its defaults'} -> {os.path.relpath(dst, REPO)}")
        run_notebook(src, dst, params, label=name, progress=not args.quiet)
        times.append((name, time.time() - t0))
        _say(f"{name} done in {_clock(times[-1][1])}")
    _say("all done in " + _clock(time.time() - t_all) + ": " + ", ".join(f"{n} {_clock(t)}" for n, t in times))
    return 0


if __name__ == "__main__":
    sys.exit(main())
