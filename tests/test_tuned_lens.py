"""The tuned lens: zero start = logit lens, training lowers held-out KL, files in the tuned-lens package's
layout (round trip, other model, other layer count, corrupt or partial files), training text, resume, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _tiny
from earlyexit.core import store
from earlyexit.core.lenses import get_unembed, resolve_lens
from earlyexit.core.tuned_lens import (CONFIG_FILE, META_FILE, PARAMS_FILE, TrainSettings, TunedLens,
                                       TunedLensConfig, bos_prefix, evaluate_lenses, fit_least_squares,
                                       hidden_states, make_windows, set_tuned_lens, store_dir, text_windows,
                                       train_tuned_lens, tuned_lens_for, unembedding_hash)

# Ordinary sentences for the tiny models (the real corpus is tested on its own below).
SENTENCES = [
    "The river runs past the old mill and the children watch the water turn the wheel.",
    "In the morning the baker opens the shop and the smell of bread fills the street.",
    "A letter arrived from the north, written in a careful hand and sealed with wax.",
    "They walked along the coast for three days before they saw the lighthouse.",
    "The committee met again on Tuesday and agreed to publish the report in spring.",
    "Her garden was small, but every corner of it held something worth looking at.",
    "When the storm had passed, the village counted its losses and began to rebuild.",
    "He kept a notebook of every bird he saw, with the date, the place and the weather.",
]
TEXTS = [" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(12)) for i in range(24)]


def _peaked(kind: str = "llama", seed: int = 0):
    """A tiny model whose head is scaled up, so that its layers' distributions differ (a random tiny
    model's are all near uniform, and so is its KL)."""
    model = _tiny(kind)
    with torch.no_grad():
        torch.manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # a different model per seed
        get_unembed(model).head.weight.mul_(20.0)
    model.earlyexit_name = f"tiny-{kind}-peaked-{seed}"
    return model


def _heldout_kl(model, lens, windows) -> np.ndarray:
    return evaluate_lenses(model, {"t": lens}, windows)["t"].mean("kl")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- the lens itself --------------------------------------------------------------------------------

