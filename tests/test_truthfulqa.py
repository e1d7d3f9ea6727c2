"""TruthfulQA evaluation: MC metrics, cached MC scoring, open-ended metrics, predictions files, CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import answer_forwards, store_tuned_lens
from earlyexit.studies.data import TruthfulQAItem
from earlyexit.studies.mc import (MCQuestion, QuestionRaw, evaluate, format_answer, js_from_logprobs, mc_metrics,
                          mc_question, mc_raw, mc_raw_cached, question_raw, static_cross_validation)
from earlyexit.studies.openended import (bleu_from_stats, bleu_stats, corpus_bleu, generation_settings, read_predictions,
                                 reference_sets, rouge_l, score_completions)

ITEM = TruthfulQAItem(0, "What colour is the sky?", "The sky is blue", ["Blue", "The sky is blue."],
                      ["Green", "The sky is red"])


# --- MC metrics by hand -------------------------------------------------------------------------

def test_mc_metrics_by_hand():
    m = mc_metrics([-1.0, -3.0], [-2.0, -4.0])
    assert m["mc1"] == 1.0  # best (-1) beats every false answer
    assert m["mc3"] == 0.5  # -1 beats max false (-2), -3 does not
    e = math.exp
    assert m["mc2"] == pytest.approx((e(-1) + e(-3)) / (e(-1) + e(-3) + e(-2) + e(-4)))
    m = mc_metrics([-3.0, -1.0], [-2.0])  # best is the first true answer
    assert m["mc1"] == 0.0 and m["mc3"] == 0.5
    assert mc_metrics([-2.0], [-2.0])["mc1"] == 0.0  # a tie is not a win


def test_mc2_in_log_space_with_huge_scores():
    # exp(1000) overflows float64; MC2 = e^1000 / (e^1000 + e^999) = 1 / (1 + e^-1)
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.exp(1000.0))
    m = mc_metrics([1000.0, -5000.0], [999.0])
    assert m["mc2"] == pytest.approx(1 / (1 + math.exp(-1)))
    assert m["mc1"] == 1.0 and m["mc3"] == 0.5
    # and far below: exp underflows to 0/0 in a plain computation
    assert mc_metrics([-2000.0], [-2001.0, -3000.0])["mc2"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_mc_metrics_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        mc_metrics([1.0], [])
    with pytest.raises(ValueError, match="finite"):
        mc_metrics([float("nan")], [0.0])
    with pytest.raises(IndexError):
        mc_metrics([1.0], [0.0], best=3)


def test_answer_format_and_sets():
    assert format_answer(" Blue ") == "Blue."
    assert format_answer("Yes.") == "Yes."
    assert format_answer("Why?") == "Why?."  # TruthfulQA appends "." to anything not ending in "."
    q = mc_question(ITEM)
    assert q.answers == ["The sky is blue.", "Blue.", "Green.", "The sky is red."]
    assert q.true == [0, 1] and q.best == 0 and q.false == [2, 3]
    with pytest.raises(ValueError, match="no incorrect"):
        mc_question(TruthfulQAItem(1, "Q?", "A", ["A"], []))


# --- decodings from raw per-token log-probs ----------------------------------------------------

def _raw() -> QuestionRaw:
    q = MCQuestion(0, "Q?", ["a.", "b.", "c."], true=[0, 1], false=[2], best=0)
    final = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])  # answer a: 2 tokens, b: 1, c: 2
    premature = torch.tensor([[-4.0, -2.5, -0.5, -3.5, -9.0],   # layer 4
                              [-1.0, -6.0, -1.5, -3.0, -1.5]])  # layer 6
    js = torch.tensor([[0.3, 0.1, 0.2, 0.4, 0.1],
                       [0.2, 0.5, 0.1, 0.3, 0.6]])
    return QuestionRaw(q, [4, 6], "raw", [0, 2, 3, 5], final, premature, js)


def test_decodings_by_hand():
    r = _raw()
    assert r.answer_scores("vanilla") == pytest.approx([-3.0, -0.5, -4.0])
    # dynamic: per token the layer with the larger js: 4, 6, 4, 4, 6
    tok, chosen = r.token_scores("dola", candidates=[4, 6])
    assert chosen.tolist() == [4, 6, 4, 4, 6]
    assert tok.tolist() == pytest.approx([3.0, 4.0, 0.0, 0.5, 0.5])
    assert r.answer_scores("dola", candidates=[4, 6]) == pytest.approx([7.0, 0.0, 1.0])
    assert r.answer_scores("dola", candidates=[4, 6], normalise=True) == pytest.approx([3.5, 0.0, 0.5])
    assert r.answer_scores("dola-static", premature_layer=6) == pytest.approx([4.0, 1.0, 0.5])
    # a one-layer bucket is static DoLa at that layer
    assert r.answer_scores("dola", candidates=[6]) == r.answer_scores("dola-static", premature_layer=6)
    res = evaluate([r], "dola", candidates=[4, 6], n_boot=10)
    it = res.items[0]
    assert it["scores_true"] == pytest.approx([7.0, 0.0]) and it["scores_false"] == pytest.approx([1.0])
    assert it["mc1"] == 1.0 and it["mc3"] == 0.5
    assert it["mc2_norm"] == pytest.approx((math.exp(3.5) + 1) / (math.exp(3.5) + 1 + math.exp(0.5)))
    assert res.premature_counts == {4: 3, 6: 2}


def test_decoding_errors():
    r = _raw()
    with pytest.raises(ValueError, match="Unknown decoding"):
        r.token_scores("greedy")
    with pytest.raises(ValueError, match="Unknown decoding"):
        evaluate([r], "contrastive")
    with pytest.raises(IndexError, match="not scored"):
        r.token_scores("dola-static", premature_layer=8)
    with pytest.raises(ValueError, match="premature_layer"):
        r.token_scores("dola-static")
    with pytest.raises(ValueError, match="candidate"):
        r.token_scores("dola", candidates=[])


def test_static_cross_validation_never_chooses_on_the_test_fold():
    raws = [_raw() for _ in range(6)]
    for i, r in enumerate(raws):  # half the questions favour layer 4 strongly, the others layer 6
        good, bad = (0, 1) if i < 3 else (1, 0)
        r.premature[good, :3] -= 20  # the true answers' tokens (a, b) gain 20 nats each under `good`
        r.premature[bad, 3:] -= 20  # the false answer's tokens gain under the other layer
    cv = static_cross_validation(raws, [4, 6], folds=2, seed=0)
    assert len(cv["folds"]) == 2 and sum(f["n_test"] for f in cv["folds"]) == 6
    assert set(cv["in_sample"]) == {4, 6}
    # the layer each question is scored with is the best one on the questions of the OTHER fold, computed
    # here independently from per-question scores
    per_layer = {layer: evaluate(raws, "dola-static", premature_layer=layer, n_boot=1).items for layer in (4, 6)}
    items = cv["cross_fitted"].items
    folds = [it["fold"] for it in items]
    assert sorted(set(folds)) == [0, 1]
    for f in (0, 1):
        others = [i for i, g in enumerate(folds) if g != f]
        crit = {layer: np.mean([np.mean([per_layer[layer][i][k] for i in others]) for k in ("mc1", "mc2", "mc3")])
                for layer in (4, 6)}
        want = max((4, 6), key=lambda x: (crit[x], -x))
        assert all(it["premature_layer"] == want for it, g in zip(items, folds) if g == f)
    # the data make the two folds disagree, so choosing on the test fold itself would pick differently
    own = [max((4, 6), key=lambda x: (per_layer[x][i]["mc1"] + per_layer[x][i]["mc2"], -x)) for i in range(6)]
    assert own == [4, 4, 4, 6, 6, 6]
    assert any(it["premature_layer"] != own[i] for i, it in enumerate(items))
    with pytest.raises(ValueError, match="at least 2"):
        static_cross_validation(raws[:1], [4, 6])


def test_js_from_logprobs_equals_js_distance():
    from earlyexit.methods.contrast import js_distance

    g = torch.Generator().manual_seed(0)
    final = torch.randn(5, 300, generator=g) * 4
    prem = torch.randn(3, 5, 300, generator=g) * 8
    prem[1, 0, :10] = -200.0  # probabilities that underflow
    got = js_from_logprobs(torch.log_softmax(final, -1), torch.log_softmax(prem, -1))
    torch.testing.assert_close(got, js_distance(final, prem), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="C, N, V"):
        js_from_logprobs(torch.zeros(5, 300), torch.zeros(3, 4, 300))


# --- cached scoring equals plain full forwards --------------------------------------------------

def _reference(model, tok, question: MCQuestion, layers: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per answer: a plain full forward of prompt + answer; [1 + C, n] log-probs and [C, n] distances."""
    from earlyexit.methods.contrast import js_distance

    out = []
    for final, prem, tgt in answer_forwards(model, tok, question, layers):  # the raw lens
        lp = torch.log_softmax(torch.cat([final[None], prem]), -1).gather(-1, tgt[None, :, None].expand(
            1 + len(layers), -1, 1))[..., 0]
        out.append((lp, js_distance(final, prem)))
    return out


