"""Execute the project's notebooks headless with papermill (the main job).

    python scripts/run_notebooks.py                      # every notebook, full data, in place
    python scripts/run_notebooks.py --limit 20           # a quick subset
    python scripts/run_notebooks.py --model gemma3-270m vis.ipynb

Notebooks read their parameters from a cell tagged ``parameters``: ``model``, ``limit`` (None = all
data), ``data_dir``, ``figures_dir``, ``results_dir``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

NOTEBOOKS = ("vis.ipynb", "Entropy.ipynb", "classifier.ipynb", "dola.ipynb")
REPO = Path(__file__).resolve().parents[1]


def run_notebook(path: Path, output: Path, parameters: dict, cwd: Path = REPO, timeout: int | None = None) -> None:
    import papermill as pm

    from earlyexit.atomic import atomic_path

    with atomic_path(output, suffix=".ipynb") as tmp:
        pm.execute_notebook(str(path), str(tmp), parameters=parameters, cwd=str(cwd), kernel_name="python3",
                            progress_bar=False, request_save_on_cell_execute=False, execution_timeout=timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help=f"default: those of {NOTEBOOKS} that exist")
    parser.add_argument("--model", default=None)
    parser.add_argument("--limit", type=int, default=None, help="items per notebook (default: the full data)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--figures-dir", default="figures")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--output-dir", default=None, help="write executed notebooks here instead of in place")
    args = parser.parse_args(argv)
    names = args.notebooks or [n for n in NOTEBOOKS if (REPO / n).exists()]
    params = {"figures_dir": args.figures_dir, "results_dir": args.results_dir}
    if args.model:
        params["model"] = args.model
    if args.limit is not None:
        params["limit"] = args.limit
    if args.data_dir or os.environ.get("EARLYEXIT_DATA_DIR"):
        params["data_dir"] = args.data_dir or os.environ["EARLYEXIT_DATA_DIR"]
    for name in names:
        src = REPO / name
        dst = Path(args.output_dir) / name if args.output_dir else src
        t0 = time.time()
        print(f"[run_notebooks] {name} with {params}", flush=True)
        run_notebook(src, dst, params)
        print(f"[run_notebooks] {name} done in {time.time() - t0:.0f} s -> {dst}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