def test_zero_init_is_the_logit_lens(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Spain is")["input_ids"]])
    hs = hidden_states(model, ids)
    L = get_unembed(model).n_layers
    entries = list(range(L + 1))
    hidden = torch.stack([h[0] for h in hs])  # [E, T, d]
    tuned, logit = TunedLens.from_model(model), resolve_lens(model, "normed")
    a, b = tuned.logits(hidden, entries), logit.logits(hidden, entries)
    assert (a - b).abs().max().item() <= 1e-6
    for e in (0, L // 2, L):  # the tuned-lens call convention too
        assert (tuned(hidden[e], e) - logit(hidden[e], e)).abs().max().item() <= 1e-6


def test_entry_L_is_the_model_output(tiny):
    model, tok = tiny
    ids = torch.tensor([tok("A small test of the final entry.")["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for t in lens.layer_translators:  # a non-zero lens: entry L still reads the model's own logits
            t.weight.normal_(0, 0.1)
    L = lens.n_layers
    got = lens.logits(out.hidden_states[L][0][None], [L])[0]
    assert torch.allclose(got, out.logits[0].float(), atol=1e-5, rtol=1e-5)


def test_transform_is_residual_affine(tiny_llama):
    model, _ = tiny_llama
    lens = TunedLens.from_model(model)
    d = lens.unembed.hidden_size
    with torch.no_grad():
        lens.layer_translators[1].weight.copy_(torch.eye(d))
        lens.layer_translators[1].bias.fill_(0.5)
    h = torch.randn(3, d)
    assert torch.allclose(lens.transform_hidden(h, 1), 2 * h + 0.5)
    assert torch.equal(lens.transform_hidden(h, 0), h)


def test_resolve_tuned_uses_the_set_lens(tiny_llama):
    model, _ = tiny_llama
    lens = TunedLens.from_model(model)
    set_tuned_lens(model, lens)
    try:
        assert resolve_lens(model, "tuned") is lens
        assert lens.name == "tuned"
    finally:
        object.__delattr__(model, "_earlyexit_tuned_lens")
    with pytest.raises(ValueError, match="another model"):
        set_tuned_lens(_tiny("llama"), lens)


# --- training ---------------------------------------------------------------------------------------

def test_training_lowers_heldout_kl(tokenizer):
    model = _peaked("llama")
    windows = text_windows(tokenizer, seq_len=64, texts=TEXTS)
    heldout = windows[-3:]
    zero = TunedLens.from_model(model)
    before = _heldout_kl(model, zero, heldout)
    log: list = []
    lens = train_tuned_lens(model, tokenizer, TrainSettings(tokens=64 * 16, seq_len=64, tokens_per_step=128,
                                                            lr_scale=1.0, init="zero"),
                            texts=TEXTS[:-4], progress=False, log=log)
    after = _heldout_kl(model, lens, heldout)
    L = lens.n_layers
    assert len(log) == 8 and all(np.isfinite(h["kl"]) for h in log)
    assert after[:L].mean() < 0.8 * before[:L].mean()
    assert after[L] == pytest.approx(0.0, abs=1e-5) and before[L] == pytest.approx(0.0, abs=1e-5)
    assert lens.meta["trained"]["settings"]["tokens"] == 64 * 16
    assert not any(p.requires_grad is False for p in model.parameters())  # unfrozen again


def test_least_squares_start_beats_the_logit_lens(tokenizer):
    model = _peaked("llama", seed=1)
    windows = text_windows(tokenizer, seq_len=64, texts=TEXTS)
    lens = fit_least_squares(model, TunedLens.from_model(model), windows[:-3])
    before = _heldout_kl(model, TunedLens.from_model(model), windows[-3:])
    after = _heldout_kl(model, lens, windows[-3:])
    L = lens.n_layers
    assert after[:L].mean() < before[:L].mean()


@pytest.mark.parametrize("kind", ["gemma", "gpt2"])
def test_training_runs_on_softcapped_and_tied_heads(tokenizer, kind):
    model = _peaked(kind)
    log: list = []
    lens = train_tuned_lens(model, tokenizer, TrainSettings(tokens=128, seq_len=64, tokens_per_step=64,
                                                            init="lstsq", init_tokens=128),
                            texts=TEXTS[:6], progress=False, log=log)
    assert [h["step"] for h in log] == [0, 1, 2]
    assert all(torch.isfinite(p).all() for p in lens.translator_parameters())
    assert any(p.abs().sum() > 0 for p in lens.translator_parameters())


def test_kl_gradient_matches_autograd(tiny):
    from earlyexit.core.tuned_lens import _kl_grad, _Target, _fast_path

    model, _ = tiny
    u = get_unembed(model)
    torch.manual_seed(3)
    final, z = torch.randn(5, u.hidden_size) * 3, (torch.randn(5, u.hidden_size) * 3).requires_grad_(True)
    logp = torch.log_softmax(u(final, normed=False), -1)
    ref = (logp.exp() * (logp - torch.log_softmax(u(z, normed=False), -1))).sum(-1)
    g, = torch.autograd.grad(ref.sum(), z)
    for fast in {False, _fast_path(u)}:
        with torch.no_grad():
            dz, kl = _kl_grad(z, _Target(u, final, fast), u, u.head.weight.detach().float())
        assert torch.allclose(kl, ref.detach(), atol=1e-4)
        assert torch.allclose(dz, g, atol=1e-6, rtol=1e-4)


def test_training_resumes_from_its_checkpoint(tokenizer, tmp_path):
    settings = TrainSettings(tokens=64 * 8, seq_len=64, tokens_per_step=64, checkpoint_every=1, init="zero")
    full = train_tuned_lens(_peaked("llama", seed=2), tokenizer, settings, texts=TEXTS, progress=False)

    class Interrupt(list):
        def append(self, item):
            super().append(item)
            if len(self) == 3:
                raise KeyboardInterrupt

    ck = tmp_path / "ck.pt"
    model = _peaked("llama", seed=2)
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(model, tokenizer, settings, texts=TEXTS, progress=False, checkpoint=ck, log=Interrupt())
    assert ck.exists()
    log: list = []
    resumed = train_tuned_lens(model, tokenizer, settings, texts=TEXTS, progress=False, checkpoint=ck, log=log)
    assert [h["step"] for h in log] == [3, 4, 5, 6, 7, 8]  # steps 1–2 came from the checkpoint
    assert not ck.exists()
    for a, b in zip(full.translator_parameters(), resumed.translator_parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_token_budgets_and_short_text(tokenizer):
    model = _tiny("llama")
    for bad in (0, -5):
        with pytest.raises(ValueError, match="positive number of training tokens"):
            train_tuned_lens(model, tokenizer, TrainSettings(tokens=bad), texts=TEXTS, progress=False)
    with pytest.raises(ValueError, match="too short"):
        train_tuned_lens(model, tokenizer, TrainSettings(tokens=64 * 1000, seq_len=64, tokens_per_step=64, init="zero"),
                         texts=TEXTS[:2], progress=False)
    with pytest.raises(ValueError, match="too short"):
        train_tuned_lens(model, tokenizer, TrainSettings(tokens=64, seq_len=64, tokens_per_step=64, init_tokens=64),
                         texts=["Too short."], progress=False)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        TrainSettings(tokens=100, seq_len=64, tokens_per_step=100).validate()


def test_windows_carry_the_bos_prefix(tokenizer):
    w = make_windows(np.arange(100, dtype=np.int32), 10, [7])
    assert w.shape == (11, 10) and (w[:, 0] == 7).all() and w[1, 1] == 9
    assert bos_prefix(tokenizer) == []  # SmolLM2 adds no BOS


# --- files ------------------------------------------------------------------------------------------

def _trained_like(model, seed: int = 0) -> TunedLens:
    lens = TunedLens.from_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lens.translator_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lens


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    model, _ = tiny
    lens = _trained_like(model)
    lens.save(tmp_path / "lens")
    back = TunedLens.load(tmp_path / "lens", model)
    for a, b in zip(lens.translator_parameters(), back.translator_parameters()):
        assert torch.equal(a, b)
    h = torch.randn(get_unembed(model).n_layers + 1, 4, get_unembed(model).hidden_size)
    entries = list(range(h.shape[0]))
    assert torch.equal(lens.logits(h, entries), back.logits(h, entries))
    assert back.fingerprint() == lens.fingerprint()


def test_files_are_in_the_tuned_lens_package_layout(tiny_llama, tmp_path):
    model, _ = tiny_llama
    _trained_like(model).save(tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / CONFIG_FILE).read_text())
    assert set(config) == {"base_model_name_or_path", "d_model", "num_hidden_layers", "bias",
                           "base_model_revision", "unembed_hash", "lens_type"}
    assert config["lens_type"] == "linear_tuned_lens" and config["num_hidden_layers"] == 4 and config["d_model"] == 32
    assert config["unembed_hash"] == unembedding_hash(get_unembed(model))
    state = torch.load(tmp_path / "lens" / PARAMS_FILE, weights_only=True)
    assert sorted(state) == sorted(f"{i}.{k}" for i in range(4) for k in ("weight", "bias"))
    assert state["0.weight"].shape == (32, 32) and state["3.bias"].shape == (32,)


def test_loads_a_lens_written_in_the_package_format(tiny_llama, tmp_path):
    """A folder as the package's ``TunedLens.save`` writes it: a ModuleList state dict and the config."""
    model, _ = tiny_llama
    d, L = 32, 4
    translators = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(L)])
    folder = tmp_path / "pkg"
    folder.mkdir()
    torch.save(translators.state_dict(), folder / "params.pt")
    (folder / "config.json").write_text(json.dumps(
        {"base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": L, "bias": True,
         "base_model_revision": None, "unembed_hash": unembedding_hash(get_unembed(model)),
         "lens_type": "linear_tuned_lens"}))
    lens = TunedLens.load(folder, model)
    h = torch.randn(5, d)
    assert torch.allclose(lens.transform_hidden(h, 2), h + translators[2](h).detach())
    (folder / "config.json").write_text(json.dumps({"base_model_name_or_path": "x", "d_model": d,
                                                    "num_hidden_layers": L, "unembed_hash": "0" * 64}))
    with pytest.raises(ValueError, match="another model"):
        TunedLens.load(folder, model)
    with pytest.warns(UserWarning, match="another model"):
        TunedLens.load(folder, model, strict=False)


def test_round_trip_with_the_tuned_lens_package(tiny_llama, tmp_path):
    """Against ``tuned-lens`` 0.2.0 itself, where it is installed (it installs beside torch 2.13 and
    transformers 5.23 without changing them; see bench/README or the report)."""
    nn_lenses = pytest.importorskip("tuned_lens.nn.lenses")
    model, _ = tiny_llama
    ours = _trained_like(model)
    ours.save(tmp_path / "ours")
    theirs = nn_lenses.TunedLens.from_model_and_pretrained(model, str(tmp_path / "ours"))
    h = torch.randn(6, 32)
    for e in range(4):
        assert torch.allclose(theirs(h, e), ours(h, e), atol=1e-5)
    theirs.save(tmp_path / "theirs")
    back = TunedLens.load(tmp_path / "theirs", model)
    for a, b in zip(ours.translator_parameters(), back.translator_parameters()):
        assert torch.equal(a, b)


def test_other_model_and_other_layer_count_are_refused(tiny_llama, tmp_path):
    model, _ = tiny_llama
    _trained_like(model).save(tmp_path / "lens")
    other = _peaked("llama", seed=5)  # same shapes, other weights
    with pytest.raises(ValueError, match="trained for another model"):
        TunedLens.load(tmp_path / "lens", other)
    from transformers import LlamaConfig, LlamaForCausalLM

    shallow = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match="4 layers.*this model has 2"):
        TunedLens.load(tmp_path / "lens", shallow)


def test_corrupt_and_partial_files_are_refused(tiny_llama, tmp_path):
    model, _ = tiny_llama
    folder = tmp_path / "lens"
    _trained_like(model).save(folder)
    blob = (folder / PARAMS_FILE).read_bytes()
    (folder / PARAMS_FILE).write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or was partly written"):
        TunedLens.load(folder, model)
    (folder / META_FILE).unlink()  # no checksum to compare: torch.load itself fails
    with pytest.raises(ValueError, match="corrupt or truncated"):
        TunedLens.load(folder, model)
    (folder / PARAMS_FILE).unlink()
    with pytest.raises(ValueError, match="incomplete: params.pt missing"):
        TunedLens.load(folder, model)
    _trained_like(model).save(folder)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="config .* is corrupt"):
        TunedLens.load(folder, model)
    _trained_like(model).save(folder)
    state = torch.load(folder / PARAMS_FILE, weights_only=True)
    del state["3.bias"]
    torch.save(state, folder / PARAMS_FILE)
    (folder / META_FILE).unlink()
    with pytest.raises(ValueError, match="missing \\['3.bias'\\]"):
        TunedLens.load(folder, model)
    with pytest.raises(FileNotFoundError):
        TunedLens.load(tmp_path / "nowhere", model)


def test_store_caches_the_lens_per_model(tokenizer, cache):
    model = _peaked("llama", seed=7)
    settings = TrainSettings(tokens=128, seq_len=64, tokens_per_step=64, init="zero")
    with pytest.raises(FileNotFoundError, match="No tuned lens"):
        tuned_lens_for(model)  # not an embedded model, no tokenizer: nothing to train with
    with pytest.warns(UserWarning, match="on first use"):
        trained = tuned_lens_for(model, tokenizer, settings=settings, progress=False, texts=TEXTS)
    assert resolve_lens(model, "tuned") is trained
    assert (store_dir(model) / CONFIG_FILE).exists() and str(store_dir(model)).startswith(str(cache))
    again = _peaked("llama", seed=7)  # a new object of the same weights reads the store
    loaded = tuned_lens_for(again, train=False)
    assert loaded.fingerprint() == trained.fingerprint()


# --- evaluation -------------------------------------------------------------------------------------

def test_evaluation_metrics(tiny_llama):
    model, tok = tiny_llama
    windows = text_windows(tok, seq_len=32, texts=TEXTS[:3])[:3]
    ev = evaluate_lenses(model, [resolve_lens(model, "normed")], windows)["normed"]
    L = get_unembed(model).n_layers
    assert ev.kl.shape == (3, L + 1) and ev.tokens == 3 * 31
    assert ev.mean("kl")[L] == pytest.approx(0.0, abs=1e-5) and ev.mean("top1")[L] == 1.0
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(windows)).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           torch.as_tensor(windows)[:, 1:].reshape(-1))
    assert ev.mean("ce")[L] == pytest.approx(float(ce), rel=1e-4)
    lo, hi = ev.ci("entropy")
    assert (lo <= ev.mean("entropy") + 1e-9).all() and (ev.mean("entropy") <= hi + 1e-9).all()
    doc = ev.to_dict()
    assert set(doc) >= {"kl", "ce", "top1", "entropy", "layers", "tokens"}
    with pytest.raises(ValueError, match="windows must be"):
        evaluate_lenses(model, [resolve_lens(model, "normed")], np.zeros((0, 5)))