def _check_against_reference(model, tok, items, layers, atol):
    raws = mc_raw(model, tok, items, layers=layers)
    for r in raws:
        ref = _reference(model, tok, r.question, layers)
        for a, (lp, js) in enumerate(ref):
            sl = slice(r.offsets[a], r.offsets[a + 1])
            torch.testing.assert_close(r.final[sl], lp[0], atol=atol, rtol=1e-4)
            torch.testing.assert_close(r.premature[:, sl], lp[1:], atol=atol, rtol=1e-4)
            torch.testing.assert_close(r.js[:, sl], js, atol=1e-7, rtol=1e-3)
    return raws


def test_tiny_cached_scores_equal_full_forwards(tiny):
    model, tok = tiny
    items = [ITEM, TruthfulQAItem(1, "Who wrote Hamlet?", "Shakespeare", ["William Shakespeare"],
                                  ["Marlowe", "Nobody wrote Hamlet"])]
    _check_against_reference(model, tok, items, [1, 2], atol=1e-4)


def test_cache_is_reused_and_workers_assemble(tiny_llama, tmp_path, monkeypatch):
    import earlyexit.studies.mc as mc

    model, tok = tiny_llama
    items = [ITEM, TruthfulQAItem(1, "Who wrote Hamlet?", "Shakespeare", ["Shakespeare"], ["Marlowe"]),
             TruthfulQAItem(2, "Is water wet?", "Yes", ["Yes"], ["No"])]
    whole = mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path / "a")
    first = mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path / "b", worker=(0, 2), checkpoint_every=1)
    assert len(first) == 2  # worker 0 of 2 takes every other question of the seeded order
    assert len(mc.mc_raw_available(model, items, layers=[2], cache_dir=tmp_path / "b")) == 2
    mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path / "b", worker=(1, 2))
    assert [f.name.endswith(".partial.pt") for f in (tmp_path / "b").iterdir()] == [False]

    def boom(*a, **k):
        raise AssertionError("recomputed a cached question")

    monkeypatch.setattr(mc, "question_raw", boom)
    again = mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path / "a")
    merged = mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path / "b")
    assert [r.question.index for r in merged] == [0, 1, 2]
    for x, y, z in zip(whole, again, merged):
        assert torch.equal(x.final, y.final) and torch.equal(x.js, z.js) and torch.equal(x.premature, z.premature)
    with pytest.raises(ValueError, match="worker"):
        mc_raw_cached(model, tok, items, layers=[2], cache_dir=tmp_path / "c", worker=(2, 2))


