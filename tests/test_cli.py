from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import store_tuned_lens
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


# --- --lens tuned (on a tiny model folder; the tuned lens read from the store, as in a fresh process) --------

PROMPT = "The capital of France is"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store of this test's own (no tuned lens in it)."""
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_lens_tuned_reads_the_stored_tuned_lens(tiny_folder, store, tmp_path, capsys):
    from earlyexit.core.lens import lens_stats
    from earlyexit.core.models import load_model
    from earlyexit.core.tuned_lens import TunedLens, store_dir

    model, tok = load_model(tiny_folder)
    lens = store_tuned_lens(model)
    fresh, _ = load_model(tiny_folder)  # what the command reads: the lens from the store, not one set in memory
    out = tmp_path / "tuned.json"
    assert main(["lens", "--model", tiny_folder, "--prompt", PROMPT, "--lens", "tuned", "--top-k", "3",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    want = lens_stats(fresh, tok, [PROMPT], lens=TunedLens.load(store_dir(fresh), fresh), top_k=3)
    normed = lens_stats(fresh, tok, [PROMPT], lens="normed", top_k=3)
    got = [row["entropy"] for row in data["layers"]]
    assert got == pytest.approx(want.entropy[0, :, 0].tolist(), abs=1e-5)
    assert [row["top_ids"] for row in data["layers"]] == want.top_ids[0, :, 0].tolist()
    assert got[:-1] != pytest.approx(normed.entropy[0, :-1, 0].tolist(), abs=1e-3)  # really the tuned lens
    assert got[-1] == pytest.approx(float(normed.entropy[0, -1, 0]), abs=1e-5)  # entry L: the model's output
    assert data["lens"] == "tuned" and data["meta"]["settings"]["lens"] == "tuned"
    assert data["meta"]["settings"]["lens_fingerprint"] == lens.fingerprint()
    # several lenses: each recorded; the table of each printed
    assert main(["lens", "--model", tiny_folder, "--prompt", PROMPT, "--lens", "normed,tuned", "--json",
                 str(tmp_path / "two.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    assert set(two["lenses"]) == {"normed", "tuned"} and two["meta"]["settings"]["lens"] == "normed"
    assert two["meta"]["settings"]["lenses"]["tuned"]["lens_fingerprint"] == lens.fingerprint()
    capsys.readouterr()
    assert main(["lens", "--model", tiny_folder, "--prompt", PROMPT, "--lens", "tuned"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + fresh.config.num_hidden_layers + 1


def test_lens_tuned_without_a_stored_lens_says_what_to_run(tiny_folder, store, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["lens", "--model", tiny_folder, "--prompt", PROMPT, "--lens", "tuned", "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' loading bar: one line
    assert err.startswith("earlyexit lens: error: No tuned lens for")
    assert f"earlyexit tuned-lens train --model {tiny_folder}" in err
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: not a lens
        main(["lens", "--prompt", "x", "--lens", "normed,tuned2"])


def test_lens_tuned_trained_on_first_use_says_so_first(tiny_folder, store, capsys, monkeypatch):
    """For an embedded model the tuned lens is trained on first use: one note on stderr before it starts."""
    import sys

    import earlyexit.core.tuned_lens as T

    def fake_train(model, tokenizer, settings, **kw):  # the real training is tested in test_tuned_lens.py
        print("TRAINING NOW", file=sys.stderr)
        return T.TunedLens.from_model(model)

    monkeypatch.setattr(T, "_tokenizer_for", lambda model: object())  # as for an embedded model
    monkeypatch.setattr(T, "train_tuned_lens", fake_train)
    assert main(["lens", "--model", tiny_folder, "--prompt", PROMPT, "--lens", "tuned"]) == 0
    err = capsys.readouterr().err
    assert "earlyexit: note: Training the tuned lens of" in err and "on first use" in err
    assert err.index("earlyexit: note: Training") < err.index("TRAINING NOW")
    assert "UserWarning" not in err
    from earlyexit.core.models import load_model

    assert (T.store_dir(load_model(tiny_folder)[0]) / T.CONFIG_FILE).exists()  # saved: the next run reads it