def test_report_tables_and_figures(tokenizer, tmp_path):
    from earlyexit.core.results import ResultFile
    from earlyexit.reports import tuned_lens as report

    model = _peaked("llama", seed=3)
    lens = _trained_like(model)
    windows = text_windows(tokenizer, seq_len=32, texts=TEXTS[:2])[:3]
    res = report.build(model, tokenizer, lens, windows, parameters={"model": "tiny-llama", "limit": 3,
                                                                     "prompt": "The capital of France is"})
    path = res.save(tmp_path / "results" / report.TunedLensResults.filename("tiny-llama"))
    back = report.TunedLensResults.load(path)
    assert isinstance(ResultFile.load(path), report.TunedLensResults)
    assert list(report.table(back).columns)[:2] == ["kl_logit", "kl_tuned"]
    assert "every entry 0..L-1" in report.summary(back)
    assert len(back["trajectory"]["tuned"]["top_tokens"]) == 5  # entries 0..4
    report.plot_metrics(back, tmp_path / "figures")
    report.plot_trajectory(back, tmp_path / "figures")
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert names == ["tuned_lens_metrics_tiny-llama.pdf", "tuned_lens_metrics_tiny-llama.png",
                     "tuned_lens_trajectory_tiny-llama.pdf", "tuned_lens_trajectory_tiny-llama.png"]