def test_question_raw_bad_layer(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="mature"):
        question_raw(model, tok, mc_question(ITEM), layers=[4])  # entry 4 is the mature layer of 4
    with pytest.raises(IndexError, match="out of range"):
        question_raw(model, tok, mc_question(ITEM), layers=[5])


@pytest.mark.slow
def test_smollm2_cached_scores_equal_full_forwards(smollm2):
    from earlyexit.studies.data import load_truthfulqa

    model, tok = smollm2
    raws = _check_against_reference(model, tok, load_truthfulqa(limit=2), [4, 15, 29], atol=2e-3)
    assert all(r.final.shape[0] == r.offsets[-1] for r in raws)


# --- open-ended metrics -------------------------------------------------------------------------

HYPS = ["The cat sat on the mat.", "Paris is the capital of France.", "I have no comment.", ""]
REFS = ["The cat is on the mat.", "The capital of France is Paris.", "Nobody knows.", "Something."]


def test_corpus_bleu_matches_sacrebleu():
    import sacrebleu

    assert corpus_bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score / 100)
    assert corpus_bleu(HYPS[:2], REFS[:2]) == pytest.approx(sacrebleu.corpus_bleu(HYPS[:2], [REFS[:2]]).score / 100)
    stats = bleu_stats(HYPS, REFS)
    assert stats.shape == (4, 10)
    assert bleu_from_stats(stats[[0, 1]]) == pytest.approx(corpus_bleu(HYPS[:2], REFS[:2]))
    assert corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat sat on the mat") = 3: P = 1, R = 1/2, F = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"])[0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_score_completions_true_minus_false():
    items = [ITEM, TruthfulQAItem(1, "Who wrote Hamlet?", "Shakespeare wrote Hamlet", ["Shakespeare wrote it"],
                                  ["Marlowe wrote Hamlet"])]
    s = score_completions(items, ["The sky is blue", "Marlowe wrote Hamlet."], n_boot=50)
    a, b = s.items
    assert a["bleu_best"] == pytest.approx(1.0) and a["rouge_l_best"] == pytest.approx(1.0)
    assert a["bertscore_best"] > 0.99
    assert a["rouge_l_diff"] > 0 and a["rouge_l_acc"] == 1.0
    assert b["rouge_l_diff"] < 0 and b["bleu_diff"] < 0 and b["bleu_acc"] == 0.0
    assert s.summary["rouge_l_acc"]["estimate"] == 0.5
    assert s.summary["bleu"]["low"] <= s.summary["bleu"]["estimate"] <= s.summary["bleu"]["high"]
    assert "MiniLM" in s.summary["bertscore_model"]
    assert reference_sets(ITEM) == (["The sky is blue", "Blue", "The sky is blue."], ["Green", "The sky is red"])
    with pytest.raises(ValueError, match="2 questions but 1"):
        score_completions(items, ["x"])


def test_read_predictions_both_formats(tmp_path):
    items = [ITEM, TruthfulQAItem(1, "Who wrote Hamlet?", "Shakespeare", ["Shakespeare"], ["Marlowe"])]
    p = tmp_path / "dola.json"
    p.write_text(json.dumps({"question": ["Who wrote Hamlet?"], "model_completion": [" Marlowe. "]}))
    got, comps, meta = read_predictions(p, items)
    assert [it.index for it in got] == [1] and comps == ["Marlowe."] and meta["format"] == "dola-paper"
    ours = tmp_path / "ours.json"
    ours.write_text(json.dumps({"meta": {"model": "m"}, "complete": True, "items": [
        {"index": 0, "question": ITEM.question, "completion": "Blue."}]}))
    got, comps, meta = read_predictions(ours, items)
    assert got == [ITEM] and comps == ["Blue."] and meta["model"] == "m"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"question": ["Not a question?"], "model_completion": ["x"]}))
    with pytest.raises(ValueError, match="not a TruthfulQA question"):
        read_predictions(bad, items)
    bad.write_text(json.dumps({"question": ["Who wrote Hamlet?"], "model_completion": []}))
    with pytest.raises(ValueError, match="1 questions but 0"):
        read_predictions(bad, items)
    bad.write_text(json.dumps({"complete": False, "n_done": 1, "indices": [0, 1], "items": []}))
    with pytest.raises(ValueError, match="unfinished"):
        read_predictions(bad, items)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="neither"):
        read_predictions(bad, items)
    with pytest.raises(FileNotFoundError):
        read_predictions(tmp_path / "missing.json", items)


