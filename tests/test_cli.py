from __future__ import annotations

import json
import subprocess
import sys

import pytest

from earlyexit.cli import main


@pytest.mark.slow
def test_lens_json_has_every_layer_and_paris_on_top(tmp_path, smollm2):
    out = tmp_path / "out.json"
    assert main(["lens", "--model", "smollm2-135m", "--prompt", "The capital of France is", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    layers = data["layers"]
    assert [row["layer"] for row in layers] == list(range(31))
    assert set(layers[0]) >= {"layer", "entropy", "top_tokens", "top_probs"}
    assert layers[-1]["top_tokens"][0] == " Paris"
    assert data["meta"]["model"] == "smollm2-135m" and data["meta"]["versions"]["torch"]


@pytest.mark.slow
def test_lens_table_and_bad_layer(capsys, smollm2):
    assert main(["lens", "--prompt", "The capital of France is", "--layers", "29,30", "--top-k", "2"]) == 0
    table = capsys.readouterr().out
    assert "' Paris'" in table and len(table.strip().splitlines()) == 3
    assert main(["lens", "--prompt", "Hi there", "--layers", "31"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_unknown_model_is_a_clear_cli_error(capsys):
    assert main(["lens", "--model", "nonexistent-model", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'nonexistent-model'" in err and "smollm2-135m" in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "earlyexit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "lens" in out.stdout