# --- the corpus -------------------------------------------------------------------------------------

def _corpus_or_skip():
    from earlyexit.studies.corpus import load_corpus

    try:
        return load_corpus()
    except FileNotFoundError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))


def test_corpus_is_large_held_out_and_free_of_the_eval_items(tokenizer):
    corpus = _corpus_or_skip()
    assert not set(corpus.train) & set(corpus.heldout)
    assert corpus.n_words("train") > 700_000 and corpus.n_words("heldout") > 20_000
    train, held = corpus.tokens(tokenizer, "train"), corpus.tokens(tokenizer, "heldout")
    assert len(train) >= 1_000_000 and len(held) >= 50_000
    text = " ".join(corpus.texts("heldout")[:3])
    assert "Python" in text
    # never the studies' items: no TruthfulQA question appears in it
    from earlyexit.studies.data import load_truthfulqa

    try:
        questions = [q.question for q in load_truthfulqa()][:100]
    except FileNotFoundError:
        questions = []
    joined = "\n".join(corpus.texts("train"))
    assert not any(q in joined for q in questions)


def test_missing_corpus_names_the_install_step(tmp_path, monkeypatch):
    from earlyexit.studies.corpus import find_doc_dir

    monkeypatch.setenv("EARLYEXIT_CORPUS_DIR", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="apt-get install python3-doc"):
        find_doc_dir()


