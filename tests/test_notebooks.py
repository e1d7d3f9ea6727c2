"""Every notebook executes end to end on a small subset (the ``limit`` parameter)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# Items per notebook in the test run: small, but enough for every cell (e.g. both answer groups).
SMALL = {
    "vis.ipynb": {"limit": 8},
    "Entropy.ipynb": {"limit": 12},
    "classifier.ipynb": {"limit": 60},
    "dola.ipynb": {"limit": 6},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMALL))
def test_notebook_runs_on_a_subset(name, tmp_path, data_dir):
    if not (REPO / name).exists():
        pytest.skip(f"{name} not written yet")
    from run_notebooks import run_notebook

    params = {"model": "smollm2-135m", "data_dir": str(data_dir), "figures_dir": str(tmp_path / "figures"),
              "results_dir": str(tmp_path / "results"), **SMALL[name]}
    out = tmp_path / name
    run_notebook(REPO / name, out, params)
    nb = json.loads(out.read_text())
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    figures = list((tmp_path / "figures").glob("*.png"))
    assert figures, "the notebook exported no figure"
    for png in figures:
        assert png.with_suffix(".pdf").exists(), f"{png.name} has no PDF twin"
