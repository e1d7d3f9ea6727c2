"""Every notebook executes end to end on a small subset (the ``limit`` parameter), and redraws every figure and
table from the results that run saved (``recompute=False``) without loading a model."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

MODEL = "smollm2-135m"
# Items per notebook in the test run: small, but enough for every cell (e.g. both answer groups).
SMALL = {
    "vis.ipynb": {"limit": 8},
    "Entropy.ipynb": {"limit": 12},
    "classifier.ipynb": {"limit": 60},
    "dola.ipynb": {"limit": 6},
    "early_exit.ipynb": {"limit": 6, "decoder_limit": 2},
    "tuned_lens.ipynb": {"limit": 2, "train_tokens": 1024},  # a quick lens trained for the run, not stored
}
# Gemma-3-270M (the second embedded model, ~5x the lens cost per position): smaller where a notebook allows
GEMMA = "gemma3-270m"
GEMMA_SMALL = {**SMALL, "vis.ipynb": {"limit": 4}, "classifier.ipynb": {"limit": 30}, "dola.ipynb": {"limit": 3},
               "early_exit.ipynb": {"limit": 6, "decoder_limit": 1}}
# the results files each notebook writes (the model in every name)
RESULTS = {
    "vis.ipynb": ["vis_{m}.json"],
    "Entropy.ipynb": ["entropy_{m}.json", "entropy_per_question_{m}.csv"],
    "classifier.ipynb": ["probes_{m}.json"],
    "dola.ipynb": ["dola_mc_{m}.json", "dola_scores_{m}.json", "dola_generate_vanilla_{m}.json",
                   "dola_generate_dola_{m}.json", "dola_generate_sled_{m}.json"],
    "early_exit.ipynb": ["early_exit_{m}.json"],
    "tuned_lens.ipynb": ["tuned_lens_{m}.json"],
}
# Imported by the kernel at start-up (PYTHONPATH): any model load raises, so a redraw that loads one fails.
GUARD = '''
import os
if os.environ.get("EARLYEXIT_FORBID_MODEL"):
    import earlyexit, earlyexit.core.models as _models

    def _refuse(*args, **kwargs):
        raise RuntimeError("a redraw (recompute=False) tried to load a model")

    _models.load_model = earlyexit.load_model = _refuse
'''


def _execute(name: str, out: Path, params: dict) -> tuple[dict, float]:
    from run_notebooks import run_notebook

    t0 = time.monotonic()
    run_notebook(REPO / name, out, params, progress=False)
    return json.loads(out.read_text()), time.monotonic() - t0


def _errors(nb: dict) -> list:
    return [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _text(nb: dict, cell: dict) -> list:
    """The text of a cell's tables and printed lines (images left out)."""
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            out.append("".join(o["text"]))
        elif "data" in o:
            d = o["data"]
            out.append("".join(d.get("text/html") or d.get("text/markdown") or d.get("text/plain") or ""))
    return out


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory):
    """Run a notebook on its subset once per test module: ``(folder, executed notebook, seconds)``."""
    done: dict[tuple[str, str], tuple[Path, dict, float]] = {}

    def run(name: str, model: str = MODEL):
        if (name, model) not in done:
            base = tmp_path_factory.mktemp(f"{Path(name).stem}-{model}")
            params = {"model": model, "figures_dir": str(base / "figures"), "results_dir": str(base / "results"),
                      "recompute": True, **(GEMMA_SMALL if model == GEMMA else SMALL)[name]}
            nb, seconds = _execute(name, base / name, params)
            done[name, model] = (base, nb, seconds)
        return done[name, model]

    return run


def _check_subset_run(name: str, model: str, base: Path, nb: dict) -> None:
    assert not _errors(nb), _errors(nb)[0]["evalue"]
    figures = list((base / "figures").glob("*.png"))
    assert figures, "the notebook exported no figure"
    for png in figures:
        assert png.with_suffix(".pdf").exists(), f"{png.name} has no PDF twin"
        assert png.stem.endswith(f"_{model}"), f"{png.name}: figure names carry the model"
    for pattern in RESULTS[name]:
        assert (base / "results" / pattern.format(m=model)).exists(), f"{pattern} not written"
    kinds = {json.loads(p.read_text()).get("kind") for p in (base / "results").glob("*.json")}
    assert None not in kinds, "every results file has a kind"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_notebook_runs_on_a_subset(name, subset_run):
    if not (REPO / name).exists():
        pytest.skip(f"{name} not written yet")
    base, nb, _ = subset_run(name)
    _check_subset_run(name, MODEL, base, nb)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SMALL if n != "tuned_lens.ipynb"])  # training: minutes on Gemma
def test_notebook_runs_on_gemma(name, subset_run):
    """The same subset on the second embedded model (a base model: no chat template, 262k vocabulary)."""
    base, nb, _ = subset_run(name, GEMMA)
    _check_subset_run(name, GEMMA, base, nb)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_notebook_redraws_from_saved_results(name, subset_run, tmp_path, monkeypatch):
    """``recompute=False`` on the subset run's results: the same figures and tables, no model loaded."""
    if not (REPO / name).exists():
        pytest.skip(f"{name} not written yet")
    base, first, _ = subset_run(name)
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("EARLYEXIT_FORBID_MODEL", "1")
    before = {p: p.stat().st_mtime_ns for p in (base / "results").iterdir() if p.is_file()}
    params = {"model": MODEL, "figures_dir": str(tmp_path / "figures"), "results_dir": str(base / "results"),
              "recompute": False, **SMALL[name]}
    nb, seconds = _execute(name, tmp_path / name, params)
    assert not _errors(nb), _errors(nb)[0]["evalue"]
    printed = "".join(t for c in nb["cells"] for t in _text(nb, c))
    assert "loaded" in printed and "no model loaded" in printed
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == \
        sorted(p.name for p in (base / "figures").iterdir()), "the redraw wrote other figures"
    assert {p: p.stat().st_mtime_ns for p in (base / "results").iterdir() if p.is_file()} == before, \
        "a redraw must not rewrite results"
    # every table and printed line after the first (load-or-compute) cell is the same as in the computing run
    code = lambda n: [c for c in n["cells"] if c["cell_type"] == "code"]
    start = next(i for i, c in enumerate(code(nb)) if "load_or_compute" in "".join(c["source"])) + 1
    for a, b in zip(code(first)[start:], code(nb)[start:]):  # joined: a kernel may split a stream in chunks
        assert "".join(_text(first, a)) == "".join(_text(nb, b)), "".join(a["source"])
    print(f"{name}: redraw in {seconds:.0f} s")