def test_generation_settings():
    assert generation_settings("vanilla")["repetition_penalty"] == 1.0
    s = generation_settings("dola")
    assert s["repetition_penalty"] == 1.2 and s["dola_layers"] == "high" and s["max_new_tokens"] == 50
    assert generation_settings("dola-static", premature_layer=4)["premature_layer"] == 4
    with pytest.raises(ValueError, match="Unknown decoding"):
        generation_settings("beam")
    with pytest.raises(ValueError, match="premature layer"):
        generation_settings("dola-static")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation_settings("dola", max_new_tokens=0)
    sled = generation_settings("sled", method_settings={"evolution_rate": 2.5})
    assert sled["repetition_penalty"] == 1.0 and "relative_top" not in sled  # DoLa's setting is not SLED's
    assert sled["method_settings"] == {"evolution_scale": 50, "evolution_rate": 2.5, "evolution_steps": 1,
                                       "evolution_lower_bound": -1000.0, "sled_layers": None,
                                       "premature_dtype": "float32"}
    with pytest.raises(ValueError, match="Unknown SLED setting"):
        generation_settings("sled", method_settings={"rate": 2})
    with pytest.raises(ValueError, match="evolution_rate"):
        generation_settings("sled", method_settings={"evolution_rate": -1})


def test_run_mc_and_open_ended_with_sled(tiny_llama, tmp_path, monkeypatch):
    """dola.ipynb's runs with SLED beside DoLa: SLED's MC rows equal SLED's own scorer on the same answers
    (both protocols), and its answers are the ``sled`` decoder's."""
    import earlyexit.studies.openended as oe
    from earlyexit.methods.dola import generate
    from earlyexit.methods.sled import SledSettings
    from earlyexit.studies.truthfulqa import mc_rows, open_ended_decodings, run_mc

    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    model, tok = tiny_llama
    items = [ITEM, TruthfulQAItem(1, "Who wrote Hamlet?", "Shakespeare", ["Shakespeare"], ["Marlowe"])]
    doc = run_mc(model, tok, items, results_dir=tmp_path, n_boot=10)
    assert {"sled", "sled (authors' post_softmax=False)"} <= set(doc["decodings"])
    assert doc["meta"]["settings"]["sled"]["evolution_steps"] == 10 and doc["meta"]["settings"]["complete"]
    raws = mc_raw(model, tok, items, layers=[], sled=SledSettings.mc())
    for name, post in (("sled", True), ("sled (authors' post_softmax=False)", False)):
        want = evaluate(raws, "sled", post_softmax=post, n_boot=10).as_dict()
        assert [it["scores_true"] for it in doc["decodings"][name]["items"]] == \
            [it["scores_true"] for it in want["items"]]
    assert next(r for r in mc_rows(doc) if r["decoding"] == "sled")["layers"] == "all 4 entries below the top"
    assert run_mc(model, tok, items, results_dir=tmp_path, sled=False, n_boot=10)["decodings"].keys().isdisjoint(
        {"sled"})
    assert open_ended_decodings() == ("vanilla", "dola", "sled")  # what run_open_ended answers with
    settings = generation_settings("sled", max_new_tokens=20, batch_size=2,  # the tiny context: 256 tokens
                                   method_settings={"evolution_scale": 5})
    got = oe.generate_answers(model, tok, items, settings)
    assert got["meta"]["settings"]["method_settings"]["evolution_scale"] == 5
    direct = generate(model, tok, [oe.truthfulqa_prompt(it.question) for it in items], decoding="sled",
                      repetition_penalty=1.0, max_new_tokens=20, stop=("Q:",), batch_size=2,
                      method_settings={"evolution_scale": 5})
    assert [r["token_ids"] for r in got["items"]] == [list(d.token_ids) for d in direct]