def test_prose_filter():
    from earlyexit.studies.corpus import is_prose, page_paragraphs

    html = ("<html><body><p>This paragraph is ordinary prose and long enough to be kept by the filter.</p>"
            "<pre>for i in range(10): print(i) # a code block that is not prose at all</pre>"
            "<p>x = {'a': [1, 2, 3], 'b': (4, 5)}; y = x['a'][0] ** 2 / 3 + 1 - 7</p></body></html>")
    assert page_paragraphs(html) == ["This paragraph is ordinary prose and long enough to be kept by the filter."]
    assert not is_prose("short")


# --- the command line -------------------------------------------------------------------------------

def test_cli_refuses_bad_tokens(capsys):
    from earlyexit.cli import main

    assert main(["tuned-lens", "train", "--model", "smollm2-135m", "--tokens", "0", "--out", "x"]) == 2
    assert "positive number of training tokens" in capsys.readouterr().err


def test_cli_trains_with_the_models_recipe_and_flags_override_it():
    import argparse

    from earlyexit.cli import tuned_lens as cli
    from earlyexit.core.tuned_lens import RECIPES, TrainSettings, default_settings

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    read = lambda *extra: cli._settings(parser.parse_args(["tuned-lens", "train", "--out", "x", *extra]))
    assert read("--model", "smollm2-135m") == TrainSettings()
    assert read("--model", "gemma3-270m").lr_scale == RECIPES["gemma3-270m"]["lr_scale"] != TrainSettings().lr_scale
    assert read("--model", "gemma3-270m", "--lr-scale", "0.5").lr_scale == 0.5
    assert default_settings("some/hub-model") == TrainSettings()


def test_features_cache_key_carries_the_tuned_lens():
    from earlyexit.studies.features import FeatureSettings, chunk_key

    s = FeatureSettings(lens="tuned")
    a = chunk_key("fp", "prompted", ["p"], [1], "lens", s, lens_fingerprint="aaa")
    b = chunk_key("fp", "prompted", ["p"], [1], "lens", s, lens_fingerprint="bbb")
    assert a != b
    n = FeatureSettings()
    assert chunk_key("fp", "prompted", ["p"], [1], "lens", n) == chunk_key("fp", "prompted", ["p"], [1], "lens", n,
                                                                           lens_fingerprint=None)
