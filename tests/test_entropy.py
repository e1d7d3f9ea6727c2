"""The entropy study: stop strings, batched generation, group normalisation, bootstrap, tests, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from earlyexit.core.batching import StopTracker
from earlyexit.cli import main
from earlyexit.studies.data import TruthfulQAItem, load_truthfulqa
from earlyexit.studies.entropy import (AnswerEntropy, analyse, conclusion, early_layers, generate_answers, group_verdict,
                               per_question_rows)
from earlyexit.studies.entropy_labels import AnswerScores, label_answers, score_answers
from earlyexit.studies.entropy_stats import (adjust_pvalues, bootstrap_curve, bootstrap_difference, group_curves,
                                     layer_tests, weighted_curve)


# --- group normalisation ---------------------------------------------------------------------------

def test_group_normalisation_hand_example():
    # two short correct answers, one long wrong answer; 2 layers
    means = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    n_tokens = np.array([1, 1, 8])
    correct = np.array([True, True, False])
    c, w = group_curves(means, n_tokens, correct, weighting="within")
    np.testing.assert_allclose(c, [2.0, 3.0])  # (1·[1,2] + 1·[3,4]) / 2
    np.testing.assert_allclose(w, [5.0, 6.0])
    oc, ow = group_curves(means, n_tokens, correct, weighting="original")
    np.testing.assert_allclose(oc, [0.4, 0.6])  # (1·[1,2] + 1·[3,4]) / 10
    np.testing.assert_allclose(ow, [4.0, 4.8])  # 8·[5,6] / 10
    # the original makes the correct group look far lower although its real curve is only a bit lower
    assert (oc < c).all() and (ow < w).all()
    np.testing.assert_allclose(oc, c * 0.2)
    np.testing.assert_allclose(ow, w * 0.8)


def test_weighted_curve_is_token_weighted():
    means = np.array([[0.0], [10.0]])
    assert weighted_curve(means, np.array([3, 1]))[0] == pytest.approx(2.5)
    assert weighted_curve(means, np.array([1, 1]))[0] == pytest.approx(5.0)


def test_empty_group_gives_nan_not_a_crash():
    means, n = np.ones((3, 2)), np.array([1, 2, 3])
    c, w = group_curves(means, n, np.array([False, False, False]))
    assert np.isnan(c).all() and np.allclose(w, 1.0)
    assert np.isnan(bootstrap_difference(means, n, np.zeros(3, bool), n_boot=10).estimate).all()
    t = layer_tests(means, n, np.zeros(3, bool), n_perm=10)
    assert np.isnan(t.mannwhitney_p).all() and t.n_correct == 0 and t.n_wrong == 3


def test_aggregation_rejects_empty_answers_and_bad_shapes():
    with pytest.raises(ValueError, match="empty answers"):
        weighted_curve(np.ones((2, 3)), np.array([1, 0]))
    with pytest.raises(ValueError, match=r"\[N, E\]"):
        weighted_curve(np.ones(3), np.array([1, 1, 1]))
    with pytest.raises(ValueError, match="weighting"):
        group_curves(np.ones((2, 1)), np.array([1, 1]), np.array([True, False]), weighting="global")


# --- bootstrap and tests ---------------------------------------------------------------------------

def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 2000):
        means = rng.normal(2.0, 1.0, size=(n, 3))
        n_tok = rng.integers(1, 30, size=n)
        ci = bootstrap_curve(means, n_tok, n_boot=500, seed=0)
        np.testing.assert_allclose(ci.estimate, weighted_curve(means, n_tok))
        assert (ci.low <= ci.estimate).all() and (ci.estimate <= ci.high).all()
        widths.append((ci.high - ci.low).mean())
    assert widths[1] < widths[0] / 4  # ~ 1/sqrt(100) = 1/10 in theory


def test_bootstrap_difference_contains_estimate():
    rng = np.random.default_rng(2)
    means = rng.normal(size=(200, 4))
    n_tok = rng.integers(1, 20, size=200)
    groups = rng.random(200) < 0.3
    d = bootstrap_difference(means, n_tok, groups, n_boot=500)
    c, w = group_curves(means, n_tok, groups)
    np.testing.assert_allclose(d.estimate, w - c)
    assert (d.low <= d.estimate).all() and (d.estimate <= d.high).all()


def test_adjust_pvalues_holm_and_bh():
    p = np.array([0.01, 0.04, 0.03])
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(adjust_pvalues(p, "bh"), [0.03, 0.04, 0.04])
    rng = np.random.default_rng(0)
    q = rng.random(31) ** 3
    np.testing.assert_allclose(adjust_pvalues(q, "bh"), false_discovery_control(q))
    with_nan = adjust_pvalues(np.array([0.01, np.nan]), "holm")
    assert with_nan[0] == pytest.approx(0.01) and np.isnan(with_nan[1])
    with pytest.raises(ValueError, match="correction"):
        adjust_pvalues(p, "bonferroni-ish")


def test_layer_tests_find_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(3)
    n = 120
    groups = np.arange(n) < 60
    means = rng.normal(size=(n, 2))
    means[~groups, 0] += 1.5  # layer 0: wrong answers have higher entropy; layer 1: no difference
    t = layer_tests(means, rng.integers(1, 10, size=n), groups, n_perm=999)
    assert t.mannwhitney_adj[0] < 1e-6 and t.permutation_adj[0] < 0.01 and t.auroc[0] > 0.8
    assert t.mannwhitney_adj[1] > 0.05 and 0.3 < t.auroc[1] < 0.7
    assert (t.mannwhitney_adj >= t.mannwhitney_p).all()


# --- labels ----------------------------------------------------------------------------------------

def _scores(f1_best, max_true, max_false, valid=None):
    f1_best = np.asarray(f1_best, float)
    valid = np.ones(len(f1_best), bool) if valid is None else np.asarray(valid)
    return AnswerScores(f1_best, np.asarray(max_true, float), np.asarray(max_false, float), valid, "minilm")


def test_label_methods():
    s = _scores([0.9, 0.5, 0.86, np.nan], [0.9, 0.7, 0.86, np.nan], [0.95, 0.6, np.nan, np.nan],
                valid=[True, True, True, False])
    np.testing.assert_array_equal(label_answers(s, "threshold", 0.85)[:3], [1, 0, 1])
    np.testing.assert_array_equal(label_answers(s, "closer")[:3], [0, 1, 1])  # no false reference → closer
    assert np.isnan(label_answers(s, "threshold")[3]) and np.isnan(label_answers(s, "closer")[3])


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.2, "0.8"])
def test_threshold_outside_unit_interval_is_an_error(threshold):
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\)"):
        label_answers(_scores([0.5], [0.5], [0.4]), "threshold", threshold)


def test_unknown_label_method_is_an_error():
    with pytest.raises(ValueError, match="Unknown label method 'rouge'"):
        label_answers(_scores([0.5], [0.5], [0.4]), "rouge")
    with pytest.raises(ValueError, match="Unknown label method"):
        analyse(_answers(2), _scores([0.5] * 2, [0.5] * 2, [0.4] * 2), methods=["exact"])


def test_score_answers_with_embedded_minilm():
    item = TruthfulQAItem(0, "What colour is the sky?", "The sky is blue.", ["It is blue."], ["The sky is green."])
    assert item.references() == (["The sky is blue.", "It is blue."], ["The sky is green."])
    s = score_answers([" The sky is blue.\n", "  \n", "The sky is green."], [item] * 3)
    assert s.f1_best[0] == pytest.approx(1.0, abs=1e-4)  # whitespace stripped before scoring
    assert not s.valid[1] and np.isnan(s.f1_best[1])
    labels = label_answers(s, "closer")
    assert labels[0] == 1 and labels[2] == 0 and np.isnan(labels[1])


# --- analysis on synthetic answers -----------------------------------------------------------------

def _answers(n: int, empty=(), seed=0) -> AnswerEntropy:
    rng = np.random.default_rng(seed)
    n_tok = rng.integers(1, 20, size=n)
    n_tok[list(empty)] = 0
    means = rng.normal(1.0, 0.2, size=(n, 5))
    means[n_tok == 0] = np.nan
    return AnswerEntropy(np.arange(n), [f"answer {i}" if n_tok[i] else "" for i in range(n)], n_tok, means,
                         list(range(5)), "normed")


def test_empty_answers_are_excluded_and_counted():
    a = _answers(40, empty=(3, 7))
    rng = np.random.default_rng(1)
    f1 = rng.random(40)
    valid = a.n_tokens > 0
    f1[~valid] = np.nan
    s = _scores(f1, f1, np.where(valid, 0.5, np.nan), valid=valid)
    overall, groups = analyse(a, s, n_boot=50, n_perm=50)
    assert overall.n == 38
    g = groups["threshold"]
    assert g.tests.n_correct + g.tests.n_wrong == 38
    assert np.isfinite(g.correct.estimate).all()


def test_conclusion_says_too_few_when_a_group_is_tiny():
    from earlyexit.studies.entropy import EntropyStudy

    a = _answers(4)
    s = _scores([0.9, 0.1, 0.2, 0.3], [0.9, 0.1, 0.2, 0.3], [0.5] * 4)
    overall, groups = analyse(a, s, n_boot=20, n_perm=20)
    items = [TruthfulQAItem(i, f"q{i}", "b", ["b"], ["c"]) for i in range(4)]
    study = EntropyStudy("tiny", items, a, s, overall, groups, {"lens": "normed"})
    text = conclusion(study)
    assert "too few answers" in text and "n = 4" in text
    assert group_verdict(groups["threshold"], a.layers)["verdict"] == "too few answers"
    assert len(per_question_rows(study)) == 4
    assert early_layers(list(range(31))) == list(range(1, 8))


def test_verdict_follows_the_numbers():
    a = _answers(80, seed=4)
    f1 = np.where(np.arange(80) < 40, 0.9, 0.5)  # first half correct
    s = _scores(f1, f1, np.full(80, 0.7))
    a.means[40:, 1] += 1.0  # wrong answers: higher entropy at early layer 1 only
    _, groups = analyse(a, s, methods=["threshold"], n_boot=50, n_perm=200)
    v = group_verdict(groups["threshold"], a.layers)
    assert v["verdict"] == "separates" and v["wrong_answers_entropy"] == "higher"
    assert v["significant_early_layers"] == [1]
    a.means[40:, 1] -= 1.0
    _, groups = analyse(a, s, methods=["threshold"], n_boot=50, n_perm=200)
    assert group_verdict(groups["threshold"], a.layers)["verdict"] == "does not separate"


# --- generation: stop strings, batching, cache -----------------------------------------------------

def test_stop_string_per_sequence_in_a_batch(tokenizer):
    seqs = [tokenizer(" Paris.\nQ: What", add_special_tokens=False)["input_ids"],
            tokenizer(" It is a long answer that goes on and on", add_special_tokens=False)["input_ids"]]
    tracker = StopTracker(tokenizer, 2, ("\nQ:",))
    steps = max(map(len, seqs))
    stopped_at = None
    for t in range(steps):
        done = tracker.update([s[t] if t < len(s) else tokenizer.eos_token_id for s in seqs])
        if done[0] and stopped_at is None:
            stopped_at = t
            assert not done[1], "the second sequence must go on after the first stops"
    assert stopped_at is not None and stopped_at < len(seqs[0]) - 1  # stopped at the stop string, before "What"
    assert tracker.result(0)[0] == " Paris."
    assert tracker.result(1)[0] == " It is a long answer that goes on and on"


@pytest.mark.slow
def test_batched_generation_equals_unbatched(smollm2, data_dir):
    from earlyexit.core.generation import generate_with_lens
    from earlyexit.studies.prompts import truthfulqa_prompt

    model, tok = smollm2
    prompts = [truthfulqa_prompt(it.question) for it in load_truthfulqa(data_dir, limit=4)]
    kw = dict(max_new_tokens=24, stop=("\nQ:",), top_k=1)
    batched = generate_with_lens(model, tok, prompts, batch_size=4, **kw)
    single = [generate_with_lens(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    for b, s in zip(batched, single):
        assert b.token_ids == s.token_ids
        assert b.text == s.text and "\nQ:" not in b.text
        np.testing.assert_allclose(b.entropy.numpy(), s.entropy.numpy(), atol=2e-3)
        np.testing.assert_allclose(b.kl_to_final.numpy(), s.kl_to_final.numpy(), atol=2e-3)
        np.testing.assert_allclose(b.token_probs.numpy(), s.token_probs.numpy(), atol=1e-3)
        assert np.isfinite(b.entropy.numpy()).all() and (b.token_ranks.numpy() >= 0).all()
    # each sequence stopped on its own: answers of different lengths in one batch
    assert len({len(b.token_ids) for b in batched}) > 1


def test_generate_answers_cache_roundtrip(tiny_llama, tmp_path, data_dir):
    model, tok = tiny_llama
    items = load_truthfulqa(data_dir, limit=3)
    kw = dict(max_new_tokens=3, batch_size=2, chunk_size=2, cache_dir=tmp_path, progress=False)
    first = generate_answers(model, tok, items, **kw)
    assert first.means.shape == (3, 5) and list(first.indices) == [0, 1, 2]
    assert len(list(tmp_path.glob("*.npz"))) == 2  # chunks [0, 1] and [2]
    again = generate_answers(model, tok, items, **kw)
    np.testing.assert_array_equal(first.means, again.means)
    assert first.texts == again.texts
    ok = first.n_tokens > 0
    assert np.isfinite(first.means[ok]).all() and np.isnan(first.means[~ok]).all()


# --- CLI bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "limit must be a positive integer"),
    (["--limit", "-3"], "limit must be a positive integer"),
    (["--limit", "100000"], "larger than the 817"),
    (["--threshold", "1.2"], "threshold must be a number in (0, 1)"),
    (["--scorer", "bleu"], "Unknown BERTScore model"),
])
def test_cli_rejects_bad_input(args, message, tmp_path, capsys, data_dir):
    rc = main(["entropy", "--data-dir", str(data_dir), "--out", str(tmp_path), *args])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())



def test_cli_lens_choice(tmp_path, capsys, data_dir, tokenizer, monkeypatch):
    import earlyexit.core.models as M
    import earlyexit.reports.entropy as R
    from earlyexit.core.tiny import tiny_model

    asked = []

    def fake_compute(model, **kw):  # what the command asks for, without the study
        asked.append(kw["lens"])
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(R, "compute", fake_compute)
        for args, lens in (([], "normed"), (["--raw"], "raw"), (["--lens", "raw"], "raw"), (["--lens", "tuned"], "tuned")):
            assert main(["entropy", "--out", str(tmp_path / "o"), *args]) == 130
    assert asked == ["normed", "raw", "raw", "tuned"]
    assert main(["entropy", "--raw", "--lens", "tuned", "--out", str(tmp_path / "o")]) == 2
    assert "--raw is --lens raw" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["entropy", "--lens", "logit", "--out", str(tmp_path / "o")])
    # no tuned lens stored for a tiny model (not trained on first use): the one line that says what to run
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(M, "load_model", lambda *a, **k: (tiny_model("llama"), tokenizer))
    assert main(["entropy", "--lens", "tuned", "--limit", "2", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("earlyexit entropy: error: No tuned lens") and "earlyexit tuned-lens train" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

@pytest.mark.slow
def test_cli_writes_results(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    rc = main(["entropy", "--limit", "2", "--max-new-tokens", "8", "--n-boot", "50", "--data-dir", str(data_dir),
               "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "entropy_smollm2-135m.json").read_text())
    assert res["kind"] == "entropy" and res["parameters"]["limit"] == 2
    assert res["n"] == 2 and res["meta"]["model"] == "smollm2-135m" and len(res["layers"]) == 31
    assert "MiniLM" in res["bertscore_model"] and set(res["groups"]) == {"threshold", "closer"}
    lines = (tmp_path / "out" / "entropy_per_question_smollm2-135m.csv").read_text().strip().splitlines()
    assert len(lines) == 3