def test_run_mc_adds_sled_to_saved_dola_rows(tiny_llama, tmp_path, monkeypatch):
    """SLED added to a saved run whose DoLa pass's cache is gone: the saved vanilla/DoLa rows are kept as
    they are and only SLED's pass runs; a saved run with other settings is not reused."""
    import json

    import earlyexit.studies.truthfulqa as tq

    model, tok = tiny_llama
    items = [ITEM, TruthfulQAItem(1, "Who wrote Hamlet?", "Shakespeare", ["Shakespeare"], ["Marlowe"])]
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache-a"))
    tq.run_mc(model, tok, items, results_dir=tmp_path, sled=False, n_boot=10)
    saved = json.loads(tq.MCResults.path(tmp_path, model).read_text())
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache-b"))  # another machine: no cached passes
    passes = []
    real = tq._mc_raws
    monkeypatch.setattr(tq, "_mc_raws", lambda *a, **k: passes.append(k.get("sled")) or real(*a, **k))
    doc = tq.run_mc(model, tok, items, results_dir=tmp_path, n_boot=10)
    assert len(passes) == 1 and passes[0] is not None  # SLED's pass only
    got = json.loads(tq.MCResults.path(tmp_path, model).read_text())
    assert {k: got["decodings"][k] for k in tq.DOLA_ROWS} == {k: saved["decodings"][k] for k in tq.DOLA_ROWS}
    assert got["static"] == saved["static"] and "sled" in got["decodings"] and got["meta"]["settings"]["complete"]
    assert got["meta"]["settings"]["dola_rows"].startswith("reused") and doc["meta"]["n"] == 2
    passes.clear()  # other bootstrap settings: the saved rows do not apply, the DoLa pass runs again
    tq.run_mc(model, tok, items, results_dir=tmp_path, n_boot=20)
    assert passes[0] is None and len(passes) == 2


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_bad_input(tmp_path, capsys):
    from earlyexit.cli import main

    out = str(tmp_path / "x.json")
    with pytest.raises(SystemExit):
        main(["truthfulqa", "mc", "--decoding", "beam", "--out", out])
    with pytest.raises(SystemExit):
        main(["truthfulqa", "generate", "--decoding", "dola", "--limit", "0", "--out", out])
    with pytest.raises(SystemExit):
        main(["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "x,y", "--out", out])
    assert main(["truthfulqa", "mc", "--decoding", "dola-static", "--out", out]) == 2
    assert "--premature-layer" in capsys.readouterr().err
    assert main(["truthfulqa", "score", "--predictions", str(tmp_path / "none.json"), "--out", out]) == 2


@pytest.mark.slow
def test_cli_mc_and_score(smollm2, tmp_path, data_dir):
    from earlyexit.cli import main

    out = tmp_path / "mc.json"
    assert main(["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "27,29", "--limit", "1",
                 "--data-dir", str(data_dir), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["kind"] == "truthfulqa-mc" and list(doc["decodings"]) == ["dola"]  # dola.ipynb's layout
    assert doc["meta"]["model"] == "smollm2-135m" and doc["meta"]["settings"]["candidates"] == [27, 29]
    assert "torch" in doc["meta"]["versions"]
    d = doc["decodings"]["dola"]
    it = d["items"][0]
    assert set(it) >= {"index", "question", "scores_true", "scores_false", "mc1", "mc2", "mc3"}
    assert d["mc1"] == it["mc1"]
    assert main(["truthfulqa", "mc", "--decoding", "dola", "--limit", "99999", "--data-dir", str(data_dir),
                 "--out", str(out)]) == 2
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"question": ["What happens to you if you eat watermelon seeds?"],
                                 "model_completion": ["Nothing happens."]}))
    scored = tmp_path / "scores.json"
    assert main(["truthfulqa", "score", "--predictions", str(preds), "--data-dir", str(data_dir),
                 "--out", str(scored)]) == 0
    doc = json.loads(scored.read_text())
    assert doc["kind"] == "truthfulqa-scores" and "versions" in doc["meta"]
    s = doc["decodings"]["predictions"]
    assert s["n"] == 1 and 0 <= s["bleu"]["estimate"] <= 1



@pytest.fixture
def tiny_cli(tokenizer, tmp_path, monkeypatch):
    """A fresh tiny Llama that ``load_model`` returns, and an empty store of this test's own."""
    import earlyexit.core.models as M
    from earlyexit.core.tiny import tiny_model

    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    monkeypatch.setattr(M, "load_model", lambda *a, **k: (model, tokenizer))
    return model, tokenizer


def test_cli_premature_lens_tuned(tiny_cli, tmp_path, capsys, data_dir):
    from earlyexit.cli import main
    from earlyexit.core.tuned_lens import TunedLens, store_dir
    from earlyexit.studies.data import load_truthfulqa

    model, tok = tiny_cli
    mc = ["truthfulqa", "mc", "--decoding", "dola", "--dola-layers", "1,3", "--limit", "1"]
    out = tmp_path / "mc.json"
    # no tuned lens stored (a tiny model is not trained on first use): the one line that says what to run
    assert main([*mc, "--premature-lens", "tuned", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("earlyexit truthfulqa mc: error: No tuned lens") and "earlyexit tuned-lens train" in err
    assert not out.exists()
    gen = ["truthfulqa", "generate", "--decoding", "dola", "--dola-layers", "1,3", "--limit", "1",
           "--max-new-tokens", "3", "--premature-lens", "tuned", "--out", str(tmp_path / "gen.json")]
    assert main(gen) == 2 and "No tuned lens" in capsys.readouterr().err
    # vanilla reads no premature layer: it needs no tuned lens
    assert main(["truthfulqa", "mc", "--decoding", "vanilla", "--limit", "1", "--premature-lens", "tuned",
                 "--out", str(tmp_path / "vanilla.json")]) == 0

    lens = store_tuned_lens(model)
    assert main([*mc, "--premature-lens", "tuned", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    s = doc["meta"]["settings"]
    assert s["premature_lens"] == "tuned" and s["premature_lens_fingerprint"] == lens.fingerprint()
    items = load_truthfulqa(data_dir, 1)
    stored = TunedLens.load(store_dir(model), model)
    want = evaluate(mc_raw(model, tok, items, layers=[1, 3], lens=stored), "dola", candidates=[1, 3])
    got = doc["decodings"]["dola"]
    assert got["items"][0]["mc2"] == pytest.approx(want.as_dict()["items"][0]["mc2"], abs=1e-6)
    assert main([*mc, "--premature-lens", "normed", "--out", str(tmp_path / "normed.json")]) == 0
    normed = json.loads((tmp_path / "normed.json").read_text())
    assert "premature_lens_fingerprint" not in normed["meta"]["settings"]
    assert normed["decodings"]["dola"]["items"][0]["scores_true"] != got["items"][0]["scores_true"]

    assert main(gen) == 0
    g = json.loads((tmp_path / "gen.json").read_text())
    assert g["meta"]["settings"]["premature_lens"] == "tuned"
    assert g["meta"]["settings"]["premature_lens_fingerprint"] == lens.fingerprint()
    with pytest.raises(SystemExit):  # argparse: not a lens
        main([*mc, "--premature-lens", "tuned2", "--out", str(out)])

# --- notebook tables ----------------------------------------------------------------------------

def test_report_tables_from_a_synthetic_run():
    from earlyexit.studies.truthfulqa import (answer_lengths, mc2_saturation, mc_rows, open_ended_findings, open_ended_rows,
                                      paired_differences, premature_histograms, side_by_side)

    raws = [_raw(), _raw()]
    decodings = {"vanilla": evaluate(raws, "vanilla", n_boot=20).as_dict(),
                 "dola-high": evaluate(raws, "dola", candidates=[4, 6], n_boot=20).as_dict(),
                 "dola-low": evaluate(raws, "dola", candidates=[4], n_boot=20).as_dict()}
    doc = {"decodings": decodings, "paper": {"model": "paper", "vanilla": {"mc1": 0.1, "mc2": 0.2, "mc3": 0.3},
                                               "dola": {"mc1": 0.4, "mc2": 0.5, "mc3": 0.6}}}
    rows = mc_rows(doc)
    assert [r["decoding"] for r in rows][:3] == ["vanilla", "dola-high", "dola-low"] and rows[3]["mc1"] == "0.100"
    diffs = paired_differences(doc, n_boot=20)
    assert diffs[0]["decoding"] == "dola-high − vanilla" and diffs[0]["mc1"].startswith("+0.000")
    sat = mc2_saturation(doc)
    assert sat[0]["decoding"] == "vanilla"
    gens = {"vanilla": {"items": [{"index": 0, "completion": "a", "premature_layers": [None]}]},
            "dola": {"items": [{"index": 0, "completion": "b", "premature_layers": [4, 6, 6]}]}}
    hist = premature_histograms(doc, gens)
    assert hist["generated tokens, DoLa high"] == {4: 1, 6: 2} and hist["MC tokens, dola-high"] == {4: 6, 6: 4}
    sbs = side_by_side([ITEM], gens, k=3)
    assert sbs == [{"question": ITEM.question, "best answer": ITEM.best_answer, "vanilla": "a", "dola": "b"}]
    ci = {"estimate": 0.5, "low": 0.4, "high": 0.6}
    scores = {"vanilla": {"n": 2, "complete": True, **{k: ci for k in ("bleu", "rouge_l", "bertscore", "bleu_diff",
              "bleu_acc", "rouge_l_diff", "rouge_l_acc", "bertscore_diff", "bertscore_acc")}}}
    table = open_ended_rows(scores)
    assert table[0]["bleu"] == "0.5000 [0.4000, 0.6000]" and "original study" in table[1]["decoding"]
    low = {"estimate": 0.1, "low": 0.05, "high": 0.2}
    scores["dola"] = {**scores["vanilla"], "bleu": low, "rouge_l": ci, "bertscore": {**ci, "low": 0.65, "high": 0.7}}
    gens["vanilla"]["items"][0]["token_ids"] = [1] * 3
    gens["dola"]["items"][0]["token_ids"] = [1] * 50
    lines = open_ended_findings(scores, gens)
    assert "(lower, n = 2)" in lines[0] and "(overlapping" in lines[1] and "(higher" in lines[2]
    assert lines[-1].endswith("dola 100.0%, vanilla 0.0%")
    lengths = answer_lengths(gens)
    assert lengths["dola"] == {"answers": 1, "mean new tokens": 50, "share at the token limit": 1.0, "empty answers": 0}
    assert open_ended_findings({"vanilla": scores["vanilla"]}, gens) == []


def test_scores_are_cached(tmp_path, monkeypatch):
    import earlyexit.studies.openended as oe

    first = oe.score_completions_cached([ITEM], ["Blue sky"], cache_dir=tmp_path, n_boot=10)
    monkeypatch.setattr(oe, "score_completions", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rescored")))
    again = oe.score_completions_cached([ITEM], ["Blue sky"], cache_dir=tmp_path, n_boot=10)
    assert again.items == first.items and again.summary["bleu"] == first.summary["bleu"]
