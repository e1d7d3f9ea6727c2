"""Feature extraction, its cache, the topic splits and the probes (tiny models; one slow test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from earlyexit.studies.data import Statement, load_true_false
from earlyexit.studies.features import (FeatureSettings, Features, chunk_key, extract_features, lens_projection)
from earlyexit.core.store import model_fingerprint, read_npz, write_npz
from earlyexit.core.lenses import LogitLens, get_unembed
from earlyexit.studies.probes import (SIX_TOPICS, MLPConfig, condition_report, fit_layers, leave_one_topic_out,
                              lm_next_token, lm_token_prob, majority_vote, metrics, original_split, tap_layers,
                              topic_split, train_logreg, train_mlp, check_taps)


def _statements(n_per_topic: int = 3) -> list[Statement]:
    return load_true_false(SIX_TOPICS, limit_per_topic=n_per_topic)


# --- features -------------------------------------------------------------------------------------

@pytest.mark.parametrize("condition", ["prompted", "bare"])
def test_batched_features_equal_one_at_a_time(tiny_llama, condition):
    model, tok = tiny_llama
    st = _statements(2)
    a = extract_features(model, tok, st, condition, batch_size=8, use_cache=False)
    b = extract_features(model, tok, st, condition, batch_size=1, use_cache=False)
    L = get_unembed(model).n_layers
    assert a.hidden.shape == (len(st), L + 1, 32) and a.lens.shape == (len(st), L + 1, 256)
    np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4)
    np.testing.assert_allclose(a.lens, b.lens, atol=1e-3)
    np.testing.assert_array_equal(a.top1, b.top1)
    # the features are those of the prompt's last token: compare with a plain forward pass
    from earlyexit.studies.prompts import statement_prompt
    ids = tok(statement_prompt(st[3].statement, condition), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(a.hidden[3], torch.stack([h[0, -1] for h in hs]).numpy(), atol=1e-4)


def test_lens_feature_is_a_projection_of_the_log_probs(tiny):
    model, _ = tiny
    u = get_unembed(model)
    entries = list(range(u.n_layers + 1))
    torch.manual_seed(0)
    h = torch.randn(len(entries), 5, u.hidden_size)
    s = FeatureSettings(proj_dim=16)
    fast = lens_projection(LogitLens(u), h, entries, s)
    slow = lens_projection(LogitLens(u), h, entries, s, fold=False)
    from earlyexit.studies.features import projection_matrix
    ref = (torch.log_softmax(LogitLens(u).logits(h, entries), -1) @ projection_matrix(u.vocab_size, 16, 0))
    torch.testing.assert_close(slow, ref.transpose(0, 1), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(fast, slow, atol=1e-3, rtol=1e-4)


def test_warm_run_reads_the_cache(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    st = _statements(2)
    cold = extract_features(model, tok, st, "prompted", cache_dir=tmp_path, chunk_size=5)
    assert cold.stats["misses"] == cold.stats["chunks"] == 3
    import earlyexit.studies.features as F

    def boom(*a, **k):
        raise AssertionError("the model ran on a warm cache")

    monkeypatch.setattr(F, "_run_chunk", boom)
    warm = extract_features(model, tok, st, "prompted", cache_dir=tmp_path, chunk_size=5)
    assert warm.stats["hits"] == 3
    np.testing.assert_array_equal(cold.hidden, warm.hidden)
    np.testing.assert_array_equal(cold.lens, warm.lens)
    np.testing.assert_array_equal(cold.word_logprobs, warm.word_logprobs)


def test_cache_invalidated_by_model_prompt_data_and_settings(tiny_llama, tmp_path):
    model, tok = tiny_llama
    st = _statements(1)
    fp = model_fingerprint(model)
    prompts = [s.statement for s in st]
    labels = [s.label for s in st]
    base = chunk_key(fp, "prompted", prompts, labels, "hidden", FeatureSettings())
    assert base == chunk_key(fp, "prompted", prompts, labels, "hidden", FeatureSettings())
    assert base != chunk_key(fp, "bare", prompts, labels, "hidden", FeatureSettings())            # prompt
    assert base != chunk_key(fp, "prompted", prompts[:-1] + ["x"], labels, "hidden", FeatureSettings())  # data
    assert base != chunk_key(fp, "prompted", prompts, labels[:-1] + [1 - labels[-1]], "hidden", FeatureSettings())
    lens = chunk_key(fp, "prompted", prompts, labels, "lens", FeatureSettings())
    assert lens != chunk_key(fp, "prompted", prompts, labels, "lens", FeatureSettings(proj_seed=1))  # settings
    # a different model (same architecture, other weights) gets other files
    from conftest import _tiny
    other = _tiny("llama")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert model_fingerprint(other) != fp
    extract_features(model, tok, st, "prompted", cache_dir=tmp_path)
    again = extract_features(other, tok, st, "prompted", cache_dir=tmp_path)
    assert again.stats["misses"] == 1
    # a different prompt text (the same statements) misses too
    import earlyexit.studies.features as F
    orig = F.statement_prompt
    try:
        F.statement_prompt = lambda s, c: "Statement: " + orig(s, c)
        changed = extract_features(model, tok, st, "prompted", cache_dir=tmp_path)
    finally:
        F.statement_prompt = orig
    assert changed.stats["misses"] == 1


def test_half_written_cache_file_is_never_read(tiny_llama, tmp_path):
    model, tok = tiny_llama
    st = _statements(1)
    cold = extract_features(model, tok, st, "bare", cache_dir=tmp_path, kinds=["hidden"])
    files = sorted(tmp_path.rglob("hidden-*.npz"))
    assert len(files) == 1
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # killed mid-write
    with pytest.warns(UserWarning, match="Ignoring"):
        again = extract_features(model, tok, st, "bare", cache_dir=tmp_path, kinds=["hidden"])
    assert again.stats["misses"] == 1
    np.testing.assert_allclose(again.hidden, cold.hidden, atol=1e-5)
    # and a complete file under another key (e.g. renamed) is rejected as well
    path = tmp_path / "x.npz"
    write_npz(path, "key-a", {"hidden": np.zeros((2, 3, 4), np.float32)})
    assert read_npz(path, "key-a", rows=2) is not None
    with pytest.warns(UserWarning):
        assert read_npz(path, "key-b", rows=2) is None
    with pytest.warns(UserWarning):
        assert read_npz(path, "key-a", rows=3) is None
    # nothing but the final file is left beside it (the temporary file was renamed)
    assert [p.name for p in tmp_path.glob(".*")] == []


def test_unknown_feature_kind_and_condition(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="Unknown feature kind 'logits'"):
        extract_features(model, tok, _statements(1), kinds=["logits"], use_cache=False)
    with pytest.raises(ValueError, match="Unknown condition"):
        extract_features(model, tok, _statements(1), "chat", use_cache=False)
    f = Features(layers=[0], labels=np.zeros(1), topics=["cities"], top1=np.zeros(1), word_logprobs=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="was not extracted"):
        f.get("lens")
    with pytest.raises(ValueError, match="Unknown feature kind"):
        f.get("attention")


# --- splits ---------------------------------------------------------------------------------------

def test_splits_never_mix_topics():
    topics = [s.topic for s in _statements(4)]
    sp = original_split(topics)
    assert {topics[i] for i in sp.test_idx} == {"cities"}
    assert {topics[i] for i in sp.train_idx} == {"animals", "companies", "elements", "facts", "inventions"}
    splits = leave_one_topic_out(topics)
    assert [s.test_topics for s in splits] == [(t,) for t in SIX_TOPICS]
    for s in splits:
        train_t = {topics[i] for i in s.train_idx}
        test_t = {topics[i] for i in s.test_idx}
        assert test_t == set(s.test_topics) and not (train_t & test_t)
        assert len(s.train_idx) + len(s.test_idx) == len(topics)


def test_split_errors():
    topics = ["animals", "cities"]
    with pytest.raises(ValueError, match="Unknown topic 'dogs'"):
        topic_split(topics, ["dogs"], ["cities"])
    with pytest.raises(ValueError, match="Empty training split"):
        topic_split(topics, ["facts"], ["cities"])
    with pytest.raises(ValueError, match="both the training and the test"):
        topic_split(topics, ["cities"], ["cities"])
    with pytest.raises(ValueError, match="Empty training split"):
        train_mlp(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match="both labels"):
        train_logreg(np.zeros((4, 3)), np.ones(4, dtype=int))


def test_tap_layers():
    assert tap_layers(32) == [16, 20, 24]  # the original's layers
    assert tap_layers(30) == [15, 19, 23]
    with pytest.raises(IndexError, match="Tap layer 31 out of range"):
        check_taps([15, 31], 31)
    with pytest.raises(IndexError, match="out of range"):
        check_taps([-1], 31)


# --- probes ---------------------------------------------------------------------------------------

def _toy(n=240, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    topics = np.array(["animals", "companies", "elements", "facts", "inventions", "cities"])[np.arange(n) % 6]
    return x, y, topics


def test_standardisation_uses_training_rows_only():
    x, y, topics = _toy()
    sp = original_split(topics)
    x = x.copy()
    x[sp.test_idx] += 1000.0  # test rows far away: any leakage would move the scaler's mean
    pipe = train_logreg(x[sp.train_idx], y[sp.train_idx])
    scaler = pipe[0]
    np.testing.assert_allclose(scaler.mean_, x[sp.train_idx].mean(0), rtol=1e-5)
    from earlyexit.studies.probes import fit_probe

    res = fit_probe("logreg", x, y, sp)
    ref = train_logreg(x[sp.train_idx], y[sp.train_idx]).predict_proba(x.astype(np.float64))[:, 1]
    np.testing.assert_allclose(res.proba, ref)
    # the MLP's own standardiser too
    probe = train_mlp(x[sp.train_idx], y[sp.train_idx], MLPConfig(standardize=True, epochs=1))
    np.testing.assert_allclose(probe.scalers[0].mean, x[sp.train_idx].mean(0), rtol=1e-5)


def test_mlp_deterministic_and_stack_equals_alone():
    x, y, _ = _toy()
    cfg = MLPConfig(epochs=2)
    a = train_mlp(x, y, cfg).predict_proba(x)
    b = train_mlp(x, y, cfg).predict_proba(x)
    np.testing.assert_array_equal(a, b)
    c = train_mlp(x, y, MLPConfig(epochs=2, seed=1)).predict_proba(x)
    assert not np.allclose(a, c)
    stack = np.stack([x, x[:, ::-1]], axis=1)  # two "layers"
    both = train_mlp(stack, y, cfg, init_seeds=[0, 7]).predict_proba(stack)
    alone = train_mlp(x[:, ::-1].copy(), y, cfg, init_seeds=[7]).predict_proba(x[:, ::-1].copy())
    np.testing.assert_allclose(both[:, 1], alone, atol=1e-5)
    np.testing.assert_allclose(both[:, 0], a, atol=1e-5)
    assert (a > 0.5).astype(int).tolist() != [0] * len(a)  # it learned something


def test_metrics_and_baselines(tokenizer):
    x, y, topics = _toy()
    sp = original_split(topics)
    m = metrics(sp, y, y.copy(), np.where(y == 1, 0.9, 0.1))
    assert m["test_acc"] == 1.0 and m["test_auroc"] == 1.0
    assert m["test_loss"] == pytest.approx(-np.log(0.9))  # mean per test row, not per train batch
    assert m["test_acc_low"] <= m["test_acc"] <= m["test_acc_high"]
    wrong = metrics(sp, y, np.full_like(y, -1))
    assert wrong["test_acc"] == 0.0
    ids = [tokenizer(" true", add_special_tokens=False)["input_ids"][0],
           tokenizer(" false", add_special_tokens=False)["input_ids"][0],
           tokenizer(" the", add_special_tokens=False)["input_ids"][0]]
    assert lm_next_token(np.array(ids), tokenizer).tolist() == [1, 0, -1]
    pred, p = lm_token_prob(np.log([[0.3, 0.1], [0.1, 0.2]]))
    assert pred.tolist() == [1, 0] and p[0] == pytest.approx(0.75)


def test_majority_vote():
    x, y, topics = _toy()
    sp = original_split(topics)
    from earlyexit.studies.probes import ProbeResult

    probs = [np.where(y == 1, 0.9, 0.1), np.where(y == 1, 0.8, 0.2), np.full(len(y), 0.9)]
    rs = [ProbeResult("mlp", i, p) for i, p in enumerate(probs)]
    vote = majority_vote(rs, y, sp)
    assert vote.metrics["test_acc"] == 1.0
    with pytest.raises(ValueError, match="odd"):
        majority_vote(rs[:2], y, sp)


def test_condition_report_on_a_tiny_model(tiny_llama):
    model, tok = tiny_llama
    st = _statements(6)
    feats = extract_features(model, tok, st, "prompted", use_cache=False)
    rep = condition_report(feats, tok, taps=[1, 2, 3], n_boot=50)
    table = rep["original"]["table"]
    assert table[0]["method"] == "LM next token" and table[1]["method"] == "LM token prob."
    assert {r["kind"] for r in rep["original"]["curves"]} == {"hidden", "lens"}
    assert len(rep["original"]["curves"]) == 2 * 2 * 5  # kinds × curve variants × layers
    assert len(rep["loto"]) == 6 and all(r["n_splits"] == 6 for r in rep["loto_summary"])
    for row in table:
        assert row["n_test"] == 6 and 0 <= row["test_acc"] <= 1
    # the tap rows are the curve fits at those layers
    curve = {(r["kind"], r["variant"], r["layer"]): r["test_acc"] for r in rep["original"]["curves"]}
    tap_row = next(r for r in table if r.get("variant") == "mlp" and r["layer"] == 2 and r["kind"] == "hidden")
    assert tap_row["test_acc"] == curve["hidden", "mlp", 2]
    with pytest.raises(IndexError, match="out of range"):
        condition_report(feats, tok, taps=[1, 2, 9], loto=False)
    with pytest.raises(ValueError, match="Unknown probe variant"):
        fit_layers("svm", feats.hidden, feats.labels, original_split(feats.topics), [1])


def test_cli_probes(tiny_llama, tmp_path, monkeypatch):
    import json

    import earlyexit.core.models as M
    from earlyexit.cli import main

    monkeypatch.setattr(M, "load_model", lambda name, **k: tiny_llama)
    rc = main(["probes", "--model", "tiny", "--condition", "bare", "--limit", "4", "--no-loto", "--taps", "1,2,3",
               "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert rc == 0
    out = json.loads((tmp_path / "out" / "probes_tiny.json").read_text())  # the notebook's file and layout
    assert out["kind"] == "probes" and list(out["conditions"]) == ["bare"]
    assert out["meta"]["n"] == 24 and out["meta"]["settings"]["conditions"] == ["bare"]
    assert out["conditions"]["bare"]["taps"] == [1, 2, 3] and "loto" not in out["conditions"]["bare"]
    assert main(["probes", "--kinds", "logits", "--out", str(tmp_path)]) == 2
    # --lens: the lens feature of another lens, recorded in the file (and cached apart from the normed one)
    rc = main(["probes", "--model", "tiny", "--condition", "bare", "--limit", "4", "--no-loto", "--taps", "1,2,3",
               "--kinds", "lens", "--lens", "raw", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "raw")])
    raw = json.loads((tmp_path / "raw" / "probes_tiny.json").read_text())
    assert rc == 0 and raw["parameters"]["lens"] == "raw" and raw["meta"]["settings"]["features"]["lens"] == "raw"
    with pytest.raises(SystemExit) as bad:  # argparse: the choices named, status 2
        main(["probes", "--lens", "logit", "--out", str(tmp_path)])
    assert bad.value.code == 2


@pytest.mark.slow
def test_smollm2_prompted_features_know_the_answer_words(smollm2, tmp_path):
    """On SmolLM2 the 2-shot prompt makes " true"/" false" the likely next words."""
    model, tok = smollm2
    st = load_true_false(["cities"], limit_per_topic=8)
    f = extract_features(model, tok, st, "prompted", cache_dir=tmp_path)
    words = lm_next_token(f.top1, tok)
    assert (words >= 0).mean() >= 0.75
    assert f.hidden.shape == (8, 31, 576) and f.lens.shape == (8, 31, 256)
